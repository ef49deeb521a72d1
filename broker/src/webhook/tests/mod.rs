//! The webhook's tests, by concern; the fixtures they share are here.

use std::{path::PathBuf, sync::Arc, time::Duration};

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::{Value, json};

use super::review::review_json;
use super::{
    denial::Denial,
    inject::{self, Decision, Shape},
    *,
};

use crate::config::webhook::{Injection, SidecarMode, default_resources};
use crate::{
    metrics::Metrics,
    policy::{Kv2Source, Policy, store::PolicyStore},
};

const POLICY: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: orders-db
    subjects:
      - { namespace: shop, serviceAccount: orders }
    source:
      kv2: { mount: secret, path: shop/orders }
  - name: tls
    subjects:
      - { namespace: shop, serviceAccount: "*" }
    source:
      kv2: { mount: secret, path: shop/tls }
  - name: gold
    subjects:
      - namespace: shop
        serviceAccount: orders
        podLabels: { tier: gold }
    source:
      kv2: { mount: secret, path: shop/gold }
"#;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn injection() -> Injection {
    Injection {
        image: "ghcr.io/tessera-dev/tessera-sidecar:0.1.0".to_owned(),
        image_pull_policy: "IfNotPresent".to_owned(),
        broker_address: "https://tessera.tessera.svc:8443".to_owned(),
        server_name: None,
        ca_file: PathBuf::from("/etc/tessera/ca.crt"),
        audience: "tessera".to_owned(),
        token_expiration: Duration::from_secs(600),
        mode: SidecarMode::Native,
        mount_path: "/var/run/secrets/tessera".to_owned(),
        volume_size_limit: k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "1Mi".to_owned(),
        ),
        resources: default_resources(),
        max_resources: [("cpu", "500m"), ("memory", "128Mi")]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_owned(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity(v.to_owned()),
                )
            })
            .collect(),
        run_as_user: 65532,
        metrics_port: None,
        pod_labels_known: false,
    }
}

fn policy() -> Policy {
    Policy::parse(POLICY, "policy.yaml").unwrap()
}

/// A pod as a Deployment's ReplicaSet creates it: `generateName`, no name,
/// no namespace in the object (it is in the request).
fn deployment_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-7d9f8b6c5-",
            "labels": { "app": "orders", "pod-template-hash": "7d9f8b6c5" },
            "annotations": {
                "tessera.dev/inject": "true",
                "tessera.dev/bindings": "orders-db, tls"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7d9f8b6c5",
                "uid": "6f1c0a52-0d0b-4a2f-9a57-1d4c2b0f9e11", "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "orders",
            "securityContext": { "fsGroup": 2000 },
            "containers": [{
                "name": "app",
                "image": "registry.example/orders:1.4.2",
                "ports": [{ "containerPort": 8080 }],
                "volumeMounts": [{
                    "name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "readOnly": true
                }]
            }],
            "volumes": [{ "name": "kube-api-access-x", "projected": { "sources": [
                { "serviceAccountToken": { "expirationSeconds": 3607, "path": "token" } }
            ] } }],
            "restartPolicy": "Always"
        }
    })
}

fn pod(value: &Value) -> Pod {
    serde_json::from_value(value.clone()).unwrap()
}

fn decide(value: &Value, injection: &Injection, mode: SidecarMode) -> Result<Decision, Denial> {
    inject::decide(&pod(value), "shop", injection, mode, CA, &policy(), &|_| {
        None
    })
}

fn injected(value: &Value, mode: SidecarMode) -> (Pod, inject::Injected) {
    match decide(value, &injection(), mode).unwrap() {
        Decision::Inject(pod, injected) => (*pod, injected),
        Decision::Skip(reason) => panic!("skipped: {reason}"),
    }
}

fn denial(value: &Value) -> String {
    match decide(value, &injection(), SidecarMode::Native) {
        Err(Denial(message)) => message,
        Ok(decision) => panic!("not refused: {decision:?}"),
    }
}

fn with_annotation(mut value: Value, key: &str, text: &str) -> Value {
    value["metadata"]["annotations"][key] = json!(text);
    value
}

fn job_pod() -> Value {
    let mut value = deployment_pod();
    value["metadata"]["generateName"] = json!("report-");
    value["metadata"]["ownerReferences"][0]["kind"] = json!("Job");
    value["spec"]["restartPolicy"] = json!("Never");
    value
}

/// Adds a second container that runs as its image's user.
fn with_image_user_container(mut value: Value) -> Value {
    value["spec"]["securityContext"] = json!({});
    value["spec"]["containers"][0]["securityContext"] = json!({ "runAsUser": 1001 });
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "proxy", "image": "envoy:1" }));
    value["spec"]["initContainers"] = json!([
        { "name": "migrate", "image": "flyway:10", "securityContext": { "runAsUser": 2002 } }
    ]);
    value
}

fn env_of_container(
    container: &k8s_openapi::api::core::v1::Container,
    name: &str,
) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

// The HTTP-facing part: AdmissionReview JSON as the API server sends it.

fn webhook(dir: &tempfile::TempDir) -> Webhook {
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, POLICY).unwrap();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, CA).unwrap();
    let mut injection = injection();
    injection.ca_file = ca_path;
    Webhook::new(
        injection,
        SidecarMode::Native,
        Arc::new(PolicyStore::load(vec![policy_path], "test-1").unwrap()),
        Arc::new(Metrics::new()),
        Box::new(|_| None),
    )
}

fn review(operation: &str, object: &Value) -> AdmissionRequest<Pod> {
    let review: AdmissionReview<Pod> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a8f4c7e2", "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" }
        }
    }))
    .unwrap();
    review.try_into().unwrap()
}

/// The env var `name` of the pod's container `container`.
fn env_of(pod: &Pod, container: &str, name: &str) -> Option<String> {
    let container = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?;
    env_of_container(container, name)
}

fn mutated_pod(value: &Value) -> Pod {
    injected(value, SidecarMode::Native).0
}

fn db_policy_text() -> String {
    POLICY.replace(
        "bindings:\n",
        "bindings:\n  - name: db\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { database: { mount: database, role: orders } }\n",
    )
}

fn sidecar_of(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0]
}

/// Hardening round 3, defect 12: a rename of a field that a binding
/// delivering a whole KV secret does not have was admitted, and the
/// sidecar's probe then held the app. The broker's last read of the secret
/// knows its keys; before any read the sidecar's check names the reason.
#[test]
fn defect_12_a_rename_of_a_key_the_kv_secret_lacks_is_refused_when_the_broker_knows_its_keys() {
    let policy = Policy::parse(POLICY, "policy.yaml").unwrap();
    let value = with_annotation(
        with_annotation(deployment_pod(), annotations::BINDINGS, "orders-db"),
        "tessera.dev/files.orders-db",
        "pasword=db-password",
    );
    let keys = |source: &Kv2Source| {
        (source.path == "shop/orders").then(|| vec!["password".to_owned(), "username".to_owned()])
    };
    let decided = inject::decide(
        &pod(&value),
        "shop",
        &injection(),
        SidecarMode::Native,
        CA,
        &policy,
        &keys,
    );
    let Err(Denial(message)) = decided else {
        panic!("admitted a rename of a key the secret lacks");
    };
    assert_eq!(
        message,
        "annotation tessera.dev/files.orders-db: binding `orders-db` delivers no `pasword` (it delivers password, username)"
    );
    let right = with_annotation(
        with_annotation(deployment_pod(), annotations::BINDINGS, "orders-db"),
        "tessera.dev/files.orders-db",
        "password=db-password",
    );
    let admitted = |value: &Value, keys: &pod_output::KvKeys<'_>| {
        matches!(
            inject::decide(
                &pod(value),
                "shop",
                &injection(),
                SidecarMode::Native,
                CA,
                &policy,
                keys
            ),
            Ok(Decision::Inject(..))
        )
    };
    assert!(admitted(&right, &keys));
    assert!(
        admitted(&value, &|_| None),
        "before the broker has read the secret it cannot tell"
    );
}

mod checks;
mod env_and_api_client;
mod injection;
mod pod_owners;
mod review;
