//! Verifies a caller's projected Kubernetes service-account token and turns it
//! into an [`Identity`]: against a JWKS file or the cluster's OIDC discovery
//! (signature with ring, then claims), or by asking the API server
//! (TokenReview); optionally looking the pod up for its labels.
//!
//! Only RS256 and ES256 are accepted, the two algorithms Kubernetes signs with.
//! `jsonwebtoken` was not used: its ring-based 9.x line carries CVE-2026-25537
//! and 10+ offers only aws-lc or RustCrypto backends.

mod jwt;
pub mod keys;
mod kube;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

pub use self::keys::{JwksError, JwksFile, OidcKeys};
pub use self::kube::is_completed;
use crate::secret::Secret;

/// A verified workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The namespace the token was issued in.
    pub namespace: String,
    /// The service account the token was issued for.
    pub service_account: String,
    /// The service account's UID: a recreated account with the same name gets a new one.
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
    /// The object's name in its namespace.
    pub name: String,
    /// The object's UID, which a recreated object of the same name does not share.
    pub uid: String,
}

/// Why a token was not accepted. Every variant but `Unavailable` maps to
/// `UNAUTHENTICATED`.
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
    /// The API server's TokenReview said no.
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    /// The token's pod no longer exists (or was replaced by another with the same name).
    #[error("pod `{0}` no longer exists")]
    PodGone(String),
    /// The API server could not be asked (TokenReview, pod lookup): retry.
    #[error("the Kubernetes API server cannot be reached ({0}); retry shortly")]
    Unavailable(String),
    /// `sub` does not match the `kubernetes.io` namespace and service account.
    #[error("token subject does not match its kubernetes.io claims")]
    SubjectMismatch,
}

/// What a token must satisfy besides its signature.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// Required `iss`.
    pub issuer: String,
    /// Audiences the broker accepts: `aud` must contain one of them.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Where tokens are checked.
pub enum Source {
    /// Signatures against a JWKS file.
    JwksFile(JwksFile),
    /// Signatures against the cluster's OIDC discovery keys.
    Oidc(OidcKeys),
    /// The API server's TokenReview.
    TokenReview(::kube::Client),
}

/// Most verified tokens remembered; past it, expired entries are dropped and,
/// if that is not enough, the cache starts over.
const MAX_CACHED_TOKENS: usize = 100_000;

struct CacheEntry {
    identity: Identity,
    /// Unix seconds until which the entry may be used.
    until: u64,
}

/// Where a pod is in its life, as the API server says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodLife {
    /// The pod exists and may still run containers.
    Running,
    /// The pod has completed (phase `Succeeded` or `Failed`): its containers
    /// will never run again, so its leases are owed back.
    Completed,
    /// The pod (with this UID) no longer exists.
    Gone,
}

/// Verifies tokens and remembers verified ones by SHA-256 digest until they
/// expire (or for `cache_ttl`, when set), so the hot path does no signature
/// work or API call twice.
pub struct Verifier {
    source: Source,
    expect: Expectations,
    pods: Option<::kube::Client>,
    cache_ttl: Option<Duration>,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    /// A verifier over `source` with `expect`.
    pub fn new(source: Source, expect: Expectations) -> Self {
        Self {
            source,
            expect,
            pods: None,
            cache_ttl: None,
            cache: Mutex::default(),
        }
    }

    /// Also look every token's pod up (labels for policy subjects; deleted
    /// pods refused at once).
    #[must_use]
    pub fn with_pod_lookup(mut self, client: ::kube::Client) -> Self {
        self.pods = Some(client);
        self
    }

    /// Remember a verified token at most this long (shorter than its expiry).
    #[must_use]
    pub fn with_cache_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Verifies a token now, from the cache when this exact token was
    /// verified recently.
    ///
    /// # Errors
    /// A [`TokenError`] naming the first check that failed.
    pub async fn verify(&self, token: &Secret) -> Result<Identity, TokenError> {
        let now = unix_now();
        let mut key = [0u8; 32];
        key.copy_from_slice(
            ring::digest::digest(&ring::digest::SHA256, token.expose_secret()).as_ref(),
        );
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = cache.get(&key)
                && entry.until > now
            {
                return Ok(entry.identity.clone());
            }
        }
        let identity = self.verify_at(token, now).await?;
        let mut until = identity
            .expires_at
            .saturating_add(self.expect.leeway.as_secs());
        if let Some(ttl) = self.cache_ttl {
            until = until.min(now.saturating_add(ttl.as_secs()));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_TOKENS {
            cache.retain(|_, entry| entry.until > now);
            if cache.len() >= MAX_CACHED_TOKENS {
                cache.clear();
            }
        }
        cache.insert(
            key,
            CacheEntry {
                identity: identity.clone(),
                until,
            },
        );
        Ok(identity)
    }

    /// Where the identity's pod is in its life: `None` without pod lookup
    /// (or when the API server cannot be asked).
    pub async fn pod_life(&self, identity: &Identity) -> Option<PodLife> {
        let client = self.pods.as_ref()?;
        identity.pod.as_ref()?;
        kube::pod_life(client, identity).await.ok()
    }

    /// Verifies a token as of `now` (seconds since the Unix epoch), without
    /// the cache.
    ///
    /// # Errors
    /// A [`TokenError`] naming the first check that failed.
    pub async fn verify_at(&self, token: &Secret, now: u64) -> Result<Identity, TokenError> {
        let mut identity = match &self.source {
            Source::TokenReview(client) => {
                let (identity, exp) = kube::review(client, token, &self.expect.audiences).await?;
                let exp = exp.ok_or(TokenError::InvalidJson {
                    part: "claims",
                    detail: "missing field `exp`".to_owned(),
                })?;
                if exp.saturating_add(self.expect.leeway.as_secs()) <= now {
                    return Err(TokenError::Expired(exp));
                }
                Identity {
                    expires_at: exp,
                    ..identity
                }
            }
            Source::JwksFile(_) | Source::Oidc(_) => {
                let text = token
                    .expose_str()
                    .ok_or(TokenError::Malformed("not UTF-8"))?;
                let parsed = jwt::parse(text)?;
                let kid = parsed.kid.as_deref();
                let candidates = match &self.source {
                    Source::JwksFile(file) => file.keys_for(kid, parsed.alg),
                    Source::Oidc(oidc) => oidc.keys_for(kid, parsed.alg).await,
                    Source::TokenReview(_) => Vec::new(),
                };
                if candidates.is_empty() {
                    return Err(TokenError::UnknownKey {
                        kid: kid.map_or_else(|| "-".to_owned(), |k| k.chars().take(64).collect()),
                        alg: parsed.alg.name(),
                    });
                }
                if !candidates
                    .iter()
                    .any(|key| key.verify(parsed.alg, parsed.signed.as_bytes(), &parsed.signature))
                {
                    return Err(TokenError::BadSignature);
                }
                jwt::check_claims(&parsed, &self.expect, now)?
            }
        };
        if let Some(client) = &self.pods {
            identity.pod_labels = kube::pod_labels(client, &identity).await?;
        }
        Ok(identity)
    }
}

#[cfg(test)]
pub(crate) mod tests;
