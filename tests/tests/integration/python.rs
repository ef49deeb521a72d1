//! The Python client (`examples/python`), with stubs generated from the
//! proto by grpcio-tools at test time (PyPI; `scripts/test` installs it),
//! against the real broker, OpenBao and PostgreSQL: Fetch, a Watch that
//! resumes its database user across a broker restart, and a denial.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::json;
use tessera_tests::{Env, Postgres, Proc, db_policy, random_string, wait_for, workspace_root};

fn python() -> PathBuf {
    std::env::var_os("TESSERA_PYTHON").map_or_else(
        || workspace_root().join(".tools/python-grpc/bin/python"),
        PathBuf::from,
    )
}

/// The example and its generated stubs in a fresh directory.
fn generated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = workspace_root();
    let output = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", dir.path().display()))
        .arg(format!("--grpc_python_out={}", dir.path().display()))
        .arg(root.join("proto/tessera/v1/broker.proto"))
        .output()
        .expect("grpcio-tools (scripts/test installs it into .tools/python-grpc)");
    assert!(
        output.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in ["tessera_client.py", "check.py"] {
        std::fs::copy(
            root.join("examples/python").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    dir
}

fn check(env: &Env, dir: &Path, service_account: &str, args: &[&str]) -> Command {
    let mut command = Command::new(python());
    command
        .arg("check.py")
        .args(args)
        .current_dir(dir)
        .env("TESSERA_BROKER", &env.broker_uri)
        .env("TESSERA_CA_FILE", env.ca_file())
        .env(
            "TESSERA_TOKEN_FILE",
            env.token_file("shop", service_account),
        );
    command
}

/// The `username=` of binding `db` in a line `check.py` printed.
fn user_in(line: &str) -> String {
    line.split(['[', ':', ',', ' '])
        .find_map(|part| part.strip_prefix("username="))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_fetches_watches_resumes_and_is_denied() {
    let pg = Postgres::start();
    let policy = db_policy("10m", "0.7", "5s")
        + "  - name: config\n    subjects: [{ namespace: shop, serviceAccount: orders }]\n    source: { kv2: { mount: secret, path: shop/config } }\n";
    let mut env = Env::start(&policy).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    let level = random_string(12);
    env.bao.put("shop/config", &json!({ "level": level })).await;
    let dir = generated();

    let fetched = check(&env, dir.path(), "orders", &["fetch", "config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&fetched.stdout);
    assert!(
        text.contains(&format!("level={level}")),
        "{text}{}",
        String::from_utf8_lossy(&fetched.stderr)
    );

    // Watch: the first set, a KV change, then a broker restart resumed with
    // the handle (the same database user).
    let log = env.dir.path().join("python-watch.log");
    let watch = Proc::spawn(
        "python watch",
        check(&env, dir.path(), "orders", &["watch", "3", "db", "config"]),
        log,
    );
    let first = wait_for(Duration::from_secs(30), "the first set", || {
        watch
            .output()
            .lines()
            .find(|l| l.contains("username="))
            .map(str::to_owned)
    })
    .await;
    let user = user_in(&first);
    assert!(!user.is_empty(), "{first}");
    let changed = random_string(12);
    env.bao
        .put("shop/config", &json!({ "level": changed }))
        .await;
    wait_for(Duration::from_secs(20), "the change", || {
        watch
            .output()
            .contains(&format!("level={changed}"))
            .then_some(())
    })
    .await;
    env.restart_broker().await;
    // The client backs off while the broker is away (doubling from 0.2 s,
    // jittered), so on a loaded machine the reconnect may take a while.
    let lines = wait_for(Duration::from_secs(60), "the resumed set", || {
        let lines: Vec<String> = watch
            .output()
            .lines()
            .filter(|l| l.contains("username="))
            .map(str::to_owned)
            .collect();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    assert_eq!(
        user_in(&lines[2]),
        user,
        "resumed, not minted again: {lines:?}"
    );
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "no second user"
    );

    let denied = check(&env, dir.path(), "billing", &["denied", "db"])
        .output()
        .unwrap();
    assert!(
        denied.status.success(),
        "{}{}",
        String::from_utf8_lossy(&denied.stdout),
        String::from_utf8_lossy(&denied.stderr)
    );
}
