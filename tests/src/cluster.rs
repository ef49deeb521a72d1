//! An OpenBao cluster with integrated (Raft) storage on loopback ports:
//! init, unseal, join, and the wait until every node votes, all scripted.
//! Clients reach it through a loopback TCP proxy that follows the active
//! node, standing in for the `openbao-active` Service of a Kubernetes install
//! (OpenBao's standbys serve reads from their own, possibly lagging, copy:
//! a broker must talk to the active node). Tests kill the active node and
//! watch a standby take over.

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{OpenBao, Proc, bao_binary, free_port, openbao::raft_config};

/// Another node of a cluster: its address, configuration, unseal key and,
/// while it runs, its process.
pub(crate) struct Peer {
    address: String,
    name: String,
    config: std::path::PathBuf,
    unseal_key: String,
    proc: Option<Proc>,
}

impl OpenBao {
    /// Starts `size` (at least 3) nodes, initialises the first, joins the
    /// others and waits until all of them vote. The handle returned talks
    /// to the second node, a standby.
    pub async fn start_cluster(dir: &Path, size: usize) -> Self {
        assert!(
            size >= 3,
            "a cluster that survives a node's loss has 3 nodes"
        );
        let mut nodes = Vec::new();
        for index in 0..size {
            let port = free_port();
            let data = dir.join(format!("openbao-node-{index}"));
            fs::create_dir_all(&data).unwrap();
            let config = dir.join(format!("openbao-node-{index}.hcl"));
            fs::write(&config, raft_config(&data, &format!("node-{index}"), port)).unwrap();
            let proc =
                Self::spawn_server_named(dir, &config, port, &format!("openbao-node-{index}"))
                    .await;
            nodes.push((format!("http://127.0.0.1:{port}"), proc, config));
        }
        let leader = nodes[0].0.clone();
        let (unseal, root) = init_leader(&leader);
        let followers: Vec<&str> = nodes[1..].iter().map(|(a, _, _)| a.as_str()).collect();
        join_voters(&leader, &followers, (&unseal, &root));
        let addresses: Vec<String> = nodes.iter().map(|(a, _, _)| a.clone()).collect();
        let proxy = ActiveProxy::start(addresses);
        let mut bao = Self {
            proc: None,
            address: proxy.address.clone(),
            root_token: root,
            audit_log: dir.join("openbao-audit.log"),
            persistent: None,
            peers: nodes
                .into_iter()
                .enumerate()
                .map(|(index, (address, proc, config))| Peer {
                    address,
                    name: format!("openbao-node-{index}"),
                    config,
                    unseal_key: unseal.clone(),
                    proc: Some(proc),
                })
                .collect(),
            proxy: Some(proxy),
        };
        bao.cli(&["secrets", "enable", "-path=secret", "kv-v2"]);
        bao.enable_lease_records();
        // KV v2 upgrades its storage for a moment after being enabled.
        wait_until(Duration::from_secs(30), "KV v2 to take writes", || {
            try_run(
                &bao.address,
                Some(&bao.root_token),
                &["kv", "put", "-mount=secret", "tessera-ready-probe", "ok=1"],
                "",
            )
            .is_some()
        });
        bao.proxy_follows_leader();
        bao
    }

    fn proxy_follows_leader(&mut self) {
        if let Some(proxy) = &self.proxy {
            proxy.follow_now();
        }
    }

    /// The address of the active node, as the live nodes see it.
    pub fn active_address(&self) -> Option<String> {
        self.peers
            .iter()
            .filter(|p| p.proc.is_some())
            .find_map(|p| leader_of(&p.address))
    }

    /// Kills (SIGKILL) the active node of a cluster; returns its address.
    pub fn kill_active(&mut self) -> String {
        let active = self
            .active_address()
            .expect("a cluster with an active node");
        let peer = self
            .peers
            .iter_mut()
            .find(|p| p.address == active)
            .expect("the active node is one of the cluster's");
        if let Some(mut proc) = peer.proc.take() {
            proc.kill();
        }
        active
    }

    /// Kills (SIGKILL) every node of a cluster: Vault is gone.
    pub fn kill_all(&mut self) {
        for peer in &mut self.peers {
            if let Some(mut proc) = peer.proc.take() {
                proc.kill();
            }
        }
    }

    /// Starts every killed node of a cluster again with its data, unseals
    /// it, and waits until the cluster takes writes through the proxy.
    pub async fn restart_killed(&mut self, dir: &Path) {
        for peer in self.peers.iter_mut().filter(|p| p.proc.is_none()) {
            let port: u16 = peer.address.rsplit(':').next().unwrap().parse().unwrap();
            peer.proc = Some(Self::spawn_server_named(dir, &peer.config, port, &peer.name).await);
            run(
                &peer.address,
                None,
                &["operator", "unseal", &peer.unseal_key],
            );
        }
        self.proxy_follows_leader();
        let (address, token) = (self.address.clone(), self.root_token.clone());
        wait_until(
            Duration::from_secs(60),
            "the cluster to take writes",
            || {
                try_run(
                    &address,
                    Some(&token),
                    &["policy", "write", "tessera-ready-probe", "-"],
                    "path \"x/*\" { capabilities = [\"read\"] }",
                )
                .is_some()
            },
        );
    }
}

/// The active node's address, as `node` answers `sys/leader` (unauthenticated).
fn leader_of(node: &str) -> Option<String> {
    let host = node.strip_prefix("http://")?;
    let mut stream = TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /v1/sys/leader HTTP/1.0\r\nHost: {host}\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let body = answer.split_once("\r\n\r\n")?.1;
    let leader: Value = serde_json::from_str(body).ok()?;
    leader["leader_address"]
        .as_str()
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
}

/// A loopback TCP proxy to whichever node is active: it asks the nodes
/// every 250 ms, and sends each new connection to the latest answer.
pub(crate) struct ActiveProxy {
    /// `http://127.0.0.1:PORT`.
    address: String,
    nodes: Vec<String>,
    target: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl ActiveProxy {
    fn start(nodes: Vec<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Self {
            address: format!("http://127.0.0.1:{port}"),
            nodes,
            target: Arc::default(),
            stop: Arc::default(),
        };
        proxy.follow_now();
        let (target, stop, nodes) = (
            proxy.target.clone(),
            proxy.stop.clone(),
            proxy.nodes.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(leader) = nodes.iter().find_map(|n| leader_of(n)) {
                    *target.lock().unwrap() = Some(leader);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let (target, stop) = (proxy.target.clone(), proxy.stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let leader = target.lock().unwrap().clone();
                let upstream = leader
                    .as_deref()
                    .and_then(|l| l.strip_prefix("http://"))
                    .and_then(|host| TcpStream::connect(host).ok());
                match upstream {
                    Some(upstream) => pipe(client, upstream),
                    None => {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                }
            }
        });
        proxy
    }

    /// Asks the nodes for the active one now.
    fn follow_now(&self) {
        if let Some(leader) = self.nodes.iter().find_map(|n| leader_of(n)) {
            *self.target.lock().unwrap() = Some(leader);
        }
    }
}

impl Drop for ActiveProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.address.trim_start_matches("http://"));
    }
}

/// Copies bytes both ways between two connections until either side closes.
pub(crate) fn pipe(client: TcpStream, upstream: TcpStream) {
    let (Ok(client_read), Ok(upstream_read)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    copy(client_read, upstream);
    copy(upstream_read, client);
}

/// `bao ARGS` against `address`; its stdout, or `None` when it failed.
fn try_run(address: &str, token: Option<&str>, args: &[&str], stdin: &str) -> Option<String> {
    use std::io::Write;
    let mut command = Command::new(bao_binary());
    command
        .args(args)
        .env("BAO_ADDR", address)
        .env_remove("BAO_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(token) = token {
        command.env("BAO_TOKEN", token);
    }
    let mut child = command.spawn().ok()?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let output = child.wait_with_output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `bao ARGS` against `address`, which must succeed.
fn run(address: &str, token: Option<&str>, args: &[&str]) -> String {
    try_run(address, token, args, "")
        .unwrap_or_else(|| panic!("bao {args:?} against {address} failed"))
}

/// Polls `done` every 200 ms for at most `timeout`.
fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Initializes and unseals the first node, waits for it to be active and
/// lets joined nodes become voters quickly; the unseal key and root token.
fn init_leader(leader: &str) -> (String, String) {
    let init = run(
        leader,
        None,
        &[
            "operator",
            "init",
            "-key-shares=1",
            "-key-threshold=1",
            "-format=json",
        ],
    );
    let keys: Value = serde_json::from_str(&init).unwrap();
    let unseal = keys["unseal_keys_b64"][0].as_str().unwrap().to_owned();
    let root = keys["root_token"].as_str().unwrap().to_owned();
    run(leader, None, &["operator", "unseal", &unseal]);
    wait_until(
        Duration::from_secs(30),
        "the first node to become active",
        || {
            try_run(
                leader,
                Some(&root),
                &["policy", "write", "tessera-ready-probe", "-"],
                "path \"x/*\" { capabilities = [\"read\"] }",
            )
            .is_some()
        },
    );
    // Promote joined nodes to voters after 1 s of health, not 10.
    run(
        leader,
        Some(&root),
        &[
            "operator",
            "raft",
            "autopilot",
            "set-config",
            "-server-stabilization-time=1s",
        ],
    );
    (unseal, root)
}

/// Joins `followers` to `leader`'s Raft cluster, unseals them and waits
/// until every node votes.
fn join_voters(leader: &str, followers: &[&str], (unseal, root): (&str, &str)) {
    let size = followers.len() + 1;
    for address in followers {
        run(address, None, &["operator", "raft", "join", leader]);
        run(address, None, &["operator", "unseal", unseal]);
    }
    wait_until(Duration::from_secs(60), "every node to vote", || {
        try_run(
            leader,
            Some(root),
            &["operator", "raft", "list-peers", "-format=json"],
            "",
        )
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|peers| {
            peers["data"]["config"]["servers"]
                .as_array()
                .map(|servers| servers.iter().filter(|s| s["voter"] == true).count())
        }) == Some(size)
    });
}
