//! The AdmissionReview round trip: patches, refusals naming the binding,
//! updates passing, an unreadable CA, messages that do not leak the policy.

use super::*;

#[test]
fn admission_review_round_trip_patches_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let webhook = webhook(&dir);
    let original = deployment_pod();
    let out = review_json(webhook.review(&review("CREATE", &original)));
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = &out["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    let (expected, _) = injected(&original, SidecarMode::Native);
    assert_eq!(pod(&patched), expected);
    assert!(
        webhook
            .metrics
            .encode()
            .contains(r#"tessera_admission_reviews_total{decision="injected"} 1"#)
    );
}

#[test]
fn admission_review_refusal_names_the_binding() {
    let dir = tempfile::tempdir().unwrap();
    let webhook = webhook(&dir);
    let value = with_annotation(deployment_pod(), annotations::BINDINGS, "payments");
    let out = review_json(webhook.review(&review("CREATE", &value)));
    let response = &out["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("tessera: binding `payments` not granted"),
        "{message}"
    );
    assert!(response.get("patch").is_none());
    // The refusal docs/install.md quotes is the one a pod creator gets.
    let install = include_str!("../../../../docs/install.md");
    assert!(install.contains(&format!("``{message}``")), "{message}");
}

#[test]
fn updates_and_unannotated_pods_pass_without_a_patch() {
    let dir = tempfile::tempdir().unwrap();
    let webhook = webhook(&dir);
    let update = webhook.review(&review("UPDATE", &deployment_pod()));
    assert!(update.allowed && update.patch.is_none());
    let mut plain = deployment_pod();
    plain["metadata"]["annotations"] = json!({});
    let create = webhook.review(&review("CREATE", &plain));
    assert!(create.allowed && create.patch.is_none());
}

#[test]
fn an_unreadable_ca_refuses_instead_of_injecting_a_broken_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let webhook = webhook(&dir);
    std::fs::remove_file(dir.path().join("ca.crt")).unwrap();
    let response = webhook.review(&review("CREATE", &deployment_pod()));
    assert!(!response.allowed);
    assert!(
        response
            .result
            .message
            .contains("cannot read the broker CA")
    );
}

#[test]
fn webhook_messages_do_not_tell_missing_from_granted_to_others() {
    // `orders-db` exists but is not shop/billing's; `nope` does not exist.
    let refusal = |bindings: &str| {
        let mut value = with_annotation(deployment_pod(), annotations::BINDINGS, bindings);
        value["spec"]["serviceAccountName"] = json!("billing");
        denial(&value)
    };
    assert_eq!(
        refusal("orders-db").replace("orders-db", "X"),
        refusal("nope").replace("nope", "X"),
        "the same words for a binding that exists and one that does not"
    );
}
