//! Vault endpoints vaultrs lacks or makes lossy: dynamic database credentials
//! with their lease, PKI certificates, and `sys/leases` lookup, renew and
//! revoke.

use std::time::{Duration, SystemTime};

use rustify_derive::Endpoint;
use serde::{Deserialize, Serialize};
use vaultrs::api::{
    database::requests::GenerateCredentialsRequest, pki::requests::GenerateCertificateRequest,
};

use super::{Scope, Vault, VaultError, unbuildable};
use crate::secret::Secret;

/// `PUT sys/leases/lookup`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(path = "sys/leases/lookup", method = "PUT", response = "LeaseLookup")]
struct LookupLease {
    lease_id: String,
}

/// What `sys/leases/lookup` says of a lease.
#[derive(Debug, Deserialize, Serialize)]
pub struct LeaseLookup {
    /// Seconds left.
    pub ttl: u64,
    /// Whether it can be renewed.
    pub renewable: bool,
}

/// `LIST sys/leases/lookup/<prefix>`.
#[derive(Debug, Endpoint)]
#[endpoint(
    path = "sys/leases/lookup/{self.prefix}",
    method = "LIST",
    response = "LeaseKeys"
)]
struct ListLeases {
    #[endpoint(skip)]
    prefix: String,
}

/// The keys of a lease listing.
#[derive(Debug, Deserialize, Serialize)]
struct LeaseKeys {
    keys: Vec<String>,
}

/// `PUT sys/leases/renew`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(
    path = "sys/leases/renew",
    method = "PUT",
    response = "serde_json::Value"
)]
struct RenewLease {
    lease_id: String,
    increment: u64,
}

/// `PUT sys/leases/revoke`.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(path = "sys/leases/revoke", method = "PUT")]
struct RevokeLease {
    lease_id: String,
}

/// A leased credential as Vault issued it.
#[derive(Debug)]
pub struct Leased {
    /// Vault's lease id; only its digest is ever shown.
    pub lease_id: String,
    /// Lifetime granted.
    pub ttl: Duration,
    /// Whether Vault can extend it.
    pub renewable: bool,
    /// When Vault issued it (the broker's clock).
    pub issued: SystemTime,
    /// `username` and `password`, as `Secret`s (never printed).
    pub fields: std::collections::BTreeMap<String, Secret>,
}

/// A certificate as Vault's PKI issued it.
#[derive(Debug)]
pub struct Issued {
    /// Serial number (Vault's colon-separated hex).
    pub serial: String,
    /// When the certificate stops being valid.
    pub not_after: SystemTime,
    /// When Vault issued it (the broker's clock).
    pub issued: SystemTime,
    /// `certificate`, `private_key`, `ca` and `chain` (PEM).
    pub fields: std::collections::BTreeMap<String, Secret>,
}

impl Issued {
    /// A certificate as Vault's PKI answered, issued now: its `certificate`
    /// and issuing `ca` (the two PEM texts, in that order) and its `chain`
    /// joined; no private key.
    pub(super) fn certificate(
        serial: String,
        not_after: SystemTime,
        [certificate, ca]: [String; 2],
        chain: Option<Vec<String>>,
    ) -> Self {
        let chain = chain.unwrap_or_default().join("\n");
        Self {
            serial,
            not_after,
            issued: SystemTime::now(),
            fields: [
                ("certificate".to_owned(), Secret::from(certificate)),
                ("ca".to_owned(), Secret::from(ca)),
                ("chain".to_owned(), Secret::from(chain)),
            ]
            .into(),
        }
    }
}

impl Vault {
    /// New dynamic database credentials from `mount/creds/role`, keeping the lease.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn database_creds(
        &self,
        mount: &str,
        role: &str,
        scope: Scope<'_>,
    ) -> Result<Leased, VaultError> {
        let what = format!("{mount}/creds/{role}");
        let endpoint = GenerateCredentialsRequest::builder()
            .mount(mount)
            .name(role)
            .build()
            .map_err(unbuildable(&what))?;
        let result = self.exec(endpoint, &what, scope).await?;
        let data = result.data.ok_or_else(|| VaultError::Unexpected {
            what: what.clone(),
            detail: "no credentials in the answer".to_owned(),
        })?;
        if result.lease_id.is_empty() {
            return Err(VaultError::Unexpected {
                what,
                detail: "no lease id in the answer".to_owned(),
            });
        }
        Ok(Leased {
            lease_id: result.lease_id,
            ttl: Duration::from_secs(u64::from(result.lease_duration)),
            renewable: result.renewable,
            issued: SystemTime::now(),
            fields: [
                ("username".to_owned(), Secret::from(data.username)),
                ("password".to_owned(), Secret::from(data.password)),
            ]
            .into(),
        })
    }

    /// A new certificate from `mount/issue/role`.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn pki_issue(
        &self,
        mount: &str,
        role: &str,
        common_name: &str,
        alt_names: &[String],
        ttl: Duration,
        scope: Scope<'_>,
    ) -> Result<Issued, VaultError> {
        let what = format!("{mount}/issue/{role}");
        let endpoint = GenerateCertificateRequest::builder()
            .mount(mount)
            .role(role)
            .common_name(common_name)
            .alt_names(alt_names.join(","))
            .ttl(format!("{}s", ttl.as_secs()))
            .build()
            .map_err(unbuildable(&what))?;
        let data = self
            .exec(endpoint, &what, scope)
            .await?
            .data
            .ok_or_else(|| VaultError::Unexpected {
                what: what.clone(),
                detail: "no certificate in the answer".to_owned(),
            })?;
        let not_after = data
            .expiration
            .map(crate::clock::from_unix)
            .ok_or_else(|| VaultError::Unexpected {
                what: what.clone(),
                detail: "no expiration".to_owned(),
            })?;
        let mut issued = Issued::certificate(
            data.serial_number,
            not_after,
            [data.certificate, data.issuing_ca],
            data.ca_chain,
        );
        issued
            .fields
            .insert("private_key".to_owned(), Secret::from(data.private_key));
        Ok(issued)
    }

    /// The ids of the live leases directly under `prefix` (ending in `/`,
    /// e.g. `database/creds/orders/`) in `namespace`. Vault asks `list` and
    /// `sudo` on `sys/leases/lookup/<prefix>` for it.
    ///
    /// # Errors
    /// A [`VaultError`] other than "none there".
    pub async fn lease_list(
        &self,
        prefix: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<String>, VaultError> {
        let what = format!("sys/leases/lookup/{prefix}");
        let endpoint = ListLeases {
            prefix: prefix.trim_end_matches('/').to_owned(),
        };
        match self
            .exec(endpoint, &what, Scope::new(None, namespace))
            .await
        {
            Ok(result) => Ok(result
                .data
                .map(|d| d.keys)
                .unwrap_or_default()
                .into_iter()
                .filter(|key| !key.ends_with('/'))
                .map(|key| format!("{prefix}{key}"))
                .collect()),
            Err(VaultError::NotFound(_)) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// Seconds left on a lease; `None` when Vault no longer knows it.
    ///
    /// # Errors
    /// A [`VaultError`] other than "not found" or "invalid lease".
    pub async fn lease_lookup(
        &self,
        lease_id: &str,
        namespace: Option<&str>,
    ) -> Result<Option<LeaseLookup>, VaultError> {
        let endpoint = LookupLease {
            lease_id: lease_id.to_owned(),
        };
        match self
            .exec(endpoint, "sys/leases/lookup", Scope::new(None, namespace))
            .await
        {
            Ok(result) => Ok(result.data),
            // Vault answers 400 "invalid lease" for unknown or revoked leases.
            // Anything else (an odd answer, an outage) is not "gone": read as
            // gone, it would mint a second credential for the pod.
            Err(VaultError::NotFound(_) | VaultError::Invalid(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Extends a lease by `increment`; returns the lifetime Vault granted.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn lease_renew(
        &self,
        lease_id: &str,
        increment: Duration,
        scope: Scope<'_>,
    ) -> Result<Duration, VaultError> {
        let endpoint = RenewLease {
            lease_id: lease_id.to_owned(),
            increment: increment.as_secs(),
        };
        let result = self.exec(endpoint, "sys/leases/renew", scope).await?;
        Ok(Duration::from_secs(u64::from(result.lease_duration)))
    }

    /// Revokes a lease (idempotent: an unknown lease is already gone).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn lease_revoke(&self, lease_id: &str, scope: Scope<'_>) -> Result<(), VaultError> {
        let endpoint = RevokeLease {
            lease_id: lease_id.to_owned(),
        };
        self.exec_empty(endpoint, "sys/leases/revoke", scope).await
    }

    /// Revokes a certificate by serial number.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn pki_revoke(
        &self,
        mount: &str,
        serial: &str,
        scope: Scope<'_>,
    ) -> Result<(), VaultError> {
        let what = format!("{mount}/revoke");
        let endpoint = vaultrs::api::pki::requests::RevokeCertificateRequest::builder()
            .mount(mount)
            .serial_number(serial)
            .build()
            .map_err(unbuildable(&what))?;
        self.exec(endpoint, &what, scope).await.map(|_| ())
    }
}
