//! Health and metrics: `/livez`, `/readyz`, `/metrics` on the admin port, and
//! gRPC health: the replica stays ready while Vault is away; Vault's state is
//! its own health service (a real OpenBao, stopped and started again).

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::{Env, EnvOptions, http_get, https_post, simple_policy, vault_requests};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn health_of(env: &Env, service: &str) -> i32 {
    HealthClient::new(env.channel().await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_or(-1, |r| r.into_inner().status)
}

async fn broker_health(env: &Env) -> i32 {
    health_of(env, "tessera.v1.Broker").await
}

async fn wait_health(env: &Env, expected: ServingStatus) {
    wait_service(env, "tessera.v1.Broker", expected).await;
}

async fn wait_service(env: &Env, service: &str, expected: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_of(env, service).await != expected as i32 {
        assert!(
            Instant::now() < deadline,
            "health of `{service}` never became {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    assert_eq!(http_get(&format!("{}/livez", env.admin_url)).await.0, 200);
    wait_health(&env, ServingStatus::Serving).await;
    assert_eq!(http_get(&format!("{}/readyz", env.admin_url)).await.0, 200);

    env.fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap();
    env.fetch(&env.token("shop", "billing"), &["app"])
        .await
        .unwrap_err();
    let (status, body) = http_get(&format!("{}/metrics", env.admin_url)).await;
    assert_eq!(status, 200);
    for line in [
        r#"tessera_credential_events_total{action="issue",outcome="success",binding="app"} 1"#,
        r#"tessera_credential_events_total{action="issue",outcome="denied",binding="-"} 1"#,
        "tessera_vault_up 1",
        "tessera_policy_generation 1",
        "tessera_policy_reload_failing 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing `{line}` in:\n{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vault_outage_keeps_the_replica_ready_and_shows_in_the_vault_health() {
    let options = EnvOptions {
        persistent_vault: true,
        ..EnvOptions::default()
    };
    let mut env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    wait_health(&env, ServingStatus::Serving).await;
    let vault = tessera_broker::VAULT_HEALTH_SERVICE;
    wait_service(&env, vault, ServingStatus::Serving).await;

    env.bao.kill();
    wait_service(&env, vault, ServingStatus::NotServing).await;
    // The replica can still serve (the webhook, KV last-known-good): it stays
    // in the Service.
    assert_eq!(broker_health(&env).await, ServingStatus::Serving as i32);
    assert_eq!(health_of(&env, "").await, ServingStatus::Serving as i32);
    assert_eq!(http_get(&format!("{}/readyz", env.admin_url)).await.0, 200);
    let (_, metrics) = http_get(&format!("{}/metrics", env.admin_url)).await;
    assert!(
        metrics.lines().any(|l| l == "tessera_vault_up 0"),
        "{metrics}"
    );

    let dir = env.dir.path().to_owned();
    env.bao.restart(&dir).await;
    wait_service(&env, vault, ServingStatus::Serving).await;
    assert_eq!(http_get(&format!("{}/readyz", env.admin_url)).await.0, 200);
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// promtool reads the Prometheus text format: OpenMetrics names a counter's
/// family without `_total` in HELP/TYPE and ends with `# EOF`.
fn openmetrics_to_prometheus_text(body: &str) -> String {
    let counters: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .map(str::to_owned)
        .collect();
    let mut out = String::new();
    for line in body.lines().filter(|l| *l != "# EOF") {
        let mut line = line.to_owned();
        for counter in &counters {
            for prefix in ["# HELP ", "# TYPE "] {
                let head = format!("{prefix}{counter} ");
                if line.starts_with(&head) {
                    line = format!("{prefix}{counter}_total {}", &line[head.len()..]);
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn exposition_and_alert_rules_pass_promtool() {
    let policy = simple_policy("app", "shop", "orders", "shop/orders")
        + "  - name: missing\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/missing } }\n"
        + "  - name: tls\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { pki: { mount: pki, role: pods, commonName: \"{{ pod }}.shop\" } }\n    ttl: 10m\n";
    let env = Env::start(&policy).await;
    env.bao.pki_role("1h");
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    env.fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap();
    // Every metric family gets a sample: a Vault error, a lease held open
    // by a Watch stream, an admission review.
    env.fetch(&env.token("shop", "orders"), &["missing"])
        .await
        .unwrap_err();
    let out = env.tmpfs_out();
    let _watch = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["tls"]);
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3b1f", "operation": "CREATE", "namespace": "shop",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "userInfo": {},
            "object": { "metadata": { "name": "plain" }, "spec": { "containers": [{ "name": "app" }] } }
        }
    });
    let ca = env.dir.path().join("dev/ca.pem");
    assert_eq!(
        https_post(&env.webhook_url, &ca, &review.to_string())
            .await
            .0,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, body) = http_get(&format!("{}/metrics", env.admin_url)).await;
        if body.contains(r#"tessera_active_leases{binding="tls"} 1"#) {
            break body;
        }
        assert!(Instant::now() < deadline, "no active lease in:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = openmetrics_to_prometheus_text(&body);
    let metrics = promtool(&["check", "metrics"], Some(&text));
    assert!(
        metrics.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&metrics.stdout),
        String::from_utf8_lossy(&metrics.stderr)
    );
    let rules_file =
        tessera_tests::workspace_root().join("deploy/helm/tessera/files/tessera-alerts.yaml");
    let rules = promtool(&["check", "rules", rules_file.to_str().unwrap()], None);
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    let rule_tests =
        tessera_tests::workspace_root().join("deploy/prometheus/tests/tessera-alerts.test.yaml");
    let tested = promtool(&["test", "rules", rule_tests.to_str().unwrap()], None);
    assert!(
        tested.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    // The sidecar's exposition, from a status file with an expiring credential.
    let out = tempfile::tempdir().unwrap();
    let mut status = tessera_sidecar::status::Status::default();
    let now = std::time::SystemTime::now();
    status.confirmed(
        "db",
        "1",
        Some(now + Duration::from_secs(600)),
        tessera_sidecar::status::Vouched::default(),
    );
    status.write(out.path());
    let sidecar = tessera_sidecar::metrics::render(out.path(), now);
    let sidecar_check = promtool(
        &["check", "metrics"],
        Some(&openmetrics_to_prometheus_text(&sidecar)),
    );
    assert!(
        sidecar_check.status.success(),
        "promtool check metrics (sidecar): {}{}",
        String::from_utf8_lossy(&sidecar_check.stdout),
        String::from_utf8_lossy(&sidecar_check.stderr)
    );
    let dashboard =
        tessera_tests::workspace_root().join("deploy/helm/tessera/files/tessera-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dashboard).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let metric = expr
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .find(|w| w.starts_with("tessera_"))
                .unwrap();
            let family = metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_total");
            let exported = if family.starts_with("tessera_sidecar_") {
                &sidecar
            } else {
                &body
            };
            assert!(
                exported.contains(family),
                "dashboard uses `{metric}`, which Tessera does not export"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_broker() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    for _ in 0..3 {
        env.fetch(&env.token("shop", "orders"), &["app"])
            .await
            .unwrap();
    }
    let port = tessera_tests::free_port();
    let target = env.admin_url.trim_start_matches("http://");
    let config = env.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tessera-broker\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            env.dir.path().join("prometheus-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prometheus =
        tessera_tests::Proc::spawn("prometheus", command, env.dir.path().join("prometheus.log"));
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=tessera_credential_events_total%7Baction%3D%22issue%22%2Coutcome%3D%22success%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(_) => http_get(&query).await.1,
            Err(_) => String::new(),
        };
        let json_start = answer.find('{').unwrap_or(answer.len());
        let value: serde_json::Value =
            serde_json::from_str(answer[json_start..].trim()).unwrap_or_default();
        let result = &value["data"]["result"];
        if let Some(series) = result.as_array().and_then(|r| r.first()) {
            assert_eq!(series["metric"]["binding"], "app");
            assert_eq!(series["metric"]["job"], "tessera-broker");
            assert_eq!(series["value"][1], "3", "three issuances were scraped");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the series:\n{}",
            prometheus.output()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// #25: a 404 from Vault did not count as an answer, so a broker whose
/// regular requests find nothing (the change feed's canary does, by design;
/// a policy's KV secret not written yet) sent a health check every
/// interval besides. Vault answering "nothing here" answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_whose_requests_find_nothing_needs_no_health_check() {
    let env = polling_a_secret_not_written("500ms").await;
    let checks = async || vault_requests(&env.admin_url, "LookupTokenSelfRequest").await;
    let not_found = async || vault_requests(&env.admin_url, "ReadSecretMetadataRequest").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, polls) = (checks().await, not_found().await);
    // Four health-check intervals (1 s here); the secret is polled (and
    // not found) twice a second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(not_found().await > polls + 3.0, "the secret is polled");
    assert_eq!(checks().await, before, "no health check besides");
    let (_, metrics) = http_get(&format!("{}/metrics", env.admin_url)).await;
    assert!(
        metrics.lines().any(|l| l == "tessera_vault_up 1"),
        "Vault up"
    );
}

/// Vault answering "nothing here" is routine (a policy's secret not written
/// yet; a new pod's first lease finds no records; the change feed's canary
/// reads an empty path by design): the broker says so in its own words, not
/// with an ERROR line per request (regression: the Vault client logged each
/// 404 at ERROR, twice, so a healthy broker with the change feed on logged
/// errors every check interval).
#[tokio::test(flavor = "multi_thread")]
async fn vault_answering_nothing_here_is_not_logged_as_an_error() {
    let env = polling_a_secret_not_written("200ms").await;
    let not_found = async || vault_requests(&env.admin_url, "ReadSecretMetadataRequest").await;
    for _ in 0..100 {
        if not_found().await >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_found().await >= 3.0, "the secret is polled");
    let log = env.broker.output();
    assert!(
        log.contains("polling a KV secret's version failed"),
        "the broker reports it"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "no ERROR lines: {errors:#?}");
}

/// A broker whose policy's one KV secret is not written, polled every
/// `poll`: each check finds nothing.
async fn polling_a_secret_not_written(poll: &'static str) -> Env {
    Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/not-written"),
        EnvOptions {
            poll,
            ..EnvOptions::default()
        },
    )
    .await
}
