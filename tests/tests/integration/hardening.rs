//! Regression tests for what a hostile tester found (issue "Hardening"), one
//! per defect, against the real binaries, OpenBao and PostgreSQL.

use std::{
    fs,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tessera_proto::v1::{FetchRequest, Held, RevokeRequest, WatchRequest};
use tessera_tests::{
    ConnectionsConfig, Env, EnvOptions, Postgres, binary, db_policy, field, random_string,
    wait_for, with_token,
};
use tonic::Code;

/// KV bindings `app` (secret `shop/app`) and `other` (`shop/other`) for shop/orders.
fn two_kv_bindings() -> String {
    "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/app } }
  - name: other
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/other } }
"
    .to_owned()
}

async fn db_env(policy: &str, role_ttl: &str) -> (Postgres, Env) {
    let pg = Postgres::start();
    let env = Env::start(policy).await;
    env.bao.database_role(&pg, "orders", role_ttl, "1h");
    (pg, env)
}

async fn wait_field(out: &Path, binding: &str, name: &str, value: &str) {
    wait_for(
        Duration::from_secs(20),
        &format!("{binding}/{name} = the expected value"),
        || field(out, binding, name).filter(|v| v == value),
    )
    .await;
}

fn status_of(out: &Path, binding: &str) -> Value {
    let text = fs::read_to_string(out.join("..tessera-status.json")).unwrap_or_default();
    serde_json::from_str::<Value>(&text).unwrap_or_default()["bindings"][binding].clone()
}

/// Hidden entries in a binding directory other than `..data`.
fn version_dirs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("..") && name != "..data"
        })
        .count()
}

/// A tmpfs of `size` mounted in a fresh directory (the tests run as root),
/// unmounted on drop.
struct SmallVolume(tempfile::TempDir);

impl SmallVolume {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-small-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs needs root");
        Self(dir)
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_1_symlinked_binding_directory_is_never_followed() {
    let env = Env::start(&two_kv_bindings()).await;
    env.bao.put("shop/app", &json!({ "password": "p1" })).await;
    env.bao.put("shop/other", &json!({ "k": "v" })).await;
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["app"]);
    wait_field(out.path(), "app", "password", "p1").await;

    // A directory on disk holding two files, swapped in for `app/`.
    let disk = env.dir.path().join("precious");
    fs::create_dir(&disk).unwrap();
    fs::write(disk.join("a"), "keep").unwrap();
    fs::write(disk.join("b"), "keep").unwrap();
    let mode = fs::metadata(&disk).unwrap().mode();
    let app = out.path().join("app");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir_all(&app).unwrap();
    std::os::unix::fs::symlink(&disk, &app).unwrap();

    env.bao.put("shop/app", &json!({ "password": "p2" })).await;
    wait_field(out.path(), "app", "password", "p2").await;

    let mut names: Vec<String> = fs::read_dir(&disk)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "nothing written to or deleted from disk");
    assert_eq!(fs::read_to_string(disk.join("a")).unwrap(), "keep");
    assert_eq!(fs::metadata(&disk).unwrap().mode(), mode, "not chmod-ed");
    assert!(fs::symlink_metadata(&app).unwrap().is_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_2_a_write_that_does_not_fit_keeps_the_volume_working() {
    let env = Env::start(&two_kv_bindings()).await;
    let volume = SmallVolume::mount("1m");
    let out = volume.0.path();
    let big1 = "a".repeat(600 * 1024);
    env.bao.put("shop/app", &json!({ "password": big1 })).await;
    env.bao.put("shop/other", &json!({ "k": "v1" })).await;
    let mut run = env.sidecar_run(&env.token_file("shop", "orders"), out, &["app", "other"]);
    wait_field(out, "app", "password", &big1).await;
    wait_field(out, "other", "k", "v1").await;

    // The next version cannot sit beside the current one in 1 MiB.
    let big2 = "b".repeat(600 * 1024);
    env.bao.put("shop/app", &json!({ "password": big2 })).await;
    wait_for(Duration::from_secs(20), "the failure in the status", || {
        let status = status_of(out, "app");
        (status["write_failures"].as_u64() >= Some(2) && status["stale"] == true).then_some(())
    })
    .await;
    assert!(!run.exited(), "the sidecar keeps running");
    assert_eq!(
        field(out, "app", "password").unwrap(),
        big1,
        "the previous version stays"
    );
    assert_eq!(
        version_dirs(&out.join("app")),
        1,
        "nothing half-written stays behind"
    );
    assert!(
        run.output()
            .contains("no space left on the volume for the credential"),
        "the log names the binding and size:\n{}",
        run.output()
    );

    // Other bindings go on.
    env.bao.put("shop/other", &json!({ "k": "v2" })).await;
    wait_field(out, "other", "k", "v2").await;

    // Larger than the whole volume: both sizes named.
    env.bao
        .put(
            "shop/app",
            &json!({ "password": "c".repeat(2 * 1024 * 1024) }),
        )
        .await;
    wait_for(Duration::from_secs(20), "the too-large error", || {
        run.output()
            .contains("bytes but the volume holds 1048576 bytes in all")
            .then_some(())
    })
    .await;

    // A small successor is written, and the status is true again.
    env.bao
        .put("shop/app", &json!({ "password": "small" }))
        .await;
    wait_field(out, "app", "password", "small").await;
    wait_for(Duration::from_secs(10), "a fresh status", || {
        (status_of(out, "app")["stale"] == false).then_some(())
    })
    .await;
    assert_eq!(version_dirs(&out.join("app")), 1);
    assert!(!run.exited());
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_3_a_lease_revoked_by_hand_is_replaced_at_once() {
    let (pg, env) = db_env(&db_policy("8s", "0.5", "1s"), "8s").await;
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    let first = (
        field(out.path(), "db", "username").unwrap(),
        field(out.path(), "db", "password").unwrap(),
    );
    env.bao.cli(&[
        "lease",
        "revoke",
        "-sync",
        "-prefix",
        "database/creds/orders",
    ]);
    wait_for(Duration::from_secs(10), "the hand revocation", || {
        (!pg.can_login(&first.0, &first.1)).then_some(())
    })
    .await;

    let second = wait_for(Duration::from_secs(30), "a successor", || {
        field(out.path(), "db", "username")
            .filter(|u| *u != first.0)
            .map(|u| (u, field(out.path(), "db", "password").unwrap_or_default()))
    })
    .await;
    assert!(pg.can_login(&second.0, &second.1), "the successor logs in");
    wait_for(Duration::from_secs(10), "a truthful status", || {
        let status = status_of(out.path(), "db");
        (status["stale"] == false && status["version"].is_string()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_4_renew_fraction_nan_is_refused_by_check_and_hot_reload() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "1s"), "60s").await;
    let bad = db_policy("1m", ".nan", "1s");
    let file = env.dir.path().join("nan.yaml");
    fs::write(&file, &bad).unwrap();
    let check = Command::new(binary("tessera-broker"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!check.status.success(), "policy check refuses NaN");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("renewFraction NaN")
            || String::from_utf8_lossy(&check.stderr).contains("renewFraction NaN"),
        "{check:?}"
    );

    env.set_policy(&bad);
    wait_for(Duration::from_secs(10), "the reload to be refused", || {
        env.broker
            .output()
            .contains("renewFraction NaN")
            .then_some(())
    })
    .await;
    let out = env.tmpfs_out();
    let _run = env.sidecar_run(&env.token_file("shop", "orders"), out.path(), &["db"]);
    wait_for(Duration::from_secs(20), "delivery", || {
        field(out.path(), "db", "password")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pg.vault_roles(), 1, "one user, no panic loop");
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_5_revoke_is_bounded_and_deduplicated() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "1s"), "60s").await;
    let out = env.tmpfs_out();
    let once = env.sidecar_once(&env.token_file("shop", "orders"), out.path(), &["db"], &[]);
    assert!(once.status.success(), "{once:?}");
    let handle = fs::read_to_string(out.path().join("db/..data/..handle")).unwrap();
    let held = |n: usize| {
        vec![
            Held {
                binding: "db".into(),
                handle: handle.clone()
            };
            n
        ]
    };
    let token = env.token("shop", "orders");
    let mut client = env.client().await;

    let status = client
        .revoke(with_token(
            &token,
            RevokeRequest {
                bindings: vec![],
                held: held(10_000),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        pg.vault_roles(),
        1,
        "nothing revoked by the refused request"
    );

    let revoked = client
        .revoke(with_token(
            &token,
            RevokeRequest {
                bindings: vec![],
                held: held(64),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked, ["db"], "64 copies are one revocation");
    // The refused request has its own (denied) line; the 64 copies one.
    let revocations = env
        .audit_events()
        .iter()
        .filter(|e| e["action"] == "revoke" && e["outcome"] == "success")
        .count();
    assert_eq!(revocations, 1, "one audit line");
    assert_eq!(pg.vault_roles(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_5_revoke_handles_count_against_the_rate_limit() {
    let options = EnvOptions {
        rate_limit: (1, 5),
        ..EnvOptions::default()
    };
    let pg = Postgres::start();
    let env = Env::start_with(&db_policy("1m", "0.7", "1s"), options).await;
    env.bao.database_role(&pg, "orders", "60s", "1h");
    let mut client = env.client().await;
    let token = env.token("shop", "orders");
    let forged: Vec<Held> = (0..20)
        .map(|i| Held {
            binding: "db".into(),
            handle: format!("v2.forged{i}"),
        })
        .collect();
    let status = client
        .revoke(with_token(
            &token,
            RevokeRequest {
                bindings: vec![],
                held: forged,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// `Fetch` of binding `app` on an open connection; it must succeed.
async fn fetch_app(
    client: &mut tessera_proto::v1::broker_client::BrokerClient<tonic::transport::Channel>,
    token: &str,
) {
    let request = FetchRequest {
        bindings: vec!["app".into()],
        ..Default::default()
    };
    client.fetch(with_token(token, request)).await.unwrap();
}

/// Opens `count` TCP connections to `address` that never send a byte.
fn idle_connections(address: &str, count: usize) -> Vec<std::net::TcpStream> {
    (0..count)
        .filter_map(|_| std::net::TcpStream::connect(address).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_6_idle_connections_are_closed_and_capped() {
    let policy = tessera_tests::simple_policy("app", "shop", "orders", "shop/app");
    let mut env = Env::start(&policy).await;
    env.bao.put("shop/app", &json!({ "k": "v" })).await;
    // Tighter limits than the defaults, so the test is quick.
    env.edit_config(|config| {
        config.connections = Some(ConnectionsConfig {
            max: Some(40),
            handshake_timeout: Some("1s".to_owned()),
            idle_timeout: Some("5s".to_owned()),
            max_age: None,
        });
    });
    let mut env = env;
    env.restart_broker().await;
    let token = env.token("shop", "orders");
    let mut early = env.client().await;
    fetch_app(&mut early, &token).await;

    let address = env.broker_uri.trim_start_matches("https://").to_owned();
    let mut idle = idle_connections(&address, 100);
    assert!(idle.len() >= 40);
    // The live connection keeps working while the listener is full.
    fetch_app(&mut early, &token).await;

    // Every idle connection is closed by the broker: at the cap at once, the
    // rest after the first-bytes deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))
            .unwrap();
        let mut byte = [0u8; 1];
        // A signal to the test process (another test's child exiting) may
        // interrupt the read; that says nothing about the connection.
        let read = loop {
            match stream.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match read {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection stayed open: {other:?}"),
        }
    }
    // New callers are served again.
    let fresh = env.fetch(&token, &["app"]).await.unwrap();
    assert_eq!(fresh.credentials.len(), 1);
    let refusals = env
        .broker
        .output()
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .count();
    assert!(
        (1..=3).contains(&refusals),
        "the refusals are logged, without flooding: {refusals} lines"
    );

    // The webhook port closes an idle connection too.
    let webhook = env
        .webhook_url
        .trim_start_matches("https://")
        .trim_end_matches("/mutate")
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&webhook).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "closed by the broker, not the test's timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_8_a_rename_onto_another_field_fails_at_delivery() {
    let policy = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app
    subjects: [{ namespace: shop, serviceAccount: orders }]
    source: { kv2: { mount: secret, path: shop/app } }
    output:
      files: { password: username }
";
    let env = Env::start(policy).await;
    env.bao
        .put("shop/app", &json!({ "username": "u", "password": "p" }))
        .await;
    let status = env
        .fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("binding `app`") && status.message().contains("`username`"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_9_a_planted_file_is_replaced_by_the_writers_link() {
    let env = Env::start(&two_kv_bindings()).await;
    env.bao
        .put("shop/app", &json!({ "password": "real" }))
        .await;
    let out = env.tmpfs_out();
    let token = env.token_file("shop", "orders");
    assert!(
        env.sidecar_once(&token, out.path(), &["app"], &[])
            .status
            .success()
    );
    let app = out.path().join("app");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(app.join("password")).unwrap();
    fs::write(app.join("password"), "planted").unwrap();

    let again = env.sidecar_once(&token, out.path(), &["app"], &[]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(field(out.path(), "app", "password").unwrap(), "real");
    assert!(
        fs::symlink_metadata(app.join("password"))
            .unwrap()
            .is_symlink()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_10_a_hostile_kv_key_is_refused_at_the_source_and_the_pod_goes_on() {
    let env = Env::start(&two_kv_bindings()).await;
    env.bao.put("shop/app", &json!({ "password": "p1" })).await;
    env.bao.put("shop/other", &json!({ "k": "v1" })).await;
    let out = env.tmpfs_out();
    let run = env.sidecar_run(
        &env.token_file("shop", "orders"),
        out.path(),
        &["app", "other"],
    );
    wait_field(out.path(), "app", "password", "p1").await;

    env.bao
        .put("shop/app", &json!({ "password": "p2", "../escape": "x" }))
        .await;
    wait_for(Duration::from_secs(20), "an audited refusal", || {
        env.audit_events()
            .into_iter()
            .find(|e| e["binding"] == "app" && e["outcome"] == "error")
    })
    .await;
    let event = env
        .audit_events()
        .into_iter()
        .find(|e| e["binding"] == "app" && e["outcome"] == "error")
        .unwrap();
    assert!(
        event["reason"].as_str().unwrap().contains("../escape"),
        "{event}"
    );
    assert_eq!(event["source"], "kv2 secret/shop/app");
    assert_eq!(
        field(out.path(), "app", "password").unwrap(),
        "p1",
        "the pod keeps its files"
    );

    env.bao.put("shop/other", &json!({ "k": "v2" })).await;
    wait_field(out.path(), "other", "k", "v2").await;
    let mut run = run;
    assert!(!run.exited(), "one bad secret does not stop the pod");
    assert!(!out.path().join("escape").exists() && !out.path().join("app/../escape").exists());

    // Asked for directly, the binding is refused with a clear error.
    let status = env
        .fetch(&env.token("shop", "orders"), &["app"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("no safe file name"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_12_a_pod_cannot_open_unbounded_watches_on_a_dynamic_binding() {
    let (pg, env) = db_env(&db_policy("1m", "0.7", "1s"), "60s").await;
    let token = env.token("shop", "orders");
    let mut streams = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        let mut client = env.client().await;
        match client
            .watch(with_token(
                &token,
                WatchRequest {
                    bindings: vec!["db".into()],
                    held: vec![],
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(stream) => streams.push(stream.into_inner()),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("a refusal past the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(streams.len(), 4);
    // Each stream was issued a user, but the pod may hold only 2 live leases
    // on the binding (leases.maxPerPodBinding): the older ones were revoked,
    // and none was minted for the refused stream.
    assert_eq!(pg.vault_roles(), 2, "at most the per-pod lease limit");
}

/// A codec that sends raw bytes as a request, to send what is not protobuf.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_12_a_malformed_request_is_invalid_argument() {
    let env = Env::start(&tessera_tests::simple_policy(
        "app", "shop", "orders", "shop/app",
    ))
    .await;
    let mut grpc = tonic::client::Grpc::new(env.channel().await);
    grpc.ready().await.unwrap();
    let garbage = vec![
        0x0a,
        0xff,
        0xff,
        0xff,
        0xff,
        0x0f,
        random_string(1).as_bytes()[0],
    ];
    let status = grpc
        .unary(
            with_token(&env.token("shop", "orders"), garbage),
            http::uri::PathAndQuery::from_static("/tessera.v1.Broker/Fetch"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn defect_4_a_request_that_fails_for_one_binding_leaks_no_database_user() {
    let policy = format!(
        "{}  - name: missing
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ kv2: {{ mount: secret, path: shop/nothing-here }} }}
",
        db_policy("1m", "0.7", "1s")
    );
    let (pg, env) = db_env(&policy, "60s").await;
    let status = env
        .fetch(&env.token("shop", "orders"), &["db", "missing"])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        tessera_proto::reason::StreamEnd::binding(&status).as_deref(),
        Some("missing"),
        "the binding at fault is named"
    );
    // KV bindings are served first: the request fails before Vault mints a
    // user for `db`, so there is none to leak (or to revoke).
    assert_eq!(pg.vault_roles(), 0);
    assert!(env.bao.leases("database/creds/orders").is_empty());
    // A database binding Vault refuses (no role) after a good one is issued:
    // the good one's user is revoked, not left to its TTL.
    let policy = format!(
        "{}  - name: norole
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ database: {{ mount: database, role: nobody }} }}
",
        db_policy("1m", "0.7", "1s")
    );
    env.set_policy(&policy);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = env
            .fetch(&env.token("shop", "orders"), &["db", "norole"])
            .await
            .unwrap_err();
        // Until the reload, `norole` is not in the policy yet.
        if status.code() != Code::PermissionDenied || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    wait_for(
        Duration::from_secs(10),
        "the undelivered lease's revocation",
        || {
            (pg.vault_roles() == 0 && env.bao.leases("database/creds/orders").is_empty())
                .then_some(())
        },
    )
    .await;
    let revoked = env
        .audit_events()
        .into_iter()
        .find(|e| e["action"] == "revoke" && e["binding"] == "db")
        .expect("the revocation is audited");
    assert!(
        revoked["reason"]
            .as_str()
            .unwrap()
            .contains("never delivered")
    );
}
