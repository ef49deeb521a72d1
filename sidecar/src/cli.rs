//! Command-line arguments, parsed into a validated [`Settings`].

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    agent::Job,
    client::{BrokerTarget, TrustAnchors},
    notify::{Notify, Target},
    writer::Writer,
};

/// `tessera-sidecar` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "tessera-sidecar",
    version,
    about = "Tessera sidecar: writes a pod's credentials to tmpfs"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Mode,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "TESSERA_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// How log lines are printed: text for people, JSON for collectors.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How the sidecar runs: once (init container, Job), or following changes.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Exit 0 when every binding is written and unexpired (for probes).
    Check(Volume),
    /// Fetch, write and exit 0 (init containers, Jobs).
    Once(Common),
    /// Run a command with the credentials as environment variables
    /// (`<BINDING>_<FIELD>`), as its PID 1: reap, forward signals, exit with
    /// its status; restart it (or signal it) when a credential rotates.
    Exec(Exec),
    /// Copy this binary into DIR (an init container fills the volume that
    /// `exec` runs from in the app's container) and exit.
    Install {
        /// The directory, e.g. an in-memory volume.
        dir: PathBuf,
    },
    /// Print the identity the broker verifies from the token and the
    /// bindings the policy grants it; writes nothing (`helm test`, debugging).
    Whoami(Connection),
    /// Write, then follow changes until SIGTERM.
    Run {
        /// Shared options.
        #[command(flatten)]
        common: Common,
        /// Revoke the pod's leases when stopped by SIGTERM (the pod is going
        /// away); `--revoke-on-exit=false` leaves them to expire by TTL.
        #[arg(long, env = "TESSERA_REVOKE_ON_EXIT", default_value_t = true, action = clap::ArgAction::Set)]
        revoke_on_exit: bool,
        /// Longest wait between reconnection attempts.
        #[arg(long, env = "TESSERA_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
        backoff_max: Duration,
        /// Serve Prometheus metrics (credential expiry, staleness) on this
        /// address, e.g. `0.0.0.0:9091`; off when absent.
        #[arg(long, env = "TESSERA_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
}

/// The volume and the bindings in it, for every mode.
#[derive(Debug, Args)]
pub struct Volume {
    /// Output directory: a tmpfs (`emptyDir` with `medium: Memory`).
    #[arg(long, env = "TESSERA_OUT", default_value = "/var/run/secrets/tessera")]
    pub out: PathBuf,
    /// Bindings (repeat, or separate with commas).
    #[arg(
        long = "binding",
        env = "TESSERA_BINDINGS",
        value_delimiter = ',',
        required = true
    )]
    pub bindings: Vec<String>,
}

/// The options of `exec`: the broker, the bindings, the command to run.
#[derive(Debug, Args)]
pub struct Exec {
    /// How to reach the broker.
    #[command(flatten)]
    pub connection: Connection,
    /// Bindings (repeat, or separate with commas).
    #[arg(
        long = "binding",
        env = "TESSERA_BINDINGS",
        value_delimiter = ',',
        required = true
    )]
    pub bindings: Vec<String>,
    /// Prepended to every variable name, e.g. `APP_`.
    #[arg(long, env = "TESSERA_ENV_PREFIX", default_value = "")]
    pub env_prefix: String,
    /// `restart` (SIGTERM, then start again with the new values) or
    /// `signal:<NAME>` (e.g. `signal:HUP`; the environment stays as it was).
    #[arg(long, env = "TESSERA_ON_ROTATE", default_value = "restart", value_parser = crate::exec::parse_on_rotate)]
    pub on_rotate: crate::exec::OnRotate,
    /// How long the command has to stop on a restart before it is killed.
    #[arg(long, env = "TESSERA_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Give the pod's leases back when stopped by SIGTERM.
    #[arg(long, env = "TESSERA_REVOKE_ON_EXIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub revoke_on_exit: bool,
    /// A directory on a memory-backed volume of the pod where the wrapper
    /// keeps its credentials and lease handles, so a restarted container
    /// resumes its leases (the same database user) instead of minting new
    /// ones. The webhook sets it in env mode.
    #[arg(long, env = "TESSERA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<std::ffi::OsString>,
}

impl Exec {
    /// Validates the options into an [`crate::exec::ExecJob`].
    ///
    /// # Errors
    /// A [`UsageError`] naming the bad option.
    pub fn job(&self) -> Result<crate::exec::ExecJob, UsageError> {
        let mut bindings = self.bindings.clone();
        bindings.retain(|b| !b.trim().is_empty());
        if bindings.is_empty() {
            return Err(UsageError(
                "--binding: name at least one binding".to_owned(),
            ));
        }
        Ok(crate::exec::ExecJob {
            target: self.connection.target()?,
            bindings,
            prefix: self.env_prefix.clone(),
            on_rotate: self.on_rotate,
            grace: self.grace,
            revoke_on_exit: self.revoke_on_exit,
            state_dir: self.state_dir.clone(),
            command: self.command.clone(),
        })
    }
}

/// How to reach the broker and who to be there: every mode that calls it.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("ca").required(true).args(["ca_file", "ca_pem"]))]
pub struct Connection {
    /// Broker address, `https://host:port`.
    #[arg(long, env = "TESSERA_BROKER")]
    pub broker: String,
    /// CA bundle that signed the broker's certificate (or `--ca-pem`).
    #[arg(long, env = "TESSERA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The same CA bundle as PEM text (what the injection webhook sets).
    #[arg(long, env = "TESSERA_CA_PEM", hide_env_values = true)]
    pub ca_pem: Option<String>,
    /// TLS name to verify when it differs from the broker address's host.
    #[arg(long, env = "TESSERA_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Projected service-account token file (re-read for every call).
    #[arg(
        long,
        env = "TESSERA_TOKEN_FILE",
        default_value = "/var/run/secrets/tessera.dev/serviceaccount/token"
    )]
    pub token_file: PathBuf,
    /// Client certificate (PEM) for mTLS to the broker.
    #[arg(long, env = "TESSERA_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client certificate key (PEM) for mTLS to the broker.
    #[arg(long, env = "TESSERA_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// How long connecting to the broker (TCP and TLS) may take before the attempt counts as failed.
    #[arg(long, env = "TESSERA_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// Options shared by both modes.
#[derive(Debug, Args)]
pub struct Common {
    /// How to reach the broker.
    #[command(flatten)]
    pub connection: Connection,
    /// Where to write, and what.
    #[command(flatten)]
    pub volume: Volume,
    /// Group id for files (0440) and directories (0550); owner-only (0400/0500) without it.
    #[arg(long, env = "TESSERA_GROUP")]
    pub group: Option<u32>,
    /// The pod owner's renames and templates per binding, as JSON:
    /// `{"<binding>": {"files": {"<field>": "<file>"}, "templates": {"<file>": "<template>"}}}`
    /// (the webhook sets it from `tessera.dev/files.*` and `tessera.dev/templates.*`).
    #[arg(long, env = "TESSERA_POD_OUTPUT", value_parser = crate::pod_output::parse, hide_env_values = true)]
    pub pod_output: Option<crate::pod_output::PodOutput>,
    /// The longest lifetime this pod wants for a binding's leased
    /// credentials, `binding=duration` (repeat, or separate with commas); it
    /// only shortens the policy's ttl (the webhook sets it from
    /// `tessera.dev/ttl.<binding>`).
    #[arg(long = "max-ttl", env = "TESSERA_MAX_TTL", value_delimiter = ',', value_parser = parse_max_ttl)]
    pub max_ttl: Vec<(String, u32)>,
    /// Allow an output directory that is not tmpfs/ramfs (local development only).
    #[arg(long, env = "TESSERA_ALLOW_NON_TMPFS")]
    pub allow_non_tmpfs: bool,
    /// Signal to send the app after a rotation (HUP, USR1, USR2, TERM, INT).
    #[arg(long, env = "TESSERA_NOTIFY_SIGNAL", value_parser = crate::notify::parse_signal)]
    pub notify_signal: Option<rustix::process::Signal>,
    /// File holding the pid to signal.
    #[arg(
        long,
        env = "TESSERA_NOTIFY_PID_FILE",
        conflicts_with = "notify_process"
    )]
    pub notify_pid_file: Option<PathBuf>,
    /// Name of the processes to signal (needs `shareProcessNamespace: true`).
    #[arg(long, env = "TESSERA_NOTIFY_PROCESS")]
    pub notify_process: Option<String>,
    /// Shell command to run after a rotation (`TESSERA_BINDING`, `TESSERA_VERSION` set).
    #[arg(long, env = "TESSERA_NOTIFY_COMMAND")]
    pub notify_command: Option<String>,
    /// URL on the pod's loopback to POST to after a rotation, e.g.
    /// `http://127.0.0.1:9090/-/reload` (no shell needed).
    #[arg(long, env = "TESSERA_NOTIFY_URL", value_parser = crate::notify::parse_reload_url)]
    pub notify_url: Option<crate::notify::ReloadUrl>,
    /// Lock memory (`mlockall`) so secrets never reach swap, when the
    /// process may (it has CAP_IPC_LOCK or no memlock limit).
    #[arg(long, env = "TESSERA_LOCK_MEMORY", default_value_t = true, action = clap::ArgAction::Set)]
    pub lock_memory: bool,
}

/// Parses `binding=duration` (e.g. `orders-db=10m`).
fn parse_max_ttl(text: &str) -> Result<(String, u32), String> {
    let (binding, duration) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not binding=duration (e.g. orders-db=10m)"))?;
    let duration =
        humantime::parse_duration(duration.trim()).map_err(|e| format!("`{text}`: {e}"))?;
    let seconds = u32::try_from(duration.as_secs())
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("`{text}`: between 1s and 136 years"))?;
    Ok((binding.trim().to_owned(), seconds))
}

/// Invalid arguments, reported before anything starts.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl Common {
    /// Validates the options into a [`Job`]; checks that the output directory
    /// exists and is tmpfs unless allowed otherwise.
    ///
    /// # Errors
    /// A [`UsageError`] naming the bad option.
    pub fn job(&self) -> Result<Job, UsageError> {
        let mut bindings = self.volume.bindings.clone();
        bindings.retain(|b| !b.trim().is_empty());
        if bindings.is_empty() {
            return Err(UsageError(
                "--binding: name at least one binding".to_owned(),
            ));
        }
        if let Some(bad) = bindings.iter().find(|b| !tessera_proto::is_safe_name(b)) {
            return Err(UsageError(format!(
                "--binding `{bad}` is not a safe directory name"
            )));
        }
        if !self.volume.out.is_dir() {
            return Err(UsageError(format!(
                "--out {} is not a directory (mount the volume first)",
                self.volume.out.display()
            )));
        }
        if self.allow_non_tmpfs {
            tracing::warn!(out = %self.volume.out.display(), "--allow-non-tmpfs: secrets may reach disk");
        } else {
            crate::writer::ensure_tmpfs(&self.volume.out).map_err(|e| UsageError(e.to_string()))?;
        }
        let target = match (&self.notify_pid_file, &self.notify_process) {
            (Some(file), _) => Some(Target::PidFile(file.clone())),
            (None, Some(name)) => Some(Target::Name(name.clone())),
            (None, None) => None,
        };
        let signal = match (self.notify_signal, target) {
            (Some(signal), Some(target)) => Some((signal, target)),
            (None, None) => None,
            _ => {
                return Err(UsageError(
                    "--notify-signal needs --notify-pid-file or --notify-process, and they need a signal".to_owned(),
                ));
            }
        };
        let writer = Writer::new(self.volume.out.clone(), self.group)
            .with_output(self.pod_output.clone().unwrap_or_default());
        // Leases the pod held before a restart are resumed with the handles
        // kept beside their files.
        let handles: Vec<(String, String)> = bindings
            .iter()
            .filter_map(|binding| Some((binding.clone(), writer.handle(binding)?)))
            .collect();
        let client = tessera_client::Client::new(self.connection.target()?)
            .with_max_ttl(self.max_ttl.iter().cloned().collect())
            .with_handles(handles)
            .with_metadata_hook(std::sync::Arc::new(tessera_telemetry::inject_context));
        Ok(Job {
            notify: Notify {
                signal,
                command: self.notify_command.clone(),
                url: self.notify_url.clone(),
            },
            client,
            bindings,
            writer,
        })
    }
}

impl Connection {
    /// Validates the options into the broker's [`BrokerTarget`].
    ///
    /// # Errors
    /// A [`UsageError`] naming the bad option.
    pub fn target(&self) -> Result<BrokerTarget, UsageError> {
        if !self.broker.starts_with("https://") {
            return Err(UsageError(format!(
                "--broker `{}` must start with https:// (credentials only travel over TLS)",
                self.broker
            )));
        }
        Ok(BrokerTarget {
            uri: self.broker.clone(),
            ca: match (&self.ca_file, &self.ca_pem) {
                (Some(path), _) => TrustAnchors::File(path.clone()),
                (None, Some(pem)) => TrustAnchors::Pem(pem.clone()),
                (None, None) => {
                    return Err(UsageError("set --ca-file or --ca-pem".to_owned()));
                }
            },
            server_name: self.server_name.clone(),
            token_file: self.token_file.clone(),
            client_identity: self.client_cert.clone().zip(self.client_key.clone()),
            connect_timeout: self.connect_timeout,
        })
    }
}
