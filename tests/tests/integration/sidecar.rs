//! The sidecar's volume contract: tmpfs only, clear failures, consistent snapshots.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use tessera_tests::{Env, free_port, random_string, simple_policy, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_non_tmpfs_output_dir_is_refused() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "p" }))
        .await;
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let output = env.sidecar_once(
        &env.token_file("shop", "orders"),
        disk.path(),
        &["app"],
        &[],
    );
    assert_eq!(output.status.code(), Some(64), "EX_USAGE");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not on tmpfs"), "{stderr}");
    assert_eq!(fs::read_dir(disk.path()).unwrap().count(), 0);

    let allowed = env.sidecar_once(
        &env.token_file("shop", "orders"),
        disk.path(),
        &["app"],
        &["--allow-non-tmpfs"],
    );
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn once_fails_clearly_when_the_broker_is_unreachable() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    let closed = format!("https://127.0.0.1:{}", free_port());
    let output = std::process::Command::new(tessera_tests::binary("tessera-sidecar"))
        .args(["once", "--broker", &closed, "--ca-file"])
        .arg(env.dir.path().join("dev/ca.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(out.path())
        .args(["--binding", "app"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69), "EX_UNAVAILABLE");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Unavailable") || stderr.contains("unavailable"),
        "{stderr}"
    );
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}

/// Reads every field of one snapshot: resolve `..data` once, then read the
/// files inside that directory (what a careful reader of a Secret volume does).
fn read_snapshot(dir: &Path) -> Option<Vec<String>> {
    let target = fs::read_link(dir.join("..data")).ok()?;
    let snapshot = dir.join(target);
    ["a", "b", "c"]
        .iter()
        .map(|f| fs::read_to_string(snapshot.join(f)).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_never_sees_fields_from_two_versions() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "a": "v0", "b": "v0", "c": "v0" }))
        .await;
    let out = env.tmpfs_out();
    let _sidecar = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["app"]);
    let dir = out.path().join("app");
    wait_for(Duration::from_secs(20), "first delivery", || {
        read_snapshot(&dir)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A read that races the removal of an old snapshot finds
                // nothing; it never finds a mix.
                if let Some(values) = read_snapshot(&dir) {
                    assert!(
                        values.iter().all(|v| *v == values[0]),
                        "mixed versions in one snapshot: {values:?}"
                    );
                    seen.insert(values[0].clone());
                    reads += 1;
                }
            }
            (seen, reads)
        })
    };
    for version in 1..=30 {
        let v = format!("v{version}-{}", random_string(8));
        env.bao
            .put("shop/orders", &json!({ "a": v, "b": v, "c": v }))
            .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let last = format!("v31-{}", random_string(8));
    env.bao
        .put("shop/orders", &json!({ "a": last, "b": last, "c": last }))
        .await;
    wait_for(Duration::from_secs(20), "the last version", || {
        read_snapshot(&dir).filter(|v| v[0] == last)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (seen, reads) = reader.join().unwrap();
    assert!(
        seen.len() >= 3,
        "the reader saw several rotations ({seen:?}, {reads} reads)"
    );
}

/// `tessera-sidecar whoami` (what `helm test` runs) against `token_file`.
fn whoami(env: &Env, token_file: &Path) -> std::process::Output {
    std::process::Command::new(tessera_tests::binary("tessera-sidecar"))
        .args(["whoami", "--broker", &env.broker_uri, "--ca-file"])
        .arg(env.ca_file())
        .arg("--token-file")
        .arg(token_file)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn whoami_prints_the_verified_identity_and_what_it_is_granted() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    let granted = whoami(&env, &env.token_file("shop", "orders"));
    let stdout = String::from_utf8_lossy(&granted.stdout);
    assert!(
        granted.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    assert!(stdout.contains("namespace: shop\n"), "{stdout}");
    assert!(stdout.contains("service account: orders\n"), "{stdout}");
    assert!(stdout.contains("pod: orders-0\n"), "{stdout}");
    assert!(stdout.contains("bindings granted: app\n"), "{stdout}");

    // Deny by default: a verified identity the policy names nowhere.
    let stranger = whoami(&env, &env.token_file("shop", "billing"));
    assert!(stranger.status.success());
    assert!(
        String::from_utf8_lossy(&stranger.stdout).contains("bindings granted: none\n"),
        "{}",
        String::from_utf8_lossy(&stranger.stdout)
    );

    // A token for another audience is refused, and the refusal says why.
    let mut spec = tessera_broker::dev::TokenSpec::new("shop", "orders");
    spec.audience = "vault".to_owned();
    let wrong = env.dir.path().join("token-wrong-audience");
    fs::write(&wrong, env.signer.mint(&spec)).unwrap();
    let refused = whoami(&env, &wrong);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("token audience does not include `tessera`"),
        "{stderr}"
    );
    assert!(refused.stdout.is_empty());
}

/// A loopback HTTP endpoint that answers 200 and keeps each request line.
fn reload_endpoint() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            // The rest of the head, up to the blank line.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            record.lock().unwrap().push(first.trim_end().to_owned());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_reloads_the_app_by_signal_to_its_process_and_by_http() {
    use std::os::unix::process::ExitStatusExt as _;
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/orders")).await;
    env.bao
        .put("shop/orders", &json!({ "password": "one" }))
        .await;
    // The app: a real process with a name of its own, which SIGHUP ends.
    let bin = tempfile::tempdir().unwrap();
    let app_binary = bin.path().join("tsr-reload-app");
    fs::copy("/bin/sleep", &app_binary).unwrap();
    let mut app = std::process::Command::new(&app_binary)
        .arg("120")
        .spawn()
        .unwrap();
    let (port, posts) = reload_endpoint();
    let out = env.tmpfs_out();
    let url = format!("http://127.0.0.1:{port}/-/reload");
    let _run = env.sidecar_run_with(
        &env.token_file("shop", "orders"),
        out.path(),
        &["app"],
        &[
            "--notify-signal",
            "HUP",
            "--notify-process",
            "tsr-reload-app",
            "--notify-url",
            &url,
        ],
    );
    let password = |out: &Path| fs::read_to_string(out.join("app/password")).ok();
    wait_for(Duration::from_secs(20), "delivery", || {
        password(out.path()).filter(|p| p == "one")
    })
    .await;
    // The first delivery is not a rotation: nothing is told.
    assert!(
        app.try_wait().unwrap().is_none(),
        "signalled on first write"
    );
    assert!(posts.lock().unwrap().is_empty());

    env.bao
        .put("shop/orders", &json!({ "password": "two" }))
        .await;
    wait_for(Duration::from_secs(20), "the new version", || {
        password(out.path()).filter(|p| p == "two")
    })
    .await;
    let status = wait_for(Duration::from_secs(10), "the app to get SIGHUP", || {
        app.try_wait().unwrap()
    })
    .await;
    assert_eq!(status.signal(), Some(1), "ended by SIGHUP: {status:?}");
    let seen = wait_for(Duration::from_secs(10), "the reload POST", || {
        let seen = posts.lock().unwrap().clone();
        (!seen.is_empty()).then_some(seen)
    })
    .await;
    assert_eq!(seen, ["POST /-/reload HTTP/1.1"]);
}
