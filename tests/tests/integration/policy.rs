//! The policy in a running broker: hot reload through a ConfigMap-style
//! symlink swap, the last good policy kept on error, and no request ever served
//! by a mix of two policies. Plus the `policy` commands against golden outputs.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use tessera_proto::v1::{FetchRequest, WhoAmIRequest};
use tessera_tests::{Env, binary, simple_policy, wait_for, with_token, workspace_root};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn two_bindings(prefix: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: x
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ kv2: {{ mount: secret, path: {prefix}/x }} }}
  - name: y
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ kv2: {{ mount: secret, path: {prefix}/y }} }}
"
    )
}

async fn granted(env: &Env) -> Vec<String> {
    env.client()
        .await
        .who_am_i(with_token(&env.token("shop", "orders"), WhoAmIRequest {}))
        .await
        .unwrap()
        .into_inner()
        .bindings
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_policy_is_picked_up_and_a_broken_one_keeps_the_last_good() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    assert_eq!(granted(&env).await, ["app"]);

    env.set_policy(
        &(simple_policy("app", "shop", "orders", "shop/orders")
            + "  - name: extra\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/extra } }\n"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while granted(&env).await != ["app", "extra"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the new policy was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    env.set_policy(
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings: [{ name: broken }]\n",
    );
    wait_for(
        Duration::from_secs(20),
        "the reload error in the log",
        || {
            env.broker
                .output()
                .contains("policy reload failed")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        granted(&env).await,
        ["app", "extra"],
        "the last good policy stays"
    );
    wait_for_policy_health(&env, ServingStatus::NotServing).await;

    env.set_policy(&simple_policy("app", "shop", "orders", "shop/orders"));
    wait_for_policy_health(&env, ServingStatus::Serving).await;
    assert_eq!(granted(&env).await, ["app"]);
}

/// Waits until the policy health service reports `expected`.
async fn wait_for_policy_health(env: &Env, expected: ServingStatus) {
    let mut health = HealthClient::new(env.channel().await);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: tessera_broker::POLICY_HEALTH_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == expected as i32 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "policy health never became {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_under_load_fail_no_request_and_never_mix_policies() {
    let env = Arc::new(Env::start(&two_bindings("a")).await);
    for (path, value) in [("a/x", "A"), ("a/y", "A"), ("b/x", "B"), ("b/y", "B")] {
        env.bao.put(path, &json!({ "v": value })).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (env, stop) = (env.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut client = env.client().await;
            let token = env.token("shop", "orders");
            let mut seen = std::collections::BTreeSet::new();
            let mut requests = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let request = with_token(
                    &token,
                    FetchRequest {
                        bindings: vec!["x".into(), "y".into()],
                        ..Default::default()
                    },
                );
                let response = client
                    .fetch(request)
                    .await
                    .expect("no request fails during reloads");
                let values: Vec<Vec<u8>> = response
                    .into_inner()
                    .credentials
                    .iter()
                    .map(|c| c.fields["v"].clone())
                    .collect();
                assert_eq!(values[0], values[1], "one response mixed two policies");
                seen.insert(values[0].clone());
                requests += 1;
            }
            (seen, requests)
        }));
    }
    for round in 0..16 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        env.set_policy(&two_bindings(if round % 2 == 0 { "b" } else { "a" }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = std::collections::BTreeSet::new();
    for worker in workers {
        let (seen, requests) = worker.await.unwrap();
        assert!(requests > 0);
        all.extend(seen);
    }
    assert_eq!(all.len(), 2, "requests were served by both policies");
}

/// Runs `tessera-broker policy ARGS` in the golden directory and compares its
/// stdout with `tests/golden/policy/<name>`; `UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, args: &[&str], expect_success: bool) {
    let dir = workspace_root().join("tests/golden/policy");
    let output = Command::new(binary("tessera-broker"))
        .arg("policy")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(
        output.status.success(),
        expect_success,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let actual = String::from_utf8(output.stdout).unwrap();
    let path = dir.join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(Path::new(&path)).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "golden output {name} differs (UPDATE_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn policy_check_accepts_a_good_policy() {
    golden("check-good.out", &["check", "good.yaml"], true);
}

#[test]
fn policy_check_lists_every_problem_with_its_position() {
    golden("check-bad.out", &["check", "bad.yaml"], false);
}

#[test]
fn policy_check_reads_a_directory() {
    golden("check-dir.out", &["check", "split"], true);
}

#[test]
fn policy_explain_says_what_and_why() {
    golden(
        "explain-orders.out",
        &[
            "explain",
            "--namespace",
            "shop",
            "--service-account",
            "orders-api",
            "good.yaml",
        ],
        true,
    );
    golden(
        "explain-stranger.out",
        &[
            "explain",
            "--namespace",
            "kube-system",
            "--service-account",
            "default",
            "good.yaml",
        ],
        true,
    );
}

#[test]
fn policy_diff_shows_granted_and_removed_access() {
    golden("diff.out", &["diff", "good.yaml", "new.yaml"], true);
    golden("diff-none.out", &["diff", "good.yaml", "good.yaml"], true);
}
