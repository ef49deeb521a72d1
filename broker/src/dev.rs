//! DEVELOPMENT ONLY: a signing key, its JWKS, TLS certificates and tokens shaped
//! exactly like Kubernetes projected service-account tokens, for the demo and
//! the tests. A real cluster signs tokens itself; never point a production
//! broker at keys made here.

use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use ring::{
    digest,
    rand::{SecureRandom, SystemRandom},
    signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents},
};
use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
use serde_json::{Value, json};

use crate::secret::Secret;

/// Issuer that dev tokens carry by default (the in-cluster API server's).
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Audience that dev tokens carry by default (the broker's).
pub const DEFAULT_AUDIENCE: &str = "tessera";

/// File names inside a dev directory.
pub mod files {
    /// PKCS#8 PEM signing key (mode 0600).
    pub const SIGNING_KEY: &str = "signing-key.pem";
    /// The JWKS the broker verifies with.
    pub const JWKS: &str = "jwks.json";
    /// CA certificate that signed the broker's serving certificate.
    pub const CA: &str = "ca.pem";
    /// The broker's serving certificate.
    pub const TLS_CERT: &str = "tls.crt";
    /// The broker's serving key (mode 0600).
    pub const TLS_KEY: &str = "tls.key";
    /// A client certificate for mTLS, signed by the same CA.
    pub const CLIENT_CERT: &str = "client.crt";
    /// The client certificate's key (mode 0600).
    pub const CLIENT_KEY: &str = "client.key";
    /// The key that seals lease handles, shared by broker replicas (mode 0600).
    pub const HANDLE_KEY: &str = "handle.key";
}

/// Why the dev tooling could not make or write its files.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file that could not be written.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key is not a PKCS#8 P-256 or RSA private key.
    #[error("signing key is not a PKCS#8 P-256 or RSA (2048+ bit) private key")]
    BadKey,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
}

enum Pair {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// A token signing key (ES256 or RS256).
pub struct SigningKey {
    pair: Pair,
    kid: String,
    pkcs8: Secret,
}

impl SigningKey {
    /// Generates a fresh P-256 (ES256) key.
    ///
    /// # Errors
    /// When the system random source fails.
    pub fn generate_es256() -> Result<Self, DevError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| DevError::BadKey)?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    /// Loads a PKCS#8 key (P-256 or RSA) from PEM.
    ///
    /// # Errors
    /// When the PEM holds no usable PKCS#8 key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, DevError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| DevError::BadKey)?;
        Self::from_pkcs8(der.secret_pkcs8_der().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, DevError> {
        let rng = SystemRandom::new();
        let pair = if let Ok(pair) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
        {
            Pair::Es256(pair)
        } else {
            Pair::Rs256(RsaKeyPair::from_pkcs8(&pkcs8).map_err(|_| DevError::BadKey)?)
        };
        let public: Vec<u8> = match &pair {
            Pair::Es256(p) => p.public_key().as_ref().to_vec(),
            Pair::Rs256(p) => p.public_key().as_ref().to_vec(),
        };
        let kid = URL_SAFE_NO_PAD.encode(&digest::digest(&digest::SHA256, &public).as_ref()[..16]);
        Ok(Self {
            pair,
            kid,
            pkcs8: Secret::new(pkcs8),
        })
    }

    /// The key id put in token headers and the JWKS.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWT algorithm name of this key.
    pub fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Es256(_) => "ES256",
            Pair::Rs256(_) => "RS256",
        }
    }

    /// The private key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Secret {
        let body = base64::engine::general_purpose::STANDARD.encode(self.pkcs8.expose_secret());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Secret::from(pem)
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> Value {
        let jwk = match &self.pair {
            Pair::Es256(p) => {
                let point = p.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
            Pair::Rs256(p) => {
                let parts = RsaPublicKeyComponents::<Vec<u8>>::from(p.public());
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                    "n": URL_SAFE_NO_PAD.encode(&parts.n),
                    "e": URL_SAFE_NO_PAD.encode(&parts.e),
                })
            }
        };
        json!({ "keys": [jwk] })
    }

    /// Signs an arbitrary header and claims set. Tests use this to forge
    /// tokens; [`SigningKey::mint`] makes well-formed ones.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match &self.pair {
            Pair::Es256(p) => p
                .sign(&rng, signing_input.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
            Pair::Rs256(p) => {
                let mut sig = vec![0; p.public().modulus_len()];
                match p.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    signing_input.as_bytes(),
                    &mut sig,
                ) {
                    Ok(()) => sig,
                    Err(_) => Vec::new(),
                }
            }
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Mints a token for `spec`, with the header Kubernetes uses.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let header = json!({ "alg": self.alg(), "kid": self.kid });
        self.sign(&header, &spec.claims())
    }
}

/// What a dev token says: the claim layout of a projected service-account token.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    /// The token's issuer (`iss`).
    pub issuer: String,
    /// `aud` (one entry).
    pub audience: String,
    /// `kubernetes.io.namespace`.
    pub namespace: String,
    /// `kubernetes.io.serviceaccount.name`.
    pub service_account: String,
    /// `kubernetes.io.pod.name`; `None` for a token not bound to a pod.
    pub pod: Option<String>,
    /// `kubernetes.io.node.name`; `None` to leave the node claim out.
    pub node: Option<String>,
    /// Lifetime from `iat` to `exp`.
    pub ttl: Duration,
    /// `iat` and `nbf`, seconds since the Unix epoch; `None` for now.
    pub issued_at: Option<u64>,
}

impl TokenSpec {
    /// A spec with the dev issuer and audience, a pod and node, and a 1h lifetime.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: Some(format!("{service_account}-0")),
            node: Some("dev-node".to_owned()),
            ttl: Duration::from_secs(3600),
            issued_at: None,
        }
    }

    /// The claims set, with UIDs derived from the names (stable across mints).
    pub fn claims(&self) -> Value {
        let iat = self.issued_at.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        let ns = &self.namespace;
        let uid = |kind: &str, name: &str| uid_for(&format!("{kind}/{ns}/{name}"));
        let mut k8s = json!({
            "namespace": ns,
            "serviceaccount": { "name": self.service_account, "uid": uid("sa", &self.service_account) },
        });
        if let Some(pod) = &self.pod {
            k8s["pod"] = json!({ "name": pod, "uid": uid("pod", pod) });
        }
        if let Some(node) = &self.node {
            k8s["node"] = json!({ "name": node, "uid": uid_for(&format!("node/{node}")) });
        }
        let mut jti = [0u8; 16];
        // A failing random source leaves a zero jti, which only weakens a dev token.
        let _ = SystemRandom::new().fill(&mut jti);
        json!({
            "iss": self.issuer,
            "aud": [self.audience],
            "sub": format!("system:serviceaccount:{ns}:{}", self.service_account),
            "iat": iat,
            "nbf": iat,
            "exp": iat + self.ttl.as_secs(),
            "jti": format_uuid(&jti),
            "kubernetes.io": k8s,
        })
    }
}

fn uid_for(seed: &str) -> String {
    let hash = digest::digest(&digest::SHA256, seed.as_bytes());
    format_uuid(&hash.as_ref()[..16])
}

fn format_uuid(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Writes a secret (token, key) to `path` with mode 0600, replacing the file
/// by rename so a reader never sees it half written.
///
/// # Errors
/// When the file cannot be written.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), DevError> {
    write_file(path, bytes, 0o600)
}

/// Replaces `path` with `bytes`, with `mode`, at once.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DevError> {
    tessera_atomic_file::replace(path, bytes, mode).map_err(|source| DevError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Creates a dev directory: signing key + JWKS, and a CA with a serving
/// certificate for `hosts` (DNS names or IP addresses), a client certificate
/// for mTLS, and a lease handle key.
///
/// # Errors
/// When a file cannot be written or a certificate cannot be made.
pub fn init(dir: &Path, hosts: &[String]) -> Result<(), DevError> {
    fs::create_dir_all(dir).map_err(|source| DevError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let key = SigningKey::generate_es256()?;
    write_file(
        &dir.join(files::SIGNING_KEY),
        key.to_pem().expose_secret(),
        0o600,
    )?;
    write_file(
        &dir.join(files::JWKS),
        key.jwks().to_string().as_bytes(),
        0o644,
    )?;
    let mut handle_key = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(handle_key.as_mut())
        .map_err(|_| DevError::BadKey)?;
    write_file(&dir.join(files::HANDLE_KEY), handle_key.as_ref(), 0o600)?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        DnType::CommonName,
        "Tessera dev CA (do not trust in production)",
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(hosts.to_vec())?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "tessera-broker (dev)");
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(vec!["tessera-sidecar.dev".to_owned()])?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "tessera-sidecar (dev)");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    write_file(&dir.join(files::CA), ca_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &dir.join(files::CLIENT_CERT),
        client_cert.pem().as_bytes(),
        0o644,
    )?;
    write_file(
        &dir.join(files::CLIENT_KEY),
        client_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &dir.join(files::TLS_CERT),
        server_cert.pem().as_bytes(),
        0o644,
    )?;
    write_file(
        &dir.join(files::TLS_KEY),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(())
}
