//! `Config::load`: what it accepts, and each refusal with its message.

use super::*;

fn load(extra_policy: &str, extra_vault: &str) -> Result<Config, ConfigError> {
    load_with(extra_policy, extra_vault, "")
}

fn load_with(extra_policy: &str, extra_vault: &str, top: &str) -> Result<Config, ConfigError> {
    load_naming_cluster("cluster: { name: test-1 }", extra_policy, extra_vault, top)
}

fn load_naming_cluster(
    cluster: &str,
    extra_policy: &str,
    extra_vault: &str,
    top: &str,
) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broker.yaml");
    let text = format!(
        "{cluster}
tls: {{ certFile: tls.crt, keyFile: tls.key }}
identity: {{ issuer: https://kubernetes.default.svc, audiences: [tessera], jwksFile: jwks.json }}
policy:
  paths: [policy]
{extra_policy}
vault:
  address: http://127.0.0.1:8200
  tokenFile: token
{extra_vault}
{top}
"
    );
    std::fs::write(&path, text).expect("write config");
    Config::load(&path)
}

#[test]
fn config_accepts_sane_intervals() {
    let config = load("  reloadInterval: 2s", "  timeout: 5s").expect("valid");
    assert_eq!(config.policy_reload_interval, Duration::from_secs(2));
}

#[test]
fn zero_or_absurd_intervals_are_refused() {
    for (policy, vault, named) in [
        ("  reloadInterval: 0s", "", "policy.reloadInterval"),
        ("  reloadInterval: 100000000000000h", "", "24h"),
        ("  reloadInterval: 48h", "", "24h"),
        ("", "  timeout: 0s", "vault.timeout"),
        ("", "  kvPollInterval: 1ms", "vault.kvPollInterval"),
    ] {
        let error = load(policy, vault).expect_err(policy);
        assert!(error.detail.contains(named), "{policy}{vault}: {error}");
    }
}

#[test]
fn leases_default_to_records_in_tessera_leases_and_two_per_binding() {
    let config = load("", "").expect("valid");
    assert_eq!(
        config.leases,
        LeaseSettings {
            cluster: "test-1".to_owned(),
            ..LeaseSettings::default()
        }
    );
    assert_eq!(config.leases.record_mount, "tessera-leases");
    assert_eq!(config.leases.max_per_pod_binding, 2);
    let config = load_with(
        "",
        "",
        "leases: { recordMount: kv/tessera, maxPerPodBinding: 3, sweepInterval: 5s }",
    )
    .expect("valid");
    assert_eq!(config.leases.record_mount, "kv/tessera");
    assert_eq!(config.leases.max_per_pod_binding, 3);
    assert_eq!(config.leases.sweep_interval, Duration::from_secs(5));
}

#[test]
fn each_refusal_names_the_setting_to_fix() {
    for (top, named) in [
        ("leases: { recordMount: '' }", "leases.recordMount"),
        ("leases: { recordMount: /tessera }", "leases.recordMount"),
        ("leases: { maxPerPodBinding: 0 }", "leases.maxPerPodBinding"),
        (
            "leases: { maxPerPodBinding: 1000 }",
            "leases.maxPerPodBinding",
        ),
        ("leases: { sweepInterval: 10ms }", "leases.sweepInterval"),
        ("leases: { sweepInterval: 30d }", "24h"),
        ("connections: { max: 0 }", "connections.max"),
        (
            "connections: { handshakeTimeout: 1ms }",
            "connections.handshakeTimeout",
        ),
        ("rateLimit: { perSecond: 0 }", "rateLimit.perSecond"),
        ("leases: { recordMunt: x }", "recordMunt"),
        ("shutdownGrace: soon", "shutdownGrace"),
        (
            "leases: { retiredHandleKeyFiles: [old.key] }",
            "leases.handleKeyFile",
        ),
    ] {
        let error = load_with("", "", top).expect_err(top);
        assert!(error.detail.contains(named), "{top}: {error}");
    }
}

#[test]
fn bootstrap_is_refused_where_it_would_not_meet_the_files_it_writes() {
    for (top, named) in [
        (
            "bootstrap: { namespace: tessera, directory: /run/b, tlsSecret: tls, dnsNames: [tessera] }",
            "tls.certFile and tls.keyFile must be /run/b/tls.crt and /run/b/tls.key",
        ),
        (
            "bootstrap: { namespace: tessera, directory: /run/b, tlsSecret: tls }",
            "bootstrap.dnsNames",
        ),
        (
            "bootstrap: { namespace: tessera, directory: /run/b, handleKeySecret: k }\nleases: { handleKeyFile: k }",
            "either bootstrap.handleKeySecret or leases.handleKeyFile",
        ),
        (
            "bootstrap: { namespace: tessera, directory: /run/b, webhookConfiguration: tessera }",
            "needs the webhook",
        ),
        (
            "bootstrap: { namespace: '', directory: /run/b }",
            "bootstrap.namespace",
        ),
    ] {
        let error = load_with("", "", top).expect_err(top);
        assert!(error.detail.contains(named), "{top}: {error}");
    }
    let config = load_with(
        "",
        "",
        "bootstrap: { namespace: tessera, directory: /run/b, handleKeySecret: k }",
    )
    .expect("valid");
    let bootstrap = config.bootstrap.expect("bootstrap");
    assert!(
        bootstrap.create_handle_key,
        "created when absent by default"
    );
    assert_eq!(bootstrap.check_interval, Duration::from_secs(60));
}

/// The first YAML block of `docs/configuration.md`: the reference a reader copies.
fn reference_example() -> String {
    let doc = include_str!("../../../docs/configuration.md");
    let start = doc.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = start + doc[start..].find("```").expect("the block ends");
    doc[start..end].to_owned()
}

#[test]
fn the_reference_configuration_in_the_docs_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broker.yaml");
    std::fs::write(&path, reference_example()).expect("write config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("docs/configuration.md: {e}"));
    assert!(config.bootstrap.is_some() && config.webhook.is_some());
}

#[test]
fn the_cluster_has_a_name_that_is_a_dns_label() {
    let config = load("", "").expect("valid");
    assert_eq!(config.cluster, "test-1");
    let missing = load_naming_cluster("", "", "", "").expect_err("no cluster name");
    assert!(
        missing
            .detail
            .starts_with("cluster.name is required: name this Kubernetes cluster"),
        "{missing}"
    );
    for bad in ["Prod", "-prod", "prod_eu", "", &"a".repeat(64)] {
        let error = load_naming_cluster(&format!("cluster: {{ name: \"{bad}\" }}"), "", "", "")
            .expect_err(bad);
        assert!(
            error.detail.contains("is not a DNS label"),
            "{bad}: {error}"
        );
    }
    let config = load_naming_cluster("cluster: { name: prod-eu-1 }", "", "", "").unwrap();
    assert_eq!(config.leases.cluster, "prod-eu-1");
}
