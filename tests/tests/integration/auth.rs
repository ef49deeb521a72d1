//! Every malformed or untrusted token gets UNAUTHENTICATED, through the real
//! broker. One named test per attack.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::hmac;
use serde_json::{Value, json};
use tessera_broker::dev::{SigningKey, TokenSpec};
use tessera_proto::v1::WhoAmIRequest;
use tessera_tests::{Env, simple_policy, with_token};
use tonic::Code;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn env() -> Env {
    Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await
}

async fn who_am_i(env: &Env, token: &str) -> Result<(), tonic::Status> {
    env.client()
        .await
        .who_am_i(with_token(token, WhoAmIRequest {}))
        .await
        .map(|_| ())
}

async fn assert_unauthenticated(env: &Env, token: &str) {
    let status = who_am_i(env, token)
        .await
        .expect_err("the broker must refuse this token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

fn header(env: &Env) -> Value {
    json!({ "alg": "ES256", "kid": env.signer.kid() })
}

fn claims() -> Value {
    TokenSpec::new("shop", "orders").claims()
}

fn b64(value: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(value)
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_es256_and_rs256_tokens_are_accepted() {
    let env = env().await;
    who_am_i(&env, &env.token("shop", "orders")).await.unwrap();
    let rs256 = env.rsa_signer.mint(&TokenSpec::new("shop", "orders"));
    who_am_i(&env, &rs256).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_token_is_unauthenticated() {
    let env = env().await;
    let status = env
        .client()
        .await
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_signature_is_unauthenticated() {
    let env = env().await;
    // Signed by a key the broker does not trust, but claiming the trusted kid.
    let other = SigningKey::generate_es256().unwrap();
    assert_unauthenticated(&env, &other.sign(&header(&env), &claims())).await;
    // A trusted signature with the claims swapped afterwards.
    let good = env.token("shop", "orders");
    let mut evil = claims();
    evil["kubernetes.io"]["namespace"] = json!("kube-system");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(evil.to_string().as_bytes()),
        parts[2]
    );
    assert_unauthenticated(&env, &tampered).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_is_unauthenticated() {
    let env = env().await;
    let mut spec = TokenSpec::new("shop", "orders");
    spec.issued_at = Some(now() - 7200);
    spec.ttl = std::time::Duration::from_secs(600);
    assert_unauthenticated(&env, &env.signer.mint(&spec)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn not_yet_valid_token_is_unauthenticated() {
    let env = env().await;
    let mut spec = TokenSpec::new("shop", "orders");
    spec.issued_at = Some(now() + 3600);
    assert_unauthenticated(&env, &env.signer.mint(&spec)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_audience_is_unauthenticated() {
    let env = env().await;
    let mut spec = TokenSpec::new("shop", "orders");
    spec.audience = "https://kubernetes.default.svc".into();
    assert_unauthenticated(&env, &env.signer.mint(&spec)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_issuer_is_unauthenticated() {
    let env = env().await;
    let mut spec = TokenSpec::new("shop", "orders");
    spec.issuer = "https://evil.example".into();
    assert_unauthenticated(&env, &env.signer.mint(&spec)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alg_none_is_unauthenticated() {
    let env = env().await;
    let unsigned = format!(
        "{}.{}.",
        b64(json!({ "alg": "none", "kid": env.signer.kid() })
            .to_string()
            .as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    assert_unauthenticated(&env, &unsigned).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hs256_is_unauthenticated() {
    let env = env().await;
    // The classic confusion attack: HMAC keyed with the public JWKS.
    let signing_input = format!(
        "{}.{}",
        b64(json!({ "alg": "HS256", "kid": env.signer.kid() })
            .to_string()
            .as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, env.signer.jwks().to_string().as_bytes());
    let mac = hmac::sign(&key, signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64(mac.as_ref()));
    assert_unauthenticated(&env, &token).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_kubernetes_claims_are_unauthenticated() {
    let env = env().await;
    let mut without = claims();
    without.as_object_mut().unwrap().remove("kubernetes.io");
    assert_unauthenticated(&env, &env.signer.sign(&header(&env), &without)).await;
    let mut without_sa = claims();
    without_sa["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("serviceaccount");
    assert_unauthenticated(&env, &env.signer.sign(&header(&env), &without_sa)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mistyped_kubernetes_claims_are_unauthenticated() {
    let env = env().await;
    let mut mistyped = claims();
    mistyped["kubernetes.io"]["namespace"] = json!(42);
    assert_unauthenticated(&env, &env.signer.sign(&header(&env), &mistyped)).await;
    let mut mistyped_pod = claims();
    mistyped_pod["kubernetes.io"]["pod"] = json!("orders-0");
    assert_unauthenticated(&env, &env.signer.sign(&header(&env), &mistyped_pod)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subject_that_disagrees_with_claims_is_unauthenticated() {
    let env = env().await;
    let mut claims = claims();
    claims["sub"] = json!("system:serviceaccount:kube-system:admin");
    assert_unauthenticated(&env, &env.signer.sign(&header(&env), &claims)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_unauthenticated() {
    let env = env().await;
    for token in ["", "a.b", "a.b.c.d", "!!!.???.###", &"x".repeat(15_000)] {
        assert_unauthenticated(&env, token).await;
    }
}
