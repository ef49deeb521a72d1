//! Identity from the cluster: OIDC discovery, TokenReview and pod lookup.
//!
//! No Kubernetes API server can be had on this machine, so these tests run the
//! broker (a real process, with its real kube client) against an in-process
//! HTTPS server that speaks the API's JSON with k8s-openapi types
//! (`tessera_tests::kube_api`). Vault is the real OpenBao.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_broker::dev::{SigningKey, TokenSpec};
use tessera_proto::v1::{FetchRequest, WhoAmIRequest};
use tessera_tests::{Env, EnvOptions, IdentitySource, simple_policy, wait_for, with_token};
use tonic::Code;

fn uid(token_spec: &TokenSpec) -> String {
    token_spec.claims()["kubernetes.io"]["pod"]["uid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_discovery_verifies_tokens_and_follows_key_rotation() {
    let options = EnvOptions {
        kube_api: true,
        identity_source: IdentitySource::OidcDiscovery,
        ..EnvOptions::default()
    };
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    let api = env.kube.as_ref().unwrap();
    assert_eq!(
        api.calls("GET /.well-known/openid-configuration"),
        1,
        "discovered at start"
    );
    let mut client = env.client().await;
    client
        .who_am_i(with_token(&env.token("shop", "orders"), WhoAmIRequest {}))
        .await
        .unwrap();

    // The cluster rotates its signing key: the broker refetches on the unknown kid.
    let rotated = SigningKey::generate_es256().unwrap();
    std::fs::write(
        env.dir.path().join("dev/jwks.json"),
        rotated.jwks().to_string(),
    )
    .unwrap();
    let token = rotated.mint(&TokenSpec::new("shop", "orders"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .who_am_i(with_token(&token, WhoAmIRequest {}))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the rotated key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        api.calls("GET /openid/v1/jwks") >= 2,
        "the JWKS was refetched"
    );

    // A token of the retired key no longer verifies (after the cache entry ages out
    // it would fail; a fresh token of the old key fails at once).
    let status = client
        .who_am_i(with_token(
            &env.signer.mint(&TokenSpec::new("shop", "orders")),
            WhoAmIRequest {},
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_review_with_pod_lookup_grants_by_label_and_refuses_deleted_pods() {
    let options = EnvOptions {
        kube_api: true,
        identity_source: IdentitySource::TokenReview,
        pod_lookup: true,
        ..EnvOptions::default()
    };
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: gold\n    subjects: [{ namespace: shop, serviceAccount: orders, podLabels: { tier: gold } }]\n    source: { kv2: { mount: secret, path: shop/gold } }\n";
    let env = Env::start_with(&policy, options).await;
    env.bao
        .put("shop/gold", &json!({ "key": "gold-value" }))
        .await;
    let api = env.kube.as_ref().unwrap();
    let spec = TokenSpec::new("shop", "orders");
    api.add_pod("shop", "orders-0", &uid(&spec), &[("tier", "gold")]);
    let token = env.signer.mint(&spec);
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
    assert!(api.calls("POST tokenreviews") >= 1);
    assert!(api.calls("GET pods/shop/orders-0") >= 1);

    // A pod without the label is not granted `gold`.
    let mut silver = TokenSpec::new("shop", "orders");
    silver.pod = Some("orders-1".into());
    api.add_pod("shop", "orders-1", &uid(&silver), &[("tier", "silver")]);
    let status = client
        .fetch(with_token(
            &env.signer.mint(&silver),
            FetchRequest {
                bindings: vec!["gold".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The pod is deleted: once the 1s cache entry ages out, its token is refused.
    api.delete_pod("shop", "orders-0");
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

    // A forged token is rejected by the API server's review.
    let forged = SigningKey::generate_es256()
        .unwrap()
        .mint(&TokenSpec::new("shop", "orders"));
    let status = client
        .who_am_i(with_token(&forged, WhoAmIRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_of_a_deleted_pod_are_revoked_even_when_its_sidecar_was_killed() {
    let pg = tessera_tests::Postgres::start();
    let options = EnvOptions {
        kube_api: true,
        pod_lookup: true,
        ..EnvOptions::default()
    };
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: db
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: orders } }
    ttl: 1m
";
    let env = Env::start_with(policy, options).await;
    env.bao.database_role(&pg, "orders", "60s", "120s");
    let api = env.kube.as_ref().unwrap();
    let spec = TokenSpec::new("shop", "orders");
    api.add_pod("shop", "orders-0", &uid(&spec), &[]);
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
    api.delete_pod("shop", "orders-0");
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
