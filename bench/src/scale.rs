//! The scale section: fleets of sidecars served by one broker and by three
//! peer replicas, and fleets of `bao agent`s of the same shape, all at once
//! on one OpenBao whose change feed (two `http` audit devices) reaches both
//! brokers. Each side's Vault requests are told apart in OpenBao's audit log
//! by the policies of the token that made them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use serde_json::json;
use tessera_tests::{
    Env, EnvOptions, MemoryConfig, PeerPki, Replica, config::VaultLogin, free_port, metric_value,
    peer_addresses,
};

use crate::{
    Pod, agent_login,
    measure::{percentile, proc_sample},
    spawn_agent_with, spawn_sidecar_with, tmpfs, wait_ready,
};

/// A fleet: pods, and the KV secrets they share (pod `i` reads secret
/// `i mod secrets`, as the replicas of a Deployment share theirs).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Pods in each of the three fleets.
    pub pods: usize,
    /// KV secrets the pods read.
    pub secrets: usize,
}

impl Shape {
    fn tag(self) -> String {
        format!("n{}-s{}", self.pods, self.secrets)
    }
}

/// The shapes measured: 50, 200 and 500 pods over 20 secrets, and 500 pods
/// over 1, 20 and 100 (each shape needs a five-minute window: the cross
/// through the middle of the grid, not all nine).
pub fn shapes(quick: bool) -> Vec<Shape> {
    let shape = |pods, secrets| Shape { pods, secrets };
    if quick {
        vec![shape(3, 1), shape(4, 2)]
    } else {
        vec![
            shape(50, 20),
            shape(200, 20),
            shape(500, 20),
            shape(500, 1),
            shape(500, 100),
        ]
    }
}

/// The three ways a shape is served, in the order of every array below.
pub const WAYS: [&str; 3] = [
    "Tessera, 1 replica",
    "Tessera, 3 peer replicas",
    "bao agent",
];

/// What one shape cost, each way.
#[derive(Clone, Debug)]
pub struct ShapeResult {
    /// The fleet.
    pub shape: Shape,
    /// Vault requests at start (pods starting, every secret changing
    /// once) and in the window.
    pub requests: [(usize, usize); 3],
    /// Vault requests of the brokers' own start: the one replica; the
    /// three.
    pub brokers_started: [usize; 2],
    /// Vault requests per pod-hour: (start + window scaled to an hour) / pods.
    pub per_pod_hour: [f64; 3],
    /// KV write → the pod's file has it, p50 and p99 over the pods (ms).
    pub write_to_file: [(f64, f64); 3],
    /// Pods whose file had the write by the window's end.
    pub arrived: [usize; 3],
    /// Broker CPU over the window (ms): the one replica; the three together.
    pub broker_cpu_ms: [f64; 2],
    /// Broker RSS at the window's end (MiB): the one replica; the largest
    /// of the three.
    pub broker_rss_mib: [f64; 2],
}

/// OpenBao with two change feeds, the broker of the one-replica fleet, and
/// what the three peers and the agents log in with.
pub struct ScaleEnv {
    /// OpenBao and the one-replica broker (its feed is the first device's).
    pub env: Env,
    /// Where the second device posts: the first peer's feed.
    feed_three: u16,
    /// The peers' Vault token file (policies `tessera-broker`, `bench-three`).
    token_three: String,
    login: (PathBuf, PathBuf),
    pki: PeerPki,
}

/// The production defaults the brokers run with here: KV polling at 15 s
/// while the feed is silent, 5 minutes (the backstop) while it arrives, a
/// canary every 30 s, a light sweep every 30 s and a full pass an hour.
pub async fn start() -> ScaleEnv {
    let feeds = [free_port(), free_port()];
    let options = EnvOptions {
        rate_limit: (1_000_000, 1_000_000),
        poll: "15s",
        vault_health_check: "30s",
        sweep_interval: "30s",
        rust_log: "warn".to_owned(),
        feeds_direct: feeds.to_vec(),
        feed_check: "30s",
        ..EnvOptions::default()
    };
    let mut env = Env::start_with(WATCH_POLICY, options).await;
    env.edit_config(|config| config.memory = Some(MemoryConfig { lock: false }));
    env.restart_broker().await;
    let rules = env.dir.path().join("bench-three.hcl");
    std::fs::write(
        &rules,
        "path \"sys/mounts\" { capabilities = [\"deny\"] }\n",
    )
    .expect("the bench-three policy");
    env.bao.cli(&[
        "policy",
        "write",
        "bench-three",
        &rules.display().to_string(),
    ]);
    let token = env.bao.cli(&[
        "token",
        "create",
        "-policy=tessera-broker",
        "-policy=bench-three",
        "-field=token",
    ]);
    std::fs::write(env.dir.path().join("vault-token-three"), token).expect("the peers' token");
    let login = agent_login(&env);
    let pki = PeerPki::new(env.dir.path());
    ScaleEnv {
        env,
        feed_three: feeds[1],
        token_three: "vault-token-three".to_owned(),
        login,
        pki,
    }
}

/// The policy of the 10,000-stream run: binding `app` alone.
pub const WATCH_POLICY: &str = "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app
    subjects: [{ namespace: bench, serviceAccount: app }]
    source: { kv2: { mount: secret, path: bench/app } }
";

/// Binding `s<j>` serves secret `scale/<tag>/<j>` to service account
/// `bench/scale-<j>`.
fn policy(shape: Shape) -> String {
    let mut policy = "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings:\n".to_owned();
    for j in 0..shape.secrets {
        policy.push_str(&format!(
            "  - name: s{j}\n    subjects: [{{ namespace: bench, serviceAccount: scale-{j} }}]\n    source: {{ kv2: {{ mount: secret, path: scale/{}/{j} }} }}\n",
            shape.tag()
        ));
    }
    policy
}

/// Vault requests in OpenBao's audit log after line `from`: the one
/// replica's, the three peers', the agents'; and the log's line count.
pub fn requests(audit: &Path, from: usize) -> ([usize; 3], usize) {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let mut counts = [0; 3];
    let lines: Vec<&str> = text.lines().collect();
    for line in lines.iter().skip(from) {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["type"] != "request" {
            continue;
        }
        let policies = entry["auth"]["policies"].to_string();
        let path = entry["request"]["path"].as_str().unwrap_or_default();
        if policies.contains("bench-three") {
            counts[1] += 1;
        } else if policies.contains("tessera-broker") {
            counts[0] += 1;
        } else if policies.contains("bench-agent") || path == "auth/approle/login" {
            counts[2] += 1;
        }
    }
    (counts, lines.len())
}

/// How long the fleets run before the secrets change.
const SETTLE: Duration = Duration::from_secs(30);

/// Waits until every broker at `admins` says Vault's change feed arrives.
async fn until_feed_up(admins: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut up = true;
        for admin in admins {
            up &= metric_value(admin, "tessera_change_feed_up", "").await == Some(1.0);
        }
        if up {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the change feed did not come up on every broker in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The three peers of a shape; the first takes the second feed.
async fn start_peers(scale: &ScaleEnv, tag: &str) -> Vec<Replica> {
    let addresses = peer_addresses(3);
    let mut replicas = Vec::new();
    for (k, address) in addresses.iter().enumerate() {
        let token = scale.token_three.clone();
        let feed = (k == 0).then(|| format!("127.0.0.1:{}", scale.feed_three));
        replicas.push(
            scale
                .env
                .start_peer_as_deployed(
                    &format!("{tag}-{k}"),
                    (address, &addresses),
                    &scale.pki,
                    |config| {
                        config.vault.login = VaultLogin::TokenFile(token);
                        if let (Some(listen), Some(change_feed)) =
                            (feed, config.vault.change_feed.as_mut())
                        {
                            change_feed.listen = listen;
                        }
                    },
                )
                .await,
        );
    }
    replicas
}

/// One shape, served the three ways at once, over `window`.
pub async fn run_shape(
    scale: &mut ScaleEnv,
    shape: Shape,
    window: Duration,
) -> anyhow::Result<ShapeResult> {
    let tag = shape.tag();
    let value = |j: usize, version: u32| format!("{tag}-{j}-v{version}");
    for j in 0..shape.secrets {
        scale
            .env
            .bao
            .put(
                &format!("scale/{tag}/{j}"),
                &json!({ "password": value(j, 1) }),
            )
            .await;
    }
    let audit = scale.env.bao.audit_log.clone();
    let (_, brokers_start) = requests(&audit, 0);
    scale.env.set_policy(&policy(shape));
    scale.env.restart_broker().await;
    let replicas = start_peers(scale, &tag).await;
    let env = &scale.env;
    let mut admins = vec![env.admin_url.clone()];
    admins.extend(replicas.iter().map(Replica::admin_url));
    // The brokers' own start (once a rollout, not once a pod) is counted
    // apart: the pods start on brokers that run.
    until_feed_up(&admins).await?;
    let (brokers_started, audit_start) = requests(&audit, brokers_start);

    let secret_of = |i: usize| i % shape.secrets;
    // The agents' fleet starts first and alone: 500 `bao agent`s logging in
    // at once keep OpenBao from answering for a while, long enough for a
    // broker's canary to miss and its feed to be declared silent (it then
    // polls at the short interval until the feed is back). Which side that
    // hit was chance, and it moved the start count of one way or the other.
    // The sidecars' start is counted from once the agents run and every
    // feed is up again.
    let mut agents = Vec::new();
    for i in 0..shape.pods {
        let out = tmpfs();
        let destination = out.path().join("password");
        let contents = format!(
            "{{{{ with secret \"secret/data/scale/{tag}/{}\" }}}}{{{{ .Data.data.password }}}}{{{{ end }}}}",
            secret_of(i)
        );
        agents.push(spawn_agent_with(
            env,
            &scale.login,
            &format!("{tag}-{i}"),
            &[(&contents, destination)],
            out,
        ));
    }
    wait_ready(&mut agents).await?;
    until_feed_up(&admins).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, sidecars_start) = requests(&audit, 0);

    let mut fleets: [Vec<Pod>; 3] = [Vec::new(), Vec::new(), agents];
    for i in 0..shape.pods {
        let j = secret_of(i);
        let (account, binding) = (format!("scale-{j}"), format!("s{j}"));
        fleets[0].push(spawn_sidecar_with(
            env,
            &env.broker_uri,
            &format!("{tag}-one-{i}"),
            &account,
            &[&binding],
        ));
        // A Service balances connections: pod i's lands on replica i mod 3.
        fleets[1].push(spawn_sidecar_with(
            env,
            &replicas[i % 3].uri,
            &format!("{tag}-three-{i}"),
            &account,
            &[&binding],
        ));
    }
    for fleet in &mut fleets[..2] {
        wait_ready(fleet).await?;
    }
    until_feed_up(&admins).await?;
    // The secrets change once the fleets have run a while, not the moment
    // a thousand sidecars have started.
    tokio::time::sleep(SETTLE).await;

    let brokers: Vec<u32> = std::iter::once(env.broker.pid())
        .chain(replicas.iter().map(|r| r.proc.pid()))
        .collect();
    // Every secret changes once; each pod's file is watched until it has
    // the change (the agents re-read every 5 minutes). The change is
    // counted with the start (as if every secret changed once an hour);
    // the window, the steady cost, opens half a window after it: the
    // brokers' next check of each secret (a 5-minute backstop ± 10 %
    // from the change) falls inside it once, as each agent's re-read does.
    // Each pod's time is its file's modification time less the time its
    // secret's write was sent: the files are looked at between the writes
    // and after them, and how often must not change the figure.
    let mut written = Vec::new();
    for j in 0..shape.secrets {
        written.push(SystemTime::now());
        scale
            .env
            .bao
            .put(
                &format!("scale/{tag}/{j}"),
                &json!({ "password": value(j, 2) }),
            )
            .await;
    }
    let mut arrivals: [Vec<Option<f64>>; 3] =
        std::array::from_fn(|way| vec![None; fleets[way].len()]);
    let since_write = Instant::now();
    let mut window_open: Option<(Instant, usize, Vec<Option<crate::measure::Sample>>)> = None;
    let mut at_start = [0; 3];
    loop {
        let mut pending_tessera = false;
        for (way, fleet) in fleets.iter().enumerate() {
            for (i, pod) in fleet.iter().enumerate() {
                if arrivals[way][i].is_some() {
                    continue;
                }
                let j = secret_of(i);
                let has = std::fs::read_to_string(&pod.files[0]).is_ok_and(|v| v == value(j, 2));
                let modified = std::fs::metadata(&pod.files[0]).and_then(|m| m.modified());
                if let (true, Ok(modified)) = (has, modified) {
                    let took = modified.duration_since(written[j]).unwrap_or_default();
                    arrivals[way][i] = Some(took.as_secs_f64() * 1000.0);
                } else if way < 2 {
                    pending_tessera = true;
                }
            }
        }
        match &window_open {
            None if since_write.elapsed() >= window / 2 => {
                let (agents, line) = requests(&audit, audit_start);
                let (sidecars, _) = requests(&audit, sidecars_start);
                at_start = [sidecars[0], sidecars[1], agents[2]];
                let samples = brokers.iter().map(|pid| proc_sample(*pid)).collect();
                window_open = Some((Instant::now(), line, samples));
            }
            Some((opened, _, _)) if opened.elapsed() >= window => break,
            _ => {}
        }
        // Fine-grained while the sidecars' changes arrive, then coarse for
        // the agents' (minutes).
        let pause = if pending_tessera { 5 } else { 250 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let Some((_, audit_window, before)) = window_open else {
        anyhow::bail!("the window never opened");
    };
    let (in_window, _) = requests(&audit, audit_window);
    let after: Vec<_> = brokers.iter().map(|pid| proc_sample(*pid)).collect();
    let cpu = |k: usize| match (&before[k], &after[k]) {
        (Some(b), Some(a)) => crate::measure::cpu_ms(b, a),
        _ => f64::NAN,
    };
    let rss = |k: usize| {
        after[k]
            .as_ref()
            .map_or(f64::NAN, |s| s.rss_kib as f64 / 1024.0)
    };
    let hour = 3600.0 / window.as_secs_f64();
    let result = ShapeResult {
        shape,
        requests: std::array::from_fn(|way| (at_start[way], in_window[way])),
        brokers_started: [brokers_started[0], brokers_started[1]],
        per_pod_hour: std::array::from_fn(|way| {
            (at_start[way] as f64 + in_window[way] as f64 * hour) / shape.pods as f64
        }),
        write_to_file: std::array::from_fn(|way| {
            let mut times: Vec<f64> = arrivals[way].iter().flatten().copied().collect();
            times.sort_by(f64::total_cmp);
            if times.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                (percentile(&times, 0.5), percentile(&times, 0.99))
            }
        }),
        arrived: std::array::from_fn(|way| arrivals[way].iter().flatten().count()),
        broker_cpu_ms: [cpu(0), cpu(1) + cpu(2) + cpu(3)],
        broker_rss_mib: [rss(0), rss(1).max(rss(2)).max(rss(3))],
    };
    println!(
        "   {tag}: requests per pod-hour {:.2} / {:.2} / {:.2}; write → file p99 {:.0} / {:.0} / {:.0} ms",
        result.per_pod_hour[0],
        result.per_pod_hour[1],
        result.per_pod_hour[2],
        result.write_to_file[0].1,
        result.write_to_file[1].1,
        result.write_to_file[2].1,
    );
    drop(fleets);
    drop(replicas);
    Ok(result)
}

/// The 10,000-stream run on the one-replica broker with the change feed
/// on (polling at the 5-minute backstop).
pub async fn watch_with_feed(
    scale: &mut ScaleEnv,
    watchers: usize,
) -> anyhow::Result<crate::measure::WatchScale> {
    scale.env.set_policy(WATCH_POLICY);
    scale
        .env
        .bao
        .put("bench/app", &json!({ "password": "bench-v1" }))
        .await;
    scale.env.restart_broker().await;
    until_feed_up(std::slice::from_ref(&scale.env.admin_url))
        .await
        .context("before the 10,000 streams")?;
    crate::measure::watch_scale(&scale.env, watchers).await
}
