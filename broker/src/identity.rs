//! Verifies projected Kubernetes service-account tokens (JWTs) against a JWKS.
//!
//! Only RS256 and ES256 are accepted, the two algorithms Kubernetes signs with.
//! The signature math is ring's; this module parses the compact JWS, picks the
//! key, and checks `iss`, `aud`, `exp`, `nbf`, `iat` and the `kubernetes.io`
//! claims. `jsonwebtoken` was not used: its ring-based 9.x line carries
//! CVE-2026-25537 and 10+ offers only aws-lc or RustCrypto backends.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

use crate::secret::Secret;

/// Longest token accepted; Kubernetes tokens are about 1 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `exp - iat` accepted: a year and a day covers kube-apiserver's
/// `--service-account-extend-token-expiration` (one year), nothing longer.
const MAX_TOKEN_LIFETIME_SECS: u64 = 366 * 24 * 3600;
/// How often an unknown `kid` may trigger a re-read of the JWKS file.
const JWKS_RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// A verified workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service-account name.
    pub service_account: String,
    /// Service-account UID.
    pub service_account_uid: String,
    /// Pod name and UID, when the token is bound to a pod.
    pub pod: Option<ObjectRef>,
    /// Node name and UID, when the token carries them.
    pub node: Option<ObjectRef>,
    /// The pod's labels, when the broker looked the pod up (TokenReview or pod
    /// lookup); `None` from a JWKS check alone.
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// When the token expires (seconds since the Unix epoch).
    pub expires_at: u64,
}

/// A name and UID pair from the `kubernetes.io` claims.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ObjectRef {
    /// Object name.
    pub name: String,
    /// Object UID.
    pub uid: String,
}

/// Why a token was not accepted. Every variant maps to `UNAUTHENTICATED`.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, or longer than the limit.
    #[error("token is not a compact JWS (header.payload.signature): {0}")]
    Malformed(&'static str),
    /// The header or claims are not valid JSON of the expected shape.
    #[error("token {part} is invalid: {detail}")]
    InvalidJson {
        /// `header` or `claims`.
        part: &'static str,
        /// What serde said, naming the field.
        detail: String,
    },
    /// `alg` is not RS256 or ES256 (`none`, HS256 and the rest are refused).
    #[error("token algorithm `{0}` is not accepted (only RS256 and ES256)")]
    UnsupportedAlgorithm(String),
    /// No key in the JWKS matches the token's `kid` and algorithm.
    #[error("no key in the JWKS matches kid `{kid}` for {alg}")]
    UnknownKey {
        /// The token's key id, or `-` when absent.
        kid: String,
        /// The token's algorithm.
        alg: &'static str,
    },
    /// The signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// `iss` is not the configured issuer.
    #[error("token issuer `{0}` is not the trusted issuer")]
    WrongIssuer(String),
    /// `aud` does not contain the broker's audience.
    #[error("token audience does not include `{0}`: request a projected token with this audience")]
    WrongAudience(String),
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired at {0} (unix seconds)")]
    Expired(u64),
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not valid yet: {claim} is {at} (unix seconds)")]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// The claim's value.
        at: u64,
    },
    /// `exp - iat` is longer than any Kubernetes token lives (a forged or
    /// legacy token).
    #[error("token lifetime of {0} s exceeds the accepted maximum of one year")]
    LifetimeTooLong(u64),
    /// `sub` does not match the `kubernetes.io` namespace and service account.
    #[error("token subject does not match its kubernetes.io claims")]
    SubjectMismatch,
}

/// Errors loading a JWKS.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not a JWKS with at least one usable key.
    #[error("JWKS {path} is invalid: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// What a token must satisfy besides its signature.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// Required `iss`.
    pub issuer: String,
    /// Audience that `aud` must contain: the broker's own.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

#[derive(Clone)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point (0x04 || x || y).
    P256(Vec<u8>),
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    material: KeyMaterial,
}

impl Key {
    fn fits(&self, alg: Alg) -> bool {
        matches!(
            (&self.material, alg),
            (KeyMaterial::Rsa { .. }, Alg::Rs256) | (KeyMaterial::P256(_), Alg::Es256)
        )
    }

    fn verify(&self, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
        match (&self.material, alg) {
            (KeyMaterial::Rsa { n, e }, Alg::Rs256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            (KeyMaterial::P256(point), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parses a JWKS document, keeping the RSA and P-256 signature keys and
/// skipping others (a cluster JWKS may list keys of other types).
fn parse_jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for (index, value) in set.keys.into_iter().enumerate() {
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("keys[{index}]: {e}"))?;
        if jwk.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let b64 = |field: &Option<String>, name: &str| {
            let text = field
                .as_deref()
                .ok_or_else(|| format!("keys[{index}]: missing `{name}`"))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|_| format!("keys[{index}]: `{name}` is not base64url"))
        };
        let material = match (jwk.kty.as_str(), jwk.alg.as_deref()) {
            ("RSA", None | Some("RS256")) => KeyMaterial::Rsa {
                n: b64(&jwk.n, "n")?,
                e: b64(&jwk.e, "e")?,
            },
            ("EC", None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => {
                let (x, y) = (b64(&jwk.x, "x")?, b64(&jwk.y, "y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!("keys[{index}]: P-256 coordinates must be 32 bytes"));
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::P256(point)
            }
            _ => continue,
        };
        keys.push(Key {
            kid: jwk.kid,
            material,
        });
    }
    if keys.is_empty() {
        return Err("no RS256 or ES256 signature key in `keys`".to_owned());
    }
    Ok(keys)
}

/// Keys loaded from a JWKS file, re-read (rate limited) when a token names an
/// unknown `kid`, so a rotated cluster signing key is picked up without restart.
pub struct JwksFile {
    path: PathBuf,
    state: Mutex<JwksState>,
}

struct JwksState {
    keys: Vec<Key>,
    loaded_at: Instant,
}

impl JwksFile {
    /// Loads the JWKS file.
    ///
    /// # Errors
    /// When the file cannot be read or holds no usable key.
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let keys = Self::read(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(JwksState {
                keys,
                loaded_at: Instant::now(),
            }),
        })
    }

    fn read(path: &Path) -> Result<Vec<Key>, JwksError> {
        let bytes = std::fs::read(path).map_err(|source| JwksError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse_jwks(&bytes).map_err(|detail| JwksError::Invalid {
            path: path.to_owned(),
            detail,
        })
    }

    /// Candidate keys for a token header; re-reads the file once per interval
    /// when none matches.
    fn keys_for(&self, kid: Option<&str>, alg: Alg) -> Vec<Key> {
        let select = |keys: &[Key]| -> Vec<Key> {
            keys.iter()
                .filter(|k| k.fits(alg) && (kid.is_none() || k.kid.as_deref() == kid))
                .cloned()
                .collect()
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let found = select(&state.keys);
        if !found.is_empty() || state.loaded_at.elapsed() < JWKS_RELOAD_MIN_INTERVAL {
            return found;
        }
        state.loaded_at = Instant::now();
        match Self::read(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "reloaded JWKS for an unknown key id");
                state.keys = keys;
                select(&state.keys)
            }
            Err(error) => {
                tracing::warn!(%error, "JWKS reload failed; keeping the loaded keys");
                found
            }
        }
    }
}

/// Most verified tokens remembered; past it, expired entries are dropped and,
/// if that is not enough, the cache starts over.
const MAX_CACHED_TOKENS: usize = 100_000;

/// Verifies tokens: signature against a [`JwksFile`], then claims. Verified
/// tokens are remembered by SHA-256 digest until they expire, so the hot path
/// does no signature work twice.
pub struct Verifier {
    jwks: JwksFile,
    expect: Expectations,
    cache: Mutex<HashMap<[u8; 32], Identity>>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
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

impl Verifier {
    /// A verifier over the given keys and expectations.
    pub fn new(jwks: JwksFile, expect: Expectations) -> Self {
        Self {
            jwks,
            expect,
            cache: Mutex::default(),
        }
    }

    /// Verifies a token at the current time, from the cache when this exact
    /// token was verified before and has not expired.
    ///
    /// # Errors
    /// A [`TokenError`] naming the first check that failed.
    pub fn verify(&self, token: &Secret) -> Result<Identity, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut key = [0u8; 32];
        key.copy_from_slice(
            ring::digest::digest(&ring::digest::SHA256, token.expose_secret()).as_ref(),
        );
        let leeway = self.expect.leeway.as_secs();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(identity) = cache.get(&key)
                && identity.expires_at.saturating_add(leeway) > now
            {
                return Ok(identity.clone());
            }
        }
        let identity = self.verify_at(token, now)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_TOKENS {
            cache.retain(|_, id| id.expires_at.saturating_add(leeway) > now);
            if cache.len() >= MAX_CACHED_TOKENS {
                cache.clear();
            }
        }
        cache.insert(key, identity.clone());
        Ok(identity)
    }

    /// Verifies a token as of `now` (seconds since the Unix epoch).
    ///
    /// # Errors
    /// A [`TokenError`] naming the first check that failed.
    pub fn verify_at(&self, token: &Secret, now: u64) -> Result<Identity, TokenError> {
        let token = token
            .expose_str()
            .ok_or(TokenError::Malformed("not UTF-8"))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("longer than 16 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let decode = |part: &str, what| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| TokenError::Malformed(what))
        };
        let header: Header =
            serde_json::from_slice(&decode(header_b64, "header is not base64url")?).map_err(
                |e| TokenError::InvalidJson {
                    part: "header",
                    detail: e.to_string(),
                },
            )?;
        let alg = match header.alg.as_str() {
            "RS256" => Alg::Rs256,
            "ES256" => Alg::Es256,
            other => {
                let shown: String = other.chars().take(16).collect();
                return Err(TokenError::UnsupportedAlgorithm(shown));
            }
        };
        let signature = decode(sig_b64, "signature is not base64url")?;
        let signed = &token[..header_b64.len() + 1 + claims_b64.len()];
        let keys = self.jwks.keys_for(header.kid.as_deref(), alg);
        if keys.is_empty() {
            return Err(TokenError::UnknownKey {
                kid: header
                    .kid
                    .map_or_else(|| "-".to_owned(), |k| k.chars().take(64).collect()),
                alg: alg.name(),
            });
        }
        if !keys
            .iter()
            .any(|key| key.verify(alg, signed.as_bytes(), &signature))
        {
            return Err(TokenError::BadSignature);
        }
        let claims: Claims =
            serde_json::from_slice(&decode(claims_b64, "claims are not base64url")?).map_err(
                |e| TokenError::InvalidJson {
                    part: "claims",
                    detail: e.to_string(),
                },
            )?;
        self.check_claims(claims, now)
    }

    fn check_claims(&self, claims: Claims, now: u64) -> Result<Identity, TokenError> {
        let leeway = self.expect.leeway.as_secs();
        if claims.iss != self.expect.issuer {
            return Err(TokenError::WrongIssuer(
                claims.iss.chars().take(128).collect(),
            ));
        }
        let audience_ok = match &claims.aud {
            Audience::One(aud) => *aud == self.expect.audience,
            Audience::Many(auds) => auds.contains(&self.expect.audience),
        };
        if !audience_ok {
            return Err(TokenError::WrongAudience(self.expect.audience.clone()));
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
        if claims.sub != expected_sub
            || k8s.namespace.is_empty()
            || k8s.serviceaccount.name.is_empty()
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
}

#[cfg(test)]
mod tests;
