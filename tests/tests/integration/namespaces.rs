//! Vault namespaces (OpenBao 2.3+, Vault Enterprise): a binding's source in a
//! child namespace is read there (`X-Vault-Namespace`), a database user
//! issued there is resumed, looked up and revoked there, and a binding in a
//! namespace the broker's Vault policy does not reach is refused by Vault.

use serde_json::json;
use tessera_proto::v1::{FetchRequest, Held};
use tessera_tests::{Env, Postgres, answer_text, with_token};
use tonic::Code;

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: app, namespace: team-a } }
  - name: db
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { database: { mount: database, role: orders, namespace: team-a } }
    ttl: 10m
  - name: outside
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: app, namespace: team-b } }
";

#[tokio::test(flavor = "multi_thread")]
async fn a_binding_in_a_child_namespace_is_served_and_revoked_there_and_one_outside_is_refused() {
    let pg = Postgres::start();
    let env = Env::start(POLICY).await;
    let bao = &env.bao;
    for (namespace, password) in [("team-a", "a-secret"), ("team-b", "b-secret")] {
        bao.cli(&["namespace", "create", namespace]);
        bao.cli(&[
            "secrets",
            "enable",
            &format!("-namespace={namespace}"),
            "-path=secret",
            "kv-v2",
        ]);
        bao.cli(&[
            "kv",
            "put",
            &format!("-namespace={namespace}"),
            "-mount=secret",
            "app",
            &format!("password={password}"),
        ]);
    }
    bao.database_role_in(Some("team-a"), &pg, "orders", ("10m", "1h"));
    // The broker's Vault policy (in the root namespace) reaches team-a only.
    bao.write_broker_policy_with(
        r#"
path "team-a/secret/data/*" { capabilities = ["read"] }
path "team-a/secret/metadata/*" { capabilities = ["read"] }
path "team-a/database/creds/*" { capabilities = ["read"] }
path "team-a/sys/leases/lookup" { capabilities = ["update"] }
path "team-a/sys/leases/renew" { capabilities = ["update"] }
path "team-a/sys/leases/revoke" { capabilities = ["update"] }
"#,
    );
    let token = env.token("shop", "orders");
    let answer = env.fetch(&token, &["app", "db"]).await.unwrap();
    let field = |binding: &str, name: &str| answer_text(&answer, binding, name);
    assert_eq!(
        field("app", "password"),
        "a-secret",
        "team-a's secret, not the root's or team-b's"
    );
    let (user, password) = (field("db", "username"), field("db", "password"));
    assert!(
        pg.can_login(&user, &password),
        "the user issued in team-a logs in"
    );
    let handle = answer
        .credentials
        .iter()
        .find(|c| c.binding == "db")
        .unwrap()
        .handle
        .clone();

    // Resumed with its handle: the lease is looked up in team-a.
    let resumed = env
        .client()
        .await
        .fetch(with_token(
            &token,
            FetchRequest {
                bindings: vec!["db".into()],
                held: vec![Held {
                    binding: "db".into(),
                    handle: handle.clone(),
                }],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        resumed.credentials[0].unchanged,
        "the held user is resumed, not reissued"
    );
    assert_eq!(pg.vault_roles(), 1, "one user in all");

    let denied = env.fetch(&token, &["outside"]).await.unwrap_err();
    assert_eq!(denied.code(), Code::FailedPrecondition, "{denied:?}");
    assert!(
        denied.message().contains("denied the broker access"),
        "Vault refused the broker in team-b: {}",
        denied.message()
    );

    let revoked = env.revoke_held(&token, &[("db", &handle)]).await;
    assert_eq!(revoked, ["db"]);
    assert!(
        !pg.can_login(&user, &password),
        "revoked in team-a, it no longer logs in"
    );
    let issue = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "issue" && e["binding"] == "db")
        .unwrap();
    assert_eq!(
        issue["source"],
        json!("database database/creds/orders in namespace team-a")
    );
}
