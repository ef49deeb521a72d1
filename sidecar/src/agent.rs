//! The two modes: `once` (fetch, write, exit) and `run` (write, then follow
//! `Watch`, reconnecting with capped, jittered backoff and keeping the files
//! it has).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use tessera_proto::v1::{
    Credential, FetchRequest, Held, RevokeRequest, WatchRequest, WhoAmIRequest, WhoAmIResponse,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zeroize::Zeroizing;

use tessera_client::retry::{self, Backoff, Reaction};

use crate::{
    client::{self, BrokerTarget, SetupError},
    notify::{Notifier, Notify},
    status::{Status, Vouched},
    writer::{Access, Fields, Meta, WriteError, Writer},
};

/// Why a fetch or a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The call could not be prepared (token, CA, address).
    #[error(transparent)]
    Client(#[from] SetupError),
    /// The broker answered with an error status or could not be reached.
    #[error("broker: {}: {}", .0.code(), .0.message())]
    Broker(#[from] tonic::Status),
    /// The broker answered without a binding that was asked for.
    #[error("broker's answer lacks binding `{0}`")]
    Incomplete(String),
    /// Writing a binding's files failed (the other bindings were written).
    #[error("binding `{binding}`: {source}")]
    Write {
        /// The binding whose files were not written.
        binding: String,
        /// Why.
        source: WriteError,
    },
}

impl AgentError {
    /// Whether retrying can help: not for denials or local mistakes.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Broker(status) => retry::is_retryable(status.code()),
            AgentError::Client(SetupError::Token { .. } | SetupError::BadToken(_)) => true,
            AgentError::Client(_) | AgentError::Write { .. } => false,
            AgentError::Incomplete(_) => true,
        }
    }
}

/// What to fetch and where to write it.
#[derive(Clone, Debug)]
pub struct Job {
    /// The broker.
    pub target: BrokerTarget,
    /// Bindings to fetch.
    pub bindings: Vec<String>,
    /// The volume writer.
    pub writer: Writer,
    /// What to do after a rotation.
    pub notify: Notify,
    /// The pod's own shorter TTLs, in seconds, per binding.
    pub max_ttl: BTreeMap<String, u32>,
}

impl Job {
    /// This job for the bindings `keep` accepts (and their TTLs only).
    fn only(&self, keep: impl Fn(&str) -> bool) -> Job {
        let mut job = self.clone();
        job.bindings.retain(|b| keep(b));
        job.max_ttl.retain(|b, _| keep(b));
        job
    }

    /// The handles the pod holds: those of credentials delivered but not yet
    /// written, else those stored with the bindings' current files.
    fn held(&self, unwritten: &Unwritten) -> Vec<Held> {
        self.bindings
            .iter()
            .filter_map(|binding| {
                let handle = match unwritten.0.get(binding) {
                    Some(pending) => pending.handle.clone(),
                    None => self.writer.handle(binding),
                };
                handle.map(|handle| Held {
                    binding: binding.clone(),
                    handle,
                })
            })
            .collect()
    }
}

/// A delivered credential whose files could not be written yet (a full
/// volume): kept in memory, zeroized on drop, and written again later. Its
/// handle is presented on reconnect, so the broker resumes it instead of
/// minting another.
struct Pending {
    fields: Fields,
    version: String,
    handle: Option<String>,
    access: Access,
    not_after: Option<SystemTime>,
    vouched: Vouched,
}

/// Credentials delivered but not written, by binding.
#[derive(Default)]
struct Unwritten(BTreeMap<String, Pending>);

impl Unwritten {
    /// Tries every pending write again; returns the bindings written.
    fn retry(&mut self, writer: &Writer, status: &mut Status) -> Vec<(String, String)> {
        let mut written = Vec::new();
        self.0.retain(|binding, pending| {
            let meta = Meta {
                version: &pending.version,
                handle: pending.handle.as_deref(),
            };
            match writer.write(binding, &pending.fields, meta, pending.access) {
                Ok(_) => {
                    tracing::info!(%binding, version = %pending.version, "credential written after an earlier failure");
                    status.confirmed(binding, &pending.version, pending.not_after, pending.vouched);
                    written.push((binding.clone(), pending.version.clone()));
                    false
                }
                Err(error) => {
                    tracing::warn!(%binding, %error, "writing the credential failed again; keeping the previous files");
                    status.write_failed(binding, &error.to_string());
                    is_transient(&error)
                }
            }
        });
        written
    }
}

/// Whether a write can succeed later with the same credential.
fn is_transient(error: &WriteError) -> bool {
    matches!(error, WriteError::NoSpace { .. } | WriteError::Io { .. })
}

/// What became of one delivered credential.
enum Delivery {
    /// Written (or already on disk); `true` when it replaced earlier files (a
    /// rotation the app should hear of).
    Written(bool),
    /// Not written; the previous files stay.
    Failed(WriteError),
}

/// Writes a delivered credential and records it in the status. A failed
/// write is logged with the binding, counted in the status, and kept for a
/// retry when retrying can help.
fn write_credential(
    writer: &Writer,
    status: &mut Status,
    unwritten: &mut Unwritten,
    credential: Credential,
) -> Delivery {
    let binding = credential.binding.clone();
    let not_after = credential
        .not_after
        .and_then(|t| SystemTime::try_from(t).ok());
    let vouched = Vouched {
        confirmed_at: credential
            .confirmed_at
            .and_then(|t| SystemTime::try_from(t).ok()),
        last_known_good: credential.last_known_good,
    };
    if credential.unchanged {
        if !unwritten.0.contains_key(&binding) {
            status.confirmed(&binding, &credential.version, not_after, vouched);
            tracing::info!(%binding, version = %credential.version, last_known_good = vouched.last_known_good, "current credential still valid; files kept");
        }
        return Delivery::Written(false);
    }
    unwritten.0.remove(&binding);
    let had_files = writer.has_files(&binding);
    let fields: Fields = credential
        .fields
        .into_iter()
        .map(|(name, value)| (name, Zeroizing::new(value)))
        .collect();
    let handle = (!credential.handle.is_empty()).then_some(credential.handle);
    let result = writer
        .access(credential.file_mode, credential.group_id)
        .and_then(|access| {
            let meta = Meta {
                version: &credential.version,
                handle: handle.as_deref(),
            };
            let written = writer.write(&binding, &fields, meta, access);
            if let Err(error) = &written
                && is_transient(error)
            {
                let pending = Pending {
                    fields: fields.clone(),
                    version: credential.version.clone(),
                    handle: handle.clone(),
                    access,
                    not_after,
                    vouched,
                };
                unwritten.0.insert(binding.clone(), pending);
            }
            written
        });
    match result {
        Ok(changed) => {
            status.confirmed(&binding, &credential.version, not_after, vouched);
            if changed {
                tracing::info!(%binding, version = %credential.version, fields = fields.len(), "credential written");
            }
            Delivery::Written(changed && had_files)
        }
        Err(error) => {
            let retrying = unwritten.0.contains_key(&binding);
            tracing::warn!(%binding, version = %credential.version, %error, retrying, "cannot write the credential; the previous files stay");
            status.write_failed(&binding, &error.to_string());
            Delivery::Failed(error)
        }
    }
}

/// The identity the broker verifies from `target`'s token, and the
/// bindings the policy grants it.
///
/// # Errors
/// An [`AgentError`]: the token, the CA, or the broker's answer.
pub async fn who_am_i(target: &BrokerTarget) -> Result<WhoAmIResponse, AgentError> {
    let request = client::request(target, WhoAmIRequest {})?;
    Ok(target.client()?.who_am_i(request).await?.into_inner())
}

/// Fetches every binding and writes them; all or nothing from the broker.
/// A binding whose files cannot be written does not stop the others; its
/// lease, if it has one, is given back at once instead of leaking until its
/// TTL (nothing holds it).
///
/// # Errors
/// An [`AgentError`]; files already written stay.
#[tracing::instrument(name = "sidecar.once", skip_all, fields(bindings = job.bindings.len()))]
pub async fn once(job: &Job) -> Result<(), AgentError> {
    // A binding the broker cannot serve as its source stands is left out and
    // the others are fetched without it: the pod gets what can be served,
    // and the refusal is still the answer (the init container fails and the
    // kubelet runs it again; what was written is resumed, not re-issued).
    let mut aside = BTreeSet::new();
    let mut refused = None;
    loop {
        let active = job.only(|b| !aside.contains(b));
        if active.bindings.is_empty() {
            break;
        }
        match fetch_and_write(&active).await {
            Err(AgentError::Broker(status)) => match Reaction::to(&status) {
                Reaction::SetAside(binding) if !aside.contains(&binding) => {
                    tracing::warn!(%binding, message = status.message(), "the broker cannot serve this binding as its source stands; writing the others without it");
                    let mut file_status = Status::read(job.writer.out());
                    file_status.unservable(&binding, status.message());
                    file_status.write(job.writer.out());
                    aside.insert(binding);
                    refused.get_or_insert(AgentError::Broker(status));
                }
                _ => return Err(AgentError::Broker(status)),
            },
            other => {
                other?;
                break;
            }
        }
    }
    refused.map_or(Ok(()), Err)
}

/// Fetches every binding of `job` and writes them, all or none from the
/// broker's side.
async fn fetch_and_write(job: &Job) -> Result<(), AgentError> {
    let mut client = job.target.client()?;
    let mut unwritten = Unwritten::default();
    let request = client::request(
        &job.target,
        FetchRequest {
            bindings: job.bindings.clone(),
            held: job.held(&unwritten),
            max_ttl_seconds: job.max_ttl.clone(),
        },
    )?;
    let response = client.fetch(request).await?.into_inner();
    for name in &job.bindings {
        if !response.credentials.iter().any(|c| &c.binding == name) {
            return Err(AgentError::Incomplete(name.clone()));
        }
    }
    let mut status = Status::read(job.writer.out());
    let mut failed = None;
    let mut orphaned = Vec::new();
    for credential in response.credentials {
        let (binding, version) = (credential.binding.clone(), credential.version.clone());
        let handle = credential.handle.clone();
        match write_credential(&job.writer, &mut status, &mut unwritten, credential) {
            Delivery::Written(true) => job.notify.rotated(&binding, &version).await,
            Delivery::Written(false) => {}
            Delivery::Failed(source) => {
                if !handle.is_empty() {
                    orphaned.push(Held {
                        binding: binding.clone(),
                        handle,
                    });
                }
                failed.get_or_insert(AgentError::Write { binding, source });
            }
        }
    }
    status.write(job.writer.out());
    if !orphaned.is_empty() {
        give_back(job, orphaned).await;
    }
    failed.map_or(Ok(()), Err)
}

/// Revokes leases that were delivered but could not be written.
async fn give_back(job: &Job, held: Vec<Held>) {
    let bindings = held.iter().map(|h| h.binding.clone()).collect();
    let result = async {
        let mut client = job.target.client()?;
        let request = client::request(&job.target, RevokeRequest { bindings, held })?;
        Ok::<_, AgentError>(client.revoke(request).await?.into_inner().revoked)
    }
    .await;
    match result {
        Ok(revoked) => tracing::info!(
            ?revoked,
            "gave back leases whose files could not be written"
        ),
        Err(error) => {
            tracing::warn!(%error, "could not give back unwritten leases; they expire by their TTL")
        }
    }
}

/// Follows `Watch` until `shutdown`, rewriting files on every change. Errors
/// are logged and retried; the files on disk are never removed. A binding
/// whose files cannot be written is reported and retried on its own; the
/// other bindings go on.
///
/// # Errors
/// Only errors retrying cannot fix (denied, invalid request, unusable volume).
pub async fn run(
    job: &Job,
    backoff_max: Duration,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), backoff_max);
    let mut status = Status::read(job.writer.out());
    let mut unwritten = Unwritten::default();
    // Bindings whose lease the broker lost: their handles are not presented
    // again until a new credential replaces them.
    let mut lost = BTreeSet::new();
    let notifier = Notifier::start(job.notify.clone());
    // Bindings the broker cannot serve as their sources stand, and when to
    // ask for each again, alone: the others are watched without them, so
    // one bad secret never costs the pod its other credentials or leases.
    let mut aside: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    loop {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = aside
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(binding, _)| binding.clone())
            .collect();
        for binding in due {
            match once(&job.only(|b| b == binding)).await {
                Ok(()) => {
                    tracing::info!(%binding, "the binding set aside is served again");
                    aside.remove(&binding);
                    status = Status::read(job.writer.out());
                }
                Err(error) => {
                    tracing::warn!(%binding, %error, retry_in = ?backoff_max, "the binding set aside is still not served");
                    aside.insert(binding, now + backoff_max);
                }
            }
        }
        let active = job.only(|b| !aside.contains_key(b));
        if active.bindings.is_empty() {
            let next = aside.values().min().copied();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = sleep_until(next) => {}
            }
            continue;
        }
        // A binding set aside is asked for again when its time comes: the
        // stream of the others ends then and resumes right after (its leases
        // are resumed with their handles, nothing is re-issued).
        let next_aside = aside.values().min().copied();
        let result = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            result = watch_once(&active, &notifier, &mut backoff, &mut status, &mut unwritten, &mut lost) => result,
            () = sleep_until(next_aside) => continue,
        };
        let one_binding = matches!(&result, Err(AgentError::Broker(s)) if matches!(Reaction::to(s), Reaction::SetAside(_)));
        let mut refused = None;
        if let Err(error) = &result
            && !one_binding
        {
            status.stale(&error.to_string());
            status.write(job.writer.out());
        }
        let delay = match result {
            Ok(Ended::Rotated) => {
                tracing::debug!("rotation written; reconnecting on a fresh connection");
                Duration::ZERO
            }
            Ok(Ended::ByBroker) => {
                tracing::info!("watch stream ended; reconnecting");
                backoff.next_delay()
            }
            Err(AgentError::Broker(status)) => match Reaction::to(&status) {
                Reaction::ReconnectNow(why) => {
                    tracing::info!(
                        reason = why,
                        message = status.message(),
                        "the broker ended the stream; reconnecting now"
                    );
                    // Spread a fleet's reconnects over a moment (a replica
                    // shutting down ends all its streams at once).
                    RECONNECT_SPREAD.mul_f64(fastrand::f64())
                }
                Reaction::DropHandle(binding) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%binding, message = status.message(), retry_in = ?delay, "the broker lost the lease; reconnecting without its handle");
                    unwritten.0.remove(&binding);
                    lost.insert(binding);
                    delay
                }
                // The source's data does not make the binding's files (an
                // unsafe key, a collision): the security team can fix the
                // secret, so the sidecar keeps its files and asks again, slowly.
                Reaction::SetAside(binding) => {
                    tracing::warn!(%binding, message = status.message(), retry_in = ?backoff_max, "the broker cannot serve this binding as its source stands; serving the others without it and asking for it alone");
                    refused = Some((binding, status.message().to_owned()));
                    Duration::ZERO
                }
                Reaction::Slow => {
                    tracing::warn!(code = ?status.code(), message = status.message(), retry_in = ?backoff_max, "the broker cannot serve a binding as its source stands; keeping current files");
                    backoff_max
                }
                Reaction::Backoff => {
                    let delay = backoff.next_delay();
                    tracing::warn!(code = ?status.code(), message = status.message(), retry_in = ?delay, "keeping current files; will retry");
                    delay
                }
                Reaction::Stop => return Err(AgentError::Broker(status)),
            },
            Err(error) if error.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "keeping current files; will retry");
                delay
            }
            Err(error) => return Err(error),
        };
        if let Some((binding, message)) = refused {
            status.unservable(&binding, &message);
            status.write(job.writer.out());
            aside.insert(binding, tokio::time::Instant::now() + backoff_max);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Longest random wait before reconnecting when the broker asked for it.
const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// Why a watch ended without an error.
enum Ended {
    /// The broker ended the stream.
    ByBroker,
    /// A rotation was written: the connection that carried the superseded
    /// value is dropped, so its transport buffers (rustls, h2, tonic), which
    /// live as long as the connection, are freed, and the zero-on-free
    /// allocator clears them. The next stream resumes on a fresh connection.
    Rotated,
}

/// How often an open stream's credentials are checked for expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(5);

/// First and longest wait before writing a failed credential again.
const WRITE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

async fn watch_once(
    job: &Job,
    notifier: &Notifier,
    backoff: &mut Backoff,
    status: &mut Status,
    unwritten: &mut Unwritten,
    lost: &mut BTreeSet<String>,
) -> Result<Ended, AgentError> {
    let mut client = job.target.client()?;
    // The span covers opening the stream (the broker's Watch span is its
    // child), not the stream's whole life.
    let span = tracing::info_span!("sidecar.watch", bindings = job.bindings.len());
    let request = span.in_scope(|| {
        client::request(
            &job.target,
            WatchRequest {
                bindings: job.bindings.clone(),
                held: job
                    .held(unwritten)
                    .into_iter()
                    .filter(|h| !lost.contains(&h.binding))
                    .collect(),
                max_ttl_seconds: job.max_ttl.clone(),
            },
        )
    })?;
    let mut stream = client.watch(request).instrument(span).await?.into_inner();
    let mut write_backoff = Backoff::new(WRITE_RETRY.0, WRITE_RETRY.1);
    // When to write failed credentials again; set while some are pending.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut expiry_check = tokio::time::interval(EXPIRY_CHECK);
    loop {
        if unwritten.0.is_empty() {
            retry_at = None;
            write_backoff.reset();
        } else if retry_at.is_none() {
            let delay = write_backoff.next_delay().max(WRITE_RETRY.0 / 2);
            retry_at = Some(tokio::time::Instant::now() + delay);
        }
        let message = tokio::select! {
            message = stream.message() => message?,
            () = sleep_until(retry_at) => {
                retry_at = None;
                for (binding, version) in unwritten.retry(&job.writer, status) {
                    notifier.rotated(&binding, &version);
                }
                status.write(job.writer.out());
                continue;
            }
            _ = expiry_check.tick() => {
                // The stream is up, but a credential ran out without a
                // successor: the status must not claim it is fresh.
                if status.expire(SystemTime::now()) {
                    tracing::warn!("a credential expired without a successor; marked stale");
                    status.write(job.writer.out());
                }
                continue;
            }
        };
        let Some(message) = message else {
            return Ok(Ended::ByBroker);
        };
        if let Some(credential) = message.credential {
            let (binding, version) = (credential.binding.clone(), credential.version.clone());
            lost.remove(&binding);
            let delivery = write_credential(&job.writer, status, unwritten, credential);
            status.write(job.writer.out());
            backoff.reset();
            if let Delivery::Written(true) = delivery {
                notifier.rotated(&binding, &version);
                return Ok(Ended::Rotated);
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Gives back what the pod holds (on SIGTERM): leases end in Vault now
/// instead of at their TTL. The files stay; the pod is going away.
///
/// # Errors
/// An [`AgentError`] when the broker cannot be reached or refuses.
#[tracing::instrument(name = "sidecar.revoke", skip_all)]
pub async fn revoke(job: &Job) -> Result<Vec<String>, AgentError> {
    let mut client = job.target.client()?;
    let request = client::request(
        &job.target,
        RevokeRequest {
            bindings: job.bindings.clone(),
            held: job.held(&Unwritten::default()),
        },
    )?;
    Ok(client.revoke(request).await?.into_inner().revoked)
}
