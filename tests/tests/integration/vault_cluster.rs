//! Vault as a cluster: three OpenBao nodes with Raft storage on loopback
//! (`OpenBao::start_cluster`), reached through a proxy that follows the
//! active node (the `openbao-active` Service of a Kubernetes install). The
//! active node is SIGKILLed and a standby takes over. Nothing is lost or
//! minted twice: a transient error during the election is never read as
//! "lease gone".

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::{Env, EnvOptions, Postgres, db_policy, field, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_rides_out_the_loss_of_vaults_active_node() {
    let pg = Postgres::start();
    // Leases of 30 s renewed at half-life: the first renewal falls after
    // the election that follows the kill.
    let policy = db_policy("30s", "0.5", "5s")
        + "  - name: app\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/orders } }\n";
    let options = EnvOptions {
        vault_cluster: true,
        ..EnvOptions::default()
    };
    let mut env = Env::start_with(&policy, options).await;
    env.bao.database_role(&pg, "orders", "30s", "10m");
    env.bao
        .put("shop/orders", &json!({ "password": "v1" }))
        .await;
    let out = env.tmpfs_out();
    let _sidecar = env.sidecar_run(
        &env.token_file("shop", "orders"),
        out.path(),
        &["db", "app"],
    );
    wait_for(Duration::from_secs(30), "delivery", || {
        field(out.path(), "db", "password").and(field(out.path(), "app", "password"))
    })
    .await;
    let user = field(out.path(), "db", "username").unwrap();
    let password = field(out.path(), "db", "password").unwrap();
    let delivered = Instant::now();

    let active = env.bao.kill_active();
    let elected = wait_for(Duration::from_secs(60), "a new active node", || {
        env.bao.active_address().filter(|a| *a != active)
    })
    .await;
    eprintln!(
        "{elected} took over {:?} after delivery",
        delivered.elapsed()
    );

    // A new KV version reaches the pod through the new active node.
    env.bao
        .put("shop/orders", &json!({ "password": "v2" }))
        .await;
    wait_for(Duration::from_secs(30), "the new KV version", || {
        field(out.path(), "app", "password").filter(|p| p == "v2")
    })
    .await;
    // Past the lease's first TTL: it was renewed through the failover, the
    // same user still logs in, and Vault holds exactly one lease for it.
    let past_ttl = delivered + Duration::from_secs(40);
    tokio::time::sleep_until(past_ttl.into()).await;
    assert_eq!(
        field(out.path(), "db", "username").as_deref(),
        Some(user.as_str())
    );
    assert!(
        pg.can_login(&user, &password),
        "the lease outlived its first TTL"
    );
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "no second user minted"
    );
}
