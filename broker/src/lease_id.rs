//! [`LeaseId`]: Vault's id of a lease, or a certificate's serial number. A
//! lease id lets anyone with a Vault token renew or revoke the lease, so it
//! never appears in logs, errors or the audit trail: those name a lease by the
//! SHA-256 of its id ([`LeaseId::digest`]), which an operator can match against
//! Vault's own audit log by hashing its `lease_id`.

use ring::digest;
use serde::{Deserialize, Serialize};

/// A Vault lease id (database) or certificate serial (PKI). Its `Debug`
/// shows the start of its digest, never the id.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    /// The id Vault gave.
    pub fn new(id: String) -> Self {
        Self(id)
    }

    /// The id, for the Vault request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the id, in hex.
    pub fn digest(&self) -> String {
        lease_digest(&self.0)
    }

    /// Short, stable name of the credential: the first 12 hex digits of the
    /// digest.
    pub fn version(&self) -> String {
        let mut digest = self.digest();
        digest.truncate(12);
        digest
    }
}

impl std::fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseId(sha256:{}…)", self.version())
    }
}

/// SHA-256 of a lease id, in hex.
pub fn lease_digest(lease_id: &str) -> String {
    digest::digest(&digest::SHA256, lease_id.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_a_digest_not_the_id() {
        let id = LeaseId::new("database/creds/orders/AbCdEf123".to_owned());
        let shown = format!("{id:?}");
        assert!(!shown.contains("AbCdEf123"), "{shown}");
        assert!(shown.contains(&id.version()), "{shown}");
        assert_eq!(id.digest().len(), 64);
        assert_eq!(
            lease_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
