//! Transport security: TLS 1.3 with optional mTLS, and a serving certificate
//! replaced on disk being served without a restart.

use std::{fs, process::Command, time::Duration};

use serde_json::json;
use tessera_proto::v1::{WhoAmIRequest, broker_client::BrokerClient};
use tessera_tests::{Env, EnvOptions, binary, simple_policy, with_token};

#[tokio::test(flavor = "multi_thread")]
async fn mtls_requires_a_client_certificate() {
    let options = EnvOptions {
        mtls: true,
        ..EnvOptions::default()
    };
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;

    let out = env.tmpfs_out();
    let with_cert = env.sidecar_once(&env.token_file("shop", "orders"), out.path(), &["app"], &[]);
    assert!(
        with_cert.status.success(),
        "{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );

    let ca = env.dir.path().join("dev/ca.pem");
    let refused = match env.try_channel(&ca, false).await {
        Err(_) => true,
        Ok(channel) => BrokerClient::new(channel)
            .who_am_i(with_token(&env.token("shop", "orders"), WhoAmIRequest {}))
            .await
            .is_err(),
    };
    assert!(refused, "a caller without a client certificate is refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_serving_certificate_is_served_without_restart() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let token = env.token("shop", "orders");
    let old_ca = env.dir.path().join("dev/ca.pem");
    let who_am_i = |ca: std::path::PathBuf| {
        let token = token.clone();
        let env = &env;
        async move {
            let channel = env.try_channel(&ca, false).await.ok()?;
            BrokerClient::new(channel)
                .who_am_i(with_token(&token, WhoAmIRequest {}))
                .await
                .ok()
        }
    };
    assert!(who_am_i(old_ca.clone()).await.is_some());

    // A new CA and serving certificate, swapped in by rename like a Secret update.
    let renewed = env.dir.path().join("renewed");
    let status = Command::new(binary("tessera-broker"))
        .args(["dev", "init", "--dir"])
        .arg(&renewed)
        .status()
        .unwrap();
    assert!(status.success());
    let dev = env.dir.path().join("dev");
    for name in ["tls.key", "tls.crt"] {
        fs::copy(renewed.join(name), dev.join(format!("{name}.new"))).unwrap();
        fs::rename(dev.join(format!("{name}.new")), dev.join(name)).unwrap();
    }
    let new_ca = renewed.join("ca.pem");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while who_am_i(new_ca.clone()).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served:\n{}",
            env.broker.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        who_am_i(old_ca).await.is_none(),
        "the old certificate is no longer served"
    );
    assert!(env.broker.output().contains("serving certificate reloaded"));

    // A broken file keeps the current certificate.
    fs::write(dev.join("tls.crt"), "not a certificate").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !env
        .broker
        .output()
        .contains("serving certificate reload failed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken certificate was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        who_am_i(new_ca).await.is_some(),
        "the last good certificate is still served"
    );
}
