//! #25: changes pushed from Vault without Enterprise. OpenBao's `http` audit
//! device posts every entry to the broker, which reads paths and
//! operations only: a write to a KV secret the policy serves is read again
//! at once and pushed to the pod, although the broker polls only every 5
//! minutes while the feed is up. When the feed goes silent (the broker's
//! canary request does not come back), polling returns to the short
//! interval, with the gauge saying so.

use std::time::Duration;

use serde_json::json;
use tessera_tests::{
    Env, EnvOptions, field, metric_value, simple_policy, vault_requests, wait_for,
};

/// A value of the broker's `/metrics` (its first sample).
async fn metric(env: &Env, name: &str) -> Option<f64> {
    metric_value(&env.admin_url, name, "").await
}

/// A broker taking OpenBao's change feed (polling at 1 s when it is silent),
/// serving `secret/shop/orders` (at `v1`) as binding `app`, once the feed is up.
async fn with_feed() -> Env {
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        EnvOptions {
            poll: "1s",
            change_feed: true,
            ..EnvOptions::default()
        },
    )
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": "v1" }))
        .await;
    until_feed(&env, true).await;
    env
}

/// Waits until `tessera_change_feed_up` is `up`.
async fn until_feed(env: &Env, up: bool) {
    let wanted = if up { 1.0 } else { 0.0 };
    for _ in 0..60 {
        if metric(env, "tessera_change_feed_up").await == Some(wanted) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("tessera_change_feed_up never became {wanted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_is_pushed_at_once_through_the_feed_and_a_silent_feed_falls_back_to_polling() {
    let mut env = with_feed().await;
    let out = env.tmpfs_out();
    let _sidecar = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["app"]);
    wait_for(Duration::from_secs(20), "v1", || {
        field(out.path(), "app", "password").filter(|v| v == "v1")
    })
    .await;
    // Polling is at 5 minutes now: only the feed brings v2 this soon.
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.bao
        .put("shop/orders", &json!({ "password": "v2" }))
        .await;
    wait_for(Duration::from_secs(20), "v2 through the feed", || {
        field(out.path(), "app", "password").filter(|v| v == "v2")
    })
    .await;
    let rereads = metric(&env, "tessera_change_feed_rereads_total").await;
    assert!(rereads.is_some_and(|n| n >= 1.0), "{rereads:?}");

    // The feed goes silent: the broker notices and polls at 1 s again.
    env.silence_change_feed();
    until_feed(&env, false).await;
    env.bao
        .put("shop/orders", &json!({ "password": "v3" }))
        .await;
    wait_for(Duration::from_secs(20), "v3 by polling", || {
        field(out.path(), "app", "password").filter(|v| v == "v3")
    })
    .await;
    assert_eq!(
        metric(&env, "tessera_change_feed_rereads_total").await,
        rereads,
        "v3 came by polling, not the feed"
    );
}

/// Posts `count` forged audit entries naming `path` to the broker's feed.
async fn forge(address: &str, path: &str, count: usize) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let entry = json!({ "type": "response", "request": { "path": path, "operation": "update" } });
    let body = format!("{entry}\n").repeat(count);
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST /v1/audit HTTP/1.1\r\nHost: feed\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_forged_feed_entries_costs_vault_at_most_a_read_a_second() {
    let env = with_feed().await;
    let feed = env
        .config
        .vault
        .change_feed
        .as_ref()
        .unwrap()
        .listen
        .clone();
    let checks =
        "tessera_vault_request_duration_seconds_count{operation=\"ReadSecretMetadataRequest\"}";
    let before = metric(&env, checks).await.unwrap_or(0.0);
    for _ in 0..10 {
        forge(&feed, "secret/data/shop/orders", 100).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = metric(&env, checks).await.unwrap_or(0.0);
    // 1,000 entries over two seconds: a read a second, and a margin of one.
    assert!(after - before <= 4.0, "{before} -> {after} version checks");
    assert!(
        after - before >= 1.0,
        "the entries were heard: {before} -> {after}"
    );
}

/// Defect found in #25's review: behind one Service, Vault's feed lands on one
/// replica, so the other replicas' canaries never came back to them; they
/// thought the feed silent and polled their secrets at the short interval
/// (Vault's load grew with replicas again). A canary now counts wherever it
/// lands: the replica that receives it passes it to its peers.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_canary_lands_on_a_peer_still_knows_the_feed_is_up() {
    use tessera_tests::{PeerPki, peer_addresses};
    let mut env = with_feed().await;
    let pki = PeerPki::new(env.dir.path());
    let addresses = peer_addresses(2);
    env.join_peers(&addresses[0], &addresses, &pki).await;
    until_feed(&env, true).await;
    // Replica b's own feed listener hears nothing from Vault.
    let b = env.start_peer("b", &addresses[1], &addresses, &pki).await;
    let mut up = None;
    for _ in 0..60 {
        up = metric_value(&b.admin_url(), "tessera_change_feed_up", "").await;
        if up == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(up, Some(1.0), "b's canaries come back through a's feed");
}

/// #25: with peers, one replica checks the feed for the cluster (the owner
/// of the check sends the canaries) and tells the others what it found:
/// each replica sent its own canary every check interval before, so Vault's
/// load grew with replicas.
#[tokio::test(flavor = "multi_thread")]
async fn among_peers_one_replica_sends_the_canaries_and_every_replica_knows_the_feed_is_up() {
    use tessera_broker::{feed::FEED_CHECK, membership::owner};
    use tessera_tests::{PeerPki, peer_addresses};
    let mut env = with_feed().await;
    let pki = PeerPki::new(env.dir.path());
    let addresses = peer_addresses(2);
    env.join_peers(&addresses[0], &addresses, &pki).await;
    let b = env.start_peer("b", &addresses[1], &addresses, &pki).await;
    let admins = [env.admin_url.clone(), b.admin_url()];
    let canaries = async |admin: &str| {
        metric_value(admin, "tessera_change_feed_canaries_total", "")
            .await
            .unwrap_or_default()
    };
    // Until both are up (the checker's word reaches the other).
    let mut up = Vec::new();
    for _ in 0..60 {
        up.clear();
        for admin in &admins {
            up.push(metric_value(admin, "tessera_change_feed_up", "").await);
        }
        if up.iter().all(|u| *u == Some(1.0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        up,
        [Some(1.0), Some(1.0)],
        "both replicas know the feed is up"
    );
    let mut before = Vec::new();
    for admin in &admins {
        before.push(canaries(admin).await);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let checker = owner(&addresses, FEED_CHECK).unwrap();
    for ((admin, address), before) in admins.iter().zip(&addresses).zip(before) {
        let sent = canaries(admin).await > before;
        assert_eq!(
            sent,
            address == checker,
            "{address}: canaries only from the checker ({checker})"
        );
        assert_eq!(
            metric_value(admin, "tessera_change_feed_up", "").await,
            Some(1.0),
            "{address} still knows the feed is up"
        );
    }
}

/// #25: behind one Service the feed reaches one replica, which reads the
/// written secret and passes it to its peers. The secret's owner took the
/// copy but, at its next check, still compared Vault's version with the one
/// it had read itself, and read the secret's data again: one more Vault
/// read per change and replica that owns a secret (the bench's backstop
/// window counted them). A version a peer passed on is known now.
#[tokio::test(flavor = "multi_thread")]
async fn the_owner_does_not_read_again_a_change_a_peer_read_for_it() {
    use tessera_broker::{
        feed::FEED_CHECK, membership::owner, peers::source_key, policy::Kv2Source,
    };
    use tessera_tests::{PeerPki, peer_addresses};
    let mut env = with_feed().await;
    let pki = PeerPki::new(env.dir.path());
    let addresses = peer_addresses(2);
    let orders = Kv2Source {
        mount: "secret".to_owned(),
        path: "shop/orders".to_owned(),
        keys: None,
        namespace: None,
    };
    // The feed reaches the environment's broker; the other replica owns
    // the secret.
    let owner_at = addresses
        .iter()
        .position(|a| a == owner(&addresses, &source_key(&orders)).unwrap())
        .unwrap();
    let (receiver, owning) = (&addresses[1 - owner_at], &addresses[owner_at]);
    env.join_peers(receiver, &addresses, &pki).await;
    let b = env.start_peer("b", owning, &addresses, &pki).await;
    let data_reads = async || vault_requests(&b.admin_url(), "ReadSecretRequest").await;
    let version_at_b = async || {
        let mut client =
            tessera_proto::v1::broker_client::BrokerClient::new(env.channel_to(&b.uri).await);
        let request = tessera_tests::with_token(
            &env.token("shop", "orders"),
            tessera_proto::v1::FetchRequest {
                bindings: vec!["app".to_owned()],
                ..Default::default()
            },
        );
        client
            .fetch(request)
            .await
            .map(|a| a.into_inner().credentials[0].version.clone())
            .unwrap_or_default()
    };
    let until_b_has = async |version: &str| {
        for _ in 0..80 {
            if version_at_b().await == version {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("replica b never served version {version}");
    };
    until_b_has("1").await;
    // Until b polls at the backstop (the feed is up for it too).
    let mut up = None;
    for _ in 0..120 {
        up = metric_value(&b.admin_url(), "tessera_change_feed_up", "").await;
        if up == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(up, Some(1.0), "b hears the feed is up");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = data_reads().await;
    env.bao
        .put("shop/orders", &json!({ "password": "v2" }))
        .await;
    until_b_has("2").await;
    // The feed falls silent: b checks the version every second again.
    env.silence_change_feed();
    let checker = owner(&addresses, FEED_CHECK).unwrap().clone();
    let versions = async || vault_requests(&b.admin_url(), "ReadSecretMetadataRequest").await;
    let checked = versions().await;
    for _ in 0..120 {
        if versions().await > checked + 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        versions().await > checked + 1.0,
        "b checks the version again"
    );
    assert_eq!(
        data_reads().await,
        before,
        "b (the owner; the feed checker is {checker}) read v2 from Vault although its peer passed it on"
    );
}
