//! The command lines' contracts, as docs/configuration.md states them:
//! sysexits statuses (clap's usage errors included), `policy diff
//! --exit-code`, `--output json` for the policy commands, `audit -` reading
//! standard input, no colour off a terminal.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use tessera_tests::{binary, simple_policy};

fn broker(args: &[&str]) -> std::process::Output {
    Command::new(binary("tessera-broker"))
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .unwrap()
}

fn status(output: &std::process::Output) -> Option<i32> {
    output.status.code()
}

#[test]
fn the_broker_exits_with_sysexits_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    assert_eq!(status(&broker(&["--no-such-flag"])), Some(64), "usage");
    assert_eq!(status(&broker(&["--help"])), Some(0));
    let missing = broker(&["serve", "--config", &path("missing.yaml")]);
    assert_eq!(status(&missing), Some(66), "missing configuration");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("missing.yaml"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no colour off a terminal: {stderr:?}"
    );
    std::fs::write(path("bad.yaml"), "listen: nowhere\n").unwrap();
    assert_eq!(
        status(&broker(&["serve", "--config", &path("bad.yaml")])),
        Some(78),
        "invalid configuration"
    );
    assert_eq!(
        status(&broker(&["audit", &path("no-audit.jsonl")])),
        Some(66)
    );
}

/// `a.yaml` and `b.yaml` (one grant each, to different service accounts)
/// and `bad.yaml` (not a policy).
fn policy_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("a.yaml", &simple_policy("app", "shop", "orders", "shop/a"));
    write("b.yaml", &simple_policy("app", "shop", "billing", "shop/a"));
    write(
        "bad.yaml",
        "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings: 3\n",
    );
    dir
}

#[test]
fn policy_commands_separate_problems_missing_files_and_changes() {
    let dir = policy_files();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    assert_eq!(
        status(&broker(&["policy", "check", &path("a.yaml")])),
        Some(0)
    );
    assert_eq!(
        status(&broker(&["policy", "check", &path("bad.yaml")])),
        Some(1)
    );
    assert_eq!(
        status(&broker(&["policy", "check", &path("none.yaml")])),
        Some(66)
    );

    let diff = |old: &str, new: &str| {
        status(&broker(&[
            "policy",
            "diff",
            "--exit-code",
            &path(old),
            &path(new),
        ]))
    };
    assert_eq!(diff("a.yaml", "a.yaml"), Some(0), "nothing changed");
    assert_eq!(diff("a.yaml", "b.yaml"), Some(1), "access changed");
    assert_eq!(diff("a.yaml", "bad.yaml"), Some(2), "cannot compare");
    assert_eq!(diff("a.yaml", "none.yaml"), Some(2), "cannot compare");
}

/// Runs a broker command that prints one JSON document; returns it and the status.
fn broker_json(args: &[&str]) -> (serde_json::Value, Option<i32>) {
    let output = broker(args);
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (json, status(&output))
}

#[test]
fn policy_commands_answer_ci_bots_in_json() {
    let dir = policy_files();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    let (ok, code) = broker_json(&["policy", "check", "-o", "json", &path("a.yaml")]);
    assert_eq!(code, Some(0));
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["bindings"], 1);
    assert_eq!(ok["problems"], serde_json::json!([]));

    let (bad, code) = broker_json(&["policy", "check", "--output", "json", &path("bad.yaml")]);
    assert_eq!(code, Some(1));
    assert_eq!(bad["ok"], false);
    let problem = &bad["problems"][0];
    assert!(
        problem["file"].as_str().unwrap().ends_with("bad.yaml"),
        "{bad}"
    );
    assert_eq!(problem["line"], 3, "{bad}");
    assert!(problem["column"].as_u64().unwrap() > 0, "{bad}");
    assert!(
        problem["message"].as_str().unwrap().contains("sequence"),
        "{bad}"
    );

    let (missing, code) = broker_json(&["policy", "check", "-o", "json", &path("none.yaml")]);
    assert_eq!(code, Some(66));
    assert_eq!(
        missing["problems"][0]["message"],
        "no such file or directory"
    );

    let (explained, code) = broker_json(&[
        "policy",
        "explain",
        "-o",
        "json",
        "--namespace",
        "shop",
        "--service-account",
        "orders",
        &path("a.yaml"),
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(explained["namespace"], "shop");
    assert_eq!(explained["granted"][0]["binding"], "app");
    assert_eq!(
        explained["granted"][0]["source"], "kv2 secret/shop/a",
        "{explained}"
    );
    assert_eq!(explained["not_granted"], serde_json::json!([]));

    let (diff, code) = broker_json(&[
        "policy",
        "diff",
        "--exit-code",
        "-o",
        "json",
        &path("a.yaml"),
        &path("b.yaml"),
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(diff["changed"], true);
    let kinds: Vec<&str> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["grant", "remove"], "{diff}");
    assert!(
        diff["changes"][0]["subject"]
            .as_str()
            .unwrap()
            .contains("billing"),
        "{diff}"
    );

    let (same, code) = broker_json(&[
        "policy",
        "diff",
        "-o",
        "json",
        &path("a.yaml"),
        &path("a.yaml"),
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(same, serde_json::json!({"changed": false, "changes": []}));

    let (broken, code) = broker_json(&[
        "policy",
        "diff",
        "-o",
        "json",
        &path("a.yaml"),
        &path("bad.yaml"),
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(broken["ok"], false);
}

#[test]
fn policy_diff_into_a_closed_pipe_ends_quietly() {
    // `policy diff -o json | head -c0`: the reader is gone before the answer.
    let dir = policy_files();
    let path = |name: &str| dir.path().join(name).display().to_string();
    for output in ["json", "text"] {
        let mut child = Command::new(binary("tessera-broker"))
            .args(["policy", "diff", "--exit-code", "-o", output])
            .args([path("a.yaml"), path("b.yaml")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let result = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{output}: {stderr}");
        assert!(!stderr.contains("panicked"), "{output}: {stderr}");
    }
}

#[test]
fn audit_reads_standard_input_for_a_dash() {
    let mut child = Command::new(binary("tessera-broker"))
        .args(["audit", "--all", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"time":"2026-12-01T10:00:00Z","action":"issue","outcome":"success","namespace":"shop","service_account":"orders","binding":"db","version":"7"}
"#,
        )
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("shop/orders") && l.contains("db")),
        "{text}"
    );
}

#[test]
fn the_sidecar_exits_with_sysexits_statuses() {
    let sidecar = |args: &[&str]| {
        Command::new(binary("tessera-sidecar"))
            .args(args)
            .output()
            .unwrap()
    };
    assert_eq!(status(&sidecar(&["--no-such-flag"])), Some(64), "usage");
    // A missing CA names both ways to give it.
    let no_ca = sidecar(&["whoami", "--broker", "https://127.0.0.1:1"]);
    assert_eq!(status(&no_ca), Some(64));
    let stderr = String::from_utf8_lossy(&no_ca.stderr);
    assert!(
        stderr.contains("--ca-file") && stderr.contains("--ca-pem"),
        "{stderr}"
    );
    let out = tempfile::Builder::new()
        .prefix("tessera-cli-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let once = sidecar(&[
        "once",
        "--broker",
        "https://127.0.0.1:1",
        "--ca-file",
        "/nonexistent/ca.pem",
        "--token-file",
        "/nonexistent/token",
        "--out",
        out.path().to_str().unwrap(),
        "--binding",
        "db",
    ]);
    assert_eq!(
        status(&once),
        Some(66),
        "a missing CA or token file: {}",
        String::from_utf8_lossy(&once.stderr)
    );
}
