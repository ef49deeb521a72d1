//! The two modes: `once` (fetch, write, exit) and `run` (follow the client's
//! [`Watch`] and write each credential, keeping the files it has). The watch
//! protocol itself (reconnects, handles, backoff, bindings set aside) is the
//! client crate's; this module only writes, notifies and keeps the status.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use tessera_client::{Client, Event, Watch, WatchOptions, retry::Backoff};
use tessera_proto::v1::{Credential, WhoAmIRequest, WhoAmIResponse};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::{
    client::{self, BrokerTarget},
    notify::{Notifier, Notify},
    status::{Status, Vouched},
    writer::{Access, Fields, Meta, WriteError, Writer},
};

/// Why a fetch or a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The call could not be prepared (token, CA, address), the broker
    /// refused it or could not be reached.
    #[error(transparent)]
    Client(#[from] tessera_client::Error),
    /// The broker answered without a binding that was asked for.
    #[error("broker's answer lacks binding `{0}`")]
    Incomplete(String),
    /// Writing a binding's files failed (the other bindings were written).
    #[error("binding `{binding}`: {source}")]
    Write {
        /// The binding whose files were not written.
        binding: String,
        /// Why the files were not written.
        source: WriteError,
    },
}

impl AgentError {
    /// Whether retrying can help: not for denials or local mistakes.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Client(error) => error.is_retryable(),
            AgentError::Write { .. } => false,
            AgentError::Incomplete(_) => true,
        }
    }
}

/// What to fetch and where to write it.
#[derive(Clone)]
pub struct Job {
    /// The broker's client (its target, the pod's shorter TTLs, the lease
    /// handles held); clones share what it holds.
    pub client: Client,
    /// The bindings to fetch, as the pod's annotation names them.
    pub bindings: Vec<String>,
    /// Writes each binding into the output volume.
    pub writer: Writer,
    /// What to do after a rotation.
    pub notify: Notify,
}

impl Job {
    /// This job for the bindings `keep` accepts.
    fn only(&self, keep: impl Fn(&str) -> bool) -> Job {
        let mut job = self.clone();
        job.bindings.retain(|b| keep(b));
        job
    }
}

/// A delivered credential whose files could not be written yet (a full
/// volume): kept in memory, zeroized on drop, and written again later. Its
/// handle is the client's (presented on reconnect), so the broker resumes it
/// instead of minting another.
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
    let request = client::request(target, WhoAmIRequest {}).map_err(tessera_client::Error::from)?;
    let mut broker = target.client().map_err(tessera_client::Error::from)?;
    let answer = broker
        .who_am_i(request)
        .await
        .map_err(tessera_client::Error::from)?;
    Ok(answer.into_inner())
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
            Err(AgentError::Client(tessera_client::Error::Unservable {
                binding: Some(binding),
                message,
            })) if !aside.contains(&binding) => {
                tracing::warn!(%binding, %message, "the broker cannot serve this binding as its source stands; writing the others without it");
                let mut file_status = Status::read(job.writer.out());
                file_status.unservable(&binding, &message);
                file_status.write(job.writer.out());
                aside.insert(binding.clone());
                refused.get_or_insert(AgentError::Client(tessera_client::Error::Unservable {
                    binding: Some(binding),
                    message,
                }));
            }
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
    let credentials = job.client.fetch_credentials(&job.bindings).await?;
    for name in &job.bindings {
        if !credentials.iter().any(|c| &c.binding == name) {
            return Err(AgentError::Incomplete(name.clone()));
        }
    }
    let mut status = Status::read(job.writer.out());
    let mut unwritten = Unwritten::default();
    let mut failed = None;
    let mut orphaned = Vec::new();
    for credential in credentials {
        let (binding, version) = (credential.binding.clone(), credential.version.clone());
        let leased = !credential.handle.is_empty();
        match write_credential(&job.writer, &mut status, &mut unwritten, credential) {
            Delivery::Written(true) => job.notify.rotated(&binding, &version).await,
            Delivery::Written(false) => {}
            Delivery::Failed(source) => {
                if leased {
                    orphaned.push(binding.to_owned());
                }
                failed.get_or_insert(AgentError::Write { binding, source });
            }
        }
    }
    status.write(job.writer.out());
    if !orphaned.is_empty() {
        give_back(job, &orphaned).await;
    }
    failed.map_or(Ok(()), Err)
}

/// Revokes leases that were delivered but could not be written.
async fn give_back(job: &Job, bindings: &[String]) {
    let bindings: Vec<&str> = bindings.iter().map(String::as_str).collect();
    match job.client.revoke(&bindings).await {
        Ok(revoked) => tracing::info!(
            ?revoked,
            "gave back leases whose files could not be written"
        ),
        Err(error) => {
            tracing::warn!(%error, "could not give back unwritten leases; they expire by their TTL")
        }
    }
}

/// Follows the bindings until `shutdown` (the client's [`Watch`] reconnects,
/// backs off and sets aside what the broker cannot serve), writing files on
/// every change. The files on disk are never removed. A binding whose files
/// cannot be written is reported and retried on its own; the other bindings
/// go on.
///
/// # Errors
/// Only errors retrying cannot fix (denied, invalid request).
pub async fn run(
    job: &Job,
    backoff_max: Duration,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut status = Status::read(job.writer.out());
    let mut unwritten = Unwritten::default();
    let notifier = Notifier::start(job.notify.clone());
    let mut watch = job
        .client
        .follow(job.bindings.clone(), WatchOptions { backoff_max });
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
        let event = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            event = watch.next() => match event {
                Some(event) => event?,
                None => return Ok(()),
            },
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                for (binding, version) in unwritten.retry(&job.writer, &mut status) {
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
        take_event(
            job,
            &notifier,
            &mut watch,
            (&mut status, &mut unwritten),
            event,
        );
    }
}

/// What the sidecar does with one event of its watch: write, notify, and
/// keep the status file true.
fn take_event(
    job: &Job,
    notifier: &Notifier,
    watch: &mut Watch,
    (status, unwritten): (&mut Status, &mut Unwritten),
    event: Event,
) {
    match event {
        Event::Credential(credential) => {
            let (binding, version) = (credential.binding.clone(), credential.version.clone());
            let delivery = write_credential(&job.writer, status, unwritten, credential);
            status.write(job.writer.out());
            if let Delivery::Written(true) = delivery {
                notifier.rotated(&binding, &version);
                // The connection that carried the superseded value is
                // dropped, so its transport buffers (rustls, h2, tonic),
                // which live as long as the connection, are freed and the
                // zero-on-free allocator clears them.
                tracing::debug!("rotation written; reconnecting on a fresh connection");
                watch.reconnect();
            }
        }
        Event::Reconnecting {
            reason, message, ..
        } => {
            tracing::info!(
                reason,
                message,
                "the broker ended the stream; reconnecting now"
            );
        }
        Event::Interrupted {
            cause: None,
            retry_in,
        } => tracing::info!(?retry_in, "watch stream ended; reconnecting"),
        Event::Interrupted {
            cause: Some(error),
            retry_in,
        } => {
            tracing::warn!(%error, ?retry_in, "keeping current files; will retry");
            status.stale(&error.to_string());
            status.write(job.writer.out());
        }
        Event::LeaseLost { binding, message } => {
            tracing::warn!(%binding, %message, "the broker lost the lease; reconnecting without its handle");
            unwritten.0.remove(&binding);
        }
        Event::SetAside {
            binding,
            message,
            retry_in,
        } => {
            // The source's data does not make the binding's files (an unsafe
            // key, a collision): the security team can fix the secret, so the
            // sidecar keeps its files and the watch asks again, slowly.
            tracing::warn!(%binding, %message, ?retry_in, "the broker cannot serve this binding as its source stands; serving the others without it and asking for it alone");
            status.unservable(&binding, &message);
            status.write(job.writer.out());
        }
        Event::Rejoined(binding) => {
            tracing::info!(%binding, "the binding set aside is served again");
        }
        Event::NotSigned {
            binding,
            message,
            retry_in,
        } => {
            tracing::warn!(%binding, %message, ?retry_in, "a fresh key was not signed; keeping the current certificate until it expires and sending a new key later");
        }
        _ => {}
    }
}

/// How often an open stream's credentials are checked for expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(5);

/// First and longest wait before writing a failed credential again.
const WRITE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Gives back what the pod holds (on SIGTERM): leases end in Vault now
/// instead of at their TTL. The files stay; the pod is going away.
///
/// # Errors
/// An [`AgentError`] when the broker cannot be reached or refuses.
#[tracing::instrument(name = "sidecar.revoke", skip_all)]
pub async fn revoke(job: &Job) -> Result<Vec<String>, AgentError> {
    let bindings: Vec<&str> = job.bindings.iter().map(String::as_str).collect();
    Ok(job.client.revoke(&bindings).await?)
}
