//! Sources against engines OpenBao ships and real servers: database users
//! read from a plain Vault path (`vault:`) live exactly like the database
//! kind's (they log in, rotate with overlap, and stop logging in once
//! revoked); a TOTP code (an answer without a lease) is read whenever the pod
//! asks; a Kubernetes service-account token from OpenBao's `kubernetes`
//! engine works against a second real API server until it is revoked, and so
//! does a RabbitMQ user from the `rabbitmq` engine against a real RabbitMQ;
//! MariaDB and Redis users come through the database kind.

use std::{fs, time::Duration};

use serde_json::json;
use tessera_tests::{
    Cluster, Env, MariaDb, Postgres, RabbitMq, Redis, answer_text, db_policy, field, wait_for,
};

/// [`db_policy`] with the binding's source as a plain Vault path.
fn path_policy(ttl: &str, fraction: &str, overlap: &str) -> String {
    let policy = db_policy(ttl, fraction, overlap)
        .replace(
            "source: { database: { mount: database, role: orders } }",
            "source: { vault: { path: database/creds/orders, fields: [username, password] } }",
        )
        .replace("minTtl: { database: 1s }", "minTtl: { vault: 1s }");
    assert!(policy.contains("vault: { path"), "{policy}");
    policy
}

fn login(out: &std::path::Path) -> (String, String) {
    (
        field(out, "db", "username").unwrap(),
        field(out, "db", "password").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn database_users_from_a_vault_path_log_in_rotate_and_end_like_the_database_kind() {
    let pg = Postgres::start();
    let env = Env::start(&path_policy("6s", "0.5", "3s")).await;
    env.bao.database_role(&pg, "orders", "6s", "10s");
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let old = login(out.path());
    assert!(pg.can_login(&old.0, &old.1), "the delivered user logs in");
    let issued = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "issue")
        .unwrap();
    assert_eq!(
        issued["source"],
        "vault read database/creds/orders fields [username, password]"
    );
    assert!(
        issued["lease_id_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "the lease is named by its digest: {issued}"
    );

    // The role's max TTL (10 s) stops renewals: a successor comes before
    // the end, and the old user is revoked once the overlap has passed.
    let new = wait_for(Duration::from_secs(40), "a rotation", || {
        field(out.path(), "db", "username")
            .filter(|user| *user != old.0)
            .map(|_| login(out.path()))
    })
    .await;
    assert!(pg.can_login(&new.0, &new.1), "the successor logs in");
    wait_for(
        Duration::from_secs(20),
        "the superseded user to be revoked",
        || (!pg.can_login(&old.0, &old.1)).then_some(()),
    )
    .await;

    // Given back, the current user stops logging in.
    let handle = fs::read_to_string(out.path().join("db/..data/..handle")).unwrap();
    let revoked = env
        .revoke_held(&env.token("shop", "orders"), &[("db", &handle)])
        .await;
    assert_eq!(revoked, ["db"]);
    assert!(
        !pg.can_login(&new.0, &new.1),
        "a revoked user no longer logs in"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_totp_code_from_a_vault_path_is_a_valid_code_read_when_asked() {
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: otp
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { vault: { path: totp/code/orders } }
",
    )
    .await;
    env.bao.cli(&["secrets", "enable", "totp"]);
    env.bao.cli(&[
        "write",
        "totp/keys/orders",
        "generate=true",
        "issuer=Tessera",
        "account_name=orders@shop",
    ]);
    let token = env.token("shop", "orders");
    let answer = env.fetch(&token, &["otp"]).await.unwrap();
    let code = answer_text(&answer, "otp", "code");
    assert!(
        code.len() == 6 && code.chars().all(|c| c.is_ascii_digit()),
        "a six-digit code: {code}"
    );
    let issued = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "issue" && e["binding"] == "otp")
        .unwrap();
    assert_eq!(issued["source"], "vault read totp/code/orders");
    assert!(
        issued
            .get("lease_id_sha256")
            .is_none_or(serde_json::Value::is_null),
        "an answer without a lease names none: {issued}"
    );
    let valid = env.bao.cli(&[
        "write",
        "-field=valid",
        "totp/code/orders",
        &format!("code={code}"),
    ]);
    assert_eq!(valid.trim(), "true", "OpenBao accepts the code it gave");
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_and_redis_users_from_the_database_kind_log_in_and_fail_once_revoked() {
    let mariadb = MariaDb::start();
    let redis = Redis::start();
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: maria
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: shop-maria } }
    ttl: 10m
  - name: cache
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: shop-redis } }
    ttl: 10m
",
    )
    .await;
    env.bao.mariadb_role(&mariadb, "shop-maria", "10m", "1h");
    env.bao.redis_role(&redis, "shop-redis", "10m", "1h");
    let token = env.token("shop", "orders");
    let answer = env.fetch(&token, &["maria", "cache"]).await.unwrap();
    let text = |binding: &str, field: &str| answer_text(&answer, binding, field);
    let maria = (text("maria", "username"), text("maria", "password"));
    let cache = (text("cache", "username"), text("cache", "password"));
    assert!(
        mariadb.can_login(&maria.0, &maria.1),
        "the MariaDB user logs in"
    );
    assert!(
        !mariadb.can_login(&maria.0, "not-the-password"),
        "MariaDB checks passwords"
    );
    assert!(
        redis.can_login(&cache.0, &cache.1),
        "the Redis user logs in"
    );
    assert!(
        !redis.can_login(&cache.0, "not-the-password"),
        "Redis checks passwords"
    );

    let held: Vec<(&str, &str)> = answer
        .credentials
        .iter()
        .map(|c| (c.binding.as_str(), c.handle.as_str()))
        .collect();
    let revoked = env.revoke_held(&token, &held).await;
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    assert!(
        !mariadb.can_login(&maria.0, &maria.1),
        "a revoked MariaDB user no longer logs in"
    );
    assert!(
        !redis.can_login(&cache.0, &cache.1),
        "a revoked Redis user no longer logs in"
    );
}

/// Whether `token` authenticates to `cluster` as `user` (`kubectl auth whoami`).
fn authenticates_as(cluster: &Cluster, token: &str, user: &str) -> bool {
    let output = std::process::Command::new(tessera_tests::kubernetes::kubectl_binary())
        .args(["--kubeconfig", "/dev/null", "--server", &cluster.server])
        .arg(format!(
            "--certificate-authority={}",
            cluster.ca_file().display()
        ))
        .args(["--token", token, "auth", "whoami", "-o", "json"])
        .output()
        .unwrap();
    output.status.success()
        && serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .is_ok_and(|review| review["status"]["userInfo"]["username"] == user)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubernetes_token_from_a_vault_path_authenticates_until_it_is_revoked() {
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: kube
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source:
      vault:
        path: kubernetes/creds/lister
        operation: write
        data: { kubernetes_namespace: apps }
        fields: [service_account_name, service_account_token]
",
    )
    .await;
    // A second API server, not the broker's: the one the engine mints for.
    let cluster = Cluster::start();
    cluster.service_account("apps", "default");
    cluster.service_account("vault", "openbao");
    let bound = cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": { "name": "openbao-manages-service-accounts" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
        "subjects": [{ "kind": "ServiceAccount", "name": "openbao", "namespace": "vault" }]
    }));
    assert!(
        bound.status.success(),
        "{}",
        String::from_utf8_lossy(&bound.stderr)
    );
    let engine_token = cluster.run(&[
        "create",
        "token",
        "openbao",
        "-n",
        "vault",
        "--duration=3600s",
    ]);
    let bao = &env.bao;
    bao.cli(&["secrets", "enable", "kubernetes"]);
    bao.cli(&[
        "write",
        "kubernetes/config",
        &format!("kubernetes_host={}", cluster.server),
        &format!("kubernetes_ca_cert=@{}", cluster.ca_file().display()),
        &format!("service_account_jwt={}", engine_token.trim()),
        "disable_local_ca_jwt=true",
    ]);
    // The engine makes a service account (and its role) per credential, and
    // deletes them when the lease is revoked.
    bao.cli(&[
        "write",
        "kubernetes/roles/lister",
        "allowed_kubernetes_namespaces=apps",
        "kubernetes_role_type=Role",
        r#"generated_role_rules={"rules":[{"apiGroups":[""],"resources":["pods"],"verbs":["list"]}]}"#,
        "token_default_ttl=10m",
    ]);
    bao.write_broker_policy_with(r#"path "kubernetes/creds/*" { capabilities = ["update"] }"#);

    let token = env.token("shop", "orders");
    let answer = env.fetch(&token, &["kube"]).await.unwrap();
    let credential = &answer.credentials[0];
    let text = |field: &str| answer_text(&answer, "kube", field);
    let user = format!(
        "system:serviceaccount:apps:{}",
        text("service_account_name")
    );
    let kube_token = text("service_account_token");
    assert!(
        authenticates_as(&cluster, &kube_token, &user),
        "the delivered token is {user} on the second API server"
    );
    let revoked = env
        .revoke_held(&token, &[("kube", credential.handle.as_str())])
        .await;
    assert_eq!(revoked, ["kube"]);
    wait_for(
        Duration::from_secs(20),
        "the revoked token to stop working",
        || (!authenticates_as(&cluster, &kube_token, &user)).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_user_from_a_vault_path_logs_in_until_it_is_revoked() {
    let rabbit = RabbitMq::start();
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { vault: 1s }
bindings:
  - name: queue
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { vault: { path: rabbitmq/creds/orders, fields: [username, password] } }
    ttl: 10m
",
    )
    .await;
    let bao = &env.bao;
    bao.cli(&["secrets", "enable", "rabbitmq"]);
    bao.cli(&[
        "write",
        "rabbitmq/config/connection",
        &format!("connection_uri=http://127.0.0.1:{}", rabbit.management_port),
        "username=guest",
        "password=guest",
    ]);
    bao.cli(&[
        "write",
        "rabbitmq/roles/orders",
        r#"vhosts={"/":{"configure":"","write":"orders.*","read":"orders.*"}}"#,
        // The management API (where the test logs in) admits tagged users only.
        "tags=management",
    ]);
    bao.write_broker_policy_with(r#"path "rabbitmq/creds/*" { capabilities = ["read"] }"#);

    let token = env.token("shop", "orders");
    let answer = env.fetch(&token, &["queue"]).await.unwrap();
    let credential = &answer.credentials[0];
    let text = |field: &str| answer_text(&answer, "queue", field);
    let (user, password) = (text("username"), text("password"));
    assert!(
        rabbit.can_login(&user, &password),
        "the RabbitMQ user logs in"
    );
    assert!(
        !rabbit.can_login(&user, "not-the-password"),
        "RabbitMQ checks passwords"
    );
    let issued = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "issue" && e["binding"] == "queue")
        .unwrap();
    assert!(
        issued["lease_id_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "the engine's answer is a lease, recorded like a database user's: {issued}"
    );
    let revoked = env
        .revoke_held(&token, &[("queue", credential.handle.as_str())])
        .await;
    assert_eq!(revoked, ["queue"]);
    assert!(
        !rabbit.can_login(&user, &password),
        "a revoked RabbitMQ user no longer logs in"
    );
}

/// Found in this session: a binding set aside (its source cannot make its
/// files) for which the pod asked a shorter TTL (`--max-ttl`) was still named
/// in the watch of the other bindings' `max_ttl_seconds`, which the broker
/// refuses; the sidecar stopped instead of serving the others.
#[tokio::test(flavor = "multi_thread")]
async fn a_binding_set_aside_with_a_shorter_ttl_leaves_the_others_served() {
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: { vault: 1s }
bindings:
  - name: app
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/app } }
  - name: broken
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { vault: { path: secret/data/shop/app, fields: [nope] } }
",
    )
    .await;
    env.bao.put("shop/app", &json!({ "k": "v" })).await;
    let out = env.tmpfs_out();
    let mut sidecar = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["app", "broken"],
        &["--max-ttl", "broken=600s", "--backoff-max", "2s"],
    );
    wait_for(Duration::from_secs(20), "the other binding's files", || {
        field(out.path(), "app", "k")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !sidecar.exited(),
        "the sidecar goes on without the binding set aside:\n{}",
        sidecar.output()
    );
    assert_eq!(field(out.path(), "app", "k").as_deref(), Some("v"));
    let status = fs::read_to_string(out.path().join("..tessera-status.json")).unwrap();
    assert!(
        status.contains("broken"),
        "the status names the binding set aside: {status}"
    );
}

/// #24: an answer without a lease is a static secret checked like KV at
/// the binding's `refreshInterval`: a change is pushed to the pod, the same
/// values read again are not.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_without_a_lease_is_read_again_at_the_refresh_interval_and_pushed_only_when_changed()
 {
    let env = Env::start(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: legacy
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { vault: { path: kv1/orders } }
    refreshInterval: 1s
",
    )
    .await;
    env.bao
        .cli(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    env.bao.cli(&["write", "kv1/orders", "password=first"]);
    env.bao
        .write_broker_policy_with(r#"path "kv1/*" { capabilities = ["read"] }"#);
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["legacy"]);
    wait_for(Duration::from_secs(20), "the first value", || {
        field(out.path(), "legacy", "password").filter(|v| v == "first")
    })
    .await;
    let rotations = |env: &Env| {
        env.audit_events()
            .iter()
            .filter(|e| e["action"] == "rotate" && e["binding"] == "legacy")
            .count()
    };
    // Three refresh intervals with the same values: nothing pushed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rotations(&env), 0, "the same values are not pushed again");
    env.bao.cli(&["write", "kv1/orders", "password=second"]);
    wait_for(Duration::from_secs(20), "the changed value", || {
        field(out.path(), "legacy", "password").filter(|v| v == "second")
    })
    .await;
    assert_eq!(rotations(&env), 1, "the change is pushed once");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rotations(&env), 1, "and only once");
}
