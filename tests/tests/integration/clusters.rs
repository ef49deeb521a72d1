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
    assert_eq!(revoked_by_b.len(), 1, "{revoked_by_b:?}");
    assert_eq!(revoked_by_b[0]["cluster"], "b");
    assert_eq!(revoked_by_b[0]["pod_uid"], uid_b);
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
