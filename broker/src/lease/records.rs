//! Lease records: every dynamic credential issued to a pod is written to a KV
//! version 1 mount of Tessera's own in Vault (`leases.recordMount`, default
//! `tessera-leases`), at
//! `clusters/<cluster>/pods/<namespace>_<pod>_<uid>/<binding>/<lease digest>`.
//! Several clusters may share one Vault and one mount: each broker reads and
//! acts only under its own cluster's name. Records of the layout before
//! cluster names (`pods/…`) are adopted by the cluster whose handle key
//! opens them.
//!
//! One LIST names every pod of the cluster that holds leases, so a sweep
//! asks Vault once and the API server per pod, and reads records only of
//! pods that are gone (or in an occasional full pass). Vault is the
//! replicated, durable store every install already has, so any replica can
//! list a pod's leases, cap them, and revoke them after the pod, its
//! sidecar, or the replica that issued them is gone. A record holds the
//! lease id only inside the sealed handle (see [`super::handle`]).

use std::{sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    clock::unix,
    handle::Handle,
    identity::{Identity, ObjectRef},
    vault::{Vault, VaultError},
};

/// What the broker keeps about one lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The cluster the pod runs in; empty in records written before
    /// clusters had names (they live under `pods/` until adopted).
    #[serde(default)]
    pub cluster: String,
    /// The namespace of the pod that holds the lease.
    pub namespace: String,
    /// The service account of that pod.
    pub service_account: String,
    /// The name of that pod.
    pub pod: String,
    /// The UID of that pod; a lease is revoked when no pod has it.
    pub pod_uid: String,
    /// The pod's node, when known.
    #[serde(default)]
    pub node: String,
    /// The policy binding the lease was issued under; revocation looks it up again.
    pub binding: String,
    /// What kind of credential, and so how to revoke it.
    pub kind: RecordKind,
    /// The secrets engine's mount (`database`, `pki`).
    pub mount: String,
    /// The Vault namespace the lease was issued in; empty for the broker's own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vault_namespace: String,
    /// The source as the audit trail shows it, e.g. `database database/creds/orders`.
    pub source: String,
    /// The version of the credential the lease backs.
    pub version: String,
    /// SHA-256 of the lease id, as the audit trail names it.
    pub lease_sha256: String,
    /// The sealed handle, from which the lease id is read back.
    pub handle: Handle,
    /// Issued, Unix seconds.
    pub issued_at: u64,
    /// When the lease ends unless renewed, Unix seconds.
    pub expires_at: u64,
    /// When a superseded lease is owed its revocation, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_at: Option<u64>,
    /// Who holds the lease: the pod (`pod`, `pod_uid`), or for a caller
    /// whose token names no pod, its service account (its name and UID in
    /// `pod` and `pod_uid`).
    #[serde(default, skip_serializing_if = "Holder::is_pod")]
    pub holder: Holder,
}

/// Who holds a lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Holder {
    /// A pod: the lease ends with it.
    #[default]
    Pod,
    /// A service account, for a caller whose token is bound to no pod
    /// (`callers: { unbound: allow }`): its leases are counted per service
    /// account and end by their TTL.
    ServiceAccount,
}

impl Holder {
    fn is_pod(&self) -> bool {
        *self == Holder::Pod
    }
}

impl LeaseRecord {
    /// The Vault namespace its lease lives in; `None` for the broker's own.
    pub fn vault_namespace(&self) -> Option<&str> {
        (!self.vault_namespace.is_empty()).then_some(self.vault_namespace.as_str())
    }

    /// The pod (or service account) it was issued to.
    pub fn owner(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            uid: self.pod_uid.clone(),
            holder: self.holder,
        }
    }

    /// Where the record lives in the mount.
    pub fn path(&self) -> String {
        record_path(
            &self.cluster,
            &self.owner(),
            &self.binding,
            &self.lease_sha256,
        )
    }

    /// The pod the lease was issued to, as an identity (for Vault's audit
    /// stamp and the audit trail).
    pub fn identity(&self) -> Identity {
        Identity {
            service_account: self.service_account.clone(),
            node: (!self.node.is_empty()).then(|| ObjectRef {
                name: self.node.clone(),
                uid: String::new(),
            }),
            ..self.owner().identity()
        }
    }

    /// Whether the lease has ended by `now` (unless renewed since).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at <= unix(now)
    }

    /// Whether a superseded lease's revocation is due at `now`.
    pub fn revocation_due(&self, now: SystemTime) -> bool {
        self.revoke_at.is_some_and(|at| at <= unix(now))
    }
}

/// The kind of credential a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RecordKind {
    /// A dynamic database credential: revoked through `sys/leases/revoke`.
    Database,
    /// A certificate: revoked by serial at the PKI mount.
    Pki,
}

/// A pod that holds leases (or a service account, see [`Holder`]), as its
/// record folder names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodKey {
    /// The pod's namespace, the first part of the record folder's name.
    pub namespace: String,
    /// The pod's name (the service account's).
    pub pod: String,
    /// The pod's UID (the service account's).
    pub uid: String,
    /// A pod or a service account.
    pub holder: Holder,
}

impl PodKey {
    /// The folder: `<namespace>_<pod>_<uid>` (Kubernetes names and UIDs hold
    /// no `_`, so it parses back).
    pub fn folder(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.pod, self.uid)
    }

    /// The pod a folder names; `None` for one not written by the broker.
    pub fn parse(folder: &str) -> Option<Self> {
        let mut parts = folder.split('_');
        let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
        (parts.next().is_none() && !namespace.is_empty() && !pod.is_empty() && !uid.is_empty())
            .then(|| Self {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                uid: uid.to_owned(),
                holder: Holder::Pod,
            })
    }

    /// The pod as an identity, to ask the API server whether it still
    /// exists; a service account's has no pod.
    pub fn identity(&self) -> Identity {
        let pod = (self.holder == Holder::Pod).then(|| ObjectRef {
            name: self.pod.clone(),
            uid: self.uid.clone(),
        });
        let service_account = match self.holder {
            Holder::Pod => String::new(),
            Holder::ServiceAccount => self.pod.clone(),
        };
        Identity {
            namespace: self.namespace.clone(),
            service_account,
            service_account_uid: String::new(),
            pod,
            node: None,
            pod_labels: None,
            expires_at: 0,
        }
    }
}

/// `clusters/<cluster>/pods/<folder>/<binding>/<first 32 hex digits of the
/// lease digest>` (`serviceaccounts/` instead of `pods/` for a service
/// account's); `pods/…` for a record from before clusters had names.
pub fn record_path(cluster: &str, owner: &PodKey, binding: &str, lease_sha256: &str) -> String {
    let id = lease_sha256.get(..32).unwrap_or(lease_sha256);
    format!(
        "{}/{}/{binding}/{id}",
        holders_folder(cluster, owner.holder),
        owner.folder()
    )
}

/// The folder of a cluster's holders of one kind.
fn holders_folder(cluster: &str, holder: Holder) -> String {
    match holder {
        Holder::Pod => pods_folder(cluster),
        Holder::ServiceAccount => format!("clusters/{cluster}/serviceaccounts"),
    }
}

/// The folder of a cluster's pods: `clusters/<cluster>/pods`, or `pods` for
/// the layout before clusters had names (`cluster` empty).
fn pods_folder(cluster: &str) -> String {
    if cluster.is_empty() {
        LEGACY_PODS.to_owned()
    } else {
        format!("clusters/{cluster}/pods")
    }
}

/// Where records were kept before clusters had names.
const LEGACY_PODS: &str = "pods";

/// One cluster's records in one KV v1 mount.
pub struct Records {
    vault: Arc<Vault>,
    mount: String,
    cluster: String,
}

impl Records {
    /// The records of `cluster` kept in `mount`.
    pub fn new(vault: Arc<Vault>, mount: String, cluster: String) -> Self {
        Self {
            vault,
            mount,
            cluster,
        }
    }

    /// The cluster whose records these are.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The mount, for errors that tell the operator what to grant.
    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// Writes (or replaces) a record.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn put(&self, record: &LeaseRecord) -> Result<(), VaultError> {
        let document = serde_json::to_value(record).map_err(|e| VaultError::Unexpected {
            what: record.path(),
            detail: e.to_string(),
        })?;
        self.vault
            .kv1_write(&self.mount, &record.path(), &document)
            .await
    }

    /// Deletes the record at `path` (idempotent).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn delete(&self, path: &str) -> Result<(), VaultError> {
        self.vault.kv1_delete(&self.mount, path).await
    }

    /// The cluster's pods that have records: one LIST.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn pods(&self) -> Result<Vec<PodKey>, VaultError> {
        self.pods_in(&self.cluster).await
    }

    /// The cluster's service accounts that hold leases for callers bound to
    /// no pod: one LIST.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn service_accounts(&self) -> Result<Vec<PodKey>, VaultError> {
        let folder = holders_folder(&self.cluster, Holder::ServiceAccount);
        Ok(folders(self.vault.kv1_list(&self.mount, &folder).await?)
            .iter()
            .filter_map(|name| PodKey::parse(name))
            .map(|key| PodKey {
                holder: Holder::ServiceAccount,
                ..key
            })
            .collect())
    }

    /// The pods with records from before clusters had names, waiting to be
    /// adopted: one LIST.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn legacy_pods(&self) -> Result<Vec<PodKey>, VaultError> {
        self.pods_in("").await
    }

    async fn pods_in(&self, cluster: &str) -> Result<Vec<PodKey>, VaultError> {
        let folder = pods_folder(cluster);
        let mut pods = Vec::new();
        for name in folders(self.vault.kv1_list(&self.mount, &folder).await?) {
            match PodKey::parse(&name) {
                Some(pod) => pods.push(pod),
                // Not written by a broker: never acted on.
                None => {
                    tracing::warn!(mount = %self.mount, path = %format!("{folder}/{name}"), "a folder among the lease records that names no pod; left alone")
                }
            }
        }
        Ok(pods)
    }

    /// Every record of one of the cluster's pods.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn of_pod(&self, owner: &PodKey) -> Result<Vec<LeaseRecord>, VaultError> {
        self.of_pod_in(&self.cluster, owner).await
    }

    /// Every record of one pod in the layout before clusters had names.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn legacy_of_pod(&self, owner: &PodKey) -> Result<Vec<LeaseRecord>, VaultError> {
        self.of_pod_in("", owner).await
    }

    async fn of_pod_in(
        &self,
        cluster: &str,
        owner: &PodKey,
    ) -> Result<Vec<LeaseRecord>, VaultError> {
        let pod = format!(
            "{}/{}",
            holders_folder(cluster, owner.holder),
            owner.folder()
        );
        let bindings = folders(self.vault.kv1_list(&self.mount, &pod).await?);
        let mut records = Vec::new();
        for binding in bindings {
            records.extend(
                self.read_folder(cluster, &format!("{pod}/{binding}"))
                    .await?,
            );
        }
        Ok(records)
    }

    /// The records of one pod and binding: those owed a revocation first,
    /// then the oldest first.
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn of_binding(
        &self,
        owner: &PodKey,
        binding: &str,
    ) -> Result<Vec<LeaseRecord>, VaultError> {
        let folder = format!(
            "{}/{}/{binding}",
            holders_folder(&self.cluster, owner.holder),
            owner.folder()
        );
        self.read_folder(&self.cluster, &folder).await
    }

    /// The records in one binding folder of `cluster`'s layout. A record
    /// that names another cluster than the folder it is in is skipped (and
    /// said): it is never acted on from here.
    async fn read_folder(
        &self,
        cluster: &str,
        folder: &str,
    ) -> Result<Vec<LeaseRecord>, VaultError> {
        let mut records = Vec::new();
        for id in self.vault.kv1_list(&self.mount, folder).await? {
            if id.ends_with('/') {
                continue;
            }
            let path = format!("{folder}/{id}");
            let Some(document) = self.vault.kv1_read(&self.mount, &path).await? else {
                continue;
            };
            match serde_json::from_value::<LeaseRecord>(document) {
                Ok(record) if record.cluster == cluster => records.push(record),
                Ok(record) => {
                    tracing::warn!(mount = %self.mount, %path, names = %record.cluster.escape_debug(), "a lease record names another cluster than its folder; left alone");
                }
                // Not ours to interpret: left for an operator, never fatal.
                Err(error) => {
                    tracing::warn!(mount = %self.mount, %path, %error, "unreadable lease record; skipped");
                }
            }
        }
        records.sort_by_key(|r| (r.revoke_at.is_none(), r.issued_at));
        Ok(records)
    }
}

/// The folder names (`name/`) of a LIST answer, without their slash.
fn folders(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .filter_map(|k| k.strip_suffix('/').map(str::to_owned))
        .filter(|k| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_filed_by_pod_binding_and_digest() {
        let owner = PodKey {
            namespace: "shop".into(),
            pod: "orders-7d9f.x".into(),
            uid: "6f1c2a9e-0b7d".into(),
            holder: Holder::Pod,
        };
        let digest = "ab".repeat(32);
        assert_eq!(
            record_path("prod-eu", &owner, "db", &digest),
            format!(
                "clusters/prod-eu/pods/shop_orders-7d9f.x_6f1c2a9e-0b7d/db/{}",
                "ab".repeat(16)
            )
        );
        assert_eq!(
            record_path("", &owner, "db", &digest),
            format!(
                "pods/shop_orders-7d9f.x_6f1c2a9e-0b7d/db/{}",
                "ab".repeat(16)
            ),
            "the layout before clusters had names"
        );
        assert_eq!(PodKey::parse(&owner.folder()), Some(owner));
        for odd in ["", "a_b", "a__c", "a_b_c_d", "uid-only"] {
            assert_eq!(PodKey::parse(odd), None, "{odd}");
        }
        assert_eq!(folders(vec!["a/".into(), "leaf".into(), "/".into()]), ["a"]);
    }
}
