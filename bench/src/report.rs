//! `docs/BENCHMARKS.md`: tables of medians and min/max, each Tessera figure
//! next to the peer's with their ratio and the target it is measured against.

use std::fmt::Write;

use crate::{
    measure::{GateLevel, Level, Stats, WatchScale},
    scale::{ShapeResult, WAYS},
};

/// One metric, Tessera vs the peer.
pub struct Row {
    metric: String,
    tessera: Stats,
    peer: Stats,
    /// `≤ 1/10`, or empty for no target.
    target: &'static str,
}

impl Row {
    /// A row from raw values.
    pub fn new(metric: &str, tessera: &[f64], peer: &[f64], target: &'static str) -> Self {
        Self {
            metric: metric.to_owned(),
            tessera: Stats::of(tessera),
            peer: Stats::of(peer),
            target,
        }
    }

    fn ratio(&self) -> f64 {
        if self.peer.median == 0.0 {
            f64::NAN
        } else {
            self.tessera.median / self.peer.median
        }
    }

    fn verdict(&self) -> String {
        let limit = match self.target {
            "≤ 1/10" => 0.1,
            _ => return "—".to_owned(),
        };
        let met = if self.ratio() <= limit {
            "met"
        } else {
            "**missed**"
        };
        format!("{} ({met})", self.target)
    }
}

fn cell(s: Stats) -> String {
    format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max)
}

/// The whole report.
pub struct Report {
    body: String,
    notes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self {
            body: String::new(),
            notes: Vec::new(),
        }
    }

    /// A per-pod table: Tessera sidecar vs `bao agent`.
    pub fn per_pod<const N: usize>(&mut self, title: &str, rows: [Row; N]) {
        let _ = writeln!(self.body, "\n### Per-pod agent, {title}\n");
        let _ = writeln!(
            self.body,
            "| metric | Tessera sidecar | bao agent | ratio | target |\n|---|---|---|---|---|"
        );
        for row in rows {
            let _ = writeln!(
                self.body,
                "| {} | {} | {} | {:.3} | {} |",
                row.metric,
                cell(row.tessera),
                cell(row.peer),
                row.ratio(),
                row.verdict()
            );
        }
    }

    /// The Fetch latency table.
    pub fn latency(&mut self, levels: Vec<Level>) {
        let _ = writeln!(
            self.body,
            "\n### Broker `Fetch` (TLS 1.3, token check, policy, the broker's KV feed) vs raw OpenBao KV read\n"
        );
        let _ = writeln!(
            self.body,
            "| concurrency | Fetch p50 ms | raw KV p50 ms | ratio p50 | Fetch p99 ms | raw KV p99 ms | Fetch req/s | raw KV req/s | target |\n|---|---|---|---|---|---|---|---|---|"
        );
        for level in levels {
            let (f50, r50) = (Stats::of(&level.fetch_p50), Stats::of(&level.raw_p50));
            let ratio = f50.median / r50.median;
            let verdict = if ratio <= 1.0 {
                "p50 ≤ raw (met)"
            } else {
                "p50 ≤ raw (**missed**)"
            };
            let _ = writeln!(
                self.body,
                "| {} | {} | {} | {ratio:.2} | {} | {} | {} | {} | {verdict} |",
                level.concurrency,
                cell(f50),
                cell(r50),
                cell(Stats::of(&level.fetch_p99)),
                cell(Stats::of(&level.raw_p99)),
                cell(Stats::of(&level.fetch_rps)),
                cell(Stats::of(&level.raw_rps)),
            );
        }
    }

    /// The Watch scale table (the KV write learned through Vault's change
    /// feed, polling at the 5-minute backstop).
    pub fn watch(&mut self, w: WatchScale) {
        let rss_ok = w.rss_with_streams <= 128.0;
        let fan_ok = w.fan_out_p99_ms <= 250.0 && w.fan_out_all_ms <= 250.0;
        let mark = |ok: bool| if ok { "met" } else { "**missed**" };
        let _ = writeln!(
            self.body,
            "\n### {} `Watch` streams on one broker\n\nAll on one replica: the per-replica figure (behind a Service, streams divide over the replicas).\n",
            w.streams
        );
        let _ = writeln!(self.body, "| metric | value | target |\n|---|---|---|");
        let _ = writeln!(
            self.body,
            "| broker RSS before (MiB) | {:.1} | |",
            w.rss_before
        );
        let _ = writeln!(
            self.body,
            "| broker RSS with every stream open (MiB) | {:.1} | ≤ 128 ({}) |",
            w.rss_with_streams,
            mark(rss_ok)
        );
        let _ = writeln!(
            self.body,
            "| KV write → every stream has it (the last one, ms) | {:.0} | ≤ 250 ({}) |",
            w.fan_out_all_ms,
            mark(fan_ok)
        );
        let _ = writeln!(
            self.body,
            "| KV write → median stream (ms) | {:.0} | |",
            w.fan_out_median_ms
        );
        let _ = writeln!(
            self.body,
            "| KV write → p99 stream (ms) | {:.0} | ≤ 250 ({}) |",
            w.fan_out_p99_ms,
            mark(fan_ok)
        );
        self.note(
            "The 10,000 streams: Vault's change feed on (OpenBao's `http` audit device posting to the broker, \
its canary every 30 s), KV polling at the 5-minute backstop, so the write reaches the broker through the feed: \
the audit entry of the write, one read of the secret, then the fan-out to every stream."
                .to_owned(),
        );
    }

    /// The scale section: each shape served three ways at once.
    pub fn scale(&mut self, results: &[ShapeResult], window: std::time::Duration, plot: &str) {
        let _ = writeln!(
            self.body,
            "\n### Scale: fleets of sidecars and of `bao agent`s over shared KV secrets\n\n\
Each shape runs three fleets of real processes at once against one OpenBao: sidecars of one broker, sidecars \
of three peer replicas (pod i connects to replica i mod 3, as a Service spreads connections), and one `bao agent` \
per pod (AppRole, one template). Pod i reads KV secret i mod secrets. Vault's change feed is on for both \
brokers (two `http` audit devices), polling at the 5-minute backstop; the agents re-render every 5 minutes (their \
default). The brokers start first (their own start, once a rollout, is in the notes, not in the table); then the \
agents' fleet, alone (hundreds of agents logging in at once keep OpenBao from answering long enough for a broker's \
feed to be declared silent); then both sidecar fleets, whose start is counted from once the agents run and the feed is \
up on every broker. Once the fleets run, every secret is written once; its requests count with the start (as if every secret changed once an hour). The \
{}-second window opens half a window later, so that each broker's next check of each secret (the backstop, 5 minutes \
± 10 % after the change) and each agent's re-read fall in it once. Requests per pod-hour = (requests at start + the \
window's scaled to an hour) / pods; KV write → file is timed from the moment each secret's write is sent to the modification time of each pod's file. Broker CPU is over the window (the three replicas together), RSS at its end (the largest replica). \
The curves: [{plot}]({plot}).\n",
            window.as_secs()
        );
        let _ = writeln!(
            self.body,
            "| pods | secrets | served by | Vault requests (start + window) | per pod-hour | vs agent | KV write → file p50 ms | p99 ms | pods with it | broker CPU ms | broker RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in results {
            for (way, name) in WAYS.iter().enumerate() {
                let (start, window) = r.requests[way];
                let broker = |v: [f64; 2]| {
                    if way < 2 {
                        format!("{:.0}", v[way])
                    } else {
                        String::new()
                    }
                };
                let _ = writeln!(
                    self.body,
                    "| {} | {} | {name} | {start} + {window} | {:.2} | {:.3} | {:.0} | {:.0} | {}/{} | {} | {} |",
                    r.shape.pods,
                    r.shape.secrets,
                    r.per_pod_hour[way],
                    r.per_pod_hour[way] / r.per_pod_hour[2],
                    r.write_to_file[way].0,
                    r.write_to_file[way].1,
                    r.arrived[way],
                    r.shape.pods,
                    broker(r.broker_cpu_ms),
                    broker(r.broker_rss_mib.map(|m| (m * 10.0).round() / 10.0)),
                );
            }
        }
        let started: Vec<String> = results
            .iter()
            .map(|r| {
                format!(
                    "{} pods over {} secrets: {} and {}",
                    r.shape.pods, r.shape.secrets, r.brokers_started[0], r.brokers_started[1]
                )
            })
            .collect();
        self.note(format!(
            "Scale: Vault requests of the brokers' own start (the one replica, and the three peers together, until the change \
feed is up on each): {}. Each replica reads every secret of the policy once as it starts, before it knows its peers.",
            started.join("; ")
        ));
        let largest = results
            .iter()
            .map(|r| r.shape.pods)
            .max()
            .unwrap_or_default();
        let mark = |ok: bool| if ok { "met" } else { "**missed**" };
        let _ = writeln!(
            self.body,
            "\n| at {largest} pods | 3 replicas / agent (≤ 1/10) | 3 replicas / 1 replica (within 10 %) |\n|---|---|---|"
        );
        for r in results.iter().filter(|r| r.shape.pods == largest) {
            let vs_agent = r.per_pod_hour[1] / r.per_pod_hour[2];
            let vs_one = r.per_pod_hour[1] / r.per_pod_hour[0];
            // Both sides read each secret every 5 minutes: the brokers once
            // for the fleet, the agents once per pod.
            let floor = r.shape.secrets as f64 / r.shape.pods.max(1) as f64;
            let floor = if floor > 0.1 {
                format!("; the backstop alone is {floor:.3}")
            } else {
                String::new()
            };
            let _ = writeln!(
                self.body,
                "| {} secrets ({} pods per secret) | {vs_agent:.3} ({}{floor}) | {vs_one:.2} ({}) |",
                r.shape.secrets,
                r.shape.pods / r.shape.secrets.max(1),
                mark(vs_agent <= 0.1),
                mark((vs_one - 1.0).abs() <= 0.1),
            );
        }
        self.note(
            "Scale: an agent fleet reads every secret once per pod every 5 minutes, so its cost per pod-hour stays flat \
as pods are added; the brokers read each secret once for the fleet (on the backstop and on each change the feed names), \
plus the feed's canary and the lease-record sweep (each made by one replica among peers), so their cost per pod-hour falls \
with pods per secret. Where few pods share a secret, the 5-minute backstop alone is a fixed share of the agents' re-reads \
(1 / pods per secret): the 1/10 target needs more than ten pods per secret."
                .to_owned(),
        );
    }

    /// The second gate's cost (`vaultGate`): the same secret from the shared
    /// copy and read with each pod's own Vault token.
    pub fn gate(&mut self, levels: &[GateLevel], first: &[f64]) {
        let _ = writeln!(
            self.body,
            "\n### Vault as a second gate (`vaultGate`): what it costs\n\n`Fetch` of one KV secret from the broker's shared copy, and of the same secret behind the gate (read with the pod's own Vault token every time; the token is kept per pod).\n"
        );
        let _ = writeln!(
            self.body,
            "| concurrency | shared p50 ms | gated p50 ms | gated / shared | shared p99 ms | gated p99 ms | shared req/s | gated req/s |\n|---|---|---|---|---|---|---|---|"
        );
        for level in levels {
            let (s50, g50) = (Stats::of(&level.shared[0]), Stats::of(&level.gated[0]));
            let _ = writeln!(
                self.body,
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} |",
                level.concurrency,
                cell(s50),
                cell(g50),
                g50.median / s50.median,
                cell(Stats::of(&level.shared[1])),
                cell(Stats::of(&level.gated[1])),
                cell(Stats::of(&level.shared[2])),
                cell(Stats::of(&level.gated[2])),
            );
        }
        let _ = writeln!(
            self.body,
            "| a new pod's first gated Fetch (its Vault login and read), ms | | {} | | | | | |",
            cell(Stats::of(first))
        );
        self.note(
            "The second gate trades the fleet-wide coalescing for Vault's own decision per pod: every gated delivery is a Vault read \
(plus one login per pod and role, kept for 80 % of its TTL), so Vault's load grows with pods for such bindings, as with an agent per pod."
                .to_owned(),
        );
    }

    /// The zero-on-free allocator's cost: the same runs with and without it.
    pub fn allocator_cost(
        &mut self,
        with: &[Level],
        without: &[Level],
        watch_with: &WatchScale,
        watch_without: &WatchScale,
    ) {
        let _ = writeln!(
            self.body,
            "\n### Cost of the zero-on-free allocator (the same broker built with and without it, in one run)\n"
        );
        let _ = writeln!(
            self.body,
            "| metric | with (default) | without | with / without |\n|---|---|---|---|"
        );
        let mut row = |metric: String, a: &[f64], b: &[f64]| {
            let (a, b) = (Stats::of(a), Stats::of(b));
            let _ = writeln!(
                self.body,
                "| {metric} | {} | {} | {:.2} |",
                cell(a),
                cell(b),
                a.median / b.median
            );
        };
        for (w, p) in with.iter().zip(without) {
            let c = w.concurrency;
            row(
                format!("Fetch p50 ms, concurrency {c}"),
                &w.fetch_p50,
                &p.fetch_p50,
            );
            row(
                format!("Fetch p99 ms, concurrency {c}"),
                &w.fetch_p99,
                &p.fetch_p99,
            );
            row(
                format!("Fetch req/s, concurrency {c}"),
                &w.fetch_rps,
                &p.fetch_rps,
            );
        }
        row(
            format!("broker RSS with {} streams (MiB)", watch_with.streams),
            &[watch_with.rss_with_streams],
            &[watch_without.rss_with_streams],
        );
        row(
            format!("KV write → all {} streams (ms)", watch_with.streams),
            &[watch_with.fan_out_all_ms],
            &[watch_without.fan_out_all_ms],
        );
        self.note(
            "The allocator clears every heap block when it is freed (see docs/security.md). \
Both brokers are release builds of the same commit; only the global allocator differs. They ran one after \
the other (without, then with it again, each after a restart), after the runs above. Fan-out includes \
the wait for the next KV poll (up to 1 s), so single runs of it vary by that much."
                .to_owned(),
        );
    }

    /// A note under the tables.
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    /// The Markdown document.
    pub fn render(&self) -> String {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
            })
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let bao = std::process::Command::new(tessera_tests::bao_binary())
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let mut out = String::new();
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "Generated by `scripts/bench` on {} — do not edit by hand. Each cell is the median \
with [min–max] over the runs or pods measured; ratio = Tessera median / peer median. Targets come \
from the benchmark issue and are shown, never asserted in tests.\n",
            humantime_now()
        );
        let _ = writeln!(
            out,
            "Machine: {cpu}, {cores} cores, {memory:.1} GiB, Linux {}; {bao}; release builds.\n",
            kernel.trim()
        );
        let _ = writeln!(
            out,
            "Setup: one OpenBao dev server (file audit device), a private PostgreSQL, one broker \
(TLS 1.3, JWKS tokens, kvPollInterval 15s for the fleet, then 1s), each pod's agent fetching the same KV secret and a \
dynamic PostgreSQL user into tmpfs; the scale section and the 10,000 streams run on a second OpenBao whose \
`http` audit devices feed the brokers (Vault's change feed, polling at the 5-minute backstop). The peer is `bao agent` with AppRole auto-auth and two \
templates, the agent Vault's injector runs in every pod. Tessera's per-pod figures are the \
sidecar alone, run as the webhook injects it (no IPC_LOCK capability, so its memory is not locked); \
the shared broker is in the notes."
        );
        out.push_str(&self.body);
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n## Notes\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        let _ = writeln!(
            out,
            "\nReproduce: `scripts/bench` (builds release binaries, installs OpenBao if absent; about 70 minutes on 2 cores, half of it the scale section's five-minute windows)."
        );
        out
    }
}

fn humantime_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .take(10)
        .collect()
}
