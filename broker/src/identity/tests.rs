use serde_json::json;

use super::*;
use crate::dev::{SigningKey, TokenSpec};

const NOW: u64 = 1_800_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    signer: SigningKey,
    verifier: Verifier,
}

fn fixture() -> Fixture {
    let signer = SigningKey::generate_es256().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, signer.jwks().to_string()).unwrap();
    let verifier = Verifier::new(
        JwksFile::load(&path).unwrap(),
        Expectations {
            issuer: crate::dev::DEFAULT_ISSUER.into(),
            audience: crate::dev::DEFAULT_AUDIENCE.into(),
            leeway: Duration::from_secs(30),
        },
    );
    Fixture {
        _dir: dir,
        signer,
        verifier,
    }
}

fn spec() -> TokenSpec {
    let mut spec = TokenSpec::new("shop", "orders");
    spec.issued_at = Some(NOW - 60);
    spec
}

fn verify(f: &Fixture, token: String) -> Result<Identity, TokenError> {
    f.verifier.verify_at(&Secret::from(token), NOW)
}

#[test]
fn accepts_a_kubernetes_shaped_token() {
    let f = fixture();
    let identity = verify(&f, f.signer.mint(&spec())).unwrap();
    assert_eq!(identity.namespace, "shop");
    assert_eq!(identity.service_account, "orders");
    assert_eq!(identity.pod.unwrap().name, "orders-0");
    assert_eq!(identity.node.unwrap().name, "dev-node");
}

#[test]
fn leeway_applies_to_expiry_and_not_before() {
    let f = fixture();
    let mut s = spec();
    s.issued_at = Some(NOW - 3600 - 20);
    assert!(
        verify(&f, f.signer.mint(&s)).is_ok(),
        "expired 20s ago is within 30s leeway"
    );
    s.issued_at = Some(NOW - 3600 - 31);
    assert!(matches!(
        verify(&f, f.signer.mint(&s)),
        Err(TokenError::Expired(_))
    ));
    s.issued_at = Some(NOW + 20);
    assert!(verify(&f, f.signer.mint(&s)).is_ok());
    s.issued_at = Some(NOW + 31);
    assert!(matches!(
        verify(&f, f.signer.mint(&s)),
        Err(TokenError::NotYetValid { .. })
    ));
}

#[test]
fn each_failure_names_its_cause() {
    let f = fixture();
    let header = json!({ "alg": "ES256", "kid": f.signer.kid() });
    let mut s = spec();
    s.audience = "other".into();
    assert!(matches!(
        verify(&f, f.signer.mint(&s)),
        Err(TokenError::WrongAudience(_))
    ));
    let mut s = spec();
    s.issuer = "other".into();
    assert!(matches!(
        verify(&f, f.signer.mint(&s)),
        Err(TokenError::WrongIssuer(_))
    ));

    let none = json!({ "alg": "none" });
    assert!(matches!(
        verify(&f, f.signer.sign(&none, &spec().claims())),
        Err(TokenError::UnsupportedAlgorithm(a)) if a == "none"
    ));
    let unknown_kid = json!({ "alg": "ES256", "kid": "nope" });
    assert!(matches!(
        verify(&f, f.signer.sign(&unknown_kid, &spec().claims())),
        Err(TokenError::UnknownKey { .. })
    ));
    let stranger = SigningKey::generate_es256().unwrap();
    assert!(matches!(
        verify(&f, stranger.sign(&header, &spec().claims())),
        Err(TokenError::BadSignature)
    ));
    let mut claims = spec().claims();
    claims["kubernetes.io"]["serviceaccount"]["name"] = json!(["orders"]);
    assert!(matches!(
        verify(&f, f.signer.sign(&header, &claims)),
        Err(TokenError::InvalidJson { part: "claims", .. })
    ));
    let mut claims = spec().claims();
    claims["sub"] = json!("system:serviceaccount:shop:admin");
    assert!(matches!(
        verify(&f, f.signer.sign(&header, &claims)),
        Err(TokenError::SubjectMismatch)
    ));
    assert!(matches!(
        verify(&f, "a.b".into()),
        Err(TokenError::Malformed(_))
    ));
}

#[test]
fn jwks_without_usable_keys_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
    assert!(matches!(
        JwksFile::load(&path),
        Err(JwksError::Invalid { .. })
    ));
    std::fs::write(&path, "not json").unwrap();
    assert!(matches!(
        JwksFile::load(&path),
        Err(JwksError::Invalid { .. })
    ));
}
