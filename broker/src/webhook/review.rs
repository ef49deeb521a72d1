//! One admission review answered: the decision for the pod, turned into an
//! AdmissionResponse (a JSON patch, warnings, or a refusal), with metrics.

use std::{collections::HashMap, sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::{
    annotations, api_client,
    denial::Denial,
    inject::{self, Decision},
    patch,
};
use crate::config::webhook::{Injection, SidecarMode};
use crate::{
    metrics::Metrics,
    policy::{Kv2Source, store::PolicyStore},
};

/// The AdmissionReview version the webhook speaks (the chart registers only it).
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// The keys of a KV secret as the broker last read it (its feeds), for
/// checking a pod's renames of a binding that delivers the whole secret.
pub type KvKeysLookup = Box<dyn Fn(&Kv2Source) -> Option<Vec<String>> + Send + Sync>;

/// What the webhook needs to answer.
pub struct Webhook {
    pub(super) injection: Injection,
    mode: SidecarMode,
    policy: Arc<PolicyStore>,
    pub(super) metrics: Arc<Metrics>,
    kv_keys: KvKeysLookup,
}

impl Webhook {
    /// A webhook injecting `injection`, with `mode` already resolved (not
    /// `Auto`), checking renames of whole KV secrets against `kv_keys`.
    pub fn new(
        injection: Injection,
        mode: SidecarMode,
        policy: Arc<PolicyStore>,
        metrics: Arc<Metrics>,
        kv_keys: KvKeysLookup,
    ) -> Self {
        Self {
            injection,
            mode,
            policy,
            metrics,
            kv_keys,
        }
    }

    /// Answers one admission request. Never fails: errors become a refusal
    /// (the chart's `failurePolicy: Fail` would refuse the pod anyway) with a
    /// message naming the problem.
    pub fn review(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let started = Instant::now();
        let (decision, response) = self.answer(request);
        self.metrics
            .admission(decision, started.elapsed().as_secs_f64());
        response
    }

    fn answer(&self, request: &AdmissionRequest<Pod>) -> (&'static str, AdmissionResponse) {
        let response = AdmissionResponse::from(request);
        let (Operation::Create, Some(pod)) = (&request.operation, &request.object) else {
            return ("skipped", response);
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let annotation = |key: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .is_some_and(|v| v == "true")
        };
        let wants_injection = annotation(annotations::INJECT) || annotation(api_client::API_CLIENT);
        // Read only for pods that want injection: a lost CA file must not
        // refuse every other pod.
        let ca_pem = match wants_injection
            .then(|| std::fs::read_to_string(&self.injection.ca_file))
            .transpose()
        {
            Ok(pem) => pem.unwrap_or_default(),
            Err(error) => {
                tracing::error!(%error, path = %self.injection.ca_file.display(), "cannot read the broker CA for injection");
                return (
                    "error",
                    deny(
                        response,
                        500,
                        &format!(
                            "tessera: the webhook cannot read the broker CA {}: {error}",
                            self.injection.ca_file.display()
                        ),
                    ),
                );
            }
        };
        let policy = self.policy.current();
        // For logs only, escaped: whoever posts the review wrote these.
        let pod_name = pod
            .metadata
            .name
            .as_deref()
            .or(pod.metadata.generate_name.as_deref())
            .unwrap_or_default()
            .escape_debug()
            .to_string();
        let logged_namespace = namespace.escape_debug().to_string();
        match inject::decide(
            pod,
            &namespace,
            &self.injection,
            self.mode,
            &ca_pem,
            &policy.policy,
            &self.kv_keys,
        ) {
            Ok(Decision::Skip(reason)) => {
                tracing::debug!(namespace = %logged_namespace, pod = %pod_name, reason, "not injecting");
                ("skipped", response)
            }
            Ok(Decision::Inject(mutated, injected)) => {
                let patch = match (serde_json::to_value(pod), serde_json::to_value(&*mutated)) {
                    (Ok(before), Ok(after)) => patch::between(&before, &after),
                    (Err(error), _) | (_, Err(error)) => {
                        return (
                            "error",
                            deny(
                                response,
                                500,
                                &format!("tessera: cannot encode the pod: {error}"),
                            ),
                        );
                    }
                };
                let size = serde_json::to_vec(&patch).map_or(usize::MAX, |p| p.len());
                if size > annotations::MAX_PATCH_BYTES {
                    let message = format!(
                        "the injection patch would be {size} bytes, over the webhook's bound of {} (the pod's Tessera annotations ask for too much output)",
                        annotations::MAX_PATCH_BYTES
                    );
                    tracing::info!(namespace = %logged_namespace, pod = %pod_name, reason = %message, "pod refused");
                    return (
                        "denied",
                        deny(response, 403, &format!("tessera: {message}")),
                    );
                }
                tracing::info!(
                    namespace = %logged_namespace,
                    pod = %pod_name,
                    bindings = %injected.bindings.join(","),
                    shape = ?injected.shape,
                    "injecting"
                );
                match response.with_patch(patch) {
                    Ok(mut response) => {
                        response.audit_annotations =
                            HashMap::from([("injected".to_owned(), injected.bindings.join(","))]);
                        // Shown by kubectl to whoever created the pod.
                        if !injected.warnings.is_empty() {
                            response.warnings = Some(
                                injected
                                    .warnings
                                    .iter()
                                    .map(|w| format!("tessera: {w}"))
                                    .collect(),
                            );
                        }
                        ("injected", response)
                    }
                    Err(error) => (
                        "error",
                        AdmissionResponse::from(request)
                            .deny(format!("tessera: cannot encode the patch: {error}")),
                    ),
                }
            }
            Err(Denial(message)) => {
                // Annotations are the pod creator's text: escaped, so no line can be forged.
                tracing::info!(namespace = %logged_namespace, pod = %pod_name, reason = %message.escape_debug(), "pod refused");
                let mut response = deny(response, 403, &format!("tessera: {message}"));
                response.audit_annotations =
                    HashMap::from([("denied".to_owned(), message.clone())]);
                ("denied", response)
            }
        }
    }
}

pub(super) fn deny(response: AdmissionResponse, code: u16, message: &str) -> AdmissionResponse {
    let mut response = response.deny(message);
    response.result.code = code;
    response.result.reason = if code == 403 {
        "Forbidden"
    } else {
        "InternalError"
    }
    .to_owned();
    response
}

/// The AdmissionReview answer as JSON, with the patch base64-encoded as the
/// API documents (kube-core serializes its bytes as a number array: kube-rs#1781).
pub fn review_json(response: AdmissionResponse) -> serde_json::Value {
    use base64::Engine;
    let patch = response
        .patch
        .as_deref()
        .map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
    if let (Some(patch), Some(slot)) = (patch, review.pointer_mut("/response/patch")) {
        *slot = serde_json::Value::String(patch);
    }
    review
}

/// Resolves [`SidecarMode::Auto`] by asking the API server its version:
/// native sidecars are on by default from Kubernetes 1.29.
pub async fn resolve_mode(mode: SidecarMode, client: Option<&kube::Client>) -> SidecarMode {
    if mode != SidecarMode::Auto {
        return mode;
    }
    let Some(client) = client else {
        tracing::warn!("webhook.sidecar.mode auto: no Kubernetes client; using classic sidecars");
        return SidecarMode::Classic;
    };
    match client.apiserver_version().await {
        Ok(info) => {
            let number = |s: &str| {
                s.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u32>()
                    .ok()
            };
            let native = matches!(
                (number(&info.major), number(&info.minor)),
                (Some(major), Some(minor)) if (major, minor) >= (1, 29)
            );
            let mode = if native {
                SidecarMode::Native
            } else {
                SidecarMode::Classic
            };
            tracing::info!(version = %info.git_version, ?mode, "webhook.sidecar.mode auto resolved");
            mode
        }
        Err(error) => {
            tracing::warn!(%error, "webhook.sidecar.mode auto: cannot read the API server version; using classic sidecars");
            SidecarMode::Classic
        }
    }
}
