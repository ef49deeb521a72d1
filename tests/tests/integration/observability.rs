//! Health and metrics: `/livez`, `/readyz`, `/metrics` on the admin port, and
//! gRPC health following Vault (a real OpenBao, stopped and started again).

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_tests::{Env, EnvOptions, http_get, simple_policy};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn broker_health(env: &Env) -> i32 {
    HealthClient::new(env.channel().await)
        .check(HealthCheckRequest {
            service: "tessera.v1.Broker".into(),
        })
        .await
        .map_or(-1, |r| r.into_inner().status)
}

async fn wait_health(env: &Env, expected: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker_health(env).await != expected as i32 {
        assert!(
            Instant::now() < deadline,
            "broker health never became {expected:?}"
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
async fn health_follows_openbao_down_and_back() {
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

    env.bao.kill();
    wait_health(&env, ServingStatus::NotServing).await;
    assert_eq!(http_get(&format!("{}/readyz", env.admin_url)).await.0, 503);
    let (_, metrics) = http_get(&format!("{}/metrics", env.admin_url)).await;
    assert!(
        metrics.lines().any(|l| l == "tessera_vault_up 0"),
        "{metrics}"
    );

    let dir = env.dir.path().to_owned();
    env.bao.restart(&dir).await;
    wait_health(&env, ServingStatus::Serving).await;
    assert_eq!(http_get(&format!("{}/readyz", env.admin_url)).await.0, 200);
}
