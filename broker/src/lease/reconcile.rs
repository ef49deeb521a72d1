//! The reconciler: every replica sweeps the lease records now and then and
//! revokes what is owed — every lease of a pod that no longer exists, and
//! superseded leases whose overlap has ended — and forgets records of leases
//! that ended on their own. Where the broker may watch pods, a deletion is
//! acted on at once (a metadata-only watch through `kube-runtime`); the
//! sweep remains the backstop for deletions missed while no replica watched. A sweep is idempotent (a revoked lease's record is
//! deleted; revoking an unknown lease succeeds), so replicas need no leader:
//! at worst two replicas revoke the same lease and both audit it.

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
    Caller, Engine,
    handle::HandleKey,
    records::{LeaseRecord, PodKey, RecordKind},
    unix,
};
use crate::{identity::Verifier, vault::VaultError};

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Leases revoked (deleted pods, ended overlaps).
    pub revoked: usize,
    /// Records of leases that had already ended, deleted.
    pub forgotten: usize,
    /// Revocations that failed (tried again next sweep).
    pub failed: usize,
}

/// What the sweep owes one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Owed {
    /// Revoke it now, for this reason.
    Revoke(&'static str),
    /// Ask Vault whether the lease still lives (its recorded end has passed).
    Check,
    /// Nothing yet.
    Nothing,
}

/// The decision for one record at `now`, given whether its pod still
/// exists (`None`: cannot tell, e.g. the broker does not read pods).
pub fn owed(record: &LeaseRecord, pod_exists: Option<bool>, now: SystemTime) -> Owed {
    if pod_exists == Some(false) {
        Owed::Revoke("pod deleted")
    } else if record.revocation_due(now) {
        Owed::Revoke("superseded after the overlap")
    } else if record.expired(now) {
        Owed::Check
    } else {
        Owed::Nothing
    }
}

/// One sweep in this many reads every record (hourly at the default 30 s):
/// Vault then costs about three requests per record and hour, on top of
/// one LIST per sweep.
pub const FULL_SWEEP_EVERY: u32 = 120;

/// Sweeps the lease records.
pub struct Reconciler {
    engine: Arc<Engine>,
    verifier: Arc<Verifier>,
    keys: Arc<HandleKey>,
}

impl Reconciler {
    /// A reconciler over the engine's records, asking `verifier` whether
    /// pods still exist.
    pub fn new(engine: Arc<Engine>, verifier: Arc<Verifier>, keys: Arc<HandleKey>) -> Self {
        Self {
            engine,
            verifier,
            keys,
        }
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
        for owner in records.pods().await? {
            let pod_exists = self.verifier.pod_exists(&owner.identity()).await;
            if pod_exists != Some(false) && !full {
                continue;
            }
            for record in &records.of_pod(&owner).await? {
                match owed(record, pod_exists, SystemTime::now()) {
                    Owed::Revoke(reason) => {
                        let caller = Caller {
                            identity: record.identity(),
                            peer: None,
                        };
                        match self.engine.revoke_record(record, &caller, reason).await {
                            Ok(()) => swept.revoked += 1,
                            Err(_) => swept.failed += 1,
                        }
                    }
                    Owed::Check => {
                        if self.ended(record).await? {
                            records.delete(&record.path()).await?;
                            swept.forgotten += 1;
                        }
                    }
                    Owed::Nothing => {}
                }
            }
        }
        Ok(swept)
    }

    /// Whether the lease a record names has ended; a lease renewed since
    /// (by a replica whose record update was lost) gets its record updated.
    async fn ended(&self, record: &LeaseRecord) -> Result<bool, VaultError> {
        if record.kind == RecordKind::Pki {
            // Certificates end at their recorded end.
            return Ok(true);
        }
        let Ok(claims) = self
            .keys
            .open(&record.handle, &record.binding, &record.pod_uid)
        else {
            return Ok(true);
        };
        let Some(lookup) = self.engine.vault.lease_lookup(&claims.lease).await? else {
            return Ok(true);
        };
        if lookup.ttl == 0 {
            return Ok(true);
        }
        let mut renewed = record.clone();
        renewed.expires_at = unix(SystemTime::now()) + lookup.ttl;
        self.engine.records().put(&renewed).await?;
        Ok(false)
    }

    /// Follows pod deletions (every pod's metadata, cluster-wide: `list` and
    /// `watch` on pods) and revokes a deleted pod's leases at once. A failed
    /// watch is retried with backoff; the sweep covers the gap.
    pub async fn follow_deletions(
        self: Arc<Self>,
        client: kube::Client,
        shutdown: CancellationToken,
    ) {
        // Metadata only: the watch carries no pod specs, and nothing is cached.
        let pods: Api<PartialObjectMeta<Pod>> = Api::all(client);
        let events = watcher(pods, watcher::Config::default()).default_backoff();
        tokio::pin!(events);
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(watcher::Event::Delete(pod))) => {
                    let meta = pod.metadata;
                    if let (Some(namespace), Some(pod), Some(uid)) =
                        (meta.namespace, meta.name, meta.uid)
                    {
                        self.pod_deleted(&PodKey {
                            namespace,
                            pod,
                            uid,
                        })
                        .await;
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Also after a re-list: the watch is live again.
                    tracing::info!("watching pods: a deleted pod's leases are revoked at once");
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    tracing::warn!(%error, "the pod watch failed; retrying (the sweep still revokes what deleted pods held)");
                }
                None => return,
            }
        }
    }

    /// Revokes every lease recorded for `owner`, a pod that was deleted.
    async fn pod_deleted(&self, owner: &PodKey) {
        let records = match self.engine.records().of_pod(owner).await {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "cannot read a deleted pod's lease records; the sweep retries");
                return;
            }
        };
        for record in &records {
            let caller = Caller {
                identity: record.identity(),
                peer: None,
            };
            let _ = self
                .engine
                .revoke_record(record, &caller, "pod deleted")
                .await;
        }
    }

    /// Sweeps every `interval` (±20 %, so replicas spread out) until
    /// `shutdown`; one sweep in [`FULL_SWEEP_EVERY`] is full, the first of
    /// them at a random point of the cycle: replicas started together (a
    /// rollout) spread their full passes instead of all reading every record
    /// at once. (A record left by a crash costs nothing meanwhile: its
    /// superseded lease was shortened in Vault, which ends it by itself.)
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut count: u32 = fastrand::u32(1..FULL_SWEEP_EVERY);
        loop {
            let wait = interval.mul_f64(0.8 + 0.4 * fastrand::f64());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let full = count.is_multiple_of(FULL_SWEEP_EVERY);
            count = count.wrapping_add(1);
            match self.sweep(full).await {
                Ok(swept) if swept != Swept::default() => {
                    tracing::info!(
                        revoked = swept.revoked,
                        forgotten = swept.forgotten,
                        failed = swept.failed,
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
    use crate::lease::{from_unix, handle::Handle};

    fn record(expires_at: u64, revoke_at: Option<u64>) -> LeaseRecord {
        LeaseRecord {
            namespace: "shop".into(),
            service_account: "orders".into(),
            pod: "orders-1".into(),
            pod_uid: "uid-1".into(),
            node: String::new(),
            binding: "db".into(),
            kind: RecordKind::Database,
            mount: "database".into(),
            source: "database database/creds/orders".into(),
            version: "abc".into(),
            lease_sha256: "ab".repeat(32),
            handle: Handle::default(),
            issued_at: 0,
            expires_at,
            revoke_at,
        }
    }

    #[test]
    fn the_sweep_owes_what_the_record_and_the_pod_say() {
        let now = from_unix(1000);
        let live = record(2000, None);
        assert_eq!(owed(&live, Some(true), now), Owed::Nothing);
        assert_eq!(owed(&live, None, now), Owed::Nothing);
        assert_eq!(owed(&live, Some(false), now), Owed::Revoke("pod deleted"));
        let superseded = record(2000, Some(900));
        assert_eq!(
            owed(&superseded, Some(true), now),
            Owed::Revoke("superseded after the overlap")
        );
        assert_eq!(owed(&record(2000, Some(1001)), None, now), Owed::Nothing);
        assert_eq!(owed(&record(1000, None), Some(true), now), Owed::Check);
        assert_eq!(
            owed(&record(1000, Some(900)), Some(false), now),
            Owed::Revoke("pod deleted"),
            "a deleted pod's leases are revoked whatever else is owed"
        );
    }
}
