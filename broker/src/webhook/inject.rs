//! What the webhook does to one pod: read its annotations, check the
//! requested bindings against the policy, and add the volume, the projected
//! token and the sidecar. Pure, so every case is unit-tested without a server.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, Pod, PodSpec,
    Probe, ProjectedVolumeSource, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use serde::Serialize;

use super::{
    api_client,
    settings::{Injection, SidecarMode},
};
use crate::{identity::Identity, policy::Policy};

/// `"true"` asks for injection.
pub const INJECT: &str = "tessera.dev/inject";
/// Comma-separated binding names.
pub const BINDINGS: &str = "tessera.dev/bindings";
/// Where app containers see the files (absolute path).
pub const MOUNT_PATH: &str = "tessera.dev/mount-path";
/// `run` (write and follow rotations, the default) or `once` (write before
/// the app starts, no sidecar).
pub const MODE: &str = "tessera.dev/mode";
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

/// The parsed Tessera annotations of a pod that asks for injection.
struct Request {
    bindings: Vec<String>,
    mount_path: String,
    once: bool,
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
    let mut bindings = Vec::new();
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
        if bindings.iter().any(|b| b == name) {
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
    let once = match annotations.get(MODE).map(String::as_str) {
        None | Some("run") => false,
        Some("once") => true,
        Some(other) => {
            return Err(Denial(format!(
                "annotation {MODE}: `{other}` must be \"run\" or \"once\""
            )));
        }
    };
    Ok(Some(Request {
        bindings,
        mount_path,
        once,
    }))
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
        .filter(|name| {
            let granted = policy.binding(name).is_some_and(|b| b.grants(&identity));
            if !granted {
                tracing::info!(
                    binding = %name.escape_debug(),
                    namespace = %identity.namespace,
                    service_account = %identity.service_account,
                    exists = policy.binding(name).is_some(),
                    "admission: binding not granted"
                );
            }
            !granted
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
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

fn readers(spec: &PodSpec) -> Result<Readers, Denial> {
    let pod = spec.security_context.as_ref();
    if let Some(group) = pod.and_then(|s| s.fs_group) {
        return Ok(Readers::Group(group));
    }
    let pod_user = pod.and_then(|s| s.run_as_user);
    let users: BTreeSet<Option<i64>> = app_containers(spec)
        .map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or(pod_user)
        })
        .collect();
    match users.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(user)] if *user > 0 => Ok(Readers::User(*user)),
        [Some(_)] => Err(Denial(
            "the app runs as root; set spec.securityContext.fsGroup so the files can be group-readable"
                .to_owned(),
        )),
        _ => Err(Denial(
            "cannot tell which user reads the credentials: set spec.securityContext.fsGroup (files become readable by that group) or one runAsUser for every container"
                .to_owned(),
        )),
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
) -> Result<Decision, Denial> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let api_client = api_client::requested(annotations)?;
    let request = parse_annotations(annotations, injection)?;
    if request.is_none() && !api_client {
        return Ok(Decision::Skip("not annotated"));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Denial("the pod has no spec".to_owned()));
    };
    if annotations.get(STATUS).map(String::as_str) == Some("injected")
        || app_containers(spec).any(|c| c.name == SIDECAR || c.name == INIT)
    {
        return Ok(Decision::Skip("already injected"));
    }
    let Some(request) = request else {
        let mut pod = pod.clone();
        api_client::add(&mut pod, injection, ca_pem)?;
        let injected = Injected {
            shape: None,
            bindings: Vec::new(),
            mount_path: String::new(),
            readers: String::new(),
            api_client,
        };
        record(&mut pod, &injected);
        return Ok(Decision::Inject(Box::new(pod), injected));
    };
    let labels = injection
        .pod_labels_known
        .then(|| pod.metadata.labels.clone().unwrap_or_default());
    check_policy(policy, namespace, spec, labels.as_ref(), &request.bindings)?;
    let readers = readers(spec)?;
    for name in [CREDENTIALS_VOLUME, TOKEN_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(Denial(format!(
                "the pod already has a volume named `{name}`; rename it"
            )));
        }
    }
    for container in app_containers(spec) {
        if container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == request.mount_path)
        {
            return Err(Denial(format!(
                "container `{}` already mounts something at {}; choose another path with {MOUNT_PATH}",
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
        readers: match readers {
            Readers::Group(gid) => format!("group {gid}"),
            Readers::User(uid) => format!("user {uid}"),
        },
        api_client,
    };
    let sidecar = SidecarSpec {
        injection,
        request: &request,
        readers: &readers,
        ca_pem,
    };

    let mut pod = pod.clone();
    let app_mount = VolumeMount {
        name: CREDENTIALS_VOLUME.to_owned(),
        mount_path: request.mount_path.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
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
        Shape::InitOnly => init.insert(0, sidecar.container(INIT, "once", false)),
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
}

impl SidecarSpec<'_> {
    fn container(&self, name: &str, command: &str, native: bool) -> Container {
        let injection = self.injection;
        let env = |name: &str, value: &str| EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            ..EnvVar::default()
        };
        let mut vars = vec![
            env("TESSERA_BROKER", &injection.broker_address),
            env("TESSERA_CA_PEM", self.ca_pem),
            env("TESSERA_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
            env("TESSERA_OUT", &self.request.mount_path),
            env("TESSERA_BINDINGS", &self.request.bindings.join(",")),
            env("TESSERA_LOG_FORMAT", "json"),
        ];
        if let Some(server_name) = &injection.server_name {
            vars.push(env("TESSERA_SERVER_NAME", server_name));
        }
        let metrics_port = injection.metrics_port.filter(|_| command == "run");
        if let Some(port) = metrics_port {
            vars.push(env("TESSERA_METRICS_LISTEN", &format!("0.0.0.0:{port}")));
        }
        let run_as_user = match *self.readers {
            Readers::Group(gid) => {
                vars.push(env("TESSERA_GROUP", &gid.to_string()));
                injection.run_as_user
            }
            Readers::User(uid) => uid,
        };
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
            resources: Some(injection.resources.clone()),
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
            security_context: Some(SecurityContext {
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
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: CREDENTIALS_VOLUME.to_owned(),
                    mount_path: self.request.mount_path.clone(),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: TOKEN_VOLUME.to_owned(),
                    mount_path: TOKEN_DIR.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        }
    }
}
