//! Admission checks of a pod against its own spec: who reads the files,
//! whether it reaches the broker, its OS, ports and mounts, and names it
//! must not already use.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};

use super::{annotations::*, api_client, denial::Denial, names::*, objects::Readers};
use crate::config::webhook::Injection;
use crate::policy::ImageUser;

/// How the files become readable by the app.
pub(super) struct ReadersChoice {
    pub(super) readers: Readers,
    /// `fsGroup` Tessera sets on a pod that names no single non-root user,
    /// and the admission warning that says so.
    pub(super) set_fs_group: Option<(i64, String)>,
}

pub(super) fn readers(
    spec: &PodSpec,
    image_user: ImageUser,
    group: i64,
) -> Result<ReadersChoice, Denial> {
    let pod = spec.security_context.as_ref();
    if let Some(group) = pod.and_then(|s| s.fs_group) {
        return Ok(ReadersChoice {
            readers: Readers::Group(group),
            set_fs_group: None,
        });
    }
    let pod_user = pod.and_then(|s| s.run_as_user);
    let users: Vec<(&str, Option<i64>)> = app_containers(spec)
        .map(|c| (c.name.as_str(), run_as_user(c, pod_user)))
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

pub(super) fn app_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

/// The one user the pod's containers run as, which the sidecar must run as
/// to signal the app: a container that drops every capability may signal
/// only its own user's processes.
pub(super) fn app_user(spec: &PodSpec) -> Result<i64, Denial> {
    let pod_user = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let users: BTreeSet<Option<i64>> = spec
        .containers
        .iter()
        .map(|c| run_as_user(c, pod_user))
        .collect();
    match users.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(user)] if *user > 0 => Ok(*user),
        _ => {
            let each: Vec<String> = spec
                .containers
                .iter()
                .map(|c| {
                    format!(
                        "`{}` as {}",
                        c.name,
                        run_as_user(c, pod_user)
                            .map_or_else(|| "its image's user".to_owned(), |u| u.to_string())
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
pub(super) fn already_injected(
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
) -> Result<bool, Denial> {
    let marked = annotations.get(STATUS).map(String::as_str) == Some("injected")
        && annotations.contains_key(INJECTED);
    let ours: Vec<&str> = app_containers(spec)
        .map(|c| c.name.as_str())
        .filter(|name| RESERVED.contains(name))
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
pub(super) fn reaches_broker(spec: &PodSpec, injection: &Injection) -> Result<(), Denial> {
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
pub(super) fn refuse_windows(spec: &PodSpec) -> Result<(), Denial> {
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
pub(super) fn metrics_port(
    spec: &PodSpec,
    injection: &Injection,
    warnings: &mut Vec<String>,
) -> Option<u16> {
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

/// The containers `tessera.dev/mount-containers` names; `None`: all.
pub(super) fn mount_containers(
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

/// The user a container runs as when the spec names one: its own
/// `runAsUser`, else the pod's; `None` when its image decides.
fn run_as_user(container: &Container, pod_user: Option<i64>) -> Option<i64> {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or(pod_user)
}
