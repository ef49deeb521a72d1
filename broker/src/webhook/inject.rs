//! What the webhook does to one pod: read its annotations, check the
//! requested bindings against the policy, and add the volume, the projected
//! token and the sidecar. Pure, so every case is unit-tested without a server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, VolumeMount};
use serde::Serialize;

use super::{
    annotations::*, api_client, denial::Denial, env_mode, grants::*, names::*, objects::*,
    pod_checks::*, pod_output, resources::*,
};
use crate::config::webhook::{Injection, SidecarMode};
use crate::policy::Policy;

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
    /// The bindings the sidecar writes, in order.
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

/// `mode: env`: wraps the app's commands; no credentials volume, no sidecar.
fn inject_env(
    pod: &Pod,
    injection: &Injection,
    ca_pem: &str,
    bindings: &[String],
    request: &EnvRequest,
    api_client: bool,
) -> Result<Decision, Denial> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Denial("the pod has no spec".to_owned()))?;
    for name in [BIN_VOLUME, STATE_VOLUME, TOKEN_VOLUME] {
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

/// Marks the pod injected, with the record of what was added.
pub(super) fn record(pod: &mut Pod, injected: &Injected) {
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(STATUS.to_owned(), "injected".to_owned());
    annotations.insert(
        INJECTED.to_owned(),
        serde_json::to_string(injected).unwrap_or_default(),
    );
}
