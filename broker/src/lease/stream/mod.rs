//! One open `Watch` stream's state machine: it pushes KV changes, renews and
//! rotates the caller's leases while it is open, and ends with a reason the
//! client can match ([`StreamEnd`]): the token expired, the replica is
//! shutting down, a lease was lost, or the policy changed a binding on it.
//! Also the per-pod count of open streams on leased bindings.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt};
use tessera_proto::{
    reason::StreamEnd,
    v1::{Credential, WatchResponse},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{
    Caller, Engine, Live, Step, credential,
    schedule::{RETRY_MAX, retry_in},
};
use crate::{
    audit::{Action, Outcome},
    error::Error,
    feed::{Fed, Latest},
    identity::Verifier,
    metrics::Metrics,
    policy::{Binding, store::PolicyStore},
};

mod narrowing;
mod slots;

pub use narrowing::Narrowing;
pub use slots::Slots;
use slots::open;

/// Most open `Watch` streams one pod may hold on one leased binding: each
/// holds a live lease (a database user), so a pod cannot mint without bound.
/// A few allow for a reconnect racing the old stream's end.
pub const MAX_STREAMS_PER_POD_BINDING: usize = 4;

/// What every open stream shares.
pub struct Streams {
    /// Renews, rotates and revokes the streams' leases.
    pub engine: Arc<Engine>,
    /// The live policy, followed for changes to the stream's bindings.
    pub policy: Arc<PolicyStore>,
    /// Whether a caller's pod still exists, when a stream is hung up on.
    pub verifier: Arc<Verifier>,
    /// Gauges of open streams and leases.
    pub metrics: Arc<Metrics>,
    /// Ends every stream (with `SHUTTING_DOWN`).
    pub shutdown: CancellationToken,
    /// Open streams per pod UID and leased binding.
    counts: Arc<Mutex<HashMap<(String, String), usize>>>,
}

impl Streams {
    /// Shared state for the streams of one broker.
    pub fn new(
        engine: Arc<Engine>,
        policy: Arc<PolicyStore>,
        verifier: Arc<Verifier>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            engine,
            policy,
            verifier,
            metrics,
            shutdown,
            counts: Arc::default(),
        }
    }

    /// Counts a new stream of the caller's pod on each leased binding.
    ///
    /// # Errors
    /// [`Error::TooManyStreams`] past [`MAX_STREAMS_PER_POD_BINDING`], with
    /// the binding. Tokens that name no pod are not counted (their rate
    /// limit still applies).
    pub fn open(&self, caller: &Caller, bindings: &[Arc<Binding>]) -> Result<Slots, Error> {
        open(&self.counts, caller, bindings)
    }
}

/// Where a stream's messages go. Boxed: a channel holds its first block of
/// 32 slots from the start, 32 × 240 bytes unboxed, for every open stream.
pub type Outbox = mpsc::Sender<Result<Box<WatchResponse>, Status>>;

/// A leased credential on a stream: when to act on it, failures so far.
struct Pending {
    live: Live,
    due: Instant,
    failures: u32,
}

/// One open `Watch` stream.
pub struct OpenStream {
    shared: Arc<Streams>,
    caller: Caller,
    /// The bindings as granted (and narrowed), and the policy generation
    /// that granted them.
    bindings: Vec<Arc<Binding>>,
    generation: u64,
    /// The caller's own shorter TTLs, per binding.
    narrowing: Narrowing,
    tx: Outbox,
    /// Per KV binding: the version sent, and whether it was sent as
    /// last-known-good.
    kv_sent: HashMap<String, (String, bool)>,
    leased: HashMap<String, Pending>,
    _slots: Slots,
}

impl OpenStream {
    /// A stream for `caller` over `bindings` (granted by policy generation
    /// `generation`), sending on `tx`.
    pub fn new(
        shared: Arc<Streams>,
        caller: Caller,
        (generation, bindings, narrowing): (u64, Vec<Arc<Binding>>, Narrowing),
        tx: Outbox,
        slots: Slots,
    ) -> Self {
        Self {
            shared,
            caller,
            bindings,
            generation,
            narrowing,
            tx,
            kv_sent: HashMap::new(),
            leased: HashMap::new(),
            _slots: slots,
        }
    }

    /// Takes over a credential already sent as the stream's first message:
    /// a lease is scheduled for renewal, a KV version remembered.
    pub fn delivered(&mut self, live: Live) {
        if live.binding.source.is_leased() {
            self.schedule(live, 0);
        } else {
            self.kv_sent.insert(
                live.binding.name.clone(),
                (live.version.clone(), live.freshness.last_known_good),
            );
        }
    }

    fn schedule(&mut self, live: Live, failures: u32) {
        let due = if failures == 0 {
            match self.shared.engine.due_in(&live, fastrand::f64()) {
                Some(due) => due,
                // Neither a lease nor an end: nothing to renew or re-read.
                None if live.lease.is_none() && live.not_after.is_none() => return,
                None => RETRY_MAX,
            }
        } else {
            retry_in(failures, fastrand::f64())
        };
        self.leased.insert(
            live.binding.name.clone(),
            Pending {
                live,
                due: Instant::now() + due,
                failures,
            },
        );
    }

    async fn send(&self, credential: Credential) -> bool {
        self.tx
            .send(Ok(Box::new(WatchResponse {
                credential: Some(credential),
            })))
            .await
            .is_ok()
    }

    /// Runs until the caller hangs up or the stream ends for a reason.
    ///
    /// It waits most of a pod's life, once per open stream: what it does
    /// when woken is boxed, so the waiting task holds only what waiting
    /// needs (6 KiB a stream before, 10,000 streams on a replica).
    pub async fn run(mut self, mut changes: impl Stream<Item = (Arc<Binding>, Latest)> + Unpin) {
        let gauge = self.shared.metrics.watch_streams.clone();
        gauge.inc();
        let _open = scopeguard(move || {
            gauge.dec();
        });
        let expires_in = Duration::from_secs(self.caller.identity.expires_at).saturating_sub(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let expiry = tokio::time::sleep(expires_in);
        tokio::pin!(expiry);
        let shutdown = self.shared.shutdown.clone();
        let mut policy_changes = self.shared.policy.changes();
        let mut watching_kv = true;
        let mut leases = self.shared.metrics.lease_tracker();
        loop {
            leases.set(self.leased.keys());
            let next_due = self.leased.values().map(|p| p.due).min();
            let end = tokio::select! {
                () = self.tx.closed() => {
                    Box::pin(self.closed()).await;
                    return;
                }
                () = &mut expiry => StreamEnd::TokenExpired.status(
                    "service-account token expired; reconnect with the current token",
                ),
                () = shutdown.cancelled() => {
                    StreamEnd::ShuttingDown.status("broker is shutting down; reconnect")
                }
                changed = policy_changes.changed() => match changed {
                    Ok(()) => match Box::pin(self.policy_changed()).await {
                        Some(end) => end,
                        None => continue,
                    },
                    // The store is gone: the broker is stopping.
                    Err(_) => StreamEnd::ShuttingDown.status("broker is shutting down; reconnect"),
                },
                change = changes.next(), if watching_kv => match change {
                    Some((binding, Some(fed))) => {
                        if !Box::pin(self.kv_changed(&binding, &fed)).await {
                            Box::pin(self.closed()).await;
                            return;
                        }
                        continue;
                    }
                    Some((_, None)) => continue,
                    // No KV binding on this stream (or its feeds ended).
                    None => {
                        watching_kv = false;
                        continue;
                    }
                },
                () = crate::clock::sleep_until(next_due) => match Box::pin(self.act_on_due()).await {
                    Ok(()) => continue,
                    Err(Some(end)) => end,
                    Err(None) => {
                        Box::pin(self.closed()).await;
                        return;
                    }
                },
            };
            let _ = self.tx.send(Err(end)).await;
            return;
        }
    }

    /// The end of the stream when a new policy generation changed or
    /// withdrew one of its bindings; leases of withdrawn bindings are
    /// revoked at once (deny by default).
    async fn policy_changed(&mut self) -> Option<Status> {
        let loaded = self.shared.policy.current();
        if loaded.generation == self.generation {
            return None;
        }
        self.generation = loaded.generation;
        let changed = changed_bindings(&self.bindings, |name| {
            loaded
                .policy
                .lookup(&self.caller.identity, name)
                .map(|binding| self.narrowing.apply(binding))
        });
        if changed.is_empty() {
            return None;
        }
        for (name, withdrawn) in &changed {
            if !withdrawn {
                continue;
            }
            if let Some(pending) = self.leased.remove(name) {
                let reason = format!("grant withdrawn by policy generation {}", loaded.generation);
                let _ = self
                    .shared
                    .engine
                    .revoke(&pending.live, &self.caller, &reason)
                    .await;
            }
        }
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        tracing::info!(bindings = ?names, generation = loaded.generation, "the policy changed bindings on this stream; ending it");
        Some(StreamEnd::PolicyChanged.status(format!(
            "policy generation {} changed or withdrew {}; reconnect",
            loaded.generation,
            names.join(", ")
        )))
    }

    /// Pushes a new KV version, or an `unchanged` notice when the version
    /// the pod holds turned last-known-good or was confirmed again; false
    /// when the caller is gone.
    async fn kv_changed(&mut self, binding: &Arc<Binding>, fed: &Fed) -> bool {
        let version = fed.secret.version.to_string();
        let stale = fed.freshness.last_known_good;
        let engine = &self.shared.engine;
        let (mut live, mut credential) = Engine::kv_credential(binding, fed);
        // Behind the second gate the new version is read with the pod's own
        // token (the feed only said it changed); Vault may refuse it.
        if binding.gate.is_some()
            && self
                .kv_sent
                .get(&binding.name)
                .is_none_or(|(sent, _)| *sent != version)
        {
            credential = match engine.issue(binding, &self.caller, None).await {
                Ok((read, pushed)) => {
                    live = read;
                    Ok(pushed)
                }
                Err(error) => Err(error),
            };
        }
        match self.kv_sent.get(&binding.name) {
            Some((sent, was_stale)) if *sent == version => {
                if *was_stale == stale {
                    return true;
                }
                self.kv_sent.insert(binding.name.clone(), (version, stale));
                tracing::info!(binding = %binding.name, last_known_good = stale, "freshness changed; telling the pod");
                return match credential::credential(&live, None) {
                    Ok(notice) => self.send(notice).await,
                    Err(_) => true,
                };
            }
            _ => {}
        }
        let credential = match credential {
            Ok(credential) => credential,
            Err(error) => {
                // The pod keeps its current files; the security team hears of it.
                tracing::warn!(%error, "cannot render a changed credential; the pod keeps the previous version");
                let mut event = super::event(Action::Rotate, Outcome::Error, &self.caller, &live);
                event.reason = Some(error.to_string());
                engine.report(&event);
                self.kv_sent.insert(binding.name.clone(), (version, stale));
                return true;
            }
        };
        tracing::info!(binding = %binding.name, %version, "credential changed; pushing");
        engine.report(&super::event(
            Action::Rotate,
            Outcome::Success,
            &self.caller,
            &live,
        ));
        self.kv_sent.insert(binding.name.clone(), (version, stale));
        self.send(credential).await
    }

    /// Renews or rotates every lease that is due. `Err(None)` when the
    /// caller is gone; `Err(Some(status))` ends the stream (a lease lost).
    async fn act_on_due(&mut self) -> Result<(), Option<Status>> {
        let now = Instant::now();
        let due: Vec<String> = self
            .leased
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(name, _)| name.clone())
            .collect();
        let engine = self.shared.engine.clone();
        for name in due {
            let Some(Pending { live, failures, .. }) = self.leased.remove(&name) else {
                continue;
            };
            match engine.renew_or_rotate(&live, &self.caller).await {
                Ok(Step::Renewed(renewed)) => {
                    tracing::info!(binding = %name, "lease renewed");
                    engine.report(&super::event(
                        Action::Renew,
                        Outcome::Success,
                        &self.caller,
                        &renewed,
                    ));
                    let notice = credential::credential(&renewed, None);
                    self.schedule(renewed, 0);
                    if let Ok(notice) = notice
                        && !self.send(notice).await
                    {
                        return Err(None);
                    }
                }
                Ok(Step::Confirmed(confirmed)) => self.schedule(confirmed, 0),
                Ok(Step::Rotated(rotation)) => {
                    let super::Rotation {
                        live: new,
                        credential,
                        old,
                    } = *rotation;
                    tracing::info!(binding = %name, version = %new.version, "credential rotated; pushing");
                    engine.report(&super::event(
                        Action::Rotate,
                        Outcome::Success,
                        &self.caller,
                        &new,
                    ));
                    self.schedule(new, 0);
                    // The superseded lease's end is made durable (shortened in
                    // Vault, recorded) before the pod can see its successor.
                    engine.supersede(old, &self.caller).await;
                    if !self.send(credential).await {
                        return Err(None);
                    }
                }
                Err(error) => {
                    tracing::warn!(binding = %name, %error, failures = failures + 1, "renewal failed; the pod keeps its current credential; retrying");
                    if failures == 0 {
                        let mut event =
                            super::event(Action::Renew, Outcome::Error, &self.caller, &live);
                        event.reason = Some(error.to_string());
                        engine.report(&event);
                    }
                    if live.not_after.is_some_and(|end| end <= SystemTime::now()) {
                        return Err(Some(StreamEnd::LeaseLost.status_for(
                            format!(
                                "binding `{name}`: the lease ended and could be neither renewed nor replaced ({error}); reconnect without its handle"
                            ),
                            Some(&name),
                        )));
                    }
                    self.schedule(live, failures + 1);
                }
            }
        }
        Ok(())
    }

    /// The caller hung up. A restarting sidecar resumes with its handles; a
    /// deleted or completed pod will not, so its leases are revoked now
    /// (when the broker can see pods). Otherwise the reconciler revokes them
    /// once the pod is gone or completed, or they expire by their TTL.
    async fn closed(&mut self) {
        let gated = self.bindings.iter().any(|b| b.gate.is_some());
        if self.leased.is_empty() && !gated {
            return;
        }
        let reason = match self.shared.verifier.pod_life(&self.caller.identity).await {
            Some(crate::identity::PodLife::Gone) => "pod deleted",
            Some(crate::identity::PodLife::Completed) => "pod completed",
            _ => return,
        };
        for pending in self.leased.values() {
            let _ = self
                .shared
                .engine
                .revoke(&pending.live, &self.caller, reason)
                .await;
        }
        if gated {
            self.shared
                .engine
                .end_pod_tokens(&self.caller.identity)
                .await;
        }
    }
}

/// The bindings of a stream that a new policy changed, as (name, whether the
/// grant was withdrawn); `now` looks a binding up as the new policy grants it.
fn changed_bindings(
    bindings: &[Arc<Binding>],
    now: impl Fn(&str) -> Option<Binding>,
) -> Vec<(String, bool)> {
    bindings
        .iter()
        .filter_map(|binding| match now(&binding.name) {
            Some(current) if current == **binding => None,
            current => Some((binding.name.clone(), current.is_none())),
        })
        .collect()
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests;
