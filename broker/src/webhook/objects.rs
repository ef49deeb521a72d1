//! The Kubernetes objects Tessera adds to a pod: the sidecar container, its
//! volumes and the projected token.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};

use super::{annotations::*, names::*};
use crate::config::webhook::Injection;

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

pub(super) fn volumes(injection: &Injection) -> [Volume; 2] {
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
pub(super) struct SidecarSpec<'a> {
    pub(super) injection: &'a Injection,
    pub(super) request: &'a Request,
    pub(super) readers: &'a Readers,
    pub(super) ca_pem: &'a str,
    /// The metrics port for this pod ([`metrics_port`]).
    pub(super) metrics_port: Option<u16>,
    /// The app's user, when the sidecar signals it and so runs as it.
    pub(super) run_as: Option<i64>,
    /// The pod owner's renames and templates (`TESSERA_POD_OUTPUT`).
    pub(super) pod_output: Option<&'a str>,
    /// The pod's shorter TTLs (`TESSERA_MAX_TTL`).
    pub(super) max_ttl: Option<&'a str>,
    /// Requests and limits, the pod owner's within the platform's bounds.
    pub(super) resources: ResourceRequirements,
}

impl SidecarSpec<'_> {
    pub(super) fn container(&self, name: &str, command: &str, native: bool) -> Container {
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

/// Who may read the files: the pod's `fsGroup` (files 0440), else the one
/// user every app container runs as (files 0400).
pub(super) enum Readers {
    Group(i64),
    User(i64),
}
