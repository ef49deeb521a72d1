//! The pod's `tessera.dev/*` annotations: every name, their size bounds, and
//! one parse into a typed request.

use std::collections::BTreeMap;

use super::{denial::Denial, names::*};
use crate::config::webhook::{Injection, check_mount_path};

/// `"true"` asks for injection.
pub const INJECT: &str = "tessera.dev/inject";
/// Comma-separated binding names.
pub const BINDINGS: &str = "tessera.dev/bindings";
/// The largest value of any `tessera.dev/*` annotation the webhook reads:
/// the API server allows 256 KiB of annotations, far more than a binding
/// list or a few templates need, and each byte costs every replica work.
pub const MAX_ANNOTATION_BYTES: usize = 16 * 1024;
/// The most bindings one pod may list.
pub const MAX_BINDINGS: usize = 64;
/// The largest JSON patch the webhook answers with (a usual one is ~10 KiB).
pub const MAX_PATCH_BYTES: usize = 256 * 1024;
/// Where app containers see the files (absolute path).
pub const MOUNT_PATH: &str = "tessera.dev/mount-path";
/// `run` (write and follow rotations, the default) or `once` (write before
/// the app starts, no sidecar).
pub const MODE: &str = "tessera.dev/mode";
/// Signal the app gets after a rotation (`HUP`, `USR1`, `USR2`, `TERM`, `INT`).
pub const RELOAD_SIGNAL: &str = "tessera.dev/reload-signal";
/// Name of the app's process to signal (`/proc/<pid>/comm`, at most 15 characters).
pub const RELOAD_PROCESS: &str = "tessera.dev/reload-process";
/// `http://127.0.0.1:PORT/PATH` the sidecar `POST`s to after a rotation.
pub const RELOAD_URL: &str = "tessera.dev/reload-url";
/// Comma-separated names of the containers that mount the credentials
/// (default: every container the pod brought).
pub const MOUNT_CONTAINERS: &str = "tessera.dev/mount-containers";
/// Prefix of the per-binding TTL annotations (`tessera.dev/ttl.orders-db: 10m`):
/// a leased credential's lifetime, shorter than the policy's.
pub const TTL_PREFIX: &str = "tessera.dev/ttl.";
/// The sidecar's CPU limit, up to the platform's `maxResources.cpu`.
pub const SIDECAR_CPU: &str = "tessera.dev/sidecar-cpu";
/// The sidecar's memory limit, up to the platform's `maxResources.memory`.
pub const SIDECAR_MEMORY: &str = "tessera.dev/sidecar-memory";
/// Set by the webhook: `injected`.
pub const STATUS: &str = "tessera.dev/status";
/// Set by the webhook: what it injected, as JSON.
pub const INJECTED: &str = "tessera.dev/injected";

/// The parsed Tessera annotations of a pod that asks for injection.
pub(super) struct Request {
    pub(super) bindings: Vec<String>,
    pub(super) mount_path: String,
    pub(super) once: bool,
    /// How the app is told of a rotation.
    pub(super) reload: Reload,
    /// `mode: env`: variables instead of files.
    pub(super) env: Option<EnvRequest>,
}

/// How the sidecar tells the app that its credentials rotated.
pub(super) struct Reload {
    /// Signal name and the name of the process to signal.
    pub(super) signal: Option<(String, String)>,
    /// Loopback URL to `POST` to.
    pub(super) url: Option<String>,
}

/// Signals the sidecar sends (`--notify-signal`).
pub(super) const SIGNALS: [&str; 5] = ["HUP", "USR1", "USR2", "TERM", "INT"];

pub(super) fn parse_reload(
    annotations: &BTreeMap<String, String>,
    once: bool,
) -> Result<Reload, Denial> {
    let signal = annotations.get(RELOAD_SIGNAL);
    let process = annotations.get(RELOAD_PROCESS);
    let url = annotations.get(RELOAD_URL);
    if once && (signal.is_some() || url.is_some()) {
        return Err(Denial(format!(
            "annotations {RELOAD_SIGNAL} and {RELOAD_URL} need a running sidecar ({MODE}: run): with `once` nothing rotates"
        )));
    }
    let signal = match (signal, process) {
        (None, None) => None,
        (Some(signal), Some(process)) => {
            let name = signal.trim_start_matches("SIG");
            if !SIGNALS.contains(&name) {
                return Err(Denial(format!(
                    "annotation {RELOAD_SIGNAL}: `{signal}` is not one of {}",
                    SIGNALS.join(", ")
                )));
            }
            if process.len() > 15 && !process.contains(|c: char| c == '/' || c.is_control()) {
                let shown: String = process.chars().take(15).collect();
                return Err(Denial(format!(
                    "annotation {RELOAD_PROCESS}: `{}` is longer than the 15 characters the kernel keeps of a process name; write what `ps` shows: `{}`",
                    process.escape_debug(),
                    shown.escape_debug()
                )));
            }
            if process.is_empty()
                || process.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control())
            {
                return Err(Denial(format!(
                    "annotation {RELOAD_PROCESS}: `{}` is not a process name (the name `ps` shows, at most 15 characters)",
                    process.escape_debug()
                )));
            }
            Some((name.to_owned(), process.clone()))
        }
        (Some(_), None) => {
            return Err(Denial(format!(
                "annotation {RELOAD_SIGNAL} needs {RELOAD_PROCESS}: name the app's process to signal"
            )));
        }
        (None, Some(_)) => {
            return Err(Denial(format!(
                "annotation {RELOAD_PROCESS} needs {RELOAD_SIGNAL}: say which signal to send"
            )));
        }
    };
    let url = match url {
        None => None,
        Some(url) => {
            // The sidecar's own parser: what is admitted here, it accepts.
            tessera_proto::parse_reload_url(url)
                .map_err(|e| Denial(format!("annotation {RELOAD_URL}: {e}")))?;
            Some(url.clone())
        }
    };
    Ok(Reload { signal, url })
}

pub(super) fn parse_annotations(
    annotations: &BTreeMap<String, String>,
    injection: &Injection,
) -> Result<Option<Request>, Denial> {
    match annotations.get(INJECT).map(String::as_str) {
        None | Some("false") => return Ok(None),
        Some("true") => {}
        Some(other) => {
            return Err(Denial(format!(
                "annotation {INJECT}: `{other}` must be \"true\" or \"false\""
            )));
        }
    }
    let Some(list) = annotations.get(BINDINGS) else {
        return Err(Denial(format!(
            "annotation {BINDINGS} is missing: name the bindings this pod needs, e.g. \"orders-db,tls\""
        )));
    };
    let count = list.split(',').count();
    if count > MAX_BINDINGS {
        return Err(Denial(format!(
            "annotation {BINDINGS}: {count} bindings listed, at most {MAX_BINDINGS} per pod (split the workload, or ask the policy owners for fewer, larger bindings)"
        )));
    }
    let mut bindings = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(Denial(format!(
                "annotation {BINDINGS}: `{list}` has an empty name (separate names with single commas)"
            )));
        }
        if !tessera_proto::is_safe_name(name) || name.contains(char::is_whitespace) {
            return Err(Denial(format!(
                "annotation {BINDINGS}: `{name}` is not a binding name"
            )));
        }
        if !seen.insert(name) {
            return Err(Denial(format!(
                "annotation {BINDINGS}: `{name}` is listed twice"
            )));
        }
        bindings.push(name.to_owned());
    }
    let mount_path = annotations
        .get(MOUNT_PATH)
        .cloned()
        .unwrap_or_else(|| injection.mount_path.clone());
    check_mount_path(&mount_path).map_err(|e| Denial(format!("annotation {MOUNT_PATH}: {e}")))?;
    if overlaps(&mount_path, RESERVED_DIR) {
        return Err(Denial(format!(
            "annotation {MOUNT_PATH}: `{mount_path}` overlaps {RESERVED_DIR}, where Tessera mounts the pod's token; choose another path"
        )));
    }
    let (once, env) = match annotations.get(MODE).map(String::as_str) {
        None | Some("run") => (false, false),
        Some("once") => (true, false),
        Some("env") => (false, true),
        Some(other) => {
            return Err(Denial(format!(
                "annotation {MODE}: `{other}` must be \"run\", \"once\" or \"env\""
            )));
        }
    };
    let reload = parse_reload(annotations, once)?;
    if env && (reload.signal.is_some() || reload.url.is_some()) {
        return Err(Denial(format!(
            "annotations {RELOAD_SIGNAL} and {RELOAD_URL} apply to files; with {MODE}: env, say what a rotation does with {}",
            ENV_ON_ROTATE
        )));
    }
    let env = env.then(|| parse_env(annotations, &SIGNALS)).transpose()?;
    Ok(Some(Request {
        bindings,
        mount_path,
        once,
        reload,
        env,
    }))
}

/// Refuses a `tessera.dev/*` annotation too large to be meant, naming it,
/// before anything parses it.
pub(super) fn check_sizes(annotations: &BTreeMap<String, String>) -> Result<(), Denial> {
    match annotations
        .iter()
        .find(|(key, value)| key.starts_with("tessera.dev/") && value.len() > MAX_ANNOTATION_BYTES)
    {
        Some((key, value)) => Err(Denial(format!(
            "annotation {key} is {} bytes; Tessera's annotations hold at most {MAX_ANNOTATION_BYTES}",
            value.len()
        ))),
        None => Ok(()),
    }
}

/// Comma-separated names of the containers to wrap (default: every container).
pub const ENV_CONTAINERS: &str = "tessera.dev/env-containers";
/// Prepended to every variable name.
pub const ENV_PREFIX: &str = "tessera.dev/env-prefix";
/// `restart` (default) or `signal:<NAME>`.
pub const ENV_ON_ROTATE: &str = "tessera.dev/env-on-rotate";
/// The longest variable prefix a pod may ask for.
pub const MAX_PREFIX: usize = 32;

/// What the pod asked for, checked.
pub struct EnvRequest {
    /// The containers to wrap; every one when `None`.
    pub containers: Option<Vec<String>>,
    /// Prepended to every variable name.
    pub prefix: Option<String>,
    /// `restart` or `signal:<NAME>`.
    pub on_rotate: Option<String>,
}

/// Reads the env-mode annotations.
///
/// # Errors
/// A [`Denial`] naming the annotation that is wrong.
pub fn parse_env(
    annotations: &BTreeMap<String, String>,
    signals: &[&str],
) -> Result<EnvRequest, Denial> {
    let containers = annotations.get(ENV_CONTAINERS).map(|list| {
        list.split(',')
            .map(|c| c.trim().to_owned())
            .collect::<Vec<_>>()
    });
    if containers
        .as_ref()
        .is_some_and(|names| names.iter().any(String::is_empty))
    {
        return Err(Denial(format!(
            "annotation {ENV_CONTAINERS}: name containers separated by single commas"
        )));
    }
    let prefix = annotations.get(ENV_PREFIX).cloned();
    if let Some(prefix) = &prefix
        && prefix.len() > MAX_PREFIX
    {
        return Err(Denial(format!(
            "annotation {ENV_PREFIX}: {} characters, at most {MAX_PREFIX}",
            prefix.len()
        )));
    }
    if let Some(prefix) = &prefix
        && (prefix.starts_with(|c: char| c.is_ascii_digit())
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(Denial(format!(
            "annotation {ENV_PREFIX}: `{}` is not the start of a variable name (letters, digits, `_`)",
            prefix.escape_debug()
        )));
    }
    let on_rotate = annotations.get(ENV_ON_ROTATE).cloned();
    if let Some(text) = &on_rotate {
        let valid = text == "restart"
            || text
                .strip_prefix("signal:")
                .is_some_and(|name| signals.contains(&name.trim_start_matches("SIG")));
        if !valid {
            return Err(Denial(format!(
                "annotation {ENV_ON_ROTATE}: `{}` is not `restart` or `signal:<{}>`",
                text.escape_debug(),
                signals.join("|")
            )));
        }
    }
    Ok(EnvRequest {
        containers,
        prefix,
        on_rotate,
    })
}
