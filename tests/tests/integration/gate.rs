//! #26: Vault as a second gate. A binding with `vaultGate` is read with the
//! pod's own Vault token (a JWT login with its service-account token), so a
//! Vault policy that denies one service account what the Tessera policy
//! grants it refuses that pod: refused (PERMISSION_DENIED naming the gate),
//! audited, explained by `policy explain`; and Vault's audit log names the
//! pod's own login for the read it allowed.

use std::{fs, process::Command};

use serde_json::{Value, json};
use tessera_broker::dev;
use tessera_tests::{Env, binary, wait_for};
use tonic::Code;

const POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app
    subjects:
      - { namespace: shop, serviceAccount: orders }
      - { namespace: shop, serviceAccount: intruder }
    source: { kv2: { mount: secret, path: shop/orders } }
    vaultGate: { mount: jwt, role: \"{{ serviceAccount }}\" }
";

#[tokio::test(flavor = "multi_thread")]
async fn a_vault_policy_that_denies_a_service_account_refuses_it_what_tessera_grants() {
    let env = Env::start(POLICY).await;
    env.bao
        .put("shop/orders", &json!({ "password": "gate-ok" }))
        .await;
    let key = fs::read_to_string(env.dir.path().join("dev").join(dev::files::SIGNING_KEY)).unwrap();
    env.bao.enable_jwt_auth(&key);
    let rules = env.dir.path().join("orders-read.hcl");
    fs::write(
        &rules,
        r#"path "secret/data/shop/orders" { capabilities = ["read"] }"#,
    )
    .unwrap();
    env.bao
        .cli(&["policy", "write", "orders-read", rules.to_str().unwrap()]);
    for (role, policy) in [("orders", "orders-read"), ("intruder", "default")] {
        let subject = format!("system:serviceaccount:shop:{role}");
        env.bao.pod_jwt_role(role, &subject, "tessera", policy);
    }

    // Vault's policy for `orders` allows the read: served.
    let answer = env
        .fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap();
    assert_eq!(answer.credentials[0].fields["password"], b"gate-ok");

    // Vault's policy for `intruder` does not: refused, naming the gate.
    let refused = env
        .fetch(&env.token("shop", "intruder"), &["app"])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("second gate (auth/jwt role `{{ serviceAccount }}`)"),
        "{}",
        refused.message()
    );
    let denied = wait_for(
        std::time::Duration::from_secs(10),
        "the refusal's audit line",
        || {
            env.audit_events()
                .into_iter()
                .find(|e| e["service_account"] == "intruder" && e["outcome"] == "denied")
        },
    )
    .await;
    assert_eq!(denied["binding"], "app");
    assert!(
        denied["reason"].as_str().unwrap().contains("second gate"),
        "{denied}"
    );

    // Vault's audit log: the read it allowed for the pod was made with the
    // pod's own login (its role and service account), and the one it
    // refused too. (The broker also watches the secret's version with its
    // own token.)
    let log = fs::read_to_string(&env.bao.audit_log).unwrap();
    let reads: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            entry["type"] == "response"
                && entry["request"]["path"] == "secret/data/shop/orders"
                && entry["auth"]["metadata"]["role"].is_string()
        })
        .collect();
    let by = |role: &str| {
        reads
            .iter()
            .find(|entry| entry["auth"]["metadata"]["role"] == role)
            .unwrap_or_else(|| panic!("no read as role {role}: {reads:?}"))
    };
    assert_eq!(
        by("orders")["auth"]["display_name"],
        "jwt-system:serviceaccount:shop:orders"
    );
    assert!(
        by("intruder")["error"]
            .as_str()
            .is_some_and(|e| e.contains("permission denied")),
        "{}",
        by("intruder")
    );

    // `policy explain` says the gate is there.
    let explained = Command::new(binary("tessera-broker"))
        .args(["policy", "explain", "--namespace", "shop"])
        .args(["--service-account", "intruder"])
        .arg(env.dir.path().join("policy"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains("vault gate      auth/jwt role `{{ serviceAccount }}`"),
        "{text}"
    );
}
