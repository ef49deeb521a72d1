//! Drift between what Tessera should see and what is there, for
//! `tessera-broker status`: pods in opted-in namespaces that run without the
//! sidecar (admitted while the webhook was off or failing open), leases in
//! Vault under the policy's sources that no lease record owns (made behind
//! Tessera's back, or a record lost), and records whose lease Vault no
//! longer knows (revoked by hand). Read-only: it reports, it never revokes.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, api::ListParams};
use serde::Serialize;

use crate::{
    config::Config,
    lease::records::{LeaseRecord, RecordKind, Records},
    lease_id::LeaseId,
    metrics::Metrics,
    policy::{Policy, Source},
    vault::Vault,
    webhook::{annotations::INJECT, names::SIDECAR},
};

/// What `status` found; empty lists mean no drift of that kind.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Pods asking for the sidecar (`tessera.dev/inject: "true"`) in an
    /// opted-in namespace that run without it.
    pub pods_without_sidecar: Vec<PodRef>,
    /// Leases under a source of the policy that no record owns.
    pub orphaned_leases: Vec<OrphanedLease>,
    /// Records of live leases that Vault no longer knows.
    pub records_without_lease: Vec<RecordRef>,
    /// What could not be checked, and why (the rest was).
    pub not_checked: Vec<String>,
}

impl Report {
    /// Whether anything drifted.
    pub fn drifted(&self) -> bool {
        !(self.pods_without_sidecar.is_empty()
            && self.orphaned_leases.is_empty()
            && self.records_without_lease.is_empty())
    }
}

/// A pod, by name.
#[derive(Debug, Serialize)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A lease nobody recorded.
#[derive(Debug, Serialize)]
pub struct OrphanedLease {
    /// Where it lives, e.g. `database/creds/orders/`.
    pub prefix: String,
    /// The Vault namespace it lives in; empty for the broker's own.
    pub vault_namespace: String,
    /// SHA-256 of its id, as the audit trail names leases (revoke it with
    /// `vault lease revoke -prefix` after checking who made it).
    pub lease_sha256: String,
}

/// A lease record.
#[derive(Debug, Serialize)]
pub struct RecordRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod (or service account) holding it.
    pub pod: String,
    /// The binding it was issued under.
    pub binding: String,
    /// The source, as the audit trail shows it.
    pub source: String,
    /// SHA-256 of its lease id.
    pub lease_sha256: String,
}

/// The policy the broker of `config` serves: its files, and its cluster's
/// resources when it reads them (a rejected resource counts for nothing).
async fn policy_of(config: &Config) -> Result<Policy, crate::StartError> {
    if !config.policy_resources {
        return Ok(Policy::load(&config.policy_paths)?);
    }
    let client = crate::kube_client(config.kubeconfig.as_deref()).await?;
    let resources = crate::policy_resources::list(&client)
        .await
        .map_err(|e| crate::StartError::Kubernetes(format!("policy.resources: {e}")))?;
    let sources = crate::policy::read_sources(&config.policy_paths)?;
    let (mut policy, _) = crate::policy::resources::compile_all(&sources.texts, &resources)?;
    policy.files = sources.files;
    Ok(policy)
}

/// Checks everything `config` reaches: its cluster's pods (namespaces
/// labelled `namespace_label`, `key=value`), and its Vault's leases and
/// records for the sources of its policy.
///
/// # Errors
/// A [`crate::StartError`] when the policy or the Vault client cannot be
/// loaded; what cannot be reached later is listed in `not_checked`.
pub async fn check(config: &Config, namespace_label: &str) -> Result<Report, crate::StartError> {
    let policy = policy_of(config).await?.for_cluster(&config.cluster);
    let vault = std::sync::Arc::new(Vault::new(
        config.vault.clone(),
        std::sync::Arc::new(Metrics::new()),
    )?);
    let records = Records::new(
        vault.clone(),
        config.leases.record_mount.clone(),
        config.cluster.clone(),
    );
    let kube = crate::kube_client(config.kubeconfig.as_deref()).await;
    let mut report = survey(
        &policy,
        &vault,
        &records,
        kube.as_ref().ok(),
        namespace_label,
    )
    .await;
    if let Err(error) = kube {
        report.not_checked.insert(0, format!("pods: {error}"));
    }
    Ok(report)
}

/// What drifted under `policy`: pods through `kube` (when there is a
/// client), leases and records through `vault`.
pub async fn survey(
    policy: &Policy,
    vault: &Vault,
    records: &Records,
    kube: Option<&kube::Client>,
    namespace_label: &str,
) -> Report {
    let mut report = Report::default();
    if let Some(kube) = kube {
        match pods_without_sidecar(kube, namespace_label).await {
            Ok(pods) => report.pods_without_sidecar = pods,
            Err(error) => report.not_checked.push(format!("pods: {error}")),
        }
    }
    lease_drift(vault, records, policy, &mut report).await;
    report
}

/// Checks for drift every `settings.interval` until `shutdown` and keeps
/// the `tessera_drift_*` gauges on what was found. With peers only the
/// replica that owns the full pass checks (the others keep their gauges at
/// zero, so `max` over replicas is the answer).
pub async fn follow(
    parts: DriftParts,
    settings: crate::config::DriftSettings,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.interval) => {}
        }
        let ours = parts
            .peers
            .as_ref()
            .is_none_or(|peers| peers.owns(crate::lease::reconcile::FULL_PASS));
        let report = if ours {
            let policy = parts.policy.current();
            survey(
                &policy.policy,
                &parts.vault,
                &parts.records,
                parts.kube.as_ref(),
                &settings.namespace_label,
            )
            .await
        } else {
            Report::default()
        };
        for unchecked in &report.not_checked {
            tracing::warn!(what = %unchecked, "drift check: not checked");
        }
        if ours {
            tracing::info!(
                pods_without_sidecar = report.pods_without_sidecar.len(),
                orphaned_leases = report.orphaned_leases.len(),
                records_without_lease = report.records_without_lease.len(),
                not_checked = report.not_checked.len(),
                "drift check done"
            );
        }
        parts.metrics.set_drift([
            report.pods_without_sidecar.len(),
            report.orphaned_leases.len(),
            report.records_without_lease.len(),
            report.not_checked.len(),
        ]);
    }
}

/// What the periodic drift check uses.
pub struct DriftParts {
    /// The live policy.
    pub policy: std::sync::Arc<crate::policy::store::PolicyStore>,
    /// The broker's Vault client.
    pub vault: std::sync::Arc<Vault>,
    /// This cluster's lease records.
    pub records: Records,
    /// The API server, when the broker has a client.
    pub kube: Option<kube::Client>,
    /// The peers, when replicas share the work.
    pub peers: Option<std::sync::Arc<crate::membership::Peers>>,
    /// Where the gauges are.
    pub metrics: std::sync::Arc<Metrics>,
}

/// Pods in namespaces labelled `namespace_label` that ask for the sidecar
/// and have none (as a container or a native sidecar), finished pods aside.
///
/// # Errors
/// The API server's refusal or absence.
pub async fn pods_without_sidecar(
    kube: &kube::Client,
    namespace_label: &str,
) -> Result<Vec<PodRef>, kube::Error> {
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    let mut found = Vec::new();
    for namespace in namespaces
        .list(&ListParams::default().labels(namespace_label))
        .await?
    {
        let Some(name) = namespace.metadata.name else {
            continue;
        };
        let pods: Api<Pod> = Api::namespaced(kube.clone(), &name);
        for pod in pods.list(&ListParams::default()).await? {
            let asks = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INJECT))
                .is_some_and(|value| value == "true");
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed"));
            let spec = pod.spec.as_ref();
            let has_sidecar = spec.is_some_and(|spec| {
                spec.containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                    .any(|c| c.name == SIDECAR)
            });
            if asks && !finished && !has_sidecar {
                found.push(PodRef {
                    namespace: name.clone(),
                    name: pod.metadata.name.unwrap_or_default(),
                });
            }
        }
    }
    Ok(found)
}

/// Compares the leases Vault lists under the policy's leased sources with
/// the lease records of this cluster, into `report`.
async fn lease_drift(vault: &Vault, records: &Records, policy: &Policy, report: &mut Report) {
    let mut listed: BTreeSet<String> = BTreeSet::new();
    let mut complete = true;
    let mut leases = Vec::new();
    for (prefix, namespace) in lease_prefixes(policy) {
        match vault.lease_list(&prefix, namespace.as_deref()).await {
            Ok(ids) => {
                for id in ids {
                    let digest = LeaseId::new(id).digest();
                    listed.insert(digest.clone());
                    leases.push((prefix.clone(), namespace.clone(), digest));
                }
            }
            Err(error) => {
                complete = false;
                report.not_checked.push(format!(
                    "leases under {prefix}: {error} (the token needs `list` and `sudo` on sys/leases/lookup/{prefix})"
                ));
            }
        }
    }
    let recorded = match all_records(records).await {
        Ok(recorded) => recorded,
        Err(error) => {
            report
                .not_checked
                .push(format!("lease records in {}: {error}", records.mount()));
            return;
        }
    };
    let now = std::time::SystemTime::now();
    let owned: BTreeSet<&str> = recorded.iter().map(|r| r.lease_sha256.as_str()).collect();
    report.orphaned_leases = leases
        .into_iter()
        .filter(|(_, _, digest)| !owned.contains(digest.as_str()))
        .map(|(prefix, namespace, lease_sha256)| OrphanedLease {
            prefix,
            vault_namespace: namespace.unwrap_or_default(),
            lease_sha256,
        })
        .collect();
    if complete {
        report.records_without_lease = recorded
            .iter()
            .filter(|r| r.kind == RecordKind::Database && !r.expired(now))
            .filter(|r| !listed.contains(&r.lease_sha256))
            .map(|r| RecordRef {
                namespace: r.namespace.clone(),
                pod: r.pod.clone(),
                binding: r.binding.clone(),
                source: r.source.clone(),
                lease_sha256: r.lease_sha256.clone(),
            })
            .collect();
    }
}

/// Where the policy's leases live: `mount/creds/role/` for database
/// sources, the path for `vault:` sources (which may answer with a lease),
/// each with its Vault namespace.
fn lease_prefixes(policy: &Policy) -> BTreeSet<(String, Option<String>)> {
    policy
        .bindings
        .iter()
        .filter_map(|binding| match &binding.source {
            Source::Database(db) => Some((
                format!("{}/creds/{}/", db.mount, db.role),
                db.namespace.clone(),
            )),
            Source::Vault(path) => Some((format!("{}/", path.path), path.namespace.clone())),
            _ => None,
        })
        .collect()
}

/// The SHA-256 digests of the leases recorded now in the lease records of
/// each of `clusters`, in the Vault `config` names (what is still held).
///
/// # Errors
/// A [`crate::StartError`] when the Vault client cannot be built, or a
/// cluster's records cannot be listed.
pub async fn recorded_leases(
    config: &Config,
    clusters: &BTreeSet<String>,
) -> Result<BTreeSet<String>, crate::StartError> {
    let vault = std::sync::Arc::new(Vault::new(
        config.vault.clone(),
        std::sync::Arc::new(Metrics::new()),
    )?);
    let mut held = BTreeSet::new();
    for cluster in clusters {
        let records = Records::new(
            vault.clone(),
            config.leases.record_mount.clone(),
            cluster.clone(),
        );
        held.extend(
            all_records(&records)
                .await?
                .into_iter()
                .map(|record| record.lease_sha256),
        );
    }
    Ok(held)
}

/// Every record of the cluster: its pods' and its service accounts'.
async fn all_records(records: &Records) -> Result<Vec<LeaseRecord>, crate::vault::VaultError> {
    let mut all = Vec::new();
    let mut holders = records.pods().await?;
    holders.extend(records.service_accounts().await?);
    for holder in holders {
        all.extend(records.of_pod(&holder).await?);
    }
    Ok(all)
}
