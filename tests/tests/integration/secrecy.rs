//! With debug logging on, no secret value and no token reaches the broker's or
//! the sidecar's output.

use std::{fs, time::Duration};

use serde_json::json;
use tessera_tests::{Env, EnvOptions, random_string, simple_policy, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_hold_no_secret_and_no_token() {
    let options = EnvOptions {
        rust_log: "debug".to_owned(),
        ..EnvOptions::default()
    };
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        options,
    )
    .await;
    let (secret1, secret2) = (random_string(32), random_string(32));
    env.bao
        .put("shop/orders", &json!({ "password": secret1 }))
        .await;

    let out = env.tmpfs_out();
    let token_file = env.token_file("shop", "orders");
    let token = fs::read_to_string(&token_file).unwrap();
    let once = env.sidecar_once(&token_file, out.path(), &["app"], &[]);
    assert!(once.status.success());

    let mut sidecar = env.sidecar_run(&token_file, out.path(), &["app"]);
    env.bao
        .put("shop/orders", &json!({ "password": secret2 }))
        .await;
    wait_for(Duration::from_secs(20), "the update", || {
        fs::read_to_string(out.path().join("app/password"))
            .ok()
            .filter(|p| *p == secret2)
    })
    .await;
    sidecar.terminate();

    let signature = token.trim().rsplit('.').next().unwrap().to_owned();
    let logs = [
        ("broker", env.broker.output()),
        (
            "sidecar once",
            String::from_utf8_lossy(&once.stderr).into_owned(),
        ),
        ("sidecar run", sidecar.output()),
    ];
    for (name, log) in &logs {
        assert!(log.contains("DEBUG"), "{name} logged at debug level");
        for (what, needle) in [
            ("secret v1", &secret1),
            ("secret v2", &secret2),
            ("token signature", &signature),
        ] {
            assert!(
                !log.contains(needle.as_str()),
                "{name} output contains the {what}"
            );
        }
    }
    assert!(
        logs[0].1.contains("credential delivered"),
        "the broker logged the issuance"
    );
    assert!(
        logs[2].1.contains("credential written"),
        "the sidecar logged the write"
    );
}
