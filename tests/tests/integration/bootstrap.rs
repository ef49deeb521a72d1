//! The broker makes its CA, serving certificate and handle key once, in
//! Secrets, so the chart renders no random material (a GitOps sync or a
//! second `helm template` changes nothing). Real OpenBao, PostgreSQL, broker
//! processes and a real kube-apiserver (`scripts/cluster`): the Secrets and
//! the MutatingWebhookConfiguration are the API server's objects.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_tests::{Env, EnvOptions, Postgres, assert_resumed, db_policy, field, wait_for};

fn bootstrapped() -> EnvOptions {
    EnvOptions {
        kubernetes: true,
        bootstrap: true,
        ..EnvOptions::default()
    }
}

fn data(secret: &Value, key: &str) -> String {
    secret["data"][key].as_str().unwrap_or_default().to_owned()
}

fn ca_bundle(env: &Env) -> Option<String> {
    webhook_configuration(env)["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .map(str::to_owned)
}

fn webhook_configuration(env: &Env) -> Value {
    env.kube
        .as_ref()
        .unwrap()
        .get(None, "mutatingwebhookconfiguration/tessera")
        .unwrap()
}

fn secret(env: &Env, name: &str) -> Option<Value> {
    env.kube
        .as_ref()
        .unwrap()
        .get(Some("tessera"), &format!("secret/{name}"))
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_and_handle_key_are_made_once_and_survive_restarts_and_other_replicas() {
    let pg = Postgres::start();
    let mut env = Env::start_with(&db_policy("10m", "0.7", "5s"), bootstrapped()).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let tls = secret(&env, "tessera-tls").expect("the TLS Secret was made");
    let handle = secret(&env, "tessera-handle-key").expect("the handle-key Secret was made");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(!data(&tls, key).is_empty(), "{key} in the TLS Secret");
    }
    let written_ca = std::fs::read(env.dir.path().join("bootstrap/ca.crt")).unwrap();
    assert_eq!(base64(&written_ca), data(&tls, "ca.crt"));
    assert!(
        !env.dir.path().join("bootstrap/ca.key").exists(),
        "the CA's key stays in the Secret"
    );
    assert_eq!(
        ca_bundle(&env),
        Some(data(&tls, "ca.crt")),
        "caBundle is the CA"
    );

    // A pod-bound token: lease handles are only ever resumed by their pod.
    env.kube
        .as_ref()
        .unwrap()
        .add_pod("shop", "orders-0", "orders", &[]);
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let sidecar = env.sidecar_run(&token, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let user = field(out.path(), "db", "username").unwrap();
    let resumed_before = sidecar.output().matches("files kept").count();

    // Another replica starts, and the first is replaced by a new pod (its
    // in-memory volume gone; the CA file stays, the sidecar here reads it):
    // both read the Secrets, neither makes new ones.
    let replica = env.start_replica("b").await;
    let written = env.dir.path().join("bootstrap");
    std::fs::remove_dir_all(written.join("handle")).unwrap();
    std::fs::remove_file(written.join("tls.crt")).unwrap();
    std::fs::remove_file(written.join("tls.key")).unwrap();
    env.restart_broker().await;
    let tls_after = secret(&env, "tessera-tls").unwrap();
    let handle_after = secret(&env, "tessera-handle-key").unwrap();
    assert_eq!(
        tls_after["metadata"]["resourceVersion"],
        tls["metadata"]["resourceVersion"]
    );
    assert_eq!(handle_after, handle, "the handle key is the one made first");
    assert!(replica.proc.output().contains("broker listening"));

    // The sidecar trusts the CA it was given and resumes its lease with
    // the handle sealed before the restart: the key came back from the Secret.
    assert_resumed(&env, &sidecar, out.path(), &user, resumed_before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_ca_bundle_is_restored_and_a_due_certificate_is_renewed_under_the_same_ca() {
    let env = Env::start_with(&db_policy("10m", "0.7", "5s"), bootstrapped()).await;
    let cluster = env.kube.as_ref().unwrap();
    let first = secret(&env, "tessera-tls").unwrap();

    // A GitOps sync applies the chart's configuration, which has no caBundle.
    let mut synced = webhook_configuration(&env);
    synced["webhooks"][0]["clientConfig"]
        .as_object_mut()
        .unwrap()
        .remove("caBundle");
    cluster.replace(&synced);
    assert_eq!(ca_bundle(&env), None);
    wait_for(
        Duration::from_secs(10),
        "the caBundle to be restored",
        || ca_bundle(&env).filter(|b| *b == data(&first, "ca.crt")),
    )
    .await;

    // The serving certificate falls due: a replica renews it with the same
    // CA, and every replica's files follow.
    let mut due = first.clone();
    due["metadata"]["annotations"]["tessera.dev/renew-after"] = json!("2000-01-01T00:00:00Z");
    cluster.replace(&due);
    let renewed = wait_for(Duration::from_secs(10), "the renewal", || {
        secret(&env, "tessera-tls").filter(|s| data(s, "tls.crt") != data(&first, "tls.crt"))
    })
    .await;
    assert_eq!(data(&renewed, "ca.crt"), data(&first, "ca.crt"), "same CA");
    let written = env.dir.path().join("bootstrap/tls.crt");
    wait_for(
        Duration::from_secs(10),
        "the new certificate's file",
        || {
            std::fs::read(&written)
                .ok()
                .filter(|pem| base64(pem) == data(&renewed, "tls.crt"))
        },
    )
    .await;
    // A client holding the CA from the start still connects.
    let mut health = tonic_health::pb::health_client::HealthClient::new(env.channel().await);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tessera.v1.Broker".to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, 1, "SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_started_together_settle_on_one_ca_and_one_handle_key() {
    let mut env = Env::start_with(&db_policy("10m", "0.7", "5s"), bootstrapped()).await;
    env.broker.kill();
    let cluster = env.kube.as_ref().unwrap();
    cluster.run(&[
        "delete",
        "secret",
        "tessera-tls",
        "tessera-handle-key",
        "-n",
        "tessera",
    ]);
    // Three replicas of a fresh install start at once, each with its own
    // in-memory volume: their creates race (the losers get 409 Conflict).
    let own_volume = |name: &'static str| {
        move |config: &mut tessera_tests::BrokerConfig| {
            let dir = format!("bootstrap-{name}");
            config.tls.cert_file = format!("{dir}/tls.crt");
            config.tls.key_file = format!("{dir}/tls.key");
            config.webhook.sidecar.ca_file = format!("{dir}/ca.crt");
            config.bootstrap.as_mut().unwrap().directory = dir;
        }
    };
    let (a, b, c) = tokio::join!(
        env.start_replica_with("a", own_volume("a")),
        env.start_replica_with("b", own_volume("b")),
        env.start_replica_with("c", own_volume("c")),
    );
    let read = |name: &str, file: &str| {
        std::fs::read(env.dir.path().join(format!("bootstrap-{name}/{file}"))).unwrap()
    };
    assert_eq!(read("a", "ca.crt"), read("b", "ca.crt"));
    assert_eq!(read("a", "ca.crt"), read("c", "ca.crt"));
    let tls = secret(&env, "tessera-tls").unwrap();
    assert_eq!(
        base64(&read("a", "ca.crt")),
        data(&tls, "ca.crt"),
        "the Secret's CA"
    );
    let created: usize = [&a, &b, &c]
        .iter()
        .map(|r| {
            r.proc
                .output()
                .matches("created the serving CA and certificate")
                .count()
        })
        .sum();
    assert_eq!(created, 1, "one replica's create won");
    let keys: usize = [&a, &b, &c]
        .iter()
        .map(|r| {
            r.proc
                .output()
                .matches("created the lease handle key")
                .count()
        })
        .sum();
    assert_eq!(keys, 1);
}
