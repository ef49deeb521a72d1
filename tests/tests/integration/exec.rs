//! `tessera-sidecar exec`: the app as a child with its credentials in the
//! environment, against the real broker and OpenBao.

use std::{fs, time::Duration};

use serde_json::json;
use tessera_tests::{Env, lines, simple_policy, wait_for};

/// A shell app that logs what it sees: its password at start, the signals
/// it gets, and exits 7 on SIGTERM.
const APP: &str = r#"echo "start $APP_PASSWORD" >> "$LOG"
trap 'echo usr1 >> "$LOG"' USR1
trap 'echo term >> "$LOG"; exit 7' TERM
while true; do sleep 0.05; done"#;

#[tokio::test(flavor = "multi_thread")]
async fn exec_puts_credentials_in_the_environment_and_restarts_the_app_once_per_rotation() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "one" }))
        .await;
    let log = env.dir.path().join("app.log");
    let script = format!("LOG={}; {APP}", log.display());
    let mut exec = env.sidecar_exec(
        &env.token_file("shop", "orders"),
        &["app"],
        &["--grace", "5s"],
        &["sh", "-c", &script],
    );
    wait_for(Duration::from_secs(20), "the app to start", || {
        lines(&log).contains(&"start one".to_owned()).then_some(())
    })
    .await;

    // Signals reach the app.
    exec.signal("USR1");
    wait_for(Duration::from_secs(10), "the forwarded USR1", || {
        lines(&log).contains(&"usr1".to_owned()).then_some(())
    })
    .await;

    // A new version restarts the app with it, once.
    env.bao
        .put("shop/orders", &json!({ "password": "two" }))
        .await;
    wait_for(Duration::from_secs(20), "the restart", || {
        lines(&log).contains(&"start two".to_owned()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = lines(&log);
    assert_eq!(
        seen,
        ["start one", "usr1", "term", "start two"],
        "one graceful restart for one rotation"
    );

    // SIGTERM goes to the app, and its exit status is the wrapper's.
    assert_eq!(exec.terminate(), Some(7), "{}", exec.output());
    assert_eq!(lines(&log).last().map(String::as_str), Some("term"));
    assert!(
        !exec.output().contains("two"),
        "no value in the wrapper's logs: {}",
        exec.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_exits_with_the_apps_status_and_names_variables_by_binding_and_field() {
    let env = Env::start(&simple_policy("orders-db", "shop", "orders", "shop/orders")).await;
    env.bao
        .put(
            "shop/orders",
            &json!({ "db-user": "app", "password": "pw" }),
        )
        .await;
    let mut exec = env.sidecar_exec(
        &env.token_file("shop", "orders"),
        &["orders-db"],
        &["--env-prefix", "my_"],
        &[
            "sh",
            "-c",
            r#"test "$MY_ORDERS_DB_DB_USER:$MY_ORDERS_DB_PASSWORD" = "app:pw" && exit 3; exit 1"#,
        ],
    );
    wait_for(Duration::from_secs(20), "the app to exit", || {
        exec.exited().then_some(())
    })
    .await;
    assert_eq!(exec.exit_code(), Some(3), "{}", exec.output());
}

#[test]
fn install_copies_a_binary_every_user_can_run() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let installed = std::process::Command::new(tessera_tests::binary("tessera-sidecar"))
        .arg("install")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let copy = dir.path().join("tessera-sidecar");
    assert_eq!(
        fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o555
    );
    let version = std::process::Command::new(&copy)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("tessera-sidecar "));
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no partial file left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_looping_app_in_env_mode_keeps_one_database_user() {
    let pg = tessera_tests::Postgres::start();
    let env = Env::start(&tessera_tests::db_policy("10m", "0.7", "5s")).await;
    env.bao.database_role(&pg, "orders", "10m", "1h");
    // The memory-backed volume the webhook gives env-mode pods.
    let state = env.tmpfs_out();
    let dir = state.path().join("app");
    let log = env.dir.path().join("users.log");
    let crash = format!(
        "echo \"$DB_USERNAME $DB_PASSWORD\" >> {}; exit 3",
        log.display()
    );
    for restart in 0..10 {
        let mut exec = env.sidecar_exec(
            &env.token_file("shop", "orders"),
            &["db"],
            &["--state-dir", dir.to_str().unwrap()],
            &["sh", "-c", &crash],
        );
        let code = wait_for(Duration::from_secs(20), "the app to crash", || {
            exec.exit_code()
        })
        .await;
        assert_eq!(code, 3, "restart {restart}: the app's own status");
    }
    let seen = lines(&log);
    assert_eq!(seen.len(), 10);
    assert!(
        seen.iter().all(|line| *line == seen[0]),
        "one user across 10 restarts: {seen:?}"
    );
    let (user, password) = seen[0].split_once(' ').unwrap();
    assert!(pg.can_login(user, password));
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "one lease in Vault"
    );
    // What the wrapper keeps is owner-read-only, on the memory volume.
    let kept = dir.join("db");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&kept).unwrap().permissions())
            & 0o777,
        0o400
    );
    // A store on disk is refused, naming the fix.
    let mut on_disk = env.sidecar_exec(
        &env.token_file("shop", "orders"),
        &["db"],
        &[
            "--state-dir",
            env.dir.path().join("state").to_str().unwrap(),
        ],
        &["true"],
    );
    wait_for(Duration::from_secs(20), "the refusal", || {
        on_disk.exit_code()
    })
    .await;
    assert!(
        on_disk.output().contains("not on tmpfs or ramfs"),
        "{}",
        on_disk.output()
    );
}
