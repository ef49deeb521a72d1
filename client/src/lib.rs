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
mod keys;
pub mod retry;
mod store;
mod target;
mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::Stream;
pub use tessera_proto as proto;
use tessera_proto::v1::{FetchRequest, Held, KeyKind, RevokeRequest, broker_client::BrokerClient};
use tonic::transport::Channel;

use self::store::Store;
pub use self::{
    credential::{Credential, CredentialSet},
    error::Error,
    target::{BrokerTarget, DEFAULT_CONNECT_TIMEOUT, SetupError, TrustAnchors},
    watch::{Event, Watch, WatchOptions},
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

    /// Keeps the handle a credential carries (a leased one), to present it
    /// on the next request; the values are not kept.
    fn keep_handle(&mut self, wire: &proto::v1::Credential) {
        if !wire.handle.is_empty() {
            self.handles
                .insert(wire.binding.clone(), wire.handle.clone());
        }
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

/// Something done to every request's metadata before it is sent (the
/// sidecar adds its trace context).
pub type MetadataHook = Arc<dyn Fn(&mut tonic::metadata::MetadataMap) + Send + Sync>;

/// A client of the broker for one pod. Clones share one connection and
/// what the client holds.
#[derive(Clone)]
pub struct Client {
    target: BrokerTarget,
    holdings: Arc<Mutex<Holdings>>,
    /// The pod's own shorter TTLs, in seconds, per binding.
    max_ttl: Arc<BTreeMap<String, u32>>,
    metadata_hook: Option<MetadataHook>,
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
            max_ttl: Arc::default(),
            metadata_hook: None,
            channel: Arc::default(),
        }
    }

    /// Asks for shorter TTLs than the policy's for some bindings (seconds,
    /// by binding), on every request naming them; the broker refuses one
    /// below the kind's floor.
    #[must_use]
    pub fn with_max_ttl(mut self, max_ttl: BTreeMap<String, u32>) -> Self {
        self.max_ttl = Arc::new(max_ttl);
        self
    }

    /// Presents these lease handles (binding to handle) on the first
    /// requests, as a process that kept them elsewhere (the sidecar, beside
    /// its files) resumes its leases after a restart.
    #[must_use]
    pub fn with_handles(self, handles: impl IntoIterator<Item = (String, String)>) -> Self {
        self.holdings().handles.extend(handles);
        self
    }

    /// Runs `hook` on every request's metadata before it is sent.
    #[must_use]
    pub fn with_metadata_hook(mut self, hook: MetadataHook) -> Self {
        self.metadata_hook = Some(hook);
        self
    }

    /// Where this client connects, and with which token and CA.
    pub fn target(&self) -> &BrokerTarget {
        &self.target
    }

    /// A request for `message` with the pod's current token.
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, SetupError> {
        let mut request = self.target.request(message)?;
        if let Some(hook) = &self.metadata_hook {
            hook(request.metadata_mut());
        }
        Ok(request)
    }

    /// The shorter TTLs asked for `bindings`.
    fn max_ttl_of(&self, bindings: &[String]) -> BTreeMap<String, u32> {
        self.max_ttl
            .iter()
            .filter(|(binding, _)| bindings.contains(binding))
            .map(|(binding, ttl)| (binding.clone(), *ttl))
            .collect()
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
        let answer = self.fetch_wire(bindings.clone(), held).await?;
        let mut holdings = self.holdings();
        for credential in answer.credentials {
            holdings.absorb(credential);
        }
        Ok(holdings.subset(&bindings))
    }

    /// The broker's answer for `bindings` as sent, for callers that lay the
    /// credentials out themselves (the sidecar writes files): the leases'
    /// handles are kept, the values are not. Leased ones this client holds
    /// are resumed.
    ///
    /// # Errors
    /// A typed [`Error`]; nothing is retried here.
    pub async fn fetch_credentials(
        &self,
        bindings: &[String],
    ) -> Result<Vec<proto::v1::Credential>, Error> {
        let held = self.holdings().held(bindings, &BTreeSet::new());
        let answer = self.fetch_wire(bindings.to_vec(), held).await?;
        let mut holdings = self.holdings();
        for credential in &answer.credentials {
            holdings.keep_handle(credential);
        }
        Ok(answer.credentials)
    }

    /// One Fetch call presenting `held`; a binding whose key this client
    /// makes (the broker answers it with `key_wanted`) is asked for again
    /// with a fresh key, and its private key added to its fields.
    async fn fetch_wire(
        &self,
        bindings: Vec<String>,
        held: Vec<Held>,
    ) -> Result<proto::v1::FetchResponse, Error> {
        let mut answer = self.fetch_call(bindings, held, BTreeMap::new()).await?;
        for credential in &mut answer.credentials {
            if let Ok(kind) = KeyKind::try_from(credential.key_wanted)
                && kind != KeyKind::Unspecified
            {
                let binding = credential.binding.clone();
                *credential = self.fetch_with_new_key(binding, kind).await?;
            }
        }
        Ok(answer)
    }

    /// `binding`'s credential for a fresh key of `kind` made here: its
    /// public part sent, its private part added to the fields under the
    /// file name the broker gives (`key_file`).
    async fn fetch_with_new_key(
        &self,
        binding: String,
        kind: KeyKind,
    ) -> Result<proto::v1::Credential, Error> {
        let key = keys::make(kind)?;
        let public_keys = BTreeMap::from([(binding.clone(), key.public)]);
        let answer = self
            .fetch_call(vec![binding.clone()], Vec::new(), public_keys)
            .await?;
        let mut credential = answer
            .credentials
            .into_iter()
            .find(|c| c.binding == binding)
            .ok_or_else(|| Error::InvalidRequest {
                message: format!("the broker answered without binding `{binding}`"),
            })?;
        if credential.key_file.is_empty() || credential.key_wanted != 0 {
            return Err(Error::InvalidRequest {
                message: format!("the broker did not sign the key sent for binding `{binding}`"),
            });
        }
        credential
            .fields
            .insert(credential.key_file.clone(), key.private.to_vec());
        Ok(credential)
    }

    /// One Fetch call.
    async fn fetch_call(
        &self,
        bindings: Vec<String>,
        held: Vec<Held>,
        public_keys: BTreeMap<String, Vec<u8>>,
    ) -> Result<proto::v1::FetchResponse, Error> {
        let request = self.request(FetchRequest {
            max_ttl_seconds: self.max_ttl_of(&bindings),
            bindings,
            held,
            public_keys,
        })?;
        Ok(self
            .broker()?
            .fetch(request)
            .await
            .map_err(|status| self.after(status))?
            .into_inner())
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
        let bindings: Vec<String> = bindings.iter().map(|b| (*b).to_owned()).collect();
        let watch = self.follow(bindings.clone(), WatchOptions::default());
        // An item once every binding is held, then one per change.
        let state = (watch, self.clone(), bindings, false);
        futures::stream::unfold(
            state,
            |(mut watch, client, bindings, mut yielded)| async move {
                loop {
                    let changed = match watch.next().await? {
                        Ok(Event::Credential(credential)) => client.holdings().absorb(credential),
                        Ok(Event::LeaseLost { binding, .. }) => {
                            client.holdings().set.remove(&binding);
                            false
                        }
                        Ok(_) => false,
                        Err(error) => {
                            return Some((Err(error), (watch, client, bindings, yielded)));
                        }
                    };
                    let holdings = client.holdings();
                    let complete = bindings.iter().all(|b| holdings.set.get(b).is_some());
                    if complete && (changed || !yielded) {
                        let set = holdings.subset(&bindings);
                        drop(holdings);
                        yielded = true;
                        return Some((Ok(set), (watch, client, bindings, yielded)));
                    }
                }
            },
        )
    }

    /// Follows `bindings` one credential at a time ([`Watch`]): the
    /// protocol [`Client::watch`] is built on, for callers that handle each
    /// credential themselves.
    pub fn follow(&self, bindings: Vec<String>, options: WatchOptions) -> Watch {
        Watch::new(self.clone(), bindings, options)
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
        let request = self.request(RevokeRequest {
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
