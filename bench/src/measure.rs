//! Measurements: process figures from `/proc`, latency runs, Watch fan-out.

use anyhow::Context;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use serde_json::json;
use tessera_broker::dev::TokenSpec;
use tessera_proto::v1::{FetchRequest, WatchRequest, broker_client::BrokerClient};
use tessera_tests::{Env, with_token};
use tokio::sync::Mutex;

/// One reading of a process.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Anonymous resident memory, KiB.
    pub anon_kib: u64,
    /// Threads.
    pub threads: u64,
    /// User + system CPU, clock ticks.
    pub cpu_ticks: u64,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
pub fn proc_sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Sample {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        threads: field("Threads:")?,
        cpu_ticks: ticks,
    })
}

/// CPU milliseconds between two samples of one process (100 ticks a second,
/// the Linux USER_HZ).
pub fn cpu_ms(before: &Sample, after: &Sample) -> f64 {
    after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 * 10.0
}

/// Median, minimum and maximum.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Stats {
    /// Of `values` (zeros when empty).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: percentile(&sorted, 0.5),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// The `p` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One concurrency level's result.
#[derive(Clone, Debug)]
pub struct Level {
    /// Concurrent callers.
    pub concurrency: usize,
    /// Tessera Fetch p50 per repeat (ms).
    pub fetch_p50: Vec<f64>,
    /// Tessera Fetch p99 per repeat (ms).
    pub fetch_p99: Vec<f64>,
    /// Tessera Fetch requests/s per repeat.
    pub fetch_rps: Vec<f64>,
    /// Raw OpenBao KV read p50 per repeat (ms).
    pub raw_p50: Vec<f64>,
    /// Raw OpenBao KV read p99 per repeat (ms).
    pub raw_p99: Vec<f64>,
    /// Raw OpenBao KV reads/s per repeat.
    pub raw_rps: Vec<f64>,
}

const LEVEL_DURATION: Duration = Duration::from_secs(2);
const REPEATS: usize = 3;

/// Runs `call` from `concurrency` tasks for the level duration; returns
/// (p50 ms, p99 ms, requests/s).
async fn run_level<F, Fut>(concurrency: usize, call: F) -> (f64, f64, f64)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let deadline = Instant::now() + LEVEL_DURATION;
    let tasks = (0..concurrency).map(|i| {
        let call = call.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                if call(i).await {
                    latencies.push(start.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        })
    });
    let mut all: Vec<f64> = join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    all.sort_by(f64::total_cmp);
    let rps = all.len() as f64 / LEVEL_DURATION.as_secs_f64();
    (percentile(&all, 0.5), percentile(&all, 0.99), rps)
}

/// Fetch through the broker (TLS, token check, policy, then the broker's KV
/// feed, as in a fleet where sidecars watch the secret) next to raw KV reads
/// from OpenBao, at concurrency 1, 16 and 64.
pub async fn latency(env: &Env) -> anyhow::Result<Vec<Level>> {
    let channel = env.channel().await;
    let token = Arc::new(env.token("bench", "app"));
    // One watching pod keeps the broker's feed for the secret alive.
    let mut watcher = BrokerClient::new(channel.clone())
        .watch(with_token(
            &env.token("bench", "app"),
            WatchRequest {
                bindings: vec!["app".into()],
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    watcher.message().await?;
    let vault = Arc::new(env.bao.client());
    let mut levels = Vec::new();
    for concurrency in [1, 16, 64] {
        let mut level = Level {
            concurrency,
            fetch_p50: vec![],
            fetch_p99: vec![],
            fetch_rps: vec![],
            raw_p50: vec![],
            raw_p99: vec![],
            raw_rps: vec![],
        };
        for _ in 0..REPEATS {
            let (channel, token) = (channel.clone(), token.clone());
            let (p50, p99, rps) = run_level(concurrency, move |_| {
                let mut client = BrokerClient::new(channel.clone());
                let token = token.clone();
                async move {
                    let request = FetchRequest {
                        bindings: vec!["app".into()],
                        ..Default::default()
                    };
                    client.fetch(with_token(&token, request)).await.is_ok()
                }
            })
            .await;
            level.fetch_p50.push(p50);
            level.fetch_p99.push(p99);
            level.fetch_rps.push(rps);
            let vault = vault.clone();
            let (p50, p99, rps) = run_level(concurrency, move |_| {
                let vault = vault.clone();
                async move {
                    vaultrs::kv2::read::<serde_json::Value>(vault.as_ref(), "secret", "bench/app")
                        .await
                        .is_ok()
                }
            })
            .await;
            level.raw_p50.push(p50);
            level.raw_p99.push(p99);
            level.raw_rps.push(rps);
        }
        println!(
            "   c={concurrency}: Fetch p50 {:.2} ms, raw KV p50 {:.2} ms",
            Stats::of(&level.fetch_p50).median,
            Stats::of(&level.raw_p50).median
        );
        levels.push(level);
    }
    drop(watcher);
    Ok(levels)
}

/// What the Watch scale run found.
#[derive(Clone, Debug)]
pub struct WatchScale {
    /// Streams opened.
    pub streams: usize,
    /// Broker RSS before the streams (MiB).
    pub rss_before: f64,
    /// Broker RSS with every stream open (MiB).
    pub rss_with_streams: f64,
    /// From the KV write until every stream had the new version (ms).
    pub fan_out_all_ms: f64,
    /// Median stream's wait (ms).
    pub fan_out_median_ms: f64,
    /// The broker's KV poll interval (part of the fan-out time).
    pub fan_out_p99_ms: f64,
}

/// Opens `count` Watch streams (distinct pods, over 100 connections), then
/// changes the KV secret and times the fan-out.
pub async fn watch_scale(env: &Env, count: usize) -> anyhow::Result<WatchScale> {
    let rss = || proc_sample(env.broker.pid()).map_or(0.0, |s| s.rss_kib as f64 / 1024.0);
    let rss_before = rss();
    let mut channels = Vec::new();
    for _ in 0..100 {
        channels.push(env.channel().await);
    }
    let opened = Arc::new(AtomicUsize::new(0));
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    // The version the write below makes: one past the current (runs repeat).
    let current = env
        .fetch(&env.token("bench", "app"), &["app"])
        .await?
        .credentials
        .first()
        .and_then(|c| c.version.parse::<u64>().ok())
        .context("the current version of bench/app")?;
    let target = (current + 1).to_string();
    let mut tasks = Vec::new();
    for i in 0..count {
        let mut spec = TokenSpec::new("bench", "app");
        spec.pod = Some(format!("watch-{i}"));
        let token = env.signer.mint(&spec);
        let mut client = BrokerClient::new(channels[i % channels.len()].clone());
        let (opened, arrivals, target) = (opened.clone(), arrivals.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let request = WatchRequest {
                bindings: vec!["app".into()],
                ..Default::default()
            };
            let Ok(response) = client.watch(with_token(&token, request)).await else {
                return;
            };
            let mut stream = response.into_inner();
            opened.fetch_add(1, Ordering::Relaxed);
            while let Ok(Some(message)) = stream.message().await {
                if message.credential.is_some_and(|c| c.version == target) {
                    arrivals.lock().await.push(Instant::now());
                    // Keep the stream open until the run ends.
                    let _ = stream.message().await;
                    return;
                }
            }
        }));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while opened.load(Ordering::Relaxed) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let streams = opened.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_with_streams = rss();
    println!("   {streams} streams open; broker RSS {rss_before:.1} -> {rss_with_streams:.1} MiB");

    let written = Instant::now();
    env.bao
        .put(
            "bench/app",
            &json!({ "password": format!("bench-v{target}") }),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.lock().await.len() < streams && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut waits: Vec<f64> = arrivals
        .lock()
        .await
        .iter()
        .map(|t| t.duration_since(written).as_secs_f64() * 1000.0)
        .collect();
    waits.sort_by(f64::total_cmp);
    for task in tasks {
        task.abort();
    }
    Ok(WatchScale {
        streams: waits.len().min(streams),
        rss_before,
        rss_with_streams,
        fan_out_all_ms: waits.last().copied().unwrap_or(f64::NAN),
        fan_out_median_ms: percentile(&waits, 0.5),
        fan_out_p99_ms: percentile(&waits, 0.99),
    })
}

/// The second gate's cost at one concurrency: `Fetch` of a KV binding
/// served from the broker's shared copy, and of the same secret behind
/// `vaultGate` (read with the pod's own Vault token each time).
#[derive(Clone, Debug)]
pub struct GateLevel {
    /// Concurrent callers.
    pub concurrency: usize,
    /// p50 (ms), p99 (ms) and requests/s per repeat, shared copy.
    pub shared: [Vec<f64>; 3],
    /// The same, behind the gate.
    pub gated: [Vec<f64>; 3],
}

/// What the second gate costs: steady `Fetch` latency and throughput of
/// binding `app` (the shared copy) against `gated` (the same secret behind
/// `vaultGate`), and the first `Fetch` of a new pod behind the gate (its
/// Vault login) in ms.
pub async fn gate_cost(env: &Env) -> anyhow::Result<(Vec<GateLevel>, Vec<f64>)> {
    let channel = env.channel().await;
    let token = Arc::new(env.token("bench", "app"));
    let mut levels = Vec::new();
    for concurrency in [1, 16] {
        let mut level = GateLevel {
            concurrency,
            shared: Default::default(),
            gated: Default::default(),
        };
        for _ in 0..REPEATS {
            for (binding, into) in [("app", &mut level.shared), ("gated", &mut level.gated)] {
                let (channel, token) = (channel.clone(), token.clone());
                let (p50, p99, rps) = run_level(concurrency, move |_| {
                    let mut client = BrokerClient::new(channel.clone());
                    let token = token.clone();
                    async move {
                        let request = FetchRequest {
                            bindings: vec![binding.into()],
                            ..Default::default()
                        };
                        client.fetch(with_token(&token, request)).await.is_ok()
                    }
                })
                .await;
                into[0].push(p50);
                into[1].push(p99);
                into[2].push(rps);
            }
        }
        levels.push(level);
    }
    // A new pod's first Fetch behind the gate: its login, then the read.
    let mut first = Vec::new();
    for i in 0..20 {
        let mut spec = TokenSpec::new("bench", "app");
        spec.pod = Some(format!("gate-{i}"));
        let token = env.signer.mint(&spec);
        let mut client = BrokerClient::new(channel.clone());
        let request = FetchRequest {
            bindings: vec!["gated".into()],
            ..Default::default()
        };
        let started = Instant::now();
        client
            .fetch(with_token(&token, request))
            .await
            .context("a gated Fetch")?;
        first.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((levels, first))
}
