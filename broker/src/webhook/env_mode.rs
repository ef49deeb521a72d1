//! `tessera.dev/mode: env`: the app's containers get their credentials as
//! environment variables. An init container copies the (static) sidecar
//! binary into an in-memory volume, and each chosen container's `command`
//! is wrapped: `tessera-sidecar exec -- <command>` starts the app with
//! `<BINDING>_<FIELD>` set and restarts it when a credential rotates.

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, Pod, PodSpec, Volume, VolumeMount,
};

use super::{annotations::*, denial::Denial, names::*, objects::*};
use crate::config::webhook::Injection;

/// The containers to wrap, each with a `command` to wrap.
fn chosen(spec: &PodSpec, request: &EnvRequest) -> Result<Vec<String>, Denial> {
    let names: Vec<String> = match &request.containers {
        Some(names) => names.clone(),
        None => spec.containers.iter().map(|c| c.name.clone()).collect(),
    };
    for name in &names {
        let Some(container) = spec.containers.iter().find(|c| c.name == *name) else {
            return Err(Denial(format!(
                "annotation {ENV_CONTAINERS}: the pod has no container `{}`",
                name.escape_debug()
            )));
        };
        if container
            .command
            .as_ref()
            .and_then(|c| c.first())
            .is_none_or(|program| program.trim().is_empty())
        {
            return Err(Denial(format!(
                "container `{name}` sets no `command`: environment variables are given by wrapping the command (tessera-sidecar exec -- <command>), and the image's ENTRYPOINT cannot be read at admission; set `command` to the image's entrypoint, or read files instead (remove tessera.dev/mode: env)"
            )));
        }
    }
    Ok(names)
}

/// Everything env mode adds to the pod.
pub struct EnvSpec<'a> {
    /// The webhook's settings.
    pub injection: &'a Injection,
    /// The bindings the pod's annotations ask for.
    pub bindings: &'a [String],
    /// The CA that signed the broker's certificate, as PEM.
    pub ca_pem: &'a str,
}

impl EnvSpec<'_> {
    /// Wraps the chosen containers and adds the install container and the
    /// volumes; returns the wrapped containers' names.
    ///
    /// # Errors
    /// A [`Denial`] for a container that cannot be wrapped.
    pub fn add(&self, pod: &mut Pod, request: &EnvRequest) -> Result<Vec<String>, Denial> {
        let spec = pod.spec.get_or_insert_with(PodSpec::default);
        let names = chosen(spec, request)?;
        let mut vars = broker_env(self.injection, self.ca_pem, self.bindings);
        if let Some(prefix) = &request.prefix {
            vars.push(env_var("TESSERA_ENV_PREFIX", prefix));
        }
        if let Some(on_rotate) = &request.on_rotate {
            vars.push(env_var("TESSERA_ON_ROTATE", on_rotate));
        }
        let mounts = [
            VolumeMount {
                name: BIN_VOLUME.to_owned(),
                mount_path: BIN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            token_mount(),
            VolumeMount {
                name: STATE_VOLUME.to_owned(),
                mount_path: STATE_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ];
        for container in spec
            .containers
            .iter_mut()
            .filter(|c| names.contains(&c.name))
        {
            // A restarted container resumes its leases from here.
            let state = env_var(
                "TESSERA_STATE_DIR",
                &format!("{STATE_DIR}/{}", container.name),
            );
            let original = container.command.take().unwrap_or_default();
            let mut command = vec![
                format!("{BIN_DIR}/{SIDECAR}"),
                "exec".to_owned(),
                "--".to_owned(),
            ];
            command.extend(original);
            container.command = Some(command);
            let set = container.env.get_or_insert_with(Vec::new);
            for var in vars.iter().chain([&state]) {
                if !set.iter().any(|v| v.name == var.name) {
                    set.push(var.clone());
                }
            }
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .extend(mounts.iter().cloned());
        }
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, self.install_container());
        let memory = |name: &str, size: &str| Volume {
            name: name.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    size.to_owned(),
                )),
            }),
            ..Volume::default()
        };
        spec.volumes
            .get_or_insert_with(Vec::new)
            .extend([memory(BIN_VOLUME, "64Mi"), memory(STATE_VOLUME, "1Mi")]);
        Ok(names)
    }

    /// Copies the binary into the volume and exits.
    fn install_container(&self) -> Container {
        let injection = self.injection;
        Container {
            name: INSTALL.to_owned(),
            image: Some(injection.image.clone()),
            image_pull_policy: Some(injection.image_pull_policy.clone()),
            args: Some(vec!["install".to_owned(), BIN_DIR.to_owned()]),
            resources: Some(injection.resources.clone()),
            security_context: Some(hardened(injection.run_as_user)),
            volume_mounts: Some(vec![VolumeMount {
                name: BIN_VOLUME.to_owned(),
                mount_path: BIN_DIR.to_owned(),
                ..VolumeMount::default()
            }]),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Container::default()
        }
    }
}
