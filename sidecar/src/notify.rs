//! Telling the app that its credentials rotated: a signal to a process (by pid
//! file, or by name when the pod shares its process namespace), a `POST` to
//! an HTTP endpoint on the pod's loopback (as Prometheus' `/-/reload`), and/or
//! a command. File watchers can instead follow the `..data` symlink.

use std::{path::PathBuf, time::Duration};

use rustix::process::{Pid, Signal, kill_process};

/// How long a notify command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reload endpoint has to answer.
const URL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which process to signal.
#[derive(Clone, Debug)]
pub enum Target {
    /// The process whose pid this file holds (the app writes it).
    PidFile(PathBuf),
    /// Every process whose name (`/proc/<pid>/comm`) is this.
    Name(String),
}

/// What to do after a rotation.
#[derive(Clone, Debug, Default)]
pub struct Notify {
    /// Signal and whom to send it to.
    pub signal: Option<(Signal, Target)>,
    /// A shell command, run with `TESSERA_BINDING` and `TESSERA_VERSION` set.
    pub command: Option<String>,
    /// An endpoint on the pod's loopback to `POST` to.
    pub url: Option<ReloadUrl>,
}

pub use tessera_proto::{ReloadUrl, parse_reload_url};

/// `POST`s to `url` with an empty body; the answer's status.
async fn post(url: &ReloadUrl) -> Result<hyper::StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(url.address)
        .await
        .map_err(|e| format!("connect {}: {e}", url.address))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::post(&url.path)
        .header(hyper::header::HOST, url.address.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status())
}

/// Parses a signal name (`HUP`, `SIGHUP`, `USR1`, `USR2`, `TERM`, `INT`).
///
/// # Errors
/// The name is not one of those.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    match name.trim_start_matches("SIG") {
        "HUP" => Ok(Signal::HUP),
        "USR1" => Ok(Signal::USR1),
        "USR2" => Ok(Signal::USR2),
        "TERM" => Ok(Signal::TERM),
        "INT" => Ok(Signal::INT),
        other => Err(format!(
            "`{other}` is not one of HUP, USR1, USR2, TERM, INT"
        )),
    }
}

fn pids(target: &Target) -> Vec<Pid> {
    match target {
        Target::PidFile(path) => std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .and_then(Pid::from_raw)
            .into_iter()
            .collect(),
        Target::Name(name) => std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
                (comm.trim() == name && pid != std::process::id() as i32)
                    .then(|| Pid::from_raw(pid))
                    .flatten()
            })
            .collect(),
    }
}

/// Runs the app's notifications off the delivery path: a slow or hung hook
/// delays only later notifications, never a write or the stream. Rotations
/// that arrive while a hook runs are coalesced per binding (its latest
/// version), so what waits is bounded by the pod's bindings.
#[derive(Clone)]
pub struct Notifier {
    pending: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Notifier {
    /// Starts the task that runs `notify`'s hooks; it ends with the process.
    pub fn start(notify: Notify) -> Self {
        let notifier = Self {
            pending: std::sync::Arc::default(),
            wake: std::sync::Arc::default(),
        };
        if !notify.is_empty() {
            let worker = notifier.clone();
            tokio::spawn(async move {
                loop {
                    worker.wake.notified().await;
                    let batch = std::mem::take(
                        &mut *worker
                            .pending
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner),
                    );
                    for (binding, version) in batch {
                        notify.rotated(&binding, &version).await;
                    }
                }
            });
        }
        notifier
    }

    /// Queues the notification that `binding` rotated to `version`; returns
    /// at once.
    pub fn rotated(&self, binding: &str, version: &str) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(binding.to_owned(), version.to_owned());
        self.wake.notify_one();
    }
}

impl Notify {
    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.signal.is_none() && self.command.is_none() && self.url.is_none()
    }

    /// Tells the app that `binding` rotated to `version`. Failures are logged:
    /// the files are already in place.
    pub async fn rotated(&self, binding: &str, version: &str) {
        if let Some((signal, target)) = &self.signal {
            let found = pids(target);
            if found.is_empty() {
                tracing::warn!(?target, "no process to signal after the rotation");
            }
            for pid in found {
                match kill_process(pid, *signal) {
                    Ok(()) => tracing::info!(
                        pid = pid.as_raw_nonzero().get(),
                        binding,
                        "signalled the app"
                    ),
                    Err(error) => tracing::warn!(%error, binding, "cannot signal the app"),
                }
            }
        }
        if let Some(url) = &self.url {
            match tokio::time::timeout(URL_TIMEOUT, post(url)).await {
                Ok(Ok(status)) if status.is_success() => {
                    tracing::info!(binding, %status, path = %url.path, "the app's reload endpoint answered");
                }
                Ok(Ok(status)) => {
                    tracing::warn!(binding, %status, path = %url.path, "the app's reload endpoint refused");
                }
                Ok(Err(error)) => {
                    tracing::warn!(binding, %error, path = %url.path, "cannot call the app's reload endpoint");
                }
                Err(_) => {
                    tracing::warn!(binding, path = %url.path, "the app's reload endpoint did not answer in time")
                }
            }
        }
        if let Some(command) = &self.command {
            let run = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .env("TESSERA_BINDING", binding)
                .env("TESSERA_VERSION", version)
                .kill_on_drop(true)
                .status();
            match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
                Ok(Ok(status)) if status.success() => tracing::info!(binding, "notify command ran"),
                Ok(Ok(status)) => tracing::warn!(%status, binding, "notify command failed"),
                Ok(Err(error)) => tracing::warn!(%error, binding, "cannot run the notify command"),
                Err(_) => tracing::warn!(binding, "notify command timed out and was killed"),
            }
        }
    }
}
