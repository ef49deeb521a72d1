//! Memory hygiene: a secret rotated away is gone from the broker's and the
//! sidecar's memory (zero-on-free allocator, zeroizing types), and neither
//! process can dump core. The memory is read as root through `/proc/PID/mem`;
//! negative controls find the values that should be there, so the scan cannot
//! pass vacuously.

use std::{fs, process::Command, time::Duration};

use serde_json::json;
use tessera_tests::{
    ConnectionsConfig, Env, Postgres, db_policy, field, memory_occurrences, random_string,
    simple_policy, wait_for,
};

/// A recognizable value that occurs nowhere else.
fn unique(tag: &str) -> String {
    format!("tessera-{tag}-{}", random_string(24))
}

/// `Max core file size` of a process, from `/proc/PID/limits`.
fn core_limit(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Locked memory of a process in kB, from `/proc/PID/status`.
fn locked_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Occurrences of `needles` in process `pid`, scanned again for a few
/// seconds while any is left: freeing a closed connection's buffers is
/// asynchronous (its tasks end on their next poll), and a loaded machine is
/// slow to get there. What is still there after the wait is returned.
async fn once_settled(pid: u32, needles: &[&str]) -> Vec<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = memory_occurrences(pid, needles);
        if counts.iter().all(|&n| n == 0) || std::time::Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn superseded_kv_values_are_gone_from_broker_and_sidecar_memory() {
    let env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    let out = env.tmpfs_out();
    let mut values = Vec::new();
    let mut run = None;
    for round in 0..4 {
        let value = unique(&format!("kv{round}"));
        env.bao.put("shop/app", &json!({ "password": value })).await;
        if run.is_none() {
            run = Some(env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["app"]));
        }
        wait_for(
            Duration::from_secs(20),
            "the rotation to reach the files",
            || field(out.path(), "app", "password").filter(|v| *v == value),
        )
        .await;
        values.push(value);
    }
    let sidecar = run.unwrap();

    let needles: Vec<&str> = values.iter().map(String::as_str).collect();
    let current = memory_occurrences(env.broker.pid(), &needles[3..]);
    assert!(
        current[0] > 0,
        "negative control: the broker holds the current value (its KV feed)"
    );
    let broker = once_settled(env.broker.pid(), &needles[..3]).await;
    let side = once_settled(sidecar.pid(), &needles[..3]).await;
    assert_eq!(
        broker,
        [0, 0, 0],
        "superseded values in the broker's memory"
    );
    assert_eq!(side, [0, 0, 0], "superseded values in the sidecar's memory");

    // Neither process can dump core; memory is locked (root may lock).
    for pid in [env.broker.pid(), sidecar.pid()] {
        assert_eq!(core_limit(pid), "0 0", "RLIMIT_CORE of {pid}");
        assert!(locked_kb(pid) > 0, "memory of {pid} is locked");
    }
    assert!(
        env.broker
            .output()
            .contains("memory hygiene: core dumps off, memory locked")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn superseded_database_passwords_are_gone_from_broker_and_sidecar_memory() {
    let pg = Postgres::start();
    let env = Env::start(&db_policy("4s", "0.5", "1s")).await;
    // A max TTL of 4s: every refresh is a rotation with a new password.
    env.bao.database_role(&pg, "orders", "4s", "4s");
    let out = env.tmpfs_out();
    let sidecar = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    let mut passwords: Vec<String> = Vec::new();
    wait_for(Duration::from_secs(40), "three rotations", || {
        if let Some(password) = field(out.path(), "db", "password")
            && passwords.last() != Some(&password)
        {
            passwords.push(password);
        }
        (passwords.len() >= 4).then_some(())
    })
    .await;
    // The overlap revocations of the superseded users have run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let superseded: Vec<&str> = passwords[..passwords.len() - 1]
        .iter()
        .map(String::as_str)
        .collect();

    // Negative control: the scanner finds a value a process does hold.
    let holder = Command::new("python3")
        .args([
            "-c",
            "import sys, time; s = sys.argv[1] * 1; time.sleep(30)",
        ])
        .arg(superseded[0])
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = memory_occurrences(holder.id(), &superseded[..1]);
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        held[0] > 0,
        "negative control: the scanner finds a held value"
    );

    let broker = once_settled(env.broker.pid(), &superseded).await;
    let side = once_settled(sidecar.pid(), &superseded).await;
    assert!(
        broker.iter().all(|&n| n == 0),
        "superseded passwords in the broker: {broker:?}"
    );
    assert!(
        side.iter().all(|&n| n == 0),
        "superseded passwords in the sidecar: {side:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_keeps_its_stream_leaves_no_superseded_value_in_the_broker_past_the_connection_age()
 {
    use tessera_proto::v1::WatchRequest;
    let mut env = Env::start(&simple_policy("app", "shop", "orders", "shop/app")).await;
    // A short maximum connection age, so the test is quick (30m by default).
    env.edit_config(|config| {
        config.connections = Some(ConnectionsConfig {
            max_age: Some("2s".to_owned()),
            ..ConnectionsConfig::default()
        });
    });
    env.restart_broker().await;
    let first = unique("kv0");
    env.bao.put("shop/app", &json!({ "password": first })).await;
    let mut stream = env
        .client()
        .await
        .watch(tessera_tests::with_token(
            &env.token("shop", "orders"),
            WatchRequest {
                bindings: vec!["app".into()],
                held: vec![],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let mut values = vec![first];
    for round in 1..4 {
        let value = unique(&format!("kv{round}"));
        env.bao.put("shop/app", &json!({ "password": value })).await;
        let message = stream.message().await.unwrap().unwrap();
        assert_eq!(
            message.credential.unwrap().fields["password"],
            value.as_bytes()
        );
        values.push(value);
    }
    let needles: Vec<&str> = values.iter().map(String::as_str).collect();
    let open = memory_occurrences(env.broker.pid(), &needles[3..]);
    assert!(
        open[0] > 0,
        "negative control: while the stream is open the broker holds the current value"
    );
    // The connection that carried the superseded values reaches its age and
    // grace and is closed: its buffers are freed, and cleared.
    let ended = tokio::time::timeout(Duration::from_secs(15), stream.message()).await;
    assert!(
        matches!(ended, Ok(Err(_) | Ok(None))),
        "the old connection was closed: {ended:?}"
    );
    let broker = once_settled(env.broker.pid(), &needles[..3]).await;
    assert_eq!(
        broker,
        [0, 0, 0],
        "superseded values in the broker's memory"
    );
}
