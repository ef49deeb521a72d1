//! Real-world pod shapes (from public charts and the Kubernetes docs) through
//! a real kube-apiserver that calls the broker's webhook: each is created in
//! an opted-in namespace and, as a baseline, in one that is not; the stored
//! injected pod must pass the API server's own validation and equal the
//! stored baseline plus exactly Tessera's additions.

use serde_json::{Value, json};
use tessera_tests::{Cluster, Env, EnvOptions};

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: config
    subjects: [{ namespace: shapes, serviceAccount: app }, { namespace: baseline, serviceAccount: app }]
    source: { kv2: { mount: secret, path: shop/config, keys: [mode] } }
  - name: db
    subjects: [{ namespace: shapes, serviceAccount: app }, { namespace: baseline, serviceAccount: app }]
    source: { database: { mount: database, role: orders } }
";

fn container(name: &str) -> Value {
    json!({ "name": name, "image": format!("registry.example/{name}:1"),
            "command": ["/bin/app"], "args": ["--serve"] })
}

/// `(what, annotations, spec)`: the shapes.
fn shapes() -> Vec<(&'static str, Value, Value)> {
    let files = json!({ "tessera.dev/inject": "true", "tessera.dev/bindings": "config,db" });
    let with = |extra: Value| {
        let mut all = files.clone();
        for (k, v) in extra.as_object().unwrap() {
            all[k] = v.clone();
        }
        all
    };
    vec![
        (
            "nginx Deployment",
            files.clone(),
            json!({ "containers": [
            { "name": "nginx", "image": "nginx:1.27", "ports": [{ "containerPort": 80 }] }] }),
        ),
        (
            "init container running migrations",
            files.clone(),
            json!({
            "initContainers": [container("migrate")], "containers": [container("api")] }),
        ),
        (
            "an existing native sidecar (service mesh)",
            files.clone(),
            json!({
            "initContainers": [{ "name": "proxy", "image": "registry.example/proxy:1", "restartPolicy": "Always" }],
            "containers": [container("api")] }),
        ),
        (
            "hostNetwork with ClusterFirstWithHostNet",
            files.clone(),
            json!({
            "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": [container("agent")] }),
        ),
        (
            "several containers with different users",
            files.clone(),
            json!({
            "securityContext": { "fsGroup": 3000 },
            "containers": [
                { "name": "a", "image": "registry.example/a:1", "securityContext": { "runAsUser": 1000 } },
                { "name": "b", "image": "registry.example/b:1", "securityContext": { "runAsUser": 2000 } }] }),
        ),
        (
            "StatefulSet pod with a claim",
            files.clone(),
            json!({
            "hostname": "db-0", "subdomain": "db",
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": "data-db-0" } }],
            "containers": [{ "name": "db", "image": "postgres:17",
                             "volumeMounts": [{ "name": "data", "mountPath": "/var/lib/postgresql/data" }] }] }),
        ),
        (
            "Job pod",
            files.clone(),
            json!({ "restartPolicy": "Never", "containers": [container("report")] }),
        ),
        (
            "CronJob pod",
            files.clone(),
            json!({ "restartPolicy": "OnFailure", "containers": [container("backup")] }),
        ),
        (
            "ConfigMap and Secret volumes",
            files.clone(),
            json!({
            "volumes": [{ "name": "cfg", "configMap": { "name": "app-config" } },
                        { "name": "tls", "secret": { "secretName": "app-tls" } }],
            "containers": [{ "name": "app", "image": "registry.example/app:1", "volumeMounts": [
                { "name": "cfg", "mountPath": "/etc/app" }, { "name": "tls", "mountPath": "/etc/tls", "readOnly": true }] }] }),
        ),
        (
            "its own projected token (another Vault client)",
            files.clone(),
            json!({
            "volumes": [{ "name": "vault-token", "projected": { "sources": [
                { "serviceAccountToken": { "audience": "vault", "expirationSeconds": 3600, "path": "token" } }] } }],
            "containers": [{ "name": "app", "image": "registry.example/app:1",
                             "volumeMounts": [{ "name": "vault-token", "mountPath": "/var/run/secrets/vault" }] }] }),
        ),
        (
            "Guaranteed resources",
            files.clone(),
            json!({ "containers": [{ "name": "app", "image": "registry.example/app:1",
            "resources": { "requests": { "cpu": "500m", "memory": "256Mi" }, "limits": { "cpu": "500m", "memory": "256Mi" } } }] }),
        ),
        (
            "pod-level resources (Kubernetes 1.34+)",
            files.clone(),
            json!({
                "resources": { "requests": { "cpu": "1", "memory": "512Mi" }, "limits": { "cpu": "2", "memory": "1Gi" } },
                "containers": [{ "name": "app", "image": "registry.example/app:1",
                                 "resources": { "requests": { "cpu": "500m", "memory": "256Mi" } } }] }),
        ),
        (
            "probes",
            files.clone(),
            json!({ "containers": [{ "name": "web", "image": "registry.example/web:1",
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": 8080 } },
            "readinessProbe": { "tcpSocket": { "port": 8080 }, "periodSeconds": 5 } }] }),
        ),
        (
            "restricted Pod Security",
            files.clone(),
            json!({
            "securityContext": { "runAsNonRoot": true, "runAsUser": 1001, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{ "name": "app", "image": "registry.example/app:1", "securityContext": {
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } } }] }),
        ),
        (
            "envFrom a ConfigMap",
            files.clone(),
            json!({ "containers": [{ "name": "app", "image": "registry.example/app:1",
            "envFrom": [{ "configMapRef": { "name": "app-env" } }], "env": [{ "name": "LOG_LEVEL", "value": "info" }] }] }),
        ),
        (
            "scheduling constraints",
            files.clone(),
            json!({
            "nodeSelector": { "kubernetes.io/os": "linux" },
            "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "batch", "effect": "NoSchedule" }],
            "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{ "weight": 100,
                "podAffinityTerm": { "topologyKey": "kubernetes.io/hostname", "labelSelector": { "matchLabels": { "app": "x" } } } }] } },
            "containers": [container("app")] }),
        ),
        (
            "emptyDir with a subPath mount",
            files.clone(),
            json!({
            "volumes": [{ "name": "scratch", "emptyDir": {} }],
            "containers": [{ "name": "app", "image": "registry.example/app:1",
                             "volumeMounts": [{ "name": "scratch", "mountPath": "/tmp/cache", "subPath": "cache" }] }] }),
        ),
        (
            "env mode",
            with(json!({ "tessera.dev/mode": "env" })),
            json!({ "containers": [container("app")] }),
        ),
        (
            "api-client only",
            json!({ "tessera.dev/api-client": "true" }),
            json!({ "containers": [container("app")] }),
        ),
        (
            "a mount path of its own",
            with(json!({ "tessera.dev/mount-path": "/etc/creds" })),
            json!({ "containers": [container("app")] }),
        ),
        (
            "renamed files",
            with(json!({ "tessera.dev/files.db": "password=db-password" })),
            json!({ "containers": [container("app")] }),
        ),
        (
            "imagePullSecrets and a priority of its own",
            files.clone(),
            json!({
            "imagePullSecrets": [{ "name": "registry" }], "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 60, "containers": [container("app")] }),
        ),
        (
            "reload by signal in a shared process namespace",
            with(json!({
            "tessera.dev/reload-signal": "HUP", "tessera.dev/reload-process": "app" })),
            json!({ "securityContext": { "runAsUser": 1000 }, "shareProcessNamespace": true,
                    "containers": [container("app")] }),
        ),
    ]
}

/// The stored pod, or kubectl's refusal.
fn create(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    annotations: &Value,
    spec: &Value,
) -> Result<Value, String> {
    let mut spec = spec.clone();
    spec["serviceAccountName"] = json!("app");
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": "x" }, "annotations": annotations },
        "spec": spec,
    });
    let output = cluster.with_stdin(&["create", "-f", "-", "-o", "json"], &pod.to_string());
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn tessera_named(item: &Value) -> bool {
    item["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("tessera-") || n.starts_with("TESSERA_"))
}

/// Removes Tessera's items from the list `field` of `object`, and the list
/// when nothing else is in it.
fn drop_tessera_items(object: &mut Value, field: &str) {
    let Some(items) = object.get_mut(field).and_then(Value::as_array_mut) else {
        return;
    };
    items.retain(|i| !tessera_named(i));
    if items.is_empty() {
        object.as_object_mut().unwrap().remove(field);
    }
}

/// The injected pod with Tessera's additions taken out, and the parts the
/// API server sets per object (names, times, UIDs) dropped from both.
fn without_additions(pod: &Value, baseline: bool) -> Value {
    let mut pod = pod.clone();
    let annotations = pod["metadata"]["annotations"].clone();
    pod["metadata"] = json!({ "labels": pod["metadata"]["labels"], "annotations": annotations });
    if let Some(map) = pod["metadata"]["annotations"].as_object_mut() {
        map.retain(|k, _| {
            !matches!(
                k.as_str(),
                "tessera.dev/status" | "tessera.dev/injected" | "tessera.dev/broker-ca"
            )
        });
    }
    pod.as_object_mut().unwrap().remove("status");
    let spec = &mut pod["spec"];
    for list in ["initContainers", "volumes"] {
        drop_tessera_items(spec, list);
    }
    for list in ["containers", "initContainers"] {
        let containers = spec.get_mut(list).and_then(Value::as_array_mut);
        for container in containers.into_iter().flatten() {
            for field in ["volumeMounts", "env"] {
                drop_tessera_items(container, field);
            }
            // Env mode wraps the command: `<bin>/tessera-sidecar exec -- <command>`.
            if !baseline
                && let Some(words) = container["command"].as_array().cloned()
                && let Some(at) = words.iter().position(|w| w == "--")
                && words[0]
                    .as_str()
                    .is_some_and(|w| w.ends_with("/tessera-sidecar"))
            {
                container["command"] = json!(words[at + 1..]);
            }
        }
    }
    // The group the files are shared with, when the pod named none.
    if !baseline
        && let Some(map) = spec
            .get_mut("securityContext")
            .and_then(Value::as_object_mut)
        && map.get("fsGroup") == Some(&json!(65532))
    {
        map.remove("fsGroup");
        map.remove("fsGroupChangePolicy");
    }
    // The ServiceAccount admission plugin names its volume with a random suffix.
    let text = pod.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("kube-api-access-") {
        let end = at + "kube-api-access-".len();
        out.push_str(&rest[..end]);
        rest = rest[end..].trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    }
    out.push_str(rest);
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn real_world_pod_shapes_are_stored_as_submitted_plus_tessera_additions() {
    let env = Env::start_with(
        POLICY,
        EnvOptions {
            kubernetes: true,
            ..EnvOptions::default()
        },
    )
    .await;
    let cluster = env.kube.as_ref().unwrap();
    env.register_webhook();
    for namespace in ["shapes", "baseline"] {
        cluster.service_account(namespace, "app");
    }
    cluster.run(&[
        "label",
        "namespace",
        "shapes",
        "tessera.dev/injection=enabled",
    ]);

    let shapes = shapes();
    assert!(shapes.len() >= 20);
    let mut problems = Vec::new();
    for (index, (what, annotations, spec)) in shapes.iter().enumerate() {
        let name = format!("shape-{index}");
        let baseline = create(cluster, "baseline", &name, annotations, spec)
            .unwrap_or_else(|e| panic!("{what}: the baseline is refused: {e}"));
        let injected = match create(cluster, "shapes", &name, annotations, spec) {
            Ok(pod) => pod,
            Err(error) => {
                problems.push(format!("{what}: refused: {error}"));
                continue;
            }
        };
        if injected["metadata"]["annotations"]["tessera.dev/status"] != "injected" {
            problems.push(format!("{what}: not injected"));
            continue;
        }
        let (left, right) = (
            without_additions(&injected, false),
            without_additions(&baseline, true),
        );
        if left != right {
            problems.push(format!(
                "{what}: the stored pod differs beyond Tessera's additions:\ninjected: {left}\nbaseline: {right}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
