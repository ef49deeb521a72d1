//! Lease handles: what a pod holds so that any broker replica can resume,
//! renew or revoke its credential without replica-local state. A handle is
//! the credential's metadata, MACed (HMAC-SHA256, ring) with a key the
//! replicas share, and bound to the pod UID it was issued to: another pod
//! presenting it is refused.

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

/// What a handle says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// The binding.
    #[serde(rename = "b")]
    pub binding: String,
    /// The pod UID it was issued to.
    #[serde(rename = "p")]
    pub pod_uid: String,
    /// Vault lease id (database), certificate serial (PKI), or empty (KV).
    #[serde(rename = "l")]
    pub lease: String,
    /// The credential version.
    #[serde(rename = "v")]
    pub version: String,
    /// Issued at, Unix seconds.
    #[serde(rename = "i")]
    pub issued_at: u64,
    /// Not after, Unix seconds (0 when Vault is asked instead).
    #[serde(rename = "n")]
    pub not_after: u64,
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

/// The MAC key shared by the broker replicas.
pub struct HandleKey(hmac::Key);

/// Errors loading the handle key.
#[derive(Debug, thiserror::Error)]
pub enum HandleKeyError {
    /// The file could not be read.
    #[error("cannot read the lease handle key {path}: {source}")]
    Read {
        /// The file.
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
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
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
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref())))
    }

    /// Seals a handle: `base64url(json).base64url(mac)`.
    pub fn seal(&self, handle: &Handle) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(handle).unwrap_or_default());
        let tag = hmac::sign(&self.0, body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Opens a handle presented for `binding` by the pod `pod_uid`.
    ///
    /// # Errors
    /// [`HandleError::Invalid`] for a forged or malformed handle,
    /// [`HandleError::NotYours`] for one issued to another pod or binding.
    pub fn open(&self, text: &str, binding: &str, pod_uid: &str) -> Result<Handle, HandleError> {
        let invalid = || HandleError::Invalid(binding.to_owned());
        let (body, tag) = text.split_once('.').ok_or_else(invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        hmac::verify(&self.0, body.as_bytes(), &tag).map_err(|_| invalid())?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| invalid())?;
        let handle: Handle = serde_json::from_slice(&json).map_err(|_| invalid())?;
        if handle.binding != binding || handle.pod_uid != pod_uid || pod_uid.is_empty() {
            return Err(HandleError::NotYours(binding.to_owned()));
        }
        Ok(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> Handle {
        Handle {
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
        let sealed = key.seal(&handle());
        assert_eq!(key.open(&sealed, "db", "uid-1").unwrap(), handle());
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
    fn forged_or_foreign_handles_are_invalid() {
        let key = HandleKey::generate().unwrap();
        let other = HandleKey::generate().unwrap();
        let sealed = other.seal(&handle());
        assert_eq!(
            key.open(&sealed, "db", "uid-1"),
            Err(HandleError::Invalid("db".into()))
        );
        let mut tampered = handle();
        tampered.pod_uid = "uid-2".into();
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered).unwrap()),
            key.seal(&handle()).split_once('.').unwrap().1
        );
        assert_eq!(
            key.open(&forged, "db", "uid-2"),
            Err(HandleError::Invalid("db".into()))
        );
        for garbage in ["", ".", "a.b", "!!!.???"] {
            assert!(key.open(garbage, "db", "uid-1").is_err());
        }
    }
}
