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
    use std::os::unix::fs::PermissionsExt as _;
    let target = dir.join("tessera-sidecar");
    let partial = dir.join(".tessera-sidecar.partial");
    std::fs::copy("/proc/self/exe", &partial)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&partial, &target)?;
    Ok(target)
}

/// Everything `exec` needs.
#[derive(Debug)]
pub struct ExecJob {
    /// The broker.
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

/// The variables of every field of `set`.
///
/// # Errors
/// Two fields that map to one name (`db-user` and `db_user`).
fn environment(
    set: &CredentialSet,
    prefix: &str,
) -> Result<BTreeMap<String, Zeroizing<Vec<u8>>>, String> {
    let mut variables = BTreeMap::new();
    for credential in set.iter() {
        for (field, value) in &credential.fields {
            let name = variable_name(prefix, &credential.binding, field);
            if variables.insert(name.clone(), value.clone()).is_some() {
                return Err(format!(
                    "two fields of binding `{}` make the variable {name}; rename one in the policy (output.files)",
                    credential.binding
                ));
            }
        }
    }
    Ok(variables)
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
        /// The program.
        program: String,
        /// Why.
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

    let client = Client::new(job.target.clone());
    let bindings: Vec<&str> = job.bindings.iter().map(String::as_str).collect();
    let mut watch = Box::pin(client.watch(&bindings));
    let first = watch.next().await.ok_or(ExecError::NoCredentials)??;
    let mut variables = environment(&first, &job.prefix).map_err(ExecError::Variables)?;
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
                Some(Ok(set)) => match environment(&set, &job.prefix) {
                    Ok(next) if next != variables => {
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
                    Ok(_) => {}
                    Err(problem) => tracing::warn!("{problem}; the app keeps its current variables"),
                },
                Some(Err(error)) => {
                    tracing::warn!(%error, "the broker ended the watch; the app keeps its current variables");
                    watching = false;
                }
                None => watching = false,
            },
            () = sleep_until(kill_at), if kill_at.is_some() => {
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

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
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
