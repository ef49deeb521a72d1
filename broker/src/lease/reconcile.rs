//! The reconciler: every replica sweeps its cluster's lease records now and
//! then and revokes what is owed — every lease of a pod that no longer
//! exists or has completed, and superseded leases whose overlap has ended —
//! and forgets records of leases that ended on their own. Other clusters'
//! records (in a shared Vault) are never read; a record this replica cannot
//! open is left alone and reported, never deleted. Records from before
//! clusters had names are adopted by the cluster whose key opens them.
//!
//! Where the broker may watch pods, a deletion or completion is acted on at
//! once (metadata-only watches through `kube-runtime`); the sweep remains
//! the backstop for what was missed while no replica watched. A sweep is
//! idempotent (a revoked lease's record is deleted; revoking an unknown
//! lease succeeds), so replicas need no leader: at worst two replicas revoke
//! the same lease and both audit it.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use super::{
    Caller, Engine, Revoked,
    records::{Holder, LeaseRecord, PodKey, RecordKind},
};
use crate::{
    clock::unix,
    identity::{PodLife, Verifier},
    vault::VaultError,
};

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Leases revoked (deleted pods, ended overlaps).
    pub revoked: usize,
    /// Records of leases that had already ended, deleted.
    pub forgotten: usize,
    /// Revocations that failed (tried again next sweep).
    pub failed: usize,
    /// Records left alone: their handles do not open with this replica's
    /// keys.
    pub left_alone: usize,
    /// Records from before clusters had names, moved under this cluster.
    pub adopted: usize,
}

/// What the sweep owes one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Owed {
    /// Revoke it now, for this reason.
    Revoke(&'static str),
    /// Ask Vault whether the lease still lives (its recorded end has passed).
    Check,
    /// No sweep has finished since the broker started.
    Nothing,
}

/// The decision for one record at `now`, given where its pod is in its
/// life (`None`: cannot tell, e.g. the broker does not read pods).
pub fn owed(record: &LeaseRecord, pod: Option<PodLife>, now: SystemTime) -> Owed {
    if pod == Some(PodLife::Gone) {
        Owed::Revoke("pod deleted")
    } else if pod == Some(PodLife::Completed) {
        Owed::Revoke("pod completed")
    } else if record.revocation_due(now) {
        Owed::Revoke("superseded after the overlap")
    } else if record.expired(now) {
        Owed::Check
    } else {
        Owed::Nothing
    }
}

/// The field selector of pods whose containers will not run again.
const COMPLETED_PHASES: &str = "status.phase!=Pending,status.phase!=Running,status.phase!=Unknown";

/// The record folder's key of a pod the watch names.
fn key_of(pod: PartialObjectMeta<Pod>) -> Option<PodKey> {
    let meta = pod.metadata;
    Some(PodKey {
        namespace: meta.namespace?,
        pod: meta.name?,
        uid: meta.uid?,
        holder: Holder::Pod,
    })
}

/// Sweeps the lease records.
pub struct Reconciler {
    engine: Arc<Engine>,
    verifier: Arc<Verifier>,
    /// The replicas sharing the sweeps: only the owner of [`FULL_PASS`]
    /// makes them; alone when `None`.
    peers: Option<Arc<crate::membership::Peers>>,
}

/// The ownership key of the sweeps over the lease records, light and full
/// (named after the full pass, the first sweep replicas shared: the same
/// owner across an upgrade).
pub const FULL_PASS: &str = "lease records full pass";

impl Reconciler {
    /// A reconciler over the engine's records, asking `verifier` whether
    /// pods still exist.
    pub fn new(engine: Arc<Engine>, verifier: Arc<Verifier>) -> Self {
        Self {
            engine,
            verifier,
            peers: None,
        }
    }

    /// This reconciler, sweeping only while it owns the sweeps among
    /// `peers` (one replica of the cluster lists and reads the records).
    #[must_use]
    pub fn shared_with(mut self, peers: Arc<crate::membership::Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// One sweep. A light one asks Vault once (the list of pods that hold
    /// leases) and the API server per pod, and reads the records only of
    /// pods that are gone; a `full` one also reads every record, for
    /// overlap debts and leases that ended on their own.
    ///
    /// # Errors
    /// A [`VaultError`] when the records cannot be listed.
    pub async fn sweep(&self, full: bool) -> Result<Swept, VaultError> {
        let records = self.engine.records();
        let mut swept = Swept::default();
        // Adoption failing (a record Vault will not let this replica move)
        // must not hold back the sweep of the cluster's own records.
        if full && let Err(error) = self.adopt(&mut swept).await {
            tracing::warn!(%error, "cannot adopt the lease records from before clusters had names; the next full sweep tries again");
        }
        let mut owners = records.pods().await?;
        if full {
            // Callers bound to no pod: only their overlaps and ended leases.
            owners.extend(records.service_accounts().await?);
        }
        for owner in owners {
            let pod = self.verifier.pod_life(&owner.identity()).await;
            let ended = matches!(pod, Some(PodLife::Gone | PodLife::Completed));
            if !ended && !full {
                continue;
            }
            for record in &records.of_pod(&owner).await? {
                match owed(record, pod, SystemTime::now()) {
                    Owed::Revoke(reason) => {
                        let caller = Caller {
                            identity: record.identity(),
                            peer: None,
                            bearer: None,
                        };
                        match self.engine.revoke_record(record, &caller, reason).await {
                            Ok(Revoked::Done) => swept.revoked += 1,
                            Ok(Revoked::LeftAlone) => swept.left_alone += 1,
                            Err(_) => swept.failed += 1,
                        }
                    }
                    Owed::Check => match self.ended(record).await? {
                        Some(true) => {
                            records.delete(&record.path()).await?;
                            swept.forgotten += 1;
                        }
                        Some(false) => {}
                        None => swept.left_alone += 1,
                    },
                    Owed::Nothing => {}
                }
            }
        }
        Ok(swept)
    }

    /// Whether the lease a record names has ended; a lease renewed since
    /// (by a replica whose record update was lost) gets its record updated.
    /// `None` for a record this replica cannot open: it cannot tell.
    async fn ended(&self, record: &LeaseRecord) -> Result<Option<bool>, VaultError> {
        if record.kind == RecordKind::Pki {
            // Certificates end at their recorded end.
            return Ok(Some(true));
        }
        let Some(lease) = self.engine.lease_of(record) else {
            return Ok(None);
        };
        let Some(lookup) = self
            .engine
            .vault
            .lease_lookup(&lease, record.vault_namespace())
            .await?
        else {
            return Ok(Some(true));
        };
        if lookup.ttl == 0 {
            return Ok(Some(true));
        }
        let mut renewed = record.clone();
        renewed.expires_at = unix(SystemTime::now()) + lookup.ttl;
        self.engine.records().put(&renewed).await?;
        Ok(Some(false))
    }

    /// Moves the records written before clusters had names (`pods/…`) under
    /// this cluster's name when this replica's keys open their handles (the
    /// handle is sealed to its pod by this install's key); the others stay
    /// where they are, untouched, for the install that holds their key.
    async fn adopt(&self, swept: &mut Swept) -> Result<(), VaultError> {
        let records = self.engine.records();
        for owner in records.legacy_pods().await? {
            for record in records.legacy_of_pod(&owner).await? {
                if self.engine.lease_of(&record).is_none() {
                    swept.left_alone += 1;
                    continue;
                }
                let mut adopted = record.clone();
                records.cluster().clone_into(&mut adopted.cluster);
                records.put(&adopted).await?;
                records.delete(&record.path()).await?;
                tracing::info!(from = %record.path(), to = %adopted.path(), "lease record adopted by this cluster");
                swept.adopted += 1;
            }
        }
        Ok(())
    }

    /// Follows pod deletions and completions (every pod's metadata,
    /// cluster-wide: `list` and `watch` on pods; completed ones through a
    /// second watch selecting `Succeeded` and `Failed` phases) and revokes
    /// such a pod's leases at once. A failed watch is retried with backoff;
    /// the sweep covers the gap.
    pub async fn follow_deletions(
        self: Arc<Self>,
        client: kube::Client,
        shutdown: CancellationToken,
    ) {
        // Metadata only: the watch carries no pod specs, and nothing is cached.
        let pods: Api<PartialObjectMeta<Pod>> = Api::all(client);
        let deletions = watcher(pods.clone(), watcher::Config::default())
            .default_backoff()
            .map(|event| (event, false));
        let completions = watcher(pods, watcher::Config::default().fields(COMPLETED_PHASES))
            .default_backoff()
            .map(|event| (event, true));
        let events = futures::stream::select(deletions, completions);
        tokio::pin!(events);
        // Completed pods the first listing names: most hold no leases (kept
        // Jobs), so they are matched against one LIST of the records.
        let mut listed: Vec<PodKey> = Vec::new();
        loop {
            let (event, completion) = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            match event {
                Ok(watcher::Event::Delete(pod)) if !completion => {
                    if let Some(owner) = key_of(pod) {
                        self.pod_ended(&owner, "pod deleted").await;
                    }
                }
                Ok(watcher::Event::Apply(pod)) if completion => {
                    if let Some(owner) = key_of(pod) {
                        self.pod_ended(&owner, "pod completed").await;
                    }
                }
                Ok(watcher::Event::InitApply(pod)) if completion => {
                    listed.extend(key_of(pod));
                }
                Ok(watcher::Event::InitDone) if completion => {
                    let holding = self.engine.records().pods().await.unwrap_or_default();
                    for owner in listed.drain(..).filter(|pod| holding.contains(pod)) {
                        self.pod_ended(&owner, "pod completed").await;
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    // Also after a re-list: the watch is live again.
                    tracing::info!(
                        "watching pods: a deleted or completed pod's leases are revoked at once"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "the pod watch failed; retrying (the sweep still revokes what deleted and completed pods held)");
                }
            }
        }
    }

    /// Revokes every lease recorded for `owner`, a pod that was deleted or
    /// completed (`reason`).
    async fn pod_ended(&self, owner: &PodKey, reason: &str) {
        // The pod's own Vault tokens (second gate) this replica keeps end too.
        self.engine.end_pod_tokens(&owner.identity()).await;
        let records = match self.engine.records().of_pod(owner).await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "cannot read an ended pod's lease records; the sweep retries");
                return;
            }
        };
        for record in &records {
            let caller = Caller {
                identity: record.identity(),
                peer: None,
                bearer: None,
            };
            let _ = self.engine.revoke_record(record, &caller, reason).await;
        }
    }

    /// Sweeps every `interval` (±20 %, so replicas spread out) until
    /// `shutdown`; about once every `full_interval` a sweep is full (at the
    /// defaults, one in 120: Vault then costs about three requests per
    /// record and hour, on top of one LIST per sweep), the first of them at
    /// a random point of the cycle: replicas started together (a rollout)
    /// spread their full passes instead of all reading every record at
    /// once. (A record left by a crash costs nothing meanwhile: its
    /// superseded lease was shortened in Vault, which ends it by itself.)
    /// Records from before clusters had names are adopted at the start.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        full_interval: Duration,
        shutdown: CancellationToken,
    ) {
        let every = u32::try_from(full_interval.as_secs() / interval.as_secs().max(1))
            .unwrap_or(u32::MAX)
            .max(1);
        let mut adopted = Swept::default();
        match self.adopt(&mut adopted).await {
            Ok(()) if adopted != Swept::default() => tracing::info!(
                adopted = adopted.adopted,
                left_alone = adopted.left_alone,
                "lease records from before clusters had names looked at"
            ),
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot adopt the lease records from before clusters had names; the next full sweep tries again");
            }
        }
        let mut count: u32 = fastrand::u32(0..every);
        loop {
            let wait = interval.mul_f64(0.8 + 0.4 * fastrand::f64());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            // Among peers one replica sweeps, light and full: what a sweep
            // finds is the cluster's, and more replicas must not cost Vault
            // more. The others wait their turn (the owner's death moves it).
            if !self
                .peers
                .as_ref()
                .is_none_or(|peers| peers.owns(FULL_PASS))
            {
                continue;
            }
            let full = count.is_multiple_of(every);
            count = count.wrapping_add(1);
            let result = self.sweep(full).await;
            if result.is_ok() {
                self.engine.metrics.sweep(full);
            }
            match result {
                Ok(swept) if swept != Swept::default() => {
                    tracing::info!(
                        revoked = swept.revoked,
                        forgotten = swept.forgotten,
                        failed = swept.failed,
                        left_alone = swept.left_alone,
                        adopted = swept.adopted,
                        "lease records swept"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot sweep the lease records; trying again next interval");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{handle::Handle, lease::from_unix};

    fn record(expires_at: u64, revoke_at: Option<u64>) -> LeaseRecord {
        LeaseRecord {
            cluster: "test-1".into(),
            namespace: "shop".into(),
            service_account: "orders".into(),
            pod: "orders-1".into(),
            pod_uid: "uid-1".into(),
            node: String::new(),
            binding: "db".into(),
            kind: RecordKind::Database,
            mount: "database".into(),
            vault_namespace: String::new(),
            source: "database database/creds/orders".into(),
            version: "abc".into(),
            lease_sha256: "ab".repeat(32),
            handle: Handle::default(),
            issued_at: 0,
            expires_at,
            revoke_at,
            holder: Holder::Pod,
        }
    }

    #[test]
    fn the_sweep_owes_what_the_record_and_the_pod_say() {
        let now = from_unix(1000);
        let live = record(2000, None);
        let running = Some(PodLife::Running);
        assert_eq!(owed(&live, running, now), Owed::Nothing);
        assert_eq!(owed(&live, None, now), Owed::Nothing);
        assert_eq!(
            owed(&live, Some(PodLife::Gone), now),
            Owed::Revoke("pod deleted")
        );
        assert_eq!(
            owed(&live, Some(PodLife::Completed), now),
            Owed::Revoke("pod completed")
        );
        let superseded = record(2000, Some(900));
        assert_eq!(
            owed(&superseded, running, now),
            Owed::Revoke("superseded after the overlap")
        );
        assert_eq!(owed(&record(2000, Some(1001)), None, now), Owed::Nothing);
        assert_eq!(owed(&record(1000, None), running, now), Owed::Check);
        assert_eq!(
            owed(&record(1000, Some(900)), Some(PodLife::Gone), now),
            Owed::Revoke("pod deleted"),
            "a deleted pod's leases are revoked whatever else is owed"
        );
    }
}
