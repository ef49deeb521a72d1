//! `tessera.dev/api-client: "true"`: the pod's containers get what they need
//! to call the broker themselves (the `tessera-client` crate, or any gRPC
//! client): the pod's projected token for the broker's audience, the broker's
//! CA as a file, and `TESSERA_BROKER`, `TESSERA_CA_FILE` and
//! `TESSERA_TOKEN_FILE`, with or without a sidecar. The CA travels in a pod
//! annotation projected as a file, so no ConfigMap has to exist in every
//! namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    DownwardAPIProjection, DownwardAPIVolumeFile, EnvVar, ObjectFieldSelector, Pod,
    ProjectedVolumeSource, Volume, VolumeMount, VolumeProjection,
};

use super::denial::Denial;
use crate::config::webhook::Injection;

/// `"true"` gives the app containers the token, CA and address.
pub const API_CLIENT: &str = "tessera.dev/api-client";
/// The broker's CA (PEM), projected into the containers as `ca.crt`.
pub const CA_ANNOTATION: &str = "tessera.dev/broker-ca";
/// The projected volume with the token and the CA.
pub const VOLUME: &str = "tessera-api";
/// Where the app containers see it.
pub const DIR: &str = "/var/run/secrets/tessera.dev/api";

/// Whether the pod asks for it.
///
/// # Errors
/// A [`Denial`] for a value other than `"true"` or `"false"`.
pub fn requested(annotations: &BTreeMap<String, String>) -> Result<bool, Denial> {
    match annotations.get(API_CLIENT).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Denial(format!(
            "{API_CLIENT} must be \"true\" or \"false\", not {other:?}"
        ))),
    }
}

/// Adds the volume, the mounts and the variables to every container the pod
/// brought (init containers included). Variables a container already sets
/// are left as they are.
///
/// # Errors
/// A [`Denial`] when the pod already has a volume named [`VOLUME`].
pub fn add(pod: &mut Pod, injection: &Injection, ca_pem: &str) -> Result<(), Denial> {
    let spec = pod.spec.get_or_insert_with(Default::default);
    if spec.volumes.iter().flatten().any(|v| v.name == VOLUME) {
        return Err(Denial(format!(
            "the pod already has a volume named `{VOLUME}`; rename it"
        )));
    }
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut vars = vec![
        env("TESSERA_BROKER", injection.broker_address.clone()),
        env("TESSERA_CA_FILE", format!("{DIR}/ca.crt")),
        env("TESSERA_TOKEN_FILE", format!("{DIR}/token")),
    ];
    if let Some(server_name) = &injection.server_name {
        vars.push(env("TESSERA_SERVER_NAME", server_name.clone()));
    }
    let mount = VolumeMount {
        name: VOLUME.to_owned(),
        mount_path: DIR.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let ours = [super::names::SIDECAR, super::names::INIT];
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
        .filter(|c| !ours.contains(&c.name.as_str()))
    {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount.clone());
        let set = container.env.get_or_insert_with(Vec::new);
        // A container env mode wraps already has the CA as PEM: a second
        // CA variable would make `exec` refuse its options.
        let has_ca = set.iter().any(|v| v.name == "TESSERA_CA_PEM");
        for var in &vars {
            let another_ca = has_ca && var.name == "TESSERA_CA_FILE";
            if !another_ca && !set.iter().any(|v| v.name == var.name) {
                set.push(var.clone());
            }
        }
    }
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                super::objects::token_projection(injection),
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "ca.crt".to_owned(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: format!("metadata.annotations['{CA_ANNOTATION}']"),
                                ..ObjectFieldSelector::default()
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            // Readable by the app's user, whatever it is: a token for the
            // broker's audience only, and a public CA.
            default_mode: Some(0o444),
        }),
        ..Volume::default()
    });
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CA_ANNOTATION.to_owned(), ca_pem.to_owned());
    Ok(())
}
