//! `tessera-sidecar exec -- CMD ARGS...`: the app gets its credentials as
//! environment variables. The wrapper fetches them, starts CMD as its child
//! with `<PREFIX><BINDING>_<FIELD>` set, and does what PID 1 must: reaps
//! every exited process, forwards signals, and exits with the child's status.
//! When a credential rotates it restarts the child gracefully with the new
//! values (or signals it, `--on-rotate signal:HUP`); it keeps following the
//! broker while the child runs.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    os::unix::ffi::OsStrExt as _,
    time::Duration,
};

use futures::StreamExt as _;
use rustix::process::{Pid, Signal, WaitOptions, kill_process};
use tessera_client::{BrokerTarget, Client, CredentialSet};
use tokio::signal::unix::{SignalKind, signal};
use zeroize::Zeroizing;

/// What to do when a credential's values change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRotate {
    /// SIGTERM the child, wait up to the grace period (then SIGKILL), start
    /// it again with the new values.
    Restart,
    /// Send the child this signal; its environment cannot change.
    Signal(Signal),
}

/// Parses `restart` or `signal:<NAME>` (`signal:HUP`, `signal:SIGUSR1`).
///
/// # Errors
/// A sentence naming the accepted forms.
pub fn parse_on_rotate(text: &str) -> Result<OnRotate, String> {
    match text.split_once(':') {
        None if text == "restart" => Ok(OnRotate::Restart),
        Some(("signal", name)) => crate::notify::parse_signal(name).map(OnRotate::Signal),
        _ => Err(format!(
            "`{text}` is not `restart` or `signal:<NAME>` (e.g. signal:HUP)"
        )),
    }
}

/// Copies the running binary into `dir` as `tessera-sidecar`, executable by
/// every user (0555), replacing what is there in one step.
///
/// # Errors
/// When the binary cannot be read or `dir` written.
pub fn install(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let target = dir.join("tessera-sidecar");
    tessera_atomic_file::replace_with(&target, 0o555, |file| {
        std::io::copy(&mut std::fs::File::open("/proc/self/exe")?, file).map(drop)
    })?;
    Ok(target)
}

/// Everything `exec` needs.
#[derive(Debug)]
pub struct ExecJob {
    /// Where the broker is, and the pod's token and CA.
    pub target: BrokerTarget,
    /// The bindings whose fields become variables.
    pub bindings: Vec<String>,
    /// Prepended to every variable name.
    pub prefix: String,
    /// What a rotation does to the child.
    pub on_rotate: OnRotate,
    /// How long the child has to stop before it is killed.
    pub grace: Duration,
    /// Give the pod's leases back when stopped by SIGTERM.
    pub revoke_on_exit: bool,
    /// Where credentials and handles outlive the process (`--state-dir`).
    pub state_dir: Option<std::path::PathBuf>,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

/// `<PREFIX><BINDING>_<FIELD>`, upper-cased, every character that is not an
/// ASCII letter or digit turned into `_`.
pub fn variable_name(prefix: &str, binding: &str, field: &str) -> String {
    format!("{prefix}{binding}_{field}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The longest value a variable may hold: Linux refuses a single
/// environment string over 32 pages (`MAX_ARG_STRLEN`, 128 KiB).
pub const MAX_VALUE_BYTES: usize = 128 * 1024 - 1;

/// The most all credential variables together may hold, well inside what
/// `execve` accepts beside the app's own arguments and environment.
pub const MAX_ENVIRONMENT_BYTES: usize = 1024 * 1024;

/// The variables of `set`, binding by binding.
struct Environment {
    variables: BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// Bindings left out whole, and why: a NUL byte, a value over
    /// [`MAX_VALUE_BYTES`], two fields making one name (`password` and
    /// `PASSWORD`), or too much in all.
    refused: Vec<String>,
    /// Variables the container's own spec sets: the spec's value wins.
    kept: Vec<String>,
}

fn environment(set: &CredentialSet, prefix: &str, taken: &dyn Fn(&str) -> bool) -> Environment {
    let mut variables = BTreeMap::new();
    let mut refused = Vec::new();
    let mut kept = Vec::new();
    let mut total = 0;
    'bindings: for credential in set.iter() {
        let mut own = BTreeMap::new();
        for (field, value) in &credential.fields {
            let name = variable_name(prefix, &credential.binding, field);
            let refuse = if value.contains(&0) {
                Some(format!(
                    "field `{field}` holds a NUL byte, which no environment variable can"
                ))
            } else if value.len() > MAX_VALUE_BYTES {
                Some(format!(
                    "field `{field}` is {} bytes, over the kernel's {MAX_VALUE_BYTES} per variable (read it from a file instead)",
                    value.len()
                ))
            } else if own.contains_key(&name) {
                Some(format!(
                    "two of its fields make the variable {name} (names are upper-cased); rename one in the policy (output.files)"
                ))
            } else {
                None
            };
            if let Some(why) = refuse {
                refused.push(format!(
                    "binding `{}` is not passed to the app: {why}",
                    credential.binding
                ));
                continue 'bindings;
            }
            if taken(&name) {
                kept.push(format!(
                    "{name} is set by the container's spec and keeps that value (binding `{}`, field `{field}`)",
                    credential.binding
                ));
                continue;
            }
            own.insert(name, value.clone());
        }
        let size: usize = own.iter().map(|(n, v)| n.len() + v.len() + 2).sum();
        if total + size > MAX_ENVIRONMENT_BYTES {
            refused.push(format!(
                "binding `{}` is not passed to the app: the credentials' variables would exceed {MAX_ENVIRONMENT_BYTES} bytes",
                credential.binding
            ));
            continue;
        }
        total += size;
        variables.extend(own);
    }
    Environment {
        variables,
        refused,
        kept,
    }
}

/// Whether the wrapper's own environment (what the container's spec set)
/// has `name`.
fn set_by_spec(name: &str) -> bool {
    std::env::var_os(name).is_some()
}

/// Why `exec` could not start the app.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The broker ended the watch before any credential (a denial).
    #[error("{0}")]
    Broker(#[from] tessera_client::Error),
    /// The watch ended without credentials.
    #[error("the broker closed the watch before sending credentials")]
    NoCredentials,
    /// The fields do not make valid variables.
    #[error("{0}")]
    Variables(String),
    /// The command could not be started.
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        /// The program named after `--`.
        program: String,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// SIGCHLD cannot be handled, so the app's exit would go unseen.
    #[error("cannot watch for the app's exit (SIGCHLD): {0}")]
    ChildSignal(std::io::Error),
}

fn spawn(
    command: &[OsString],
    variables: &BTreeMap<String, Zeroizing<Vec<u8>>>,
) -> Result<Pid, ExecError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| ExecError::Variables("no command to run".to_owned()))?;
    let child = std::process::Command::new(program)
        .args(args)
        .envs(
            variables
                .iter()
                .map(|(name, value)| (OsStr::new(name), OsStr::from_bytes(value))),
        )
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
    // Reaped below with waitpid, never through `Child`.
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)).ok_or_else(|| ExecError::Spawn {
        program: program.to_string_lossy().into_owned(),
        source: std::io::Error::other("no process id"),
    })
}

/// How a reaped child ended, as a shell reports it: its exit code, or 128
/// plus the signal that ended it.
fn exit_code(status: rustix::process::WaitStatus) -> u8 {
    status
        .exit_status()
        .map(|code| u8::try_from(code & 0xff).unwrap_or(1))
        .or_else(|| {
            status
                .terminating_signal()
                .map(|signal| u8::try_from(128 + signal).unwrap_or(255))
        })
        .unwrap_or(1)
}

/// Reaps every exited process (orphans included: the wrapper is PID 1, or
/// their subreaper); the status of `child` when it is among them.
fn reap(child: Pid) -> Option<u8> {
    let mut ended = None;
    while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
        if pid == child {
            ended = Some(exit_code(status));
        }
    }
    ended
}

/// Runs the app: see the module documentation. Returns the exit status to
/// leave with.
///
/// # Errors
/// An [`ExecError`] when the app could not be started at all.
pub async fn run(job: ExecJob) -> Result<u8, ExecError> {
    // Orphans of the app are ours to reap even when we are not PID 1.
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let mut child_ended = signal(SignalKind::child()).map_err(ExecError::ChildSignal)?;
    let forwarded = [
        (SignalKind::terminate(), Signal::TERM),
        (SignalKind::interrupt(), Signal::INT),
        (SignalKind::hangup(), Signal::HUP),
        (SignalKind::quit(), Signal::QUIT),
        (SignalKind::user_defined1(), Signal::USR1),
        (SignalKind::user_defined2(), Signal::USR2),
    ];
    let mut incoming =
        futures::stream::select_all(forwarded.into_iter().filter_map(|(kind, forward)| {
            let stream = signal(kind).ok()?;
            Some(Box::pin(futures::stream::unfold(
                stream,
                move |mut stream| async move {
                    stream.recv().await?;
                    Some((forward, stream))
                },
            )))
        }));

    let client = match &job.state_dir {
        Some(dir) => Client::new(job.target.clone())
            .with_store(dir)
            .map_err(|e| ExecError::Broker(e.into()))?,
        None => Client::new(job.target.clone()),
    };
    let bindings: Vec<&str> = job.bindings.iter().map(String::as_str).collect();
    let mut watch = Box::pin(client.watch(&bindings));
    // Until the first credentials, a stop request ends the wrapper at once
    // (the pod is going away; there is no app to forward it to).
    let first = tokio::select! {
        first = watch.next() => first.ok_or(ExecError::NoCredentials)??,
        Some(signal) = incoming.next() => {
            tracing::info!(?signal, "stopped before the app started");
            return Ok(128 + u8::try_from(signal.as_raw()).unwrap_or(15));
        }
    };
    let started = environment(&first, &job.prefix, &set_by_spec);
    for problem in &started.refused {
        tracing::error!("{problem}");
    }
    for kept in &started.kept {
        tracing::warn!("{kept}");
    }
    let mut variables = started.variables;
    drop(first);
    let mut child = spawn(&job.command, &variables)?;
    tracing::info!(
        pid = child.as_raw_nonzero().get(),
        variables = variables.len(),
        "started the app with its credentials in the environment"
    );
    let mut watching = true;
    let mut stopping = false;
    // A rotation is restarting the child; it is killed at `kill_at`.
    let mut restarting = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let code = loop {
        tokio::select! {
            _ = child_ended.recv() => {
                let Some(code) = reap(child) else { continue };
                if restarting && !stopping {
                    restarting = false;
                    kill_at = None;
                    child = spawn(&job.command, &variables)?;
                    tracing::info!(pid = child.as_raw_nonzero().get(), "restarted the app with the rotated credentials");
                    continue;
                }
                break code;
            }
            Some(signal) = incoming.next() => {
                if matches!(signal, Signal::TERM | Signal::INT) {
                    stopping = true;
                }
                let _ = kill_process(child, signal);
            }
            item = watch.next(), if watching => match item {
                Some(Ok(set)) => match environment(&set, &job.prefix, &set_by_spec) {
                    // Values the app could not be started with: it is not
                    // stopped for them, and runs on what it has.
                    Environment { refused, .. } if !refused.is_empty() => {
                        for problem in &refused {
                            tracing::error!("{problem}; the app keeps running on its current variables");
                        }
                    }
                    // Stopping: the app drains on what it has.
                    _ if stopping => {}
                    Environment { variables: next, .. } if next != variables => {
                        variables = next;
                        match job.on_rotate {
                            // A restart under way starts with the newest values.
                            OnRotate::Restart if restarting => {}
                            OnRotate::Restart => {
                                tracing::info!("credentials rotated: restarting the app");
                                let _ = kill_process(child, Signal::TERM);
                                restarting = true;
                                kill_at = Some(tokio::time::Instant::now() + job.grace);
                            }
                            OnRotate::Signal(signal) => {
                                tracing::info!(?signal, "credentials rotated: signalling the app");
                                let _ = kill_process(child, signal);
                            }
                        }
                    }
                    _ => {}
                },
                Some(Err(error)) => {
                    tracing::warn!(%error, "the broker ended the watch; the app keeps its current variables");
                    watching = false;
                }
                None => watching = false,
            },
            () = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => {
                tracing::warn!(grace = ?job.grace, "the app did not stop within the grace period; killing it");
                let _ = kill_process(child, Signal::KILL);
                kill_at = None;
            }
        }
    };
    if stopping && job.revoke_on_exit {
        match client.revoke(&bindings).await {
            Ok(revoked) => tracing::info!(?revoked, "revoked the pod's credentials on exit"),
            Err(error) => {
                tracing::warn!(%error, "could not revoke on exit; leases expire by their TTL")
            }
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_names_are_upper_case_with_underscores() {
        assert_eq!(
            variable_name("", "orders-db", "password"),
            "ORDERS_DB_PASSWORD"
        );
        assert_eq!(variable_name("APP_", "tls", "tls.crt"), "APP_TLS_TLS_CRT");
        assert_eq!(variable_name("", "db", "ünï"), "DB__N_");
    }

    #[test]
    fn on_rotate_is_restart_or_a_signal() {
        assert_eq!(parse_on_rotate("restart"), Ok(OnRotate::Restart));
        assert_eq!(
            parse_on_rotate("signal:HUP"),
            Ok(OnRotate::Signal(Signal::HUP))
        );
        assert_eq!(
            parse_on_rotate("signal:SIGUSR1"),
            Ok(OnRotate::Signal(Signal::USR1))
        );
        assert!(parse_on_rotate("reload").is_err());
        assert!(parse_on_rotate("signal:KILL").is_err());
    }
}
