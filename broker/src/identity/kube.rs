//! Identity through the Kubernetes API: TokenReview (the API server checks the
//! token, and refuses tokens of deleted pods within about a minute) and pod
//! lookup (labels for policy subjects, and deleted pods refused at once).

use std::collections::BTreeMap;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, PostParams};

use super::{Identity, ObjectRef, TokenError};
use crate::secret::Secret;

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

fn unavailable(what: &str, error: &kube::Error) -> TokenError {
    TokenError::Unavailable(format!("{what}: {error}"))
}

/// Asks the API server whether `token` is valid for one of `audiences`.
///
/// # Errors
/// [`TokenError::Rejected`] when the API server says no;
/// [`TokenError::Unavailable`] when it cannot be asked.
pub async fn review(
    client: &kube::Client,
    token: &Secret,
    audiences: &[String],
) -> Result<(Identity, Option<u64>), TokenError> {
    let token_text = token
        .expose_str()
        .ok_or(TokenError::Malformed("not UTF-8"))?;
    let parsed = super::jwt::parse(token_text)?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token_text.to_owned()),
            audiences: Some(audiences.to_vec()),
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| unavailable("TokenReview", &e))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(TokenError::Rejected(reason.chars().take(256).collect()));
    }
    let granted = status.audiences.unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(TokenError::WrongAudience(audiences.join(", ")));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| TokenError::Rejected(format!("`{username}` is not a service account")))?;
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let pair = |name: &str, uid: &str| {
        first(name).map(|name| ObjectRef {
            name,
            uid: first(uid).unwrap_or_default(),
        })
    };
    let identity = Identity {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        service_account_uid: user.uid.unwrap_or_default(),
        pod: pair(EXTRA_POD_NAME, EXTRA_POD_UID),
        node: pair(EXTRA_NODE_NAME, EXTRA_NODE_UID),
        pod_labels: None,
        expires_at: 0,
    };
    Ok((identity, super::jwt::expiry_unverified(&parsed)))
}

/// Where the identity's pod is in its life: gone (or replaced by another
/// pod of the same name), completed (`Succeeded`/`Failed`), or running.
///
/// # Errors
/// [`TokenError::Unavailable`] when the API server cannot be asked.
pub async fn pod_life(
    client: &kube::Client,
    identity: &Identity,
) -> Result<super::PodLife, TokenError> {
    let Some(pod_ref) = &identity.pod else {
        return Ok(super::PodLife::Running);
    };
    let pod = Api::<Pod>::namespaced(client.clone(), &identity.namespace)
        .get_opt(&pod_ref.name)
        .await
        .map_err(|e| unavailable("pod lookup", &e))?;
    Ok(match pod {
        Some(pod) if pod.metadata.uid.as_deref() == Some(pod_ref.uid.as_str()) => {
            let phase = pod.status.and_then(|s| s.phase);
            if is_completed(phase.as_deref()) {
                super::PodLife::Completed
            } else {
                super::PodLife::Running
            }
        }
        _ => super::PodLife::Gone,
    })
}

/// Whether a pod phase is final: its containers will not run again.
pub fn is_completed(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Looks the identity's pod up: refuses a pod that is gone or was replaced
/// (different UID), and returns its labels.
///
/// # Errors
/// [`TokenError::PodGone`], or [`TokenError::Unavailable`] when the API
/// server cannot be asked.
pub async fn pod_labels(
    client: &kube::Client,
    identity: &Identity,
) -> Result<Option<BTreeMap<String, String>>, TokenError> {
    let Some(pod_ref) = &identity.pod else {
        return Ok(None);
    };
    let pod = Api::<Pod>::namespaced(client.clone(), &identity.namespace)
        .get_opt(&pod_ref.name)
        .await
        .map_err(|e| unavailable("pod lookup", &e))?
        .ok_or_else(|| TokenError::PodGone(pod_ref.name.clone()))?;
    if pod.metadata.uid.as_deref() != Some(pod_ref.uid.as_str()) {
        return Err(TokenError::PodGone(pod_ref.name.clone()));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        tracing::debug!(pod = %pod_ref.name, "pod is terminating; still served until it is gone");
    }
    Ok(Some(pod.metadata.labels.unwrap_or_default()))
}
