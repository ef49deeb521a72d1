//! What a pod owner may set within the platform's bounds: renamed and
//! templated files, the sidecar's limits, a shorter TTL.

use super::*;

#[test]
fn pod_owners_reshape_files_within_what_the_binding_delivers() {
    // A binding whose fields are known: a database credential.
    let db_policy = Policy::parse(&db_policy_text(), "policy.yaml").unwrap();
    let decide_with = |value: &Value, policy: &Policy| {
        inject::decide(
            &pod(value),
            "shop",
            &injection(),
            SidecarMode::Native,
            CA,
            policy,
            &|_| None,
        )
    };
    let mut value = with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls");
    value = with_annotation(value, "tessera.dev/files.db", "password=db-password");
    value = with_annotation(
        value,
        "tessera.dev/templates.db",
        "dsn: postgresql://{{ username | urlencode }}:{{ password | urlencode }}@db:5432/orders\n",
    );
    value = with_annotation(value, annotations::MOUNT_CONTAINERS, "app");
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "proxy", "image": "envoy:1" }));
    let Ok(Decision::Inject(mutated, _)) = decide_with(&value, &db_policy) else {
        panic!("refused");
    };
    let spec = mutated.spec.unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    let output: Value =
        serde_json::from_str(&env_of_container(sidecar, "TESSERA_POD_OUTPUT").unwrap()).unwrap();
    assert_eq!(output["db"]["files"]["password"], "db-password");
    assert!(
        output["db"]["templates"]["dsn"]
            .as_str()
            .unwrap()
            .starts_with("postgresql://")
    );
    // Only the named container mounts the credentials.
    let mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "tessera-credentials")
    };
    assert!(mounts(&spec.containers[0]));
    assert!(
        !mounts(&spec.containers[1]),
        "proxy does not see the credentials"
    );

    // Anything that would widen, or does not fit, is refused by annotation.
    for (key, text, expected) in [
        (
            "tessera.dev/templates.db",
            "x: \"{{ root_token }}\"",
            "uses `root_token`, which binding `db` does not deliver",
        ),
        (
            "tessera.dev/files.db",
            "token=t",
            "binding `db` delivers no `token`",
        ),
        (
            "tessera.dev/files.payments",
            "a=b",
            "binding `payments` is not in tessera.dev/bindings",
        ),
        (
            "tessera.dev/templates.db",
            "../x: \"{{ username }}\"",
            "is not a safe file name",
        ),
        (
            "tessera.dev/templates.db",
            "x: \"{{ username | nope }}\"",
            "unknown filter `nope`",
        ),
        (
            "tessera.dev/templates.db",
            "username: \"{{ password }}\"",
            "would be named `username`",
        ),
        (
            annotations::MOUNT_CONTAINERS,
            "worker",
            "the pod has no container `worker`",
        ),
    ] {
        let bad = with_annotation(
            with_annotation(deployment_pod(), annotations::BINDINGS, "db"),
            key,
            text,
        );
        let Err(Denial(message)) = decide_with(&bad, &db_policy) else {
            panic!("{key}: admitted");
        };
        assert!(message.contains(key), "{message}");
        assert!(message.contains(expected), "{expected}: {message}");
    }

    // The security team may forbid pod templates.
    let strict = Policy::parse(
        &db_policy_text().replace("bindings:\n", "limits:\n  podTemplates: false\nbindings:\n"),
        "policy.yaml",
    )
    .unwrap();
    let Err(Denial(message)) = decide_with(&value, &strict) else {
        panic!("admitted");
    };
    assert!(message.contains("limits.podTemplates: false"), "{message}");
}

#[test]
fn pod_owners_set_the_sidecars_limits_within_the_platforms_bounds() {
    let quantity = |pod: &Pod, kind: &str, resource: &str| {
        let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let resources = sidecar.resources.as_ref().unwrap();
        let map = if kind == "limits" {
            &resources.limits
        } else {
            &resources.requests
        };
        map.as_ref().unwrap()[resource].0.clone()
    };
    let value = with_annotation(
        with_annotation(deployment_pod(), annotations::SIDECAR_MEMORY, "96Mi"),
        annotations::SIDECAR_CPU,
        "2m",
    );
    let (mutated, _) = injected(&value, SidecarMode::Native);
    assert_eq!(quantity(&mutated, "limits", "memory"), "96Mi");
    assert_eq!(
        quantity(&mutated, "requests", "memory"),
        "16Mi",
        "request kept"
    );
    assert_eq!(quantity(&mutated, "limits", "cpu"), "2m");
    assert_eq!(
        quantity(&mutated, "requests", "cpu"),
        "2m",
        "request lowered to the limit"
    );
    for (key, text, expected) in [
        (
            annotations::SIDECAR_MEMORY,
            "1Gi",
            "1Gi is above the 128Mi the platform allows",
        ),
        (
            annotations::SIDECAR_CPU,
            "0.6",
            "0.6 is above the 500m the platform allows",
        ),
        (
            annotations::SIDECAR_CPU,
            "lots",
            "`lots` is not a positive quantity",
        ),
        (
            annotations::SIDECAR_MEMORY,
            "0",
            "`0` is not a positive quantity",
        ),
    ] {
        let message = denial(&with_annotation(deployment_pod(), key, text));
        assert!(
            message.contains(key) && message.contains(expected),
            "{expected}: {message}"
        );
    }
}

#[test]
fn a_pod_may_shorten_a_leased_bindings_ttl_and_nothing_else() {
    let policy = Policy::parse(&db_policy_text(), "policy.yaml").unwrap();
    let decide_with = |value: &Value| {
        inject::decide(
            &pod(value),
            "shop",
            &injection(),
            SidecarMode::Native,
            CA,
            &policy,
            &|_| None,
        )
    };
    let value = with_annotation(
        with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls"),
        "tessera.dev/ttl.db",
        "10m",
    );
    let Ok(Decision::Inject(mutated, _)) = decide_with(&value) else {
        panic!("refused");
    };
    let sidecar = &mutated.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(
        env_of_container(sidecar, "TESSERA_MAX_TTL").as_deref(),
        Some("db=600s")
    );
    for (key, text, expected) in [
        (
            "tessera.dev/ttl.db",
            "48h",
            "48h is longer than the policy's ttl",
        ),
        ("tessera.dev/ttl.db", "soon", "`soon` is not a duration"),
        (
            "tessera.dev/ttl.db",
            "1s",
            "1s is below the policy's floor 5m for database credentials (limits.minTtl.database)",
        ),
        ("tessera.dev/ttl.tls", "1m", "`tls` is a KV secret"),
        (
            "tessera.dev/ttl.payments",
            "1m",
            "binding `payments` is not in tessera.dev/bindings",
        ),
    ] {
        let bad = with_annotation(
            with_annotation(deployment_pod(), annotations::BINDINGS, "db,tls"),
            key,
            text,
        );
        let Err(Denial(message)) = decide_with(&bad) else {
            panic!("{key}={text}: admitted");
        };
        assert!(
            message.contains(key) && message.contains(expected),
            "{expected}: {message}"
        );
    }
}
