//! # tessera-client
//!
//! Short-lived credentials from Vault for code running in a Kubernetes pod,
//! through the [Tessera](https://github.com/tessera-dev/tessera) broker:
//! KV secrets, dynamic database users and PKI certificates, kept current.
//!
//! The pod authenticates with its projected service-account token (audience
//! `tessera`); the broker answers only for the bindings the security team's
//! policy grants that pod. A [`Client`] keeps the *handle* of every leased
//! credential it receives, so a reconnect (a broker replica restarting, the
//! token expiring) resumes the same database user instead of minting a
//! second one.
//!
//! ```no_run
//! use futures::StreamExt as _;
//!
//! # async fn run() -> Result<(), tessera_client::Error> {
//! // TESSERA_BROKER, TESSERA_CA_FILE and TESSERA_TOKEN_FILE are set by the
//! // webhook when the pod is annotated `tessera.dev/api-client: "true"`.
//! let client = tessera_client::Client::from_env()?;
//!
//! // Once:
//! let set = client.fetch(&["orders-db"]).await?;
//! let db = set.get("orders-db").expect("asked for");
//! println!("user {}", db.text("username").unwrap_or_default());
//!
//! // Or follow every change: the first item holds every binding, then one
//! // item per change (a rotation, a new KV version, a freshness change).
//! let mut changes = Box::pin(client.watch(&["orders-db"]));
//! while let Some(set) = changes.next().await {
//!     let set = set?; // ends with a typed error only when retrying cannot help
//!     let db = set.get("orders-db").expect("asked for");
//!     println!("version {} (last-known-good: {})", db.version, db.last_known_good);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors follow the broker's documented status codes and `ErrorInfo`
//! reasons ([`Error`], [`retry::Reaction`]); retryable ones are retried
//! inside [`Client::watch`] with capped, jittered backoff.

mod credential;
mod error;
pub mod retry;
mod store;
mod target;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::Stream;
pub use tessera_proto as proto;
use tessera_proto::v1::{
    FetchRequest, Held, RevokeRequest, WatchRequest, WatchResponse, broker_client::BrokerClient,
};
use tonic::transport::Channel;

pub use self::{
    credential::{Credential, CredentialSet},
    error::Error,
    target::{BrokerTarget, DEFAULT_CONNECT_TIMEOUT, SetupError, TrustAnchors},
};
use self::{
    retry::{Backoff, Reaction},
    store::Store,
};

/// The broker's address (`https://host:port`), as the webhook sets it.
pub const ENV_BROKER: &str = "TESSERA_BROKER";
/// A PEM file with the CA that signed the broker's certificate.
pub const ENV_CA_FILE: &str = "TESSERA_CA_FILE";
/// The same CA as PEM text (instead of a file).
pub const ENV_CA_PEM: &str = "TESSERA_CA_PEM";
/// The projected service-account token file (audience `tessera`).
pub const ENV_TOKEN_FILE: &str = "TESSERA_TOKEN_FILE";

/// First and longest wait between attempts when the broker is away.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));
/// Longest random wait before reconnecting when the broker asked for it
/// (a replica shutting down ends all its streams at once).
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// What a client holds: every credential received and the handles of the
/// leased ones, shared by its calls and streams; kept in its store too,
/// when it has one.
#[derive(Default)]
struct Holdings {
    set: CredentialSet,
    handles: BTreeMap<String, String>,
    store: Option<Store>,
}

impl Holdings {
    /// Takes in one credential from the broker; whether anything changed.
    fn absorb(&mut self, wire: proto::v1::Credential) -> bool {
        let binding = wire.binding.clone();
        let changed = self.take(wire);
        if let (Some(store), Some(credential)) = (&self.store, self.set.get(&binding)) {
            store.save(credential.to_wire(self.handles.get(&binding)));
        }
        changed
    }

    /// Forgets `binding`, here and in the store.
    fn forget(&mut self, binding: &str) {
        self.handles.remove(binding);
        self.set.remove(binding);
        if let Some(store) = &self.store {
            store.remove(binding);
        }
    }

    fn take(&mut self, wire: proto::v1::Credential) -> bool {
        if !wire.handle.is_empty() {
            self.handles
                .insert(wire.binding.clone(), wire.handle.clone());
        }
        if wire.unchanged {
            // The values are the ones held: only lifetime and freshness move.
            let fresh = Credential::from(wire);
            return match self.set.get_mut(&fresh.binding) {
                Some(held) => {
                    let changed = held.last_known_good != fresh.last_known_good
                        || held.not_after != fresh.not_after;
                    held.not_after = fresh.not_after;
                    held.confirmed_at = fresh.confirmed_at;
                    held.last_known_good = fresh.last_known_good;
                    changed
                }
                None => false,
            };
        }
        self.set.insert(Credential::from(wire));
        true
    }

    /// The handles to present for `bindings`, but for those in `dropped`.
    fn held(&self, bindings: &[String], dropped: &BTreeSet<String>) -> Vec<Held> {
        bindings
            .iter()
            .filter(|b| !dropped.contains(*b))
            .filter_map(|binding| {
                self.handles.get(binding).map(|handle| Held {
                    binding: binding.clone(),
                    handle: handle.clone(),
                })
            })
            .collect()
    }

    /// The held credentials of `bindings`.
    fn subset(&self, bindings: &[String]) -> CredentialSet {
        let mut set = CredentialSet::default();
        for binding in bindings {
            if let Some(credential) = self.set.get(binding) {
                set.insert(credential.clone());
            }
        }
        set
    }
}

/// A client of the broker for one pod. Clones share one connection and
/// what the client holds.
#[derive(Clone)]
pub struct Client {
    target: BrokerTarget,
    holdings: Arc<Mutex<Holdings>>,
    /// One channel for every call (HTTP/2 multiplexes them); dropped after
    /// a transport failure so the next call reconnects, reading the CA again.
    channel: Arc<Mutex<Option<BrokerClient<Channel>>>>,
}

impl Client {
    /// A client for the broker `target` describes.
    pub fn new(target: BrokerTarget) -> Self {
        Self {
            target,
            holdings: Arc::default(),
            channel: Arc::default(),
        }
    }

    /// A client configured from the environment the webhook sets:
    /// [`ENV_BROKER`], [`ENV_CA_FILE`] (or [`ENV_CA_PEM`]) and
    /// [`ENV_TOKEN_FILE`].
    ///
    /// # Errors
    /// [`SetupError::Env`] naming a variable that is missing.
    pub fn from_env() -> Result<Self, SetupError> {
        let var = |name: &'static str| std::env::var(name).map_err(|_| SetupError::Env(name));
        let ca = match (std::env::var(ENV_CA_FILE), std::env::var(ENV_CA_PEM)) {
            (Ok(file), _) => TrustAnchors::File(file.into()),
            (Err(_), Ok(pem)) => TrustAnchors::Pem(pem),
            (Err(_), Err(_)) => return Err(SetupError::Env(ENV_CA_FILE)),
        };
        Ok(Self::new(BrokerTarget {
            uri: var(ENV_BROKER)?,
            ca,
            server_name: None,
            token_file: var(ENV_TOKEN_FILE)?.into(),
            client_identity: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }))
    }

    /// Keeps what this client holds in `dir` as well, a directory on a
    /// memory-backed volume of the pod, and takes back what an earlier
    /// process of the pod left there: after a restart, its leases are
    /// resumed with their handles (the same database user), not reissued.
    ///
    /// # Errors
    /// [`SetupError::Store`] when `dir` cannot be made or is not on tmpfs
    /// or ramfs.
    pub fn with_store(self, dir: &Path) -> Result<Self, SetupError> {
        let store = Store::open(dir)?;
        let stored = store.load();
        {
            let mut holdings = self.holdings();
            for wire in stored {
                holdings.take(wire);
            }
            holdings.store = Some(store);
        }
        Ok(self)
    }

    fn holdings(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared channel, built on first use.
    fn broker(&self) -> Result<BrokerClient<Channel>, SetupError> {
        let mut channel = self.channel.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(broker) = channel.as_ref() {
            return Ok(broker.clone());
        }
        let broker = self.target.client()?;
        *channel = Some(broker.clone());
        Ok(broker)
    }

    /// Forgets the channel when `status` says the transport failed or the
    /// replica is going away: the next call connects anew.
    fn forget_broken(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::Unavailable {
            *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// The typed error for a failed call, forgetting a broken channel.
    fn after(&self, status: tonic::Status) -> Error {
        self.forget_broken(&status);
        Error::from(status)
    }

    /// The current credentials of `bindings`, all or none. Leased ones this
    /// client already holds are resumed (same values, no new lease).
    ///
    /// # Errors
    /// A typed [`Error`]; nothing is retried here.
    pub async fn fetch(&self, bindings: &[&str]) -> Result<CredentialSet, Error> {
        let bindings: Vec<String> = bindings.iter().map(|b| (*b).to_owned()).collect();
        let held = self.holdings().held(&bindings, &BTreeSet::new());
        let request = self.target.request(FetchRequest {
            bindings: bindings.clone(),
            held,
            ..Default::default()
        })?;
        let answer = self
            .broker()?
            .fetch(request)
            .await
            .map_err(|status| self.after(status))?
            .into_inner();
        let mut holdings = self.holdings();
        for credential in answer.credentials {
            holdings.absorb(credential);
        }
        Ok(holdings.subset(&bindings))
    }

    /// Follows `bindings`: the first item holds every binding's credential,
    /// then an item follows every change. Reconnects (resuming with the held
    /// handles, re-reading the token) with capped, jittered backoff after any
    /// retryable error, and at once when the broker asks; ends with the
    /// error when retrying cannot help (a denial, an invalid request).
    pub fn watch(
        &self,
        bindings: &[&str],
    ) -> impl Stream<Item = Result<CredentialSet, Error>> + 'static {
        let state = Watching {
            client: self.clone(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            stream: None,
            backoff: Backoff::new(BACKOFF.0, BACKOFF.1),
            delay: Duration::ZERO,
            dropped: BTreeSet::new(),
            to_receive: 0,
            changed: false,
            yielded: false,
            done: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        })
    }

    /// Gives back the leased credentials this client holds for `bindings`
    /// (their leases end in Vault now); returns the bindings the broker
    /// revoked or released.
    ///
    /// # Errors
    /// A typed [`Error`].
    pub async fn revoke(&self, bindings: &[&str]) -> Result<Vec<String>, Error> {
        let bindings: Vec<String> = bindings.iter().map(|b| (*b).to_owned()).collect();
        let held = self.holdings().held(&bindings, &BTreeSet::new());
        let request = self.target.request(RevokeRequest {
            bindings: bindings.clone(),
            held,
        })?;
        let answer = self
            .broker()?
            .revoke(request)
            .await
            .map_err(|status| self.after(status))?
            .into_inner();
        let mut holdings = self.holdings();
        for binding in &answer.revoked {
            // Given back: neither its handle nor its values are kept.
            holdings.forget(binding);
        }
        Ok(answer.revoked)
    }
}

/// One watch's state between items.
struct Watching {
    client: Client,
    bindings: Vec<String>,
    stream: Option<tonic::Streaming<WatchResponse>>,
    backoff: Backoff,
    delay: Duration,
    /// Bindings whose lease the broker lost: their handles are not
    /// presented until a new credential replaces them.
    dropped: BTreeSet<String>,
    /// First messages still to come on the current stream (one per binding).
    to_receive: usize,
    changed: bool,
    /// Whether the first item went out: it does once every binding is
    /// there, even when everything was resumed from the store unchanged.
    yielded: bool,
    done: bool,
}

impl Watching {
    async fn next(&mut self) -> Option<Result<CredentialSet, Error>> {
        loop {
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                tokio::time::sleep(self.delay).await;
                match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.to_receive = self.bindings.len();
                    }
                    Err(error) => {
                        if let Some(end) = self.failed(error) {
                            return Some(Err(end));
                        }
                    }
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(message)) => {
                    self.backoff.reset();
                    let Some(credential) = message.credential else {
                        continue;
                    };
                    if !credential.handle.is_empty() {
                        self.dropped.remove(&credential.binding);
                    }
                    self.changed |= self.client.holdings().absorb(credential);
                    self.to_receive = self.to_receive.saturating_sub(1);
                    if self.to_receive == 0 && (self.changed || !self.yielded) {
                        self.changed = false;
                        self.yielded = true;
                        return Some(Ok(self.client.holdings().subset(&self.bindings)));
                    }
                }
                Ok(None) => {
                    self.stream = None;
                    self.delay = self.backoff.next_delay();
                }
                Err(status) => {
                    self.stream = None;
                    if let Some(end) = self.ended(status) {
                        return Some(Err(end));
                    }
                }
            }
        }
    }

    async fn open(&self) -> Result<tonic::Streaming<WatchResponse>, Error> {
        let held = self.client.holdings().held(&self.bindings, &self.dropped);
        let request = self.client.target.request(WatchRequest {
            bindings: self.bindings.clone(),
            held,
            ..Default::default()
        })?;
        Ok(self
            .client
            .target
            .client()?
            .watch(request)
            .await?
            .into_inner())
    }

    /// Opening failed: waits and retries, or ends the watch with `error`.
    fn failed(&mut self, error: Error) -> Option<Error> {
        match error {
            Error::Broker(status) => self.ended(status),
            error if error.is_retryable() => {
                self.delay = self.backoff_after(&error);
                None
            }
            error => {
                self.done = true;
                Some(error)
            }
        }
    }

    /// The stream (or the call opening it) ended with `status`: the
    /// documented reaction to it; the error when the watch must end.
    fn ended(&mut self, status: tonic::Status) -> Option<Error> {
        self.client.forget_broken(&status);
        match Reaction::to(&status) {
            Reaction::ReconnectNow(_) => {
                self.delay = RECONNECT_SPREAD.mul_f64(fastrand::f64());
                None
            }
            Reaction::DropHandle(binding) => {
                self.dropped.insert(binding);
                self.delay = self.backoff.next_delay();
                None
            }
            // A watch here is of one set of bindings, all or none.
            Reaction::Slow | Reaction::SetAside(_) => {
                self.delay = BACKOFF.1;
                None
            }
            Reaction::Backoff => {
                let error = Error::from(status);
                self.delay = self.backoff_after(&error);
                None
            }
            Reaction::Stop => {
                self.done = true;
                Some(Error::from(status))
            }
        }
    }

    /// The next backoff, but no sooner than the broker's suggested wait.
    fn backoff_after(&mut self, error: &Error) -> Duration {
        let delay = self.backoff.next_delay();
        match error {
            Error::Unavailable {
                retry_after: Some(hint),
                ..
            } => delay.max(*hint),
            _ => delay,
        }
    }
}
