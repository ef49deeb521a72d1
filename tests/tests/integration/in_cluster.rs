//! From `kubectl apply` to files and back, through a real kube-apiserver and
//! kube-controller-manager (`scripts/cluster`): the API server itself calls
//! the broker's webhook (a URL-form MutatingWebhookConfiguration with the
//! release CA), the controllers make and delete the pods, and the node agent
//! (`tessera_tests::NodeAgent`, standing in for the kubelet) runs the stored
//! pods with tokens from the TokenRequest API. Vault is the real OpenBao,
//! the database a private PostgreSQL.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tessera_tests::{Cluster, Env, EnvOptions, NodeAgent, Postgres, wait_for};

/// A KV binding `config` and a database binding `db` for shop/orders (whose
/// TTL floor is lowered so it rotates within the test).
const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { database: 1s }
bindings:
  - name: config
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/config } }
  - name: db
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: orders } }
    ttl: 20s
    renewFraction: 0.5
    overlap: 3s
";

/// The broker with a real cluster whose API server calls its webhook for
/// namespaces labelled `tessera.dev/injection: enabled` (`shop`).
async fn setup() -> (Env, Postgres) {
    let pg = Postgres::start();
    let env = Env::start_with(
        POLICY,
        EnvOptions {
            kubernetes: true,
            pod_lookup: true,
            ..EnvOptions::default()
        },
    )
    .await;
    env.bao.database_role(&pg, "orders", "10s", "20s");
    env.bao.put("shop/config", &json!({ "mode": "blue" })).await;
    let cluster = env.kube.as_ref().unwrap();
    env.register_webhook();
    cluster.service_account("shop", "orders");
    cluster.run(&[
        "label",
        "namespace",
        "shop",
        "tessera.dev/injection=enabled",
    ]);
    (env, pg)
}

/// The pods of `selector` in shop.
fn get_pods(cluster: &Cluster, selector: &str) -> Vec<Value> {
    let output = cluster
        .kubectl()
        .args(["get", "pods", "-n", "shop", "-l", selector, "-o", "json"])
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&output.stdout)
        .ok()
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

fn read(dir: &std::path::Path, binding: &str, field: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(binding).join(field)).ok()
}

/// The credentials volume of the one pod of `selector`, once the node runs it.
async fn credentials_dir(cluster: &Cluster, node: &NodeAgent, selector: &str) -> (String, PathBuf) {
    wait_for(
        Duration::from_secs(60),
        "the pod to run on the node",
        || {
            let pod = get_pods(cluster, selector).into_iter().next()?;
            let name = pod["metadata"]["name"].as_str()?.to_owned();
            let dir = node.volume("shop", &name, "tessera-credentials")?;
            Some((name, dir))
        },
    )
    .await
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "orders", "namespace": "shop" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "orders" } },
            "template": {
                "metadata": {
                    "labels": { "app": "orders" },
                    "annotations": { "tessera.dev/inject": "true", "tessera.dev/bindings": "config,db" }
                },
                "spec": {
                    "serviceAccountName": "orders",
                    "securityContext": { "fsGroup": 2000 },
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "app",
                        "image": "registry.example/orders:1.4.2",
                        "command": ["sh", "-c", "cat /var/run/secrets/tessera/config/mode; sleep 3600"]
                    }]
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_applied_with_kubectl_gets_its_credentials_follows_changes_and_loses_them_when_deleted()
 {
    let (env, pg) = setup().await;
    let cluster = env.kube.as_ref().unwrap();
    let node = NodeAgent::start(cluster).await;
    let applied = cluster.apply(&deployment());
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // The controllers made the pod; the API server stored it injected.
    let (name, dir) = credentials_dir(cluster, &node, "app=orders").await;
    let stored = cluster.get(Some("shop"), &format!("pod/{name}")).unwrap();
    assert_eq!(
        stored["metadata"]["annotations"]["tessera.dev/status"],
        "injected"
    );
    let sidecar = &stored["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "tessera-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");

    // The files appear, read by the app through its mount.
    wait_for(Duration::from_secs(30), "the KV file", || {
        read(&dir, "config", "mode")
    })
    .await;
    assert_eq!(read(&dir, "config", "mode").as_deref(), Some("blue"));
    let user = wait_for(Duration::from_secs(30), "the database user", || {
        read(&dir, "db", "username")
    })
    .await;
    let password = read(&dir, "db", "password").unwrap();
    assert!(pg.can_login(&user, &password), "the delivered user logs in");
    wait_for(Duration::from_secs(10), "the app to read its file", || {
        node.logs("shop", &name, "app")
            .contains("blue")
            .then_some(())
    })
    .await;

    // A KV change arrives, and the database user is rotated before its max TTL.
    env.bao
        .put("shop/config", &json!({ "mode": "green" }))
        .await;
    wait_for(Duration::from_secs(30), "the KV change", || {
        (read(&dir, "config", "mode").as_deref() == Some("green")).then_some(())
    })
    .await;
    let rotated = wait_for(Duration::from_secs(40), "the database rotation", || {
        read(&dir, "db", "username").filter(|u| *u != user)
    })
    .await;
    let rotated_password = read(&dir, "db", "password").unwrap();
    assert!(pg.can_login(&rotated, &rotated_password));

    // `kubectl delete deployment`: the garbage collector deletes the pod, the
    // node stops it, and its database user stops working.
    cluster.run(&[
        "delete",
        "deployment",
        "orders",
        "-n",
        "shop",
        "--wait=false",
    ]);
    let started = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the deleted pod's user to be revoked",
        || (!pg.can_login(&rotated, &rotated_password)).then_some(()),
    )
    .await;
    eprintln!("revoked {:?} after kubectl delete", started.elapsed());
    wait_for(Duration::from_secs(30), "the pod to be gone", || {
        get_pods(cluster, "app=orders").is_empty().then_some(())
    })
    .await;
    assert!(
        env.audit_events()
            .iter()
            .any(|e| e["action"] == "revoke" && e["pod_name"] == name.as_str()),
        "the revocation is audited with the pod"
    );
}

/// Runs Job `name` (its pod annotated with `annotations` besides the
/// injection request) to completion, and checks its database user is
/// revoked within 5 s of the pod completing.
async fn a_completed_jobs_user_is_revoked(
    env: &Env,
    pg: &Postgres,
    node: &NodeAgent,
    name: &str,
    annotations: &[(&str, &str)],
) {
    let cluster = env.kube.as_ref().unwrap();
    let mut all = json!({ "tessera.dev/inject": "true", "tessera.dev/bindings": "db" });
    for (key, value) in annotations {
        all[*key] = json!(value);
    }
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name, "namespace": "shop" },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": { "annotations": all },
                "spec": {
                    "serviceAccountName": "orders",
                    "restartPolicy": "Never",
                    "securityContext": { "runAsUser": 1001 },
                    "containers": [{
                        "name": "report",
                        "image": "registry.example/report:2",
                        "command": ["sh", "-c", "cat /var/run/secrets/tessera/db/username; sleep 2"]
                    }]
                }
            }
        }
    });
    let applied = cluster.apply(&job);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let selector = format!("job-name={name}");
    let (pod_name, dir) = credentials_dir(cluster, node, &selector).await;
    let user = wait_for(Duration::from_secs(30), "the database user", || {
        read(&dir, "db", "username")
    })
    .await;
    let password = read(&dir, "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));

    // The app exits 0: the pod succeeds and the Job completes. The pod is
    // kept (as completed Jobs' pods are), yet its user is given back.
    wait_for(Duration::from_secs(60), "the pod to complete", || {
        let pod = cluster.get(Some("shop"), &format!("pod/{pod_name}"))?;
        (pod["status"]["phase"] == "Succeeded").then_some(())
    })
    .await;
    assert!(
        node.logs("shop", &pod_name, "report").starts_with("v-"),
        "the app read the user from its file"
    );
    wait_for(
        Duration::from_secs(5),
        "the completed pod's user to be revoked",
        || (!pg.can_login(&user, &password)).then_some(()),
    )
    .await;
    assert!(cluster.has_pod("shop", &pod_name), "the pod is kept");
    assert!(
        env.audit_events().iter().any(|e| e["action"] == "revoke"
            && e["pod_name"] == pod_name.as_str()
            && e["reason"] == "pod completed"),
        "the revocation is audited with the reason"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn completed_jobs_give_their_database_users_back_with_a_sidecar_or_in_once_mode() {
    let (env, pg) = setup().await;
    let node = NodeAgent::start(env.kube.as_ref().unwrap()).await;
    a_completed_jobs_user_is_revoked(&env, &pg, &node, "report", &[]).await;
    a_completed_jobs_user_is_revoked(&env, &pg, &node, "export", &[("tessera.dev/mode", "once")])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_users_see_the_refusal_and_a_stopped_broker_refuses_only_opted_in_namespaces() {
    let (mut env, _pg) = setup().await;
    let cluster = env.kube.as_ref().unwrap();
    let pod = |namespace: &str, bindings: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "p", "namespace": namespace,
                          "annotations": { "tessera.dev/inject": "true", "tessera.dev/bindings": bindings } },
            "spec": { "serviceAccountName": "orders",
                      "containers": [{ "name": "app", "image": "registry.example/app:1" }] }
        })
    };
    let refused = cluster.apply(&pod("shop", "config,payments"));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("denied the request: tessera: binding `payments` not granted to service account shop/orders"),
        "{stderr}"
    );

    // Every replica down: fail closed in opted-in namespaces only.
    cluster.service_account("elsewhere", "orders");
    env.broker.kill();
    let cluster = env.kube.as_ref().unwrap();
    let closed = cluster.apply(&pod("shop", "config"));
    assert!(!closed.status.success());
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(stderr.contains("failed calling webhook"), "{stderr}");
    let other = cluster.apply(&pod("elsewhere", "config"));
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    // The broker is back: pods are admitted again.
    env.restart_broker().await;
    let cluster = env.kube.as_ref().unwrap();
    let admitted = cluster.apply(&pod("shop", "config"));
    assert!(
        admitted.status.success(),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );
}
