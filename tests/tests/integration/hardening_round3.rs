//! Hardening, third round: what a hostile tester broke in the webhook, the
//! client crate and the listener, each against the real broker (AdmissionReviews
//! over HTTPS, TLS connections to the gRPC port). One test per defect, named
//! after it; bounds are asserted, the figures are in the closing notes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tessera_client::{BrokerTarget, Client, DEFAULT_CONNECT_TIMEOUT, Error, TrustAnchors};
use tessera_tests::{ConnectionsConfig, Env, https_post, simple_policy};

fn review(pod: &Value) -> String {
    tessera_tests::admission_review(pod, "hostile")
}

/// A pod of shop/orders with `annotations` besides the injection request.
fn pod(bindings: &str, annotations: &[(String, String)]) -> Value {
    let mut all = json!({ "tessera.dev/inject": "true", "tessera.dev/bindings": bindings });
    for (key, value) in annotations {
        all[key] = json!(value);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "hostile", "annotations": all },
        "spec": {
            "serviceAccountName": "orders",
            "securityContext": { "fsGroup": 2000 },
            "containers": [{ "name": "app", "image": "registry.example/app:1" }]
        }
    })
}

/// The webhook's answer: allowed, and the message of a refusal.
async fn admit(env: &Env, pod: &Value) -> (bool, String) {
    let ca = env.dir.path().join("dev/ca.pem");
    let (status, body) = https_post(&env.webhook_url, &ca, &review(pod)).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let response = &answer["response"];
    (
        response["allowed"] == true,
        response["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The broker's peak resident memory so far, in KiB (`VmHWM`).
fn peak_rss_kib(env: &Env) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", env.broker.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

/// One anchor and `aliases` aliases of it: `size` bytes that expand to
/// `size * aliases`.
fn yaml_bomb(size: usize, aliases: usize) -> String {
    let mut text = format!("f0: &a \"{}\"\n", "x".repeat(size));
    for i in 1..=aliases {
        text.push_str(&format!("f{i}: *a\n"));
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_1_a_yaml_bomb_in_one_annotation_is_refused_before_it_expands() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    let before = peak_rss_kib(&env);
    // The tester's bomb: ~250 KB, under the API server's 256 KiB annotation limit.
    let big = pod(
        "app",
        &[(
            "tessera.dev/templates.app".to_owned(),
            yaml_bomb(240_000, 100),
        )],
    );
    let (allowed, message) = admit(&env, &big).await;
    assert!(!allowed);
    assert!(
        message.contains("annotation tessera.dev/templates.app is")
            && message.contains("at most 16384"),
        "{message}"
    );
    // A small one fits the size bound and is refused for its aliases.
    let small = pod(
        "app",
        &[(
            "tessera.dev/templates.app".to_owned(),
            yaml_bomb(10_000, 100),
        )],
    );
    let (allowed, message) = admit(&env, &small).await;
    assert!(!allowed);
    assert!(message.contains("aliases"), "{message}");
    let grown = peak_rss_kib(&env).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "the broker's peak memory grew {grown} KiB for two refusals"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_2_a_long_bindings_list_is_refused_by_count_and_logged_once() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    let names: Vec<String> = (0..1500).map(|i| format!("b{i}")).collect();
    let lines_before = env.broker.output().lines().count();
    let (allowed, message) = admit(&env, &pod(&names.join(","), &[])).await;
    assert!(!allowed);
    assert!(
        message.contains("1500 bindings listed, at most 64 per pod"),
        "{message}"
    );
    // 60 names, none granted: the refusal, and one line naming those the
    // policy lacks (before: a line per binding).
    let (allowed, message) = admit(&env, &pod(&names[..60].join(","), &[])).await;
    assert!(!allowed && message.contains("`b59`"), "{message}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let output = env.broker.output();
    let new: Vec<&str> = output.lines().skip(lines_before).collect();
    let naming_b7 = new
        .iter()
        .filter(|l| l.contains("b7,") || l.contains("`b7`"))
        .count();
    assert!((1..=2).contains(&naming_b7), "{new:#?}");
    let about_bindings = new.iter().filter(|l| l.contains("not granted")).count();
    assert!(about_bindings <= 2, "{new:#?}");
}

/// A policy granting shop/orders `count` KV bindings `b0`, `b1`, ...
fn many_bindings(count: usize) -> String {
    let mut policy = "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings:\n".to_owned();
    for i in 0..count {
        policy.push_str(&format!(
            "  - name: b{i}\n    subjects: [{{ namespace: shop, serviceAccount: orders }}]\n    source: {{ kv2: {{ mount: secret, path: shop/b{i} }} }}\n"
        ));
    }
    policy
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_1_the_patch_is_bounded_and_the_refusal_says_so() {
    let env = Env::start(&many_bindings(24)).await;
    let names: Vec<String> = (0..24).map(|i| format!("b{i}")).collect();
    // 24 annotations of 15 KB each: every one within its bound, the patch not.
    let templates: Vec<(String, String)> = names
        .iter()
        .map(|b| {
            (
                format!("tessera.dev/templates.{b}"),
                format!("big: \"{}\"\n", "y".repeat(15_000)),
            )
        })
        .collect();
    let (allowed, message) = admit(&env, &pod(&names.join(","), &templates)).await;
    assert!(!allowed);
    assert!(
        message.contains("the injection patch would be") && message.contains("262144"),
        "{message}"
    );
    // A usual pod of the same policy is injected.
    let (allowed, message) = admit(&env, &pod("b0,b1", &[])).await;
    assert!(allowed, "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_11_a_chain_of_base64_filters_is_refused_at_admission() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    let chain = format!("out: \"{{{{ k{} }}}}\"\n", " | base64".repeat(45));
    let (allowed, message) = admit(
        &env,
        &pod("app", &[("tessera.dev/templates.app".to_owned(), chain)]),
    )
    .await;
    assert!(!allowed);
    assert!(message.contains("more than 8 filters"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_8_the_client_crate_never_sends_the_token_in_cleartext() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    // Something listening where a mistyped address points: it must hear nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    for uri in [format!("http://{address}"), format!("HTTP://{address}")] {
        let client = Client::new(BrokerTarget {
            uri: uri.clone(),
            ca: TrustAnchors::File(env.ca_file()),
            server_name: None,
            token_file: env.token_file("shop", "orders"),
            client_identity: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        });
        let error = client.fetch(&["app"]).await.unwrap_err();
        assert!(
            matches!(&error, Error::Setup(_)) && error.to_string().contains("https://"),
            "{uri}: {error}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        listener.accept().is_err(),
        "a connection reached the plain-HTTP address"
    );
}

/// A TLS connection to the broker's gRPC port (ALPN h2) that then waits.
async fn tls_connection(env: &Env) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(env.ca_file()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let address = env.broker_uri.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// Reads until the broker closes the connection; how long that took.
async fn time_to_close(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Duration {
    use tokio::io::AsyncReadExt as _;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open 30 s");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_9_a_connection_that_sends_no_request_loses_its_slot_at_the_deadline() {
    use tokio::io::AsyncWriteExt as _;
    let policy = simple_policy("app", "shop", "orders", "shop/app");
    let mut env = Env::start(&policy).await;
    env.bao.put("shop/app", &json!({ "k": "v" })).await;
    env.edit_config(|config| {
        config.connections = Some(ConnectionsConfig {
            max: None,
            handshake_timeout: Some("2s".to_owned()),
            idle_timeout: Some("120s".to_owned()),
            max_age: None,
        });
    });
    env.restart_broker().await;
    // The handshake, then nothing.
    let mut silent = tls_connection(&env).await;
    let waited = time_to_close(&mut silent).await;
    assert!(
        waited < Duration::from_secs(20),
        "closed after {waited:?}, not at the first-request deadline"
    );
    // The HTTP/2 preface and settings, then nothing: still no request.
    let mut preface_only = tls_connection(&env).await;
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let waited = time_to_close(&mut preface_only).await;
    assert!(waited < Duration::from_secs(20), "closed after {waited:?}");
    // A real client's requests, seconds apart on one connection, are served.
    let client = env.client().await;
    let token = env.token("shop", "orders");
    for _ in 0..2 {
        let mut client = client.clone();
        let request = tessera_proto::v1::FetchRequest {
            bindings: vec!["app".to_owned()],
            ..Default::default()
        };
        client
            .fetch(tessera_tests::with_token(&token, request))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_10_exec_stops_promptly_on_sigterm_before_its_first_credentials() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let token = env.token_file("shop", "orders");
    // A broker address nobody answers on: the wrapper waits, retrying.
    let port = tessera_tests::free_port();
    let mut exec = std::process::Command::new(tessera_tests::binary("tessera-sidecar"));
    exec.args([
        "exec",
        "--broker",
        &format!("https://127.0.0.1:{port}"),
        "--ca-file",
    ])
    .arg(env.ca_file())
    .arg("--token-file")
    .arg(&token)
    .args(["--binding", "app", "--", "sh", "-c", "exit 0"])
    .env("NO_COLOR", "1");
    let mut exec = tessera_tests::Proc::spawn("exec", exec, env.dir.path().join("exec.log"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!exec.exited(), "still waiting for its credentials");
    let started = Instant::now();
    let code = exec.terminate();
    assert_eq!(code, Some(143), "128 + SIGTERM: {}", exec.output());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// An app that logs its start with its password, and takes `drain` to stop.
fn draining_app(log: &std::path::Path, drain: &str) -> String {
    format!(
        r#"echo "start $APP_PASSWORD ${{APP_HOST:-none}}" >> {log}; trap 'echo term >> {log}; sleep {drain}; echo drained >> {log}; exit 0' TERM; while true; do sleep 0.05; done"#,
        log = log.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_6_a_value_the_environment_cannot_hold_keeps_the_app_running() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "one" }))
        .await;
    let log = env.dir.path().join("app.log");
    let mut exec = env.sidecar_exec(
        &env.token_file("shop", "orders"),
        &["app"],
        &["--env-prefix", ""],
        &["sh", "-c", &draining_app(&log, "0")],
    );
    tessera_tests::wait_for(Duration::from_secs(20), "the app", || {
        tessera_tests::lines(&log).first().cloned()
    })
    .await;
    // A rotation to values no environment variable can hold: a NUL byte,
    // and one over the kernel's per-string limit.
    for (before, bad) in [json!("two\u{0}three"), json!("x".repeat(200 * 1024))]
        .into_iter()
        .enumerate()
    {
        env.bao
            .put("shop/orders", &json!({ "password": bad }))
            .await;
        tessera_tests::wait_for(Duration::from_secs(20), "the refusal in the log", || {
            (exec
                .output()
                .matches("binding `app` is not passed to the app")
                .count()
                > before)
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!exec.exited(), "{}", exec.output());
    assert_eq!(
        tessera_tests::lines(&log),
        ["start one none"],
        "the app was never stopped: {}",
        exec.output()
    );
    // A good value again: one restart with it.
    env.bao
        .put("shop/orders", &json!({ "password": "four" }))
        .await;
    tessera_tests::wait_for(Duration::from_secs(20), "the restart", || {
        tessera_tests::lines(&log)
            .contains(&"start four none".to_owned())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_7_the_pods_own_variables_win_and_case_collisions_refuse_one_binding() {
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: other\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/other } }\n";
    let env = Env::start(&policy).await;
    env.bao
        .put(
            "shop/orders",
            &json!({ "password": "pw", "host": "evil.example" }),
        )
        .await;
    env.bao
        .put("shop/other", &json!({ "password": "a", "PASSWORD": "b" }))
        .await;
    let log = env.dir.path().join("app.log");
    let mut command = std::process::Command::new(tessera_tests::binary("tessera-sidecar"));
    command
        .args(["exec", "--broker", &env.broker_uri, "--ca-file"])
        .arg(env.ca_file())
        .arg("--token-file")
        .arg(env.token_file("shop", "orders"))
        .args(["--binding", "app,other", "--", "sh", "-c"])
        .arg(format!(
            r#"echo "host=$APP_HOST pw=$APP_PASSWORD other=${{OTHER_PASSWORD:-unset}}" >> {}; sleep 30"#,
            log.display()
        ))
        // What the container's spec sets.
        .env("APP_HOST", "db.shop.svc")
        .env("NO_COLOR", "1");
    let exec = tessera_tests::Proc::spawn("exec", command, env.dir.path().join("exec.log"));
    let line = tessera_tests::wait_for(Duration::from_secs(20), "the app", || {
        tessera_tests::lines(&log).first().cloned()
    })
    .await;
    assert_eq!(
        line,
        "host=db.shop.svc pw=pw other=unset",
        "{}",
        exec.output()
    );
    let output = exec.output();
    assert!(
        output.contains("APP_HOST is set by the container's spec"),
        "{output}"
    );
    assert!(
        output.contains("binding `other` is not passed to the app: two of its fields make the variable OTHER_PASSWORD"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_11_a_rotation_during_a_graceful_stop_lets_the_app_drain() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "one" }))
        .await;
    let log = env.dir.path().join("app.log");
    let mut exec = env.sidecar_exec(
        &env.token_file("shop", "orders"),
        &["app"],
        &["--env-prefix", "", "--grace", "1s"],
        &["sh", "-c", &draining_app(&log, "3")],
    );
    tessera_tests::wait_for(Duration::from_secs(20), "the app", || {
        tessera_tests::lines(&log).first().cloned()
    })
    .await;
    exec.signal("TERM");
    tessera_tests::wait_for(Duration::from_secs(5), "the drain to begin", || {
        tessera_tests::lines(&log)
            .contains(&"term".to_owned())
            .then_some(())
    })
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": "two" }))
        .await;
    tessera_tests::wait_for(Duration::from_secs(10), "the wrapper to exit", || {
        exec.exited().then_some(())
    })
    .await;
    assert_eq!(
        exec.exit_code(),
        Some(0),
        "drained, not SIGKILLed: {}",
        exec.output()
    );
    assert_eq!(
        tessera_tests::lines(&log),
        ["start one none", "term", "drained"]
    );
}

#[test]
fn defect_11_install_never_follows_a_planted_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let out = dir.path().join("bin");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(".tessera-sidecar.partial")).unwrap();
    let installed = std::process::Command::new(tessera_tests::binary("tessera-sidecar"))
        .arg("install")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert!(out.join("tessera-sidecar").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_5_a_narrowed_database_lease_ends_when_asked_and_is_renewed_not_reminted() {
    use tessera_proto::v1::{FetchRequest, WatchRequest};
    let pg = tessera_tests::Postgres::start();
    // The role's TTL is an hour; the binding's too. The pod asks for 20 s.
    let env = Env::start(&tessera_tests::db_policy("1h", "0.5", "5s")).await;
    env.bao.database_role(&pg, "orders", "1h", "2h");
    let token = env.token("shop", "orders");
    let left = |credential: &tessera_proto::v1::Credential| {
        credential.not_after.unwrap().seconds
            - std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
    };
    let fetched = env
        .client()
        .await
        .fetch(tessera_tests::with_token(
            &token,
            FetchRequest {
                bindings: vec!["db".to_owned()],
                max_ttl_seconds: [("db".to_owned(), 20)].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let credential = &fetched.credentials[0];
    assert!(
        left(credential) <= 20,
        "asked for 20 s, told {} s",
        left(credential)
    );
    // Vault agrees: the lease itself ends within the 20 s.
    let leases = env.bao.leases("database/creds/orders");
    assert_eq!(leases.len(), 1);
    let lookup = env.bao.lease_lookup(&leases[0]).unwrap();
    let ttl = lookup["ttl"].as_u64().unwrap();
    assert!(ttl <= 20, "Vault's lease lives {ttl} s");

    // A stream narrowed the same way is renewed at half its life, keeping
    // the same user, rather than re-minted every renewal.
    let mut stream = env
        .client()
        .await
        .watch(tessera_tests::with_token(
            &token,
            WatchRequest {
                bindings: vec!["db".to_owned()],
                max_ttl_seconds: [("db".to_owned(), 20)].into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().credential.unwrap();
    let user = first.fields["username"].clone();
    let deadline = Instant::now() + Duration::from_secs(35);
    let mut renewals = 0;
    while Instant::now() < deadline {
        let Ok(Ok(Some(update))) =
            tokio::time::timeout(deadline - Instant::now(), stream.message()).await
        else {
            break;
        };
        let credential = update.credential.unwrap();
        // A renewal carries no values (they did not change); a new user would.
        if let Some(username) = credential.fields.get("username") {
            assert_eq!(*username, user, "renewed, not a new user");
        }
        assert!(left(&credential) <= 20);
        renewals += 1;
    }
    assert!(renewals >= 2, "{renewals} renewals in 35 s");
    let users = env.bao.leases("database/creds/orders").len();
    assert!(
        users <= 2,
        "{users} leases: one for the fetch, one for the stream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_11_a_hung_reload_endpoint_does_not_hold_up_delivery() {
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: other\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/other } }\n";
    let env = Env::start(&policy).await;
    env.bao.put("shop/orders", &json!({ "k": "one" })).await;
    env.bao.put("shop/other", &json!({ "k": "one" })).await;
    // An app endpoint that accepts and never answers (the sidecar gives up
    // on it after 10 s).
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in hung.incoming().take(4).flatten() {
            open.push(stream);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let out = env.tmpfs_out();
    let read = |binding: &str| std::fs::read_to_string(out.path().join(binding).join("k")).ok();
    let _run = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["app", "other"],
        &["--notify-url", &format!("http://127.0.0.1:{port}/-/reload")],
    );
    tessera_tests::wait_for(Duration::from_secs(20), "delivery", || {
        (read("app")? == "one" && read("other")? == "one").then_some(())
    })
    .await;
    env.bao.put("shop/orders", &json!({ "k": "two" })).await;
    tessera_tests::wait_for(Duration::from_secs(10), "the first rotation", || {
        (read("app")? == "two").then_some(())
    })
    .await;
    // The hook for `app` hangs; `other`'s change still arrives at once.
    let started = Instant::now();
    env.bao.put("shop/other", &json!({ "k": "two" })).await;
    tessera_tests::wait_for(Duration::from_secs(20), "the second rotation", || {
        (read("other")? == "two").then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "held up {:?} by the hung reload endpoint",
        started.elapsed()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_3_one_unsafe_key_never_costs_the_pods_other_bindings() {
    let pg = tessera_tests::Postgres::start();
    let policy = tessera_tests::db_policy("10m", "0.7", "5s")
        + "  - name: config\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/config } }\n";
    let env = Env::start(&policy).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    // A KV secret with a key that is no safe file name.
    env.bao
        .put("shop/config", &json!({ "mode": "blue", "../escape": "x" }))
        .await;
    let read = |out: &std::path::Path, binding: &str, field: &str| {
        std::fs::read_to_string(out.join(binding).join(field)).ok()
    };

    // A new pod (`once`, an init container): the database binding is
    // written, the refusal is still the answer.
    let first = env.tmpfs_out();
    let once = env.sidecar_once(
        &env.token_file("shop", "orders"),
        first.path(),
        &["config", "db"],
        &[],
    );
    assert!(!once.status.success(), "the refusal is the answer");
    assert!(
        String::from_utf8_lossy(&once.stderr).contains("config"),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    assert!(read(first.path(), "db", "username").is_some(), "db written");

    // A running sidecar: the database binding is served and stays one lease,
    // the refused one is asked for alone, and written once the secret is fixed.
    let out = env.tmpfs_out();
    let run = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["config", "db"],
        &["--backoff-max", "2s"],
    );
    let user = tessera_tests::wait_for(Duration::from_secs(20), "the database user", || {
        read(out.path(), "db", "username")
    })
    .await;
    let password = read(out.path(), "db", "password").unwrap();
    assert!(pg.can_login(&user, &password));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        read(out.path(), "db", "username"),
        Some(user.clone()),
        "no new user"
    );
    let revoked_undelivered = env
        .audit_events()
        .into_iter()
        .filter(|e| e["action"] == "revoke" && e["binding"] == "db")
        .count();
    assert_eq!(
        revoked_undelivered, 0,
        "no lease issued and revoked for the refused binding"
    );
    assert!(read(out.path(), "config", "mode").is_none());
    let status =
        std::fs::read_to_string(out.path().join(tessera_sidecar::status::STATUS_FILE)).unwrap();
    assert!(
        status.contains("../escape") || status.contains("no safe file name"),
        "{status}"
    );

    env.bao
        .put("shop/config", &json!({ "mode": "green" }))
        .await;
    tessera_tests::wait_for(Duration::from_secs(20), "the fixed secret", || {
        (read(out.path(), "config", "mode")? == "green").then_some(())
    })
    .await;
    assert_eq!(
        read(out.path(), "db", "username"),
        Some(user),
        "still the same user"
    );
    drop(run);
}

/// A policy granting shop/orders a certificate `tls` for an hour, with the
/// default TTL floors unless `limits` says otherwise.
fn pki_policy(limits: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
{limits}bindings:
  - name: tls
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ pki: {{ mount: pki, role: pods, commonName: \"{{{{ pod }}}}.shop\" }} }}
    ttl: 1h
"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_4_a_ttl_below_the_kinds_floor_is_refused_at_admission_in_the_api_and_on_renewal() {
    use tessera_proto::{
        reason::StreamEnd,
        v1::{FetchRequest, WatchRequest},
    };
    let env = Env::start(&pki_policy("")).await;
    env.bao.pki_role("2h");
    let token = env.token("shop", "orders");

    // Admission: a pod asking for one second is refused, naming the floor.
    let asked = |ttl: &str| vec![("tessera.dev/ttl.tls".to_owned(), ttl.to_owned())];
    let (allowed, message) = admit(&env, &pod("tls", &asked("1s"))).await;
    assert!(!allowed);
    assert!(
        message.contains("tessera.dev/ttl.tls")
            && message.contains("1s is below the policy's floor 5m for pki credentials"),
        "{message}"
    );
    assert!(admit(&env, &pod("tls", &asked("5m"))).await.0);

    // The API: the same floor, INVALID_ARGUMENT before Vault is asked.
    let watch = |seconds: u32| {
        let request = WatchRequest {
            bindings: vec!["tls".to_owned()],
            max_ttl_seconds: [("tls".to_owned(), seconds)].into(),
            ..Default::default()
        };
        let env = &env;
        let token = token.clone();
        async move {
            env.client()
                .await
                .watch(tessera_tests::with_token(&token, request))
                .await
        }
    };
    for refused in [1, 299] {
        let status = watch(refused).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("below the policy's floor 5m"),
            "{}",
            status.message()
        );
    }
    let fetched = env
        .client()
        .await
        .fetch(tessera_tests::with_token(
            &token,
            FetchRequest {
                bindings: vec!["tls".to_owned()],
                max_ttl_seconds: [("tls".to_owned(), 1)].into(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(fetched.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert!(
        env.bao.list("pki/certs").len() <= 1,
        "only the CA is in Vault: {:?}",
        env.bao.list("pki/certs")
    );

    // At the floor: one certificate for five minutes, the stream held.
    let mut stream = watch(300).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap().credential.unwrap();
    let left = first.not_after.unwrap().seconds
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!((250..=300).contains(&left), "asked for 300 s, got {left} s");

    // Renewal: the security team raises the floor above what the stream
    // asked for. The stream ends POLICY_CHANGED and the next request is
    // refused with the new floor; the certificate delivered stays valid.
    env.set_policy(&pki_policy("limits:\n  minTtl: { pki: 10m }\n"));
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the stream to end within 20 s")
        .unwrap_err();
    assert_eq!(
        StreamEnd::of(&ended),
        Some(StreamEnd::PolicyChanged),
        "{ended:?}"
    );
    let status = watch(300).await.unwrap_err();
    assert!(
        status
            .message()
            .contains("5m is below the policy's floor 10m"),
        "{}",
        status.message()
    );
    let issued = env.bao.list("pki/certs").len();
    assert!(issued <= 2, "the CA and one certificate: {issued}");
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_12_a_rename_of_a_key_the_secret_lacks_is_refused_and_the_probe_says_why() {
    let env = Env::start(&simple_policy("config", "shop", "orders", "shop/config")).await;
    env.bao
        .put("shop/config", &json!({ "password": "p", "username": "u" }))
        .await;
    let renamed = |field: &str| {
        pod(
            "config",
            &[(
                "tessera.dev/files.config".to_owned(),
                format!("{field}=db-password"),
            )],
        )
    };
    // The broker reads the secret within a poll; from then on the webhook
    // knows its keys.
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        let (allowed, message) = admit(&env, &renamed("pasword")).await;
        if !allowed {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "a rename of a key the secret lacks was still admitted after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        message,
        "tessera: annotation tessera.dev/files.config: binding `config` delivers no `pasword` (it delivers password, username)"
    );
    assert!(admit(&env, &renamed("password")).await.0);

    // A pod admitted before the broker had read the secret (or whose secret
    // lost the key since): the sidecar's probe names the reason at once.
    let out = env.tmpfs_out();
    let once = env.sidecar_once(
        &env.token_file("shop", "orders"),
        out.path(),
        &["config"],
        &[
            "--pod-output",
            r#"{"config":{"files":{"pasword":"db-password"},"templates":{}}}"#,
        ],
    );
    assert!(!once.status.success());
    let check = std::process::Command::new(tessera_tests::binary("tessera-sidecar"))
        .args(["check", "--binding", "config", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!check.status.success());
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("binding `config` has not been written: binding `config`: tessera.dev/files renames `pasword`, which the broker did not deliver"),
        "{said}"
    );
}
