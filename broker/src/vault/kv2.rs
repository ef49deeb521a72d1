//! KV version 2 reads that keep the version metadata vaultrs' helpers drop.

use std::{collections::BTreeMap, time::SystemTime};

use vaultrs::api::kv2::requests::{ReadSecretMetadataRequest, ReadSecretRequest};

use super::{Scope, Vault, VaultError, unbuildable};
use crate::{policy::Kv2Source, secret::Secret};

/// One version of a KV v2 secret.
#[derive(Debug)]
pub struct KvSecret {
    /// The KV version number.
    pub version: u64,
    /// When this version was written.
    pub created: Option<SystemTime>,
    /// Key to value. Strings are delivered as their bytes, other JSON values
    /// as compact JSON.
    pub fields: BTreeMap<String, Secret>,
}

impl Vault {
    /// Reads the current version of a KV v2 secret, keeping only `keys` when
    /// the source names them. `caller` is stamped into Vault's audit log.
    ///
    /// # Errors
    /// A [`VaultError`]; a key named by the source but missing from the secret
    /// is [`VaultError::Unexpected`].
    pub async fn read_kv2(
        &self,
        source: &Kv2Source,
        caller: Option<&str>,
        token: Option<&Secret>,
    ) -> Result<KvSecret, VaultError> {
        let what = format!("{}/data/{}", source.mount, source.path);
        let endpoint = ReadSecretRequest::builder()
            .mount(&source.mount)
            .path(&source.path)
            .build()
            .map_err(unbuildable(&what))?;
        let response = self
            .exec(
                endpoint,
                &what,
                Scope::new(caller, source.namespace.as_deref()).with_token(token),
            )
            .await?
            .data
            .ok_or_else(|| VaultError::NotFound(what.clone()))?;
        let serde_json::Value::Object(data) = response.data else {
            return Err(VaultError::Unexpected {
                what,
                detail: "`data` is not an object (is this a KV version 2 mount?)".to_owned(),
            });
        };
        let mut fields = BTreeMap::new();
        for (key, value) in data {
            if source
                .keys
                .as_ref()
                .is_some_and(|keys| !keys.contains(&key))
            {
                continue;
            }
            let bytes = match value {
                serde_json::Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            fields.insert(key, Secret::new(bytes));
        }
        if let Some(missing) = source
            .keys
            .iter()
            .flatten()
            .find(|k| !fields.contains_key(*k))
        {
            return Err(VaultError::Unexpected {
                what,
                detail: format!("key `{missing}` is not in the secret (fix the binding's keys)"),
            });
        }
        Ok(KvSecret {
            version: response.metadata.version,
            created: humantime::parse_rfc3339_weak(
                response
                    .metadata
                    .created_time
                    .split('.')
                    .next()
                    .unwrap_or_default(),
            )
            .ok(),
            fields,
        })
    }

    /// The current version number of a KV v2 secret (a metadata read, no values).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn kv2_version(&self, source: &Kv2Source) -> Result<u64, VaultError> {
        let what = format!("{}/metadata/{}", source.mount, source.path);
        let endpoint = ReadSecretMetadataRequest::builder()
            .mount(&source.mount)
            .path(&source.path)
            .build()
            .map_err(unbuildable(&what))?;
        let meta = self
            .exec(
                endpoint,
                &what,
                Scope::new(None, source.namespace.as_deref()),
            )
            .await?
            .data
            .ok_or_else(|| VaultError::NotFound(what.clone()))?;
        Ok(meta.current_version)
    }
}
