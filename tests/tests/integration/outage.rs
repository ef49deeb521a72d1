//! A Vault outage: OpenBao (with Raft storage) is killed mid-run and started
//! again. Delivered files stay intact; every KV secret of the policy is still
//! served from the replica's last good read, watched or not (new pods can
//! start), marked last-known-good with the time Vault last confirmed it;
//! anything that needs Vault gets UNAVAILABLE with retry information;
//! delivery resumes when Vault is back.

use std::time::Duration;

use serde_json::json;
use tessera_tests::{Env, EnvOptions, field, simple_policy, wait_for};
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread")]
async fn files_survive_an_openbao_outage_and_delivery_resumes() {
    let options = EnvOptions {
        persistent_vault: true,
        ..EnvOptions::default()
    };
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: other\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/other } }\n"
        + "  - name: unwritten\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/unwritten } }\n";
    let mut env = Env::start_with(&policy, options).await;
    env.bao
        .put("shop/orders", &json!({ "password": "before" }))
        .await;
    env.bao.put("shop/other", &json!({ "key": "value" })).await;
    let out = env.tmpfs_out();
    let sidecar = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["app"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "app", "password").filter(|p| p == "before")
    })
    .await;

    // The broker polls every 200 ms here: give it a few polls to read `other`.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let app_status = || tessera_sidecar::status::Status::read(out.path()).bindings["app"].clone();
    assert!(!app_status().last_known_good, "{:?}", app_status());
    env.bao.kill();
    // After the kill is reaped: a version check answered just before it may
    // be stamped a moment later, as the broker processes the answer.
    let killed_at = std::time::SystemTime::now() + Duration::from_millis(500);
    let token = env.token("shop", "orders");
    let cached = env
        .fetch(&token, &["app"])
        .await
        .expect("a followed KV secret is served during the outage");
    assert_eq!(cached.credentials[0].fields["password"], b"before");
    // Nobody ever asked for `other`: the replica keeps it warm all the same.
    let warm = env
        .fetch(&token, &["other"])
        .await
        .expect("every KV secret of the policy is served during the outage");
    assert_eq!(warm.credentials[0].fields["key"], b"value");
    // A secret the replica never read needs Vault.
    let status = env.fetch(&token, &["unwritten"]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.get_details_retry_info().is_some(),
        "UNAVAILABLE carries retry info"
    );
    wait_for(
        Duration::from_secs(20),
        "the broker to notice the outage",
        || {
            env.broker
                .output()
                .contains("polling a KV secret's version failed")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        field(out.path(), "app", "password").as_deref(),
        Some("before"),
        "files intact during the outage"
    );
    // The broker says what it serves is last-known-good, and since when
    // Vault has not confirmed it; the open stream's sidecar reports it.
    let mut served = None;
    for _ in 0..50 {
        let credential = env.fetch(&token, &["app"]).await.unwrap().credentials[0].clone();
        if credential.last_known_good {
            served = Some(credential);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served = served.expect("the broker marks its copy last-known-good once its poll fails");
    let confirmed = std::time::SystemTime::try_from(served.confirmed_at.unwrap()).unwrap();
    assert!(confirmed <= killed_at, "confirmed before Vault went away");
    let stale = wait_for(
        Duration::from_secs(10),
        "the sidecar to report staleness",
        || Some(app_status()).filter(|s| s.last_known_good),
    )
    .await;
    assert!(stale.stale, "{stale:?}");
    assert!(
        stale
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("last-known-good")
    );

    let dir = env.dir.path().to_owned();
    // Nothing Vault answered before the kill is still being stamped by now
    // (the sidecar already reported the outage), however loaded the machine.
    let restarting_at = std::time::SystemTime::now();
    env.bao.restart(&dir).await;
    // Vault confirms the same version again: the sidecar hears it is fresh.
    let fresh = wait_for(Duration::from_secs(30), "Vault's confirmation", || {
        Some(app_status()).filter(|s| !s.last_known_good)
    })
    .await;
    assert!(!fresh.stale, "{fresh:?}");
    let reconfirmed =
        humantime::parse_rfc3339(fresh.vault_confirmed_at.as_deref().unwrap()).unwrap();
    assert!(
        reconfirmed > restarting_at,
        "confirmed after the outage: {fresh:?}"
    );
    env.bao
        .put("shop/orders", &json!({ "password": "after" }))
        .await;
    wait_for(Duration::from_secs(30), "delivery to resume", || {
        field(out.path(), "app", "password").filter(|p| p == "after")
    })
    .await;
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_lease_due_for_renewal_is_served_while_vault_is_away() {
    use tessera_proto::v1::{FetchRequest, Held};
    let pg = tessera_tests::Postgres::start();
    let options = EnvOptions {
        persistent_vault: true,
        ..EnvOptions::default()
    };
    let mut env = Env::start_with(&tessera_tests::db_policy("20s", "0.5", "2s"), options).await;
    env.bao.database_role(&pg, "orders", "1h", "2h");
    let token = env.token("shop", "orders");
    let channel = env.channel().await;
    let fetch = |held: Option<String>| {
        let request = FetchRequest {
            bindings: vec!["db".to_owned()],
            held: held
                .map(|handle| Held {
                    binding: "db".to_owned(),
                    handle,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let mut client = tessera_proto::v1::broker_client::BrokerClient::new(channel.clone());
        let token = token.clone();
        async move {
            client
                .fetch(tessera_tests::with_token(&token, request))
                .await
                .map(|r| r.into_inner().credentials[0].clone())
        }
    };
    let first = fetch(None).await.unwrap();
    let user = String::from_utf8(first.fields["username"].clone()).unwrap();
    let password = String::from_utf8(first.fields["password"].clone()).unwrap();
    let ends = first.not_after.unwrap().seconds;

    // Past the renew fraction, Vault goes away.
    tokio::time::sleep(Duration::from_secs(11)).await;
    env.bao.kill();
    let held = fetch(Some(first.handle.clone()))
        .await
        .expect("a held, still-valid lease is served while Vault is away");
    assert!(held.fields.is_empty(), "the pod keeps its values");
    assert!(held.last_known_good, "marked as not renewed: {held:?}");
    assert_eq!(held.not_after.unwrap().seconds, ends, "its end as known");
    assert!(pg.can_login(&user, &password));

    // Vault back: the same lease is renewed, the mark cleared.
    let dir = env.dir.path().to_owned();
    env.bao.restart(&dir).await;
    let mut renewed = None;
    for _ in 0..60 {
        if let Ok(credential) = fetch(Some(first.handle.clone())).await
            && !credential.last_known_good
        {
            renewed = Some(credential);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renewed = renewed.expect("the lease renewed within 30 s of Vault's return");
    assert!(renewed.fields.is_empty(), "the same user: {renewed:?}");
    assert!(renewed.not_after.unwrap().seconds > ends);
    assert!(pg.can_login(&user, &password));
}
