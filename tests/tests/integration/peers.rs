//! #25: replicas that cooperate. Three replicas follow each other over the
//! peer channel (mutual TLS, the peer CA only); each KV secret is read from
//! Vault by one of them, its owner by rendezvous hashing, which pushes
//! changes to the others. When the owner is SIGKILLed a survivor takes the
//! secret over; a caller without a peer certificate is refused on the
//! channel; a replica started while OpenBao is down serves a new pod's KV
//! binding from its peers' copies.

use std::time::Duration;

use serde_json::json;
use tessera_broker::{
    lease::reconcile::FULL_PASS,
    peers::{owner, source_key},
    policy::Kv2Source,
};
use tessera_proto::{
    peer::v1::{FollowRequest, peer_client::PeerClient},
    v1::{FetchRequest, broker_client::BrokerClient},
};
use tessera_tests::{
    CertFiles, Env, EnvOptions, PeerPki, Replica, field, free_port, host_address, metric_value,
    peer_addresses, simple_policy, wait_for,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn options() -> EnvOptions {
    EnvOptions {
        poll: "1s",
        ..EnvOptions::default()
    }
}

fn orders() -> Kv2Source {
    Kv2Source {
        mount: "secret".to_owned(),
        path: "shop/orders".to_owned(),
        keys: None,
        namespace: None,
    }
}

/// How many times `replica` has asked Vault for a KV secret's version.
async fn version_checks(replica: &Replica) -> u64 {
    counter(
        replica,
        "tessera_vault_request_duration_seconds_count",
        "ReadSecretMetadataRequest",
    )
    .await
}

/// A counter of `replica`'s `/metrics` (metric `name`, a line with `label`).
async fn counter(replica: &Replica, name: &str, label: &str) -> u64 {
    metric_value(&replica.admin_url(), name, label)
        .await
        .map_or(0, |value| value as u64)
}

/// Which of `replicas` checked the secret's version over two seconds.
async fn pollers(replicas: &[&Replica]) -> Vec<bool> {
    let mut before = Vec::new();
    for replica in replicas {
        before.push(version_checks(replica).await);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut polled = Vec::new();
    for (replica, before) in replicas.iter().zip(before) {
        polled.push(version_checks(replica).await > before);
    }
    polled
}

/// Waits until `replica` logged that it follows `peers` live peers.
async fn until_members(env: &Env, replica: &Replica, members: usize) {
    let log = env.dir.path().join(replica.log_name());
    let wanted = format!("members={members}");
    wait_for(Duration::from_secs(20), "the peers to meet", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| l.contains("peer membership changed"))
            .filter(|l| l.contains(&wanted))
            .map(|_| ())
    })
    .await;
}

/// An environment whose policy serves `secret/shop/orders` (at version 1)
/// to shop/orders as binding `app`, and the peer certificates.
async fn with_secret(options: EnvOptions) -> (Env, PeerPki) {
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": "v1" }))
        .await;
    let pki = PeerPki::new(env.dir.path());
    (env, pki)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_is_read_by_its_owner_alone_and_moves_to_a_survivor_when_the_owner_is_killed() {
    let (env, pki) = with_secret(options()).await;
    let addresses = peer_addresses(3);
    let mut replicas = Vec::new();
    for (name, address) in ["a", "b", "c"].iter().zip(&addresses) {
        replicas.push(env.start_peer(name, address, &addresses, &pki).await);
    }
    for replica in &replicas {
        until_members(&env, replica, 3).await;
    }
    let key = source_key(&orders());
    let first = owner(&addresses, &key).unwrap().clone();
    let index = |address: &String| addresses.iter().position(|a| a == address).unwrap();
    let owner_at = index(&first);
    // One replica reads the secret for the cluster; the others do not.
    let polled = pollers(&replicas.iter().collect::<Vec<_>>()).await;
    let expected: Vec<bool> = (0..3).map(|i| i == owner_at).collect();
    assert_eq!(
        polled, expected,
        "only the owner ({first}) checks the version"
    );
    // The sweeps over the lease records, light and full, are shared the
    // same way: one replica lists and reads the records for the cluster.
    let sweeps = |replica| async move {
        counter(replica, "tessera_lease_sweeps_total", "kind=\"full\"").await
            + counter(replica, "tessera_lease_sweeps_total", "kind=\"light\"").await
    };
    let mut before = Vec::new();
    for replica in &replicas {
        before.push(sweeps(replica).await);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pass_owner = index(owner(&addresses, FULL_PASS).unwrap());
    for (i, replica) in replicas.iter().enumerate() {
        let made = sweeps(replica).await > before[i];
        assert_eq!(
            made,
            i == pass_owner,
            "replica {i}: sweeps only by the owner ({pass_owner})"
        );
    }

    // A pod on another replica gets a change the owner read and pushed.
    let other = (owner_at + 1) % 3;
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let _sidecar = env.sidecar_run_at(&replicas[other].uri, &token, out.path(), &["app"]);
    wait_for(Duration::from_secs(20), "v1", || {
        field(out.path(), "app", "password").filter(|v| v == "v1")
    })
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": "v2" }))
        .await;
    wait_for(Duration::from_secs(20), "v2 through the owner", || {
        field(out.path(), "app", "password").filter(|v| v == "v2")
    })
    .await;
    // The owner's confirmations travel too: another replica's copy says
    // Vault vouched for it within the last poll or two, not when it changed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut client = BrokerClient::new(env.channel_to(&replicas[other].uri).await);
    let request = tessera_tests::with_token(
        &env.token("shop", "orders"),
        FetchRequest {
            bindings: vec!["app".to_owned()],
            ..Default::default()
        },
    );
    let answer = client.fetch(request).await.unwrap().into_inner();
    let confirmed =
        std::time::SystemTime::try_from(answer.credentials[0].confirmed_at.unwrap()).unwrap();
    let age = confirmed.elapsed().unwrap_or_default();
    assert!(age < Duration::from_millis(2500), "confirmed {age:?} ago");

    // The owner dies: a survivor takes the secret over within seconds.
    replicas[owner_at].proc.kill();
    let survivors: Vec<String> = addresses.iter().filter(|a| **a != first).cloned().collect();
    let next = owner(&survivors, &key).unwrap().clone();
    let next_at = index(&next);
    for (i, replica) in replicas.iter().enumerate() {
        if i != owner_at {
            until_members(&env, replica, 2).await;
        }
    }
    let alive: Vec<&Replica> = (0..3)
        .filter(|i| *i != owner_at)
        .map(|i| &replicas[i])
        .collect();
    let polled = pollers(&alive).await;
    let expected: Vec<bool> = (0..3)
        .filter(|i| *i != owner_at)
        .map(|i| i == next_at)
        .collect();
    assert_eq!(polled, expected, "the survivor {next} checks it now");
    env.bao
        .put("shop/orders", &json!({ "password": "v3" }))
        .await;
    wait_for(Duration::from_secs(20), "v3 after the owner died", || {
        field(out.path(), "app", "password").filter(|v| v == "v3")
    })
    .await;
}

/// #25: a survivor that took a secret over checked its version at once,
/// though the copy it held had been confirmed moments before, so every
/// move (a peer gone, or back after a missed keepalive under load) cost
/// Vault a read. The new owner now checks when the last owner's check
/// falls due.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_that_moves_to_a_survivor_is_checked_when_its_check_falls_due() {
    let (env, pki) = with_secret(EnvOptions {
        poll: "12s",
        ..EnvOptions::default()
    })
    .await;
    let addresses = peer_addresses(2);
    let mut replicas = Vec::new();
    for (name, address) in ["a", "b"].iter().zip(&addresses) {
        replicas.push(env.start_peer(name, address, &addresses, &pki).await);
    }
    for replica in &replicas {
        until_members(&env, replica, 2).await;
    }
    let first = owner(&addresses, &source_key(&orders())).unwrap();
    let owner_at = addresses.iter().position(|a| a == first).unwrap();
    let survivor_at = 1 - owner_at;
    // Both read the secret as they start, before they know each other; at
    // the next poll the owner checks it and passes the confirmation on,
    // and the other finds it is not the owner.
    let started = version_checks(&replicas[owner_at]).await;
    until_checked_after(&replicas[owner_at], started, "the owner's next check").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = version_checks(&replicas[survivor_at]).await;
    replicas[owner_at].proc.kill();
    let survivor = &replicas[survivor_at];
    until_members(&env, survivor, 1).await;
    // The survivor owns the secret within a second (its ownership check);
    // the copy it holds was confirmed by the owner's check seconds ago.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        version_checks(survivor).await,
        before,
        "the survivor checks the secret it took over when the check is due (12 s after the owner's last), not at once"
    );
    // And it does check then: the secret is not left unread.
    until_checked_after(
        survivor,
        before,
        "the survivor's check of the secret it took over",
    )
    .await;
}

/// Waits (30 s at most) until `replica` has checked a KV secret's version
/// more than `checks` times.
async fn until_checked_after(replica: &Replica, checks: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while version_checks(replica).await == checks {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// #25: among peers, a replica with nothing of its own to ask Vault (it
/// owns no secret and no sweep) sent a health check every interval, so
/// Vault's load grew with replicas again once the work was shared. It now
/// takes a peer's word that Vault answers the peer's requests, and still
/// reports Vault up.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_peer_needs_no_health_check_of_its_own_while_its_peers_hear_from_vault() {
    let (env, pki) = with_secret(options()).await;
    let addresses = peer_addresses(3);
    let mut replicas = Vec::new();
    for (name, address) in ["a", "b", "c"].iter().zip(&addresses) {
        replicas.push(env.start_peer(name, address, &addresses, &pki).await);
    }
    for replica in &replicas {
        until_members(&env, replica, 3).await;
    }
    let busy = [
        owner(&addresses, &source_key(&orders())).unwrap(),
        owner(&addresses, FULL_PASS).unwrap(),
    ];
    let checks = |replica| {
        counter(
            replica,
            "tessera_vault_request_duration_seconds_count",
            "LookupTokenSelfRequest",
        )
    };
    let mut before = Vec::new();
    for replica in &replicas {
        before.push(checks(replica).await);
    }
    // Five health-check intervals (1 s here).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut idle = 0;
    for ((replica, address), before) in replicas.iter().zip(&addresses).zip(before) {
        let up = metric_value(&replica.admin_url(), "tessera_vault_up", "").await;
        assert_eq!(up, Some(1.0), "{address} reports Vault up");
        if !busy.contains(&address) {
            idle += 1;
            assert_eq!(
                checks(replica).await,
                before,
                "{address} owns nothing and sent no health check"
            );
        }
    }
    assert!(
        idle > 0,
        "three replicas, two owned keys: one idle at least"
    );
}

/// Calls `Follow` on the peer channel at `address` with `identity` (none:
/// no client certificate), trusting the peer CA; the first copy's version.
async fn follow(address: &str, pki: &PeerPki, identity: Option<&CertFiles>) -> Result<u64, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("tessera-peer");
    if let Some(files) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut stream = PeerClient::new(channel)
        .follow(FollowRequest {
            replica: "test".to_owned(),
        })
        .await
        .map_err(|e| format!("follow: {e}"))?
        .into_inner();
    let copy = stream
        .message()
        .await
        .map_err(|e| format!("stream: {e}"))?
        .ok_or("no copy")?;
    Ok(copy.version)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_channel_refuses_callers_without_a_peer_certificate() {
    let (env, pki) = with_secret(options()).await;
    let addresses = peer_addresses(1);
    let _replica = env.start_peer("a", &addresses[0], &addresses, &pki).await;
    // A peer gets the copies (once the replica has read the secret).
    let mut version = Err(String::new());
    for _ in 0..40 {
        version = follow(&addresses[0], &pki, Some(&pki.peer)).await;
        if version.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(version, Ok(1));
    // No certificate, or one of another CA (a pod's): refused.
    let none = follow(&addresses[0], &pki, None).await.unwrap_err();
    let foreign = follow(&addresses[0], &pki, Some(&pki.foreign))
        .await
        .unwrap_err();
    // The handshake fails: the connection closes before any answer (no
    // gRPC status, a transport error).
    for refused in [&none, &foreign] {
        assert!(
            refused.starts_with("follow:") && refused.contains("tonic::transport::Error"),
            "refused in the handshake: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_started_during_a_vault_outage_serves_a_new_pods_kv_binding_from_its_peers() {
    let (env, pki) = with_secret(EnvOptions {
        persistent_vault: true,
        ..options()
    })
    .await;
    let addresses = peer_addresses(3);
    let a = env.start_peer("a", &addresses[0], &addresses, &pki).await;
    let _b = env.start_peer("b", &addresses[1], &addresses, &pki).await;
    until_members(&env, &a, 2).await;
    // Both hold the secret (the owner read it, the other took its copy).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut env = env;
    env.bao.kill();
    let c = env.start_peer("c", &addresses[2], &addresses, &pki).await;
    until_members(&env, &c, 3).await;
    let token = env.token("shop", "orders");
    let mut client = BrokerClient::new(env.channel_to(&c.uri).await);
    let mut answer = None;
    for _ in 0..40 {
        let request = tessera_tests::with_token(
            &token,
            FetchRequest {
                bindings: vec!["app".to_owned()],
                ..Default::default()
            },
        );
        match client.fetch(request).await {
            Ok(served) => {
                answer = Some(served.into_inner());
                break;
            }
            Err(status) => eprintln!("not yet served: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let answer = answer.expect("C serves the binding from its peers' copies");
    assert_eq!(answer.credentials[0].fields["password"], b"v1");
    // The owner's next check fails; every replica then says the copy is
    // last-known-good.
    let mut stale = false;
    for _ in 0..40 {
        let request = tessera_tests::with_token(
            &token,
            FetchRequest {
                bindings: vec!["app".to_owned()],
                ..Default::default()
            },
        );
        let answer = client.fetch(request).await.unwrap().into_inner();
        assert_eq!(answer.credentials[0].fields["password"], b"v1");
        if answer.credentials[0].last_known_good {
            stale = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        stale,
        "Vault is away: the answer says the copy is last-known-good"
    );
}

/// An EndpointSlice of Service `tessera-peers` naming one replica's peer
/// address (a slice per replica: here they share one host).
fn endpoint_slice(name: &str, host: &str, port: u16) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "tessera",
            "labels": {
                "kubernetes.io/service-name": "tessera-peers",
                "endpointslice.kubernetes.io/managed-by": "tessera-tests"
            }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "peer", "port": port, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [host], "conditions": { "ready": true } }]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_find_each_other_in_the_services_endpoint_slices_and_drop_a_replica_that_left() {
    let (env, pki) = with_secret(EnvOptions {
        kubernetes: true,
        ..options()
    })
    .await;
    let cluster = env.kube.as_ref().unwrap();
    let namespace =
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "tessera" } });
    assert!(cluster.apply(&namespace).status.success());
    let host = host_address().to_string();
    let ports = [free_port(), free_port()];
    for (i, port) in ports.iter().enumerate() {
        let slice = endpoint_slice(&format!("tessera-peers-{i}"), &host, *port);
        let applied = cluster.apply(&slice);
        assert!(applied.status.success(), "{applied:?}");
    }
    let service = ("tessera", "tessera-peers");
    let address = |port: u16| format!("{host}:{port}");
    let a = env
        .start_discovering_peer("a", &address(ports[0]), service, &pki)
        .await;
    let b = env
        .start_discovering_peer("b", &address(ports[1]), service, &pki)
        .await;
    until_members(&env, &a, 2).await;
    until_members(&env, &b, 2).await;
    // B leaves the Service (a rollout took it out): A follows it no more.
    cluster.run(&[
        "-n",
        "tessera",
        "delete",
        "endpointslice",
        "tessera-peers-1",
    ]);
    until_members(&env, &a, 1).await;
}
