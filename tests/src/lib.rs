//! Harness for Tessera's integration tests: starts a real OpenBao dev server, a
//! real broker process and sidecar processes on ephemeral loopback ports, and
//! stops every one by PID when the guard is dropped, also when a test fails.
//! Nothing here fakes Vault.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

mod cluster;
pub mod kube_api;
pub mod otlp;

use serde_json::{Value, json};
use tessera_broker::dev::{self, SigningKey, TokenSpec};
use tessera_proto::v1::broker_client::BrokerClient;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

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

/// A child process killed by PID when dropped; its output goes to a log file.
pub struct Proc {
    child: Child,
    name: String,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `command` with output to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Sends SIGTERM and waits up to 10 s for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} output ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.output()
            );
        }
    }
}

/// A real OpenBao dev server.
pub struct OpenBao {
    /// The server process (none for a cluster: its nodes are `peers`).
    proc: Option<Proc>,
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The dev root token.
    pub root_token: String,
    /// OpenBao's own file audit device (configured at start: OpenBao only
    /// takes audit devices from its configuration).
    pub audit_log: PathBuf,
    /// For a server with Raft storage: its configuration and unseal key, to
    /// restart it with its data.
    persistent: Option<(PathBuf, String)>,
    /// The nodes of a cluster (empty for a single server).
    peers: Vec<cluster::Peer>,
    /// What routes a cluster's clients to its active node.
    proxy: Option<cluster::ActiveProxy>,
}

impl OpenBao {
    /// Starts `bao server -dev` on a free port and waits until it answers.
    pub async fn start(dir: &Path) -> Self {
        let port = free_port();
        let root_token = random_string(24);
        let audit_log = dir.join("openbao-audit.log");
        let config = dir.join("openbao.hcl");
        fs::write(
            &config,
            format!(
                "audit \"file\" \"tessera-test\" {{\n  options = {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )
        .unwrap();
        let mut command = Command::new(bao_binary());
        command
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg("-dev-no-store-token")
            .arg(format!("-config={}", config.display()))
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR");
        let proc = Proc::spawn("openbao", command, dir.join("openbao.log"));
        let bao = Self {
            proc: Some(proc),
            address: format!("http://127.0.0.1:{port}"),
            root_token,
            audit_log,
            persistent: None,
            peers: Vec::new(),
            proxy: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if vaultrs::token::lookup_self(&bao.client()).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become ready:\n{}",
                bao.proc.as_ref().map(Proc::output).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bao.enable_lease_records();
        bao
    }

    /// Starts a non-dev server with Raft storage (its data survives a
    /// restart), initialised and unsealed, with KV v2 at `secret/`.
    pub async fn start_persistent(dir: &Path) -> Self {
        let port = free_port();
        let audit_log = dir.join("openbao-audit.log");
        let config = dir.join("openbao-persistent.hcl");
        fs::create_dir_all(dir.join("openbao-data")).unwrap();
        fs::write(
            &config,
            format!(
                "storage \"raft\" {{
  path = \"{data}\"
  node_id = \"tessera-test\"
}}
listener \"tcp\" {{
  address = \"127.0.0.1:{port}\"
  cluster_address = \"127.0.0.1:{cluster}\"
  tls_disable = true
}}
api_addr = \"http://127.0.0.1:{port}\"
cluster_addr = \"http://127.0.0.1:{cluster}\"
audit \"file\" \"tessera-test\" {{
  options = {{
    file_path = \"{audit}\"
  }}
}}
",
                data = dir.join("openbao-data").display(),
                cluster = free_port(),
                audit = audit_log.display(),
            ),
        )
        .unwrap();
        let proc = Self::spawn_server(dir, &config, port).await;
        let address = format!("http://127.0.0.1:{port}");
        let init = Command::new(bao_binary())
            .args([
                "operator",
                "init",
                "-key-shares=1",
                "-key-threshold=1",
                "-format=json",
            ])
            .env("BAO_ADDR", &address)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "bao operator init: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let keys: Value = serde_json::from_slice(&init.stdout).unwrap();
        let unseal = keys["unseal_keys_b64"][0].as_str().unwrap().to_owned();
        let bao = Self {
            proc: Some(proc),
            address,
            root_token: keys["root_token"].as_str().unwrap().to_owned(),
            audit_log,
            persistent: Some((config, unseal)),
            peers: Vec::new(),
            proxy: None,
        };
        bao.unseal().await;
        bao.cli(&["secrets", "enable", "-path=secret", "kv-v2"]);
        bao.enable_lease_records();
        bao
    }

    /// Enables `tessera-leases/` (KV v1), where the broker records leases.
    fn enable_lease_records(&self) {
        self.cli(&[
            "secrets",
            "enable",
            "-path=tessera-leases",
            "-version=1",
            "kv",
        ]);
    }

    /// The lease records the broker keeps for one pod (their JSON documents).
    pub fn lease_records(&self, pod_uid: &str) -> Vec<Value> {
        let mut records = Vec::new();
        for binding in self.list(&format!("tessera-leases/pods/{pod_uid}")) {
            for id in self.list(binding.trim_end_matches('/')) {
                let text = self.cli(&["read", "-format=json", &id]);
                if let Ok(document) = serde_json::from_str::<Value>(&text) {
                    records.push(document["data"].clone());
                }
            }
        }
        records
    }

    async fn spawn_server(dir: &Path, config: &Path, port: u16) -> Proc {
        Self::spawn_server_named(dir, config, port, "openbao").await
    }

    /// Starts `bao server` with `config`, logging to `dir/<name>.log`, and
    /// waits until it listens on `port`.
    async fn spawn_server_named(dir: &Path, config: &Path, port: u16, name: &str) -> Proc {
        let mut command = Command::new(bao_binary());
        command
            .arg("server")
            .arg(format!("-config={}", config.display()));
        let proc = Proc::spawn(name, command, dir.join(format!("{name}.log")));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "OpenBao did not listen:\n{}",
                proc.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proc
    }

    async fn unseal(&self) {
        let (_, key) = self.persistent.as_ref().expect("a persistent server");
        let output = Command::new(bao_binary())
            .args(["operator", "unseal", key])
            .env("BAO_ADDR", &self.address)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "unseal: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // A Raft node answers reads as a standby before it wins its own
        // election, and refuses writes until then ("local node not active"):
        // ready means a write succeeds (a policy nobody uses).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = r#"path "tessera-ready-probe/*" { capabilities = ["read"] }"#;
            if vaultrs::sys::policy::set(&self.client(), "tessera-ready-probe", probe)
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become active after unseal"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server (SIGKILL), as an outage would.
    pub fn kill(&mut self) {
        if let Some(proc) = &mut self.proc {
            proc.kill();
        }
    }

    /// Starts a killed persistent server again with its data, and unseals it.
    pub async fn restart(&mut self, dir: &Path) {
        let (config, _) = self.persistent.clone().expect("a persistent server");
        let port: u16 = self.address.rsplit(':').next().unwrap().parse().unwrap();
        self.proc = Some(Self::spawn_server(dir, &config, port).await);
        self.unseal().await;
    }

    /// A root client.
    pub fn client(&self) -> VaultClient {
        VaultClient::new(
            VaultClientSettingsBuilder::default()
                .address(&self.address)
                .token(&self.root_token)
                .build()
                .unwrap(),
        )
        .unwrap()
    }

    /// Runs the `bao` CLI as root against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(bao_binary())
            .args(args)
            .env("BAO_ADDR", &self.address)
            .env("BAO_TOKEN", &self.root_token)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Writes the broker's least-privilege Vault policy: read KV v2 data and
    /// metadata under `secret/`, issue and end database credentials and
    /// certificates, and keep its lease records under `tessera-leases/`.
    pub fn write_broker_policy(&self) {
        let policy = r#"
path "secret/data/*" { capabilities = ["read"] }
path "secret/metadata/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "pki/issue/*" { capabilities = ["create", "update"] }
path "pki/revoke" { capabilities = ["create", "update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "tessera-leases/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;
        let path = std::env::temp_dir().join(format!("tessera-policy-{}.hcl", random_string(8)));
        fs::write(&path, policy).unwrap();
        self.cli(&["policy", "write", "tessera-broker", path.to_str().unwrap()]);
        let _ = fs::remove_file(path);
    }

    /// A new token holding only the broker policy.
    pub fn broker_token(&self) -> String {
        self.cli(&["token", "create", "-policy=tessera-broker", "-field=token"])
    }

    /// Enables AppRole with a role for the broker; returns (role id, secret id).
    pub fn broker_approle(&self) -> (String, String) {
        self.broker_approle_for("tessera-broker", "tessera-broker")
    }

    /// Enables JWT auth at `jwt/` trusting the key in `signing_key_pem`, with
    /// role `tessera-broker` bound to that service account and audience `vault`.
    pub fn broker_jwt_role(&self, signing_key_pem: &str) {
        let public = rcgen::KeyPair::from_pem(signing_key_pem)
            .expect("the dev signing key")
            .public_key_pem();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("pub.pem");
        fs::write(&key_file, public).unwrap();
        self.cli(&["auth", "enable", "jwt"]);
        self.cli(&[
            "write",
            "auth/jwt/config",
            &format!("jwt_validation_pubkeys=@{}", key_file.display()),
            &format!("bound_issuer={}", dev::DEFAULT_ISSUER),
        ]);
        self.cli(&[
            "write",
            "auth/jwt/role/tessera-broker",
            "role_type=jwt",
            "bound_audiences=vault",
            "user_claim=sub",
            "bound_subject=system:serviceaccount:tessera:tessera-broker",
            "token_policies=tessera-broker",
            "token_ttl=1h",
        ]);
    }

    /// Enables AppRole (once) with role `role` holding `policy`; returns
    /// (role id, secret id).
    pub fn broker_approle_for(&self, role: &str, policy: &str) -> (String, String) {
        if !self.cli(&["auth", "list"]).contains("approle/") {
            self.cli(&["auth", "enable", "approle"]);
        }
        self.cli(&[
            "write",
            &format!("auth/approle/role/{role}"),
            &format!("token_policies={policy}"),
            "token_ttl=1h",
        ]);
        let role_id = self.cli(&[
            "read",
            "-field=role_id",
            &format!("auth/approle/role/{role}/role-id"),
        ]);
        let secret_id = self.cli(&[
            "write",
            "-f",
            "-field=secret_id",
            &format!("auth/approle/role/{role}/secret-id"),
        ]);
        (role_id, secret_id)
    }

    /// Enables the database engine at `database/` for `pg` (once) and writes
    /// role `role` with the given lease TTLs.
    pub fn database_role(&self, pg: &Postgres, role: &str, default_ttl: &str, max_ttl: &str) {
        let mounts = self.cli(&["secrets", "list", "-format=json"]);
        if !mounts.contains("\"database/\"") {
            self.cli(&["secrets", "enable", "database"]);
            self.cli(&[
                "write",
                "database/config/pg",
                "plugin_name=postgresql-database-plugin",
                &format!(
                    "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
                    pg.port
                ),
                "allowed_roles=*",
                "username=postgres",
                &format!("password={}", pg.password),
            ]);
        }
        self.cli(&[
            "write",
            &format!("database/roles/{role}"),
            "db_name=pg",
            "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            &format!("default_ttl={default_ttl}"),
            &format!("max_ttl={max_ttl}"),
        ]);
    }

    /// Enables PKI at `pki/` with a root CA and role `pods` for any name;
    /// returns the CA certificate (PEM).
    pub fn pki_role(&self, max_ttl: &str) -> String {
        self.cli(&["secrets", "enable", "pki"]);
        self.cli(&["secrets", "tune", "-max-lease-ttl=87600h", "pki"]);
        let ca = self.cli(&[
            "write",
            "-field=certificate",
            "pki/root/generate/internal",
            "common_name=Tessera test root",
            "ttl=87600h",
        ]);
        self.cli(&[
            "write",
            "pki/roles/pods",
            "allow_any_name=true",
            "enforce_hostnames=false",
            &format!("max_ttl={max_ttl}"),
            "key_type=ec",
            "key_bits=256",
        ]);
        ca
    }

    /// What `sys/leases/lookup` says of a lease (JSON `data`).
    pub fn lease_lookup(&self, lease_id: &str) -> Option<Value> {
        let output = Command::new(bao_binary())
            .args(["write", "-format=json", "sys/leases/lookup"])
            .arg(format!("lease_id={lease_id}"))
            .env("BAO_ADDR", &self.address)
            .env("BAO_TOKEN", &self.root_token)
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| serde_json::from_slice::<Value>(&output.stdout).unwrap()["data"].clone())
    }

    /// The ids of the live leases under `prefix` (e.g. `database/creds/app`),
    /// as Vault lists them (`sys/leases/lookup/<prefix>`).
    pub fn leases(&self, prefix: &str) -> Vec<String> {
        self.list(&format!("sys/leases/lookup/{prefix}"))
            .into_iter()
            .map(|path| path.replacen("sys/leases/lookup/", "", 1))
            .collect()
    }

    /// `bao list PATH`, each key joined to `path`; empty when there is nothing.
    pub fn list(&self, path: &str) -> Vec<String> {
        let output = Command::new(bao_binary())
            .args(["list", "-format=json", path])
            .env("BAO_ADDR", &self.address)
            .env("BAO_TOKEN", &self.root_token)
            .output()
            .unwrap();
        // `bao list` exits 2 when there is nothing under the path.
        if !output.status.success() {
            return Vec::new();
        }
        serde_json::from_slice::<Vec<String>>(&output.stdout)
            .unwrap_or_default()
            .into_iter()
            .map(|key| format!("{path}/{key}"))
            .collect()
    }

    /// Writes a new version of a KV v2 secret under the `secret/` mount,
    /// retrying for up to 10 s while a cluster elects its active node.
    pub async fn put(&self, path: &str, data: &Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match vaultrs::kv2::set(&self.client(), "secret", path, data).await {
                Ok(_) => return,
                Err(error) if self.proxy.is_some() && Instant::now() < deadline => {
                    eprintln!("writing {path} failed ({error}); retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => panic!("writing {path}: {error}"),
            }
        }
    }
}

/// How the broker logs in to OpenBao in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerLogin {
    /// A least-privilege token in a file.
    TokenFile,
    /// AppRole with a least-privilege role.
    AppRole,
    /// Vault's JWT auth with the broker's own (dev-signed) service-account token.
    Jwt,
}

/// A private PostgreSQL cluster with password (SCRAM) authentication. The
/// machine's own server trusts every local connection, so it would accept any
/// password; this one proves a delivered password by checking it.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The superuser `postgres` password.
    pub password: String,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (it refuses
/// to run as root), as ourselves otherwise.
fn as_postgres(program: &Path) -> Command {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Creates and starts a cluster on a free port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg-")
            .tempdir()
            .unwrap();
        let path = dir.path();
        let _ = Command::new("chown").arg("postgres").arg(path).status();
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let password = random_string(24);
        fs::write(path.join("pw"), &password).unwrap();
        let _ = Command::new("chown")
            .arg("postgres")
            .arg(path.join("pw"))
            .status();
        let bin = postgres_bin();
        let init = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(path.join("data"))
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", path.join("pw").display()))
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let started = as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(path.join("data"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                path.display()
            ))
            .arg("-l")
            .arg(path.join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "PostgreSQL did not start: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        Self {
            dir,
            bin,
            port,
            password,
        }
    }

    fn psql(&self, user: &str, password: &str, sql: &str) -> Output {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-tA",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap()
    }

    /// Whether `user` can log in with `password`.
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        self.psql(user, password, "select 1").status.success()
    }

    /// How many roles Vault created (names start with `v-`).
    pub fn vault_roles(&self) -> usize {
        let output = self.psql(
            "postgres",
            &self.password,
            "select count(*) from pg_roles where rolname like 'v-%'",
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Options for [`Env::start_with`].
#[derive(Clone, Debug)]
pub struct EnvOptions {
    /// The broker's Vault login.
    pub login: BrokerLogin,
    /// `RUST_LOG` for the broker and sidecars.
    pub rust_log: String,
    /// The broker's KV poll interval.
    pub poll: &'static str,
    /// The broker's `vault.healthCheckInterval` (short, so health tests are quick).
    pub vault_health_check: &'static str,
    /// Requests per second and burst per identity.
    pub rate_limit: (u32, u32),
    /// Require client certificates (the dev CA's) from callers.
    pub mtls: bool,
    /// YAML lines for the identity source (indented for the `identity:`
    /// block); the dev JWKS file by default.
    pub identity_source: String,
    /// Start an in-process Kubernetes API server and point the broker at it.
    pub kube_api: bool,
    /// Run OpenBao with Raft storage, so it can be killed and restarted.
    pub persistent_vault: bool,
    /// Run a 3-node OpenBao cluster (Raft); the broker talks to a standby.
    pub vault_cluster: bool,
    /// Extra environment for the broker and sidecar processes (OTLP settings).
    pub process_env: Vec<(String, String)>,
    /// The broker binary; the workspace's `tessera-broker` when absent (the
    /// benchmark runs a build without the zero-on-free allocator too).
    pub broker_binary: Option<PathBuf>,
    /// The broker's `leases.sweepInterval`.
    pub sweep_interval: &'static str,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            login: BrokerLogin::TokenFile,
            rust_log: "info,tessera_broker=debug,tessera_sidecar=debug".to_owned(),
            poll: "200ms",
            vault_health_check: "1s",
            rate_limit: (10_000, 10_000),
            mtls: false,
            identity_source: "jwksFile: dev/jwks.json".to_owned(),
            kube_api: false,
            persistent_vault: false,
            vault_cluster: false,
            process_env: Vec::new(),
            broker_binary: None,
            sweep_interval: "2s",
        }
    }
}

/// The pod UID in the tokens [`Env::token_file`] mints for a service account.
pub fn pod_uid(namespace: &str, service_account: &str) -> String {
    TokenSpec::new(namespace, service_account).claims()["kubernetes.io"]["pod"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// OpenBao plus a broker process with a dev signing key, TLS and a policy.
pub struct Env {
    /// Scratch directory (config, keys, logs).
    pub dir: tempfile::TempDir,
    /// The OpenBao server.
    pub bao: OpenBao,
    /// The broker process.
    pub broker: Proc,
    /// `https://127.0.0.1:PORT`.
    pub broker_uri: String,
    broker_port: u16,
    /// `http://127.0.0.1:PORT` of the broker's admin endpoints.
    pub admin_url: String,
    /// `https://127.0.0.1:PORT/mutate`: the admission webhook.
    pub webhook_url: String,
    /// The dev ES256 signing key the broker trusts.
    pub signer: SigningKey,
    /// An RS256 key the broker also trusts.
    pub rsa_signer: SigningKey,
    /// The in-process Kubernetes API server, when asked for.
    pub kube: Option<kube_api::FakeApiServer>,
    options: EnvOptions,
}

static RUSTLS: Mutex<bool> = Mutex::new(false);

impl Env {
    /// Starts OpenBao and a broker with `policy` (YAML) and default options.
    pub async fn start(policy: &str) -> Self {
        Self::start_with(policy, EnvOptions::default()).await
    }

    /// Starts OpenBao and a broker with `policy` (YAML).
    pub async fn start_with(policy: &str, options: EnvOptions) -> Self {
        {
            let mut installed = RUSTLS.lock().unwrap();
            if !*installed {
                tessera_broker::install_crypto_provider();
                *installed = true;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("tessera-test-")
            .tempdir()
            .unwrap();
        let bao = if options.vault_cluster {
            OpenBao::start_cluster(dir.path(), 3).await
        } else if options.persistent_vault {
            OpenBao::start_persistent(dir.path()).await
        } else {
            OpenBao::start(dir.path()).await
        };

        let devdir = dir.path().join("dev");
        let status = Command::new(binary("tessera-broker"))
            .args(["dev", "init", "--dir"])
            .arg(&devdir)
            .status()
            .unwrap();
        assert!(status.success(), "tessera-broker dev init failed");
        let signer =
            SigningKey::from_pem(&fs::read(devdir.join(dev::files::SIGNING_KEY)).unwrap()).unwrap();
        let rsa_signer = SigningKey::from_pem(
            &fs::read(workspace_root().join("broker/testdata/rsa-test-key.pem")).unwrap(),
        )
        .unwrap();
        let mut keys = signer.jwks()["keys"].as_array().unwrap().clone();
        keys.extend(
            rsa_signer.jwks()["keys"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
        fs::write(
            devdir.join(dev::files::JWKS),
            json!({ "keys": keys }).to_string(),
        )
        .unwrap();

        write_configmap(&dir.path().join("policy"), "policy.yaml", policy);
        bao.write_broker_policy();
        let login = match options.login {
            BrokerLogin::TokenFile => {
                fs::write(dir.path().join("vault-token"), bao.broker_token()).unwrap();
                "tokenFile: vault-token".to_owned()
            }
            BrokerLogin::AppRole => {
                let (role_id, secret_id) = bao.broker_approle();
                fs::write(dir.path().join("secret-id"), secret_id).unwrap();
                format!("appRole: {{ roleId: {role_id}, secretIdFile: secret-id }}")
            }
            BrokerLogin::Jwt => {
                let pem = fs::read_to_string(devdir.join(dev::files::SIGNING_KEY)).unwrap();
                bao.broker_jwt_role(&pem);
                let mut spec = TokenSpec::new("tessera", "tessera-broker");
                spec.audience = "vault".to_owned();
                fs::write(dir.path().join("broker-sa-token"), signer.mint(&spec)).unwrap();
                "jwt: { role: tessera-broker, tokenFile: broker-sa-token }".to_owned()
            }
        };
        let kube = if options.kube_api {
            Some(
                kube_api::FakeApiServer::start(
                    &devdir,
                    &devdir.join(dev::files::JWKS),
                    dev::DEFAULT_ISSUER,
                )
                .await,
            )
        } else {
            None
        };
        let kubernetes = kube.as_ref().map_or_else(String::new, |api| {
            format!(
                "kubernetes:\n  kubeconfig: {}\n",
                api.write_kubeconfig(dir.path()).display()
            )
        });
        let port = free_port();
        let admin_port = free_port();
        let webhook_port = free_port();
        let config = format!(
            "listen: 127.0.0.1:{port}
tls:
  certFile: dev/tls.crt
  keyFile: dev/tls.key
  reloadInterval: 100ms
  {client_ca}
identity:
  issuer: {issuer}
  audiences: [{audience}]
  {identity_source}
  leeway: 5s
policy:
  paths: [policy]
  reloadInterval: 100ms
vault:
  address: {address}
  {login}
  kvPollInterval: {poll}
  healthCheckInterval: {health_check}
shutdownGrace: 5s
audit:
  path: audit.jsonl
rateLimit:
  perSecond: {per_second}
  burst: {burst}
leases:
  handleKeyFile: dev/handle.key
  sweepInterval: {sweep}
admin:
  listen: 127.0.0.1:{admin_port}
webhook:
  listen: 127.0.0.1:{webhook_port}
  sidecar:
    image: tessera-sidecar:test
    brokerAddress: https://127.0.0.1:{port}
    caFile: dev/ca.pem
    mode: {sidecar_mode}
{kubernetes}",
            sidecar_mode = if options.kube_api { "auto" } else { "classic" },
            issuer = dev::DEFAULT_ISSUER,
            audience = dev::DEFAULT_AUDIENCE,
            address = bao.address,
            poll = options.poll,
            health_check = options.vault_health_check,
            identity_source = options.identity_source,
            client_ca = if options.mtls {
                "clientCaFile: dev/ca.pem"
            } else {
                ""
            },
            per_second = options.rate_limit.0,
            burst = options.rate_limit.1,
            sweep = options.sweep_interval,
        );
        fs::write(dir.path().join("broker.yaml"), config).unwrap();
        let broker = spawn_broker(dir.path(), port, &options).await;
        Self {
            dir,
            bao,
            broker,
            broker_uri: format!("https://127.0.0.1:{port}"),
            broker_port: port,
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            webhook_url: format!("https://127.0.0.1:{webhook_port}/mutate"),
            signer,
            rsa_signer,
            kube,
            options,
        }
    }

    /// Kills the broker (SIGKILL) and starts a new one with the same
    /// configuration and port, as a replacement replica would.
    pub async fn restart_broker(&mut self) {
        let log = self.dir.path().join("broker.log");
        let old = fs::read_to_string(&log).unwrap_or_default();
        fs::write(self.dir.path().join("broker-before-restart.log"), old).unwrap();
        self.broker.kill();
        self.broker = spawn_broker(self.dir.path(), self.broker_port, &self.options).await;
    }

    /// Restarts the broker (as [`Env::restart_broker`]) running `program`.
    pub async fn restart_broker_with(&mut self, program: PathBuf) {
        self.options.broker_binary = Some(program);
        self.restart_broker().await;
    }

    /// The broker's audit events so far.
    pub fn audit_events(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("every audit line is JSON"))
            .collect()
    }

    /// Replaces the broker's policy the way the kubelet updates a ConfigMap
    /// volume (a new hidden directory, then a `..data` symlink swap).
    pub fn set_policy(&self, policy: &str) {
        write_configmap(&self.dir.path().join("policy"), "policy.yaml", policy);
    }

    /// A well-formed ES256 token for `namespace`/`service_account`.
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        self.signer
            .mint(&TokenSpec::new(namespace, service_account))
    }

    /// Writes a token file for the identity and returns its path.
    pub fn token_file(&self, namespace: &str, service_account: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("token-{namespace}-{service_account}"));
        fs::write(&path, self.token(namespace, service_account)).unwrap();
        path
    }

    /// A gRPC client for the broker over TLS.
    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
    }

    /// Calls `Fetch` for `bindings` with `token` (nothing held).
    pub async fn fetch(
        &self,
        token: &str,
        bindings: &[&str],
    ) -> Result<tessera_proto::v1::FetchResponse, tonic::Status> {
        let request = tessera_proto::v1::FetchRequest {
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            ..Default::default()
        };
        self.client()
            .await
            .fetch(with_token(token, request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// A TLS channel to the broker that trusts the dev CA (and presents the
    /// dev client certificate when the broker requires mTLS).
    pub async fn channel(&self) -> Channel {
        let dev = self.dir.path().join("dev");
        self.try_channel(&dev.join(dev::files::CA), self.options.mtls)
            .await
            .unwrap()
    }

    /// A TLS channel trusting `ca`, optionally presenting the dev client certificate.
    pub async fn try_channel(
        &self,
        ca: &Path,
        client_cert: bool,
    ) -> Result<Channel, tonic::transport::Error> {
        let dev = self.dir.path().join("dev");
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(fs::read(ca).unwrap()));
        if client_cert {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                fs::read(dev.join(dev::files::CLIENT_CERT)).unwrap(),
                fs::read(dev.join(dev::files::CLIENT_KEY)).unwrap(),
            ));
        }
        Endpoint::from_shared(self.broker_uri.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }

    /// A fresh tmpfs output directory under /dev/shm, removed on drop.
    pub fn tmpfs_out(&self) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("tessera-out-")
            .tempdir_in("/dev/shm")
            .unwrap()
    }

    fn sidecar_command(
        &self,
        mode: &str,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
    ) -> Command {
        self.sidecar_command_at(&self.broker_uri, mode, token_file, out, bindings)
    }

    fn sidecar_command_at(
        &self,
        broker_uri: &str,
        mode: &str,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
    ) -> Command {
        let mut command = Command::new(binary("tessera-sidecar"));
        command
            .arg(mode)
            .args(["--broker", broker_uri, "--ca-file"])
            .arg(self.dir.path().join("dev").join(dev::files::CA))
            .arg("--token-file")
            .arg(token_file)
            .arg("--out")
            .arg(out)
            .arg("--binding")
            .arg(bindings.join(","))
            .env("RUST_LOG", &self.options.rust_log)
            .env("NO_COLOR", "1")
            .envs(self.options.process_env.iter().map(|(k, v)| (k, v)));
        if self.options.mtls {
            let dev = self.dir.path().join("dev");
            command
                .arg("--client-cert")
                .arg(dev.join(dev::files::CLIENT_CERT))
                .arg("--client-key")
                .arg(dev.join(dev::files::CLIENT_KEY));
        }
        command
    }

    /// Runs `tessera-sidecar once` to completion.
    pub fn sidecar_once(
        &self,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
        extra: &[&str],
    ) -> Output {
        self.sidecar_command("once", token_file, out, bindings)
            .args(extra)
            .output()
            .unwrap()
    }

    /// Starts `tessera-sidecar run`.
    pub fn sidecar_run(&self, token_file: &Path, out: &Path, bindings: &[&str]) -> Proc {
        self.sidecar_run_with(token_file, out, bindings, &[])
    }

    /// Starts `tessera-sidecar run` with extra arguments.
    pub fn sidecar_run_with(
        &self,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
        extra: &[&str],
    ) -> Proc {
        let mut command = self.sidecar_command("run", token_file, out, bindings);
        command.args(extra);
        let log = self
            .dir
            .path()
            .join(format!("sidecar-{}.log", random_string(6)));
        Proc::spawn("sidecar", command, log)
    }

    /// Starts `tessera-sidecar run` against the broker at `broker_uri` (a
    /// replica, or a balancer in front of several).
    pub fn sidecar_run_at(
        &self,
        broker_uri: &str,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
    ) -> Proc {
        let command = self.sidecar_command_at(broker_uri, "run", token_file, out, bindings);
        let log = self
            .dir
            .path()
            .join(format!("sidecar-{}.log", random_string(6)));
        Proc::spawn("sidecar", command, log)
    }

    /// Starts another broker replica: the same configuration (Vault, policy,
    /// shared handle key, Kubernetes API) on ports of its own, auditing to
    /// `audit-<name>.jsonl`.
    pub async fn start_replica(&self, name: &str) -> Replica {
        let text = fs::read_to_string(self.dir.path().join("broker.yaml")).unwrap();
        let port = free_port();
        let text = text
            .replace(
                &format!("listen: 127.0.0.1:{}\n", self.broker_port),
                &format!("listen: 127.0.0.1:{port}\n"),
            )
            .replace(
                &self.admin_url.replace("http://", "listen: "),
                &format!("listen: 127.0.0.1:{}", free_port()),
            )
            .replace(
                &self
                    .webhook_url
                    .replace("https://", "listen: ")
                    .replace("/mutate", ""),
                &format!("listen: 127.0.0.1:{}", free_port()),
            )
            .replace("path: audit.jsonl", &format!("path: audit-{name}.jsonl"));
        let config = format!("broker-{name}.yaml");
        fs::write(self.dir.path().join(&config), text).unwrap();
        let proc = spawn_broker_from(
            self.dir.path(),
            &config,
            &format!("broker-{name}.log"),
            port,
            &self.options,
        )
        .await;
        Replica {
            proc,
            uri: format!("https://127.0.0.1:{port}"),
            audit: self.dir.path().join(format!("audit-{name}.jsonl")),
        }
    }
}

/// Another broker replica of an [`Env`]; killed when dropped.
pub struct Replica {
    /// The broker process.
    pub proc: Proc,
    /// `https://127.0.0.1:PORT`.
    pub uri: String,
    audit: PathBuf,
}

impl Replica {
    /// The replica's audit events so far.
    pub fn audit_events(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("every audit line is JSON"))
            .collect()
    }
}

/// Starts the broker with `dir/broker.yaml` and waits until it listens.
async fn spawn_broker(dir: &Path, port: u16, options: &EnvOptions) -> Proc {
    spawn_broker_from(dir, "broker.yaml", "broker.log", port, options).await
}

/// Starts the broker with `dir/config`, logging to `dir/log`, and waits
/// until it listens on `port`.
async fn spawn_broker_from(
    dir: &Path,
    config: &str,
    log: &str,
    port: u16,
    options: &EnvOptions,
) -> Proc {
    // A port a killed broker held may linger a moment: wait until it is free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let program = options
        .broker_binary
        .clone()
        .unwrap_or_else(|| binary("tessera-broker"));
    let mut command = Command::new(program);
    command
        .args(["serve", "--config"])
        .arg(dir.join(config))
        .env("RUST_LOG", &options.rust_log)
        .env("NO_COLOR", "1")
        .envs(options.process_env.iter().map(|(k, v)| (k, v)));
    let mut broker = Proc::spawn("broker", command, dir.join(log));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(!broker.exited(), "broker exited:\n{}", broker.output());
        assert!(
            Instant::now() < deadline,
            "broker did not listen:\n{}",
            broker.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker
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

/// A plain HTTP/1.1 GET: (status code, body). Enough for the admin endpoints.
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url, "http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    parse_response(&response)
}

/// `(host:port, /path)` of a URL with `scheme`.
fn split_url<'a>(url: &'a str, scheme: &str) -> (&'a str, String) {
    let rest = url
        .strip_prefix(scheme)
        .unwrap_or_else(|| panic!("a {scheme} URL: {url}"));
    rest.split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")))
}

/// The status and body of an HTTP/1.1 response read to its end.
fn parse_response(response: &[u8]) -> (u16, String) {
    let response = String::from_utf8_lossy(response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// POSTs JSON over HTTPS (HTTP/1.1), trusting the CA in `ca`; returns the
/// status and the body.
pub async fn https_post(url: &str, ca: &Path, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url, "https://");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("usable CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    // A server may close without close_notify; what arrived is the answer.
    let _ = stream.read_to_end(&mut response).await;
    parse_response(&response)
}

/// Wraps `message` with `authorization: Bearer <token>`.
pub fn with_token<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let mut value = MetadataValue::try_from(format!("Bearer {token}")).unwrap();
    value.set_sensitive(true);
    request.metadata_mut().insert("authorization", value);
    request
}

/// A policy granting binding `db` (dynamic users of the `database` mount's role
/// `orders`) to shop/orders.
pub fn db_policy(ttl: &str, fraction: &str, overlap: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
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
