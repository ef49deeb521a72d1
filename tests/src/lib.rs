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
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

pub mod kube_api;

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
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    /// The server process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The dev root token.
    pub root_token: String,
    /// OpenBao's own file audit device (configured at start: OpenBao only
    /// takes audit devices from its configuration).
    pub audit_log: PathBuf,
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
            proc,
            address: format!("http://127.0.0.1:{port}"),
            root_token,
            audit_log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if vaultrs::token::lookup_self(&bao.client()).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become ready:\n{}",
                bao.proc.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bao
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
    /// metadata under `secret/`, nothing else.
    pub fn write_broker_policy(&self) {
        let policy = r#"
path "secret/data/*" { capabilities = ["read"] }
path "secret/metadata/*" { capabilities = ["read"] }
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
        self.cli(&["auth", "enable", "approle"]);
        self.cli(&[
            "write",
            "auth/approle/role/tessera-broker",
            "token_policies=tessera-broker",
            "token_ttl=1h",
        ]);
        let role_id = self.cli(&[
            "read",
            "-field=role_id",
            "auth/approle/role/tessera-broker/role-id",
        ]);
        let secret_id = self.cli(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/tessera-broker/secret-id",
        ]);
        (role_id, secret_id)
    }

    /// Writes a new version of a KV v2 secret under the dev `secret/` mount.
    pub async fn put(&self, path: &str, data: &Value) {
        vaultrs::kv2::set(&self.client(), "secret", path, data)
            .await
            .unwrap();
    }
}

/// How the broker logs in to OpenBao in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerLogin {
    /// A least-privilege token in a file.
    TokenFile,
    /// AppRole with a least-privilege role.
    AppRole,
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
    /// Requests per second and burst per identity.
    pub rate_limit: (u32, u32),
    /// Require client certificates (the dev CA's) from callers.
    pub mtls: bool,
    /// YAML lines for the identity source (indented for the `identity:`
    /// block); the dev JWKS file by default.
    pub identity_source: String,
    /// Start an in-process Kubernetes API server and point the broker at it.
    pub kube_api: bool,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            login: BrokerLogin::TokenFile,
            rust_log: "info,tessera_broker=debug,tessera_sidecar=debug".to_owned(),
            poll: "200ms",
            rate_limit: (10_000, 10_000),
            mtls: false,
            identity_source: "jwksFile: dev/jwks.json".to_owned(),
            kube_api: false,
        }
    }
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
        let bao = OpenBao::start(dir.path()).await;

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
shutdownGrace: 5s
audit:
  path: audit.jsonl
rateLimit:
  perSecond: {per_second}
  burst: {burst}
{kubernetes}",
            issuer = dev::DEFAULT_ISSUER,
            audience = dev::DEFAULT_AUDIENCE,
            address = bao.address,
            poll = options.poll,
            identity_source = options.identity_source,
            client_ca = if options.mtls {
                "clientCaFile: dev/ca.pem"
            } else {
                ""
            },
            per_second = options.rate_limit.0,
            burst = options.rate_limit.1,
        );
        fs::write(dir.path().join("broker.yaml"), config).unwrap();
        let mut command = Command::new(binary("tessera-broker"));
        command
            .args(["serve", "--config"])
            .arg(dir.path().join("broker.yaml"))
            .env("RUST_LOG", &options.rust_log)
            .env("NO_COLOR", "1");
        let mut broker = Proc::spawn("broker", command, dir.path().join("broker.log"));
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
        Self {
            dir,
            bao,
            broker,
            broker_uri: format!("https://127.0.0.1:{port}"),
            signer,
            rsa_signer,
            kube,
            options,
        }
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
        let mut command = Command::new(binary("tessera-sidecar"));
        command
            .arg(mode)
            .args(["--broker", &self.broker_uri, "--ca-file"])
            .arg(self.dir.path().join("dev").join(dev::files::CA))
            .arg("--token-file")
            .arg(token_file)
            .arg("--out")
            .arg(out)
            .arg("--binding")
            .arg(bindings.join(","))
            .env("RUST_LOG", &self.options.rust_log)
            .env("NO_COLOR", "1");
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
        let command = self.sidecar_command("run", token_file, out, bindings);
        let log = self
            .dir
            .path()
            .join(format!("sidecar-{}.log", random_string(6)));
        Proc::spawn("sidecar", command, log)
    }
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
