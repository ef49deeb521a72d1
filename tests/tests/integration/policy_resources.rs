//! #26: the policy as Kubernetes resources, against the real API server with
//! the chart's CRDs: a malformed resource is refused by the API server; a
//! binding outside its namespace's delegation is Rejected with the reason; an
//! accepted one is served to a pod within seconds; a deleted one is withdrawn
//! (the stream ends POLICY_CHANGED, its lease is revoked).

use std::{process::Command, time::Duration};

use serde_json::{Value, json};
use tessera_proto::{reason::StreamEnd, v1::WatchRequest};
use tessera_tests::{
    Cluster, Env, EnvOptions, Postgres, binary, metric_value, wait_for, with_token,
};

/// The file policy: nothing but what the cluster's resources add.
const EMPTY: &str = "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings: []\n";

fn access_binding(name: &str, source: Value) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "AccessBinding",
        "metadata": { "name": name, "namespace": "team-a" },
        "spec": { "serviceAccounts": ["app"], "source": source, "ttl": "10m" },
    })
}

/// The `Accepted` condition of `what` once it is for `generation`: (status, reason, message).
async fn accepted(cluster: &Cluster, what: &str, generation: i64) -> (String, String, String) {
    wait_for(
        Duration::from_secs(20),
        &format!("the broker to write {what}'s status"),
        || {
            let object = cluster.get(Some("team-a"), what)?;
            let condition = object["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Accepted")?
                .clone();
            (condition["observedGeneration"] == generation
                && object["status"]["observedGeneration"] == generation)
                .then(|| {
                    let text = |key: &str| condition[key].as_str().unwrap_or_default().to_owned();
                    (text("status"), text("reason"), text("message"))
                })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn access_bindings_are_validated_judged_served_and_withdrawn_through_the_api_server() {
    let pg = Postgres::start();
    let env = Env::start_with(
        EMPTY,
        EnvOptions {
            kubernetes: true,
            policy_resources: true,
            ..EnvOptions::default()
        },
    )
    .await;
    env.bao.database_role(&pg, "team-a-ro", "10m", "1h");
    let cluster = env.kube.as_ref().unwrap();
    cluster.run(&["create", "namespace", "team-a"]);
    // The pod the token is bound to (leased credentials go to pods only).
    cluster.add_pod("team-a", "app-0", "app", &[]);

    // 1. Malformed: the API server refuses it, naming the rule.
    let two_kinds = access_binding(
        "broken",
        json!({ "kv2": { "mount": "secret", "path": "a" },
                "database": { "mount": "database", "role": "team-a-ro" } }),
    );
    let refused = cluster.apply(&two_kinds);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("source names exactly one kind"),
        "the API server's refusal: {said}"
    );
    assert!(
        cluster
            .get(Some("team-a"), "accessbinding/broken")
            .is_none()
    );

    // The security team delegates database roles `team-a-*` to team-a.
    let delegation = json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ClusterAccessPolicy",
        "metadata": { "name": "platform" },
        "spec": { "delegations": [{
            "namespaces": ["team-*"],
            "database": [{ "mount": "database", "role": "{{ namespace }}-*" }],
            "maxTtl": "1h",
        }] },
    });
    assert!(cluster.apply(&delegation).status.success());
    let (state, _, message) = accepted(cluster, "clusteraccesspolicy/platform", 1).await;
    assert_eq!(state, "True", "{message}");

    // 2. Outside the delegation: Rejected with the reason; not served.
    let theirs = access_binding(
        "theirs",
        json!({ "database": { "mount": "database", "role": "team-b-ro" } }),
    );
    assert!(cluster.apply(&theirs).status.success());
    let (state, reason, message) = accepted(cluster, "accessbinding/theirs", 1).await;
    assert_eq!((state.as_str(), reason.as_str()), ("False", "Rejected"));
    assert!(
        message.contains("database `database` role `team-b-ro` is not delegated")
            && message.contains("database database roles `team-a-*`"),
        "{message}"
    );
    assert_eq!(
        metric_value(&env.admin_url, "tessera_policy_resources_rejected", "").await,
        Some(1.0),
        "the rejected resource is counted for the alert"
    );
    let token = env.token("team-a", "app");
    let status = env.fetch(&token, &["theirs"]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // 3. Within it: Accepted, and served to the namespace's pod in seconds.
    let ours = access_binding(
        "orders-db",
        json!({ "database": { "mount": "database", "role": "team-a-ro" } }),
    );
    assert!(cluster.apply(&ours).status.success());
    let (state, reason, _) = accepted(cluster, "accessbinding/orders-db", 1).await;
    assert_eq!((state.as_str(), reason.as_str()), ("True", "Accepted"));
    let request = || WatchRequest {
        bindings: vec!["orders-db".to_owned()],
        ..Default::default()
    };
    // Accepted means compiled into the policy every replica serves.
    let mut stream = env
        .client()
        .await
        .watch(with_token(&token, request()))
        .await
        .expect("an accepted binding is served")
        .into_inner();
    let credential = stream.message().await.unwrap().unwrap().credential.unwrap();
    let user = String::from_utf8(credential.fields["username"].clone()).unwrap();
    let password = String::from_utf8(credential.fields["password"].clone()).unwrap();
    assert!(pg.can_login(&user, &password), "the delivered login works");
    // Another namespace's pod does not get it.
    let other = env.token("team-b", "app");
    assert!(env.fetch(&other, &["orders-db"]).await.is_err());

    // The review commands read the same resources, from the cluster or as
    // kubectl prints them, and say the same.
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let policy_command = |args: &[&str]| {
        let output = Command::new(binary("tessera-broker"))
            .arg("policy")
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, said) = policy_command(&["check", "--from-cluster", "--kubeconfig", &kubeconfig]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("AccessBinding team-a/theirs: binding `theirs` is outside what namespace `team-a` may define"),
        "{said}"
    );
    let (code, said) = policy_command(&[
        "explain",
        "--from-cluster",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "team-a",
        "--service-account",
        "app",
        "-o",
        "json",
    ]);
    assert_eq!(
        code,
        Some(1),
        "explain refuses a policy with a rejected resource: {said}"
    );
    cluster.run(&["delete", "accessbinding", "theirs", "-n", "team-a"]);
    let (code, said) = policy_command(&[
        "explain",
        "--from-cluster",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "team-a",
        "--service-account",
        "app",
    ]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("orders-db"), "{said}");
    let listed = env.dir.path().join("live.yaml");
    std::fs::write(
        &listed,
        cluster.run(&[
            "get",
            "clusteraccesspolicies,accessbindings",
            "-A",
            "-o",
            "yaml",
        ]),
    )
    .unwrap();
    let (code, said) = policy_command(&["check", listed.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("ok: 1 binding"), "{said}");

    // 4. Deleted: the stream ends POLICY_CHANGED and the lease is revoked.
    cluster.run(&["delete", "accessbinding", "orders-db", "-n", "team-a"]);
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the stream to end within 20 s")
        .unwrap_err();
    assert_eq!(
        StreamEnd::of(&ended),
        Some(StreamEnd::PolicyChanged),
        "{ended:?}"
    );
    wait_for(Duration::from_secs(20), "the lease to be revoked", || {
        (!pg.can_login(&user, &password)).then_some(())
    })
    .await;
    assert!(env.bao.leases("database/creds/team-a-ro").is_empty());
    let status = env.fetch(&token, &["orders-db"]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}
