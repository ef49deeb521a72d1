//! Lease ownership lives in Vault, not in one replica's memory: real OpenBao,
//! PostgreSQL and broker processes, and a real kube-apiserver whose pods the
//! replicas watch (`scripts/cluster`).

use std::time::{Duration, Instant};

use tessera_tests::{Env, EnvOptions, Postgres, assert_resumed, db_policy, field, wait_for};

fn with_pod_lookup() -> EnvOptions {
    EnvOptions {
        kubernetes: true,
        pod_lookup: true,
        ..EnvOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_replica_revokes_a_deleted_pods_lease_after_its_issuer_and_sidecar_were_killed() {
    let pg = Postgres::start();
    let env = Env::start_with(&db_policy("1m", "0.7", "5s"), with_pod_lookup()).await;
    env.bao.database_role(&pg, "orders", "60s", "10m");
    let cluster = env.kube.as_ref().unwrap();
    let pod_uid = cluster.add_pod("shop", "orders-0", "orders", &[]);
    let mut replica_a = env.start_replica("a").await;
    let replica_b = env.start_replica("b").await;

    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let mut sidecar = env.sidecar_run_at(&replica_a.uri, &token, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery from replica A", || {
        field(out.path(), "db", "password")
    })
    .await;
    let user = field(out.path(), "db", "username").unwrap();
    let password = field(out.path(), "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));
    assert_eq!(
        env.bao.lease_records(&pod_uid).len(),
        1,
        "the lease is recorded in Vault"
    );

    // The pod's sidecar and the replica that issued its lease die at once:
    // nobody is left who remembers the lease in memory.
    sidecar.kill();
    replica_a.proc.kill();
    cluster.delete_pod("shop", "orders-0");
    let started = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "replica B to revoke the deleted pod's lease",
        || (!pg.can_login(&user, &password)).then_some(()),
    )
    .await;
    eprintln!("revoked {:?} after the pod was deleted", started.elapsed());
    assert!(
        env.bao.leases("database/creds/orders").is_empty(),
        "Vault holds no lease of the pod"
    );
    // The login fails as Vault revokes; the record's deletion and the audit
    // line follow Vault's answer.
    wait_for(Duration::from_secs(10), "the record's deletion", || {
        env.bao.lease_records(&pod_uid).is_empty().then_some(())
    })
    .await;
    // The surviving replicas (B, and the environment's own broker) act
    // alike; whichever came first audited the revocation.
    let revoked = wait_for(
        Duration::from_secs(10),
        "the revocation's audit line",
        || {
            replica_b
                .audit_events()
                .into_iter()
                .chain(env.audit_events())
                .find(|e| e["action"] == "revoke" && e["outcome"] == "success")
        },
    )
    .await;
    assert_eq!(revoked["reason"], "pod deleted");
    assert_eq!(revoked["binding"], "db");
    assert_eq!(revoked["pod_uid"], pod_uid.as_str());
    assert_eq!(revoked["lease_id_sha256"].as_str().map(str::len), Some(64));

    // #26: `tessera-broker audit` over every replica's trail answers "who
    // got binding db, when, and was it revoked": A issued, B (or the
    // environment's broker) revoked.
    let output = std::process::Command::new(tessera_tests::binary("tessera-broker"))
        .args(["audit", "--binding", "db", "-o", "json", "--config"])
        .arg(env.dir.path().join("broker.yaml"))
        .args([&replica_a.audit, &replica_b.audit])
        .arg(env.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let answers: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let issued = &answers.as_array().unwrap()[0];
    assert_eq!(issued["action"], "issue");
    assert_eq!(issued["pod_uid"], pod_uid.as_str());
    assert_eq!(issued["revoked"]["reason"], "pod deleted", "{answers}");
    assert_eq!(issued["held"], false, "no lease record holds it any more");
    assert!(issued["revoked"]["time"].as_str() > issued["time"].as_str());
}

/// Kills (SIGKILL or SIGTERM) the replica that streams a pod's database
/// credential right after it rotated it; the superseded user must stop
/// working when the overlap ends, not when its lease would have expired.
async fn superseded_credential_ends_at_the_overlap_after(signal: &str) {
    let pg = Postgres::start();
    // Role: leases of 30 s, at most 40 s. Renewed at half-life (15 s) to the
    // max; at 27.5 s a renewal cannot extend it, so it is rotated with 12.5 s
    // left, far more than the 3 s overlap.
    let policy = db_policy("30s", "0.5", "3s");
    let env = Env::start(&policy).await;
    env.bao.database_role(&pg, "orders", "30s", "40s");
    let mut replica = env.start_replica("a").await;
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let _sidecar = env.sidecar_run_at(&replica.uri, &token, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let old_user = field(out.path(), "db", "username").unwrap();
    let old_password = field(out.path(), "db", "password").unwrap();
    wait_for(Duration::from_secs(60), "the rotation", || {
        field(out.path(), "db", "username").filter(|u| *u != old_user)
    })
    .await;
    let rotated = Instant::now();
    match signal {
        "SIGKILL" => replica.proc.kill(),
        _ => {
            replica.proc.terminate();
        }
    }
    assert!(
        pg.can_login(&old_user, &old_password),
        "the superseded user works during the overlap"
    );
    wait_for(
        Duration::from_secs(3 + 5),
        "the superseded user to stop working at the overlap's end",
        || (!pg.can_login(&old_user, &old_password)).then_some(()),
    )
    .await;
    eprintln!(
        "{signal}: the superseded user stopped working {:?} after the rotation was seen (overlap 3s)",
        rotated.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_superseded_credential_ends_at_the_overlap_though_its_replica_was_sigkilled() {
    superseded_credential_ends_at_the_overlap_after("SIGKILL").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_superseded_credential_ends_at_the_overlap_though_its_replica_was_sigtermed() {
    superseded_credential_ends_at_the_overlap_after("SIGTERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_restarted_without_handles_holds_at_most_the_configured_leases() {
    let pg = Postgres::start();
    let env = Env::start(&db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let token = env.token_file("shop", "orders");
    let mut logins = Vec::new();
    for restart in 0..20 {
        // A fresh volume each time: the handle file is gone, as after a
        // crash that lost the pod's emptyDir.
        let out = env.tmpfs_out();
        let mut sidecar = env.sidecar_run(&token, out.path(), &["db"]);
        let written = wait_for(Duration::from_secs(20), "delivery", || {
            field(out.path(), "db", "password")
        })
        .await;
        logins.push((field(out.path(), "db", "username").unwrap(), written));
        sidecar.kill();
        assert!(
            env.bao.leases("database/creds/orders").len() <= 2,
            "restart {restart}: more than 2 live leases"
        );
    }
    let live: Vec<_> = logins
        .iter()
        .filter(|(user, password)| pg.can_login(user, password))
        .collect();
    assert!(
        live.len() <= 2,
        "{} of 20 database users still log in",
        live.len()
    );
    let (last_user, last_password) = logins.last().unwrap();
    assert!(
        pg.can_login(last_user, last_password),
        "the newest credential is the one kept"
    );
    let refusals = env
        .audit_events()
        .into_iter()
        .filter(|e| {
            e["action"] == "revoke"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("leases.maxPerPodBinding"))
        })
        .count();
    assert!(
        refusals >= 18,
        "the oldest leases were revoked and audited: {refusals}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_once_credential_is_revoked_when_its_pod_is_deleted() {
    let pg = Postgres::start();
    // The sweep is an hour away: only the pod watch can act in time.
    let options = EnvOptions {
        sweep_interval: "1h",
        ..with_pod_lookup()
    };
    let env = Env::start_with(&db_policy("10m", "0.7", "5s"), options).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let cluster = env.kube.as_ref().unwrap();
    let pod_uid = cluster.add_pod("shop", "orders-0", "orders", &[]);
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let once = env.sidecar_once(&token, out.path(), &["db"], &[]);
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let user = field(out.path(), "db", "username").unwrap();
    let password = field(out.path(), "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));

    // The Job's pod completes and is deleted; nothing streams its lease.
    wait_for(Duration::from_secs(20), "the broker to watch pods", || {
        env.broker.output().contains("watching pods").then_some(())
    })
    .await;
    cluster.delete_pod("shop", "orders-0");
    wait_for(
        Duration::from_secs(20),
        "the pod watch to revoke the deleted Job pod's lease (TTL 10 min)",
        || (!pg.can_login(&user, &password)).then_some(()),
    )
    .await;
    wait_for(Duration::from_secs(10), "the record's deletion", || {
        env.bao.lease_records(&pod_uid).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_only_fetches_has_its_lease_renewed_when_it_asks() {
    let pg = Postgres::start();
    // Leases of 6 s (at most 60 s), renewed past half their life.
    let env = Env::start(&db_policy("6s", "0.5", "1s")).await;
    env.bao.database_role(&pg, "orders", "6s", "60s");
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let fetch = || {
        let once = env.sidecar_once(&token, out.path(), &["db"], &[]);
        assert!(
            once.status.success(),
            "{}",
            String::from_utf8_lossy(&once.stderr)
        );
    };
    fetch();
    let user = field(out.path(), "db", "username").unwrap();
    let password = field(out.path(), "db", "password").unwrap();
    let leases = env.bao.leases("database/creds/orders");
    assert_eq!(leases.len(), 1);
    // Past half its life, nothing streams it; the pod asks again with its handle.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = env.bao.lease_lookup(&leases[0]).unwrap()["ttl"]
        .as_u64()
        .unwrap();
    fetch();
    let after = env.bao.lease_lookup(&leases[0]).unwrap()["ttl"]
        .as_u64()
        .unwrap();
    assert!(
        after > before,
        "renewed: {before}s left before, {after}s after"
    );
    assert_eq!(
        field(out.path(), "db", "username").as_deref(),
        Some(user.as_str())
    );
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "no second user"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(pg.can_login(&user, &password), "alive past its first TTL");
    assert!(env.audit_events().iter().any(|e| e["action"] == "renew"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_withdrawn_grant_ends_the_stream_with_policy_changed_and_revokes_the_lease() {
    let pg = Postgres::start();
    let env = Env::start(&db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let mut sidecar = env.sidecar_run(&token, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let user = field(out.path(), "db", "username").unwrap();
    let password = field(out.path(), "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));

    // The security team removes the grant.
    env.set_policy(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings: []
",
    );
    wait_for(
        Duration::from_secs(20),
        "the withdrawn binding's lease to be revoked",
        || (!pg.can_login(&user, &password)).then_some(()),
    )
    .await;
    wait_for(
        Duration::from_secs(20),
        "the sidecar to react to POLICY_CHANGED",
        || sidecar.output().contains("POLICY_CHANGED").then_some(()),
    )
    .await;
    // Its reconnection is refused: the sidecar stops (denied), files kept.
    wait_for(Duration::from_secs(20), "the sidecar to stop", || {
        sidecar.exited().then_some(())
    })
    .await;
    assert_eq!(
        field(out.path(), "db", "username").as_deref(),
        Some(user.as_str())
    );
    let revoked = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "revoke")
        .expect("the revocation is audited");
    assert!(
        revoked["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("grant withdrawn by policy generation")),
        "{revoked}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_handle_key_keeps_what_pods_hold() {
    let pg = Postgres::start();
    let mut env = Env::start(&db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let sidecar = env.sidecar_run(&token, out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let user = field(out.path(), "db", "username").unwrap();
    let resumed_before = sidecar.output().matches("files kept").count();

    // The operator rotates the shared key: the new one seals from now on,
    // the old one is kept, retired, for what it sealed.
    let dev = env.dir.path().join("dev");
    std::fs::rename(dev.join("handle.key"), dev.join("handle-1.key")).unwrap();
    std::fs::write(dev.join("handle.key"), [7u8; 48]).unwrap();
    env.edit_config(|config| {
        config
            .leases
            .retired_handle_key_files
            .push("dev/handle-1.key".to_owned());
    });
    env.restart_broker().await;

    // The sidecar reconnects with its handle and resumes the same lease.
    assert_resumed(&env, &sidecar, out.path(), &user, resumed_before).await;
}
