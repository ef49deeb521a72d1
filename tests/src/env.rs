//! A whole test environment: OpenBao, a broker process (and more replicas),
//! the dev keys and TLS files, optionally the Kubernetes API stand-in, and
//! sidecar processes.

use super::*;

/// The cluster name every test broker runs with (`cluster.name`).
pub const TEST_CLUSTER: &str = "test-1";
use crate::config::{
    AdminConfig, AuditConfig, BootstrapConfig, ClusterConfig, IdentityConfig, KubernetesConfig,
    LeasesConfig, PolicyConfig, RateLimitConfig, SidecarConfig, TlsConfig, VaultConfig, VaultLogin,
    WebhookConfig,
};

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
    /// Where tokens are checked: the dev JWKS file by default.
    pub identity_source: IdentitySource,
    /// Look each caller's pod up (`identity.podLookup`, with `kubernetes`).
    pub pod_lookup: bool,
    /// Start a real Kubernetes control plane (`scripts/cluster`) and point
    /// the broker at it: the issuer is the cluster's, tokens come from its
    /// TokenRequest API, and a `jwksFile` holds the cluster's own keys.
    pub kubernetes: bool,
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
    /// The broker makes its CA, serving certificate and handle key in
    /// Secrets of the cluster (`bootstrap:`), as the chart has it, instead
    /// of using the dev files. Needs `kubernetes`.
    pub bootstrap: bool,
    /// OpenBao posts its audit entries to the broker (`vault.changeFeed`,
    /// checked every second, polling backstop 5 minutes) through a relay
    /// [`Env::silence_change_feed`] stops.
    pub change_feed: bool,
    /// OpenBao posts its audit entries straight to each of these loopback
    /// ports, without a relay (the bench, whose relay would run in its own
    /// process): the first is the broker's `vault.changeFeed.listen`; the
    /// others are for replicas the caller starts listening there.
    pub feeds_direct: Vec<u16>,
    /// The change feed's `checkInterval` (how often a canary is sent).
    pub feed_check: &'static str,
    /// Read the policy from ClusterAccessPolicy and AccessBinding resources
    /// too (the chart's CRDs installed first). Needs `kubernetes`.
    pub policy_resources: bool,
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
            identity_source: IdentitySource::JwksFile,
            pod_lookup: false,
            kubernetes: false,
            persistent_vault: false,
            vault_cluster: false,
            process_env: Vec::new(),
            broker_binary: None,
            sweep_interval: "2s",
            bootstrap: false,
            change_feed: false,
            feeds_direct: Vec::new(),
            feed_check: "1s",
            policy_resources: false,
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
    /// The Kubernetes control plane, when asked for.
    pub kube: Option<Cluster>,
    /// The broker's configuration, as written to `broker.yaml`.
    pub config: BrokerConfig,
    options: EnvOptions,
    /// The relay Vault's change feed goes through, when there is one.
    feed_relay: Option<Balancer>,
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
        // Vault's change feed reaches the broker through a relay, which a
        // test can stop to silence it.
        let feed = options.change_feed.then(|| {
            let port = free_port();
            (port, Some(Balancer::start(vec![port])))
        });
        let feed = feed.or_else(|| options.feeds_direct.first().map(|port| (*port, None)));
        // OpenBao sends a new audit device a test entry and refuses to start
        // if nobody takes it: stand-ins take it until the brokers listen.
        let stand_ins: Vec<_> = match &feed {
            Some((port, Some(_))) => vec![http_sink(*port)],
            _ => options.feeds_direct.iter().map(|p| http_sink(*p)).collect(),
        };
        let bao = if options.vault_cluster {
            OpenBao::start_cluster(dir.path(), 3).await
        } else if options.persistent_vault {
            OpenBao::start_persistent(dir.path()).await
        } else {
            let uris: Vec<String> = match &feed {
                Some((_, Some(relay))) => vec![relay.port()],
                _ => options.feeds_direct.clone(),
            }
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}/v1/audit"))
            .collect();
            OpenBao::start_with_feeds(dir.path(), &uris).await
        };

        let devdir = dir.path().join("dev");
        let (signer, rsa_signer) = dev_keys(&devdir);
        write_configmap(&dir.path().join("policy"), "policy.yaml", policy);
        bao.write_broker_policy();
        let login = broker_login(&bao, dir.path(), &signer, options.login);
        let kube = options.kubernetes.then(Cluster::start);
        if let (Some(cluster), true) = (&kube, options.policy_resources) {
            cluster.install_policy_crds();
        }
        if let Some(cluster) = &kube {
            // The cluster's own keys, as `kubectl get --raw /openid/v1/jwks`
            // gives them (install.md's jwksFile recipe).
            let jwks = cluster.run(&["get", "--raw", "/openid/v1/jwks"]);
            fs::write(devdir.join(dev::files::JWKS), jwks).unwrap();
        }
        let issuer = kube
            .as_ref()
            .map_or(dev::DEFAULT_ISSUER, |c| c.issuer())
            .to_owned();
        let port = free_port();
        let tls = serving_files(kube.as_ref(), options.bootstrap);
        let mut config = broker_config(
            &options,
            (port, issuer),
            (&bao, login),
            (tls, kube.as_ref()),
        );
        config.vault.change_feed = feed.as_ref().map(|(port, _)| ChangeFeedConfig {
            listen: format!("127.0.0.1:{port}"),
            backstop_interval: "5m".to_owned(),
            check_interval: options.feed_check.to_owned(),
        });
        config.write(dir.path(), "broker.yaml");
        drop(stand_ins);
        let broker = spawn_broker(dir.path(), port, &options).await;
        Self {
            dir,
            bao,
            broker,
            broker_uri: format!("https://127.0.0.1:{port}"),
            broker_port: port,
            admin_url: format!("http://{}", config.admin.listen),
            webhook_url: format!("https://{}/mutate", config.webhook.listen),
            config,
            signer,
            rsa_signer,
            kube,
            options,
            feed_relay: feed.and_then(|(_, relay)| relay),
        }
    }

    /// Stops Vault's change feed on its way to the broker, as a network
    /// fault would: the relay stops and OpenBao drops its connections.
    pub fn silence_change_feed(&mut self) {
        if let Some(relay) = self.feed_relay.take() {
            relay.cut();
        }
    }

    /// Registers the broker's webhook with the cluster's API server as the
    /// chart does, in URL form (the broker on loopback, trusted through the
    /// release CA), failing closed.
    pub fn register_webhook(&self) {
        use base64::Engine as _;
        let cluster = self
            .kube
            .as_ref()
            .expect("register_webhook needs kubernetes");
        let ca = fs::read(self.dir.path().join("dev/ca.pem")).unwrap();
        let applied = cluster.apply(&kubernetes::webhook_configuration(
            json!({
                "url": self.webhook_url.replace("127.0.0.1", "localhost"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca),
            }),
            "Fail",
        ));
        assert!(
            applied.status.success(),
            "{}",
            String::from_utf8_lossy(&applied.stderr)
        );
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
    ///
    /// With a cluster, the token comes from its TokenRequest API, bound to
    /// the pod `<service account>-0` when that pod exists.
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        match &self.kube {
            Some(cluster) => {
                let pod = format!("{service_account}-0");
                let bound = cluster.has_pod(namespace, &pod).then_some(pod.as_str());
                cluster.token(
                    namespace,
                    service_account,
                    dev::DEFAULT_AUDIENCE,
                    bound,
                    3600,
                )
            }
            None => self
                .signer
                .mint(&TokenSpec::new(namespace, service_account)),
        }
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

    /// Gives back `held` (binding, handle) as `token`'s pod, as a sidecar
    /// does on exit; the bindings the broker revoked.
    pub async fn revoke_held(&self, token: &str, held: &[(&str, &str)]) -> Vec<String> {
        let request = tessera_proto::v1::RevokeRequest {
            bindings: vec![],
            held: held
                .iter()
                .map(|(binding, handle)| tessera_proto::v1::Held {
                    binding: (*binding).to_owned(),
                    handle: (*handle).to_owned(),
                })
                .collect(),
        };
        self.client()
            .await
            .revoke(with_token(token, request))
            .await
            .unwrap()
            .into_inner()
            .revoked
    }

    /// A TLS channel to the broker that trusts its CA (and presents the
    /// dev client certificate when the broker requires mTLS).
    pub async fn channel(&self) -> Channel {
        self.try_channel(&self.ca_file(), self.options.mtls)
            .await
            .unwrap()
    }

    /// The CA the broker's serving certificate chains to: the dev CA, or
    /// the one the broker made itself (`bootstrap`).
    pub fn ca_file(&self) -> PathBuf {
        if self.options.bootstrap {
            self.dir.path().join("bootstrap/ca.crt")
        } else {
            self.dir.path().join("dev").join(dev::files::CA)
        }
    }

    /// A TLS channel to another replica (its `uri`), as [`Env::channel`].
    pub async fn channel_to(&self, uri: &str) -> Channel {
        self.connect(uri, &self.ca_file(), self.options.mtls)
            .await
            .unwrap()
    }

    /// A TLS channel trusting `ca`, optionally presenting the dev client certificate.
    pub async fn try_channel(
        &self,
        ca: &Path,
        client_cert: bool,
    ) -> Result<Channel, tonic::transport::Error> {
        self.connect(&self.broker_uri, ca, client_cert).await
    }

    async fn connect(
        &self,
        uri: &str,
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
        Endpoint::from_shared(uri.to_owned())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }

    /// Starts `tessera-sidecar exec` for `bindings` running `command`, with
    /// `extra` options before the `--`.
    pub fn sidecar_exec(
        &self,
        token_file: &Path,
        bindings: &[&str],
        extra: &[&str],
        command: &[&str],
    ) -> Proc {
        let mut exec = Command::new(binary("tessera-sidecar"));
        exec.args(["exec", "--broker", &self.broker_uri, "--ca-file"])
            .arg(self.ca_file())
            .arg("--token-file")
            .arg(token_file)
            .arg("--binding")
            .arg(bindings.join(","))
            .args(extra)
            .arg("--")
            .args(command)
            .env("RUST_LOG", &self.options.rust_log)
            .env("NO_COLOR", "1");
        let log = self
            .dir
            .path()
            .join(format!("exec-{}.log", random_string(6)));
        Proc::spawn("tessera-sidecar exec", exec, log)
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

    /// `tessera-sidecar MODE` against the broker at `broker_uri` (a
    /// replica), not yet started.
    pub fn sidecar_command_at(
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
            .arg(self.ca_file())
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
        self.sidecar_run_at_with(&self.broker_uri, token_file, out, bindings, extra)
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
        self.sidecar_run_at_with(broker_uri, token_file, out, bindings, &[])
    }

    /// Starts `tessera-sidecar run` against `broker_uri` with extra arguments.
    pub fn sidecar_run_at_with(
        &self,
        broker_uri: &str,
        token_file: &Path,
        out: &Path,
        bindings: &[&str],
        extra: &[&str],
    ) -> Proc {
        let mut command = self.sidecar_command_at(broker_uri, "run", token_file, out, bindings);
        command.args(extra);
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
        self.start_replica_with(name, |_| {}).await
    }

    /// Starts another replica, as [`Env::start_replica`], with `edit` made
    /// to its configuration.
    pub async fn start_replica_with(
        &self,
        name: &str,
        edit: impl FnOnce(&mut BrokerConfig),
    ) -> Replica {
        let port = free_port();
        let mut config = self.config.clone();
        edit(&mut config);
        config.listen = format!("127.0.0.1:{port}");
        config.admin.listen = format!("127.0.0.1:{}", free_port());
        config.webhook.listen = format!("127.0.0.1:{}", free_port());
        config.audit.path = format!("audit-{name}.jsonl");
        // Vault's audit device posts to the first broker's feed (or to
        // where `edit` put this replica's).
        let first = self
            .config
            .vault
            .change_feed
            .as_ref()
            .map(|f| f.listen.clone());
        if let Some(feed) = config.vault.change_feed.as_mut()
            && Some(&feed.listen) == first.as_ref()
        {
            feed.listen = format!("127.0.0.1:{}", free_port());
        }
        let file = format!("broker-{name}.yaml");
        config.write(self.dir.path(), &file);
        let proc = spawn_broker_from(
            self.dir.path(),
            &file,
            &format!("broker-{name}.log"),
            port,
            &self.options,
        )
        .await;
        Replica {
            proc,
            uri: format!("https://127.0.0.1:{port}"),
            port,
            audit: self.dir.path().join(format!("audit-{name}.jsonl")),
            file,
            config,
            log: format!("broker-{name}.log"),
        }
    }

    /// Changes the broker's configuration (for its next start).
    pub fn edit_config(&mut self, edit: impl FnOnce(&mut BrokerConfig)) {
        edit(&mut self.config);
        self.config.write(self.dir.path(), "broker.yaml");
    }

    /// Rotates the dev handle key as an operator would: the current one is
    /// kept as `dev/handle-N.key` (returned) and a new one takes its place.
    /// Brokers use it once restarted with the returned file retired
    /// ([`Replica::retire_handle_key`]).
    pub fn rotate_handle_key(&self) -> String {
        let dev = self.dir.path().join("dev");
        let retired = (1..)
            .map(|n| format!("dev/handle-{n}.key"))
            .find(|name| !self.dir.path().join(name).exists())
            .unwrap();
        fs::rename(dev.join("handle.key"), self.dir.path().join(&retired)).unwrap();
        fs::write(dev.join("handle.key"), random_string(48)).unwrap();
        retired
    }
}

/// Another broker replica of an [`Env`]; killed when dropped.
pub struct Replica {
    /// The broker process.
    pub proc: Proc,
    /// `https://127.0.0.1:PORT`.
    pub uri: String,
    /// Its gRPC port.
    pub port: u16,
    /// Its audit trail (JSON lines).
    pub audit: PathBuf,
    file: String,
    config: BrokerConfig,
    log: String,
}

impl Replica {
    /// Its log file's name in the environment's directory.
    pub fn log_name(&self) -> &str {
        &self.log
    }

    /// `http://ADDR` of its admin endpoints (`/metrics`).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.config.admin.listen)
    }

    /// Its servers, by the name the broker gives each, with their ports.
    pub fn servers(&self) -> [(&'static str, u16); 3] {
        let port = |listen: &str| listen.rsplit(':').next().unwrap().parse().unwrap();
        [
            ("gRPC server", self.port),
            ("admin server", port(&self.config.admin.listen)),
            ("webhook server", port(&self.config.webhook.listen)),
        ]
    }

    /// Stops the replica (SIGTERM and its drain when `graceful`, SIGKILL
    /// otherwise) and starts it again with its configuration and port, as
    /// a rolling update or a crash would replace it.
    pub async fn restart(&mut self, env: &Env, graceful: bool) {
        if graceful {
            self.proc.terminate();
        }
        self.proc.kill();
        self.proc = spawn_broker_from(
            env.dir.path(),
            &self.file,
            &self.log,
            self.port,
            &env.options,
        )
        .await;
    }

    /// Lists `retired` (a path in the environment's directory) among the
    /// replica's retired handle keys, for its next start.
    pub fn retire_handle_key(&mut self, retired: &str, env: &Env) {
        self.config
            .leases
            .retired_handle_key_files
            .push(retired.to_owned());
        self.config.write(env.dir.path(), &self.file);
    }

    /// The replica's audit events so far.
    pub fn audit_events(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("every audit line is JSON"))
            .collect()
    }
}

/// Answers `204 No Content` to every HTTP request on `port` (closing each
/// connection) until dropped.
fn http_sink(port: u16) -> impl Drop {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        sync::atomic::{AtomicBool, Ordering},
    };
    struct Sink(u16, Arc<AtomicBool>);
    impl Drop for Sink {
        fn drop(&mut self) {
            self.1.store(true, Ordering::Relaxed);
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.0));
            // The broker binds the port next: wait until it is free.
            for _ in 0..100 {
                if TcpListener::bind(("127.0.0.1", self.0)).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stopping.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    Sink(port, stop)
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

/// Runs `tessera-broker dev init` into `devdir` and makes its JWKS trust
/// both test signers (ES256 and RS256); the signers.
fn dev_keys(devdir: &Path) -> (SigningKey, SigningKey) {
    let status = Command::new(binary("tessera-broker"))
        .args(["dev", "init", "--dir"])
        .arg(devdir)
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
    (signer, rsa_signer)
}

/// Sets up the broker's own Vault login of kind `login` in OpenBao and the
/// files it reads in `dir`.
fn broker_login(bao: &OpenBao, dir: &Path, signer: &SigningKey, login: BrokerLogin) -> VaultLogin {
    let devdir = dir.join("dev");
    match login {
        BrokerLogin::TokenFile => {
            fs::write(dir.join("vault-token"), bao.broker_token()).unwrap();
            VaultLogin::TokenFile("vault-token".to_owned())
        }
        BrokerLogin::AppRole => {
            let (role_id, secret_id) = bao.broker_approle();
            fs::write(dir.join("secret-id"), secret_id).unwrap();
            VaultLogin::AppRole {
                role_id,
                secret_id_file: "secret-id".to_owned(),
            }
        }
        BrokerLogin::Jwt => {
            let pem = fs::read_to_string(devdir.join(dev::files::SIGNING_KEY)).unwrap();
            bao.broker_jwt_role(&pem);
            let mut spec = TokenSpec::new("tessera", "tessera-broker");
            spec.audience = "vault".to_owned();
            fs::write(dir.join("broker-sa-token"), signer.mint(&spec)).unwrap();
            VaultLogin::Jwt {
                role: "tessera-broker".to_owned(),
                token_file: "broker-sa-token".to_owned(),
            }
        }
    }
}

/// Where the broker's serving certificate and CA come from: the dev files,
/// or (with `bootstrap`) the Secrets the broker makes, with the webhook
/// configuration the chart renders.
fn serving_files(kube: Option<&Cluster>, bootstrap: bool) -> (&'static str, &'static str) {
    if bootstrap {
        let cluster = kube.expect("bootstrap needs kubernetes");
        cluster.service_account("tessera", "tessera");
        // What the chart renders: no caBundle; the broker keeps it.
        let applied = cluster.apply(&kubernetes::webhook_configuration(
            json!({ "service": { "name": "tessera", "namespace": "tessera", "path": "/mutate" } }),
            "Ignore",
        ));
        assert!(
            applied.status.success(),
            "{}",
            String::from_utf8_lossy(&applied.stderr)
        );
        ("bootstrap", "bootstrap/ca.crt")
    } else {
        ("dev", "dev/ca.pem")
    }
}

/// The broker's configuration for a test environment.
fn broker_config(
    options: &EnvOptions,
    (port, issuer): (u16, String),
    (bao, login): (&OpenBao, VaultLogin),
    ((tls_dir, ca_file), kube): ((&str, &str), Option<&Cluster>),
) -> BrokerConfig {
    BrokerConfig {
        cluster: ClusterConfig {
            name: TEST_CLUSTER.to_owned(),
        },
        listen: format!("127.0.0.1:{port}"),
        tls: TlsConfig {
            cert_file: format!("{tls_dir}/tls.crt"),
            key_file: format!("{tls_dir}/tls.key"),
            reload_interval: "100ms".to_owned(),
            client_ca_file: options.mtls.then(|| "dev/ca.pem".to_owned()),
        },
        identity: identity_config(options, issuer),
        policy: PolicyConfig {
            paths: vec!["policy".to_owned()],
            reload_interval: "100ms".to_owned(),
            resources: options.policy_resources,
        },
        vault: VaultConfig {
            address: bao.address.clone(),
            login,
            kv_poll_interval: options.poll.to_owned(),
            health_check_interval: options.vault_health_check.to_owned(),
            change_feed: None,
        },
        shutdown_grace: "5s".to_owned(),
        audit: AuditConfig {
            path: "audit.jsonl".to_owned(),
        },
        rate_limit: RateLimitConfig {
            per_second: options.rate_limit.0,
            burst: options.rate_limit.1,
        },
        leases: LeasesConfig {
            handle_key_file: (!options.bootstrap).then(|| "dev/handle.key".to_owned()),
            retired_handle_key_files: Vec::new(),
            sweep_interval: options.sweep_interval.to_owned(),
            full_sweep_interval: "1h".to_owned(),
        },
        admin: AdminConfig {
            listen: format!("127.0.0.1:{}", free_port()),
        },
        webhook: webhook_config(options, port, ca_file),
        kubernetes: kube.map(|cluster| KubernetesConfig {
            kubeconfig: cluster.kubeconfig.display().to_string(),
        }),
        bootstrap: options.bootstrap.then(|| BootstrapConfig {
            namespace: "tessera".to_owned(),
            directory: "bootstrap".to_owned(),
            tls_secret: "tessera-tls".to_owned(),
            dns_names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            handle_key_secret: "tessera-handle-key".to_owned(),
            webhook_configuration: "tessera".to_owned(),
            check_interval: "1s".to_owned(),
        }),
        connections: None,
        memory: None,
        peers: None,
        drift: None,
    }
}

/// `identity:` for a test environment: the dev issuer (or the cluster's)
/// and the options' key source.
fn identity_config(options: &EnvOptions, issuer: String) -> IdentityConfig {
    IdentityConfig {
        issuer,
        audiences: vec![dev::DEFAULT_AUDIENCE.to_owned()],
        source: options.identity_source,
        jwks_file: (options.identity_source == IdentitySource::JwksFile)
            .then(|| "dev/jwks.json".to_owned()),
        leeway: "5s".to_owned(),
        pod_lookup: options.pod_lookup,
        // Deletions seen within a second.
        cache_ttl: options.pod_lookup.then(|| "1s".to_owned()),
        key_refresh_interval: (options.identity_source == IdentitySource::OidcDiscovery)
            .then(|| "500ms".to_owned()),
    }
}

/// `webhook:` for a test environment, pointing sidecars at the broker on `port`.
fn webhook_config(options: &EnvOptions, port: u16, ca_file: &str) -> WebhookConfig {
    WebhookConfig {
        listen: format!("127.0.0.1:{}", free_port()),
        sidecar: SidecarConfig {
            image: "tessera-sidecar:test".to_owned(),
            broker_address: format!("https://127.0.0.1:{port}"),
            ca_file: ca_file.to_owned(),
            mode: if options.kubernetes {
                "auto"
            } else {
                "classic"
            }
            .to_owned(),
        },
    }
}
