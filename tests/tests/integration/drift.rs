//! #26: `tessera-broker status` finds drift against the real API server and
//! OpenBao: a pod that asks for the sidecar and runs without it, a lease
//! made behind Tessera's back, and a record whose lease was revoked by hand;
//! nothing when there is none.

use std::process::Command;

use serde_json::{Value, json};
use std::time::Duration;
use tessera_broker::lease_id::LeaseId;

use tessera_tests::{DriftConfig, Env, EnvOptions, Postgres, binary, db_policy, metric_value};

/// `status -o json` with the broker's own configuration: its report and
/// whether it exited 1 (drift found).
fn status(env: &Env) -> (Value, bool) {
    let output = Command::new(binary("tessera-broker"))
        .args(["status", "-o", "json", "--config"])
        .arg(env.dir.path().join("broker.yaml"))
        .output()
        .unwrap();
    let code = output.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "status: {code:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["not_checked"], json!([]), "everything was checked");
    (report, code == Some(1))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_finds_a_pod_without_the_sidecar_an_orphaned_lease_and_a_record_whose_lease_is_gone()
{
    let pg = Postgres::start();
    let mut env = Env::start_with(
        &db_policy("1h", "0.7", "30s"),
        EnvOptions {
            kubernetes: true,
            ..EnvOptions::default()
        },
    )
    .await;
    env.bao.database_role(&pg, "orders", "1h", "2h");
    // Listing leases is an operator's power: granted for `status`.
    env.bao.write_broker_policy_with(
        r#"path "sys/leases/lookup/database/creds/*" { capabilities = ["list", "sudo"] }"#,
    );
    let cluster = env.kube.as_ref().unwrap();
    cluster.add_pod("shop", "orders-0", "orders", &[]);
    cluster.run(&[
        "label",
        "namespace",
        "shop",
        "tessera.dev/injection=enabled",
    ]);

    let (clean, drifted) = status(&env);
    assert!(!drifted, "no drift yet: {clean}");

    // A pod admitted while the webhook was off: it asks for the sidecar and
    // has none. (A pod that does not ask, orders-0, is not drift.)
    let web = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web-0", "namespace": "shop",
                      "annotations": { "tessera.dev/inject": "true" } },
        "spec": { "serviceAccountName": "orders", "automountServiceAccountToken": false,
                  "containers": [{ "name": "app", "image": "registry.example/app:1" }] }
    });
    assert!(cluster.apply(&web).status.success());
    // A lease through Tessera (recorded), and one behind its back.
    let token = env.token("shop", "orders");
    env.fetch(&token, &["db"]).await.unwrap();
    let ours = env.bao.leases("database/creds/orders");
    assert_eq!(ours.len(), 1);
    env.bao.cli(&["read", "database/creds/orders"]);
    let orphan = env
        .bao
        .leases("database/creds/orders")
        .into_iter()
        .find(|id| *id != ours[0])
        .unwrap();

    let (report, drifted) = status(&env);
    assert!(drifted, "{report}");
    assert_eq!(
        report["pods_without_sidecar"],
        json!([{ "namespace": "shop", "name": "web-0" }])
    );
    assert_eq!(
        report["orphaned_leases"],
        json!([{
            "prefix": "database/creds/orders/",
            "vault_namespace": "",
            "lease_sha256": LeaseId::new(orphan.clone()).digest(),
        }])
    );
    assert_eq!(report["records_without_lease"], json!([]));
    // The broker's own check finds the same and says so in its metrics.
    env.edit_config(|config| {
        config.drift = Some(DriftConfig {
            interval: "1s".to_owned(),
        });
    });
    env.restart_broker().await;
    let found = |name: &'static str| {
        let admin = env.admin_url.clone();
        async move { metric_value(&admin, name, "").await }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while found("tessera_drift_pods_without_sidecar").await != Some(1.0)
        || found("tessera_drift_orphaned_leases").await != Some(1.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker's drift check found nothing in 20 s: {}",
            env.broker.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        found("tessera_drift_records_without_lease").await,
        Some(0.0)
    );
    assert_eq!(found("tessera_drift_unchecked").await, Some(0.0));
    // `audit --config`: the lease delivered is held (its record is there).
    let audit = Command::new(binary("tessera-broker"))
        .args(["audit", "--binding", "db", "-o", "json", "--config"])
        .arg(env.dir.path().join("broker.yaml"))
        .arg(env.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(audit.status.success(), "{audit:?}");
    let answers: Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(answers[0]["held"], true, "{answers}");
    assert_eq!(answers[0]["revoked"], Value::Null);

    // Tessera's lease revoked by hand: its record is now drift.
    env.bao.cli(&["lease", "revoke", "-sync", &ours[0]]);
    let (report, _) = status(&env);
    let gone = &report["records_without_lease"];
    assert_eq!(gone.as_array().unwrap().len(), 1, "{report}");
    assert_eq!(gone[0]["binding"], "db");
    assert_eq!(gone[0]["pod"], "orders-0");
    assert_eq!(
        gone[0]["lease_sha256"],
        LeaseId::new(ours[0].clone()).digest()
    );
}
