//! Compact JWS parsing and the claim checks for projected service-account
//! tokens. Pure functions: keys and time come from the caller.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;

use super::{Expectations, Identity, ObjectRef, TokenError, keys::Alg};

/// Longest token accepted; Kubernetes tokens are about 1 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `exp - iat` accepted: a year and a day covers kube-apiserver's
/// `--service-account-extend-token-expiration` (one year), nothing longer.
const MAX_TOKEN_LIFETIME_SECS: u64 = 366 * 24 * 3600;

/// A token split and its header checked, signature not yet verified.
pub struct Parsed<'a> {
    /// The algorithm (RS256 or ES256 only).
    pub alg: Alg,
    /// The header's key id.
    pub kid: Option<String>,
    /// `header.claims`, the signed bytes.
    pub signed: &'a str,
    /// The signature bytes, decoded from base64url.
    pub signature: Vec<u8>,
    claims_b64: &'a str,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    /// Extensions the signer says must be understood (RFC 7515 §4.1.11).
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: u64,
    nbf: Option<u64>,
    iat: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ObjectRef,
    pod: Option<ObjectRef>,
    node: Option<ObjectRef>,
}

fn decode(part: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed(what))
}

/// Splits a token and checks its header; refuses every algorithm but RS256
/// and ES256 before any key is looked at.
///
/// # Errors
/// [`TokenError::Malformed`], [`TokenError::InvalidJson`] or
/// [`TokenError::UnsupportedAlgorithm`].
pub fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header: Header = serde_json::from_slice(&decode(header_b64, "header is not base64url")?)
        .map_err(|e| TokenError::InvalidJson {
            part: "header",
            detail: e.to_string(),
        })?;
    // The broker understands no JOSE extension, so any `crit` (even an empty
    // list, which the RFC forbids) means the token cannot be accepted.
    if header.crit.is_some() {
        return Err(TokenError::Malformed(
            "header lists critical extensions (`crit`) the broker does not understand",
        ));
    }
    let alg = match header.alg.as_str() {
        "RS256" => Alg::Rs256,
        "ES256" => Alg::Es256,
        other => {
            let shown: String = other.chars().take(16).collect();
            return Err(TokenError::UnsupportedAlgorithm(shown));
        }
    };
    Ok(Parsed {
        alg,
        kid: header.kid,
        signed: &token[..header_b64.len() + 1 + claims_b64.len()],
        signature: decode(sig_b64, "signature is not base64url")?,
        claims_b64,
    })
}

fn claims(parsed: &Parsed<'_>) -> Result<Claims, TokenError> {
    serde_json::from_slice(&decode(parsed.claims_b64, "claims are not base64url")?).map_err(|e| {
        TokenError::InvalidJson {
            part: "claims",
            detail: e.to_string(),
        }
    })
}

/// Checks the claims of a token whose signature was verified, as of `now`.
///
/// # Errors
/// The first claim check that failed.
pub fn check_claims(
    parsed: &Parsed<'_>,
    expect: &Expectations,
    now: u64,
) -> Result<Identity, TokenError> {
    let claims = claims(parsed)?;
    let leeway = expect.leeway.as_secs();
    if claims.iss != expect.issuer {
        return Err(TokenError::WrongIssuer(
            claims.iss.chars().take(128).collect(),
        ));
    }
    let audience_ok = match &claims.aud {
        Audience::One(aud) => expect.audiences.contains(aud),
        Audience::Many(auds) => auds.iter().any(|a| expect.audiences.contains(a)),
    };
    if !audience_ok {
        return Err(TokenError::WrongAudience(expect.audiences.join(", ")));
    }
    if claims.exp.saturating_add(leeway) <= now {
        return Err(TokenError::Expired(claims.exp));
    }
    let lifetime = claims.exp.saturating_sub(claims.iat);
    if lifetime > MAX_TOKEN_LIFETIME_SECS {
        return Err(TokenError::LifetimeTooLong(lifetime));
    }
    for (claim, at) in [("nbf", claims.nbf), ("iat", Some(claims.iat))] {
        if let Some(at) = at
            && at > now.saturating_add(leeway)
        {
            return Err(TokenError::NotYetValid { claim, at });
        }
    }
    let k8s = claims.kubernetes;
    let expected_sub = format!(
        "system:serviceaccount:{}:{}",
        k8s.namespace, k8s.serviceaccount.name
    );
    if claims.sub != expected_sub || k8s.namespace.is_empty() || k8s.serviceaccount.name.is_empty()
    {
        return Err(TokenError::SubjectMismatch);
    }
    Ok(Identity {
        namespace: k8s.namespace,
        service_account: k8s.serviceaccount.name,
        service_account_uid: k8s.serviceaccount.uid,
        pod: k8s.pod,
        node: k8s.node,
        pod_labels: None,
        expires_at: claims.exp,
    })
}

/// `exp` of a token the API server already authenticated (TokenReview), read
/// without a signature check.
pub fn expiry_unverified(parsed: &Parsed<'_>) -> Option<u64> {
    #[derive(Deserialize)]
    struct Exp {
        exp: u64,
    }
    let bytes = decode(parsed.claims_b64, "claims").ok()?;
    serde_json::from_slice::<Exp>(&bytes).ok().map(|e| e.exp)
}
