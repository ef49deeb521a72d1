//! A real OpenBao: a dev server, a server with Raft storage that can be
//! killed and restarted, and the Vault setup the tests need (policies,
//! logins, the database and PKI engines, leases, lease records).

use super::*;

/// A real OpenBao dev server.
pub struct OpenBao {
    /// The server process (none for a cluster: its nodes are `peers`).
    pub(crate) proc: Option<Proc>,
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The dev root token.
    pub root_token: String,
    /// OpenBao's own file audit device (configured at start: OpenBao only
    /// takes audit devices from its configuration).
    pub audit_log: PathBuf,
    /// For a server with Raft storage: its configuration and unseal key, to
    /// restart it with its data.
    pub(crate) persistent: Option<(PathBuf, String)>,
    /// The nodes of a cluster (empty for a single server).
    pub(crate) peers: Vec<cluster::Peer>,
    /// What routes a cluster's clients to its active node.
    pub(crate) proxy: Option<cluster::ActiveProxy>,
}

impl OpenBao {
    /// Starts `bao server -dev` on a free port and waits until it answers.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with_feeds(dir, &[]).await
    }

    /// [`OpenBao::start`], with an `http` audit device posting every entry
    /// to each of `feed_uris` beside the file device (which keeps OpenBao
    /// serving when a feed's receiver is away).
    pub async fn start_with_feeds(dir: &Path, feed_uris: &[String]) -> Self {
        let port = free_port();
        let root_token = random_string(24);
        let audit_log = dir.join("openbao-audit.log");
        let config = dir.join("openbao.hcl");
        let feed: String = feed_uris
            .iter()
            .enumerate()
            .map(|(n, uri)| {
                format!("audit \"http\" \"tessera-feed-{n}\" {{\n  options = {{\n    uri = \"{uri}\"\n  }}\n}}\n")
            })
            .collect();
        fs::write(
            &config,
            format!(
                "audit \"file\" \"tessera-test\" {{\n  options = {{\n    file_path = \"{}\"\n  }}\n}}\n{feed}",
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
        let audit = format!(
            "audit \"file\" \"tessera-test\" {{\n  options = {{\n    file_path = \"{}\"\n  }}\n}}\n",
            audit_log.display()
        );
        let raft = raft_config(&dir.join("openbao-data"), "tessera-test", port);
        fs::write(&config, raft + &audit).unwrap();
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
    pub(crate) fn enable_lease_records(&self) {
        self.cli(&[
            "secrets",
            "enable",
            "-path=tessera-leases",
            "-version=1",
            "kv",
        ]);
    }

    /// The lease records the brokers keep for one pod (their JSON
    /// documents), whatever cluster filed them, and in the layout from
    /// before clusters had names.
    pub fn lease_records(&self, pod_uid: &str) -> Vec<Value> {
        let mut records = Vec::new();
        // Folders are `<namespace>_<pod>_<uid>/`.
        let suffix = format!("_{pod_uid}/");
        let mut folders = self.list("tessera-leases/pods");
        for cluster in self.list("tessera-leases/clusters") {
            folders.extend(self.list(&format!("{}pods", cluster)));
        }
        for folder in folders.iter().filter(|f| f.ends_with(&suffix)) {
            for binding in self.list(folder.trim_end_matches('/')) {
                for id in self.list(binding.trim_end_matches('/')) {
                    let text = self.cli(&["read", "-format=json", &id]);
                    if let Ok(document) = serde_json::from_str::<Value>(&text) {
                        records.push(document["data"].clone());
                    }
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
    pub(crate) async fn spawn_server_named(
        dir: &Path,
        config: &Path,
        port: u16,
        name: &str,
    ) -> Proc {
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
        self.write_broker_policy_with("");
    }

    /// The broker policy with `extra` rules (HCL) added, e.g. for paths in a
    /// child namespace.
    pub fn write_broker_policy_with(&self, extra: &str) {
        let policy = r#"
path "secret/data/*" { capabilities = ["read"] }
path "secret/metadata/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "totp/code/*" { capabilities = ["read"] }
path "pki/issue/*" { capabilities = ["create", "update"] }
path "pki/sign/*" { capabilities = ["create", "update"] }
path "ssh/sign/*" { capabilities = ["create", "update"] }
path "pki/revoke" { capabilities = ["create", "update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "tessera-leases/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;
        let policy = format!("{policy}{extra}");
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
        self.enable_jwt_auth(signing_key_pem);
        self.pod_jwt_role(
            "tessera-broker",
            "system:serviceaccount:tessera:tessera-broker",
            "vault",
            "tessera-broker",
        );
    }

    /// Enables JWT auth at `jwt/` trusting the dev issuer's key in
    /// `signing_key_pem` (the key the broker's tokens are signed with).
    pub fn enable_jwt_auth(&self, signing_key_pem: &str) {
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
    }

    /// A JWT role `role` for tokens whose `sub` is `subject` and audience
    /// `audience`, holding Vault policy `policy`.
    pub fn pod_jwt_role(&self, role: &str, subject: &str, audience: &str, policy: &str) {
        self.cli(&[
            "write",
            &format!("auth/jwt/role/{role}"),
            "role_type=jwt",
            &format!("bound_audiences={audience}"),
            "user_claim=sub",
            &format!("bound_subject={subject}"),
            &format!("token_policies={policy}"),
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
        self.database_role_in(None, pg, role, (default_ttl, max_ttl));
    }

    /// [`OpenBao::database_role`] in `namespace` (the root one when `None`).
    pub fn database_role_in(
        &self,
        namespace: Option<&str>,
        pg: &Postgres,
        role: &str,
        (default_ttl, max_ttl): (&str, &str),
    ) {
        self.enable_database_engine(namespace);
        let cli = |args: &[&str]| self.cli_in(namespace, args);
        cli(&[
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
        cli(&[
            "write",
            &format!("database/roles/{role}"),
            "db_name=pg",
            "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            &format!("default_ttl={default_ttl}"),
            &format!("max_ttl={max_ttl}"),
        ]);
    }

    /// `bao` with `args` in `namespace` (the root one when `None`).
    pub(crate) fn cli_in(&self, namespace: Option<&str>, args: &[&str]) -> String {
        let in_namespace = namespace.map(|ns| format!("-namespace={ns}"));
        // The flag goes after the command: `write`, or `secrets enable`.
        let words = if ["secrets", "kv", "policy", "namespace"].contains(&args[0]) {
            2
        } else {
            1
        };
        let mut all: Vec<&str> = args[..words].to_vec();
        all.extend(in_namespace.as_deref());
        all.extend(&args[words..]);
        self.cli(&all)
    }

    /// Enables the `database` engine at `database/` in `namespace`, unless it is.
    pub(crate) fn enable_database_engine(&self, namespace: Option<&str>) {
        let mounts = self.cli_in(namespace, &["secrets", "list", "-format=json"]);
        if !mounts.contains("\"database/\"") {
            self.cli_in(namespace, &["secrets", "enable", "database"]);
        }
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

/// The configuration of a server with Raft storage in `data`, named
/// `node_id`, serving on `port` (and a cluster port of its own).
pub(crate) fn raft_config(data: &Path, node_id: &str, port: u16) -> String {
    format!(
        "storage \"raft\" {{
  path = \"{data}\"
  node_id = \"{node_id}\"
}}
listener \"tcp\" {{
  address = \"127.0.0.1:{port}\"
  cluster_address = \"127.0.0.1:{cluster}\"
  tls_disable = true
}}
api_addr = \"http://127.0.0.1:{port}\"
cluster_addr = \"http://127.0.0.1:{cluster}\"
",
        data = data.display(),
        cluster = free_port(),
    )
}
