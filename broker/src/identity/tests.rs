use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::json;

use super::*;
use crate::dev::{SigningKey, TokenSpec};
use crate::fuzz::block_on;

const NOW: u64 = 1_800_000_000;

/// A verifier trusting one fresh ES256 key (the JWKS lives in `_dir`).
pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) signer: SigningKey,
    pub(crate) verifier: Verifier,
}

pub(crate) fn fixture() -> Fixture {
    let signer = SigningKey::generate_es256().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, signer.jwks().to_string()).unwrap();
    let verifier = Verifier::new(
        Source::JwksFile(JwksFile::load(&path).unwrap()),
        Expectations {
            issuer: crate::dev::DEFAULT_ISSUER.into(),
            audiences: vec![crate::dev::DEFAULT_AUDIENCE.into()],
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
    block_on(f.verifier.verify_at(&Secret::from(token), NOW))
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

/// A fixture trusting one ES256 and one RS256 key.
fn two_key_fixture() -> (Fixture, SigningKey) {
    let f = fixture();
    let rsa = SigningKey::from_pem(include_bytes!("../../testdata/rsa-test-key.pem")).unwrap();
    let mut keys = f.signer.jwks()["keys"].as_array().unwrap().clone();
    keys.extend(rsa.jwks()["keys"].as_array().unwrap().iter().cloned());
    let path = f._dir.path().join("jwks.json");
    std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
    let verifier = Verifier::new(
        Source::JwksFile(JwksFile::load(&path).unwrap()),
        f.verifier.expect.clone(),
    );
    (Fixture { verifier, ..f }, rsa)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn es_header(f: &Fixture) -> serde_json::Value {
    json!({ "alg": "ES256", "kid": f.signer.kid() })
}

/// Replaces the header of a well-signed token, keeping claims and signature.
fn with_raw_header(f: &Fixture, header: &str) -> String {
    let token = f.signer.mint(&spec());
    let rest = token.split_once('.').unwrap().1;
    format!("{}.{rest}", b64(header.as_bytes()))
}

/// Signs raw claims text (not a JSON value) with the trusted key.
fn signed_raw_claims(f: &Fixture, claims: &str) -> String {
    let token = f.signer.sign(&es_header(f), &json!({}));
    let header = token.split('.').next().unwrap();
    let input = format!("{header}.{}", b64(claims.as_bytes()));
    // Re-sign: mint over a value that serialises to `claims` is not possible
    // for invalid JSON, so sign the input with ring directly.
    let pkcs8 = f.signer.to_pem();
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pkcs8.expose_secret()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .unwrap();
    let sig = pair.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

fn claims_with(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut claims = spec().claims();
    edit(&mut claims);
    claims
}

/// One named test per hostile token: the verifier must refuse it with the
/// stated reason, and never panic.
macro_rules! hostile {
    ($($name:ident: |$f:ident, $rsa:ident| $token:expr => $pattern:pat,)+) => {$(
        #[test]
        fn $name() {
            let ($f, $rsa) = two_key_fixture();
            let _ = &$rsa;
            let token: String = $token;
            let result = verify(&$f, token);
            assert!(matches!(result, Err($pattern)), "{}: {result:?}", stringify!($name));
        }
    )+};
}

use rustls::pki_types::pem::PemObject;

hostile! {
    hostile_alg_none: |f, rsa| f.signer.sign(&json!({ "alg": "none", "kid": f.signer.kid() }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_alg_none_uppercase: |f, rsa| f.signer.sign(&json!({ "alg": "NONE" }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_alg_none_empty_signature: |f, rsa| format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(spec().claims().to_string().as_bytes())) => TokenError::UnsupportedAlgorithm(_),
    hostile_hs256_keyed_with_the_jwks: |f, rsa| {
        let input = format!("{}.{}", b64(br#"{"alg":"HS256"}"#), b64(spec().claims().to_string().as_bytes()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, f.signer.jwks().to_string().as_bytes());
        format!("{input}.{}", b64(ring::hmac::sign(&key, input.as_bytes()).as_ref()))
    } => TokenError::UnsupportedAlgorithm(_),
    hostile_hs512: |f, rsa| f.signer.sign(&json!({ "alg": "HS512" }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_rs512: |f, rsa| rsa.sign(&json!({ "alg": "RS512", "kid": rsa.kid() }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_es384: |f, rsa| f.signer.sign(&json!({ "alg": "ES384" }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_ps256: |f, rsa| f.signer.sign(&json!({ "alg": "PS256" }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_eddsa: |f, rsa| f.signer.sign(&json!({ "alg": "EdDSA" }), &spec().claims()) => TokenError::UnsupportedAlgorithm(_),
    hostile_missing_alg: |f, rsa| f.signer.sign(&json!({ "kid": f.signer.kid() }), &spec().claims()) => TokenError::InvalidJson { part: "header", .. },
    hostile_alg_not_a_string: |f, rsa| f.signer.sign(&json!({ "alg": 256 }), &spec().claims()) => TokenError::InvalidJson { part: "header", .. },
    hostile_header_is_an_array: |f, rsa| with_raw_header(&f, r#"["ES256"]"#) => TokenError::InvalidJson { part: "header", .. },
    hostile_header_not_json: |f, rsa| with_raw_header(&f, "ES256") => TokenError::InvalidJson { part: "header", .. },
    hostile_unknown_kid: |f, rsa| f.signer.sign(&json!({ "alg": "ES256", "kid": "not-a-key" }), &spec().claims()) => TokenError::UnknownKey { .. },
    hostile_kid_of_an_rsa_key_with_es256: |f, rsa| f.signer.sign(&json!({ "alg": "ES256", "kid": rsa.kid() }), &spec().claims()) => TokenError::UnknownKey { .. },
    hostile_kid_of_an_ec_key_with_rs256: |f, rsa| rsa.sign(&json!({ "alg": "RS256", "kid": f.signer.kid() }), &spec().claims()) => TokenError::UnknownKey { .. },
    hostile_untrusted_key_claiming_a_trusted_kid: |f, rsa| SigningKey::generate_es256().unwrap().sign(&es_header(&f), &spec().claims()) => TokenError::BadSignature,
    hostile_signature_of_other_claims: |f, rsa| {
        let good = f.signer.mint(&spec());
        let other = f.signer.mint(&TokenSpec::new("kube-system", "admin"));
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2])
    } => TokenError::BadSignature,
    hostile_truncated_signature: |f, rsa| {
        let t = f.signer.mint(&spec());
        let (input, sig) = t.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        format!("{input}.{}", b64(&raw[..raw.len() - 8]))
    } => TokenError::BadSignature,
    hostile_empty_signature: |f, rsa| { let t = f.signer.mint(&spec()); format!("{}.", t.rsplit_once('.').unwrap().0) } => TokenError::BadSignature,
    hostile_oversized: |f, rsa| format!("{}.{}.sig", b64(br#"{"alg":"ES256"}"#), "A".repeat(17_000)) => TokenError::Malformed(_),
    hostile_bad_base64_header: |f, rsa| format!("!!!.{}", f.signer.mint(&spec()).split_once('.').unwrap().1) => TokenError::Malformed(_),
    hostile_padded_base64: |f, rsa| { let t = f.signer.mint(&spec()); let (h, rest) = t.split_once('.').unwrap(); format!("{h}==.{rest}") } => TokenError::Malformed(_),
    hostile_bad_base64_signature: |f, rsa| { let t = f.signer.mint(&spec()); format!("{}.***", t.rsplit_once('.').unwrap().0) } => TokenError::Malformed(_),
    hostile_four_parts: |f, rsa| format!("{}.extra", f.signer.mint(&spec())) => TokenError::Malformed(_),
    hostile_whitespace_inside: |f, rsa| format!(" {}", f.signer.mint(&spec())) => TokenError::Malformed(_),
    hostile_claims_not_json: |f, rsa| signed_raw_claims(&f, "not json") => TokenError::InvalidJson { part: "claims", .. },
    hostile_duplicated_namespace_claim: |f, rsa| {
        let c = spec().claims().to_string().replacen(r#""namespace":"shop""#, r#""namespace":"shop","namespace":"kube-system""#, 1);
        signed_raw_claims(&f, &c)
    } => TokenError::InvalidJson { part: "claims", .. },
    hostile_nested_namespace_claim: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["kubernetes.io"]["namespace"] = json!({ "name": "shop" }))) => TokenError::InvalidJson { part: "claims", .. },
    hostile_missing_exp: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| { c.as_object_mut().unwrap().remove("exp"); })) => TokenError::InvalidJson { part: "claims", .. },
    hostile_exp_as_string: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["exp"] = json!((NOW + 600).to_string()))) => TokenError::InvalidJson { part: "claims", .. },
    hostile_negative_exp: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["exp"] = json!(-1))) => TokenError::InvalidJson { part: "claims", .. },
    hostile_missing_iat: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| { c.as_object_mut().unwrap().remove("iat"); })) => TokenError::InvalidJson { part: "claims", .. },
    hostile_exp_far_in_the_future: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["exp"] = json!(253_402_300_799u64))) => TokenError::LifetimeTooLong(_),
    hostile_audience_array_without_ours: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["aud"] = json!(["vault", "https://kubernetes.default.svc"]))) => TokenError::WrongAudience(_),
    hostile_empty_audience_array: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["aud"] = json!([]))) => TokenError::WrongAudience(_),
    hostile_audience_as_number: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["aud"] = json!(7))) => TokenError::InvalidJson { part: "claims", .. },
    hostile_issuer_with_trailing_slash: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["iss"] = json!(format!("{}/", crate::dev::DEFAULT_ISSUER)))) => TokenError::WrongIssuer(_),
    hostile_subject_of_another_account: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["sub"] = json!("system:serviceaccount:kube-system:admin"))) => TokenError::SubjectMismatch,
    hostile_empty_namespace: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| { c["kubernetes.io"]["namespace"] = json!(""); c["sub"] = json!("system:serviceaccount::orders"); })) => TokenError::SubjectMismatch,
    hostile_not_yet_valid: |f, rsa| f.signer.sign(&es_header(&f), &claims_with(|c| c["nbf"] = json!(NOW + 3600))) => TokenError::NotYetValid { claim: "nbf", .. },
    hostile_der_encoded_es256_signature: |f, rsa| {
        let t = f.signer.mint(&spec());
        let (input, sig) = t.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let mut der = vec![0x30, 0x44, 0x02, 0x20];
        der.extend_from_slice(&raw[..32]);
        der.extend_from_slice(&[0x02, 0x20]);
        der.extend_from_slice(&raw[32..]);
        format!("{input}.{}", b64(&der))
    } => TokenError::BadSignature,
}

#[test]
fn an_audience_array_containing_ours_is_accepted() {
    let (f, _) = two_key_fixture();
    let token = f.signer.sign(
        &es_header(&f),
        &claims_with(|c| c["aud"] = json!(["vault", crate::dev::DEFAULT_AUDIENCE])),
    );
    assert!(verify(&f, token).is_ok());
}

#[test]
fn rs256_tokens_verify() {
    let (f, rsa) = two_key_fixture();
    assert!(verify(&f, rsa.mint(&spec())).is_ok());
}

#[test]
fn jose_crit_extensions_are_refused() {
    let f = fixture();
    let claims = spec().claims();
    for crit in [json!(["exp"]), json!(["urn:example:unknown"]), json!([])] {
        let header = json!({ "alg": f.signer.alg(), "kid": f.signer.kid(), "crit": crit, "urn:example:unknown": true });
        let token = f.signer.sign(&header, &claims);
        assert!(
            matches!(verify(&f, token), Err(TokenError::Malformed(m)) if m.contains("crit")),
            "crit {crit}"
        );
    }
    let plain = json!({ "alg": f.signer.alg(), "kid": f.signer.kid() });
    assert!(verify(&f, f.signer.sign(&plain, &claims)).is_ok());
}
