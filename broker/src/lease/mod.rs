//! The lease engine: the one home of a credential's life. It issues, resumes
//! from a held handle, renews at the policy's fraction of the lifetime,
//! rotates when a lease cannot be extended, and revokes; it keeps a durable
//! record of every lease issued to a pod in Vault ([`records`]), so that any
//! replica can cap a pod's leases and revoke them once the pod is gone
//! ([`reconcile`]); and it runs the per-stream state machine ([`stream`]).
//!
//! Nothing owed depends on the replica staying alive: a superseded lease is
//! shortened in Vault to the overlap, so Vault ends it on time even if this
//! process dies, and its record says when its revocation is due.

pub mod credential;
mod driver;
mod gate;
mod issue;
mod ownership;
mod resume;
pub use ownership::Revoked;
pub mod reconcile;
pub mod records;
pub mod schedule;
pub mod stream;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tessera_proto::v1::Credential;
use tokio_util::sync::CancellationToken;

pub use self::credential::{Caller, Live, event, key_wanted, stamp};
use self::{
    records::{Holder, PodKey, RecordKind, Records, record_path},
    schedule::{fraction_of, refresh_in},
};
use crate::{
    audit::{Action, Audit, Event, Outcome},
    clock::{from_unix, unix},
    error::Error,
    feed::{Fed, Feeds, Freshness},
    handle::{Claims, Handle, HandleError, HandleKey},
    identity::Identity,
    lease_id::LeaseId,
    metrics::Metrics,
    policy::Binding,
    tasks::Spawner,
    vault::{Scope, Vault, VaultError},
};

/// How leases are kept (the `leases:` block of the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The KV version 1 mount holding lease records.
    pub record_mount: String,
    /// The cluster whose records this broker keeps (`cluster.name`): it
    /// reads, revokes and forgets only those under `clusters/<name>/`.
    pub cluster: String,
    /// Most live leases one pod may hold on one binding; past it the oldest
    /// is revoked. Two leave room for one rotation overlap.
    pub max_per_pod_binding: usize,
    /// How often each replica sweeps the records for leases owed a
    /// revocation (deleted pods, ended overlaps).
    pub sweep_interval: Duration,
    /// How often a sweep also reads every record (ended overlaps, leases
    /// ended on their own, records from before clusters had names).
    pub full_sweep_interval: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            record_mount: "tessera-leases".to_owned(),
            cluster: String::new(),
            max_per_pod_binding: 2,
            sweep_interval: Duration::from_secs(30),
            full_sweep_interval: Duration::from_secs(3600),
        }
    }
}

/// What happened at a lifecycle step.
#[derive(Debug)]
pub enum Step {
    /// The lease was extended: the pod keeps its values.
    Renewed(Live),
    /// Read again, the values had not changed (a `vault:` answer without a
    /// lease): nothing to tell the pod.
    Confirmed(Live),
    /// New values replace the old; the old lease ends after the overlap.
    Rotated(Box<Rotation>),
}

/// What resuming a held handle gave.
#[derive(Debug)]
pub enum Resumed {
    /// The pod keeps what it holds (an `unchanged` notice, maybe renewed).
    Held(Live, Credential),
    /// It was due and could not be extended: a successor, newly issued.
    Rotated(Live, Credential),
}

/// A credential and its successor.
#[derive(Debug)]
pub struct Rotation {
    /// The new credential.
    pub live: Live,
    /// What to send.
    pub credential: Credential,
    /// The superseded credential.
    pub old: Live,
}

/// Whether a name or UID can be part of a lease record's folder: a plain
/// Kubernetes name (letters, digits, `-`, `.`; no `_` or `/`).
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The pod a lease is recorded under: the caller's pod, when its namespace,
/// name and UID are plain names.
fn owner(identity: &Identity) -> Option<PodKey> {
    let (name, uid, holder) = match &identity.pod {
        Some(pod) => (&pod.name, &pod.uid, Holder::Pod),
        // A caller bound to no pod: its service account holds the lease.
        None => (
            &identity.service_account,
            &identity.service_account_uid,
            Holder::ServiceAccount,
        ),
    };
    [identity.namespace.as_str(), name, uid]
        .iter()
        .all(|part| plain_name(part))
        .then(|| PodKey {
            namespace: identity.namespace.clone(),
            pod: name.clone(),
            uid: uid.clone(),
            holder,
        })
}

/// The UID a handle is sealed to: the caller's pod, or for a caller bound
/// to no pod (where the policy allows one), its service account.
fn holder_uid(identity: &Identity) -> &str {
    identity
        .pod
        .as_ref()
        .map_or(identity.service_account_uid.as_str(), |p| p.uid.as_str())
}

/// Issues, resumes, renews, rotates and revokes credentials, and keeps their
/// records.
pub struct Engine {
    vault: Arc<Vault>,
    keys: Arc<HandleKey>,
    feeds: Arc<Feeds>,
    records: Records,
    settings: LeaseSettings,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    /// Background work (revocations after an overlap, of undelivered
    /// credentials), waited for at shutdown.
    tasks: Spawner,
    shutdown: CancellationToken,
    /// Pods' own Vault tokens, for bindings behind Vault's second gate.
    pod_tokens: gate::PodTokens,
}

impl Engine {
    /// An engine over `vault`, sealing handles with `keys`; KV reads are
    /// served from `feeds` while a poller follows the secret.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vault: Arc<Vault>,
        keys: Arc<HandleKey>,
        feeds: Arc<Feeds>,
        settings: LeaseSettings,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
        tasks: Spawner,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            records: Records::new(
                vault.clone(),
                settings.record_mount.clone(),
                settings.cluster.clone(),
            ),
            vault,
            keys,
            feeds,
            settings,
            audit,
            metrics,
            tasks,
            shutdown,
            pod_tokens: gate::PodTokens::default(),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Where the engine keeps its lease records in Vault.
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Writes an audit event and counts it.
    pub fn report(&self, event: &Event) {
        self.metrics.record(event);
        self.audit.record(event);
    }

    fn vault_error(binding: &Binding) -> impl FnOnce(VaultError) -> Error + '_ {
        move |source| Error::Vault {
            binding: binding.name.clone(),
            source,
        }
    }

    fn seal(&self, binding: &Binding, identity: &Identity, live: &Live) -> Handle {
        self.keys.seal(&Claims {
            binding: binding.name.clone(),
            pod_uid: holder_uid(identity).to_owned(),
            lease: live
                .lease
                .as_ref()
                .map(|l| l.expose().to_owned())
                .unwrap_or_default(),
            version: live.version.clone(),
            issued_at: unix(live.issued_at),
            // Certificates cannot be extended: their end travels in the
            // handle. A lease is looked up in Vault instead; the end it had
            // when sealed is what the broker can vouch for while Vault is away.
            not_after: live.not_after.map_or(0, unix),
        })
    }

    /// Whether `live`, once nobody uses it (superseded, or never delivered),
    /// is revoked (a lease) or left to expire (a certificate: revoking it
    /// would only grow the CRL; a static secret has nothing to end).
    pub fn revokes_unused(live: &Live) -> bool {
        driver::of(&live.binding.source)
            .lease_kind()
            .is_some_and(RecordKind::revokes_unused)
    }

    /// When the next renewal or rotation of `live` is due (from now). A
    /// `vault:` answer read without a lease or an end is read again at its
    /// binding's `refreshInterval`, like a KV secret; one written is not
    /// (each write may make new values): `None`.
    pub fn due_in(&self, live: &Live, jitter: f64) -> Option<Duration> {
        if let (None, None, crate::policy::Source::Vault(source)) =
            (&live.lease, live.not_after, &live.binding.source)
        {
            let interval = live
                .binding
                .refresh_interval
                .unwrap_or_else(|| self.feeds.default_interval());
            return (!source.write).then(|| interval + interval.mul_f64(jitter * 0.1));
        }
        let not_after = live.not_after?;
        Some(refresh_in(
            live.issued_at,
            not_after,
            live.binding.renew_fraction,
            jitter,
            SystemTime::now(),
        ))
    }

    /// Cuts a just-issued lease down to the binding's TTL (a renewal with
    /// that increment sets its end); returns the lifetime it has. A lease
    /// that cannot be cut down is revoked rather than delivered.
    ///
    /// # Errors
    /// A Vault [`Error`], the lease revoked.
    async fn shorten(
        &self,
        binding: &Binding,
        lease: &LeaseId,
        renewable: bool,
        vault_stamp: &str,
    ) -> Result<Duration, Error> {
        let cut = if renewable {
            self.vault
                .lease_renew(
                    lease.expose(),
                    binding.ttl,
                    Scope::new(Some(vault_stamp), binding.source.namespace()),
                )
                .await
        } else {
            Err(VaultError::Invalid(format!(
                "shortening a non-renewable lease of {} to the binding's ttl {} (make the Vault role's default_ttl at most the binding's ttl)",
                lease.expose(),
                crate::policy::format_duration(binding.ttl)
            )))
        };
        match cut {
            Ok(granted) => Ok(granted.min(binding.ttl)),
            Err(error) => {
                if let Err(revoke) = self
                    .vault
                    .lease_revoke(
                        lease.expose(),
                        Scope::new(Some(vault_stamp), binding.source.namespace()),
                    )
                    .await
                {
                    tracing::warn!(binding = %binding.name, error = %revoke, "a lease that could not be shortened could not be revoked either; it ends by its TTL");
                }
                Err(Self::vault_error(binding)(error))
            }
        }
    }

    /// Renews `live` if Vault will extend it meaningfully; otherwise issues
    /// its successor, and the superseded lease ends after the overlap.
    ///
    /// # Errors
    /// A Vault [`Error`]; the caller retries with backoff.
    pub async fn renew_or_rotate(&self, live: &Live, caller: &Caller) -> Result<Step, Error> {
        let binding = &live.binding;
        if let (true, Some(lease)) = (live.renewable, &live.lease) {
            match self
                .vault
                .lease_renew(
                    lease.expose(),
                    binding.ttl,
                    Scope::new(Some(&stamp(&caller.identity)), binding.source.namespace()),
                )
                .await
            {
                Ok(granted) => {
                    let now = SystemTime::now();
                    let old_end = live.not_after.unwrap_or(now);
                    let new_end = now.checked_add(granted).unwrap_or(now);
                    // Keep the lease if it was extended and will still have at
                    // least the overlap left at the next refresh; otherwise it is
                    // near its max TTL, and a successor delivered now leaves the
                    // app the whole overlap to switch.
                    let left_at_next_refresh = fraction_of(granted, 1.0 - binding.renew_fraction);
                    if new_end > old_end && left_at_next_refresh >= binding.overlap {
                        let mut renewed = live.clone();
                        renewed.issued_at = now;
                        renewed.not_after = Some(new_end);
                        renewed.freshness = Freshness::confirmed_at(now);
                        self.update_record(&renewed, &caller.identity, None).await;
                        return Ok(Step::Renewed(renewed));
                    }
                }
                // Vault no longer knows the lease (revoked by hand, or expired
                // during an outage): renewing again can never succeed, so a
                // successor is issued now.
                Err(VaultError::Invalid(detail) | VaultError::NotFound(detail)) => {
                    tracing::warn!(binding = %binding.name, %detail, "Vault no longer knows the lease; issuing a successor");
                }
                Err(error) => return Err(Self::vault_error(binding)(error)),
            }
        }
        let (new, credential) = self.issue(binding, caller, None).await?;
        if live.lease.is_none() && new.lease.is_none() && new.version == live.version {
            return Ok(Step::Confirmed(new));
        }
        Ok(Step::Rotated(Box::new(Rotation {
            live: new,
            credential,
            old: live.clone(),
        })))
    }

    /// Ends a credential in Vault (revokes a lease or a certificate; KV has
    /// nothing to end), deletes its record, and audits the outcome with
    /// `reason`. A failure is logged too: the lease then ends by its TTL,
    /// and its record stays for the sweep to retry.
    ///
    /// # Errors
    /// A Vault [`Error`].
    pub async fn revoke(&self, live: &Live, caller: &Caller, reason: &str) -> Result<(), Error> {
        let binding = &live.binding;
        let vault_stamp = stamp(&caller.identity);
        let outcome = match (driver::of(&binding.source).lease_kind(), &live.lease) {
            (Some(kind), Some(lease)) => kind
                .revoke(
                    &self.vault,
                    binding.source.mount(),
                    lease.expose(),
                    Scope::new(Some(&vault_stamp), binding.source.namespace()),
                )
                .await
                .map_err(Self::vault_error(binding)),
            _ => Ok(()),
        };
        if outcome.is_ok()
            && let (Some(pod), Some(lease)) = (owner(&caller.identity), &live.lease)
        {
            let path = record_path(self.records.cluster(), &pod, &binding.name, &lease.digest());
            if let Err(error) = self.records.delete(&path).await {
                tracing::warn!(binding = %binding.name, %error, "lease revoked, but its record stays (the sweep removes it)");
            }
        }
        let mut event = event(
            Action::Revoke,
            if outcome.is_ok() {
                Outcome::Success
            } else {
                Outcome::Error
            },
            caller,
            live,
        );
        event.ttl_seconds = None;
        event.reason = Some(match &outcome {
            Ok(()) => reason.to_owned(),
            Err(error) => format!("{reason}: {error}"),
        });
        if let Err(error) = &outcome {
            tracing::warn!(binding = %binding.name, %error, reason, "revocation failed; the lease ends by its TTL");
        }
        self.report(&event);
        outcome
    }

    /// Revokes, in the background (tracked: shutdown waits for it), leases
    /// that were issued but never reached their pod.
    pub fn revoke_undelivered(self: &Arc<Self>, lives: Vec<Live>, caller: Caller) {
        let engine = self.clone();
        self.tasks.spawn(async move {
            for live in lives {
                let reason = "issued but never delivered (the request failed)";
                let _ = engine.revoke(&live, &caller, reason).await;
            }
        });
    }
}

#[cfg(test)]
mod tests;
