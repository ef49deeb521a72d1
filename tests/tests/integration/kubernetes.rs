//! Identity from the cluster: OIDC discovery, TokenReview and pod lookup,
//! against a real kube-apiserver (`scripts/cluster`). Every token here comes
//! from its TokenRequest API (`kubectl create token`), bound to a pod or not;
//! Vault is the real OpenBao.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_broker::dev::TokenSpec;
use tessera_proto::v1::{FetchRequest, WhoAmIRequest};
use tessera_tests::{
    Env, EnvOptions, IdentitySource, Postgres, simple_policy, wait_for, with_token,
};
use tonic::Code;

fn options(source: IdentitySource, pod_lookup: bool) -> EnvOptions {
    EnvOptions {
        kubernetes: true,
        identity_source: source,
        pod_lookup,
        ..EnvOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_discovery_verifies_the_clusters_tokens_and_follows_its_key_rotation() {
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options(IdentitySource::OidcDiscovery, false),
    )
    .await;
    let cluster = env.kube.as_ref().unwrap();
    let mut client = env.client().await;
    // An unbound token (`kubectl create token`) and one bound to a pod.
    cluster.add_pod("shop", "orders-0", "orders", &[]);
    for pod in [None, Some("orders-0")] {
        let token = cluster.token("shop", "orders", "tessera", pod, 600);
        let who = client
            .who_am_i(with_token(&token, WhoAmIRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(who.bindings, ["app"]);
        assert_eq!(who.identity.unwrap().pod_name, pod.unwrap_or_default());
    }
    // A token for another audience is refused, saying why.
    let vault_token = cluster.token("shop", "orders", "vault", None, 600);
    let status = client
        .who_am_i(with_token(&vault_token, WhoAmIRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("audience"), "{status:?}");

    // The cluster rotates its signing key (kubeadm's way: a new key signs,
    // the old one still verifies): the broker refetches on the unknown kid.
    let rotated =
        std::process::Command::new(tessera_tests::workspace_root().join("scripts/cluster"))
            .args(["rotate-key", "--dir"])
            .arg(cluster.dir())
            .output()
            .unwrap();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let token = cluster.token("shop", "orders", "tessera", None, 600);
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(status) = client.who_am_i(with_token(&token, WhoAmIRequest {})).await {
        assert!(
            Instant::now() < deadline,
            "a token of the rotated key never verified: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_with_pod_lookup_grants_by_label_and_refuses_deleted_pods() {
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: gold\n    subjects: [{ namespace: shop, serviceAccount: orders, podLabels: { tier: gold } }]\n    source: { kv2: { mount: secret, path: shop/gold } }\n";
    let env = Env::start_with(&policy, options(IdentitySource::TokenReview, true)).await;
    env.bao
        .put("shop/gold", &json!({ "key": "gold-value" }))
        .await;
    let cluster = env.kube.as_ref().unwrap();
    cluster.add_pod("shop", "orders-0", "orders", &[("tier", "gold")]);
    let token = cluster.token("shop", "orders", "tessera", Some("orders-0"), 600);
    let mut client = env.client().await;

    let who = client
        .who_am_i(with_token(&token, WhoAmIRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        who.bindings,
        ["app", "gold"],
        "the pod's label grants `gold`"
    );
    assert_eq!(who.identity.unwrap().pod_name, "orders-0");
    let fetched = client
        .fetch(with_token(
            &token,
            FetchRequest {
                bindings: vec!["gold".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.credentials[0].fields["key"], b"gold-value");

    // A pod without the label is not granted `gold`.
    cluster.add_pod("shop", "orders-1", "orders", &[("tier", "silver")]);
    let silver = cluster.token("shop", "orders", "tessera", Some("orders-1"), 600);
    let status = client
        .fetch(with_token(
            &silver,
            FetchRequest {
                bindings: vec!["gold".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The pod is deleted: the API server's review refuses its token, and so
    // does the broker once its 1 s cache entry ages out.
    cluster.delete_pod("shop", "orders-0");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.who_am_i(with_token(&token, WhoAmIRequest {})).await {
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the deleted pod's token still works"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // A token the cluster did not sign is refused by its review.
    let forged = env.signer.mint(&TokenSpec::new("shop", "orders"));
    let status = client
        .who_am_i(with_token(&forged, WhoAmIRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_of_a_deleted_pod_are_revoked_even_when_its_sidecar_was_killed() {
    let pg = Postgres::start();
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { database: 1m }
bindings:
  - name: db
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: orders } }
    ttl: 1m
";
    let env = Env::start_with(policy, options(IdentitySource::JwksFile, true)).await;
    env.bao.database_role(&pg, "orders", "60s", "120s");
    let cluster = env.kube.as_ref().unwrap();
    cluster.add_pod("shop", "orders-0", "orders", &[]);
    let out = env.tmpfs_out();
    let run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        tessera_tests::field(out.path(), "db", "password")
    })
    .await;
    let user = tessera_tests::field(out.path(), "db", "username").unwrap();
    let password = tessera_tests::field(out.path(), "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));

    // The pod is deleted and its sidecar dies without a chance to revoke.
    cluster.delete_pod("shop", "orders-0");
    drop(run);
    wait_for(
        Duration::from_secs(20),
        "the broker to revoke the deleted pod's lease",
        || (!pg.can_login(&user, &password)).then_some(()),
    )
    .await;
    // The login fails as Vault revokes; the audit line follows the answer.
    let event = wait_for(
        Duration::from_secs(10),
        "the revocation's audit line",
        || {
            env.audit_events()
                .into_iter()
                .find(|e| e["action"] == "revoke")
        },
    )
    .await;
    assert_eq!(event["reason"], "pod deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_no_pod_gets_no_dynamic_credential_unless_the_policy_allows_it() {
    let pg = Postgres::start();
    let policy = tessera_tests::db_policy("10m", "0.7", "5s")
        + "  - name: db-batch
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: orders } }
    ttl: 10m
    callers: { unbound: allow }
  - name: config
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/config } }
";
    let env = Env::start_with(&policy, options(IdentitySource::JwksFile, false)).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    env.bao.put("shop/config", &json!({ "mode": "blue" })).await;
    let cluster = env.kube.as_ref().unwrap();
    // `kubectl create token`: valid, but bound to no pod.
    let unbound = cluster.token("shop", "orders", "tessera", None, 600);

    let refused = env.fetch(&unbound, &["db"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("binding `db` gives its leased credentials only to tokens bound to a pod")
            && refused.message().contains("callers: { unbound: allow }"),
        "{}",
        refused.message()
    );
    assert!(
        env.bao.leases("database/creds/orders").is_empty(),
        "Vault was not asked"
    );
    // A KV secret has no lease to outlive the caller: served.
    assert_eq!(
        env.fetch(&unbound, &["config"]).await.unwrap().credentials[0].fields["mode"],
        b"blue".to_vec()
    );
    // Where the policy allows unbound callers, the lease lives its TTL,
    // recorded and counted for the service account: past
    // leases.maxPerPodBinding (2) the oldest is revoked.
    let mut logins = Vec::new();
    for _ in 0..3 {
        let allowed = env.fetch(&unbound, &["db-batch"]).await.unwrap();
        let credential = &allowed.credentials[0];
        logins.push((
            String::from_utf8(credential.fields["username"].clone()).unwrap(),
            String::from_utf8(credential.fields["password"].clone()).unwrap(),
        ));
    }
    assert_eq!(env.bao.leases("database/creds/orders").len(), 2);
    // (Records know their issue time to the second: of two issued within
    // one, either counts as the older.)
    let alive: Vec<bool> = logins.iter().map(|(u, p)| pg.can_login(u, p)).collect();
    assert_eq!(alive.iter().filter(|a| **a).count(), 2, "{alive:?}");
    assert!(alive[2], "the newest is kept");
    let counted = env
        .bao
        .list("tessera-leases/clusters/test-1/serviceaccounts");
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(counted[0].contains("/shop_orders_"), "{counted:?}");
    // A token bound to the pod gets `db` as always.
    cluster.add_pod("shop", "orders-0", "orders", &[]);
    let bound = cluster.token("shop", "orders", "tessera", Some("orders-0"), 600);
    assert_eq!(
        env.fetch(&bound, &["db"]).await.unwrap().credentials.len(),
        1
    );
}
