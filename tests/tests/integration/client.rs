//! `tessera-client`, the crate applications use, against the real broker,
//! OpenBao and PostgreSQL: fetch, watch with changes, a broker restart
//! resumed with the held handle (no second database user), and a denial
//! that ends the watch with a typed error.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::json;
use tessera_client::{BrokerTarget, Client, DEFAULT_CONNECT_TIMEOUT, Error, TrustAnchors};
use tessera_tests::{Env, Postgres, db_policy, random_string};

fn target(env: &Env, service_account: &str) -> BrokerTarget {
    BrokerTarget {
        uri: env.broker_uri.clone(),
        ca: TrustAnchors::File(env.ca_file()),
        server_name: None,
        token_file: env.token_file("shop", service_account),
        client_identity: None,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
    }
}

fn client(env: &Env, service_account: &str) -> Client {
    Client::new(target(env, service_account))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_fetches_watches_and_resumes_its_database_user_across_a_broker_restart() {
    let pg = Postgres::start();
    let policy = db_policy("10m", "0.7", "5s")
        + "  - name: config\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/config } }\n";
    let mut env = Env::start(&policy).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let secret = random_string(20);
    env.bao
        .put("shop/config", &json!({ "level": secret }))
        .await;
    let app = client(&env, "orders");

    let fetched = app.fetch(&["config"]).await.unwrap();
    assert_eq!(
        fetched.get("config").unwrap().text("level"),
        Some(secret.as_str())
    );
    assert!(
        !format!("{fetched:?}").contains(&secret),
        "Debug shows no value"
    );

    let mut changes = Box::pin(app.watch(&["db", "config"]));
    let first = tokio::time::timeout(Duration::from_secs(20), changes.next())
        .await
        .expect("the first set")
        .unwrap()
        .unwrap();
    let db = first.get("db").unwrap().clone();
    let (user, password) = (
        db.text("username").unwrap().to_owned(),
        db.text("password").unwrap().to_owned(),
    );
    assert!(pg.can_login(&user, &password));
    assert!(db.not_after.is_some() && db.confirmed_at.is_some() && !db.last_known_good);

    // A KV change arrives as a new set.
    env.bao.put("shop/config", &json!({ "level": "two" })).await;
    let changed = tokio::time::timeout(Duration::from_secs(20), changes.next())
        .await
        .expect("the change")
        .unwrap()
        .unwrap();
    assert_eq!(changed.get("config").unwrap().text("level"), Some("two"));
    assert_eq!(
        changed.get("db").unwrap().text("username"),
        Some(user.as_str())
    );

    // The replica dies; the client reconnects with its handle and resumes
    // the same user instead of minting a second one.
    env.restart_broker().await;
    let resumed = tokio::time::timeout(Duration::from_secs(30), changes.next())
        .await
        .expect("the resumed set")
        .unwrap()
        .unwrap();
    assert_eq!(
        resumed.get("db").unwrap().text("username"),
        Some(user.as_str())
    );
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "no second user"
    );
    assert!(pg.can_login(&user, &password));

    // Giving the credential back ends its lease.
    assert_eq!(app.revoke(&["db"]).await.unwrap(), ["db"]);
    assert!(!pg.can_login(&user, &password));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_watch_ends_with_a_typed_error() {
    let env = Env::start(&db_policy("10m", "0.7", "5s")).await;
    let stranger = client(&env, "billing");
    let mut changes = Box::pin(stranger.watch(&["db"]));
    let ended = tokio::time::timeout(Duration::from_secs(20), changes.next())
        .await
        .expect("an answer")
        .expect("an item");
    match ended {
        Err(Error::Denied { message }) => assert!(message.contains("`db`"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(changes.next().await.is_none(), "the watch ended");
    // A missing token file is named, not a panic.
    let error = Client::new(BrokerTarget {
        token_file: env.dir.path().join("no-such-token"),
        ..target(&env, "orders")
    })
    .fetch(&["db"])
    .await
    .unwrap_err();
    assert!(error.to_string().contains("no-such-token"), "{error}");
}

/// The example `name` of the client crate, built when missing.
fn example(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || tessera_tests::workspace_root().join("target"),
        std::path::PathBuf::from,
    );
    let path = target.join("debug/examples").join(name);
    if !path.exists() {
        let built = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "tessera-client", "--example", name])
            .current_dir(tessera_tests::workspace_root())
            .status()
            .unwrap();
        assert!(built.success(), "building example {name}");
    }
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_following_rotations_fails_no_query_and_leaves_no_old_user() {
    let pg = Postgres::start();
    // Rotated about every 3 s (a 6 s lease, renewed at half, capped at 8 s),
    // each old user valid 3 s past its successor.
    let env = Env::start(&db_policy("6s", "0.5", "3s")).await;
    env.bao.database_role(&pg, "orders", "6s", "8s");
    let output = std::process::Command::new(example("rotating_pool"))
        .env("TESSERA_BROKER", &env.broker_uri)
        .env("TESSERA_CA_FILE", env.ca_file())
        .env("TESSERA_TOKEN_FILE", env.token_file("shop", "orders"))
        .env("TESSERA_POOL_BINDING", "db")
        .env(
            "TESSERA_POOL_DB",
            format!("host=127.0.0.1 port={} dbname=postgres", pg.port),
        )
        // Rotations come 3 to 5 s apart: 20 s holds three even when a
        // loaded machine starts the pool late (14 s held exactly three).
        .env("TESSERA_POOL_SECONDS", "20")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    let value = |key: &str| {
        stdout
            .split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {stdout}"))
            .to_owned()
    };
    assert_eq!(value("failed"), "0", "{stdout}{stderr}");
    assert!(value("queries").parse::<u64>().unwrap() > 300, "{stdout}");
    let users: Vec<String> = value("users").split(',').map(str::to_owned).collect();
    eprintln!("{stdout}");
    assert!(users.len() >= 4, "three rotations at least: {users:?}");
    assert!(
        users.iter().all(|u| u.starts_with("v-")),
        "Vault's users: {users:?}"
    );
    // Every superseded user is gone once its overlap ended.
    let (old, _current) = users.split_at(users.len() - 1);
    tessera_tests::wait_for(Duration::from_secs(20), "the old users' removal", || {
        old.iter().all(|user| !pg.role_exists(user)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_share_one_connection_and_a_revoked_credential_is_not_kept() {
    let pg = Postgres::start();
    let env = Env::start(&db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let app = client(&env, "orders");
    let first = app.fetch(&["db"]).await.unwrap();
    let again = app.fetch(&["db"]).await.unwrap();
    assert_eq!(
        first.get("db").unwrap().text("username"),
        again.get("db").unwrap().text("username"),
        "resumed"
    );
    assert_eq!(app.revoke(&["db"]).await.unwrap(), ["db"]);
    // Nothing of the given-back credential is kept: the next fetch is a
    // new user, not the revoked one resumed from memory.
    let next = app.fetch(&["db"]).await.unwrap();
    assert_ne!(
        next.get("db").unwrap().text("username"),
        first.get("db").unwrap().text("username")
    );
    // Every call (issue, revoke, issue again) came over one connection, one
    // TLS handshake: the audit trail names one peer.
    let events = env.audit_events();
    assert!(events.len() >= 3, "{events:#?}");
    let peers: std::collections::BTreeSet<String> = events
        .iter()
        .filter_map(|e| e["peer"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(peers.len(), 1, "{peers:?}");
}
