//! A KV version 1 mount, where the broker keeps its own records (the lease
//! records of [`crate::lease::records`]): write, read, list and delete of
//! small JSON documents. Version 1, because a record has no history worth
//! keeping and a delete must really delete.

use rustify_derive::Endpoint;
use serde::Deserialize;
use serde_json::Value;
use vaultrs::api::kv1::requests::{DeleteSecretRequest, SetSecretRequest};

use super::{Scope, Vault, VaultError, unbuildable};

/// `GET <mount>/<path>`: the document, as the `data` of Vault's answer
/// (vaultrs' own request expects it one level deeper).
#[derive(Debug, Endpoint)]
#[endpoint(path = "{self.mount}/{self.path}", response = "Value")]
struct ReadDocument {
    #[endpoint(skip)]
    mount: String,
    #[endpoint(skip)]
    path: String,
}

/// `LIST <mount>/<path>`.
#[derive(Debug, Endpoint)]
#[endpoint(path = "{self.mount}/{self.path}", method = "LIST", response = "Keys")]
struct ListDocuments {
    #[endpoint(skip)]
    mount: String,
    #[endpoint(skip)]
    path: String,
}

/// The keys of a LIST answer.
#[derive(Debug, Deserialize)]
struct Keys {
    keys: Vec<String>,
}

impl Vault {
    /// Writes `document` (a JSON object) at `mount/path`, replacing it.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn kv1_write(
        &self,
        mount: &str,
        path: &str,
        document: &Value,
    ) -> Result<(), VaultError> {
        let what = format!("{mount}/{path}");
        let data = serde_json::to_vec(document).map_err(unbuildable(&what))?;
        let endpoint = SetSecretRequest::builder()
            .mount(mount)
            .path(path)
            .data(data)
            .build()
            .map_err(unbuildable(&what))?;
        self.exec_empty(endpoint, &what, Scope::default()).await
    }

    /// The document at `mount/path`; `None` when there is none.
    ///
    /// # Errors
    /// A [`VaultError`] other than "not found".
    pub async fn kv1_read(&self, mount: &str, path: &str) -> Result<Option<Value>, VaultError> {
        let what = format!("{mount}/{path}");
        let endpoint = ReadDocument {
            mount: mount.to_owned(),
            path: path.to_owned(),
        };
        match self.exec(endpoint, &what, Scope::default()).await {
            Ok(result) => Ok(result.data),
            Err(VaultError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The keys under `mount/path/` (a trailing `/` marks a folder); empty
    /// when there are none.
    ///
    /// # Errors
    /// A [`VaultError`] other than "not found".
    pub async fn kv1_list(&self, mount: &str, path: &str) -> Result<Vec<String>, VaultError> {
        let what = format!("{mount}/{path}");
        let endpoint = ListDocuments {
            mount: mount.to_owned(),
            path: path.to_owned(),
        };
        match self.exec(endpoint, &what, Scope::default()).await {
            Ok(result) => Ok(result.data.map(|d| d.keys).unwrap_or_default()),
            Err(VaultError::NotFound(_)) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// Deletes `mount/path` (idempotent).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn kv1_delete(&self, mount: &str, path: &str) -> Result<(), VaultError> {
        let what = format!("{mount}/{path}");
        let endpoint = DeleteSecretRequest::builder()
            .mount(mount)
            .path(path)
            .build()
            .map_err(unbuildable(&what))?;
        match self.exec_empty(endpoint, &what, Scope::default()).await {
            Err(VaultError::NotFound(_)) | Ok(()) => Ok(()),
            Err(error) => Err(error),
        }
    }
}
