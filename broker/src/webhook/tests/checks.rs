//! Admission checks against the pod spec and the policy: malformed
//! annotations, bindings not granted, file access, image users, Windows,
//! DNS, collisions, resources, and the defects found in earlier rounds.

use super::*;

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
