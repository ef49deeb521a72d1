//! Traces: a sidecar's fetch and the broker's work for it arrive at an
//! in-process OTLP/gRPC receiver as one trace, with the expected parents.

use serde_json::json;
use tessera_tests::{Env, EnvOptions, otlp::OtlpReceiver, random_string, simple_policy};

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_runs_from_the_sidecar_through_the_broker_to_vault() {
    let receiver = OtlpReceiver::start().await;
    let env = Env::start_with(
        &simple_policy("app", "shop", "orders", "shop/orders"),
        EnvOptions {
            process_env: receiver.env(),
            ..EnvOptions::default()
        },
    )
    .await;
    let password = random_string(24);
    env.bao
        .put("shop/orders", &json!({ "password": password }))
        .await;
    let out = env.tmpfs_out();
    let token_file = env.token_file("shop", "orders");
    let ran = env.sidecar_once(&token_file, out.path(), &["app"], &[]);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );

    let names = [
        "sidecar.once",
        "Fetch",
        "verify_token",
        "policy",
        "deliver",
        "vault",
    ];
    let spans = receiver
        .wait_for("complete Fetch trace", |spans| {
            names.iter().all(|n| spans.iter().any(|s| s.name == *n))
        })
        .await;
    let find = |name: &str| spans.iter().find(|s| s.name == name).unwrap();

    let root = find("sidecar.once");
    assert_eq!(root.service, "tessera-sidecar");
    assert!(
        root.parent_span_id.is_empty(),
        "the sidecar starts the trace"
    );
    let fetch = find("Fetch");
    assert_eq!(fetch.service, "tessera-broker");
    assert_eq!(
        fetch.trace_id, root.trace_id,
        "the broker joins the sidecar's trace"
    );
    assert_eq!(fetch.parent_span_id, root.span_id);
    for step in ["verify_token", "policy", "deliver"] {
        let span = find(step);
        assert_eq!(span.trace_id, root.trace_id, "{step}");
        assert_eq!(
            span.parent_span_id, fetch.span_id,
            "{step} is a step of Fetch"
        );
    }
    let deliver = find("deliver");
    assert!(
        spans.iter().any(|s| s.name == "vault"
            && s.trace_id == root.trace_id
            && s.parent_span_id == deliver.span_id),
        "the Vault read is a child of the delivery: {spans:#?}"
    );
    assert!(
        fetch
            .attributes
            .iter()
            .any(|(k, v)| k == "namespace" && v.contains("shop")),
        "spans name the caller: {:?}",
        fetch.attributes
    );

    // Neither the delivered secret nor the token is in any span.
    let token = std::fs::read_to_string(&token_file).unwrap();
    for span in &spans {
        for (key, value) in &span.attributes {
            assert!(
                !value.contains(&password) && !value.contains(token.trim()),
                "{} carries a secret in {key}",
                span.name
            );
        }
    }
}
