//! The audit trail names the pod for every outcome and never holds a secret or
//! a token; rate limits answer RESOURCE_EXHAUSTED with retry information.

use std::process::Command;

use serde_json::{Value, json};
use tessera_proto::v1::{FetchRequest, RevokeRequest, WhoAmIRequest};
use tessera_tests::{
    Env, EnvOptions, TEST_CLUSTER, binary, random_string, simple_policy, with_token,
};
use tonic::Code;
use tonic_types::StatusExt;

fn find<'a>(events: &'a [Value], action: &str, outcome: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["action"] == action && e["outcome"] == outcome)
        .unwrap_or_else(|| panic!("no {action}/{outcome} event in {events:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_outcome_is_audited_with_the_pod_and_without_secrets() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let secret = random_string(32);
    env.bao
        .put("shop/orders", &json!({ "password": secret }))
        .await;
    let mut client = env.client().await;
    let token = env.token("shop", "orders");

    client
        .fetch(with_token(
            &token,
            FetchRequest {
                bindings: vec!["app".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let denied = env.token("shop", "billing");
    client
        .fetch(with_token(
            &denied,
            FetchRequest {
                bindings: vec!["app".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    let forged = format!("{}x", &token[..token.len() - 1]);
    client
        .who_am_i(with_token(&forged, WhoAmIRequest {}))
        .await
        .unwrap_err();
    client
        .revoke(with_token(
            &token,
            RevokeRequest {
                bindings: vec!["app".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    let events = env.audit_events();
    let issued = find(&events, "issue", "success");
    assert_eq!(issued["namespace"], "shop");
    assert_eq!(issued["service_account"], "orders");
    assert_eq!(issued["pod_name"], "orders-0");
    assert!(issued["pod_uid"].as_str().is_some_and(|u| u.len() == 36));
    assert_eq!(issued["node"], "dev-node");
    assert_eq!(issued["binding"], "app");
    assert_eq!(issued["source"], "kv2 secret/shop/orders");
    assert_eq!(issued["version"], "1");
    assert_eq!(issued["policy_generation"], 1);
    assert!(
        issued["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );

    let refused = find(&events, "issue", "denied");
    assert_eq!(refused["service_account"], "billing");
    assert_eq!(refused["binding"], "app");
    assert!(refused["reason"].as_str().unwrap().contains("not granted"));

    let unauthenticated = find(&events, "authenticate", "denied");
    assert!(
        unauthenticated["reason"]
            .as_str()
            .unwrap()
            .contains("signature")
    );
    assert!(
        unauthenticated.get("namespace").is_none(),
        "an unverified token names nobody"
    );

    let revoked = find(&events, "revoke", "success");
    assert_eq!(revoked["binding"], "app");

    let raw = std::fs::read_to_string(env.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        !raw.contains(&secret),
        "a secret value reached the audit log"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(!raw.contains(signature), "a token reached the audit log");

    // `tessera-broker audit` answers "who got binding app".
    let output = Command::new(binary("tessera-broker"))
        .args([
            "audit",
            "--binding",
            "app",
            "--since",
            "2000-01-01T00:00:00Z",
        ])
        .arg(env.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        table.lines().count(),
        2,
        "header and one delivery:\n{table}"
    );
    assert!(table.contains("shop/orders\torders-0 ("), "{table}");
    let none = Command::new(binary("tessera-broker"))
        .args([
            "audit",
            "--binding",
            "app",
            "--until",
            "2000-01-01T00:00:00Z",
        ])
        .arg(env.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(none.stdout).unwrap().lines().count(),
        1,
        "only the header"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_callers_get_resource_exhausted_with_retry_info() {
    let options = EnvOptions {
        rate_limit: (1, 3),
        ..EnvOptions::default()
    };
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    let mut client = env.client().await;
    let token = env.token("shop", "orders");
    let mut limited = None;
    for _ in 0..10 {
        if let Err(status) = client.who_am_i(with_token(&token, WhoAmIRequest {})).await {
            limited = Some(status);
            break;
        }
    }
    let status = limited.expect("the burst of 3 is exhausted within 10 calls");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    assert!(retry.retry_delay.is_some_and(|d| d.as_millis() <= 1000));

    // Another pod has its own bucket.
    let other = env.signer.mint(&{
        let mut spec = tessera_broker::dev::TokenSpec::new("shop", "orders");
        spec.pod = Some("orders-1".into());
        spec
    });
    client
        .who_am_i(with_token(&other, WhoAmIRequest {}))
        .await
        .unwrap();
    let event = env
        .audit_events()
        .into_iter()
        .find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("rate limit"))
        })
        .expect("the limit is audited");
    assert_eq!(event["pod_name"], "orders-0");
}

#[tokio::test(flavor = "multi_thread")]
async fn vaults_own_audit_log_names_the_pod() {
    // A database credential: every one is a Vault request made for the pod.
    // (KV secrets are served from the replica's warm copy, read by the
    // broker for no pod in particular.)
    let pg = tessera_tests::Postgres::start();
    let env = Env::start(&tessera_tests::db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let log = env.bao.audit_log.clone();
    env.bao.cli(&[
        "write",
        "sys/config/auditing/request-headers/x-tessera-caller",
        "hmac=false",
    ]);

    env.fetch(&env.token("shop", "orders"), &["db"])
        .await
        .unwrap();

    let pod_uid = env.audit_events()[0]["pod_uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = std::fs::read_to_string(&log).unwrap();
    let stamped: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            entry["type"] == "request"
                && entry["request"]["operation"] == "read"
                && entry["request"]["path"] == "database/creds/orders"
        })
        .collect();
    assert!(!stamped.is_empty(), "Vault audited the read:\n{text}");
    let header = &stamped[0]["request"]["headers"]["x-tessera-caller"][0];
    assert_eq!(
        header.as_str(),
        Some(format!("{TEST_CLUSTER}/shop/orders/orders-0/{pod_uid}").as_str()),
        "{}",
        stamped[0]
    );
}

/// Found while putting every refusal on one path: a TTL below the policy's
/// floor and an oversized `Revoke` were refused without an audit line.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_a_narrowed_ttl_and_of_an_oversized_revoke_are_audited() {
    use tessera_proto::v1::Held;
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: tls
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { pki: { mount: pki, role: pods, commonName: \"{{ pod }}.shop\" } }
    ttl: 1h
";
    let env = Env::start(policy).await;
    env.bao.pki_role("2h");
    let token = env.token("shop", "orders");
    let mut client = env.client().await;
    let refused = client
        .fetch(with_token(
            &token,
            FetchRequest {
                bindings: vec!["tls".to_owned()],
                max_ttl_seconds: [("tls".to_owned(), 60)].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let held: Vec<Held> = (0..65)
        .map(|n| Held {
            binding: "tls".to_owned(),
            handle: format!("handle-{n}"),
        })
        .collect();
    let oversized = client
        .revoke(with_token(
            &token,
            RevokeRequest {
                bindings: Vec::new(),
                held,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::InvalidArgument);

    let events = env.audit_events();
    let issue = find(&events, "issue", "denied");
    assert!(
        issue["reason"]
            .as_str()
            .unwrap()
            .contains("below the policy's floor 5m"),
        "{issue}"
    );
    assert_eq!(issue["pod_name"], "orders-0");
    assert_eq!(issue["policy_generation"], 1);
    let revoke = find(&events, "revoke", "denied");
    assert!(
        revoke["reason"].as_str().unwrap().contains("at most 64"),
        "{revoke}"
    );
    assert_eq!(events.len(), 2, "one line each: {events:#?}");
}
