//! Lease handles: what a pod holds so that any broker replica can resume,
//! renew or revoke its credential without replica-local state. A handle is
//! the credential's metadata sealed with ChaCha20-Poly1305 (ring) under a key
//! derived from the one the replicas share: nobody but the broker can read
//! the Vault lease id in it or forge one, and it is bound to the pod UID it
//! was issued to: another pod presenting it is refused.

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf, hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

/// A sealed lease handle, as the pod holds it. Its `Debug` shows only its
/// length: it is opaque, but no less a bearer of the lease than the lease id.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Handle(String);

impl Handle {
    /// A handle as presented by a pod.
    pub fn presented(text: &str) -> Self {
        Self(text.to_owned())
    }

    /// The text sent to the pod.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether there is no handle (KV credentials carry none).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handle({} bytes)", self.0.len())
    }
}

/// What a handle says.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The binding the handle was issued for; a handle presented for another is refused.
    #[serde(rename = "b")]
    pub binding: String,
    /// The pod UID it was issued to.
    #[serde(rename = "p")]
    pub pod_uid: String,
    /// Vault lease id (database), certificate serial (PKI), or empty (KV).
    #[serde(rename = "l")]
    pub lease: String,
    /// The version of the credential the pod holds; resuming compares it.
    #[serde(rename = "v")]
    pub version: String,
    /// Issued at, Unix seconds.
    #[serde(rename = "i")]
    pub issued_at: u64,
    /// Not after, Unix seconds (0 when Vault is asked instead).
    #[serde(rename = "n")]
    pub not_after: u64,
}

impl std::fmt::Debug for Claims {
    /// The lease id is a bearer of the lease: only its digest is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("binding", &self.binding)
            .field("pod_uid", &self.pod_uid)
            .field("lease", &crate::lease_id::LeaseId::new(self.lease.clone()))
            .field("version", &self.version)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Why a presented handle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    /// Not a handle, or its MAC does not verify (forged or from another deployment).
    #[error("the lease handle for `{0}` is not valid (not issued by this broker deployment)")]
    Invalid(String),
    /// Issued to another pod, or for another binding.
    #[error("the lease handle for `{0}` belongs to another pod or binding")]
    NotYours(String),
}

/// The sealing key shared by the broker replicas, and the keys it replaced.
pub struct HandleKey {
    key: LessSafeKey,
    /// Verifies handles of the first format (JSON in the clear, HMAC-SHA256
    /// over the raw key), which sidecars may still hold after an upgrade:
    /// they are accepted until their lease is next rotated, never issued.
    legacy: hmac::Key,
    random: SystemRandom,
    /// Keys this one replaced: what they sealed still opens (until it
    /// expires and the operator drops them); nothing new is sealed with them.
    retired: Vec<HandleKey>,
}

/// Prefix of sealed handles (a version, so the format can change).
const SEALED_PREFIX: &str = "v2.";
/// What the sealing key is derived for (HKDF info), and the AEAD's associated data.
const CONTEXT: &[u8] = b"tessera lease handle v2";

/// Why the handle key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum HandleKeyError {
    /// The file could not be read.
    #[error("cannot read the lease handle key {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Shorter than 32 bytes.
    #[error("the lease handle key {0} must hold at least 32 bytes")]
    TooShort(String),
    /// The system random source failed.
    #[error("cannot generate a lease handle key")]
    Random,
}

impl HandleKey {
    /// Loads the shared key (at least 32 bytes; e.g. a Kubernetes Secret).
    ///
    /// # Errors
    /// When the file cannot be read or is too short.
    pub fn load(path: &Path) -> Result<Self, HandleKeyError> {
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| {
            HandleKeyError::Read {
                path: path.display().to_string(),
                source,
            }
        })?);
        if bytes.len() < 32 {
            return Err(HandleKeyError::TooShort(path.display().to_string()));
        }
        Self::derive(&bytes)
    }

    /// Loads the current key and the keys it replaced (`retired`, newest
    /// first): handles are sealed with the current key and open with any.
    ///
    /// # Errors
    /// When a file cannot be read or is too short.
    pub fn load_rotated(
        current: &Path,
        retired: &[std::path::PathBuf],
    ) -> Result<Self, HandleKeyError> {
        let mut key = Self::load(current)?;
        for path in retired {
            key.retired.push(Self::load(path)?);
        }
        Ok(key)
    }

    /// The AEAD key for `secret` (the shared file's bytes), by HKDF-SHA256.
    fn derive(secret: &[u8]) -> Result<Self, HandleKeyError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tessera").extract(secret);
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        prk.expand(&[CONTEXT], &CHACHA20_POLY1305)
            .and_then(|okm| okm.fill(bytes.as_mut()))
            .map_err(|_| HandleKeyError::Random)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes.as_ref())
            .map_err(|_| HandleKeyError::Random)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            legacy: hmac::Key::new(hmac::HMAC_SHA256, secret),
            random: SystemRandom::new(),
            retired: Vec::new(),
        })
    }

    /// A random key, for a single replica: its handles die with the process.
    ///
    /// # Errors
    /// When the system random source fails.
    pub fn generate() -> Result<Self, HandleKeyError> {
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| HandleKeyError::Random)?;
        Self::derive(bytes.as_ref())
    }

    /// Seals a handle: `v2.base64url(nonce || ciphertext || tag)`, the
    /// plaintext being the handle's JSON. Empty when the system's random
    /// source fails (the pod then holds no handle and gets a fresh
    /// credential on reconnect).
    pub fn seal(&self, claims: &Claims) -> Handle {
        let mut nonce = [0u8; NONCE_LEN];
        if self.random.fill(&mut nonce).is_err() {
            tracing::error!("the system random source failed; the lease handle is left empty");
            return Handle::default();
        }
        let mut sealed = nonce.to_vec();
        let mut body = serde_json::to_vec(claims).unwrap_or_default();
        let sealed_ok = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(CONTEXT),
            &mut body,
        );
        if sealed_ok.is_err() {
            return Handle::default();
        }
        sealed.extend_from_slice(&body);
        Handle(format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// Opens a handle presented for `binding` by the pod `pod_uid`.
    ///
    /// # Errors
    /// [`HandleError::Invalid`] for a forged or malformed handle,
    /// [`HandleError::NotYours`] for one issued to another pod or binding.
    pub fn open(
        &self,
        handle: &Handle,
        binding: &str,
        pod_uid: &str,
    ) -> Result<Claims, HandleError> {
        match self.open_with_this_key(handle, binding, pod_uid) {
            Err(HandleError::Invalid(_)) if !self.retired.is_empty() => self
                .retired
                .iter()
                .map(|key| key.open_with_this_key(handle, binding, pod_uid))
                .find(|opened| !matches!(opened, Err(HandleError::Invalid(_))))
                .unwrap_or_else(|| Err(HandleError::Invalid(binding.to_owned()))),
            opened => opened,
        }
    }

    /// Opens a handle with this key alone (not the retired ones).
    fn open_with_this_key(
        &self,
        handle: &Handle,
        binding: &str,
        pod_uid: &str,
    ) -> Result<Claims, HandleError> {
        let invalid = || HandleError::Invalid(binding.to_owned());
        let text = handle.as_str();
        let handle: Claims = match text.strip_prefix(SEALED_PREFIX) {
            Some(encoded) => {
                let mut sealed = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| invalid())?;
                if sealed.len() < NONCE_LEN + aead::MAX_TAG_LEN {
                    return Err(invalid());
                }
                let mut body = sealed.split_off(NONCE_LEN);
                let nonce = Nonce::try_assume_unique_for_key(&sealed).map_err(|_| invalid())?;
                let json = self
                    .key
                    .open_in_place(nonce, Aad::from(CONTEXT), &mut body)
                    .map_err(|_| invalid())?;
                serde_json::from_slice(json).map_err(|_| invalid())?
            }
            None => {
                let (body, tag) = text.split_once('.').ok_or_else(invalid)?;
                let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
                hmac::verify(&self.legacy, body.as_bytes(), &tag).map_err(|_| invalid())?;
                let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| invalid())?;
                serde_json::from_slice(&json).map_err(|_| invalid())?
            }
        };
        if handle.binding != binding || handle.pod_uid != pod_uid || pod_uid.is_empty() {
            return Err(HandleError::NotYours(binding.to_owned()));
        }
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            binding: "db".into(),
            pod_uid: "uid-1".into(),
            lease: "database/creds/orders/abc".into(),
            version: "v1".into(),
            issued_at: 10,
            not_after: 0,
        }
    }

    #[test]
    fn sealed_handles_open_only_for_their_pod_and_binding() {
        let key = HandleKey::generate().unwrap();
        let sealed = key.seal(&claims());
        assert_eq!(key.open(&sealed, "db", "uid-1").unwrap(), claims());
        assert_eq!(
            key.open(&sealed, "db", "uid-2"),
            Err(HandleError::NotYours("db".into()))
        );
        assert_eq!(
            key.open(&sealed, "other", "uid-1"),
            Err(HandleError::NotYours("other".into()))
        );
    }

    #[test]
    fn handles_of_the_first_format_still_open_after_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        let key = HandleKey::load(&path).unwrap();
        // What the broker issued before handles were sealed.
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]),
            body.as_bytes(),
        );
        let legacy = format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        assert_eq!(
            key.open(&Handle::presented(&legacy), "db", "uid-1")
                .unwrap(),
            claims()
        );
        let forged = format!("{body}.{}", URL_SAFE_NO_PAD.encode([0u8; 32]));
        assert_eq!(
            key.open(&Handle::presented(&forged), "db", "uid-1"),
            Err(HandleError::Invalid("db".into()))
        );
    }

    #[test]
    fn handles_do_not_show_the_lease_id() {
        let key = HandleKey::generate().unwrap();
        let sealed = key.seal(&claims());
        let decoded = URL_SAFE_NO_PAD
            .decode(sealed.as_str().strip_prefix(SEALED_PREFIX).unwrap())
            .unwrap();
        let text = String::from_utf8_lossy(&decoded);
        assert!(!text.contains("database/creds"), "{text}");
        assert!(
            !sealed.as_str().contains("ZGF0YWJhc2"),
            "no base64 of the lease id"
        );
        assert_ne!(key.seal(&claims()), sealed, "a fresh nonce every time");
        let claims_shown = format!("{:?}", claims());
        assert!(!claims_shown.contains("database/creds"), "{claims_shown}");
        let shown = format!("{sealed:?}");
        assert!(!shown.contains(sealed.as_str()), "{shown}");
        assert!(shown.contains("bytes"), "{shown}");
    }

    #[test]
    fn handles_sealed_with_a_retired_key_still_open_and_new_ones_use_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let (old_path, new_path) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old_path, [1u8; 32]).unwrap();
        std::fs::write(&new_path, [2u8; 32]).unwrap();
        let old = HandleKey::load(&old_path).unwrap();
        let sealed_before = old.seal(&claims());
        let rotated = HandleKey::load_rotated(&new_path, std::slice::from_ref(&old_path)).unwrap();
        assert_eq!(
            rotated.open(&sealed_before, "db", "uid-1").unwrap(),
            claims()
        );
        assert_eq!(
            rotated.open(&sealed_before, "db", "uid-2"),
            Err(HandleError::NotYours("db".into())),
            "a retired key's handle is still bound to its pod"
        );
        let sealed_after = rotated.seal(&claims());
        assert!(
            old.open(&sealed_after, "db", "uid-1").is_err(),
            "sealed with the new key"
        );
        let new_only = HandleKey::load(&new_path).unwrap();
        assert_eq!(
            new_only.open(&sealed_before, "db", "uid-1"),
            Err(HandleError::Invalid("db".into())),
            "once the old key is dropped its handles no longer open"
        );
    }

    #[test]
    fn forged_or_foreign_handles_are_invalid() {
        let key = HandleKey::generate().unwrap();
        let other = HandleKey::generate().unwrap();
        let sealed = other.seal(&claims());
        assert_eq!(
            key.open(&sealed, "db", "uid-1"),
            Err(HandleError::Invalid("db".into()))
        );
        // A flipped byte anywhere makes the handle invalid, not another one.
        let sealed = key.seal(&claims());
        let mut bytes = URL_SAFE_NO_PAD
            .decode(sealed.as_str().strip_prefix(SEALED_PREFIX).unwrap())
            .unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let forged = format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(
            key.open(&Handle::presented(&forged), "db", "uid-1"),
            Err(HandleError::Invalid("db".into()))
        );
        for garbage in ["", ".", "a.b", "!!!.???", "v2.", "v2.AAAA"] {
            assert!(
                key.open(&Handle::presented(garbage), "db", "uid-1")
                    .is_err()
            );
        }
    }
}
