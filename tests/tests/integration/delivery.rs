//! Credentials go from OpenBao through the broker into the pod's files.

use std::{fs, time::Duration};

use serde_json::json;
use tessera_proto::v1::WhoAmIRequest;
use tessera_tests::{
    BrokerLogin, Env, EnvOptions, random_string, simple_policy, vault_requests, wait_for,
    with_token,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn files_equal_the_kv_secret_and_follow_updates_through_watch() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let (user, pass1) = (random_string(12), random_string(24));
    env.bao
        .put(
            "shop/orders",
            &json!({ "username": user, "password": pass1 }),
        )
        .await;

    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let mut sidecar = env.sidecar_run(&token, out.path(), &["app"]);
    let dir = out.path().join("app");
    wait_for(Duration::from_secs(20), "first delivery", || {
        fs::read_to_string(dir.join("password"))
            .ok()
            .filter(|p| *p == pass1)
    })
    .await;
    assert_eq!(fs::read_to_string(dir.join("username")).unwrap(), user);

    let pass2 = random_string(24);
    env.bao
        .put(
            "shop/orders",
            &json!({ "username": user, "password": pass2 }),
        )
        .await;
    wait_for(
        Duration::from_secs(20),
        "the update to reach the files",
        || {
            fs::read_to_string(dir.join("password"))
                .ok()
                .filter(|p| *p == pass2)
        },
    )
    .await;
    assert_eq!(fs::read_to_string(dir.join("username")).unwrap(), user);
    assert!(!sidecar.exited(), "the sidecar keeps running");
    assert_eq!(
        sidecar.terminate(),
        Some(0),
        "SIGTERM stops the sidecar cleanly"
    );
    assert_eq!(
        fs::read_to_string(dir.join("password")).unwrap(),
        pass2,
        "stopping leaves the delivered files in place"
    );
}

/// A secret written after the broker last checked it (it was not there
/// yet) is read from Vault for the first pod that asks; the pods after it
/// are served that read from memory, not each with a Vault read of its
/// own until the next check (regression: each paid a Vault read, and a new
/// pod's start with it).
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_read_for_one_pod_serves_the_next_pods_from_memory() {
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/late"),
        EnvOptions {
            poll: "1h",
            ..EnvOptions::default()
        },
    )
    .await;
    let count = async |operation: &str| vault_requests(&env.admin_url, operation).await;
    // The broker's first check found nothing; the next is an hour away.
    for _ in 0..200 {
        if count("ReadSecretMetadataRequest").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count("ReadSecretMetadataRequest").await, 1.0, "one check");
    let password = random_string(24);
    env.bao
        .put("shop/late", &json!({ "password": password }))
        .await;
    for pod in ["a", "b", "c"] {
        let mut spec = tessera_broker::dev::TokenSpec::new("shop", "orders");
        spec.pod = Some(pod.to_owned());
        let response = env
            .fetch(&env.signer.mint(&spec), &["app"])
            .await
            .expect("the secret is delivered");
        let delivered = &response.credentials[0].fields["password"];
        assert_eq!(delivered, password.as_bytes(), "pod {pod} gets the secret");
    }
    assert_eq!(
        count("ReadSecretRequest").await,
        1.0,
        "one Vault read serves the three pods"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn once_writes_and_exits_zero() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let pass = random_string(24);
    env.bao
        .put("shop/orders", &json!({ "password": pass }))
        .await;
    let out = env.tmpfs_out();
    let output = env.sidecar_once(&env.token_file("shop", "orders"), out.path(), &["app"], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        fs::read_to_string(out.path().join("app/password")).unwrap(),
        pass
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chosen_keys_only_are_delivered() {
    let policy =
        simple_policy("app", "shop", "orders", "shop/orders") + "        keys: [username]\n";
    let env = Env::start(&policy).await;
    env.bao
        .put("shop/orders", &json!({ "username": "u", "password": "p" }))
        .await;
    let response = env
        .fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap();
    let credential = &response.credentials[0];
    assert_eq!(credential.fields.keys().collect::<Vec<_>>(), ["username"]);
    assert_eq!(credential.version, "1");
    assert!(credential.issued_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn who_am_i_reports_the_verified_identity_and_its_grants() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let response = env
        .client()
        .await
        .who_am_i(with_token(&env.token("shop", "orders"), WhoAmIRequest {}))
        .await
        .unwrap()
        .into_inner();
    let identity = response.identity.unwrap();
    assert_eq!(
        (
            identity.namespace.as_str(),
            identity.service_account.as_str()
        ),
        ("shop", "orders")
    );
    assert_eq!(identity.pod_name, "orders-0");
    assert_eq!(identity.node_name, "dev-node");
    assert!(!identity.pod_uid.is_empty());
    assert_eq!(response.bindings, ["app"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identity_the_policy_does_not_name_is_denied_and_gets_no_files() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;

    let status = env
        .fetch(&env.token("shop", "billing"), &["app"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let out = env.tmpfs_out();
    let output = env.sidecar_once(
        &env.token_file("shop", "billing"),
        out.path(),
        &["app"],
        &[],
    );
    assert_eq!(output.status.code(), Some(77), "EX_NOPERM for a denial");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not granted"), "{stderr}");
    assert_eq!(
        fs::read_dir(out.path()).unwrap().count(),
        0,
        "no files written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_granted_and_a_denied_binding_together_deliver_nothing() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    let status = env
        .fetch(&env.token("shop", "orders"), &["app", "other"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Starts a broker logging in to OpenBao with `login` and fetches through it.
async fn fetch_after_login(login: BrokerLogin, method: &str) {
    let options = EnvOptions {
        login,
        ..EnvOptions::default()
    };
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": method }))
        .await;
    let response = env
        .fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap();
    assert_eq!(
        response.credentials[0].fields["password"],
        method.as_bytes()
    );
    assert!(
        env.broker
            .output()
            .contains(&format!("logged in to Vault with {method}"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_logs_in_with_approle() {
    fetch_after_login(BrokerLogin::AppRole, "AppRole").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_logs_in_with_its_own_service_account_token() {
    fetch_after_login(BrokerLogin::Jwt, "JWT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_vault_token_file_is_picked_up() {
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: later\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/later } }\n";
    let env = Env::start(&policy).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    let env = &env;
    let fetch = |binding: &'static str| async move {
        env.fetch(&env.token("shop", "orders"), &[binding]).await
    };
    fetch("app").await.unwrap();

    // Rotate: write a new token to the file, then revoke the old one. The
    // next version can only be read with the new token.
    let token_path = env.dir.path().join("vault-token");
    let old = fs::read_to_string(&token_path).unwrap();
    let new = env.bao.broker_token();
    fs::write(&token_path, &new).unwrap();
    env.bao.cli(&["token", "revoke", &old]);
    env.bao
        .put("shop/orders", &json!({ "password": "p2" }))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let answer = fetch("app")
            .await
            .expect("the broker re-read its token file");
        if answer.credentials[0].fields["password"] == b"p2" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "version 2 never read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An unusable token in the file fails closed with a precise code, for
    // what the replica does not already hold.
    fs::write(&token_path, "not-a-token").unwrap();
    let status = fetch("later").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_reflection_lists_the_broker_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let mut client = ServerReflectionClient::new(env.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tessera.v1.Broker"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // Older clients (grpcio's, older grpcurl) speak v1alpha.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut client =
        alpha::server_reflection_client::ServerReflectionClient::new(env.channel().await);
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha is served")
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1alpha answer: {response:?}");
    };
    assert!(list.service.iter().any(|s| s.name == "tessera.v1.Broker"));
}

/// Version checks of `secret/<path>` in OpenBao's audit log after line `from`.
fn version_checks(env: &Env, path: &str, from: usize) -> usize {
    fs::read_to_string(&env.bao.audit_log)
        .unwrap_or_default()
        .lines()
        .skip(from)
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|entry| {
                entry["type"] == "request"
                    && entry["request"]["path"] == format!("secret/metadata/{path}")
            })
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bindings_refresh_interval_sets_how_often_vault_is_asked() {
    // The broker polls KV every 200 ms here; the security team asks for
    // once an hour on one secret, trading freshness for Vault's load.
    let policy = simple_policy("fast", "shop", "orders", "shop/fast")
        + "  - name: slow\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/slow } }\n    refreshInterval: 1h\n";
    let env = Env::start(&policy).await;
    env.bao.put("shop/fast", &json!({ "v": "1" })).await;
    env.bao.put("shop/slow", &json!({ "v": "1" })).await;
    let out = env.tmpfs_out();
    let _sidecar = env.sidecar_run(
        &env.token_file("shop", "orders"),
        out.path(),
        &["fast", "slow"],
    );
    wait_for(Duration::from_secs(20), "both secrets", || {
        tessera_tests::field(out.path(), "slow", "v").and(tessera_tests::field(
            out.path(),
            "fast",
            "v",
        ))
    })
    .await;
    // Until its first good check the slow secret is retried at the default
    // interval (it was written after the broker started); then hourly.
    let mut settled = false;
    for _ in 0..20 {
        let checked = version_checks(&env, "shop/slow", 0);
        tokio::time::sleep(Duration::from_millis(600)).await;
        if version_checks(&env, "shop/slow", 0) == checked {
            settled = true;
            break;
        }
    }
    assert!(settled, "the slow secret's checks did not settle to hourly");
    let from = fs::read_to_string(&env.bao.audit_log)
        .unwrap_or_default()
        .lines()
        .count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (fast, slow) = (
        version_checks(&env, "shop/fast", from),
        version_checks(&env, "shop/slow", from),
    );
    assert!(fast >= 5, "the default interval polls: {fast}");
    assert_eq!(slow, 0, "refreshInterval 1h: no check within 3 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_with_url_characters_makes_a_dsn_postgresql_accepts() {
    let pg = tessera_tests::Postgres::start();
    let password = format!("p@ss:w/rd%{}?#", random_string(8));
    pg.create_user("orders_app", &password);
    let policy = format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: db
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source:
      kv2: {{ mount: secret, path: shop/db, keys: [username, password] }}
    output:
      templates:
        dsn: "postgresql://{{{{ username | urlencode }}}}:{{{{ password | urlencode }}}}@127.0.0.1:{port}/postgres"
        raw-dsn: "postgresql://{{{{ username }}}}:{{{{ password }}}}@127.0.0.1:{port}/postgres"
        .pgpass: "127.0.0.1:{port}:postgres:{{{{ username | pgpass }}}}:{{{{ password | pgpass }}}}"
"#,
        port = pg.port
    );
    let env = Env::start(&policy).await;
    env.bao
        .put(
            "shop/db",
            &json!({ "username": "orders_app", "password": password }),
        )
        .await;
    let out = env.tmpfs_out();
    let written = env.sidecar_once(&env.token_file("shop", "orders"), out.path(), &["db"], &[]);
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let read = |name: &str| fs::read_to_string(out.path().join("db").join(name)).unwrap();
    assert!(pg.can_connect(&read("dsn")), "the urlencoded DSN logs in");
    // Without the filter, `@`, `/`, `?` and `#` break the URI: the reason for it.
    assert!(!pg.can_connect(&read("raw-dsn")));
    assert!(read(".pgpass").contains("orders_app:p@ss\\:w/rd%"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_own_renames_and_templates_shape_only_what_the_broker_delivered() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put(
            "shop/orders",
            &json!({ "username": "app", "password": "p@ss" }),
        )
        .await;
    let out = env.tmpfs_out();
    let output = r#"{"app": {"files": {"password": "db-password"},
                              "templates": {"dsn": "postgresql://{{ username }}:{{ password | urlencode }}@db/orders"}}}"#;
    let written = env.sidecar_once(
        &env.token_file("shop", "orders"),
        out.path(),
        &["app"],
        &["--pod-output", output],
    );
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let dir = out.path().join("app");
    assert_eq!(fs::read_to_string(dir.join("db-password")).unwrap(), "p@ss");
    assert_eq!(
        fs::read_to_string(dir.join("dsn")).unwrap(),
        "postgresql://app:p%40ss@db/orders"
    );
    assert!(!dir.join("password").exists(), "renamed, not copied");

    // A template that reaches for a field the binding does not deliver
    // writes nothing new and says why.
    let other = env.tmpfs_out();
    let wider = env.sidecar_once(
        &env.token_file("shop", "orders"),
        other.path(),
        &["app"],
        &[
            "--pod-output",
            r#"{"app": {"templates": {"x": "{{ vault_token }}"}}}"#,
        ],
    );
    assert!(!wider.status.success());
    let stderr = String::from_utf8_lossy(&wider.stderr);
    assert!(
        stderr.contains("needs vault_token, which the broker did not deliver"),
        "{stderr}"
    );
    assert!(!stderr.contains("p@ss"));
}
