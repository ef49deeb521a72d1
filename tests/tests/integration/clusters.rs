//! Several clusters on one Vault: two real API servers, two brokers with
//! their own cluster names and issuers, one OpenBao and the default record
//! mount. Each broker reads, revokes and forgets only its own cluster's
//! lease records; records from before clusters had names are adopted; a
//! record a broker cannot open is left alone.

use std::{fs, path::Path, time::Duration};

use tessera_tests::{
    Cluster, Env, EnvOptions, KubernetesConfig, Postgres, TEST_CLUSTER, db_policy, field, http_get,
    wait_for,
};

fn in_a_cluster() -> EnvOptions {
    EnvOptions {
        kubernetes: true,
        pod_lookup: true,
        sweep_interval: "1s",
        ..EnvOptions::default()
    }
}

/// Full sweeps every two seconds, on top of the light ones every second.
fn sweep_often(env: &mut Env) {
    env.edit_config(|config| config.leases.full_sweep_interval = "2s".to_owned());
}

/// How many full sweeps of its cluster's records a broker completed.
async fn full_sweeps(admin_url: &str) -> u64 {
    let (status, body) = http_get(&format!("{admin_url}/metrics")).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(r#"tessera_lease_sweeps_total{kind="full"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_sharing_one_vault_never_revoke_each_others_leases() {
    let pg = Postgres::start();
    let mut env = Env::start_with(&db_policy("10m", "0.7", "5s"), in_a_cluster()).await;
    sweep_often(&mut env);
    env.restart_broker().await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let a = env.kube.as_ref().unwrap();

    // Cluster B: its own API server, issuer and keys; the same Vault, the
    // same record mount and, the hardest case, the same handle key (one
    // Secret deployed everywhere).
    let b = Cluster::start();
    fs::write(
        env.dir.path().join("jwks-b.json"),
        b.run(&["get", "--raw", "/openid/v1/jwks"]),
    )
    .unwrap();
    let replica_b = env
        .start_replica_with("b", |config| {
            config.cluster.name = "b".to_owned();
            b.issuer().clone_into(&mut config.identity.issuer);
            config.identity.jwks_file = Some("jwks-b.json".to_owned());
            config.kubernetes = Some(KubernetesConfig {
                kubeconfig: b.kubeconfig.display().to_string(),
            });
        })
        .await;

    // The same app, the same names, in both clusters: one pod each.
    let uid_a = a.add_pod("shop", "orders-0", "orders", &[]);
    let uid_b = b.add_pod("shop", "orders-0", "orders", &[]);
    assert_ne!(uid_a, uid_b);
    let token_b = env.dir.path().join("token-b");
    fs::write(
        &token_b,
        b.token("shop", "orders", "tessera", Some("orders-0"), 3600),
    )
    .unwrap();
    let (out_a, out_b) = (env.tmpfs_out(), env.tmpfs_out());
    let sidecar_a = env.sidecar_run(&env.token_file("shop", "orders"), out_a.path(), &["db"]);
    let sidecar_b = env.sidecar_run_at(&replica_b.uri, &token_b, out_b.path(), &["db"]);
    let login = |out: &Path| {
        (
            field(out, "db", "username").unwrap(),
            field(out, "db", "password").unwrap(),
        )
    };
    for out in [out_a.path(), out_b.path()] {
        wait_for(Duration::from_secs(30), "a database user", || {
            field(out, "db", "password")
        })
        .await;
    }
    let (user_a, password_a) = login(out_a.path());
    let (user_b, password_b) = login(out_b.path());
    assert!(pg.can_login(&user_a, &password_a));
    assert!(pg.can_login(&user_b, &password_b));
    // Each record is filed under its own cluster's name and says so.
    let record_a = &env.bao.lease_records(&uid_a)[0];
    let record_b = &env.bao.lease_records(&uid_b)[0];
    assert_eq!(record_a["cluster"], TEST_CLUSTER);
    assert_eq!(record_b["cluster"], "b");
    let clusters = env.bao.list("tessera-leases/clusters");
    assert_eq!(
        clusters,
        [
            "tessera-leases/clusters/b/",
            &format!("tessera-leases/clusters/{TEST_CLUSTER}/")
        ]
    );

    // Every pod of cluster B goes: exactly B's user is revoked.
    drop(sidecar_b);
    b.delete_pod("shop", "orders-0");
    wait_for(Duration::from_secs(20), "B's user to be revoked", || {
        (!pg.can_login(&user_b, &password_b)).then_some(())
    })
    .await;
    // Several sweeps of both brokers later, full ones included, A's user
    // still logs in and A's record is where it was.
    let before = (
        full_sweeps(&env.admin_url).await,
        full_sweeps(&replica_b.admin_url()).await,
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = (
        full_sweeps(&env.admin_url).await,
        full_sweeps(&replica_b.admin_url()).await,
    );
    assert!(
        after.0 >= before.0 + 2 && after.1 >= before.1 + 2,
        "full sweeps before {before:?}, after {after:?}"
    );
    assert!(pg.can_login(&user_a, &password_a), "A's user was revoked");
    assert_eq!(env.bao.lease_records(&uid_a).len(), 1);
    assert!(env.bao.lease_records(&uid_b).is_empty());
    let revoked_by_b: Vec<_> = replica_b
        .audit_events()
        .into_iter()
        .filter(|e| e["action"] == "revoke")
        .collect();
    // (The stream's end and the pod watch may both revoke it: revoking is
    // idempotent, and each is audited.)
    assert!(!revoked_by_b.is_empty());
    assert!(
        revoked_by_b
            .iter()
            .all(|e| e["cluster"] == "b" && e["pod_uid"] == uid_b.as_str()),
        "B revoked only its own pod's lease: {revoked_by_b:?}"
    );
    assert!(
        env.audit_events()
            .iter()
            .all(|e| e["cluster"] == TEST_CLUSTER && e["action"] != "revoke"),
        "broker A revoked nothing, and names its cluster on every line"
    );

    // Cluster A's pod goes too: now A's user is revoked, by A.
    drop(sidecar_a);
    a.delete_pod("shop", "orders-0");
    wait_for(Duration::from_secs(20), "A's user to be revoked", || {
        (!pg.can_login(&user_a, &password_a)).then_some(())
    })
    .await;
}

/// Moves a record to where brokers before cluster names kept it (`pods/…`,
/// no `cluster` field), as an upgrade finds it.
async fn as_before_cluster_names(env: &Env, path: &str) -> String {
    use std::collections::HashMap;
    let client = env.bao.client();
    let mut record: HashMap<String, serde_json::Value> =
        vaultrs::kv1::get(&client, "tessera-leases", path)
            .await
            .unwrap();
    record.remove("cluster");
    let legacy = path.replacen(&format!("clusters/{TEST_CLUSTER}/"), "", 1);
    let data: HashMap<&str, serde_json::Value> = record
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    vaultrs::kv1::set(&client, "tessera-leases", &legacy, &data)
        .await
        .unwrap();
    vaultrs::kv1::delete(&client, "tessera-leases", path)
        .await
        .unwrap();
    legacy
}

/// Every record path under `folder` of the record mount (recursively).
fn record_paths(env: &Env, folder: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for entry in env.bao.list(&format!("tessera-leases/{folder}")) {
        let relative = entry.trim_start_matches("tessera-leases/").to_owned();
        if relative.ends_with('/') {
            paths.extend(record_paths(env, relative.trim_end_matches('/')));
        } else {
            paths.push(relative);
        }
    }
    paths
}

#[tokio::test(flavor = "multi_thread")]
async fn records_from_before_cluster_names_are_adopted_and_one_sealed_elsewhere_is_left_alone() {
    let pg = Postgres::start();
    let mut env = Env::start_with(&db_policy("10m", "0.7", "5s"), in_a_cluster()).await;
    sweep_often(&mut env);
    env.restart_broker().await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let cluster = env.kube.as_ref().unwrap();

    // Pod 0 gets its user from this install; pod 1 from a broker holding
    // another install's handle key (what a record sealed elsewhere is).
    let uid_0 = cluster.add_pod("shop", "orders-0", "orders", &[]);
    cluster.add_pod("shop", "orders-1", "orders", &[]);
    let out_0 = env.tmpfs_out();
    let once = env.sidecar_once(
        &env.token_file("shop", "orders"),
        out_0.path(),
        &["db"],
        &[],
    );
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let user_0 = field(out_0.path(), "db", "username").unwrap();
    let password_0 = field(out_0.path(), "db", "password").unwrap();
    fs::write(
        env.dir.path().join("other.key"),
        "another install's key, 48 bytes long....",
    )
    .unwrap();
    let mut elsewhere = env
        .start_replica_with("elsewhere", |config| {
            config.leases.handle_key_file = Some("other.key".to_owned());
        })
        .await;
    let token_1 = env.dir.path().join("token-1");
    fs::write(
        &token_1,
        cluster.token("shop", "orders", "tessera", Some("orders-1"), 3600),
    )
    .unwrap();
    let out_1 = env.tmpfs_out();
    let once = env
        .sidecar_command_at(&elsewhere.uri, "once", &token_1, out_1.path(), &["db"])
        .output()
        .unwrap();
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let user_1 = field(out_1.path(), "db", "username").unwrap();
    let password_1 = field(out_1.path(), "db", "password").unwrap();
    elsewhere.proc.kill();

    // The upgrade: this install's record is where brokers before cluster
    // names kept it.
    let ours = record_paths(&env, &format!("clusters/{TEST_CLUSTER}/pods"));
    assert_eq!(ours.len(), 2, "{ours:?}");
    let pod_0_record = ours.iter().find(|p| p.contains(&uid_0)).unwrap();
    let legacy = as_before_cluster_names(&env, pod_0_record).await;
    env.restart_broker().await;
    wait_for(
        Duration::from_secs(20),
        "the old record to be adopted",
        || record_paths(&env, "pods").is_empty().then_some(()),
    )
    .await;
    assert_eq!(env.bao.lease_records(&uid_0)[0]["cluster"], TEST_CLUSTER);
    assert!(!legacy.starts_with("clusters/"));

    let cluster = env.kube.as_ref().unwrap();
    // Pod 1 goes; this broker cannot open its record: it is left alone,
    // counted and logged with its path, through several full sweeps.
    cluster.delete_pod("shop", "orders-1");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let left = record_paths(&env, &format!("clusters/{TEST_CLUSTER}/pods"));
    let sealed_elsewhere = left.iter().find(|p| !p.contains(&uid_0)).unwrap();
    assert_eq!(left.len(), 2, "nothing deleted: {left:?}");
    let (_, metrics) = http_get(&format!("{}/metrics", env.admin_url)).await;
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_lease_records_left_alone_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(counted > 0, "{metrics}");
    let log = fs::read_to_string(env.dir.path().join("broker.log")).unwrap();
    assert!(
        log.contains(sealed_elsewhere.as_str()),
        "the log names {sealed_elsewhere}"
    );
    assert!(
        env.audit_events().iter().all(|e| e["action"] != "revoke"),
        "nothing audited as revoked"
    );
    assert!(
        pg.can_login(&user_1, &password_1),
        "its lease ends by its TTL, not by us"
    );

    // The adopted record works as any other: pod 0 goes, its user is revoked.
    cluster.delete_pod("shop", "orders-0");
    wait_for(
        Duration::from_secs(20),
        "pod 0's user to be revoked",
        || (!pg.can_login(&user_0, &password_0)).then_some(()),
    )
    .await;
}
