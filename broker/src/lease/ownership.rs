//! Durable ownership: the engine's side of the lease records. Every lease
//! issued to a pod is recorded before it is handed out; a pod past its limit
//! on a binding loses its oldest lease; a superseded lease is shortened in
//! Vault and marked as owed; a record's lease can be revoked by any replica.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    Caller, Engine, Live, owner,
    records::{LeaseRecord, PodKey},
    stamp,
};
use crate::{
    audit::{Action, Event, Outcome},
    clock::unix,
    error::Error,
    identity::Identity,
    policy::Binding,
    vault::{Scope, VaultError},
};

/// What became of a record the broker was asked to revoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// The lease was revoked and its record deleted.
    Done,
    /// The record's handle does not open with this replica's keys: nothing
    /// was done to it (see [`Engine::revoke_record`]).
    LeftAlone,
}

impl Engine {
    /// Maps a failure of the record store to the error the caller sees.
    pub(super) fn record_error<'a>(
        &'a self,
        binding: &'a Binding,
    ) -> impl FnOnce(VaultError) -> Error + 'a {
        move |source| Error::LeaseRecord {
            binding: binding.name.clone(),
            mount: self.records.mount().to_owned(),
            source,
        }
    }

    /// The record of `live` as issued to `pod`; `None` for what has no
    /// lease (KV).
    pub(super) fn record_of(
        &self,
        pod: &PodKey,
        identity: &Identity,
        live: &Live,
    ) -> Option<LeaseRecord> {
        let lease = live.lease.as_ref()?;
        Some(LeaseRecord {
            cluster: self.records.cluster().to_owned(),
            namespace: identity.namespace.clone(),
            service_account: identity.service_account.clone(),
            pod: pod.pod.clone(),
            pod_uid: pod.uid.clone(),
            node: identity
                .node
                .as_ref()
                .map(|n| n.name.clone())
                .unwrap_or_default(),
            binding: live.binding.name.clone(),
            kind: super::driver::of(&live.binding.source).lease_kind()?,
            mount: live.binding.source.mount().to_owned(),
            vault_namespace: live
                .binding
                .source
                .namespace()
                .unwrap_or_default()
                .to_owned(),
            source: live.binding.source.to_string(),
            version: live.version.clone(),
            lease_sha256: lease.digest(),
            handle: live.handle.clone(),
            issued_at: unix(live.issued_at),
            expires_at: live.not_after.map_or(0, unix),
            revoke_at: None,
            holder: pod.holder,
        })
    }

    /// Revokes the pod's oldest leases on `binding` until one more fits
    /// under the limit.
    pub(super) async fn make_room(
        &self,
        binding: &Arc<Binding>,
        pod: &PodKey,
        caller: &Caller,
    ) -> Result<(), Error> {
        let records = self
            .records
            .of_binding(pod, &binding.name)
            .await
            .map_err(self.record_error(binding))?;
        let limit = self.settings.max_per_pod_binding.max(1);
        let excess = (records.len() + 1).saturating_sub(limit);
        for record in records.into_iter().take(excess) {
            let reason = format!(
                "the pod already held {limit} live leases on this binding (leases.maxPerPodBinding); the oldest is revoked"
            );
            tracing::info!(binding = %binding.name, version = %record.version, "{reason}");
            // A record left alone (sealed under a key this replica lacks)
            // ends by its TTL; it does not hold the new lease back.
            self.revoke_record(&record, caller, &reason)
                .await
                .map_err(Self::vault_error(binding))?;
        }
        Ok(())
    }

    /// Revokes the lease a record names and deletes the record, audited
    /// as done for `caller` (the pod, or the broker's sweep). Needs no
    /// policy: a binding removed from the policy still has its leases ended.
    /// A record whose handle this replica cannot open (sealed under a key it
    /// does not hold: another install's, or one retired) is left alone,
    /// neither revoked nor deleted nor audited as revoked.
    ///
    /// # Errors
    /// A [`VaultError`] when the revocation failed (the record stays, so a
    /// later sweep tries again).
    pub async fn revoke_record(
        &self,
        record: &LeaseRecord,
        caller: &Caller,
        reason: &str,
    ) -> Result<Revoked, VaultError> {
        let Some(lease) = self.lease_of(record) else {
            return Ok(Revoked::LeftAlone);
        };
        let vault_stamp = stamp(&record.identity());
        let outcome = record
            .kind
            .revoke(
                &self.vault,
                &record.mount,
                &lease,
                Scope::new(Some(&vault_stamp), record.vault_namespace()),
            )
            .await;
        let outcome = match outcome {
            Ok(()) => self.records.delete(&record.path()).await,
            Err(error) => Err(error),
        };
        let outcome = outcome.map(|()| Revoked::Done);
        let mut event = Event::new(
            Action::Revoke,
            if outcome.is_ok() {
                Outcome::Success
            } else {
                Outcome::Error
            },
            Some(&caller.identity),
        );
        event.binding = Some(record.binding.clone());
        event.source = Some(record.source.clone());
        event.version = Some(record.version.clone());
        event.lease_id_sha256 = Some(record.lease_sha256.clone());
        event.peer = caller.peer.clone();
        event.reason = Some(match &outcome {
            Ok(_) => reason.to_owned(),
            Err(error) => format!("{reason}: {error}"),
        });
        self.report(&event);
        outcome
    }

    /// The lease id a record's handle seals; `None`, logged with the
    /// record's path and counted, when this replica cannot open it.
    pub(super) fn lease_of(&self, record: &LeaseRecord) -> Option<String> {
        let lease = self
            .keys
            .open(&record.handle, &record.binding, &record.pod_uid)
            .ok()
            .filter(|claims| !claims.lease.is_empty())
            .map(|claims| claims.lease);
        if lease.is_none() {
            self.metrics.lease_records_left_alone.inc();
            tracing::warn!(
                mount = %self.records.mount(),
                path = %record.path(),
                "a lease record's handle does not open with this replica's keys (another install's key, or one retired); left alone: its lease ends by its TTL, and an operator may delete the record"
            );
        }
        lease
    }

    /// Rewrites the record of `live` (its new end, or when its revocation
    /// is due); best effort: a failure is logged, the sweep copes.
    pub(super) async fn update_record(
        &self,
        live: &Live,
        identity: &Identity,
        revoke_at: Option<u64>,
    ) {
        let Some(pod) = owner(identity) else {
            return;
        };
        let Some(mut record) = self.record_of(&pod, identity, live) else {
            return;
        };
        record.revoke_at = revoke_at;
        if let Err(error) = self.records.put(&record).await {
            tracing::warn!(binding = %live.binding.name, %error, "cannot update the lease record");
        }
    }

    /// A superseded credential ends once the overlap has passed, so the app
    /// has time to switch to its successor. A database lease is shortened in
    /// Vault to the overlap right away (Vault then ends it on time whatever
    /// happens to this replica), its record says when it is owed, and a
    /// tracked task revokes it at the overlap's end. Superseded certificates
    /// simply expire: revoking them would grow the CRL.
    pub async fn supersede(self: &Arc<Self>, old: Live, caller: &Caller) {
        if !Self::revokes_unused(&old) {
            return;
        }
        let overlap = old.binding.overlap;
        let ends = SystemTime::now() + overlap;
        if old.renewable
            && let Some(lease) = &old.lease
        {
            let increment = overlap.max(Duration::from_secs(1));
            let stamp = stamp(&caller.identity);
            if let Err(error) = self
                .vault
                .lease_renew(
                    lease.expose(),
                    increment,
                    Scope::new(Some(&stamp), old.binding.source.namespace()),
                )
                .await
            {
                tracing::warn!(binding = %old.binding.name, %error, "cannot shorten the superseded lease to the overlap; it is revoked when the overlap ends");
            }
        }
        let mut shortened = old.clone();
        shortened.not_after = Some(ends);
        self.update_record(&shortened, &caller.identity, Some(unix(ends)))
            .await;
        let engine = self.clone();
        let caller = caller.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                // Vault ends the shortened lease by itself; the record says
                // what is owed, for any replica's sweep.
                () = engine.shutdown.cancelled() => {}
                () = tokio::time::sleep(overlap) => {
                    let _ = engine.revoke(&old, &caller, "superseded after the overlap").await;
                }
            }
        });
    }
}
