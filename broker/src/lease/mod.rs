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
mod ownership;
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

pub use self::credential::{Caller, Live, event, stamp};
use self::{
    credential::pki_names,
    records::{Holder, PodKey, Records, record_path},
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
    policy::{Binding, RenderError, Source},
    tasks::Spawner,
    vault::{Vault, VaultError},
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
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// The lease records.
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

    /// Issues a fresh credential for `binding` to the caller. A leased
    /// credential issued to a pod is recorded first-class in Vault; when the
    /// pod already holds the most live leases allowed on the binding, the
    /// oldest are revoked to make room.
    ///
    /// # Errors
    /// A Vault, lease record or rendering [`Error`].
    pub async fn issue(
        &self,
        binding: &Arc<Binding>,
        caller: &Caller,
    ) -> Result<(Live, Credential), Error> {
        let identity = &caller.identity;
        if binding.source.is_leased() && identity.pod.is_none() && !binding.allow_unbound {
            return Err(Error::UnboundCaller {
                binding: binding.name.clone(),
            });
        }
        let vault_stamp = stamp(identity);
        let pod = owner(identity).filter(|_| binding.source.is_leased());
        if let Some(pod) = &pod {
            self.make_room(binding, pod, caller).await?;
        }
        let (mut live, fields) = match &binding.source {
            Source::Kv2(kv) => {
                let fed = match self.feeds.latest(kv) {
                    Some(fed) => fed,
                    None => Fed {
                        secret: Arc::new(
                            self.vault
                                .read_kv2(kv, Some(&vault_stamp))
                                .await
                                .map_err(Self::vault_error(binding))?,
                        ),
                        freshness: Freshness::now(),
                    },
                };
                let (live, credential) = Self::kv_credential(binding, &fed);
                return Ok((live, credential?));
            }
            Source::Database(db) => {
                let leased = self
                    .vault
                    .database_creds(&db.mount, &db.role, Some(&vault_stamp))
                    .await
                    .map_err(Self::vault_error(binding))?;
                let lease = LeaseId::new(leased.lease_id);
                // The role's TTL may be longer than the binding's (or than a
                // pod asked for, `max_ttl_seconds`): the credential must never
                // end later than asked, so the lease is cut down to it now.
                let ttl = if leased.ttl > binding.ttl {
                    self.shorten(binding, &lease, leased.renewable, &vault_stamp)
                        .await?
                } else {
                    leased.ttl
                };
                let live = Live {
                    binding: binding.clone(),
                    version: lease.version(),
                    issued_at: leased.issued,
                    not_after: Some(leased.issued + ttl),
                    renewable: leased.renewable,
                    lease: Some(lease),
                    handle: Handle::default(),
                    freshness: Freshness::now(),
                };
                (live, leased.fields)
            }
            Source::Pki(pki) => {
                let names =
                    pki_names(&pki.common_name, &pki.alt_names, identity).map_err(|field| {
                        Error::Render {
                            binding: binding.name.clone(),
                            problem: RenderError::Missing(field),
                        }
                    })?;
                let issued = self
                    .vault
                    .pki_issue(
                        &pki.mount,
                        &pki.role,
                        &names[0],
                        &names[1..],
                        binding.ttl,
                        Some(&vault_stamp),
                    )
                    .await
                    .map_err(Self::vault_error(binding))?;
                let live = Live {
                    binding: binding.clone(),
                    version: issued.serial.replace(':', ""),
                    issued_at: issued.issued,
                    not_after: Some(issued.not_after),
                    renewable: false,
                    lease: Some(LeaseId::new(issued.serial)),
                    handle: Handle::default(),
                    freshness: Freshness::now(),
                };
                (live, issued.fields)
            }
        };
        if binding.source.is_leased() {
            live.handle = self.seal(binding, identity, &live);
        }
        if let Some(record) = pod.and_then(|pod| self.record_of(&pod, identity, &live))
            && let Err(error) = self.records.put(&record).await
        {
            // A lease nobody could find again must not outlive this request.
            let reason = "its lease record could not be written";
            let _ = self.revoke(&live, caller, reason).await;
            return Err(self.record_error(binding)(error));
        }
        let credential = credential::credential(&live, Some(&fields))?;
        Ok((live, credential))
    }

    /// A KV secret's version as a credential: what [`Engine::issue`] serves
    /// and what a stream pushes when the secret changes. The [`Live`] comes
    /// back even when the fields do not make the binding's files
    /// ([`Error::Render`]), so that failure can be audited with it.
    pub fn kv_credential(binding: &Arc<Binding>, fed: &Fed) -> (Live, Result<Credential, Error>) {
        let secret = &fed.secret;
        let live = Live {
            binding: binding.clone(),
            version: secret.version.to_string(),
            issued_at: secret.created.unwrap_or_else(SystemTime::now),
            not_after: None,
            renewable: false,
            lease: None,
            handle: Handle::default(),
            freshness: fed.freshness,
        };
        let credential = credential::credential(&live, Some(&secret.fields));
        (live, credential)
    }

    /// Resumes a credential the pod holds, when it is still good: the pod
    /// keeps its values (no second database user). A database lease due for
    /// renewal is renewed now, so a pod that only calls `Fetch` (no stream)
    /// keeps its lease alive by asking; one that cannot be extended is
    /// rotated (the successor comes back as [`Resumed::Rotated`]). `None`
    /// when it must be reissued (expired, revoked, or a handle this
    /// deployment can no longer read, e.g. after the shared key changed).
    ///
    /// # Errors
    /// [`Error::Handle`] for a handle of another pod or binding; a Vault
    /// [`Error`] when a due renewal fails.
    pub async fn resume(
        self: &Arc<Self>,
        binding: &Arc<Binding>,
        caller: &Caller,
        held: &Handle,
    ) -> Result<Option<Resumed>, Error> {
        let identity = &caller.identity;
        let pod_uid = holder_uid(identity);
        let claims = match self.keys.open(held, &binding.name, pod_uid) {
            Ok(claims) => claims,
            Err(HandleError::Invalid(_)) => {
                let mut event = Event::new(Action::Issue, Outcome::Denied, Some(identity));
                event.binding = Some(binding.name.clone());
                event.reason = Some(
                    "the held lease handle does not open (another deployment's, forged, or sealed under a replaced key); a fresh credential is issued"
                        .to_owned(),
                );
                event.peer = caller.peer.clone();
                self.report(&event);
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let now = SystemTime::now();
        let issued_at = from_unix(claims.issued_at);
        let live = match &binding.source {
            Source::Kv2(_) => return Ok(None),
            Source::Database(_) => {
                let lookup = match self.vault.lease_lookup(&claims.lease).await {
                    Ok(lookup) => lookup,
                    // Vault away: the lease stands at least until the end
                    // sealed in its handle, so the pod keeps it, marked as
                    // not confirmed; only an ended one fails the request.
                    Err(error @ VaultError::Unavailable(_)) => {
                        let not_after = from_unix(claims.not_after);
                        if claims.not_after == 0 || not_after <= now {
                            return Err(Self::vault_error(binding)(error));
                        }
                        let live = Live {
                            binding: binding.clone(),
                            version: claims.version,
                            issued_at,
                            not_after: Some(not_after),
                            renewable: true,
                            lease: Some(LeaseId::new(claims.lease)),
                            handle: held.clone(),
                            freshness: not_renewed(issued_at),
                        };
                        tracing::warn!(binding = %binding.name, %error, "Vault does not answer; the pod keeps its held lease, not yet renewed");
                        let credential = credential::credential(&live, None)?;
                        return Ok(Some(Resumed::Held(live, credential)));
                    }
                    Err(error) => return Err(Self::vault_error(binding)(error)),
                };
                let Some(lookup) = lookup else {
                    return Ok(None);
                };
                if lookup.ttl == 0 {
                    return Ok(None);
                }
                Live {
                    binding: binding.clone(),
                    version: claims.version,
                    issued_at,
                    not_after: Some(
                        now.checked_add(Duration::from_secs(lookup.ttl))
                            .unwrap_or(now),
                    ),
                    renewable: lookup.renewable,
                    lease: Some(LeaseId::new(claims.lease)),
                    handle: held.clone(),
                    freshness: Freshness::now(),
                }
            }
            Source::Pki(_) => {
                let not_after = from_unix(claims.not_after);
                if refresh_in(issued_at, not_after, binding.renew_fraction, 0.0, now).is_zero() {
                    return Ok(None);
                }
                Live {
                    binding: binding.clone(),
                    version: claims.version,
                    issued_at,
                    not_after: Some(not_after),
                    renewable: false,
                    lease: Some(LeaseId::new(claims.lease)),
                    handle: held.clone(),
                    // A certificate stands on its own until it expires.
                    freshness: Freshness::confirmed_at(issued_at),
                }
            }
        };
        if live.renewable && self.due_in(&live, 0.0) == Some(Duration::ZERO) {
            let step = match self.renew_or_rotate(&live, caller).await {
                Ok(step) => step,
                // A blip at the moment the renewal is due: the lease was
                // found alive just now, so the pod keeps it, marked as not
                // renewed; a stream retries the renewal with backoff, a
                // `Fetch` caller when it asks again.
                Err(Error::Vault {
                    source: error @ VaultError::Unavailable(_),
                    ..
                }) => {
                    tracing::warn!(binding = %binding.name, %error, "the due renewal failed; the pod keeps its held lease, not yet renewed");
                    let mut held = live;
                    held.freshness.last_known_good = true;
                    let credential = credential::credential(&held, None)?;
                    return Ok(Some(Resumed::Held(held, credential)));
                }
                Err(error) => return Err(error),
            };
            return match step {
                Step::Renewed(renewed) => {
                    self.report(&event(Action::Renew, Outcome::Success, caller, &renewed));
                    let credential = credential::credential(&renewed, None)?;
                    Ok(Some(Resumed::Held(renewed, credential)))
                }
                Step::Rotated(rotation) => {
                    let Rotation {
                        live,
                        credential,
                        old,
                    } = *rotation;
                    self.supersede(old, caller).await;
                    Ok(Some(Resumed::Rotated(live, credential)))
                }
            };
        }
        let credential = credential::credential(&live, None)?;
        Ok(Some(Resumed::Held(live, credential)))
    }

    /// When the next renewal or rotation of `live` is due (from now).
    pub fn due_in(&self, live: &Live, jitter: f64) -> Option<Duration> {
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
                .lease_renew(lease.expose(), binding.ttl, Some(vault_stamp))
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
                    .lease_revoke(lease.expose(), Some(vault_stamp))
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
        if let (Source::Database(_), true, Some(lease)) =
            (&binding.source, live.renewable, &live.lease)
        {
            match self
                .vault
                .lease_renew(lease.expose(), binding.ttl, Some(&stamp(&caller.identity)))
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
        let (new, credential) = self.issue(binding, caller).await?;
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
        let outcome = match (&binding.source, &live.lease) {
            (Source::Database(_), Some(lease)) => self
                .vault
                .lease_revoke(lease.expose(), Some(&vault_stamp))
                .await
                .map_err(Self::vault_error(binding)),
            (Source::Pki(pki), Some(serial)) => self
                .vault
                .pki_revoke(&pki.mount, serial.expose(), Some(&vault_stamp))
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

    /// The live credential a held handle names, for revocation.
    ///
    /// # Errors
    /// [`Error::Handle`] for a forged handle or one of another pod.
    pub fn held(
        &self,
        binding: &Arc<Binding>,
        identity: &Identity,
        held: &Handle,
    ) -> Result<Live, Error> {
        let pod_uid = holder_uid(identity);
        let claims = self.keys.open(held, &binding.name, pod_uid)?;
        Ok(Live {
            binding: binding.clone(),
            version: claims.version,
            issued_at: from_unix(claims.issued_at),
            not_after: None,
            renewable: false,
            lease: (!claims.lease.is_empty()).then(|| LeaseId::new(claims.lease)),
            handle: held.clone(),
            freshness: Freshness::confirmed_at(from_unix(claims.issued_at)),
        })
    }
}

/// The freshness of a held lease served while Vault does not answer: last
/// confirmed when it was issued or renewed, and marked as not confirmed since.
fn not_renewed(confirmed_at: SystemTime) -> Freshness {
    Freshness {
        confirmed_at,
        last_known_good: true,
    }
}

#[cfg(test)]
mod tests;
