//! What injection adds to a pod: the sidecar (native or classic), its volume
//! and mounts, Jobs, `once` mode, the mount path; a second pass changes nothing.

use super::*;

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
