//! The admission webhook over HTTPS, as the API server calls it, and the
//! injected sidecar run exactly as the pod spec says.

use std::{fs, process::Command};

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use tessera_tests::{Env, EnvOptions, binary, https_post, random_string, simple_policy};

fn review(pod: &Value) -> String {
    tessera_tests::admission_review(pod, "system:serviceaccount:kube-system:job-controller")
}

fn job_pod(bindings: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "report-",
            "labels": { "job-name": "report" },
            "annotations": { "tessera.dev/inject": "true", "tessera.dev/bindings": bindings }
        },
        "spec": {
            "serviceAccountName": "orders",
            "restartPolicy": "Never",
            "securityContext": { "fsGroup": 2000 },
            "containers": [{ "name": "report", "image": "registry.example/report:2" }]
        }
    })
}

async fn admit(env: &Env, pod: &Value) -> Value {
    let ca = env.dir.path().join("dev/ca.pem");
    let (status, body) = https_post(&env.webhook_url, &ca, &review(pod)).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn patched(pod: &Value, response: &Value) -> Pod {
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    serde_json::from_value(pod).unwrap()
}

/// Runs `container` as the kubelet would: its args and env, with the token
/// and the volume at local paths.
fn run_like_kubelet(
    container: &Container,
    args: &[String],
    token: &str,
    out: &str,
) -> std::process::Output {
    let mut command = Command::new(binary("tessera-sidecar"));
    command.args(args).env_clear().env("NO_COLOR", "1");
    for var in container.env.iter().flatten() {
        let value = match var.name.as_str() {
            "TESSERA_TOKEN_FILE" => token.to_owned(),
            "TESSERA_OUT" => out.to_owned(),
            // The test user is not in group 2000; the group mode has its own tests.
            "TESSERA_GROUP" => continue,
            _ => var.value.clone().unwrap_or_default(),
        };
        command.env(&var.name, value);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_sidecar_runs_as_specified_and_its_probe_passes() {
    let env = Env::start(&simple_policy("orders-db", "shop", "orders", "shop/orders")).await;
    let password = random_string(24);
    env.bao
        .put("shop/orders", &json!({ "password": password }))
        .await;

    let pod = job_pod("orders-db");
    let answer = admit(&env, &pod).await;
    let response = &answer["response"];
    assert_eq!(response["uid"], "0d5b8c71-3c55-4a1c-9d5e-b1b2f6a4c001");
    assert_eq!(response["allowed"], true, "{answer}");
    let pod = patched(&pod, response);
    let spec = pod.spec.as_ref().unwrap();
    // The test broker uses classic mode: a Job gets the init container only.
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, "tessera-init");
    assert_eq!(spec.containers.len(), 1);

    // The init container, run with exactly its env (CA as PEM, bindings,
    // broker address), writes the files the app then reads.
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let args = init.args.clone().unwrap();
    let ran = run_like_kubelet(
        init,
        &args,
        token.to_str().unwrap(),
        out.path().to_str().unwrap(),
    );
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(
        fs::read_to_string(out.path().join("orders-db/password")).unwrap(),
        password
    );

    // The native sidecar's startup probe command, with the same env, passes
    // once the files are there and fails before.
    let check = vec!["check".to_owned()];
    let passed = run_like_kubelet(init, &check, "-", out.path().to_str().unwrap());
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let empty = env.tmpfs_out();
    let failed = run_like_kubelet(init, &check, "-", empty.path().to_str().unwrap());
    assert!(!failed.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn refusal_reaches_the_pod_creator_with_the_binding_named() {
    let env = Env::start(&simple_policy("orders-db", "shop", "orders", "shop/orders")).await;
    let answer = admit(&env, &job_pod("orders-db,payments")).await;
    let response = &answer["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    assert_eq!(
        response["status"]["message"],
        "tessera: binding `payments` not granted to service account shop/orders (fix tessera.dev/bindings, or ask the policy owners to grant it)"
    );

    let (status, body) =
        https_post(&env.webhook_url, &env.dir.path().join("dev/ca.pem"), "{").await;
    assert_eq!(status, 400);
    assert!(body.contains("not an AdmissionReview"), "{body}");

    // Another apiVersion is refused, not answered as if it were v1.
    let old_version =
        review(&job_pod("orders-db")).replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1");
    let (status, body) = https_post(
        &env.webhook_url,
        &env.dir.path().join("dev/ca.pem"),
        &old_version,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("v1beta1` is not supported"), "{body}");

    let (_, metrics) = tessera_tests::http_get(&format!("{}/metrics", env.admin_url)).await;
    assert!(
        metrics.contains(r#"tessera_admission_reviews_total{decision="denied"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_mode_asks_the_api_server_and_picks_native_sidecars() {
    let env = Env::start_with(
        &simple_policy("orders-db", "shop", "orders", "shop/orders"),
        EnvOptions {
            kubernetes: true,
            ..EnvOptions::default()
        },
    )
    .await;
    let answer = admit(&env, &job_pod("orders-db")).await;
    let pod = patched(&job_pod("orders-db"), &answer["response"]);
    let init = &pod.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(init.name, "tessera-sidecar");
    assert_eq!(init.restart_policy.as_deref(), Some("Always"));
    assert!(init.startup_probe.is_some());
    let log = env.broker.output();
    assert!(
        log.contains("webhook.sidecar.mode auto resolved") && log.contains("v1.37"),
        "the broker asked the real API server's version: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_client_pod_gets_what_it_needs_to_call_the_broker_itself() {
    let env = Env::start(&simple_policy("orders-db", "shop", "orders", "shop/orders")).await;
    let password = random_string(24);
    env.bao
        .put("shop/orders", &json!({ "password": password }))
        .await;
    let mut pod = job_pod("orders-db");
    pod["metadata"]["annotations"] = json!({ "tessera.dev/api-client": "true" });
    let response = admit(&env, &pod).await;
    assert_eq!(response["response"]["allowed"], true, "{response}");
    let mutated = patched(&pod, &response["response"]);
    let app = &mutated.spec.as_ref().unwrap().containers[0];
    let var = |name: &str| {
        app.env
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.value.clone())
            .unwrap_or_else(|| panic!("{name} set"))
    };
    // As the kubelet would: the projected files at local paths (the CA from
    // the annotation the downward API projects, the token minted for the pod).
    let ca = env.dir.path().join("api-ca.crt");
    fs::write(
        &ca,
        &mutated.metadata.annotations.as_ref().unwrap()["tessera.dev/broker-ca"],
    )
    .unwrap();
    assert!(var("TESSERA_CA_FILE").ends_with("/ca.crt"));
    assert!(var("TESSERA_TOKEN_FILE").ends_with("/token"));
    let client = tessera_client::Client::new(tessera_client::BrokerTarget {
        uri: var("TESSERA_BROKER"),
        ca: tessera_client::TrustAnchors::File(ca),
        server_name: None,
        token_file: env.token_file("shop", "orders"),
        client_identity: None,
        connect_timeout: tessera_client::DEFAULT_CONNECT_TIMEOUT,
    });
    let set = client.fetch(&["orders-db"]).await.unwrap();
    assert_eq!(
        set.get("orders-db").unwrap().text("password"),
        Some(password.as_str())
    );
}
