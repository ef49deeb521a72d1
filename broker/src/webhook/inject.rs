//! What the webhook does to one pod: read its annotations, check the
//! requested bindings against the policy, and add the volume, the projected
//! token and the sidecar. Pure, so every case is unit-tested without a server.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, Pod, PodSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Serialize;

use super::{
    api_client, env_mode, pod_output,
    settings::{Injection, SidecarMode, quantity_value},
};
use crate::{
    identity::Identity,
    policy::{ImageUser, Policy},
};

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

/// Name of the sidecar (native or classic) container.
pub const SIDECAR: &str = "tessera-sidecar";
/// Name of the classic init container.
pub const INIT: &str = "tessera-init";
/// The in-memory volume holding the credentials.
pub const CREDENTIALS_VOLUME: &str = "tessera-credentials";
/// The projected service-account token volume.
pub const TOKEN_VOLUME: &str = "tessera-token";
/// Where the sidecar finds its token directory.
pub const TOKEN_DIR: &str = "/var/run/secrets/tessera.dev/serviceaccount";
/// Tessera's own directory in the pod (the sidecar's token, the api-client
/// volume): no credentials mount path may overlap it.
pub const RESERVED_DIR: &str = "/var/run/secrets/tessera.dev";
/// The sidecar binary inside its image.
const SIDECAR_BINARY: &str = "/tessera-sidecar";

/// What the webhook decided for a pod.
#[derive(Debug)]
pub enum Decision {
    /// Left alone, and why.
    Skip(&'static str),
    /// The pod with Tessera added.
    Inject(Box<Pod>, Injected),
}

/// How Tessera was added to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// One init container with `restartPolicy: Always` and a startup probe.
    NativeSidecar,
    /// An init container that writes once, plus a sidecar container.
    ClassicSidecar,
    /// An init container that writes once (Jobs on classic clusters, `mode: once`).
    InitOnly,
    /// An init container installs `tessera-sidecar`, which wraps the app's
    /// command and gives it the credentials as environment variables.
    Exec,
}

/// The record of one injection, kept in the `tessera.dev/injected` annotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Injected {
    /// How it was added; none when no sidecar was (`tessera.dev/api-client`
    /// alone: the app containers call the broker themselves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// The bindings written.
    pub bindings: Vec<String>,
    /// Where app containers see them.
    pub mount_path: String,
    /// Who can read the files: `group <gid>` or `user <uid>`.
    pub readers: String,
    /// The app containers got the token, CA and address to call the broker.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub api_client: bool,
    /// What the pod's creator should know (sent back as admission warnings).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Why a pod was refused; the message goes back to whoever created it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("tessera: {0}")]
pub struct Denial(pub String);

/// Checks a mount path: absolute, normalized, not `/`.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn check_mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path == "/" {
        return Err(format!("`{path}` must be an absolute path below /"));
    }
    if path
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "`{path}` must be normalized (no `//`, `.`, `..` or trailing `/`)"
        ));
    }
    Ok(())
}

/// Whether one of two normalized absolute paths is the other or below it.
fn overlaps(a: &str, b: &str) -> bool {
    let below = |inner: &str, outer: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    below(a, b) || below(b, a)
}

/// The parsed Tessera annotations of a pod that asks for injection.
struct Request {
    bindings: Vec<String>,
    mount_path: String,
    once: bool,
    /// How the app is told of a rotation.
    reload: Reload,
    /// `mode: env`: variables instead of files.
    env: Option<env_mode::EnvRequest>,
}

/// How the sidecar tells the app that its credentials rotated.
struct Reload {
    /// Signal name and the name of the process to signal.
    signal: Option<(String, String)>,
    /// Loopback URL to `POST` to.
    url: Option<String>,
}

/// Signals the sidecar sends (`--notify-signal`).
const SIGNALS: [&str; 5] = ["HUP", "USR1", "USR2", "TERM", "INT"];

fn parse_reload(annotations: &BTreeMap<String, String>, once: bool) -> Result<Reload, Denial> {
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

fn parse_annotations(
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
            env_mode::ENV_ON_ROTATE
        )));
    }
    let env = env
        .then(|| env_mode::parse(annotations, &SIGNALS))
        .transpose()?;
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
fn check_sizes(annotations: &BTreeMap<String, String>) -> Result<(), Denial> {
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

/// Refuses bindings the pod's service account may not have, naming each.
fn check_policy(
    policy: &Policy,
    namespace: &str,
    spec: &PodSpec,
    labels: Option<&BTreeMap<String, String>>,
    bindings: &[String],
) -> Result<(), Denial> {
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let identity = Identity {
        namespace: namespace.to_owned(),
        service_account,
        service_account_uid: String::new(),
        pod: None,
        node: None,
        pod_labels: labels.cloned(),
        expires_at: 0,
    };
    // One message whether a binding is missing or granted to others: anyone
    // who reaches the webhook port must not learn from it which bindings
    // exist (the gRPC API hides this too). The broker's log says which.
    let refused: Vec<&String> = bindings
        .iter()
        .filter(|name| !policy.binding(name).is_some_and(|b| b.grants(&identity)))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        // One line per request, however many bindings it lists.
        let missing: Vec<&str> = refused
            .iter()
            .filter(|name| policy.binding(name).is_none())
            .map(|name| name.as_str())
            .collect();
        tracing::info!(
            bindings = %refused.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(",").escape_debug(),
            not_in_policy = %missing.join(",").escape_debug(),
            namespace = %identity.namespace,
            service_account = %identity.service_account,
            "admission: bindings not granted"
        );
        let names: Vec<String> = refused.iter().map(|n| format!("`{n}`")).collect();
        Err(Denial(format!(
            "binding {} not granted to service account {}/{} (fix {BINDINGS}, or ask the policy owners to grant it)",
            names.join(", "),
            identity.namespace,
            identity.service_account
        )))
    }
}

/// Who may read the files: the pod's `fsGroup` (files 0440), else the one
/// user every app container runs as (files 0400).
enum Readers {
    Group(i64),
    User(i64),
}

/// How the files become readable by the app.
struct ReadersChoice {
    readers: Readers,
    /// `fsGroup` Tessera sets on a pod that names no single non-root user,
    /// and the admission warning that says so.
    set_fs_group: Option<(i64, String)>,
}

fn readers(spec: &PodSpec, image_user: ImageUser, group: i64) -> Result<ReadersChoice, Denial> {
    let pod = spec.security_context.as_ref();
    if let Some(group) = pod.and_then(|s| s.fs_group) {
        return Ok(ReadersChoice {
            readers: Readers::Group(group),
            set_fs_group: None,
        });
    }
    let pod_user = pod.and_then(|s| s.run_as_user);
    let users: Vec<(&str, Option<i64>)> = app_containers(spec)
        .map(|c| {
            let user = c
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or(pod_user);
            (c.name.as_str(), user)
        })
        .collect();
    let distinct: BTreeSet<Option<i64>> = users.iter().map(|(_, user)| *user).collect();
    match distinct.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(user)] if *user > 0 => {
            return Ok(ReadersChoice {
                readers: Readers::User(*user),
                set_fs_group: None,
            });
        }
        _ => {}
    }
    // Containers run as root (named, or perhaps by their image), as their
    // images' users or as different users: one group they all get as a
    // supplementary group makes the files readable (the sidecar itself
    // never runs as root). Both cases are treated alike and said out loud.
    let who: Vec<String> = users
        .iter()
        .map(|(name, user)| match user {
            Some(0) => format!("`{name}` runs as root"),
            Some(uid) => format!("`{name}` runs as {uid}"),
            None => format!("`{name}` as its image's user"),
        })
        .collect();
    match image_user {
        ImageUser::FsGroup => Ok(ReadersChoice {
            readers: Readers::Group(group),
            set_fs_group: Some((
                group,
                format!(
                    "Tessera set spec.securityContext.fsGroup {group} so the credentials are readable ({}); set fsGroup, or one non-root runAsUser for every container, to choose yourself",
                    who.join(", ")
                ),
            )),
        }),
        ImageUser::Refuse => Err(Denial(format!(
            "no single non-root user reads the credentials ({}): set spec.securityContext.fsGroup (files become readable by that group) or one non-root runAsUser for every container (the policy's limits.imageUser is refuse)",
            who.join(", ")
        ))),
    }
}

fn app_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

/// Decides what to do with `pod`, created in `namespace`: skip it, refuse it
/// with a message for its creator, or return it with Tessera added.
///
/// # Errors
/// A [`Denial`] for malformed annotations, bindings the service account may
/// not have, or a pod the sidecar cannot serve safely.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    injection: &Injection,
    mode: SidecarMode,
    ca_pem: &str,
    policy: &Policy,
    kv_keys: &pod_output::KvKeys<'_>,
) -> Result<Decision, Denial> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    check_sizes(annotations)?;
    let api_client = api_client::requested(annotations)?;
    let request = parse_annotations(annotations, injection)?;
    if request.is_none() && !api_client {
        return Ok(Decision::Skip("not annotated"));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Denial("the pod has no spec".to_owned()));
    };
    if already_injected(annotations, spec)? {
        return Ok(Decision::Skip("already injected"));
    }
    // Windows first: no DNS setting would make the sidecar run there.
    if request.is_some() {
        refuse_windows(spec)?;
    }
    reaches_broker(spec, injection)?;
    let Some(request) = request else {
        let mut pod = pod.clone();
        api_client::add(&mut pod, injection, ca_pem)?;
        let injected = Injected {
            shape: None,
            bindings: Vec::new(),
            mount_path: String::new(),
            readers: String::new(),
            api_client,
            warnings: Vec::new(),
        };
        record(&mut pod, &injected);
        return Ok(Decision::Inject(Box::new(pod), injected));
    };
    if request.reload.signal.is_some() && spec.host_pid == Some(true) {
        return Err(Denial(format!(
            "annotation {RELOAD_SIGNAL} on a hostPID pod: the API server refuses shareProcessNamespace beside hostPID, and in the node's process namespace a name could match another pod's process; use {RELOAD_URL}, or {MODE}: env with tessera.dev/env-on-rotate"
        )));
    }
    let labels = injection
        .pod_labels_known
        .then(|| pod.metadata.labels.clone().unwrap_or_default());
    check_policy(policy, namespace, spec, labels.as_ref(), &request.bindings)?;
    let shaped = pod_output::check(annotations, &request.bindings, policy, kv_keys)?;
    let max_ttl = max_ttl(annotations, &request.bindings, policy)?;
    if let Some(env_request) = &request.env {
        if max_ttl.is_some() {
            return Err(Denial(format!(
                "annotations {TTL_PREFIX}* apply to the sidecar's files; with {MODE}: env the policy's ttl holds"
            )));
        }
        if shaped.is_some() {
            return Err(Denial(format!(
                "annotations {}* and {}* shape files; with {MODE}: env there are none",
                pod_output::FILES_PREFIX,
                pod_output::TEMPLATES_PREFIX
            )));
        }
        return inject_env(
            pod,
            injection,
            ca_pem,
            &request.bindings,
            env_request,
            api_client,
        );
    }
    let mounted = mount_containers(annotations, spec)?;
    let resources = fit_pod(spec, sidecar_resources(annotations, injection)?)?;
    let choice = readers(spec, policy.limits.image_user, injection.run_as_user)?;
    let signal_as = request
        .reload
        .signal
        .as_ref()
        .map(|_| app_user(spec))
        .transpose()?;
    let mut warnings: Vec<String> = choice
        .set_fs_group
        .iter()
        .map(|(_, warning)| warning.clone())
        .collect();
    if spec.dns_policy.as_deref() == Some("None") {
        warnings.push(format!(
            "dnsPolicy: None: the pod's dnsConfig must resolve the broker's address {} or the sidecar cannot start",
            injection.broker_address
        ));
    }
    let metrics_port = metrics_port(spec, injection, &mut warnings);
    for name in [CREDENTIALS_VOLUME, TOKEN_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(Denial(format!(
                "the pod already has a volume named `{name}`; rename it"
            )));
        }
    }
    for container in app_containers(spec) {
        // Nested mounts fail at the runtime: the inner mount point cannot be
        // made in a (read-only) volume, and the container never starts.
        if let Some(existing) = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.trim_end_matches('/'))
            .find(|path| overlaps(path, &request.mount_path))
        {
            let relation = if existing == request.mount_path {
                "at"
            } else if existing.starts_with(request.mount_path.as_str()) {
                "below"
            } else {
                "above"
            };
            return Err(Denial(format!(
                "container `{}` already mounts {existing}, {relation} {}; a mount inside another cannot be made at start, so choose a path apart from the container's mounts with {MOUNT_PATH}",
                container.name, request.mount_path
            )));
        }
    }

    let restarts = spec.restart_policy.as_deref().unwrap_or("Always") == "Always";
    let shape = match (request.once, mode) {
        (true, _) => Shape::InitOnly,
        (false, SidecarMode::Native | SidecarMode::Auto) => Shape::NativeSidecar,
        (false, SidecarMode::Classic) if restarts => Shape::ClassicSidecar,
        // A classic sidecar would keep a Job from completing.
        (false, SidecarMode::Classic) => Shape::InitOnly,
    };
    let injected = Injected {
        shape: Some(shape),
        bindings: request.bindings.clone(),
        mount_path: request.mount_path.clone(),
        readers: match (&choice.readers, &choice.set_fs_group) {
            (Readers::Group(gid), Some(_)) => {
                format!("group {gid} (fsGroup set by Tessera: no single non-root user)")
            }
            (Readers::Group(gid), None) => format!("group {gid}"),
            (Readers::User(uid), _) => format!("user {uid}"),
        },
        api_client,
        warnings,
    };
    let sidecar = SidecarSpec {
        injection,
        request: &request,
        readers: &choice.readers,
        ca_pem,
        metrics_port,
        run_as: signal_as,
        pod_output: shaped.as_deref(),
        max_ttl: max_ttl.as_deref(),
        resources,
    };

    let mut pod = pod.clone();
    let app_mount = VolumeMount {
        name: CREDENTIALS_VOLUME.to_owned(),
        mount_path: request.mount_path.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    if request.reload.signal.is_some() {
        // The sidecar finds the app's process by name.
        spec.share_process_namespace = Some(true);
    }
    if let Some((group, _)) = choice.set_fs_group {
        let context = spec.security_context.get_or_insert_with(Default::default);
        context.fs_group = Some(group);
        // Only the volume's root is checked: a large data volume is not
        // re-owned file by file at every start.
        context.fs_group_change_policy = Some("OnRootMismatch".to_owned());
    }
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
        .filter(|c| mounted.as_ref().is_none_or(|names| names.contains(&c.name)))
    {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(app_mount.clone());
    }
    let init = spec.init_containers.get_or_insert_with(Vec::new);
    // First, so init containers that follow (migrations) can read the files.
    match shape {
        Shape::NativeSidecar => init.insert(0, sidecar.container(SIDECAR, "run", true)),
        Shape::ClassicSidecar => {
            init.insert(0, sidecar.container(INIT, "once", false));
            spec.containers
                .push(sidecar.container(SIDECAR, "run", false));
        }
        // Env mode returned earlier (`inject_env`); `once` is the only other shape.
        Shape::InitOnly | Shape::Exec => init.insert(0, sidecar.container(INIT, "once", false)),
    }
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(injection));
    if api_client {
        api_client::add(&mut pod, injection, ca_pem)?;
    }
    record(&mut pod, &injected);
    Ok(Decision::Inject(Box::new(pod), injected))
}

/// The one user the pod's containers run as, which the sidecar must run as
/// to signal the app: a container that drops every capability may signal
/// only its own user's processes.
fn app_user(spec: &PodSpec) -> Result<i64, Denial> {
    let pod_user = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let users: BTreeSet<Option<i64>> = spec
        .containers
        .iter()
        .map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or(pod_user)
        })
        .collect();
    match users.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(user)] if *user > 0 => Ok(*user),
        _ => {
            let each: Vec<String> = spec
                .containers
                .iter()
                .map(|c| {
                    let user = c
                        .security_context
                        .as_ref()
                        .and_then(|s| s.run_as_user)
                        .or(pod_user);
                    format!(
                        "`{}` as {}",
                        c.name,
                        user.map_or_else(|| "its image's user".to_owned(), |u| u.to_string())
                    )
                })
                .collect();
            Err(Denial(format!(
                "annotation {RELOAD_SIGNAL}: the sidecar may signal only processes of its own user (it drops every capability), so the app's containers must run as one non-root runAsUser, and they run {}; set one, or reload with {RELOAD_URL}",
                each.join(", ")
            )))
        }
    }
}

/// Whether this webhook already injected the pod (a second pass, e.g. a
/// reinvocation): its record and what it added are both there. A status
/// annotation without Tessera's parts (written by hand, copied from another
/// pod) is not trusted; a container its owner named like Tessera's is
/// refused, not mistaken for Tessera's.
fn already_injected(
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
) -> Result<bool, Denial> {
    let marked = annotations.get(STATUS).map(String::as_str) == Some("injected")
        && annotations.contains_key(INJECTED);
    let ours: Vec<&str> = app_containers(spec)
        .map(|c| c.name.as_str())
        .filter(|name| env_mode::RESERVED.contains(name))
        .collect();
    let api_volume = spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == api_client::VOLUME);
    if marked && (!ours.is_empty() || api_volume) {
        return Ok(true);
    }
    match ours.first() {
        Some(name) => Err(Denial(format!(
            "container name `{name}` is reserved for Tessera's sidecar; rename the container"
        ))),
        None => Ok(false),
    }
}

/// Refuses pods whose resolver cannot find the broker: `hostNetwork` pods
/// and `dnsPolicy: Default` use the node's resolver, which knows no Service
/// names (an address given as an IP needs no resolver).
fn reaches_broker(spec: &PodSpec, injection: &Injection) -> Result<(), Denial> {
    let host = injection
        .broker_address
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned))
        .unwrap_or_default();
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok()
    {
        return Ok(());
    }
    let host_network = spec.host_network == Some(true);
    let (resolver, fix) = match (
        spec.dns_policy.as_deref().unwrap_or("ClusterFirst"),
        host_network,
    ) {
        ("Default", true) => ("dnsPolicy: Default", "ClusterFirstWithHostNet"),
        ("Default", false) => ("dnsPolicy: Default", "ClusterFirst"),
        ("ClusterFirst", true) => ("hostNetwork: true", "ClusterFirstWithHostNet"),
        _ => return Ok(()),
    };
    Err(Denial(format!(
        "the pod resolves names with its node's resolver ({resolver}), which cannot resolve the broker's address {host}: set spec.dnsPolicy: {fix} (a pod the cluster's DNS itself runs in, such as CoreDNS, cannot use the cluster's DNS: do not inject it)"
    )))
}

/// The sidecar is a Linux container on an in-memory volume: Windows pods
/// cannot have it (they can still call the broker: `tessera.dev/api-client`).
fn refuse_windows(spec: &PodSpec) -> Result<(), Denial> {
    let os = spec.os.as_ref().map(|os| os.name.as_str());
    let selected = spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get("kubernetes.io/os"))
        .map(String::as_str);
    // Required node affinity whose every term asks for Windows nodes only.
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let windows_only = |term: &k8s_openapi::api::core::v1::NodeSelectorTerm| {
        term.match_expressions.iter().flatten().any(|e| {
            e.key == "kubernetes.io/os"
                && e.operator == "In"
                && e.values
                    .as_ref()
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|v| v == "windows"))
        })
    };
    let affinity = !terms.is_empty() && terms.iter().all(windows_only);
    if os == Some("windows") || selected == Some("windows") || affinity {
        return Err(Denial(format!(
            "Windows pods cannot get the sidecar (a Linux container on an in-memory volume); run the workload on Linux nodes, or remove {INJECT} and call the broker from the app with {}",
            api_client::API_CLIENT
        )));
    }
    Ok(())
}

/// The sidecar's metrics port for this pod: none when a container of the
/// pod already uses it, or on the node's network (where every such pod on
/// the node would want it), with a warning saying so.
fn metrics_port(spec: &PodSpec, injection: &Injection, warnings: &mut Vec<String>) -> Option<u16> {
    let port = injection.metrics_port?;
    if spec.host_network == Some(true) {
        warnings.push(format!(
            "sidecar metrics are off: on the node's network (hostNetwork) port {port} would be shared by every such pod on the node"
        ));
        return None;
    }
    let taken = app_containers(spec).find(|c| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.container_port == i32::from(port))
    });
    if let Some(container) = taken {
        warnings.push(format!(
            "sidecar metrics are off: container `{}` uses port {port}, the sidecar's metrics port",
            container.name
        ));
        return None;
    }
    Some(port)
}

/// The pod's shorter TTLs as the sidecar's `--max-ttl` (`db=600s,...`).
///
/// # Errors
/// A [`Denial`] naming the annotation: an unlisted binding, a KV binding,
/// not a duration, longer than the policy's ttl (it may only shorten) or
/// below its floor (`limits.minTtl`).
fn max_ttl(
    annotations: &BTreeMap<String, String>,
    bindings: &[String],
    policy: &Policy,
) -> Result<Option<String>, Denial> {
    let mut asked = Vec::new();
    for (key, text) in annotations {
        let Some(name) = key.strip_prefix(TTL_PREFIX) else {
            continue;
        };
        let binding = bindings
            .iter()
            .any(|b| b == name)
            .then(|| policy.binding(name))
            .flatten()
            .ok_or_else(|| {
                Denial(format!(
                    "annotation {key}: binding `{name}` is not in {BINDINGS}"
                ))
            })?;
        if !binding.source.is_leased() {
            return Err(Denial(format!(
                "annotation {key}: `{name}` is a KV secret; only leased credentials have a TTL"
            )));
        }
        let ttl = humantime::parse_duration(text)
            .ok()
            .filter(|d| d.as_secs() > 0)
            .ok_or_else(|| {
                Denial(format!(
                    "annotation {key}: `{}` is not a duration like 10m",
                    text.escape_debug()
                ))
            })?;
        if ttl > binding.ttl {
            return Err(Denial(format!(
                "annotation {key}: {text} is longer than the policy's ttl {} for `{name}` (a pod may only shorten it)",
                crate::policy::format_duration(binding.ttl)
            )));
        }
        if let Err(floor) = binding.narrowed(ttl) {
            return Err(Denial(format!("annotation {key}: {floor}")));
        }
        asked.push(format!("{name}={}s", ttl.as_secs()));
    }
    Ok((!asked.is_empty()).then(|| asked.join(",")))
}

/// The sidecar's resources fitted to the pod: in a Guaranteed pod (every
/// container's requests equal its limits) the sidecar's requests are raised
/// to its limits so the pod keeps its QoS class; within pod-level
/// `spec.resources` (on by default since Kubernetes 1.34) the containers'
/// requests plus the sidecar's must fit, or the API server would refuse the
/// pod with a 422 its owner cannot place; that is refused here, with the
/// numbers.
fn fit_pod(
    spec: &PodSpec,
    mut resources: ResourceRequirements,
) -> Result<ResourceRequirements, Denial> {
    let value = |map: Option<&BTreeMap<String, Quantity>>, resource: &str| {
        map.and_then(|m| m.get(resource))
            .and_then(|q| quantity_value(&q.0))
    };
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    let guaranteed = containers.iter().all(|c| {
        let r = c.resources.as_ref();
        ["cpu", "memory"].iter().all(|resource| {
            let limit = value(r.and_then(|r| r.limits.as_ref()), resource);
            let request = value(r.and_then(|r| r.requests.as_ref()), resource).or(limit);
            limit.is_some() && request == limit
        })
    });
    if guaranteed && let Some(limits) = resources.limits.clone() {
        let requests = resources.requests.get_or_insert_with(Default::default);
        for resource in ["cpu", "memory"] {
            if let Some(limit) = limits.get(resource) {
                requests.insert(resource.to_owned(), limit.clone());
            }
        }
    }
    let Some(pod) = spec.resources.as_ref() else {
        return Ok(resources);
    };
    let show = |resource: &str, v: f64| {
        if resource == "cpu" {
            format!("{}m", (v * 1000.0).round())
        } else {
            format!("{}Mi", (v / 1_048_576.0).ceil())
        }
    };
    for resource in ["cpu", "memory"] {
        let sidecar_request = value(resources.requests.as_ref(), resource).unwrap_or(0.0);
        if let Some(budget) = value(pod.requests.as_ref(), resource) {
            // What runs alongside: the containers and the pod's own native
            // sidecars (init containers that keep running), as the API
            // server adds them up.
            let used: f64 = spec
                .containers
                .iter()
                .chain(
                    spec.init_containers
                        .iter()
                        .flatten()
                        .filter(|c| c.restart_policy.as_deref() == Some("Always")),
                )
                .filter_map(|c| {
                    value(
                        c.resources.as_ref().and_then(|r| r.requests.as_ref()),
                        resource,
                    )
                })
                .sum();
            if used + sidecar_request > budget {
                return Err(Denial(format!(
                    "the pod's spec.resources.requests.{resource} is {}; its containers request {} and Tessera's sidecar {} more: raise the pod-level request to at least {}",
                    show(resource, budget),
                    show(resource, used),
                    show(resource, sidecar_request),
                    show(resource, used + sidecar_request)
                )));
            }
        }
        if let (Some(budget), Some(limit)) = (
            value(pod.limits.as_ref(), resource),
            value(resources.limits.as_ref(), resource),
        ) && limit > budget
        {
            return Err(Denial(format!(
                "the pod's spec.resources.limits.{resource} is {}, below the sidecar's limit {}: raise it, or lower the sidecar's with tessera.dev/sidecar-{resource}",
                show(resource, budget),
                show(resource, limit)
            )));
        }
    }
    Ok(resources)
}

/// The sidecar's requests and limits: the platform's, with the limits a
/// pod owner set (`tessera.dev/sidecar-cpu`, `-memory`) up to the platform's
/// maximum; a request above a lowered limit comes down to it.
fn sidecar_resources(
    annotations: &BTreeMap<String, String>,
    injection: &Injection,
) -> Result<ResourceRequirements, Denial> {
    let mut resources = injection.resources.clone();
    for (annotation, resource) in [(SIDECAR_CPU, "cpu"), (SIDECAR_MEMORY, "memory")] {
        let Some(text) = annotations.get(annotation) else {
            continue;
        };
        let value = quantity_value(text).filter(|v| *v > 0.0).ok_or_else(|| {
            Denial(format!(
                "annotation {annotation}: `{}` is not a positive quantity like 200m or 64Mi",
                text.escape_debug()
            ))
        })?;
        if let Some(max) = injection.max_resources.get(resource)
            && quantity_value(&max.0).is_some_and(|max| value > max)
        {
            return Err(Denial(format!(
                "annotation {annotation}: {text} is above the {} the platform allows (chart value webhook.sidecarResourcesMax.{resource})",
                max.0
            )));
        }
        let quantity = Quantity(text.clone());
        resources
            .limits
            .get_or_insert_with(Default::default)
            .insert(resource.to_owned(), quantity.clone());
        if let Some(requests) = resources.requests.as_mut()
            && requests
                .get(resource)
                .and_then(|r| quantity_value(&r.0))
                .is_some_and(|request| request > value)
        {
            requests.insert(resource.to_owned(), quantity);
        }
    }
    Ok(resources)
}

/// The containers `tessera.dev/mount-containers` names; `None`: all.
fn mount_containers(
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
) -> Result<Option<Vec<String>>, Denial> {
    let Some(list) = annotations.get(MOUNT_CONTAINERS) else {
        return Ok(None);
    };
    let names: Vec<String> = list.split(',').map(|n| n.trim().to_owned()).collect();
    if let Some(unknown) = names
        .iter()
        .find(|name| !app_containers(spec).any(|c| &c.name == *name))
    {
        return Err(Denial(format!(
            "annotation {MOUNT_CONTAINERS}: the pod has no container `{}`",
            unknown.escape_debug()
        )));
    }
    Ok(Some(names))
}

/// `mode: env`: wraps the app's commands; no credentials volume, no sidecar.
fn inject_env(
    pod: &Pod,
    injection: &Injection,
    ca_pem: &str,
    bindings: &[String],
    request: &env_mode::EnvRequest,
    api_client: bool,
) -> Result<Decision, Denial> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Denial("the pod has no spec".to_owned()))?;
    for name in [env_mode::BIN_VOLUME, env_mode::STATE_VOLUME, TOKEN_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(Denial(format!(
                "the pod already has a volume named `{name}`; rename it"
            )));
        }
    }
    let mut pod = pod.clone();
    let wrapped = env_mode::EnvSpec {
        injection,
        bindings,
        ca_pem,
    }
    .add(&mut pod, request)?;
    let [_, token] = volumes(injection);
    pod.spec
        .get_or_insert_with(PodSpec::default)
        .volumes
        .get_or_insert_with(Vec::new)
        .push(token);
    if api_client {
        api_client::add(&mut pod, injection, ca_pem)?;
    }
    // What env mode has no use for is said, not silently dropped.
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let warnings = [MOUNT_PATH, MOUNT_CONTAINERS, SIDECAR_CPU, SIDECAR_MEMORY]
        .into_iter()
        .filter(|key| annotations.contains_key(*key))
        .map(|key| format!("annotation {key} is ignored with {MODE}: env (there is no credentials volume and no sidecar)"))
        .collect();
    let injected = Injected {
        shape: Some(Shape::Exec),
        bindings: bindings.to_vec(),
        mount_path: String::new(),
        readers: format!("the environment of {}", wrapped.join(", ")),
        api_client,
        warnings,
    };
    record(&mut pod, &injected);
    Ok(Decision::Inject(Box::new(pod), injected))
}

/// The pod's token for the broker, read-only, where Tessera's processes look.
pub(super) fn token_mount() -> VolumeMount {
    VolumeMount {
        name: TOKEN_VOLUME.to_owned(),
        mount_path: TOKEN_DIR.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// An environment variable with a value.
pub(super) fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// What every Tessera process in the pod needs to call the broker for
/// `bindings`: its address, CA and TLS name, the token file, the bindings.
pub(super) fn broker_env(injection: &Injection, ca_pem: &str, bindings: &[String]) -> Vec<EnvVar> {
    let mut vars = vec![
        env_var("TESSERA_BROKER", &injection.broker_address),
        env_var("TESSERA_CA_PEM", ca_pem),
        env_var("TESSERA_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        env_var("TESSERA_BINDINGS", &bindings.join(",")),
        env_var("TESSERA_LOG_FORMAT", "json"),
    ];
    if let Some(server_name) = &injection.server_name {
        vars.push(env_var("TESSERA_SERVER_NAME", server_name));
    }
    vars
}

/// The security context of every container Tessera adds.
pub(super) fn hardened(run_as_user: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(run_as_user),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// Marks the pod injected, with the record of what was added.
fn record(pod: &mut Pod, injected: &Injected) {
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(STATUS.to_owned(), "injected".to_owned());
    annotations.insert(
        INJECTED.to_owned(),
        serde_json::to_string(injected).unwrap_or_default(),
    );
}

fn volumes(injection: &Injection) -> [Volume; 2] {
    [
        Volume {
            name: CREDENTIALS_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: Some(injection.volume_size_limit.clone()),
            }),
            ..Volume::default()
        },
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![token_projection(injection)]),
                // Readable by the sidecar's user whatever it is.
                default_mode: Some(0o444),
            }),
            ..Volume::default()
        },
    ]
}

/// The pod's service-account token for the broker's audience, as `token`.
pub(super) fn token_projection(injection: &Injection) -> VolumeProjection {
    VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            audience: Some(injection.audience.clone()),
            expiration_seconds: Some(
                i64::try_from(injection.token_expiration.as_secs()).unwrap_or(600),
            ),
            path: "token".to_owned(),
        }),
        ..VolumeProjection::default()
    }
}

/// Everything one Tessera container is built from.
struct SidecarSpec<'a> {
    injection: &'a Injection,
    request: &'a Request,
    readers: &'a Readers,
    ca_pem: &'a str,
    /// The metrics port for this pod ([`metrics_port`]).
    metrics_port: Option<u16>,
    /// The app's user, when the sidecar signals it and so runs as it.
    run_as: Option<i64>,
    /// The pod owner's renames and templates (`TESSERA_POD_OUTPUT`).
    pod_output: Option<&'a str>,
    /// The pod's shorter TTLs (`TESSERA_MAX_TTL`).
    max_ttl: Option<&'a str>,
    /// Requests and limits, the pod owner's within the platform's bounds.
    resources: ResourceRequirements,
}

impl SidecarSpec<'_> {
    fn container(&self, name: &str, command: &str, native: bool) -> Container {
        let injection = self.injection;
        let mut vars = broker_env(injection, self.ca_pem, &self.request.bindings);
        vars.insert(3, env_var("TESSERA_OUT", &self.request.mount_path));
        if let Some(max_ttl) = self.max_ttl {
            vars.push(env_var("TESSERA_MAX_TTL", max_ttl));
        }
        if let Some(output) = self.pod_output {
            vars.push(env_var("TESSERA_POD_OUTPUT", output));
        }
        let metrics_port = self.metrics_port.filter(|_| command == "run");
        if let Some(port) = metrics_port {
            vars.push(env_var(
                "TESSERA_METRICS_LISTEN",
                &format!("0.0.0.0:{port}"),
            ));
        }
        let run_as_user = match *self.readers {
            Readers::Group(gid) => {
                vars.push(env_var("TESSERA_GROUP", &gid.to_string()));
                self.run_as.unwrap_or(injection.run_as_user)
            }
            Readers::User(uid) => uid,
        };
        if command == "run" {
            if let Some((signal, process)) = &self.request.reload.signal {
                vars.push(env_var("TESSERA_NOTIFY_SIGNAL", signal));
                vars.push(env_var("TESSERA_NOTIFY_PROCESS", process));
            }
            if let Some(url) = &self.request.reload.url {
                vars.push(env_var("TESSERA_NOTIFY_URL", url));
            }
        }
        Container {
            name: name.to_owned(),
            image: Some(injection.image.clone()),
            image_pull_policy: Some(injection.image_pull_policy.clone()),
            args: Some(vec![command.to_owned()]),
            env: Some(vars),
            ports: metrics_port.map(|port| {
                vec![ContainerPort {
                    name: Some("tessera-metrics".to_owned()),
                    container_port: i32::from(port),
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                }]
            }),
            resources: Some(self.resources.clone()),
            restart_policy: native.then(|| "Always".to_owned()),
            // The app containers start only once every binding is written.
            startup_probe: native.then(|| Probe {
                exec: Some(ExecAction {
                    command: Some(vec![SIDECAR_BINARY.to_owned(), "check".to_owned()]),
                }),
                period_seconds: Some(1),
                timeout_seconds: Some(5),
                failure_threshold: Some(300),
                ..Probe::default()
            }),
            security_context: Some(hardened(run_as_user)),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: CREDENTIALS_VOLUME.to_owned(),
                    mount_path: self.request.mount_path.clone(),
                    ..VolumeMount::default()
                },
                token_mount(),
            ]),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        }
    }
}
