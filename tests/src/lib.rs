//! Harness for Tessera's integration tests: starts a real OpenBao dev server, a
//! real broker process and sidecar processes on ephemeral loopback ports, and
//! stops every one by PID when the guard is dropped, also when a test fails.
//! Nothing here fakes Vault.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

mod balancer;
pub mod chart_readme;
mod cluster;
pub mod config;
mod databases;
pub mod doc_commands;
mod env;
mod http;
pub mod kubernetes;
mod node;
mod openbao;
pub mod otlp;
mod peers;
mod postgres;
mod proc;
mod sshd;

pub use balancer::Balancer;
pub use config::{
    BrokerConfig, ChangeFeedConfig, ClusterConfig, ConnectionsConfig, DriftConfig, IdentitySource,
    KubernetesConfig, MemoryConfig, PeerTlsConfig, PeersConfig,
};
pub use databases::{MariaDb, RabbitMq, Redis};
pub use env::{BrokerLogin, Env, EnvOptions, Replica, TEST_CLUSTER, pod_uid};
pub use http::{http_get, https_post, metric_value, vault_requests};
pub use kubernetes::Cluster;
pub use node::{NODE, NodeAgent};
pub use openbao::OpenBao;
pub use peers::{CertFiles, PeerPki, host_address, peer_addresses};
pub use postgres::Postgres;
pub use proc::Proc;
pub use sshd::Sshd;

use serde_json::{Value, json};
use tessera_broker::dev::{self, SigningKey, TokenSpec};
use tessera_proto::v1::broker_client::BrokerClient;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// The lines of a file (an app's log), none when it does not exist yet.
pub fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// An AdmissionReview of a pod `CREATE` in namespace `shop` by `username`,
/// as the API server sends it to the webhook.
pub fn admission_review(pod: &Value, username: &str) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d5b8c71-3c55-4a1c-9d5e-b1b2f6a4c001",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": { "username": username },
            "object": pod,
            "dryRun": false
        }
    })
    .to_string()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Path of a workspace binary, building the binaries once if they are missing.
pub fn binary(name: &str) -> PathBuf {
    // Benchmarks point this at release binaries.
    if let Some(dir) = std::env::var_os("TESSERA_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join("debug").join(name);
    BUILT.get_or_init(|| {
        if !target.join("debug/tessera-broker").exists()
            || !target.join("debug/tessera-sidecar").exists()
        {
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--bins",
                    "-p",
                    "tessera-broker",
                    "-p",
                    "tessera-sidecar",
                ])
                .current_dir(workspace_root())
                .status()
                .expect("running cargo build");
            assert!(status.success(), "building the binaries failed");
        }
    });
    path
}

/// The OpenBao binary: `$TESSERA_BAO`, `.tools/bin/bao` (scripts/test installs
/// it there), or `bao` on PATH.
pub fn bao_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TESSERA_BAO") {
        return path.into();
    }
    let local = workspace_root().join(".tools/bin/bao");
    if local.exists() {
        return local;
    }
    PathBuf::from("bao")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768+), so an outgoing connection
    // never takes the port between this check and the server's bind; a
    // counter keeps this process's tests from picking the same one. Ports go
    // in pairs: OpenBao's dev server also binds the next one (cluster port).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const PAIRS: u32 = 6_000;
    let start = std::process::id() * 97;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(FIRST + 2 * ((start + n) % PAIRS)).expect("in range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return port;
        }
    }
}

/// A random alphanumeric string, for secret values the tests can search for.
pub fn random_string(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

/// Waits up to `timeout` for `check` to return `Some`.
pub async fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a binding's field, if written.
pub fn field(out: &Path, binding: &str, name: &str) -> Option<String> {
    fs::read_to_string(out.join(binding).join(name)).ok()
}

/// Writes `name` into `dir` laid out like a ConfigMap volume:
/// `..<n>/name`, `..data -> ..<n>`, `name -> ..data/name`, swapped atomically.
pub fn write_configmap(dir: &Path, name: &str, text: &str) {
    fs::create_dir_all(dir).unwrap();
    let version = format!("..{}", random_string(10));
    fs::create_dir(dir.join(&version)).unwrap();
    fs::write(dir.join(&version).join(name), text).unwrap();
    let old = fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&version, dir.join("..data_tmp")).unwrap();
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    if fs::symlink_metadata(dir.join(name)).is_err() {
        std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
    }
    if let Some(old) = old {
        fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Wraps `message` with `authorization: Bearer <token>`.
pub fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let mut value = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
    value.set_sensitive(true);
    request.metadata_mut().insert("authorization", value);
    request
}

/// The text of `field` in `binding`'s credential of a Fetch answer.
pub fn answer_text(
    answer: &tessera_proto::v1::FetchResponse,
    binding: &str,
    field: &str,
) -> String {
    let credential = answer
        .credentials
        .iter()
        .find(|c| c.binding == binding)
        .unwrap_or_else(|| panic!("the answer has no `{binding}`"));
    String::from_utf8(credential.fields[field].clone()).unwrap()
}

/// A policy granting binding `db` (dynamic users of the `database` mount's role
/// `orders`) to shop/orders. Its TTL floor is lowered to one second so tests
/// can watch renewals and rotations in seconds.
pub fn db_policy(ttl: &str, fraction: &str, overlap: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
limits:
  minTtl: {{ database: 1s }}
bindings:
  - name: db
    subjects: [{{ namespace: shop, serviceAccount: orders }}]
    source: {{ database: {{ mount: database, role: orders }} }}
    ttl: {ttl}
    renewFraction: {fraction}
    overlap: {overlap}
"
    )
}

/// Waits until `sidecar` (streaming binding `db` of [`db_policy`] into
/// `out`) reconnected and resumed its lease with its handle (`files kept`
/// logged more than `resumed_before` times), then checks it kept `user`,
/// Vault holds one lease of role `orders`, and the broker opened the handle.
pub async fn assert_resumed(
    env: &Env,
    sidecar: &Proc,
    out: &Path,
    user: &str,
    resumed_before: usize,
) {
    let resumed = tokio::time::timeout(
        Duration::from_secs(30),
        wait_for(Duration::from_secs(31), "the sidecar to resume", || {
            (sidecar.output().matches("files kept").count() > resumed_before).then_some(())
        }),
    )
    .await;
    assert!(
        resumed.is_ok(),
        "the sidecar did not resume within 30 s; its log:\n{}\nthe broker's log ends:\n{}",
        sidecar.output(),
        env.broker
            .output()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(field(out, "db", "username").as_deref(), Some(user));
    assert_eq!(
        env.bao.leases("database/creds/orders").len(),
        1,
        "no second user"
    );
    assert!(
        !env.broker.output().contains("does not open"),
        "the handle opened"
    );
}

/// A policy granting `binding` (all keys of `secret/<path>`) to `namespace`/`service_account`.
pub fn simple_policy(binding: &str, namespace: &str, service_account: &str, path: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: {binding}
    subjects:
      - namespace: {namespace}
        serviceAccount: {service_account}
    source:
      kv2:
        mount: secret
        path: {path}
"
    )
}

/// How many times each of `needles` occurs in the memory of process `pid`,
/// read through `/proc/PID/maps` and `/proc/PID/mem` (the tests run as root,
/// which may read a non-dumpable process). Regions that cannot be read
/// (guard pages, `[vvar]`) are skipped.
pub fn memory_occurrences(pid: u32, needles: &[&str]) -> Vec<usize> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("read /proc/PID/maps");
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut counts = vec![0; needles.len()];
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let name = parts.nth(3).unwrap_or("");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut region = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        for (count, needle) in counts.iter_mut().zip(needles) {
            *count += region
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count();
        }
    }
    counts
}
