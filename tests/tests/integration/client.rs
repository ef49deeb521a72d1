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
