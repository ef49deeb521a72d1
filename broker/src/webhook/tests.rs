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

#[test]
fn deployment_pod_gets_a_native_sidecar_exactly_as_expected() {
    let original = deployment_pod();
    let (mutated, record) = injected(&original, SidecarMode::Native);
    assert_eq!(record.shape, Some(Shape::NativeSidecar));
    assert_eq!(record.bindings, ["orders-db", "tls"]);

    // The JSON patch the API server applies gives the expected pod.
    let before = serde_json::to_value(pod(&original)).unwrap();
    let patch = patch::between(&before, &serde_json::to_value(&mutated).unwrap());
    let mut patched = before.clone();
    json_patch::patch(&mut patched, &patch).unwrap();

    let mut expected = before;
    expected["metadata"]["annotations"]["tessera.dev/status"] = json!("injected");
    expected["metadata"]["annotations"]["tessera.dev/injected"] = json!(
        r#"{"shape":"native-sidecar","bindings":["orders-db","tls"],"mountPath":"/var/run/secrets/tessera","readers":"group 2000"}"#
    );
    expected["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "tessera-credentials", "mountPath": "/var/run/secrets/tessera", "readOnly": true
        }));
    expected["spec"]["volumes"].as_array_mut().unwrap().extend([
        json!({ "name": "tessera-credentials", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }),
        json!({ "name": "tessera-token", "projected": { "defaultMode": 292, "sources": [
            { "serviceAccountToken": { "audience": "tessera", "expirationSeconds": 600, "path": "token" } }
        ] } }),
    ]);
    expected["spec"]["initContainers"] = json!([{
        "name": "tessera-sidecar",
        "image": "ghcr.io/tessera-dev/tessera-sidecar:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "args": ["run"],
        "restartPolicy": "Always",
        "env": [
            { "name": "TESSERA_BROKER", "value": "https://tessera.tessera.svc:8443" },
            { "name": "TESSERA_CA_PEM", "value": CA },
            { "name": "TESSERA_TOKEN_FILE", "value": "/var/run/secrets/tessera.dev/serviceaccount/token" },
            { "name": "TESSERA_OUT", "value": "/var/run/secrets/tessera" },
            { "name": "TESSERA_BINDINGS", "value": "orders-db,tls" },
            { "name": "TESSERA_LOG_FORMAT", "value": "json" },
            { "name": "TESSERA_GROUP", "value": "2000" }
        ],
        "resources": {
            "requests": { "cpu": "5m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "32Mi" }
        },
        "startupProbe": {
            "exec": { "command": ["/tessera-sidecar", "check"] },
            "periodSeconds": 1, "timeoutSeconds": 5, "failureThreshold": 300
        },
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false, "privileged": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" }
        },
        "volumeMounts": [
            { "name": "tessera-credentials", "mountPath": "/var/run/secrets/tessera" },
            { "name": "tessera-token", "mountPath": "/var/run/secrets/tessera.dev/serviceaccount", "readOnly": true }
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError"
    }]);
    assert_eq!(patched, expected);
}

#[test]
fn a_second_pass_changes_nothing() {
    let (mutated, _) = injected(&deployment_pod(), SidecarMode::Native);
    let again = inject::decide(
        &mutated,
        "shop",
        &injection(),
        SidecarMode::Native,
        CA,
        &policy(),
        &|_| None,
    )
    .unwrap();
    assert!(matches!(again, Decision::Skip("already injected")));
}

#[test]
fn pods_without_the_annotation_are_untouched() {
    let mut value = deployment_pod();
    value["metadata"]["annotations"] = json!({});
    assert!(matches!(
        decide(&value, &injection(), SidecarMode::Native).unwrap(),
        Decision::Skip("not annotated")
    ));
    let off = with_annotation(deployment_pod(), annotations::INJECT, "false");
    assert!(matches!(
        decide(&off, &injection(), SidecarMode::Native).unwrap(),
        Decision::Skip("not annotated")
    ));
}

#[test]
fn sidecar_goes_first_and_every_container_sees_the_volume() {
    let mut value = deployment_pod();
    value["spec"]["initContainers"] =
        json!([{ "name": "migrate", "image": "registry.example/migrate:1" }]);
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "worker", "image": "registry.example/worker:1" }));
    let (mutated, _) = injected(&value, SidecarMode::Native);
    let spec = mutated.spec.unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["tessera-sidecar", "migrate"]);
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "tessera-credentials")
            .unwrap_or_else(|| panic!("{} has no credentials mount", container.name));
        assert_eq!(mount.mount_path, "/var/run/secrets/tessera");
        assert_eq!(
            mount.read_only.unwrap_or(false),
            container.name != "tessera-sidecar",
            "{}",
            container.name
        );
    }
}

fn job_pod() -> Value {
    let mut value = deployment_pod();
    value["metadata"]["generateName"] = json!("report-");
    value["metadata"]["ownerReferences"][0]["kind"] = json!("Job");
    value["spec"]["restartPolicy"] = json!("Never");
    value
}

#[test]
fn jobs_complete_in_both_modes() {
    // Native: the kubelet stops a restartPolicy: Always init container when
    // the main containers end.
    let (native, record) = injected(&job_pod(), SidecarMode::Native);
    assert_eq!(record.shape, Some(Shape::NativeSidecar));
    let spec = native.spec.unwrap();
    assert_eq!(spec.containers.len(), 1);
    // Classic: a sidecar container would run forever, so the Job gets the
    // init container only.
    let (classic, record) = injected(&job_pod(), SidecarMode::Classic);
    assert_eq!(record.shape, Some(Shape::InitOnly));
    let spec = classic.spec.unwrap();
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(init.name, "tessera-init");
    assert_eq!(init.args.as_deref(), Some(&["once".to_owned()][..]));
    assert_eq!(init.restart_policy, None);
    assert_eq!(spec.containers.len(), 1);
}

#[test]
fn classic_mode_adds_an_init_container_and_a_sidecar() {
    let (mutated, record) = injected(&deployment_pod(), SidecarMode::Classic);
    assert_eq!(record.shape, Some(Shape::ClassicSidecar));
    let spec = mutated.spec.unwrap();
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(
        (init.name.as_str(), init.args.clone()),
        ("tessera-init", Some(vec!["once".to_owned()]))
    );
    assert!(init.startup_probe.is_none());
    let sidecar = spec.containers.last().unwrap();
    assert_eq!(
        (sidecar.name.as_str(), sidecar.args.clone()),
        ("tessera-sidecar", Some(vec!["run".to_owned()]))
    );
}

#[test]
fn metrics_port_is_opened_on_the_running_sidecar_only() {
    let mut with_metrics = injection();
    with_metrics.metrics_port = Some(9091);
    let Decision::Inject(pod, _) =
        decide(&deployment_pod(), &with_metrics, SidecarMode::Classic).unwrap()
    else {
        panic!("not injected");
    };
    let spec = pod.spec.unwrap();
    let listens = |c: &k8s_openapi::api::core::v1::Container| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == "TESSERA_METRICS_LISTEN")
            .and_then(|e| e.value.clone())
    };
    let sidecar = spec.containers.last().unwrap();
    assert_eq!(listens(sidecar).as_deref(), Some("0.0.0.0:9091"));
    assert_eq!(sidecar.ports.as_ref().unwrap()[0].container_port, 9091);
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(listens(init), None, "the once container exits: no metrics");
    assert!(init.ports.is_none());
}

#[test]
fn mode_once_writes_before_the_app_and_adds_no_sidecar() {
    let value = with_annotation(deployment_pod(), annotations::MODE, "once");
    let (mutated, record) = injected(&value, SidecarMode::Native);
    assert_eq!(record.shape, Some(Shape::InitOnly));
    let spec = mutated.spec.unwrap();
    assert_eq!(spec.init_containers.unwrap()[0].name, "tessera-init");
    assert_eq!(spec.containers.len(), 1);
}

#[test]
fn mount_path_annotation_moves_the_files() {
    let value = with_annotation(
        deployment_pod(),
        annotations::MOUNT_PATH,
        "/etc/orders/secrets",
    );
    let (mutated, record) = injected(&value, SidecarMode::Native);
    assert_eq!(record.mount_path, "/etc/orders/secrets");
    let spec = mutated.spec.unwrap();
    let sidecar = &spec.init_containers.unwrap()[0];
    let out = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TESSERA_OUT")
        .unwrap();
    assert_eq!(out.value.as_deref(), Some("/etc/orders/secrets"));
}

#[test]
fn malformed_annotations_are_refused_with_the_reason() {
    let cases = [
        (annotations::INJECT, "yes", "must be \"true\" or \"false\""),
        (annotations::BINDINGS, "orders-db,,tls", "empty name"),
        (
            annotations::BINDINGS,
            "../etc",
            "`../etc` is not a binding name",
        ),
        (annotations::BINDINGS, "tls,tls", "`tls` is listed twice"),
        (annotations::MOUNT_PATH, "secrets", "absolute path"),
        (annotations::MOUNT_PATH, "/var/../etc", "normalized"),
        (
            annotations::MODE,
            "sometimes",
            "must be \"run\", \"once\" or \"env\"",
        ),
    ];
    for (key, value, expected) in cases {
        let message = denial(&with_annotation(deployment_pod(), key, value));
        assert!(message.contains(key), "{message}");
        assert!(message.contains(expected), "{key}={value}: {message}");
    }
    let mut missing = deployment_pod();
    missing["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(annotations::BINDINGS);
    assert!(denial(&missing).contains("tessera.dev/bindings is missing"));
}

#[test]
fn bindings_the_service_account_may_not_have_are_refused_by_name() {
    let mut value = with_annotation(
        deployment_pod(),
        annotations::BINDINGS,
        "orders-db,tls,nope",
    );
    value["spec"]["serviceAccountName"] = json!("billing");
    let message = denial(&value);
    assert!(
        message.contains("binding `orders-db`, `nope` not granted to service account shop/billing"),
        "{message}"
    );
    assert!(!message.contains("`tls`"), "{message}");

    // No serviceAccountName: the pod runs as `default`.
    let mut value = deployment_pod();
    value["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccountName");
    assert!(denial(&value).contains("service account shop/default"));
}

#[test]
fn pod_label_subjects_match_only_when_the_broker_knows_labels() {
    let mut value = with_annotation(deployment_pod(), annotations::BINDINGS, "gold");
    value["metadata"]["labels"]["tier"] = json!("gold");
    // Without pod lookup the broker never sees labels, so admitting the pod
    // would only move the refusal to runtime.
    assert!(denial(&value).contains("binding `gold` not granted"));
    let mut knows = injection();
    knows.pod_labels_known = true;
    assert!(matches!(
        decide(&value, &knows, SidecarMode::Native).unwrap(),
        Decision::Inject(..)
    ));
}

#[test]
fn files_are_readable_by_the_app_user_or_the_refusal_says_how() {
    let mut value = deployment_pod();
    value["spec"]["securityContext"] = json!({ "runAsUser": 1001 });
    let (mutated, record) = injected(&value, SidecarMode::Native);
    assert_eq!(record.readers, "user 1001");
    let sidecar = &mutated.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(
        sidecar.security_context.as_ref().unwrap().run_as_user,
        Some(1001)
    );
    assert!(
        !sidecar
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "TESSERA_GROUP")
    );

    // Root, named or by the image, is treated like any image user: an
    // fsGroup the sidecar's files are readable by, and a warning saying so
    // (hardening round 3, defect 12: root was refused, the image's root not).
    value["spec"]["securityContext"] = json!({ "runAsUser": 0 });
    let (mutated, record) = injected(&value, SidecarMode::Native);
    let context = mutated.spec.unwrap().security_context.unwrap();
    assert_eq!(context.fs_group, Some(65532));
    assert_eq!(context.run_as_user, Some(0), "the pod's own user is kept");
    assert_eq!(
        record.warnings,
        [
            "Tessera set spec.securityContext.fsGroup 65532 so the credentials are readable (`app` runs as root); set fsGroup, or one non-root runAsUser for every container, to choose yourself"
        ]
    );
    value["spec"]["securityContext"] = json!({});
    let (_, image_user) = injected(&value, SidecarMode::Native);
    assert_eq!(image_user.warnings.len(), 1, "{:?}", image_user.warnings);
    assert!(image_user.warnings[0].contains("`app` as its image's user"));
    let refusing = Policy::parse(
        &POLICY.replace("bindings:", "limits: { imageUser: refuse }\nbindings:"),
        "p.yaml",
    )
    .unwrap();
    value["spec"]["securityContext"] = json!({ "runAsUser": 0 });
    let refused = inject::decide(
        &pod(&value),
        "shop",
        &injection(),
        SidecarMode::Native,
        CA,
        &refusing,
        &|_| None,
    );
    let Err(Denial(message)) = refused else {
        panic!("admitted with limits.imageUser: refuse");
    };
    assert!(message.contains("(`app` runs as root)"), "{message}");
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

#[test]
fn pods_that_rely_on_the_images_user_get_an_fs_group_or_a_refusal_naming_who_runs_as_whom() {
    // No user anywhere: every container runs as its image's user.
    let mut value = deployment_pod();
    value["spec"]["securityContext"] = json!({});
    let (mutated, record) = injected(&value, SidecarMode::Native);
    let spec = mutated.spec.unwrap();
    let context = spec.security_context.unwrap();
    assert_eq!(context.fs_group, Some(65532));
    assert_eq!(
        context.fs_group_change_policy.as_deref(),
        Some("OnRootMismatch")
    );
    assert!(
        record
            .readers
            .starts_with("group 65532 (fsGroup set by Tessera"),
        "{}",
        record.readers
    );
    let sidecar = &spec.init_containers.unwrap()[0];
    assert_eq!(
        env_of_container(sidecar, "TESSERA_GROUP").as_deref(),
        Some("65532")
    );

    // Containers that disagree (one names no user): the same group for all.
    let mixed = with_image_user_container(deployment_pod());
    let (mutated, _) = injected(&mixed, SidecarMode::Native);
    assert_eq!(
        mutated.spec.unwrap().security_context.unwrap().fs_group,
        Some(65532)
    );

    // The security team may refuse instead; the refusal names each container's user.
    let strict = Policy::parse(
        &POLICY.replace("bindings:\n", "limits:\n  imageUser: refuse\nbindings:\n"),
        "policy.yaml",
    )
    .unwrap();
    let Err(Denial(message)) = inject::decide(
        &pod(&mixed),
        "shop",
        &injection(),
        SidecarMode::Native,
        CA,
        &strict,
        &|_| None,
    ) else {
        panic!("admitted");
    };
    assert!(
        message.contains("`migrate` runs as 2002, `app` runs as 1001, `proxy` as its image's user"),
        "{message}"
    );
    assert!(message.contains("limits.imageUser is refuse"), "{message}");
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

#[test]
fn windows_pods_are_refused_with_what_to_do_instead() {
    for windows in [
        json!({ "os": { "name": "windows" } }),
        json!({ "nodeSelector": { "kubernetes.io/os": "windows" } }),
    ] {
        let mut value = deployment_pod();
        for (key, field) in windows.as_object().unwrap() {
            value["spec"][key] = field.clone();
        }
        let message = denial(&value);
        assert!(
            message.starts_with("Windows pods cannot get the sidecar"),
            "{message}"
        );
        assert!(message.contains("tessera.dev/api-client"), "{message}");
        assert!(
            !message.contains("fsGroup"),
            "advice Windows forbids: {message}"
        );
    }
}

#[test]
fn pods_on_the_nodes_resolver_are_refused_unless_they_can_resolve_the_broker() {
    let mut value = deployment_pod();
    value["spec"]["hostNetwork"] = json!(true);
    let message = denial(&value);
    assert!(message.contains("(hostNetwork: true)"), "{message}");
    assert!(message.contains("tessera.tessera.svc"), "{message}");
    assert!(
        message.contains("set spec.dnsPolicy: ClusterFirstWithHostNet"),
        "{message}"
    );
    value["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    assert!(matches!(
        decide(&value, &injection(), SidecarMode::Native),
        Ok(Decision::Inject(..))
    ));

    let mut value = deployment_pod();
    value["spec"]["dnsPolicy"] = json!("Default");
    assert!(denial(&value).contains("set spec.dnsPolicy: ClusterFirst "));
    // An API-client-only pod calls the broker too.
    let mut api_only = value.clone();
    api_only["metadata"]["annotations"] = json!({ "tessera.dev/api-client": "true" });
    assert!(denial(&api_only).contains("dnsPolicy: Default"));
    // A broker address that is an IP needs no resolver.
    let mut by_ip = injection();
    by_ip.broker_address = "https://10.96.0.15:8443".to_owned();
    by_ip.server_name = Some("tessera.tessera.svc".to_owned());
    assert!(matches!(
        decide(&value, &by_ip, SidecarMode::Native),
        Ok(Decision::Inject(..))
    ));
}

#[test]
fn a_metrics_port_the_pod_uses_turns_the_sidecars_metrics_off_with_a_warning() {
    let mut with_metrics = injection();
    with_metrics.metrics_port = Some(9091);
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["ports"] = json!([{ "containerPort": 9091 }]);
    let Decision::Inject(pod, record) = decide(&value, &with_metrics, SidecarMode::Native).unwrap()
    else {
        panic!("not injected");
    };
    let sidecar = &pod.spec.unwrap().init_containers.unwrap()[0];
    assert!(sidecar.ports.is_none());
    assert_eq!(env_of_container(sidecar, "TESSERA_METRICS_LISTEN"), None);
    assert_eq!(
        record.warnings,
        ["sidecar metrics are off: container `app` uses port 9091, the sidecar's metrics port"]
    );
    // The API server shows it to whoever created the pod.
    let dir = tempfile::tempdir().unwrap();
    let mut webhook = webhook(&dir);
    webhook.injection.metrics_port = Some(9091);
    let out = review_json(webhook.review(&review("CREATE", &value)));
    assert_eq!(
        out["response"]["warnings"][0],
        "tessera: sidecar metrics are off: container `app` uses port 9091, the sidecar's metrics port"
    );
}

#[test]
fn a_status_annotation_or_a_container_name_does_not_pass_for_an_injection() {
    // Written by hand (or copied from an injected pod's YAML): still injected.
    let value = with_annotation(deployment_pod(), annotations::STATUS, "injected");
    let (mutated, _) = injected(&value, SidecarMode::Native);
    assert_eq!(
        mutated.spec.unwrap().init_containers.unwrap()[0].name,
        "tessera-sidecar"
    );
    // An app container named like Tessera's is refused, not taken for it.
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["name"] = json!("tessera-init");
    assert!(denial(&value).contains("container name `tessera-init` is reserved"));
}

#[test]
fn name_and_path_collisions_are_refused() {
    let mut value = deployment_pod();
    value["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "tessera-token", "emptyDir": {} }));
    assert!(denial(&value).contains("volume named `tessera-token`"));

    let mut value = deployment_pod();
    value["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "kube-api-access-x", "mountPath": "/var/run/secrets/tessera/" }));
    assert!(denial(&value).contains(
        "container `app` already mounts /var/run/secrets/tessera, at /var/run/secrets/tessera"
    ));
    // Tessera's own directory (the sidecar's token) is not a place for the files.
    for reserved in [
        "/var/run/secrets/tessera.dev/serviceaccount",
        "/var/run/secrets/tessera.dev",
        "/var/run/secrets/tessera.dev/api/x",
    ] {
        let message = denial(&with_annotation(
            deployment_pod(),
            annotations::MOUNT_PATH,
            reserved,
        ));
        assert!(
            message.contains("overlaps /var/run/secrets/tessera.dev"),
            "{message}"
        );
    }
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
    let install = include_str!("../../../docs/install.md");
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

#[test]
fn api_client_pods_get_the_token_ca_and_address_with_or_without_a_sidecar() {
    use super::api_client::{API_CLIENT, CA_ANNOTATION, DIR, VOLUME};
    // Alone: no sidecar, the app calls the broker itself.
    let mut alone = deployment_pod();
    alone["metadata"]["annotations"] = json!({ API_CLIENT: "true" });
    alone["spec"]["containers"][0]["env"] =
        json!([{ "name": "TESSERA_BROKER", "value": "https://mine:8443" }]);
    let (pod, record) = injected(&alone, SidecarMode::Native);
    assert_eq!(record.shape, None, "no sidecar");
    assert!(record.api_client);
    let spec = pod.spec.as_ref().unwrap();
    assert!(spec.init_containers.as_ref().is_none_or(Vec::is_empty));
    assert_eq!(
        env_of(&pod, "app", "TESSERA_CA_FILE"),
        Some(format!("{DIR}/ca.crt"))
    );
    assert_eq!(
        env_of(&pod, "app", "TESSERA_TOKEN_FILE"),
        Some(format!("{DIR}/token"))
    );
    assert_eq!(
        env_of(&pod, "app", "TESSERA_BROKER").as_deref(),
        Some("https://mine:8443"),
        "what the pod sets stays"
    );
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == VOLUME)
        .unwrap();
    let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
    let token = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(token.audience.as_deref(), Some("tessera"));
    let ca = &sources[1]
        .downward_api
        .as_ref()
        .unwrap()
        .items
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        ca.field_ref.as_ref().unwrap().field_path,
        format!("metadata.annotations['{CA_ANNOTATION}']")
    );
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()[CA_ANNOTATION],
        CA,
        "the CA travels in the pod"
    );

    // With a sidecar too; the sidecar itself gets none of it.
    let both = with_annotation(deployment_pod(), API_CLIENT, "true");
    let (pod, record) = injected(&both, SidecarMode::Native);
    assert_eq!(record.shape, Some(Shape::NativeSidecar));
    assert!(env_of(&pod, "app", "TESSERA_TOKEN_FILE").is_some());
    let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != VOLUME)
    );

    // Anything but "true" or "false" is refused with the annotation named.
    let bad = with_annotation(deployment_pod(), API_CLIENT, "yes");
    assert!(denial(&bad).contains(API_CLIENT));
}

#[test]
fn fields_the_typed_view_does_not_know_survive_the_patch_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let webhook = webhook(&dir);
    let mut original = deployment_pod();
    // Kubernetes' restart-all-containers example (1.35, after this build's
    // typed view) and fields of a future version.
    original["spec"]["initContainers"] = json!([
        { "name": "setup-environment", "image": "busybox:1.37", "command": ["sh", "-c", "true"] },
        {
            "name": "watcher", "image": "busybox:1.37", "restartPolicy": "Always",
            "restartPolicyRules": [
                { "action": "RestartAllContainers", "exitCodes": { "operator": "In", "values": [88] } }
            ]
        }
    ]);
    original["spec"]["futurePodField"] = json!({ "enabled": true });
    original["spec"]["containers"][0]["futureContainerField"] = json!("kept");
    let out = review_json(webhook.review(&review("CREATE", &original)));
    assert_eq!(out["response"]["allowed"], true, "{out}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    // Only additions: nothing the pod had is rewritten.
    for operation in &patch.0 {
        assert!(
            matches!(operation, json_patch::PatchOperation::Add(_)),
            "{operation}"
        );
    }
    // The sidecar is one operation, not the init containers rewritten.
    let sidecar_ops: Vec<String> = patch
        .0
        .iter()
        .map(ToString::to_string)
        .filter(|op| op.contains("\"/spec/initContainers/0\""))
        .collect();
    assert_eq!(sidecar_ops.len(), 1, "{sidecar_ops:?}");

    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tessera-sidecar", "setup-environment", "watcher"]);
    assert_eq!(
        init[2]["restartPolicyRules"],
        original["spec"]["initContainers"][1]["restartPolicyRules"]
    );
    assert!(init[1].get("restartPolicyRules").is_none(), "{}", init[1]);
    assert_eq!(
        patched["spec"]["futurePodField"],
        json!({ "enabled": true })
    );
    assert_eq!(
        patched["spec"]["containers"][0]["futureContainerField"],
        "kept"
    );
    // What the typed view sees is exactly the injection.
    let (expected, _) = injected(&original, SidecarMode::Native);
    assert_eq!(pod(&patched), expected);
}

#[test]
fn reload_annotations_signal_the_app_by_name_or_call_its_loopback_endpoint() {
    let mut value = with_annotation(deployment_pod(), annotations::RELOAD_SIGNAL, "SIGHUP");
    value = with_annotation(value, annotations::RELOAD_PROCESS, "nginx");
    value = with_annotation(
        value,
        annotations::RELOAD_URL,
        "http://127.0.0.1:9090/-/reload",
    );
    value["spec"]["securityContext"] = json!({ "fsGroup": 2000, "runAsUser": 101 });
    let (mutated, _) = injected(&value, SidecarMode::Native);
    let spec = mutated.spec.unwrap();
    assert_eq!(spec.share_process_namespace, Some(true));
    let sidecar = &spec.init_containers.unwrap()[0];
    assert_eq!(
        env_of_container(sidecar, "TESSERA_NOTIFY_SIGNAL").as_deref(),
        Some("HUP")
    );
    assert_eq!(
        env_of_container(sidecar, "TESSERA_NOTIFY_PROCESS").as_deref(),
        Some("nginx")
    );
    assert_eq!(
        env_of_container(sidecar, "TESSERA_NOTIFY_URL").as_deref(),
        Some("http://127.0.0.1:9090/-/reload")
    );
    // A process may signal only its own user's processes: the sidecar runs as the app.
    assert_eq!(
        sidecar.security_context.as_ref().unwrap().run_as_user,
        Some(101)
    );
    assert_eq!(
        env_of_container(sidecar, "TESSERA_GROUP").as_deref(),
        Some("2000")
    );

    // The URL alone changes neither the process namespace nor the user.
    let url_only = with_annotation(
        deployment_pod(),
        annotations::RELOAD_URL,
        "http://localhost:8080/reload",
    );
    let (mutated, _) = injected(&url_only, SidecarMode::Native);
    let spec = mutated.spec.unwrap();
    assert_eq!(spec.share_process_namespace, None);
    assert_eq!(
        spec.init_containers.unwrap()[0]
            .security_context
            .as_ref()
            .unwrap()
            .run_as_user,
        Some(65532)
    );
}

#[test]
fn reload_annotations_that_cannot_work_are_refused_by_name() {
    let signal = |value: Value, signal: &str, process: &str| {
        with_annotation(
            with_annotation(value, annotations::RELOAD_SIGNAL, signal),
            annotations::RELOAD_PROCESS,
            process,
        )
    };
    let mut one_user = deployment_pod();
    one_user["spec"]["securityContext"] = json!({ "fsGroup": 2000, "runAsUser": 101 });
    for (value, expected) in [
        (
            with_annotation(deployment_pod(), annotations::RELOAD_SIGNAL, "HUP"),
            "tessera.dev/reload-signal needs tessera.dev/reload-process",
        ),
        (
            with_annotation(deployment_pod(), annotations::RELOAD_PROCESS, "nginx"),
            "tessera.dev/reload-process needs tessera.dev/reload-signal",
        ),
        (
            signal(one_user.clone(), "KILL", "nginx"),
            "`KILL` is not one of HUP",
        ),
        (
            signal(one_user.clone(), "HUP", "a-very-long-process-name"),
            "write what `ps` shows: `a-very-long-pro`",
        ),
        (
            signal(deployment_pod(), "HUP", "nginx"),
            "must run as one non-root runAsUser",
        ),
        (
            with_annotation(
                deployment_pod(),
                annotations::RELOAD_URL,
                "http://10.0.0.1:80/reload",
            ),
            "the pod's own loopback",
        ),
        (
            with_annotation(
                deployment_pod(),
                annotations::RELOAD_URL,
                "https://127.0.0.1/reload",
            ),
            "the pod's own loopback",
        ),
        (
            with_annotation(
                with_annotation(deployment_pod(), annotations::MODE, "once"),
                annotations::RELOAD_URL,
                "http://127.0.0.1:80/",
            ),
            "need a running sidecar",
        ),
    ] {
        let message = denial(&value);
        assert!(message.contains(expected), "{expected}: {message}");
    }
}

#[test]
fn env_mode_wraps_each_containers_command_and_installs_the_binary_first() {
    let mut value = with_annotation(deployment_pod(), annotations::MODE, "env");
    value = with_annotation(value, annotations::ENV_PREFIX, "APP_");
    value = with_annotation(value, annotations::ENV_ON_ROTATE, "signal:HUP");
    value["spec"]["containers"][0]["command"] = json!(["/app/orders", "--serve"]);
    value["spec"]["containers"][0]["args"] = json!(["--port", "8080"]);
    let (mutated, record) = injected(&value, SidecarMode::Native);
    assert_eq!(record.shape, Some(Shape::Exec));
    assert_eq!(record.readers, "the environment of app");
    let spec = mutated.spec.unwrap();
    let app = &spec.containers[0];
    assert_eq!(
        app.command.clone().unwrap(),
        [
            "/var/run/secrets/tessera.dev/bin/tessera-sidecar",
            "exec",
            "--",
            "/app/orders",
            "--serve"
        ]
    );
    assert_eq!(
        app.args.clone().unwrap(),
        ["--port", "8080"],
        "args untouched"
    );
    assert_eq!(
        env_of_container(app, "TESSERA_BINDINGS").as_deref(),
        Some("orders-db,tls")
    );
    assert_eq!(
        env_of_container(app, "TESSERA_ENV_PREFIX").as_deref(),
        Some("APP_")
    );
    assert_eq!(
        env_of_container(app, "TESSERA_ON_ROTATE").as_deref(),
        Some("signal:HUP")
    );
    let mounts: Vec<&str> = app
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/var/run/secrets/tessera.dev/bin"),
        "{mounts:?}"
    );
    assert!(mounts.contains(&names::TOKEN_DIR), "{mounts:?}");
    assert!(
        !mounts.contains(&"/var/run/secrets/tessera"),
        "no files volume"
    );
    // One lease per pod lifetime in env mode: a restarted container
    // resumes its leases from a memory volume of its own directory.
    assert!(mounts.contains(&names::STATE_DIR), "{mounts:?}");
    assert_eq!(
        env_of_container(app, "TESSERA_STATE_DIR").as_deref(),
        Some(format!("{}/{}", names::STATE_DIR, app.name).as_str())
    );
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(init.name, "tessera-install");
    assert_eq!(
        init.args.clone().unwrap(),
        ["install", "/var/run/secrets/tessera.dev/bin"]
    );
    assert_eq!(init.restart_policy, None, "runs once, before the app");
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(volumes.contains(&"tessera-bin") && volumes.contains(&"tessera-token"));
    assert!(volumes.contains(&names::STATE_VOLUME));
    let state = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == names::STATE_VOLUME)
        .unwrap();
    assert_eq!(
        state.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert!(!volumes.contains(&"tessera-credentials"));

    // A second pass leaves it alone.
    let again = inject::decide(
        &mutated_pod(&value),
        "shop",
        &injection(),
        SidecarMode::Native,
        CA,
        &policy(),
        &|_| None,
    );
    assert!(matches!(again, Ok(Decision::Skip("already injected"))));
}

fn mutated_pod(value: &Value) -> Pod {
    injected(value, SidecarMode::Native).0
}

#[test]
fn env_mode_refuses_what_it_cannot_wrap_and_says_what_to_do() {
    let env = |value: Value| with_annotation(value, annotations::MODE, "env");
    let mut commanded = deployment_pod();
    commanded["spec"]["containers"][0]["command"] = json!(["/app/orders"]);
    for (value, expected) in [
        (
            env(deployment_pod()),
            "container `app` sets no `command`: environment variables are given by wrapping the command",
        ),
        (
            with_annotation(
                env(commanded.clone()),
                annotations::ENV_CONTAINERS,
                "worker",
            ),
            "the pod has no container `worker`",
        ),
        (
            with_annotation(env(commanded.clone()), annotations::ENV_PREFIX, "1X"),
            "tessera.dev/env-prefix: `1X` is not the start of a variable name",
        ),
        (
            with_annotation(env(commanded.clone()), annotations::ENV_ON_ROTATE, "reload"),
            "tessera.dev/env-on-rotate: `reload` is not `restart` or `signal:<HUP|USR1|USR2|TERM|INT>`",
        ),
        (
            with_annotation(
                env(commanded.clone()),
                annotations::RELOAD_URL,
                "http://127.0.0.1:1/",
            ),
            "apply to files",
        ),
    ] {
        let message = denial(&value);
        assert!(message.contains(expected), "{expected}: {message}");
    }
    // The container named by the annotation is the only one wrapped.
    let mut two = env(commanded);
    two["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "proxy", "image": "envoy:1" }));
    let two = with_annotation(two, annotations::ENV_CONTAINERS, "app");
    let (mutated, _) = injected(&two, SidecarMode::Native);
    let containers = mutated.spec.unwrap().containers;
    assert_eq!(containers[0].command.clone().unwrap()[1], "exec");
    assert_eq!(containers[1].command, None, "proxy untouched");
}

#[test]
fn pod_owners_reshape_files_within_what_the_binding_delivers() {
    // A binding whose fields are known: a database credential.
    let db_policy = Policy::parse(&db_policy_text(), "policy.yaml").unwrap();
    let decide_with = |value: &Value, policy: &Policy| {
        inject::decide(
            &pod(value),
            "shop",
            &injection(),
            SidecarMode::Native,
            CA,
            policy,
            &|_| None,
        )
    };
    let mut value = with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls");
    value = with_annotation(value, "tessera.dev/files.db", "password=db-password");
    value = with_annotation(
        value,
        "tessera.dev/templates.db",
        "dsn: postgresql://{{ username | urlencode }}:{{ password | urlencode }}@db:5432/orders\n",
    );
    value = with_annotation(value, annotations::MOUNT_CONTAINERS, "app");
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "proxy", "image": "envoy:1" }));
    let Ok(Decision::Inject(mutated, _)) = decide_with(&value, &db_policy) else {
        panic!("refused");
    };
    let spec = mutated.spec.unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let output: Value =
        serde_json::from_str(&env_of_container(sidecar, "TESSERA_POD_OUTPUT").unwrap()).unwrap();
    assert_eq!(output["db"]["files"]["password"], "db-password");
    assert!(
        output["db"]["templates"]["dsn"]
            .as_str()
            .unwrap()
            .starts_with("postgresql://")
    );
    // Only the named container mounts the credentials.
    let mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "tessera-credentials")
    };
    assert!(mounts(&spec.containers[0]));
    assert!(
        !mounts(&spec.containers[1]),
        "proxy does not see the credentials"
    );

    // Anything that would widen, or does not fit, is refused by annotation.
    for (key, text, expected) in [
        (
            "tessera.dev/templates.db",
            "x: \"{{ root_token }}\"",
            "uses `root_token`, which binding `db` does not deliver",
        ),
        (
            "tessera.dev/files.db",
            "token=t",
            "binding `db` delivers no `token`",
        ),
        (
            "tessera.dev/files.payments",
            "a=b",
            "binding `payments` is not in tessera.dev/bindings",
        ),
        (
            "tessera.dev/templates.db",
            "../x: \"{{ username }}\"",
            "is not a safe file name",
        ),
        (
            "tessera.dev/templates.db",
            "x: \"{{ username | nope }}\"",
            "unknown filter `nope`",
        ),
        (
            "tessera.dev/templates.db",
            "username: \"{{ password }}\"",
            "would be named `username`",
        ),
        (
            annotations::MOUNT_CONTAINERS,
            "worker",
            "the pod has no container `worker`",
        ),
    ] {
        let bad = with_annotation(
            with_annotation(deployment_pod(), annotations::BINDINGS, "db"),
            key,
            text,
        );
        let Err(Denial(message)) = decide_with(&bad, &db_policy) else {
            panic!("{key}: admitted");
        };
        assert!(message.contains(key), "{message}");
        assert!(message.contains(expected), "{expected}: {message}");
    }

    // The security team may forbid pod templates.
    let strict = Policy::parse(
        &db_policy_text().replace("bindings:\n", "limits:\n  podTemplates: false\nbindings:\n"),
        "policy.yaml",
    )
    .unwrap();
    let Err(Denial(message)) = decide_with(&value, &strict) else {
        panic!("admitted");
    };
    assert!(message.contains("limits.podTemplates: false"), "{message}");
}

fn db_policy_text() -> String {
    POLICY.replace(
        "bindings:\n",
        "bindings:\n  - name: db\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { database: { mount: database, role: orders } }\n",
    )
}

#[test]
fn pod_owners_set_the_sidecars_limits_within_the_platforms_bounds() {
    let quantity = |pod: &Pod, kind: &str, resource: &str| {
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let resources = sidecar.resources.as_ref().unwrap();
        let map = if kind == "limits" {
            &resources.limits
        } else {
            &resources.requests
        };
        map.as_ref().unwrap()[resource].0.clone()
    };
    let value = with_annotation(
        with_annotation(deployment_pod(), annotations::SIDECAR_MEMORY, "96Mi"),
        annotations::SIDECAR_CPU,
        "2m",
    );
    let (mutated, _) = injected(&value, SidecarMode::Native);
    assert_eq!(quantity(&mutated, "limits", "memory"), "96Mi");
    assert_eq!(
        quantity(&mutated, "requests", "memory"),
        "16Mi",
        "request kept"
    );
    assert_eq!(quantity(&mutated, "limits", "cpu"), "2m");
    assert_eq!(
        quantity(&mutated, "requests", "cpu"),
        "2m",
        "request lowered to the limit"
    );
    for (key, text, expected) in [
        (
            annotations::SIDECAR_MEMORY,
            "1Gi",
            "1Gi is above the 128Mi the platform allows",
        ),
        (
            annotations::SIDECAR_CPU,
            "0.6",
            "0.6 is above the 500m the platform allows",
        ),
        (
            annotations::SIDECAR_CPU,
            "lots",
            "`lots` is not a positive quantity",
        ),
        (
            annotations::SIDECAR_MEMORY,
            "0",
            "`0` is not a positive quantity",
        ),
    ] {
        let message = denial(&with_annotation(deployment_pod(), key, text));
        assert!(
            message.contains(key) && message.contains(expected),
            "{expected}: {message}"
        );
    }
}

#[test]
fn a_pod_may_shorten_a_leased_bindings_ttl_and_nothing_else() {
    let policy = Policy::parse(&db_policy_text(), "policy.yaml").unwrap();
    let decide_with = |value: &Value| {
        inject::decide(
            &pod(value),
            "shop",
            &injection(),
            SidecarMode::Native,
            CA,
            &policy,
            &|_| None,
        )
    };
    let value = with_annotation(
        with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls"),
        "tessera.dev/ttl.db",
        "10m",
    );
    let Ok(Decision::Inject(mutated, _)) = decide_with(&value) else {
        panic!("refused");
    };
    let sidecar = &mutated.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(
        env_of_container(sidecar, "TESSERA_MAX_TTL").as_deref(),
        Some("db=600s")
    );
    for (key, text, expected) in [
        (
            "tessera.dev/ttl.db",
            "48h",
            "48h is longer than the policy's ttl",
        ),
        ("tessera.dev/ttl.db", "soon", "`soon` is not a duration"),
        (
            "tessera.dev/ttl.db",
            "1s",
            "1s is below the policy's floor 5m for database credentials (limits.minTtl.database)",
        ),
        ("tessera.dev/ttl.tls", "1m", "`tls` is a KV secret"),
        (
            "tessera.dev/ttl.payments",
            "1m",
            "binding `payments` is not in tessera.dev/bindings",
        ),
    ] {
        let bad = with_annotation(
            with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls"),
            key,
            text,
        );
        let Err(Denial(message)) = decide_with(&bad) else {
            panic!("{key}={text}: admitted");
        };
        assert!(
            message.contains(key) && message.contains(expected),
            "{expected}: {message}"
        );
    }
}

#[test]
fn defect_11_reload_urls_are_checked_by_the_sidecars_own_parser() {
    let signal_free = |url: &str| with_annotation(deployment_pod(), annotations::RELOAD_URL, url);
    let message = denial(&signal_free("http://127.0.0.1:80@host:8080/"));
    assert!(message.contains("user information"), "{message}");
    injected(
        &signal_free("http://127.0.0.1:9090/-/reload"),
        SidecarMode::Native,
    );
}

#[test]
fn defect_12_reload_signal_on_a_host_pid_pod_is_refused_with_the_reason() {
    let mut value = with_annotation(deployment_pod(), annotations::RELOAD_SIGNAL, "HUP");
    value = with_annotation(value, annotations::RELOAD_PROCESS, "node_exporter");
    value["spec"]["hostPID"] = json!(true);
    value["spec"]["securityContext"]["runAsUser"] = json!(65534);
    let message = denial(&value);
    assert!(
        message.contains("hostPID") && message.contains("reload-url"),
        "{message}"
    );
}

#[test]
fn defect_12_env_mode_with_api_client_gives_the_wrapped_container_one_ca() {
    let mut value = with_annotation(deployment_pod(), annotations::MODE, "env");
    value = with_annotation(value, api_client::API_CLIENT, "true");
    value["spec"]["containers"][0]["command"] = json!(["/bin/orders"]);
    let (pod, _) = injected(&value, SidecarMode::Native);
    let app = &pod.spec.as_ref().unwrap().containers[0];
    let cas: Vec<&str> = app
        .env
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .filter(|n| n.starts_with("TESSERA_CA_"))
        .collect();
    assert_eq!(cas, ["TESSERA_CA_PEM"]);
}

#[test]
fn defect_12_a_mount_path_above_or_below_an_existing_mount_is_refused() {
    for (existing, path, relation) in [
        ("/etc/grafana/grafana.ini", "/etc/grafana", "below"),
        ("/app/config", "/app/config/tessera", "above"),
    ] {
        let mut value = with_annotation(deployment_pod(), annotations::MOUNT_PATH, path);
        value["spec"]["volumes"] = json!([{ "name": "cfg", "configMap": { "name": "c" } }]);
        value["spec"]["containers"][0]["volumeMounts"] =
            json!([{ "name": "cfg", "mountPath": existing, "subPath": "x" }]);
        let message = denial(&value);
        assert!(
            message.contains(&format!("already mounts {existing}, {relation} {path}")),
            "{message}"
        );
    }
}

#[test]
fn defect_12_windows_chosen_by_node_affinity_is_refused() {
    let mut value = deployment_pod();
    value["spec"]["affinity"] = json!({ "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{ "matchExpressions": [
            { "key": "kubernetes.io/os", "operator": "In", "values": ["windows"] }] }] } } });
    assert!(denial(&value).contains("Windows pods"));
    // Linux or either: injected.
    value["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        [0]["matchExpressions"][0]["values"] = json!(["linux", "windows"]);
    injected(&value, SidecarMode::Native);
}

#[test]
fn defect_11_env_mode_refuses_an_empty_command_and_a_long_prefix() {
    let mut value = with_annotation(deployment_pod(), annotations::MODE, "env");
    value["spec"]["containers"][0]["command"] = json!([""]);
    assert!(denial(&value).contains("sets no `command`"));
    value["spec"]["containers"][0]["command"] = json!(["/bin/orders"]);
    let long = with_annotation(value, annotations::ENV_PREFIX, &"P".repeat(33));
    assert!(denial(&long).contains("33 characters, at most 32"));
}

fn sidecar_of(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0]
}

#[test]
fn defect_12_a_guaranteed_pod_stays_guaranteed() {
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["resources"] = json!({
        "requests": { "cpu": "500m", "memory": "256Mi" },
        "limits": { "cpu": "500m", "memory": "256Mi" } });
    let (pod, _) = injected(&value, SidecarMode::Native);
    let resources = sidecar_of(&pod).resources.as_ref().unwrap();
    assert_eq!(
        resources.requests, resources.limits,
        "requests = limits keeps the QoS class"
    );
    // A Burstable pod keeps the sidecar's small requests.
    let (pod, _) = injected(&deployment_pod(), SidecarMode::Native);
    let resources = sidecar_of(&pod).resources.as_ref().unwrap();
    assert_ne!(resources.requests, resources.limits);
}

#[test]
fn defect_12_pod_level_resources_must_hold_the_sidecar() {
    let mut value = deployment_pod();
    value["spec"]["containers"][0]["resources"] = json!({ "requests": { "cpu": "500m" } });
    value["spec"]["resources"] = json!({ "requests": { "cpu": "500m", "memory": "1Gi" } });
    let message = denial(&value);
    assert!(
        message.contains("spec.resources.requests.cpu is 500m; its containers request 500m and Tessera's sidecar 5m more: raise the pod-level request to at least 505m"),
        "{message}"
    );
    // The pod's own native sidecar counts against the budget too.
    value["spec"]["initContainers"] = json!([{ "name": "proxy", "image": "registry.example/proxy:1",
        "restartPolicy": "Always", "resources": { "requests": { "cpu": "498m" } } }]);
    value["spec"]["resources"]["requests"]["cpu"] = json!("1");
    assert!(
        denial(&value).contains("its containers request 998m"),
        "{}",
        denial(&value)
    );
    value["spec"]["initContainers"][0]["resources"]["requests"]["cpu"] = json!("100m");
    injected(&value, SidecarMode::Native);
    value["spec"]["resources"]["limits"] = json!({ "memory": "16Mi" });
    assert!(denial(&value).contains("below the sidecar's limit 32Mi"));
}

#[test]
fn defect_12_refusals_that_help() {
    // Windows with hostNetwork: told about Windows, not DNS.
    let mut windows = deployment_pod();
    windows["spec"]["nodeSelector"] = json!({ "kubernetes.io/os": "windows" });
    windows["spec"]["hostNetwork"] = json!(true);
    assert!(
        denial(&windows).contains("Windows pods"),
        "{}",
        denial(&windows)
    );
    // An unquoted template gets the fix, not a raw YAML error.
    let unquoted = with_annotation(
        deployment_pod(),
        "tessera.dev/templates.orders-db",
        "dsn: {{ password }}",
    );
    assert!(
        denial(&unquoted).contains("must be quoted"),
        "{}",
        denial(&unquoted)
    );
    // A long process name is told the name the kernel shows.
    let mut long = with_annotation(deployment_pod(), annotations::RELOAD_SIGNAL, "HUP");
    long = with_annotation(
        long,
        annotations::RELOAD_PROCESS,
        "prometheus-config-reloader",
    );
    long["spec"]["securityContext"]["runAsUser"] = json!(1000);
    assert!(
        denial(&long).contains("write what `ps` shows: `prometheus-conf`"),
        "{}",
        denial(&long)
    );
    // Mixed users: the containers are named.
    let mut mixed = with_annotation(deployment_pod(), annotations::RELOAD_SIGNAL, "HUP");
    mixed = with_annotation(mixed, annotations::RELOAD_PROCESS, "orders");
    mixed["spec"]["containers"][0]["securityContext"] = json!({ "runAsUser": 1000 });
    mixed["spec"]["containers"].as_array_mut().unwrap().push(
        json!({ "name": "cache", "image": "redis:7", "securityContext": { "runAsUser": 999 } }),
    );
    assert!(
        denial(&mixed).contains("`app` as 1000, `cache` as 999"),
        "{}",
        denial(&mixed)
    );
    // Env mode says what it ignores; dnsPolicy None gets a warning.
    let mut env = with_annotation(deployment_pod(), annotations::MODE, "env");
    env = with_annotation(env, annotations::MOUNT_PATH, "/etc/creds");
    env["spec"]["containers"][0]["command"] = json!(["/bin/orders"]);
    let (_, record) = injected(&env, SidecarMode::Native);
    assert!(
        record
            .warnings
            .iter()
            .any(|w| w.contains("tessera.dev/mount-path is ignored"))
    );
    let mut none = deployment_pod();
    none["spec"]["dnsPolicy"] = json!("None");
    none["spec"]["dnsConfig"] = json!({ "nameservers": ["10.96.0.10"] });
    let (_, record) = injected(&none, SidecarMode::Native);
    assert!(
        record
            .warnings
            .iter()
            .any(|w| w.contains("dnsPolicy: None"))
    );
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
