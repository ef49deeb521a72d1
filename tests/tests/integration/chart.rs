//! The Helm chart: `helm lint`, `helm template` with default and
//! non-default values, every object parsed strictly into its k8s-openapi type,
//! the rendered broker configuration accepted by the broker, renders that are
//! byte-identical (nothing random, nothing looked up), and checkov on the
//! rendered manifests. No API server can be had here, so
//! nothing is applied; helm and checkov are the real tools (`scripts/test`
//! installs them).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;
use tessera_tests::{simple_policy, workspace_root};

const NAMESPACE: &str = "tessera";

fn tool(env: &str, local: &str, name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(local);
    if local.exists() {
        return local;
    }
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: run scripts/test, which installs it into .tools/"
    );
    PathBuf::from(String::from_utf8(found.stdout).unwrap().trim())
}

fn helm() -> Command {
    Command::new(tool("TESSERA_HELM", ".tools/bin/helm", "helm"))
}

fn chart() -> PathBuf {
    workspace_root().join("deploy/helm/tessera")
}

/// Values that change every switch from its default.
const NON_DEFAULT: &[&str] = &[
    "replicaCount=3",
    "image.broker.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "image.sidecar.tag=0.1.1",
    "identity.source=oidcDiscovery",
    "identity.podLookup=false",
    "vault.auth.method=appRole",
    "vault.auth.appRole.roleId=5f0b2c9e-role",
    "vault.auth.appRole.secretIdSecret=tessera-approle",
    "vault.caConfigMap=vault-ca",
    "policy.existingConfigMap=tessera-policy-owned-by-security",
    "tls.source=certManager",
    "leases.handleKey.existingSecret=tessera-handle-key-from-vault",
    "webhook.sidecarMode=auto",
    "webhook.failurePolicy=Ignore",
    "webhook.sidecarMetricsPort=9091",
    "webhook.namespaceSelector.matchLabels=null",
    "metrics.serviceMonitor.enabled=true",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
    "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/28",
    "memoryLock=true",
    "preStopSleepSeconds=0",
    "priorityClassName=system-cluster-critical",
    "podDisruptionBudget.minAvailable=2",
    "policy.resources.enabled=true",
];

fn render(values: &[&str]) -> Vec<Value> {
    render_on(&[], values)
}

/// The Prometheus operator's CRDs, as `helm template` learns a cluster's APIs.
const PROMETHEUS_OPERATOR: &[&str] = &[
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PodMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

/// Renders `values` for a cluster that also serves `api_versions` (helm flags).
fn render_on(api_versions: &[&str], values: &[&str]) -> Vec<Value> {
    render_text_on(api_versions, values)
        .split("\n---")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("rendered YAML parses"))
        .collect()
}

/// Runs `helm <args> <chart> --set <value>...` in the release namespace.
fn helm_on_chart(args: &[&str], values: &[&str]) -> std::process::Output {
    let mut command = helm();
    command
        .args(args)
        .args(["--namespace", NAMESPACE])
        .arg(chart());
    for value in values {
        command.args(["--set", value]);
    }
    command.output().unwrap()
}

/// `helm template` output for `values`.
fn render_text(values: &[&str]) -> String {
    render_text_on(&[], values)
}

/// `helm template` output for `values` on a cluster that also serves
/// `api_versions` (helm flags).
fn render_text_on(api_versions: &[&str], values: &[&str]) -> String {
    let mut args = vec!["template", "tessera"];
    args.extend_from_slice(api_versions);
    let output = helm_on_chart(&args, values);
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Drops nulls, which helm may render and k8s-openapi leaves out.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Parses `doc` into `T` and back: a field the type does not know (a typo in
/// a template) would be dropped, so the round trip must give the same JSON.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["kind"]));
    let again = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        without_nulls(&again),
        without_nulls(doc),
        "{} {} has fields its type does not know",
        doc["kind"],
        doc["metadata"]["name"]
    );
    typed
}

/// Every rendered object, typed.
#[derive(Default)]
struct Rendered {
    deployments: Vec<Deployment>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    pdbs: Vec<PodDisruptionBudget>,
    network_policies: Vec<NetworkPolicy>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    webhooks: Vec<MutatingWebhookConfiguration>,
    /// `helm test` pods.
    test_pods: Vec<Pod>,
    /// cert-manager and Prometheus operator objects: (kind, object).
    custom: Vec<(String, Value)>,
}

fn typed(docs: &[Value]) -> Rendered {
    let mut out = Rendered::default();
    for doc in docs {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(
            kind,
            "ClusterRole"
                | "ClusterRoleBinding"
                | "MutatingWebhookConfiguration"
                | "CustomResourceDefinition"
        ) {
            assert_eq!(
                doc["metadata"]["namespace"], NAMESPACE,
                "{kind} names its namespace"
            );
        }
        match (api, kind) {
            ("apps/v1", "Deployment") => out.deployments.push(strict(doc)),
            ("v1", "ConfigMap") => out.config_maps.push(strict(doc)),
            ("v1", "Secret") => out.secrets.push(strict(doc)),
            ("v1", "Pod") => {
                assert_eq!(doc["metadata"]["annotations"]["helm.sh/hook"], "test");
                out.test_pods.push(strict(doc));
            }
            ("v1", "Service") => out.services.push(strict(doc)),
            ("v1", "ServiceAccount") => out.service_accounts.push(strict(doc)),
            ("policy/v1", "PodDisruptionBudget") => out.pdbs.push(strict(doc)),
            ("networking.k8s.io/v1", "NetworkPolicy") => out.network_policies.push(strict(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => out.cluster_roles.push(strict(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                out.cluster_role_bindings.push(strict(doc));
            }
            ("rbac.authorization.k8s.io/v1", "Role") => out.roles.push(strict(doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => out.role_bindings.push(strict(doc)),
            ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                out.webhooks.push(strict(doc));
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
            | ("cert-manager.io/v1", "Issuer" | "Certificate")
            | ("monitoring.coreos.com/v1", "ServiceMonitor" | "PodMonitor" | "PrometheusRule") => {
                assert!(doc["spec"].is_object(), "{kind} has a spec");
                out.custom.push((kind.to_owned(), doc.clone()));
            }
            other => panic!("unexpected object {other:?}"),
        }
    }
    out
}

fn config_map<'a>(rendered: &'a Rendered, suffix: &str) -> Option<&'a BTreeMap<String, String>> {
    rendered
        .config_maps
        .iter()
        .find(|c| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with(suffix))
        })
        .and_then(|c| c.data.as_ref())
}

fn rules(rendered: &Rendered) -> Vec<PolicyRule> {
    rendered
        .cluster_roles
        .iter()
        .flat_map(|r| r.rules.clone().unwrap_or_default())
        .collect()
}

/// Writes the rendered broker configuration and checks the broker accepts it.
/// The capabilities a container adds to its (dropped) set.
fn added_capabilities(container: &k8s_openapi::api::core::v1::Container) -> Option<Vec<String>> {
    container
        .security_context
        .as_ref()?
        .capabilities
        .as_ref()?
        .add
        .clone()
}

fn broker_accepts_config(rendered: &Rendered) -> tessera_broker::config::Config {
    let text = &config_map(rendered, "-config").expect("broker ConfigMap")["broker.yaml"];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.yaml");
    fs::write(&path, text).unwrap();
    tessera_broker::config::Config::load(&path)
        .unwrap_or_else(|e| panic!("the broker refuses the chart's configuration: {e}\n{text}"))
}

#[test]
fn helm_lint_passes_with_default_and_non_default_values() {
    for values in [&[][..], NON_DEFAULT] {
        let output = helm_on_chart(&["lint", "--strict"], values);
        assert!(
            output.status.success(),
            "helm lint {values:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn default_values_render_a_hardened_least_privilege_install() {
    tessera_broker::install_crypto_provider();
    let rendered = typed(&render(&[]));

    // Broker: two replicas kept apart, hardened, probed, drained gracefully.
    let deployment = &rendered.deployments[0];
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let pod_security = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some(),
        "replicas prefer different nodes"
    );
    let broker = &pod.containers[0];
    let security = broker.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(
        security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for probe in [
        &broker.liveness_probe,
        &broker.readiness_probe,
        &broker.startup_probe,
    ] {
        assert!(probe.as_ref().unwrap().http_get.is_some());
    }
    assert_eq!(
        broker
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert!(broker.lifecycle.as_ref().unwrap().pre_stop.is_some());
    assert!(broker.resources.as_ref().unwrap().limits.is_some());
    // The Vault login is the broker's own projected token: no static secret.
    let login = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "vault-login")
        .unwrap();
    assert!(login.secret.is_none() && login.projected.is_some());
    assert_eq!(pod.termination_grace_period_seconds, Some(30));

    // A budget that never blocks a drain, and replicas spread softly over
    // zones and nodes.
    let pdb = rendered.pdbs[0].spec.as_ref().unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(pdb.min_available, None);
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    let keys: Vec<_> = spread.iter().map(|c| c.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    assert!(
        spread
            .iter()
            .all(|c| c.when_unsatisfiable == "ScheduleAnyway")
    );
    assert_eq!(rendered.network_policies.len(), 1);
    assert!(
        added_capabilities(broker).is_none(),
        "no capability added by default"
    );
    assert_eq!(
        broker_accepts_config(&rendered).memory_lock,
        tessera_memory::Lock::Off
    );
    assert_eq!(
        rendered.service_accounts[0].automount_service_account_token,
        Some(false)
    );
    assert!(rendered.services[0].spec.as_ref().unwrap().type_.as_deref() == Some("ClusterIP"));

    // RBAC: exactly what tokenReview and pod lookup use (get a caller's pod;
    // list and watch pods, to revoke a deleted pod's leases at once), and the
    // webhook configuration whose caBundle the broker keeps, by name.
    let rules = rules(&rendered);
    let granted: Vec<(Vec<String>, Vec<String>, Vec<String>)> = rules
        .iter()
        .map(|r| {
            (
                r.resources.clone().unwrap_or_default(),
                r.resource_names.clone().unwrap_or_default(),
                r.verbs.clone(),
            )
        })
        .collect();
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        granted,
        [
            (strings(&["tokenreviews"]), vec![], strings(&["create"])),
            (
                strings(&["pods"]),
                vec![],
                strings(&["get", "list", "watch"])
            ),
            (
                strings(&["mutatingwebhookconfigurations"]),
                strings(&["tessera"]),
                strings(&["get", "update"])
            ),
        ]
    );
    assert_eq!(rendered.cluster_role_bindings.len(), 1);
    // In its namespace: its two Secrets by name; create, which Kubernetes
    // cannot limit to names, for the first replica to make them.
    let role = &rendered.roles[0];
    let secrets: Vec<(Vec<String>, Vec<String>)> = role
        .rules
        .iter()
        .flatten()
        .map(|r| {
            (
                r.resource_names.clone().unwrap_or_default(),
                r.verbs.clone(),
            )
        })
        .collect();
    assert_eq!(
        secrets,
        [
            (
                strings(&["tessera-handle-key", "tessera-tls"]),
                strings(&["get", "update"])
            ),
            (vec![], strings(&["create"])),
        ]
    );
    assert_eq!(rendered.role_bindings.len(), 1);

    // The webhook fails closed, but never for its own or the system namespaces.
    let webhook = &rendered.webhooks[0].webhooks.as_ref().unwrap()[0];
    assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(webhook.side_effects, "None");
    let excluded = webhook
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
        .and_then(|e| e.values.clone())
        .unwrap();
    for namespace in ["kube-system", NAMESPACE] {
        assert!(
            excluded.iter().any(|n| n == namespace),
            "{namespace} excluded"
        );
    }
    let rules = webhook.rules.as_ref().unwrap();
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned()][..])
    );

    // Nothing random is rendered: the broker makes the CA, certificate and
    // handle key in Secrets at runtime and sets the caBundle.
    assert!(rendered.secrets.is_empty(), "no Secret in the chart");
    assert!(webhook.client_config.ca_bundle.is_none());

    // The broker accepts the rendered configuration and policy.
    let config = broker_accepts_config(&rendered);
    let injection = &config
        .webhook
        .as_ref()
        .expect("webhook configured")
        .injection;
    assert_eq!(injection.broker_address, "https://tessera.tessera.svc:8443");
    assert_eq!(injection.image, "ghcr.io/tessera-dev/tessera-sidecar:0.1.0");
    let bootstrap = config.bootstrap.as_ref().expect("bootstrap configured");
    assert_eq!(bootstrap.tls_secret.as_deref(), Some("tessera-tls"));
    assert_eq!(
        bootstrap.handle_key_secret.as_deref(),
        Some("tessera-handle-key")
    );
    assert!(bootstrap.create_handle_key);
    assert_eq!(bootstrap.webhook_configuration.as_deref(), Some("tessera"));
    assert_eq!(injection.ca_file, bootstrap.written_ca_file());
    assert!(
        bootstrap
            .dns_names
            .contains(&"tessera.tessera.svc".to_owned()),
        "the certificate names the Service the sidecars dial"
    );
    let policy = &config_map(&rendered, "-policy").unwrap()["policy.yaml"];
    tessera_broker::policy::Policy::parse(policy, "policy.yaml")
        .expect("the default policy parses");
}

#[test]
fn non_default_values_change_what_they_say() {
    let rendered = typed(&render_on(PROMETHEUS_OPERATOR, NON_DEFAULT));
    let pod = rendered.deployments[0].spec.as_ref().unwrap();
    assert_eq!(pod.replicas, Some(3));
    let spec = pod.template.spec.as_ref().unwrap();
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    let broker = &spec.containers[0];
    assert!(broker.image.as_deref().unwrap().contains("@sha256:0123"));
    assert!(
        broker.lifecycle.is_none(),
        "preStopSleepSeconds=0 drops the hook"
    );
    let pdb = rendered.pdbs[0].spec.as_ref().unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(2)));
    assert_eq!(pdb.max_unavailable, None, "one or the other");

    // cert-manager issues the certificate; the webhook's CA is injected.
    assert!(
        !rendered
            .secrets
            .iter()
            .any(|s| s.type_.as_deref() == Some("kubernetes.io/tls"))
    );
    let mut kinds: Vec<&str> = rendered.custom.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "Certificate",
            "Certificate",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Issuer",
            "Issuer",
            "ServiceMonitor"
        ]
    );
    // policy.resources: the CRDs (kept on uninstall), the broker reads them
    // and may write their status, nothing more.
    for (kind, crd) in rendered
        .custom
        .iter()
        .filter(|(k, _)| k == "CustomResourceDefinition")
    {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{kind}"
        );
    }
    let cluster_rules = serde_json::to_value(&rendered.cluster_roles[0].rules).unwrap();
    let ours: Vec<&Value> = cluster_rules
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["apiGroups"][0] == "tessera.dev")
        .collect();
    assert_eq!(
        ours[0]["verbs"],
        serde_json::json!(["get", "list", "watch"])
    );
    assert_eq!(ours[1]["verbs"], serde_json::json!(["patch"]));
    assert_eq!(
        ours[1]["resources"],
        serde_json::json!(["clusteraccesspolicies/status", "accessbindings/status"])
    );
    let configuration = &rendered.webhooks[0];
    assert_eq!(
        configuration.metadata.annotations.as_ref().unwrap()["cert-manager.io/inject-ca-from"],
        "tessera/tessera-tls"
    );
    let webhook = &configuration.webhooks.as_ref().unwrap()[0];
    assert!(webhook.client_config.ca_bundle.is_none());
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));

    // The handle key is the operator's Secret: read, never created.
    let role_rules = rendered.roles[0].rules.clone().unwrap_or_default();
    assert_eq!(role_rules.len(), 1, "{role_rules:?}");
    assert_eq!(
        role_rules[0].resource_names.as_deref(),
        Some(&["tessera-handle-key-from-vault".to_owned()][..])
    );

    // OIDC discovery without pod lookup needs no resource permissions at
    // all, but for the policy's own resources.
    let rules = rules(&rendered);
    assert!(rules.iter().all(|r| {
        (r.resources.is_none() && r.non_resource_urls.is_some())
            || r.api_groups.as_deref() == Some(&["tessera.dev".to_owned()][..])
    }));
    let urls: Vec<String> = rules
        .iter()
        .flat_map(|r| r.non_resource_urls.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        urls,
        [
            "/.well-known/openid-configuration",
            "/openid/v1/jwks",
            "/version"
        ]
    );

    // The policy is the security team's ConfigMap, not the chart's.
    assert!(config_map(&rendered, "-policy").is_none());
    let policy_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "policy")
        .unwrap();
    assert_eq!(
        policy_volume.config_map.as_ref().unwrap().name,
        "tessera-policy-owned-by-security"
    );
    let ingress = rendered.network_policies[0]
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .clone()
        .unwrap();
    assert_eq!(
        ingress.len(),
        3,
        "sidecars, the API server's addresses and metrics scrapers each get a rule"
    );
    let webhook_from = ingress[1]
        .from
        .as_ref()
        .expect("the webhook rule names its peers");
    assert_eq!(
        webhook_from[0].ip_block.as_ref().unwrap().cidr,
        "10.0.0.0/28"
    );
    assert_eq!(
        added_capabilities(broker),
        Some(vec!["IPC_LOCK".to_owned()])
    );

    let config = broker_accepts_config(&rendered);
    assert_eq!(config.memory_lock, tessera_memory::Lock::IfAllowed);
    assert!(matches!(
        config.vault.auth,
        tessera_broker::vault::VaultAuth::AppRole { .. }
    ));
    let bootstrap = config.bootstrap.as_ref().unwrap();
    assert_eq!(bootstrap.tls_secret, None, "cert-manager's certificate");
    assert_eq!(
        bootstrap.webhook_configuration, None,
        "cert-manager's cainjector"
    );
    assert!(!bootstrap.create_handle_key);
    let injection = config.webhook.unwrap().injection;
    assert_eq!(injection.mode, tessera_broker::webhook::SidecarMode::Auto);
    assert_eq!(injection.metrics_port, Some(9091));
}

#[test]
fn helm_template_renders_the_same_bytes_every_time() {
    // GitOps tools render on every sync: random or looked-up material would
    // rotate the CA and handle key each time.
    for values in [
        &[][..],
        NON_DEFAULT,
        &["tls.source=existingSecret", "tls.existingSecret=my-tls"],
    ] {
        assert_eq!(render_text(values), render_text(values), "{values:?}");
    }
    let templates = chart().join("templates");
    let files = fs::read_dir(&templates)
        .unwrap()
        .chain(fs::read_dir(templates.join("tests")).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file());
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        for function in [
            "lookup",
            "rand",
            "genCA",
            "genPrivateKey",
            "genSigned",
            "uuidv4",
            "now",
        ] {
            assert!(
                !text.contains(&format!("{function} ")) && !text.contains(&format!("({function}")),
                "{} calls {function}",
                path.display()
            );
        }
    }
}

#[test]
fn an_existing_tls_secret_is_mounted_and_the_broker_keeps_the_ca_bundle() {
    let rendered = typed(&render(&[
        "tls.source=existingSecret",
        "tls.existingSecret=my-tls",
    ]));
    let spec = rendered.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let tls = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        tls.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("my-tls")
    );
    let config = broker_accepts_config(&rendered);
    assert_eq!(config.tls.cert, Path::new("/etc/tessera/tls/tls.crt"));
    let bootstrap = config.bootstrap.unwrap();
    assert_eq!(
        bootstrap.tls_secret, None,
        "the broker makes no certificate"
    );
    assert_eq!(bootstrap.webhook_configuration.as_deref(), Some("tessera"));
    assert_eq!(
        bootstrap.ca_file.as_deref(),
        Some(Path::new("/etc/tessera/tls/ca.crt")),
        "the caBundle is the Secret's ca.crt"
    );
}

#[test]
fn the_values_schema_refuses_bad_values_with_their_path() {
    for (value, expected) in [
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("identity.source=jwks", "/identity/source"),
        ("webhook.tokenExpiration=ten", "/webhook/tokenExpiration"),
        ("replicaCount=0", "/replicaCount"),
        ("tls.source=existingSecret", "/tls"),
        ("tls.source=selfSigned", "/tls/source"),
        ("unknownKey=1", "unknownKey"),
    ] {
        let output = helm_on_chart(&["template", "tessera"], &[value]);
        assert!(!output.status.success(), "{value} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{value}: {stderr}");
    }
}

fn checkov(dir: &Path) -> Value {
    let output = Command::new(tool(
        "TESSERA_CHECKOV",
        ".tools/checkov/bin/checkov",
        "checkov",
    ))
    .args([
        "--framework",
        "kubernetes",
        "--skip-download",
        "-o",
        "json",
        "-d",
    ])
    .arg(dir)
    .env("BC_SKIP_MAPPING", "TRUE")
    .output()
    .unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn checkov_finds_no_failed_check_in_the_rendered_manifests() {
    for values in [&[][..], NON_DEFAULT] {
        // checkov skips hidden directories, and tempdir()'s start with a dot.
        let dir = tempfile::Builder::new()
            .prefix("tessera-chart-")
            .tempdir()
            .unwrap();
        fs::write(dir.path().join("tessera.yaml"), render_text(values)).unwrap();
        let report = checkov(dir.path());
        let summary = &report["summary"];
        let failed: Vec<String> = report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} {} ({})", c["check_id"], c["check_name"], c["resource"]))
            .collect();
        assert_eq!(summary["failed"], 0, "{values:?}: {failed:#?}");
        assert!(
            summary["passed"].as_u64().unwrap() > 50,
            "checkov ran its Kubernetes checks: {summary}"
        );
        // Every skip is justified inline in the chart.
        for skipped in report["results"]["skipped_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let reason = skipped["check_result"]["suppress_comment"]
                .as_str()
                .unwrap_or_default();
            assert!(reason.len() > 20, "skip without a reason: {skipped}");
        }
    }
}

#[test]
fn the_keys_every_chart_user_reaches_for_do_what_they_say() {
    let rendered = typed(&render(&[
        "fullnameOverride=creds",
        "commonLabels.team=platform",
        "global.imageRegistry=mirror.example",
        "serviceAccount.name=custom-sa",
        "serviceAccount.annotations.iam\\.example/role=broker",
        "service.annotations.lb\\.example/scheme=internal",
        "webhook.objectSelector.matchLabels.inject=yes",
        "webhook.port=10250",
        "hostNetwork=true",
        "extraEnv[0].name=HTTPS_PROXY",
        "extraEnv[0].value=http://proxy:3128",
        "extraVolumes[0].name=extra",
        "extraVolumes[0].configMap.name=extra-config",
        "extraVolumeMounts[0].name=extra",
        "extraVolumeMounts[0].mountPath=/etc/extra",
        "podSecurityContext.runAsUser=null",
        "podSecurityContext.runAsGroup=null",
        "podSecurityContext.fsGroup=null",
        "securityContext.runAsUser=null",
        "securityContext.runAsGroup=null",
    ]));
    let deployment = &rendered.deployments[0];
    assert_eq!(deployment.metadata.name.as_deref(), Some("creds"));
    assert_eq!(
        deployment.metadata.labels.as_ref().unwrap()["team"],
        "platform"
    );
    let spec = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("custom-sa"));
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    // OpenShift's restricted-v2 assigns the user: none is fixed.
    let pod_security = spec.security_context.as_ref().unwrap();
    assert_eq!(pod_security.run_as_user, None);
    assert_eq!(pod_security.fs_group, None);
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let broker = &spec.containers[0];
    assert_eq!(broker.security_context.as_ref().unwrap().run_as_user, None);
    assert!(
        broker
            .image
            .as_deref()
            .unwrap()
            .starts_with("mirror.example/ghcr.io/"),
        "{:?}",
        broker.image
    );
    assert!(broker.env.iter().flatten().any(|v| v.name == "HTTPS_PROXY"));
    assert!(
        broker
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "extra" && m.mount_path == "/etc/extra")
    );
    assert!(spec.volumes.iter().flatten().any(|v| v.name == "extra"));
    assert!(
        broker
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("webhook") && p.container_port == 10250)
    );
    let account = &rendered.service_accounts[0];
    assert_eq!(account.metadata.name.as_deref(), Some("custom-sa"));
    assert_eq!(
        account.metadata.annotations.as_ref().unwrap()["iam.example/role"],
        "broker"
    );
    assert!(
        rendered
            .cluster_role_bindings
            .iter()
            .flat_map(|b| b.subjects.clone().unwrap_or_default())
            .all(|s| s.name == "custom-sa")
    );
    assert_eq!(
        rendered.services[0].metadata.annotations.as_ref().unwrap()["lb.example/scheme"],
        "internal"
    );
    let webhook = &rendered.webhooks[0].webhooks.as_ref().unwrap()[0];
    assert_eq!(
        webhook
            .object_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["inject"],
        "yes"
    );
    let config = broker_accepts_config(&rendered);
    assert_eq!(config.webhook.unwrap().listen.port(), 10250);
}

#[test]
fn the_chart_refuses_what_it_cannot_honour() {
    let output = helm_on_chart(&["template", "tessera"], &["serviceAccount.create=false"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("serviceAccount.name is required"));
    // The defaults need 1.30 (native sidecars, the preStop sleep).
    let old = helm_on_chart(&["template", "tessera", "--kube-version", "1.29.0"], &[]);
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("kubeVersion"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
}

#[test]
fn install_notes_say_what_to_do_next() {
    let output = helm_on_chart(&["install", "--dry-run=client", "tessera"], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let notes = text.split("NOTES:").nth(1).expect("NOTES.txt rendered");
    for expected in [
        "rollout status deployment/tessera",
        "helm test tessera -n tessera --logs",
        "kubectl label namespace <ns> tessera.dev/injection=enabled",
        "tessera.dev/inject: \"true\"",
        "policy explain",
    ] {
        assert!(notes.contains(expected), "{expected}: {notes}");
    }
}

#[test]
fn install_notes_warn_when_a_monitoring_switch_renders_nothing() {
    // A client dry run knows no cluster, so no monitoring CRDs: what a
    // cluster without the Prometheus operator looks like.
    let notes = |values: &[&str]| {
        let output = helm_on_chart(&["install", "--dry-run=client", "tessera"], values);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.split("NOTES:")
            .nth(1)
            .expect("NOTES.txt rendered")
            .to_owned()
    };
    let on = [
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
    ];
    let without_crds = notes(&on);
    assert!(
        without_crds.contains("metrics.prometheusRule, metrics.serviceMonitor rendered nothing"),
        "{without_crds}"
    );
    assert!(
        without_crds.contains("networkPolicy.metricsFrom is empty"),
        "{without_crds}"
    );
    let scraped = notes(&[
        on[0],
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
    ]);
    assert!(!scraped.contains("metricsFrom is empty"), "{scraped}");
    assert!(
        !notes(&[]).contains("WARNING"),
        "nothing asked, nothing to warn of"
    );
}

/// The `helm install` command of docs/install.md, exactly as written (its
/// continuation lines joined), with `install` turned into a client dry run.
fn documented_install_command() -> Vec<String> {
    let doc = fs::read_to_string(workspace_root().join("docs/install.md")).unwrap();
    let start = doc
        .find("helm install tessera deploy/helm/tessera")
        .expect("documented");
    let mut command = String::new();
    for line in doc[start..].lines() {
        let line = line.split(" #").next().unwrap_or(line).trim_end();
        match line.strip_suffix('\\') {
            Some(continued) => command.push_str(continued),
            None => {
                command.push_str(line);
                break;
            }
        }
    }
    command.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_documented_install_command_works_with_a_policy_file_as_written() {
    let command = documented_install_command();
    assert_eq!(command[..2], ["helm", "install"], "{command:?}");
    assert!(
        command.iter().any(|a| a == "policy.document=policy.yaml"),
        "{command:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    // The security team's file, comments and all.
    let policy = format!(
        "# reviewed in CI\n{}",
        simple_policy("app", "shop", "orders", "shop/app")
    );
    fs::write(dir.path().join("policy.yaml"), &policy).unwrap();
    let output = helm()
        .current_dir(dir.path())
        .args(["install", "--dry-run=client"])
        .args(
            command[2..]
                .iter()
                .map(|a| a.replace("deploy/helm/tessera", &chart().display().to_string())),
        )
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find("policy.yaml: |").expect("the policy ConfigMap");
    let rendered: String = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(rendered.trim_end(), policy.trim_end(), "kept verbatim");

    fs::write(dir.path().join("policy.yaml"), "kind: Something\n").unwrap();
    let refused = helm()
        .current_dir(dir.path())
        .args(["template", "tessera"])
        .arg(chart())
        .args(["--set-file", "policy.document=policy.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("apiVersion: tessera.dev/v1alpha1"),
        "{stderr}"
    );
}

#[test]
fn the_documented_way_to_send_every_namespace_to_the_webhook_works() {
    let doc = fs::read_to_string(workspace_root().join("docs/install.md")).unwrap();
    let value = "webhook.namespaceSelector.matchLabels=null";
    assert!(
        doc.contains(&format!("--set {value}")),
        "install.md documents it"
    );
    let rendered = typed(&render(&[value]));
    let webhook = rendered.webhooks.first().expect("webhook configuration");
    let selector = webhook.webhooks.as_ref().unwrap()[0]
        .namespace_selector
        .clone()
        .unwrap();
    assert_eq!(selector.match_labels, None, "no opt-in label left");
    let excluded = &selector.match_expressions.unwrap()[0];
    assert_eq!(excluded.operator, "NotIn");
    assert!(
        excluded
            .values
            .as_ref()
            .unwrap()
            .contains(&"kube-system".to_owned())
    );
}

#[test]
fn monitoring_objects_render_where_the_prometheus_operator_is_installed() {
    let values = [
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboard.enabled=true",
        "metrics.dashboard.annotations.grafana_folder=Tessera",
        "webhook.sidecarMetricsPort=9091",
    ];
    // Without the CRDs, only the dashboard (a ConfigMap) renders: installing
    // a monitor the API server cannot store would fail the whole release.
    let bare = typed(&render(&values));
    assert!(bare.custom.is_empty(), "{:?}", bare.custom);
    let dashboard = config_map(&bare, "-dashboard").expect("dashboard ConfigMap");
    let shipped: Value =
        serde_json::from_slice(&fs::read(chart().join("files/tessera-dashboard.json")).unwrap())
            .unwrap();
    let rendered: Value = serde_json::from_str(&dashboard["tessera-dashboard.json"]).unwrap();
    assert_eq!(rendered, shipped);
    let map = bare
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("tessera-dashboard"))
        .unwrap();
    assert_eq!(
        map.metadata.labels.as_ref().unwrap()["grafana_dashboard"],
        "1"
    );
    assert_eq!(
        map.metadata.annotations.as_ref().unwrap()["grafana_folder"],
        "Tessera"
    );

    let full = typed(&render_on(PROMETHEUS_OPERATOR, &values));
    let object = |kind: &str| {
        full.custom
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    // The rule is the promtool-tested file, verbatim.
    let alerts: Value = serde_saphyr::from_str(
        &fs::read_to_string(chart().join("files/tessera-alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(object("PrometheusRule")["spec"]["groups"], alerts["groups"]);
    // The pod monitor scrapes the port the webhook gives the sidecar.
    let pods = object("PodMonitor");
    assert_eq!(pods["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        pods["spec"]["podMetricsEndpoints"][0]["port"],
        "tessera-metrics"
    );
    assert_eq!(
        object("ServiceMonitor")["spec"]["endpoints"][0]["port"],
        "admin"
    );

    // A pod monitor for sidecars that serve no metrics is refused, by name.
    let refused = helm_on_chart(
        &["template", "tessera"],
        &["metrics.podMonitor.enabled=true"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("webhook.sidecarMetricsPort"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn helm_test_asks_the_broker_who_the_test_pod_is() {
    for (values, secret) in [
        (&[][..], "tessera-tls"),
        (
            &["tls.source=existingSecret", "tls.existingSecret=my-tls"][..],
            "my-tls",
        ),
    ] {
        let rendered = typed(&render(values));
        let [pod] = &rendered.test_pods[..] else {
            panic!("one helm test pod: {:?}", rendered.test_pods.len());
        };
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let container = &spec.containers[0];
        let args = container.args.clone().unwrap();
        assert_eq!(args[0], "whoami");
        assert!(
            args.contains(&"--broker=https://tessera.tessera.svc:8443".to_owned()),
            "{args:?}"
        );
        assert!(
            container
                .image
                .as_deref()
                .unwrap()
                .contains("tessera-sidecar")
        );
        let volumes = spec.volumes.clone().unwrap();
        let ca = volumes.iter().find(|v| v.name == "ca").unwrap();
        let ca = ca.secret.as_ref().unwrap();
        assert_eq!(ca.secret_name.as_deref(), Some(secret));
        // Only the CA reaches the test pod, never the serving key.
        let items = ca.items.clone().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].key, "ca.crt");
        let token = volumes.iter().find(|v| v.name == "token").unwrap();
        let source = token.projected.as_ref().unwrap().sources.clone().unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(source.audience.as_deref(), Some("tessera"));
    }
}

/// The oldest Kubernetes the chart supports (`kubeVersion` in Chart.yaml) and
/// the newest whose schemas the pinned kubernetes-validate carries.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

#[test]
fn rendered_manifests_validate_against_the_oldest_and_newest_kubernetes_schemas() {
    let validator = tool(
        "TESSERA_KUBERNETES_VALIDATE",
        ".tools/kubernetes-validate/bin/kubernetes-validate",
        "kubernetes-validate",
    );
    let chart_yaml = fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    assert!(
        chart_yaml.contains(&format!("kubeVersion: \">={}-0\"", KUBERNETES_VERSIONS[0])),
        "the oldest version validated is the chart's kubeVersion floor"
    );
    let realistic: &[&[&str]] = &[
        &[],
        NON_DEFAULT,
        &[
            "tls.source=existingSecret",
            "tls.existingSecret=tessera-tls-from-vault",
            "hostNetwork=true",
            "webhook.port=10250",
            "podSecurityContext.runAsUser=null",
            "podSecurityContext.fsGroup=null",
            "securityContext.runAsUser=null",
            "extraEnv[0].name=HTTPS_PROXY",
            "extraEnv[0].value=http://proxy:3128",
            "metrics.dashboard.enabled=true",
        ],
        &[
            "webhook.enabled=false",
            "networkPolicy.enabled=false",
            "replicaCount=1",
        ],
    ];
    let dir = tempfile::tempdir().unwrap();
    for version in KUBERNETES_VERSIONS {
        for (n, values) in realistic.iter().enumerate() {
            let mut args = vec!["--kube-version", version];
            args.extend_from_slice(PROMETHEUS_OPERATOR);
            let file = dir.path().join(format!("{version}-{n}.yaml"));
            fs::write(&file, render_text_on(&args, values)).unwrap();
            let output = Command::new(&validator)
                .args(["--kubernetes-version", version, "--strict"])
                .arg(&file)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() && !report.contains("ERROR"),
                "Kubernetes {version}, values {values:?}:\n{report}"
            );
            assert!(
                report.contains("passed for resource deployment/"),
                "the validator checked the objects: {report}"
            );
        }
    }
}

#[test]
fn the_chart_readme_lists_every_value_as_values_yaml_documents_it() {
    use tessera_tests::chart_readme;
    let read = |name: &str| fs::read_to_string(chart().join(name)).unwrap();
    let (readme, values, schema) = (
        read("README.md"),
        read("values.yaml"),
        read("values.schema.json"),
    );
    let generated = chart_readme::regenerate(&readme, &values, &schema)
        .expect("README.md keeps the generated table's markers");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(chart().join("README.md"), &generated).unwrap();
        return;
    }
    assert!(
        generated == readme,
        "deploy/helm/tessera/README.md is out of date: run scripts/chart-readme"
    );
    // Every value is explained, by its comment or the schema.
    let table = chart_readme::table(&values, &schema);
    let undocumented: Vec<&str> = table
        .lines()
        .skip(2)
        .filter(|row| row.ends_with("|  |"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "values without a comment in values.yaml:\n{}",
        undocumented.join("\n")
    );
}

/// #25: `vault.changeFeed` gives the broker the feed's listener and token,
/// the pod and the Service a `feed` port, and the NetworkPolicy a rule for it.
#[test]
fn the_change_feed_values_open_the_feed_port_and_configure_the_broker() {
    let rendered = typed(&render(&[
        "vault.changeFeed.enabled=true",
        "vault.changeFeed.tokenSecret=tessera-feed",
        "vault.changeFeed.backstopInterval=10m",
    ]));
    let config = broker_accepts_config(&rendered);
    let feed = config.change_feed.expect("the broker takes the feed");
    assert_eq!(feed.listen.port(), 8445);
    assert_eq!(feed.backstop, std::time::Duration::from_secs(600));
    assert_eq!(
        feed.token_file.as_deref(),
        Some(Path::new("/etc/tessera/feed/token"))
    );
    let spec = rendered.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let ports = spec.containers[0].ports.as_ref().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("feed") && p.container_port == 8445)
    );
    let token = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "feed-token")
        .expect("the token's volume");
    assert_eq!(
        token.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("tessera-feed")
    );
    let service = rendered.services[0].spec.as_ref().unwrap();
    assert!(
        service
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("feed") && p.port == 8445)
    );
    let ingress = rendered.network_policies[0]
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap();
    assert!(ingress.iter().any(|rule| {
        rule.ports
            .iter()
            .flatten()
            .any(|p| p.port == Some(IntOrString::String("feed".to_owned())))
    }));
}
