//! API-client pods and env mode: the token, CA and address; reload
//! annotations; wrapped commands and what cannot be wrapped.

use super::*;

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
