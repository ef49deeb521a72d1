//! The sidecar's resource requests and limits, fitted to the pod: its own
//! annotations, the pod's QoS class and pod-level resources.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{annotations::*, denial::Denial};
use crate::config::webhook::{Injection, quantity_value};

/// The sidecar's resources fitted to the pod: in a Guaranteed pod (every
/// container's requests equal its limits) the sidecar's requests are raised
/// to its limits so the pod keeps its QoS class; within pod-level
/// `spec.resources` (on by default since Kubernetes 1.34) the containers'
/// requests plus the sidecar's must fit, or the API server would refuse the
/// pod with a 422 its owner cannot place; that is refused here, with the
/// numbers.
pub(super) fn fit_pod(
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
pub(super) fn sidecar_resources(
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
