//! The two modes: `once` (fetch, write, exit) and `run` (write, then follow
//! `Watch`, reconnecting with capped, jittered backoff and keeping the files
//! it has).

use std::time::Duration;

use tessera_proto::v1::{Credential, FetchRequest, Held, RevokeRequest, WatchRequest};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::{
    client::{BrokerTarget, ClientError},
    notify::Notify,
    status::Status,
    writer::{Fields, Meta, WriteError, Writer},
};

/// Why a fetch or a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The call could not be prepared (token, CA, address).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The broker answered with an error status or could not be reached.
    #[error("broker: {}: {}", .0.code(), .0.message())]
    Broker(#[from] tonic::Status),
    /// The broker answered without a binding that was asked for.
    #[error("broker's answer lacks binding `{0}`")]
    Incomplete(String),
    /// Writing the files failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl AgentError {
    /// Whether retrying can help: not for denials or local mistakes.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Broker(status) => !matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument | Code::FailedPrecondition
            ),
            AgentError::Client(ClientError::Token { .. } | ClientError::BadToken(_)) => true,
            AgentError::Client(_) | AgentError::Write(_) => false,
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
}

impl Job {
    /// The handles stored with the bindings' current files.
    fn held(&self) -> Vec<Held> {
        self.bindings
            .iter()
            .filter_map(|binding| {
                self.writer.handle(binding).map(|handle| Held {
                    binding: binding.clone(),
                    handle,
                })
            })
            .collect()
    }
}

/// Writes a delivered credential and records it in the status; returns
/// whether files changed while the binding already had files (a rotation the
/// app should hear of).
fn write_credential(
    writer: &Writer,
    status: &mut Status,
    credential: Credential,
) -> Result<bool, AgentError> {
    let not_after = credential
        .not_after
        .and_then(|t| std::time::SystemTime::try_from(t).ok());
    status.confirmed(&credential.binding, &credential.version, not_after);
    if credential.unchanged {
        tracing::info!(binding = %credential.binding, version = %credential.version, "current credential still valid; files kept");
        return Ok(false);
    }
    let had_files = writer.has_files(&credential.binding);
    let fields: Fields = credential
        .fields
        .into_iter()
        .map(|(name, value)| (name, Zeroizing::new(value)))
        .collect();
    let access = writer.access(credential.file_mode, credential.group_id)?;
    let meta = Meta {
        version: &credential.version,
        handle: (!credential.handle.is_empty()).then_some(credential.handle.as_str()),
    };
    let changed = writer.write(&credential.binding, &fields, meta, access)?;
    if changed {
        tracing::info!(binding = %credential.binding, version = %credential.version, fields = fields.len(), "credential written");
    }
    Ok(changed && had_files)
}

/// Fetches every binding and writes them; all or nothing from the broker.
///
/// # Errors
/// An [`AgentError`]; files already written stay.
#[tracing::instrument(name = "sidecar.once", skip_all, fields(bindings = job.bindings.len()))]
pub async fn once(job: &Job) -> Result<(), AgentError> {
    let mut client = job.target.client()?;
    let request = job.target.request(FetchRequest {
        bindings: job.bindings.clone(),
        held: job.held(),
    })?;
    let response = client.fetch(request).await?.into_inner();
    for name in &job.bindings {
        if !response.credentials.iter().any(|c| &c.binding == name) {
            return Err(AgentError::Incomplete(name.clone()));
        }
    }
    let mut status = Status::read(job.writer.out());
    for credential in response.credentials {
        let (binding, version) = (credential.binding.clone(), credential.version.clone());
        if write_credential(&job.writer, &mut status, credential)? {
            job.notify.rotated(&binding, &version).await;
        }
    }
    status.write(job.writer.out());
    Ok(())
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never waits longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next wait: uniformly random in [0, min(max, base * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Follows `Watch` until `shutdown`, rewriting files on every change. Errors
/// are logged and retried; the files on disk are never removed.
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
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            result = watch_once(job, &mut backoff, &mut status) => result,
        };
        if let Err(error) = &result {
            status.stale(&error.to_string());
            status.write(job.writer.out());
        }
        let delay = match result {
            Ok(()) => {
                tracing::info!("watch stream ended; reconnecting");
                backoff.next_delay()
            }
            Err(AgentError::Broker(status))
                if status.code() == Code::Unauthenticated
                    && status.message().contains("expired") =>
            {
                tracing::info!("token expired on the stream; reconnecting with the current token");
                Duration::ZERO
            }
            Err(error) if error.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "keeping current files; will retry");
                delay
            }
            Err(error) => return Err(error),
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn watch_once(
    job: &Job,
    backoff: &mut Backoff,
    status: &mut Status,
) -> Result<(), AgentError> {
    let mut client = job.target.client()?;
    // The span covers opening the stream (the broker's Watch span is its
    // child), not the stream's whole life.
    let span = tracing::info_span!("sidecar.watch", bindings = job.bindings.len());
    let request = span.in_scope(|| {
        job.target.request(WatchRequest {
            bindings: job.bindings.clone(),
            held: job.held(),
        })
    })?;
    let mut stream = client.watch(request).instrument(span).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(credential) = message.credential {
            let (binding, version) = (credential.binding.clone(), credential.version.clone());
            let rotated = write_credential(&job.writer, status, credential)?;
            status.write(job.writer.out());
            if rotated {
                job.notify.rotated(&binding, &version).await;
            }
            backoff.reset();
        }
    }
    Ok(())
}

/// Gives back what the pod holds (on SIGTERM): leases end in Vault now
/// instead of at their TTL. The files stay; the pod is going away.
///
/// # Errors
/// An [`AgentError`] when the broker cannot be reached or refuses.
#[tracing::instrument(name = "sidecar.revoke", skip_all)]
pub async fn revoke(job: &Job) -> Result<Vec<String>, AgentError> {
    let mut client = job.target.client()?;
    let request = job.target.request(RevokeRequest {
        bindings: job.bindings.clone(),
        held: job.held(),
    })?;
    Ok(client.revoke(request).await?.into_inner().revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..40 {
            assert!(backoff.next_delay() <= Duration::from_secs(2));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
