//! Admission checks against the policy: the bindings a pod asks for are
//! granted to its service account, and the TTLs it asks for are within the
//! binding's bounds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;

use super::{annotations::*, denial::Denial};
use crate::{identity::Identity, policy::Policy};

/// Refuses bindings the pod's service account may not have, naming each.
pub(super) fn check_policy(
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

/// The pod's shorter TTLs as the sidecar's `--max-ttl` (`db=600s,...`).
///
/// # Errors
/// A [`Denial`] naming the annotation: an unlisted binding, a KV binding,
/// not a duration, longer than the policy's ttl (it may only shorten) or
/// below its floor (`limits.minTtl`).
pub(super) fn max_ttl(
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
