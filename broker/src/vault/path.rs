//! Any Vault path, read or written, with Vault's whole answer: the lease
//! (id, duration, renewability) and the data, each value as text (strings
//! as they are, anything else as JSON).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use rustify_derive::Endpoint;
use serde::Serialize;
use serde_json::Value;

use super::{Scope, Vault, VaultError};
use crate::{lease_id::LeaseId, secret::Secret};

/// `GET <path>`.
#[derive(Debug, Endpoint)]
#[endpoint(path = "{self.path}", response = "BTreeMap<String, Value>")]
struct ReadPath {
    #[endpoint(skip)]
    path: String,
}

/// `PUT <path>` with `data` as the body.
#[derive(Debug, Endpoint, Serialize)]
#[endpoint(
    path = "{self.path}",
    method = "PUT",
    response = "BTreeMap<String, Value>"
)]
struct WritePath {
    #[endpoint(skip)]
    #[serde(skip)]
    path: String,
    #[serde(flatten)]
    data: BTreeMap<String, String>,
}

/// What Vault answered at a path.
#[derive(Debug)]
pub struct PathAnswer {
    /// The lease, when the answer has one (shown only as its digest).
    pub lease: Option<LeaseId>,
    /// The lease's lifetime; zero without a lease.
    pub ttl: Duration,
    /// Whether Vault can extend the lease.
    pub renewable: bool,
    /// When Vault answered (the broker's clock).
    pub issued: SystemTime,
    /// The answer's data, each value as text.
    pub fields: BTreeMap<String, Secret>,
}

impl Vault {
    /// Reads `path`, or writes `data` to it when `write`; keeps the lease.
    ///
    /// # Errors
    /// A [`VaultError`]; an answer without data is [`VaultError::Unexpected`].
    pub async fn call_path(
        &self,
        path: &str,
        write: Option<&BTreeMap<String, String>>,
        scope: Scope<'_>,
    ) -> Result<PathAnswer, VaultError> {
        let result = match write {
            None => {
                let endpoint = ReadPath {
                    path: path.to_owned(),
                };
                self.exec(endpoint, path, scope).await?
            }
            Some(data) => {
                let endpoint = WritePath {
                    path: path.to_owned(),
                    data: data.clone(),
                };
                self.exec(endpoint, path, scope).await?
            }
        };
        let data = result.data.ok_or_else(|| VaultError::Unexpected {
            what: path.to_owned(),
            detail: "the answer has no data".to_owned(),
        })?;
        let fields = data
            .into_iter()
            .map(|(name, value)| {
                let text = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                (name, Secret::from(text))
            })
            .collect();
        let leased = !result.lease_id.is_empty();
        Ok(PathAnswer {
            lease: leased.then(|| LeaseId::new(result.lease_id)),
            // Without a lease, `lease_duration` is a hint (KV version 1's
            // refresh time), not an end: such an answer is read again at
            // the binding's refreshInterval instead.
            ttl: if leased {
                Duration::from_secs(u64::from(result.lease_duration))
            } else {
                Duration::ZERO
            },
            renewable: result.renewable,
            issued: SystemTime::now(),
            fields,
        })
    }
}
