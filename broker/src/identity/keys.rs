//! Token signing keys: parsing a JWKS, and the places keys come from (a file,
//! or the cluster's OIDC discovery), each refreshed when a token names an
//! unknown key id, at most once per interval.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// How often an unknown `kid` may trigger a re-read of a JWKS file.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        /// The JWKS file that could not be read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The document is not a JWKS with at least one usable key.
    #[error("JWKS {origin} is invalid: {detail}")]
    Invalid {
        /// The file or URL.
        origin: String,
        /// What is wrong.
        detail: String,
    },
    /// The API server could not be asked.
    #[error("OIDC discovery from the API server failed: {0}")]
    Discovery(String),
}

/// The two algorithms Kubernetes signs service-account tokens with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl Alg {
    /// The algorithm's name as JOSE writes it (`ES256`, `RS256`).
    pub fn name(self) -> &'static str {
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

/// A public signature key from a JWKS.
#[derive(Clone)]
pub struct Key {
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

    /// Whether `sig` is this key's signature of `message` under `alg`.
    pub fn verify(&self, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
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

/// The keys that fit a token header.
fn select(keys: &[Key], kid: Option<&str>, alg: Alg) -> Vec<Key> {
    keys.iter()
        .filter(|k| k.fits(alg) && (kid.is_none() || k.kid.as_deref() == kid))
        .cloned()
        .collect()
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
pub fn parse_jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
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

struct Cached {
    keys: Vec<Key>,
    fetched_at: Instant,
}

/// Keys loaded from a JWKS file, re-read (rate limited) when a token names an
/// unknown `kid`, so a rotated cluster signing key is picked up without restart.
pub struct JwksFile {
    path: PathBuf,
    state: Mutex<Cached>,
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
            state: Mutex::new(Cached {
                keys,
                fetched_at: Instant::now(),
            }),
        })
    }

    fn read(path: &Path) -> Result<Vec<Key>, JwksError> {
        let bytes = std::fs::read(path).map_err(|source| JwksError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse_jwks(&bytes).map_err(|detail| JwksError::Invalid {
            origin: path.display().to_string(),
            detail,
        })
    }

    /// Candidate keys for a token header; re-reads the file once per interval
    /// when none matches.
    pub fn keys_for(&self, kid: Option<&str>, alg: Alg) -> Vec<Key> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let found = select(&state.keys, kid, alg);
        if !found.is_empty() || state.fetched_at.elapsed() < REFRESH_MIN_INTERVAL {
            return found;
        }
        state.fetched_at = Instant::now();
        match Self::read(&self.path) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "reloaded JWKS for an unknown key id");
                state.keys = keys;
                select(&state.keys, kid, alg)
            }
            Err(error) => {
                tracing::warn!(%error, "JWKS reload failed; keeping the loaded keys");
                found
            }
        }
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// Keys from the API server's OIDC discovery (`/.well-known/openid-configuration`,
/// then its `jwks_uri`), fetched through the kube client, cached, and
/// refreshed (rate limited) when a token names an unknown `kid`.
pub struct OidcKeys {
    client: kube::Client,
    min_refresh: Duration,
    state: tokio::sync::Mutex<Cached>,
}

impl OidcKeys {
    /// Fetches the keys once; warns when the discovered issuer differs from
    /// the configured one (tokens would then fail the `iss` check).
    ///
    /// # Errors
    /// When discovery or the JWKS fetch fails.
    pub async fn discover(
        client: kube::Client,
        issuer: &str,
        min_refresh: Duration,
    ) -> Result<Self, JwksError> {
        let (discovered, keys) = fetch(&client).await?;
        if discovered != issuer {
            tracing::warn!(
                discovered,
                configured = issuer,
                "the cluster's issuer differs from identity.issuer"
            );
        }
        Ok(Self {
            client,
            min_refresh,
            state: tokio::sync::Mutex::new(Cached {
                keys,
                fetched_at: Instant::now(),
            }),
        })
    }

    /// Candidate keys for a token header; refreshes at most once per
    /// `min_refresh` when none matches (the cluster rotated its signing key).
    pub async fn keys_for(&self, kid: Option<&str>, alg: Alg) -> Vec<Key> {
        let mut state = self.state.lock().await;
        let found = select(&state.keys, kid, alg);
        if !found.is_empty() || state.fetched_at.elapsed() < self.min_refresh {
            return found;
        }
        state.fetched_at = Instant::now();
        match fetch(&self.client).await {
            Ok((_, keys)) => {
                tracing::info!(
                    keys = keys.len(),
                    "refreshed the cluster JWKS for an unknown key id"
                );
                state.keys = keys;
                select(&state.keys, kid, alg)
            }
            Err(error) => {
                tracing::warn!(%error, "cluster JWKS refresh failed; keeping the cached keys");
                found
            }
        }
    }
}

async fn get(client: &kube::Client, path: &str) -> Result<String, JwksError> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| JwksError::Discovery(format!("{path}: {e}")))?;
    client
        .request_text(request)
        .await
        .map_err(|e| JwksError::Discovery(format!("GET {path}: {e}")))
}

async fn fetch(client: &kube::Client) -> Result<(String, Vec<Key>), JwksError> {
    let text = get(client, "/.well-known/openid-configuration").await?;
    let discovery: Discovery = serde_json::from_str(&text)
        .map_err(|e| JwksError::Discovery(format!("openid-configuration: {e}")))?;
    // The API server serves its JWKS itself; use the path of `jwks_uri`
    // against it, whatever public host the URI names.
    let uri: http::Uri = discovery
        .jwks_uri
        .parse()
        .map_err(|e| JwksError::Discovery(format!("jwks_uri `{}`: {e}", discovery.jwks_uri)))?;
    let path = uri
        .path_and_query()
        .map_or("/openid/v1/jwks", |p| p.as_str());
    let jwks = get(client, path).await?;
    let keys = parse_jwks(jwks.as_bytes()).map_err(|detail| JwksError::Invalid {
        origin: discovery.jwks_uri.clone(),
        detail,
    })?;
    Ok((discovery.issuer, keys))
}
