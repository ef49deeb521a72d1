//! The chart installed for real: `helm install` into a real kube-apiserver
//! (`scripts/cluster`), with the default values and with the main switches,
//! every object accepted by the API server; then the broker runs as the
//! chart's ServiceAccount (a token from the TokenRequest API) with exactly the
//! chart's RBAC, and a verb taken out of the chart's Role fails precisely.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tessera_proto::v1::WhoAmIRequest;
use tessera_tests::{
    Cluster, Env, EnvOptions, IdentitySource, binary, wait_for, with_token, workspace_root,
};

fn helm(cluster: &Cluster) -> Command {
    let program = std::env::var_os("TESSERA_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/bin/helm"));
    let mut command = Command::new(program);
    command.arg("--kubeconfig").arg(&cluster.kubeconfig);
    command
}

/// `helm install RELEASE` of the chart into NAMESPACE with `values`.
fn install(cluster: &Cluster, release: &str, namespace: &str, values: &[&str]) {
    let mut command = helm(cluster);
    command
        .args(["install", release])
        .arg(workspace_root().join("deploy/helm/tessera"))
        .args(["--namespace", namespace, "--create-namespace"])
        .args(["--set", "vault.address=https://vault.vault.svc:8200"]);
    for value in values {
        command.args(["--set", value]);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "helm install {release} {values:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_chart_installs_into_a_real_cluster_with_default_and_switched_values() {
    let cluster = Cluster::start();
    install(&cluster, "tessera", "tessera", &[]);
    for what in [
        "deployment/tessera",
        "service/tessera",
        "serviceaccount/tessera",
        "configmap/tessera-policy",
        "poddisruptionbudget/tessera",
        "networkpolicy/tessera",
        "role/tessera",
        "rolebinding/tessera",
    ] {
        assert!(
            cluster.get(Some("tessera"), what).is_some(),
            "{what} stored"
        );
    }
    let webhook = cluster
        .get(None, "mutatingwebhookconfiguration/tessera")
        .expect("the webhook configuration is stored");
    assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Fail");
    // The controllers take the Deployment up (pods cannot run without a node).
    wait_for_replicaset(&cluster, "tessera");

    // The main switches, monitoring CRDs absent: everything still installs.
    install(
        &cluster,
        "alt",
        "alt",
        &[
            "identity.source=oidcDiscovery",
            "webhook.sidecarMode=auto",
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
            "replicaCount=3",
            "webhook.namespaceSelector.matchLabels=null",
            "policy.resources.enabled=true",
            "drift.enabled=true",
        ],
    );
    assert!(cluster.get(Some("alt"), "deployment/alt-tessera").is_some());
    for crd in [
        "crd/clusteraccesspolicies.tessera.dev",
        "crd/accessbindings.tessera.dev",
    ] {
        assert!(cluster.get(None, crd).is_some(), "{crd} installed");
    }
    assert!(cluster.get(None, "clusterrole/alt-tessera").is_some());
    let listed = helm(&cluster)
        .args(["list", "-A", "-o", "json"])
        .output()
        .unwrap();
    let releases: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let deployed = releases
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "deployed")
        .count();
    assert_eq!(deployed, 2, "{releases}");
}

fn wait_for_replicaset(cluster: &Cluster, namespace: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sets = cluster.get(Some(namespace), "replicasets").unwrap();
        if !sets["items"].as_array().unwrap().is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no ReplicaSet made");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kubeconfig for `namespace/service_account`, with a token from the
/// TokenRequest API: what the chart's projected token gives the broker.
fn service_account_kubeconfig(
    cluster: &Cluster,
    namespace: &str,
    account: &str,
    dir: &Path,
) -> PathBuf {
    let token = cluster.run(&["create", "token", account, "-n", namespace, "--duration=1h"]);
    let path = dir.join(format!("{account}.kubeconfig"));
    let text = format!(
        "apiVersion: v1
kind: Config
clusters: [{{ name: c, cluster: {{ server: \"{}\", certificate-authority: \"{}\" }} }}]
users: [{{ name: u, user: {{ token: \"{}\" }} }}]
contexts: [{{ name: c, context: {{ cluster: c, user: u }} }}]
current-context: c
",
        cluster.server,
        cluster.ca_file().display(),
        token.trim()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_runs_with_exactly_the_charts_rbac_and_a_missing_verb_fails_precisely() {
    let mut env = Env::start_with(
        &tessera_tests::simple_policy("app", "shop", "orders", "shop/app"),
        EnvOptions {
            kubernetes: true,
            bootstrap: true,
            ..EnvOptions::default()
        },
    )
    .await;
    let cluster = env.kube.as_ref().unwrap();
    // Release `rbac` in the broker's namespace: its ServiceAccount, Role,
    // ClusterRole and webhook configuration are named `rbac-tessera`.
    install(
        cluster,
        "rbac",
        "tessera",
        &["policy.resources.enabled=true", "drift.enabled=true"],
    );
    let kubeconfig = service_account_kubeconfig(cluster, "tessera", "rbac-tessera", env.dir.path());
    env.edit_config(|config| {
        config.kubernetes.as_mut().unwrap().kubeconfig = kubeconfig.display().to_string();
        let bootstrap = config.bootstrap.as_mut().unwrap();
        bootstrap.tls_secret = "rbac-tessera-tls".to_owned();
        bootstrap.handle_key_secret = "rbac-tessera-handle-key".to_owned();
        bootstrap.webhook_configuration = "rbac-tessera".to_owned();
        // The chart's defaults: TokenReview and pod lookup.
        config.identity.source = IdentitySource::TokenReview;
        config.identity.jwks_file = None;
        config.identity.pod_lookup = true;
        config.identity.cache_ttl = Some("1s".to_owned());
        config.policy.resources = true;
        config.drift = Some(tessera_tests::DriftConfig {
            interval: "1s".to_owned(),
        });
    });
    std::fs::remove_dir_all(env.dir.path().join("bootstrap")).unwrap();
    env.restart_broker().await;
    let cluster = env.kube.as_ref().unwrap();

    // With exactly the chart's RBAC the broker makes its Secrets, keeps the
    // caBundle, reviews tokens and looks pods up.
    assert!(
        cluster
            .get(Some("tessera"), "secret/rbac-tessera-tls")
            .is_some()
    );
    assert!(
        cluster
            .get(Some("tessera"), "secret/rbac-tessera-handle-key")
            .is_some()
    );
    wait_for(Duration::from_secs(10), "the caBundle", || {
        cluster.get(None, "mutatingwebhookconfiguration/rbac-tessera")?["webhooks"][0]["clientConfig"]
            ["caBundle"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    cluster.add_pod("shop", "orders-0", "orders", &[]);
    let token = cluster.token("shop", "orders", "tessera", Some("orders-0"), 600);
    let who = env
        .client()
        .await
        .who_am_i(with_token(&token, WhoAmIRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.identity.unwrap().pod_name, "orders-0");
    // It reads the policy's resources and writes their status.
    let policy = serde_json::json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ClusterAccessPolicy",
        "metadata": { "name": "platform" },
        "spec": { "delegations": [{ "namespaces": ["team-a"],
                  "kv2": [{ "mount": "secret", "pathPrefix": "team-a/" }] }] },
    });
    assert!(cluster.apply(&policy).status.success());
    wait_for(Duration::from_secs(20), "the policy's status", || {
        let status = cluster.get(None, "clusteraccesspolicy/platform")?["status"].clone();
        (status["conditions"][0]["status"] == "True").then_some(())
    })
    .await;
    // Its drift check lists namespaces and pods with the chart's RBAC
    // (its Vault token here may not list leases: that part is logged).
    wait_for(Duration::from_secs(10), "a drift check", || {
        env.broker.output().contains("drift check").then_some(())
    })
    .await;
    assert!(
        !env.broker.output().contains("forbidden"),
        "{}",
        env.broker.output()
    );

    // One verb out of the chart's Role: `create` on Secrets. A broker that
    // must make its Secrets stops at start and names the verb it lacks.
    let mut role = cluster.get(Some("tessera"), "role/rbac-tessera").unwrap();
    role["rules"]
        .as_array_mut()
        .unwrap()
        .retain(|rule| !rule["verbs"].as_array().unwrap().contains(&"create".into()));
    cluster.replace(&role);
    cluster.run(&[
        "delete",
        "secret",
        "rbac-tessera-tls",
        "rbac-tessera-handle-key",
        "-n",
        "tessera",
    ]);
    env.broker.kill();
    let started = Command::new(binary("tessera-broker"))
        .args(["serve", "--config"])
        .arg(env.dir.path().join("broker.yaml"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&started.stderr);
    assert_eq!(started.status.code(), Some(77), "EX_NOPERM: {log}");
    assert!(
        log.contains("the broker's service account needs create on secrets"),
        "{log}"
    );
}
