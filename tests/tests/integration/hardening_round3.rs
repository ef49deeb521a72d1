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
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "5c1f3d2e-0000-4000-8000-00000000a027",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": { "username": "hostile" },
            "object": pod,
            "dryRun": false
        }
    })
    .to_string()
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
