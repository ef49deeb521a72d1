//! The watch protocol, once: following bindings one credential at a time,
//! reconnecting, presenting the handles held, backing off, and setting aside
//! a binding the broker cannot serve as its source stands. [`Client::watch`]
//! and the sidecar are both built on [`Watch`]; they only decide what to do
//! with each [`Event`].

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, SystemTime},
};

use tessera_proto::v1::{Credential, FetchResponse, KeyKind, WatchRequest, WatchResponse};
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    BACKOFF, Client, Error,
    retry::{Backoff, Reaction},
};

/// Longest random wait before reconnecting when the broker asked for it
/// (a replica shutting down ends all its streams at once).
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// How a [`Watch`] retries.
#[derive(Clone, Copy, Debug)]
pub struct WatchOptions {
    /// The longest wait between attempts, and how often a binding set aside
    /// is asked for again.
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            backoff_max: BACKOFF.1,
        }
    }
}

/// What happened on a watch.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A credential as the broker sent it: new values, or (`unchanged`) the
    /// ones held with a new lifetime or freshness. Its handle is already
    /// kept by the client.
    Credential(Credential),
    /// The broker ended the stream for a reason that is no fault of this pod
    /// (`reason`: token expired, replica shutting down, policy changed); the
    /// watch reconnects within `retry_in`.
    Reconnecting {
        /// The broker's `ErrorInfo` reason, e.g. `POLICY_CHANGED`.
        reason: &'static str,
        /// The broker's message, for logs.
        message: String,
        /// When the watch reconnects.
        retry_in: Duration,
    },
    /// The stream ended or could not be opened; the watch tries again in
    /// `retry_in`. `cause` is `None` when the broker ended it without error.
    Interrupted {
        /// Why, when it was an error.
        cause: Option<Error>,
        /// When the watch tries again.
        retry_in: Duration,
    },
    /// The broker lost `binding`'s lease: its handle is not presented again,
    /// and the next credential for it is a new one.
    LeaseLost {
        /// The binding whose lease is gone.
        binding: String,
        /// The broker's message, for logs.
        message: String,
    },
    /// The broker cannot serve `binding` as its source stands: the others are
    /// watched without it, and it is asked for alone every `retry_in` until
    /// it is served and rejoins ([`Event::Rejoined`]).
    SetAside {
        /// The binding left out of the stream.
        binding: String,
        /// Why it cannot be served.
        message: String,
        /// When it is asked for again.
        retry_in: Duration,
    },
    /// A binding set aside was served (its credential came just before) and
    /// is watched with the others again.
    Rejoined(String),
    /// A fresh key for `binding` (one whose private key this client makes)
    /// was not signed; asked again in `retry_in`, while the certificate
    /// held stays valid until it expires.
    NotSigned {
        /// The binding whose key was not signed.
        binding: String,
        /// Why.
        message: String,
        /// When a fresh key is sent again.
        retry_in: Duration,
    },
}

/// The shortest wait before a fresh key is sent for a binding again.
const MIN_KEY_RENEWAL: Duration = Duration::from_secs(1);

/// A watch of some bindings; [`Watch::next`] gives its events in order.
pub struct Watch {
    client: Client,
    bindings: Vec<String>,
    options: WatchOptions,
    backoff: Backoff,
    stream: Option<tonic::Streaming<WatchResponse>>,
    /// A stream being opened (a task, so that dropping `next` loses nothing).
    opening: Option<JoinHandle<Opening>>,
    /// The bindings the stream (open or being opened) carries.
    streaming: Vec<String>,
    /// When to open the next stream.
    open_at: Instant,
    /// Bindings set aside, and when to ask for each again.
    aside: BTreeMap<String, Instant>,
    /// A binding set aside being asked for alone, and the answer.
    asking: Option<JoinHandle<(String, Result<FetchResponse, Error>)>>,
    /// Bindings whose private key this client makes, and when to send a
    /// fresh key for each: the broker signs them by Fetch, not on the stream.
    keyed: BTreeMap<String, (KeyKind, Instant)>,
    /// Bindings whose lease the broker lost: their handles are not
    /// presented until a new credential replaces them.
    dropped: BTreeSet<String>,
    ready: VecDeque<Event>,
    done: bool,
}

/// How opening a stream went: the broker's answer, or an error before the
/// call (the token, the CA).
type Opening = Result<Result<tonic::Streaming<WatchResponse>, tonic::Status>, Error>;

/// What woke a watch.
enum Step {
    Message(Result<Option<WatchResponse>, tonic::Status>),
    Opened(Opening),
    Asked(String, Result<FetchResponse, Error>),
    Due,
}

impl Watch {
    pub(crate) fn new(client: Client, bindings: Vec<String>, options: WatchOptions) -> Self {
        Self {
            client,
            bindings,
            backoff: Backoff::new(BACKOFF.0, options.backoff_max),
            options,
            stream: None,
            opening: None,
            streaming: Vec::new(),
            open_at: Instant::now(),
            aside: BTreeMap::new(),
            asking: None,
            keyed: BTreeMap::new(),
            dropped: BTreeSet::new(),
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// The next event; `None` once the watch has ended with an error. An
    /// error ends it when retrying cannot help (a denial, an invalid
    /// request); every other failure is retried and reported as an event.
    ///
    /// Cancel-safe: dropping the future (in a `select!`) loses nothing.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            self.start_due();
            let step = self.wait().await;
            if let Err(error) = self.take(step) {
                self.done = true;
                return Some(Err(error));
            }
        }
    }

    /// Ends the current stream and opens a new one at once, on a new
    /// connection: after a rotation, so the connection that carried the old
    /// values (and its transport buffers) goes away.
    pub fn reconnect(&mut self) {
        self.stream = None;
        self.open_at = Instant::now();
    }

    /// The bindings watched now: all but those set aside.
    fn active(&self) -> Vec<String> {
        self.bindings
            .iter()
            .filter(|b| !self.aside.contains_key(*b))
            .cloned()
            .collect()
    }

    /// Starts what is due: opening the stream, asking for a binding set aside.
    fn start_due(&mut self) {
        let now = Instant::now();
        let active = self.active();
        if self.stream.is_none()
            && self.opening.is_none()
            && !active.is_empty()
            && now >= self.open_at
        {
            let held = self.client.holdings().held(&active, &self.dropped);
            // Shorter TTLs of the bindings asked for only: the broker refuses
            // one for a binding the request leaves out (one set aside).
            let max_ttl_seconds = self.client.max_ttl_of(&active);
            self.streaming.clone_from(&active);
            let request = WatchRequest {
                bindings: active,
                held,
                max_ttl_seconds,
            };
            let client = self.client.clone();
            self.opening = Some(tokio::spawn(async move {
                let request = client.request(request)?;
                let answer = client.target.client()?.watch(request).await;
                Ok(answer.map(tonic::Response::into_inner))
            }));
        }
        if self.asking.is_some() {
            return;
        }
        let client = self.client.clone();
        if let Some(binding) = self
            .aside
            .iter()
            .find(|(_, at)| **at <= now)
            .map(|(binding, _)| binding.clone())
        {
            let held = client
                .holdings()
                .held(std::slice::from_ref(&binding), &self.dropped);
            self.asking = Some(tokio::spawn(async move {
                let answer = client.fetch_wire(vec![binding.clone()], held).await;
                (binding, answer)
            }));
        } else if let Some((binding, kind)) = self
            .keyed
            .iter()
            .find(|(_, (_, at))| *at <= now)
            .map(|(binding, (kind, _))| (binding.clone(), *kind))
        {
            self.asking = Some(tokio::spawn(async move {
                let answer = client.fetch_with_new_key(binding.clone(), kind).await;
                let answer = answer.map(|credential| FetchResponse {
                    credentials: vec![credential],
                });
                (binding, answer)
            }));
        }
    }

    /// Waits for the next thing to happen.
    async fn wait(&mut self) -> Step {
        let open_at =
            (self.stream.is_none() && self.opening.is_none() && !self.active().is_empty())
                .then_some(self.open_at);
        let ask_at = self
            .asking
            .is_none()
            .then(|| {
                let keyed = self.keyed.values().map(|(_, at)| at);
                self.aside.values().chain(keyed).min().copied()
            })
            .flatten();
        let Self {
            stream,
            opening,
            asking,
            ..
        } = self;
        tokio::select! {
            message = next_message(stream) => Step::Message(message),
            opened = joined(opening) => Step::Opened(opened.unwrap_or_else(|error| Err(unfinished(&error)))),
            // A task that did not finish leaves its binding due: asked again.
            asked = joined(asking) => asked.map_or(Step::Due, |(binding, answer)| Step::Asked(binding, answer)),
            () = tokio::time::sleep_until(open_at.unwrap_or_else(Instant::now)), if open_at.is_some() => Step::Due,
            () = tokio::time::sleep_until(ask_at.unwrap_or_else(Instant::now)), if ask_at.is_some() => Step::Due,
        }
    }

    /// Takes in what happened; an error when the watch must end.
    fn take(&mut self, step: Step) -> Result<(), Error> {
        match step {
            Step::Due => Ok(()),
            Step::Message(Ok(Some(message))) => {
                self.backoff.reset();
                if let Some(credential) = message.credential {
                    self.received(credential);
                }
                Ok(())
            }
            Step::Message(Ok(None)) => {
                self.stream = None;
                let delay = self.backoff.next_delay();
                let retry_in = self.retry_in(delay);
                self.ready.push_back(Event::Interrupted {
                    cause: None,
                    retry_in,
                });
                Ok(())
            }
            Step::Message(Err(status)) => {
                self.stream = None;
                self.ended(status)
            }
            Step::Opened(Ok(Ok(stream))) => {
                self.stream = Some(stream);
                // A binding rejoined while it was being opened: open again
                // with it.
                if self.streaming != self.active() {
                    self.reconnect();
                }
                Ok(())
            }
            Step::Opened(Ok(Err(status))) => self.ended(status),
            Step::Opened(Err(error)) if error.is_retryable() => self.interrupted(error),
            Step::Opened(Err(error)) => Err(error),
            Step::Asked(binding, answer) => {
                self.asked(binding, answer);
                Ok(())
            }
        }
    }

    fn received(&mut self, credential: Credential) {
        if let Ok(kind) = KeyKind::try_from(credential.key_wanted)
            && kind != KeyKind::Unspecified
        {
            // Signed by Fetch with a fresh key, now and from each
            // credential's `renew_after`.
            self.keyed
                .entry(credential.binding)
                .or_insert((kind, Instant::now()));
            return;
        }
        if !credential.handle.is_empty() {
            self.dropped.remove(&credential.binding);
        }
        self.client.holdings().keep_handle(&credential);
        self.ready.push_back(Event::Credential(credential));
    }

    /// A binding set aside was asked for alone, or a fresh key sent.
    fn asked(&mut self, binding: String, answer: Result<FetchResponse, Error>) {
        let retry_in = self.options.backoff_max;
        if let Some((kind, _)) = self.keyed.get(&binding).copied() {
            let next = match answer {
                Ok(answer) => {
                    let renew_after = answer.credentials.iter().find_map(|c| c.renew_after);
                    for credential in answer.credentials {
                        self.received(credential);
                    }
                    // Never sooner than a second: a renewal time already
                    // past must not make a key a moment.
                    renew_after
                        .and_then(|at| SystemTime::try_from(at).ok())
                        .map_or(retry_in, |at| {
                            at.duration_since(SystemTime::now()).unwrap_or_default()
                        })
                        .max(MIN_KEY_RENEWAL)
                }
                Err(error) => {
                    self.ready.push_back(Event::NotSigned {
                        binding: binding.clone(),
                        message: error.to_string(),
                        retry_in,
                    });
                    retry_in
                }
            };
            self.keyed.insert(binding, (kind, Instant::now() + next));
            return;
        }
        match answer {
            Ok(answer) => {
                for credential in answer.credentials {
                    self.received(credential);
                }
                self.aside.remove(&binding);
                self.ready.push_back(Event::Rejoined(binding));
                // The stream of the others ends; the next one has it too
                // (one being opened is checked when it opens).
                if self.stream.is_some() {
                    self.reconnect();
                }
            }
            Err(error) => {
                self.aside
                    .insert(binding.clone(), Instant::now() + retry_in);
                self.ready.push_back(Event::SetAside {
                    binding,
                    message: error.to_string(),
                    retry_in,
                });
            }
        }
    }

    /// Schedules the next attempt in `delay` (at least); the delay.
    fn retry_in(&mut self, delay: Duration) -> Duration {
        self.open_at = Instant::now() + delay;
        delay
    }

    fn interrupted(&mut self, error: Error) -> Result<(), Error> {
        let delay = self.backoff_after(&error);
        let retry_in = self.retry_in(delay);
        self.ready.push_back(Event::Interrupted {
            cause: Some(error),
            retry_in,
        });
        Ok(())
    }

    /// The stream (or the call opening it) ended with `status`: the
    /// documented reaction to it; the error when the watch must end.
    fn ended(&mut self, status: tonic::Status) -> Result<(), Error> {
        self.client.forget_broken(&status);
        match Reaction::to(&status) {
            Reaction::ReconnectNow(reason) => {
                let retry_in = self.retry_in(RECONNECT_SPREAD.mul_f64(fastrand::f64()));
                self.ready.push_back(Event::Reconnecting {
                    reason,
                    message: status.message().to_owned(),
                    retry_in,
                });
                Ok(())
            }
            Reaction::DropHandle(binding) => {
                self.dropped.insert(binding.clone());
                self.ready.push_back(Event::LeaseLost {
                    binding,
                    message: status.message().to_owned(),
                });
                let retry_in = self.backoff.next_delay();
                self.retry_in(retry_in);
                Ok(())
            }
            Reaction::SetAside(binding) => {
                let retry_in = self.options.backoff_max;
                self.aside
                    .insert(binding.clone(), Instant::now() + retry_in);
                self.open_at = Instant::now();
                self.ready.push_back(Event::SetAside {
                    binding,
                    message: status.message().to_owned(),
                    retry_in,
                });
                Ok(())
            }
            Reaction::Slow => {
                let retry_in = self.retry_in(self.options.backoff_max);
                self.ready.push_back(Event::Interrupted {
                    cause: Some(Error::from(status)),
                    retry_in,
                });
                Ok(())
            }
            Reaction::Backoff => self.interrupted(Error::from(status)),
            Reaction::Stop => Err(Error::from(status)),
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

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(opening) = &self.opening {
            opening.abort();
        }
        if let Some(asking) = &self.asking {
            asking.abort();
        }
    }
}

async fn next_message(
    stream: &mut Option<tonic::Streaming<WatchResponse>>,
) -> Result<Option<WatchResponse>, tonic::Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// What a task returned, once it ends; the task is then forgotten.
async fn joined<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    let Some(handle) = task else {
        return std::future::pending().await;
    };
    let result = handle.await;
    *task = None;
    result
}

/// A call whose task panicked or was aborted: as if the broker had not answered.
fn unfinished(error: &tokio::task::JoinError) -> Error {
    Error::Unavailable {
        message: format!("the call did not finish: {error}"),
        retry_after: None,
    }
}
