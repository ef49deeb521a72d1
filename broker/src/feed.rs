//! Change feeds: one poller per KV v2 secret of the policy, shared by every
//! `Watch` stream that needs it, so a thousand watching pods cost Vault one
//! metadata read per interval instead of a thousand; its last good read is
//! what the replica serves while Vault is away.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    membership::Peers,
    policy::{Kv2Source, Source, store::PolicyStore},
    tasks::Spawner,
    vault::{KvSecret, Vault},
};

/// When Vault last vouched for a credential's values, and whether the
/// broker serves them from its last-known-good copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// When Vault last confirmed the values (issued, renewed, looked up, or
    /// a KV read that found them current).
    pub confirmed_at: SystemTime,
    /// Vault did not answer the last check: the values may be outdated.
    pub last_known_good: bool,
}

impl Freshness {
    /// Confirmed by Vault just now.
    pub fn now() -> Self {
        Self::confirmed_at(SystemTime::now())
    }

    /// Confirmed by Vault at `at`.
    pub fn confirmed_at(at: SystemTime) -> Self {
        Self {
            confirmed_at: at,
            last_known_good: false,
        }
    }
}

/// A feed's last good read and how fresh it is.
#[derive(Clone, Debug)]
pub struct Fed {
    /// The latest version read.
    pub secret: Arc<KvSecret>,
    /// When Vault last confirmed it, and whether its last check failed.
    pub freshness: Freshness,
}

/// What a feed holds: nothing until its first successful read.
pub type Latest = Option<Fed>;

/// Starts and shares one poller per source; a poller stops when its last
/// subscriber is gone.
pub struct Feeds {
    vault: Arc<Vault>,
    interval: Duration,
    shutdown: CancellationToken,
    pollers: Spawner,
    senders: Arc<Mutex<HashMap<Kv2Source, watch::Sender<Latest>>>>,
    /// What keeps a poller on every KV source of the policy.
    warm: Mutex<HashMap<Kv2Source, watch::Receiver<Latest>>>,
    /// Poll intervals by source: the shortest of the policy's bindings
    /// (`refreshInterval`, else the default).
    intervals: Arc<Mutex<HashMap<Kv2Source, Duration>>>,
    /// The cluster this replica shares the polling with; alone when `None`.
    peers: Option<Arc<Peers>>,
    /// Each change this replica read from Vault, for its peers.
    changes: broadcast::Sender<(Kv2Source, Fed)>,
    /// Copies peers sent for sources this replica has no feed of yet.
    pending: Mutex<HashMap<Kv2Source, Fed>>,
    /// What wakes each poller at once: Vault's change feed naming its secret.
    nudges: Arc<Mutex<HashMap<Kv2Source, Arc<Notify>>>>,
    /// Vault's change feed, when configured: while it is up, secrets are
    /// polled only at its long backstop interval.
    change_feed: Option<Arc<ChangeFeedState>>,
}

/// Whether Vault's change feed reaches this replica, and the polling it
/// allows while it does.
#[derive(Debug)]
pub struct ChangeFeedState {
    up: std::sync::atomic::AtomicBool,
    changed: Notify,
    /// The poll interval while the feed is up (a backstop, e.g. 5 minutes).
    pub backstop: Duration,
    /// Where canary requests go (`<records mount>/feed-check/`).
    canary_prefix: String,
    /// The canary this replica waits for, and whether it came.
    canary: Mutex<Option<String>>,
    canary_seen: std::sync::atomic::AtomicBool,
    /// What this replica tells its peers of the feed.
    relay: broadcast::Sender<FeedNote>,
    /// The verdict of the replica that checks the feed for the cluster,
    /// and when it came.
    owners_verdict: Mutex<Option<(bool, std::time::Instant)>>,
}

/// What a replica tells its peers of Vault's change feed.
#[derive(Clone, Debug)]
pub enum FeedNote {
    /// A peer's canary request reached this replica's feed.
    Canary(String),
    /// This replica checks the feed for the cluster (it owns
    /// [`FEED_CHECK`]): whether its last canary came back.
    Up(bool),
}

/// The ownership key of the change feed's check: among peers one replica
/// sends the canary requests and tells the others what it found.
pub const FEED_CHECK: &str = "change feed canary";

impl ChangeFeedState {
    /// A feed not heard from yet (down: the short interval applies), whose
    /// canaries go under `records_mount`.
    pub fn new(backstop: Duration, records_mount: &str) -> Self {
        Self {
            up: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
            backstop,
            canary_prefix: format!("{records_mount}/feed-check/"),
            canary: Mutex::new(None),
            canary_seen: std::sync::atomic::AtomicBool::new(false),
            relay: broadcast::channel(64).0,
            owners_verdict: Mutex::new(None),
        }
    }

    /// A new canary to wait for; its request path.
    pub fn new_canary(&self) -> String {
        let path = format!("{}{:016x}", self.canary_prefix, fastrand::u64(..));
        *self.canary.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
        self.canary_seen
            .store(false, std::sync::atomic::Ordering::Relaxed);
        path
    }

    /// Whether the canary waited for came back, here or at a peer.
    pub fn canary_came(&self) -> bool {
        self.canary_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A request path the feed brought (`from_peer`: a peer's feed did):
    /// whether it was a canary. This replica's own marks the feed up; a
    /// peer's reaching this feed is passed on to the peers.
    pub fn canary_arrived(&self, path: &str, from_peer: bool) -> bool {
        if !path.starts_with(&self.canary_prefix) {
            return false;
        }
        let ours = self
            .canary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(path);
        if ours {
            self.canary_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        } else if !from_peer {
            let _ = self.relay.send(FeedNote::Canary(path.to_owned()));
        }
        true
    }

    /// What this replica tells its peers of the feed, as it happens.
    pub fn relayed(&self) -> broadcast::Receiver<FeedNote> {
        self.relay.subscribe()
    }

    /// This replica checked the feed for the cluster and found it `up` (or
    /// not): its peers hear it.
    pub fn tell_peers(&self, up: bool) {
        let _ = self.relay.send(FeedNote::Up(up));
    }

    /// The verdict of the replica that checks the feed for the cluster.
    pub fn owner_found(&self, up: bool) {
        *self
            .owners_verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((up, std::time::Instant::now()));
    }

    /// Whether the checking replica's last verdict, heard within `max_age`,
    /// says the feed is up (silent when none is that recent).
    pub fn owner_says_up(&self, max_age: Duration) -> bool {
        self.owners_verdict
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|(up, at)| up && at.elapsed() <= max_age)
    }

    /// Whether the feed reaches this replica.
    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records whether the feed reaches this replica; pollers waiting at the
    /// other interval wake when it changes. Whether it changed.
    pub fn set_up(&self, up: bool) -> bool {
        let was = self.up.swap(up, std::sync::atomic::Ordering::Relaxed);
        if was != up {
            self.changed.notify_waiters();
        }
        was != up
    }
}

impl Feeds {
    /// Feeds that poll Vault every `interval` until `shutdown`, each poller
    /// spawned on `pollers`.
    pub fn new(
        vault: Arc<Vault>,
        interval: Duration,
        pollers: Spawner,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            vault,
            interval,
            shutdown,
            pollers,
            senders: Arc::default(),
            warm: Mutex::default(),
            intervals: Arc::default(),
            peers: None,
            changes: broadcast::channel(CHANGES_BUFFER).0,
            pending: Mutex::default(),
            nudges: Arc::default(),
            change_feed: None,
        }
    }

    /// These feeds, woken by Vault's change feed (`state`): while it is up
    /// they poll only at its backstop interval.
    #[must_use]
    pub fn with_change_feed(mut self, state: Arc<ChangeFeedState>) -> Self {
        self.change_feed = Some(state);
        self
    }

    /// Wakes the pollers of every KV source that Vault request path
    /// `request_path` writes or deletes (`<mount>/data/<path>`, `metadata`,
    /// `delete`, `undelete`, `destroy`) in `namespace` (none: the broker's
    /// own): Vault's change feed saw it. At most a re-read: the feed carries
    /// no values. How many pollers were woken.
    pub fn nudge(&self, request_path: &str, namespace: Option<&str>) -> usize {
        const VERBS: [&str; 5] = ["data", "metadata", "delete", "undelete", "destroy"];
        let nudges = self.nudges.lock().unwrap_or_else(|p| p.into_inner());
        let mut woken = 0;
        for (source, notify) in nudges.iter() {
            let names = VERBS.iter().any(|verb| {
                request_path
                    .strip_prefix(source.mount.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .and_then(|rest| rest.strip_prefix(verb))
                    .and_then(|rest| rest.strip_prefix('/'))
                    == Some(source.path.as_str())
            });
            if names && source.namespace.as_deref() == namespace {
                notify.notify_one();
                woken += 1;
            }
        }
        woken
    }

    /// Vault's change feed, when configured.
    pub fn change_feed(&self) -> Option<&Arc<ChangeFeedState>> {
        self.change_feed.as_ref()
    }

    /// The Vault these feeds read.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The replicas these feeds share the polling with, when any.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// These feeds, sharing the polling with `peers`: a source is read from
    /// Vault only while this replica owns it; the others' copies come from
    /// their owners ([`Feeds::offer`]).
    #[must_use]
    pub fn shared_with(mut self, peers: Arc<Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// A copy a peer holds of `source`: taken when it is newer than this
    /// replica's, or the same version with news of its freshness.
    pub fn offer(&self, source: Kv2Source, fed: Fed) {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = senders.get(&source) else {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let newer = pending
                .get(&source)
                .is_none_or(|held| held.secret.version <= fed.secret.version);
            if newer {
                pending.insert(source, fed);
            }
            return;
        };
        sender.send_if_modified(|latest| match latest {
            Some(held) if held.secret.version > fed.secret.version => false,
            Some(held) if held.secret.version == fed.secret.version => {
                let news = held.freshness.last_known_good != fed.freshness.last_known_good;
                held.freshness = fed.freshness;
                news
            }
            _ => {
                *latest = Some(fed);
                true
            }
        });
    }

    /// A read of `source` made for a pod, with the broker's own token,
    /// while this replica held no copy of it yet (the secret was written
    /// after the poller's last check, or its first read is on its way):
    /// kept when a poller follows the source, so the pods after it are
    /// served from memory, not each with a Vault read of its own, until
    /// the next check. Never replaces a newer version.
    pub fn keep(&self, source: &Kv2Source, fed: Fed) {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = senders.get(source) {
            sender.send_if_modified(|latest| {
                let newer = latest
                    .as_ref()
                    .is_none_or(|held| held.secret.version < fed.secret.version);
                if newer {
                    *latest = Some(fed);
                }
                newer
            });
        }
    }

    /// Every source's last good read this replica holds, for a peer that
    /// starts following it.
    pub fn copies(&self) -> Vec<(Kv2Source, Fed)> {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders
            .iter()
            .filter_map(|(source, sender)| Some((source.clone(), sender.borrow().clone()?)))
            .collect()
    }

    /// The changes this replica reads from Vault from now on (a new
    /// version, or its check failing), for a peer following it.
    pub fn changes(&self) -> broadcast::Receiver<(Kv2Source, Fed)> {
        self.changes.subscribe()
    }

    /// Keeps a poller on each of `sources` (and stops keeping the others),
    /// polling at the interval given (the default when `None`): every
    /// replica then holds a last good read of every KV source in the
    /// policy, so a new pod's KV bindings are served while Vault is away.
    /// Vault's load is one version check per source and replica per poll
    /// interval, whatever the number of pods.
    /// Several bindings of one secret: the shortest interval wins.
    pub fn warm(&self, bindings: Vec<(Kv2Source, Option<Duration>)>) {
        let intervals = shortest_intervals(bindings, self.interval);
        let sources: HashSet<Kv2Source> = intervals.keys().cloned().collect();
        *self.intervals.lock().unwrap_or_else(|p| p.into_inner()) = intervals;
        let mut warm = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        warm.retain(|source, _| sources.contains(source));
        for source in sources {
            if let std::collections::hash_map::Entry::Vacant(slot) = warm.entry(source) {
                let receiver = self.subscribe(slot.key());
                slot.insert(receiver);
            }
        }
    }

    /// How often a source is checked when its binding sets no
    /// `refreshInterval` (`vault.kvPollInterval`).
    pub fn default_interval(&self) -> Duration {
        self.interval
    }

    /// The latest value of `source` when a poller follows it (it is in the
    /// policy, or some stream watches it): its last good read, at most one
    /// poll interval old while Vault answers. `None` otherwise.
    pub fn latest(&self, source: &Kv2Source) -> Latest {
        let senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        senders
            .get(source)
            .and_then(|sender| sender.borrow().clone())
    }

    /// Subscribes to changes of `source`: a new version, or its freshness
    /// turning last-known-good or back (a confirmation alone updates the
    /// value without waking anyone). The receiver's value starts as `None`
    /// until the poller's first successful read.
    pub fn subscribe(&self, source: &Kv2Source) -> watch::Receiver<Latest> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = senders.get(source) {
            return sender.subscribe();
        }
        let seed = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
        let (sender, receiver) = watch::channel(seed);
        senders.insert(source.clone(), sender.clone());
        let nudge = Arc::new(Notify::new());
        self.nudges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.clone(), nudge.clone());
        self.pollers.spawn(poll(
            self.vault.clone(),
            source.clone(),
            Poller {
                sender,
                interval: Interval {
                    default: self.interval,
                    set: self.intervals.clone(),
                },
                peers: self.peers.clone(),
                changes: self.changes.clone(),
                nudge,
                nudges: self.nudges.clone(),
                change_feed: self.change_feed.clone(),
            },
            self.shutdown.clone(),
            self.senders.clone(),
        ));
        receiver
    }
}

/// Each source's poll interval: the shortest its bindings ask for, a
/// binding without `refreshInterval` asking for `default`.
fn shortest_intervals(
    bindings: Vec<(Kv2Source, Option<Duration>)>,
    default: Duration,
) -> HashMap<Kv2Source, Duration> {
    let mut intervals: HashMap<Kv2Source, Duration> = HashMap::new();
    for (source, interval) in bindings {
        let interval = interval.unwrap_or(default);
        intervals
            .entry(source)
            .and_modify(|shortest| *shortest = (*shortest).min(interval))
            .or_insert(interval);
    }
    intervals
}

/// A poller's interval: the policy's for its source, else the default;
/// read at every poll, so a policy change applies at the next one.
struct Interval {
    default: Duration,
    set: Arc<Mutex<HashMap<Kv2Source, Duration>>>,
}

impl Interval {
    fn of(&self, source: &Kv2Source) -> Duration {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .copied()
            .unwrap_or(self.default)
    }
}

/// What a poller keeps besides its source: where it publishes, how often
/// it reads, and with whom it shares the reading.
struct Poller {
    sender: watch::Sender<Latest>,
    interval: Interval,
    peers: Option<Arc<Peers>>,
    changes: broadcast::Sender<(Kv2Source, Fed)>,
    nudge: Arc<Notify>,
    nudges: Arc<Mutex<HashMap<Kv2Source, Arc<Notify>>>>,
    change_feed: Option<Arc<ChangeFeedState>>,
}

async fn poll(
    vault: Arc<Vault>,
    source: Kv2Source,
    poller: Poller,
    shutdown: CancellationToken,
    senders: Arc<Mutex<HashMap<Kv2Source, watch::Sender<Latest>>>>,
) {
    let Poller {
        sender,
        interval,
        peers,
        changes,
        nudge,
        nudges,
        change_feed,
    } = poller;
    let key = crate::membership::source_key(&source);
    let mut known: Option<u64> = None;
    let mut owned = true;
    let mut nudged = false;
    let mut last_read = tokio::time::Instant::now()
        .checked_sub(NUDGE_GAP)
        .unwrap_or_else(tokio::time::Instant::now);
    loop {
        // Stop when nobody listens; decided under the lock that subscribe takes,
        // so a new subscriber either finds this sender or starts a new poller.
        {
            let mut map = senders.lock().unwrap_or_else(|p| p.into_inner());
            if sender.receiver_count() == 0 || shutdown.is_cancelled() {
                map.remove(&source);
                nudges
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&source);
                return;
            }
        }
        // Another live replica reads it for the cluster: its copies come by
        // the peer channel, and this one looks again shortly (its owner may
        // go). Named by Vault's change feed here, it is read here at once.
        if !nudged && peers.as_ref().is_some_and(|peers| !peers.owns(&key)) {
            owned = false;
            nudged = tokio::select! {
                () = shutdown.cancelled() => false,
                () = tokio::time::sleep(OWNERSHIP_CHECK) => false,
                () = nudge.notified() => true,
            };
            continue;
        }
        // However many entries name it, the secret is read at most once per
        // NUDGE_GAP on their account: a flood of forged ones cannot turn
        // into a flood of Vault reads.
        if nudged {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep_until(last_read + NUDGE_GAP) => {}
            }
        }
        last_read = tokio::time::Instant::now();
        if !owned && !nudged {
            owned = true;
            known = sender.borrow().as_ref().map(|fed| fed.secret.version);
            tracing::info!(mount = %source.mount, path = %source.path, "this replica now reads the KV secret for the cluster");
            // The copy the last owner confirmed is checked when that check
            // falls due, not at once: a source that moves (its owner gone,
            // or back after a missed heartbeat) costs Vault no extra read.
            let every = next_interval(&interval, &source, change_feed.as_deref(), false);
            let due = sender
                .borrow()
                .as_ref()
                .and_then(|fed| until_due(fed, every));
            if let Some(wait) = due {
                nudged = pause(wait, &shutdown, &nudge, change_feed.as_deref()).await;
                continue;
            }
        }
        // A version a peer read and passed on is known here too: the replica
        // that Vault's change feed reached reads a change for the cluster,
        // and the owner must not read it again at its next check.
        let held = sender.borrow().as_ref().map(|fed| fed.secret.version);
        known = known.max(held);
        // A failed check is retried at the default interval at the latest:
        // a long refreshInterval must not leave an outage unnoticed for hours.
        let mut failed = false;
        match vault.kv2_version(&source).await {
            Ok(version) if known != Some(version) => {
                match vault.read_kv2(&source, None, None).await {
                    Ok(secret) => {
                        tracing::debug!(mount = %source.mount, path = %source.path, version = secret.version, "KV secret changed");
                        known = Some(secret.version);
                        let fed = Fed {
                            secret: Arc::new(secret),
                            freshness: Freshness::now(),
                        };
                        sender.send_replace(Some(fed.clone()));
                        let _ = changes.send((source.clone(), fed));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "reading a changed KV secret failed; will retry");
                        stale(&sender, &changes, &source);
                        failed = true;
                    }
                }
            }
            Ok(_) => {
                sender.send_if_modified(confirmed);
                // Peers take the confirmation too: their copy's
                // `confirmed_at` stays as fresh as the owner's.
                if peers.is_some()
                    && let Some(fed) = sender.borrow().clone()
                {
                    let _ = changes.send((source.clone(), fed));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "polling a KV secret's version failed; will retry");
                stale(&sender, &changes, &source);
                failed = true;
            }
        }
        let every = next_interval(&interval, &source, change_feed.as_deref(), failed);
        let jitter = every.mul_f64(fastrand::f64() * 0.1);
        nudged = pause(every + jitter, &shutdown, &nudge, change_feed.as_deref()).await;
    }
}

/// How long a poller waits for its next check. While Vault's change feed
/// is up, polling is only its backstop; a failed check is retried at the
/// default interval at the latest.
fn next_interval(
    interval: &Interval,
    source: &Kv2Source,
    change_feed: Option<&ChangeFeedState>,
    failed: bool,
) -> Duration {
    match (failed, change_feed.filter(|feed| feed.is_up())) {
        (true, _) => interval.of(source).min(interval.default),
        (false, Some(feed)) => feed.backstop,
        (false, None) => interval.of(source),
    }
}

/// How long until a copy Vault confirmed is due its next check, `every`
/// after the confirmation (with the polls' 0–10 % jitter), never longer
/// than one interval from now (the confirmation time is the last owner's
/// clock); `None` when it is due now or was not confirmed at its last check.
fn until_due(fed: &Fed, every: Duration) -> Option<Duration> {
    if fed.freshness.last_known_good {
        return None;
    }
    let jitter = every.mul_f64(fastrand::f64() * 0.1);
    (fed.freshness.confirmed_at + every + jitter)
        .duration_since(SystemTime::now())
        .ok()
        .map(|wait| wait.min(every + jitter))
}

/// Waits `wait`, or less: until shutdown, a nudge from Vault's change feed
/// (then `true`: read at once), or the feed going up or silent.
async fn pause(
    wait: Duration,
    shutdown: &CancellationToken,
    nudge: &Notify,
    change_feed: Option<&ChangeFeedState>,
) -> bool {
    let feed_changed = async {
        match change_feed {
            Some(feed) => feed.changed.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => false,
        () = nudge.notified() => true,
        () = feed_changed => false,
    }
}

/// Vault did not answer a check: the held version turns last-known-good,
/// and the peers hear of it.
fn stale(
    sender: &watch::Sender<Latest>,
    changes: &broadcast::Sender<(Kv2Source, Fed)>,
    source: &Kv2Source,
) {
    if sender.send_if_modified(went_stale)
        && let Some(fed) = sender.borrow().clone()
    {
        let _ = changes.send((source.clone(), fed));
    }
}

/// The shortest time between two reads of one secret that Vault's change
/// feed asked for.
const NUDGE_GAP: Duration = Duration::from_secs(1);

/// How often a replica that does not own a source looks whether it does now.
const OWNERSHIP_CHECK: Duration = Duration::from_secs(1);

/// Changes kept for a slow peer before it must take every copy again.
const CHANGES_BUFFER: usize = 1024;

/// Vault confirmed the held version: stamps it, and wakes the subscribers
/// only when it had gone stale.
fn confirmed(latest: &mut Latest) -> bool {
    latest.as_mut().is_some_and(|fed| {
        let was_stale = fed.freshness.last_known_good;
        fed.freshness = Freshness::now();
        was_stale
    })
}

/// Vault did not answer: the held version is last-known-good from now on;
/// wakes the subscribers when that is news.
fn went_stale(latest: &mut Latest) -> bool {
    latest.as_mut().is_some_and(|fed| {
        let news = !fed.freshness.last_known_good;
        fed.freshness.last_known_good = true;
        news
    })
}

/// Keeps `feeds` warm with every KV source of the current policy, at start
/// and after every policy change, until `shutdown`.
pub async fn keep_warm(policy: Arc<PolicyStore>, feeds: Arc<Feeds>, shutdown: CancellationToken) {
    // Woken by each new policy generation, not by polling the store.
    let mut changes = policy.changes();
    loop {
        let loaded = policy.current();
        let bindings = loaded
            .policy
            .bindings
            .iter()
            .filter_map(|binding| match &binding.source {
                Source::Kv2(kv) => Some((kv.clone(), binding.refresh_interval)),
                _ => None,
            })
            .collect();
        feeds.warm(bindings);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    // The store is gone: nothing will change any more.
                    shutdown.cancelled().await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn fed(last_known_good: bool) -> Latest {
        Some(Fed {
            secret: Arc::new(KvSecret {
                version: 3,
                created: None,
                fields: Default::default(),
            }),
            freshness: Freshness {
                confirmed_at: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
                last_known_good,
            },
        })
    }

    #[test]
    fn a_secret_polls_at_the_shortest_interval_its_bindings_ask_for() {
        let source = |path: &str| Kv2Source {
            mount: "secret".to_owned(),
            path: path.to_owned(),
            keys: None,
            namespace: None,
        };
        let (minute, hour, default) = (
            Duration::from_secs(60),
            Duration::from_secs(3600),
            Duration::from_secs(15),
        );
        let intervals = shortest_intervals(
            vec![
                (source("a"), Some(hour)),
                (source("a"), Some(minute)),
                (source("b"), Some(hour)),
                (source("b"), None),
                (source("c"), Some(hour)),
            ],
            default,
        );
        assert_eq!(intervals[&source("a")], minute);
        assert_eq!(
            intervals[&source("b")],
            default,
            "a binding without one polls at the default"
        );
        assert_eq!(intervals[&source("c")], hour);
    }

    #[test]
    fn a_moved_secret_is_due_one_interval_after_its_last_confirmation_at_most() {
        let every = Duration::from_secs(60);
        let confirmed = |at: SystemTime, last_known_good: bool| {
            let mut latest = fed(last_known_good);
            if let Some(fed) = latest.as_mut() {
                fed.freshness.confirmed_at = at;
            }
            latest.and_then(|fed| until_due(&fed, every))
        };
        let now = SystemTime::now();
        let wait = confirmed(now - Duration::from_secs(20), false).unwrap();
        assert!(
            wait > Duration::from_secs(35) && wait <= Duration::from_secs(46),
            "due 60–66 s after the confirmation: {wait:?}"
        );
        assert_eq!(
            confirmed(now - Duration::from_secs(600), false),
            None,
            "overdue: checked at once"
        );
        assert_eq!(
            confirmed(now, true),
            None,
            "a copy Vault did not confirm is checked at once"
        );
        let ahead = confirmed(now + Duration::from_secs(3600), false).unwrap();
        assert!(
            ahead <= every.mul_f64(1.1),
            "a last owner's clock an hour ahead delays the check by one interval at most: {ahead:?}"
        );
    }

    #[test]
    fn subscribers_wake_when_freshness_flips_not_at_every_confirmation() {
        let mut latest = fed(false);
        assert!(
            !confirmed(&mut latest),
            "a routine confirmation wakes nobody"
        );
        let stamped = latest.as_ref().unwrap().freshness.confirmed_at;
        assert!(
            stamped > SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            "but is stamped"
        );
        assert!(went_stale(&mut latest), "turning last-known-good is news");
        assert!(!went_stale(&mut latest), "once");
        assert_eq!(
            latest.as_ref().unwrap().freshness.confirmed_at,
            stamped,
            "kept"
        );
        assert!(confirmed(&mut latest), "fresh again is news");
        assert!(!latest.unwrap().freshness.last_known_good);
        let mut empty: Latest = None;
        assert!(!went_stale(&mut empty) && !confirmed(&mut empty));
    }
}
