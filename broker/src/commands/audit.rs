//! `tessera-broker audit`: who got which binding, when, and whether its
//! lease was revoked (and when, and why), from the audit logs of every
//! replica and cluster.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::ExitCode,
    time::SystemTime,
};

use anyhow::Context;
use serde_json::Value;

/// What to select, and where from.
#[derive(clap::Args)]
pub struct Query {
    /// Only lines about this binding.
    #[arg(long)]
    pub binding: Option<String>,
    /// Only lines about callers in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// From this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub since: Option<SystemTime>,
    /// Until this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub until: Option<SystemTime>,
    /// Include denials and errors, not only deliveries.
    #[arg(long)]
    pub all: bool,
    /// `text` or `json` (every selected event, as written, with `revoked`
    /// and, with `--config`, `held`).
    #[arg(long, short, default_value = "text")]
    pub output: super::policy::Output,
    /// The broker's configuration: its Vault's lease records then say which
    /// leases are still held (`held`), in every cluster the events name.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Audit log files, of any replicas and clusters; `-` reads standard
    /// input (`kubectl logs … | tessera-broker audit -`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

fn text<'a>(event: &'a Value, key: &str) -> &'a str {
    event.get(key).and_then(Value::as_str).unwrap_or("-")
}

impl Query {
    fn selects(&self, event: &Value) -> bool {
        let delivered = matches!(text(event, "action"), "issue" | "rotate")
            && text(event, "outcome") == "success";
        if !self.all && !delivered {
            return false;
        }
        if self
            .binding
            .as_deref()
            .is_some_and(|b| b != text(event, "binding"))
            || self
                .namespace
                .as_deref()
                .is_some_and(|n| n != text(event, "namespace"))
        {
            return false;
        }
        let Ok(time) = humantime::parse_rfc3339_weak(text(event, "time")) else {
            return false;
        };
        self.since.is_none_or(|since| time >= since) && self.until.is_none_or(|until| time <= until)
    }
}

/// An event selected, with how its lease ended when the trail says so.
#[derive(serde::Serialize)]
struct Answer {
    /// The audit event as written.
    #[serde(flatten)]
    event: Value,
    /// The revocation of the event's lease (same `lease_id_sha256`), when
    /// the trail has one: its `time`, `outcome` and `reason`.
    revoked: Option<Value>,
    /// Whether a lease record holds the event's lease now (with `--config`,
    /// for events with a lease).
    held: Option<bool>,
}

/// Prints the selected events of every file in time order (several
/// replicas' and clusters' logs interleave), each with its lease's
/// revocation when the trail has one; exits 66 when a file does not exist.
///
/// # Errors
/// When a file cannot be read.
pub fn run(runtime: &tokio::runtime::Runtime, query: &Query) -> anyhow::Result<ExitCode> {
    let files = &query.files;
    if let Some(path) = files.iter().find(|p| p.as_os_str() != "-" && !p.exists()) {
        eprintln!("{}: no such file", path.display());
        return Ok(ExitCode::from(super::exit::NO_INPUT));
    }
    let mut events = Vec::new();
    for path in files {
        read_events(path, &mut events)?;
    }
    // RFC 3339 times in UTC sort as text.
    events.sort_by(|a, b| text(a, "time").cmp(text(b, "time")));
    let held = match &query.config {
        Some(path) => Some(held_leases(runtime, path, &events)?),
        None => None,
    };
    let answers: Vec<Answer> = events
        .iter()
        .filter(|event| query.selects(event))
        .map(|event| Answer {
            event: event.clone(),
            revoked: revocation_of(event, &events),
            held: held.as_ref().and_then(|held| {
                let lease = event.get("lease_id_sha256").and_then(Value::as_str)?;
                Some(held.contains(lease))
            }),
        })
        .collect();
    if query.output == super::policy::Output::Json {
        super::print_json(&answers);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::from(
        "time\taction\toutcome\tnamespace/service-account\tpod (uid)\tnode\tbinding\tversion\treason\trevoked\theld\n",
    );
    for Answer {
        event,
        revoked,
        held,
    } in &answers
    {
        let held = match held {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let revoked = revoked.as_ref().map_or_else(
            || "-".to_owned(),
            |r| format!("{} ({})", text(r, "time"), text(r, "reason")),
        );
        out.push_str(&format!(
            "{}\t{}\t{}\t{}/{}\t{} ({})\t{}\t{}\t{}\t{}\t{revoked}\t{held}\n",
            text(event, "time"),
            text(event, "action"),
            text(event, "outcome"),
            text(event, "namespace"),
            text(event, "service_account"),
            text(event, "pod_name"),
            text(event, "pod_uid"),
            text(event, "node"),
            text(event, "binding"),
            text(event, "version"),
            text(event, "reason"),
        ));
    }
    super::emit(&out);
    Ok(ExitCode::SUCCESS)
}

/// The leases recorded now in the Vault of the configuration at `path`, in
/// every cluster `events` name (and the configuration's own).
fn held_leases(
    runtime: &tokio::runtime::Runtime,
    path: &std::path::Path,
    events: &[Value],
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let config = tessera_broker::config::Config::load(path)?;
    let mut clusters: std::collections::BTreeSet<String> = events
        .iter()
        .filter_map(|event| event.get("cluster").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    clusters.insert(config.cluster.clone());
    Ok(runtime.block_on(tessera_broker::drift::recorded_leases(&config, &clusters))?)
}

/// Reads the JSON audit events of `path` (`-`: standard input) into `events`;
/// a line that is no JSON is skipped and said.
fn read_events(path: &std::path::Path, events: &mut Vec<Value>) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?)
    };
    for (number, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        match serde_json::from_str::<Value>(&line) {
            Ok(event) => events.push(event),
            Err(_) => eprintln!(
                "{}:{}: not a JSON audit event; skipped",
                path.display(),
                number + 1
            ),
        }
    }
    Ok(())
}

/// The successful revocation of `event`'s lease in `events`, if any: what
/// a delivery's "was it revoked, and when" is answered with.
fn revocation_of(event: &Value, events: &[Value]) -> Option<Value> {
    let lease = event.get("lease_id_sha256").and_then(Value::as_str)?;
    if text(event, "action") == "revoke" {
        return None;
    }
    events
        .iter()
        .find(|other| {
            text(other, "action") == "revoke"
                && text(other, "outcome") == "success"
                && other.get("lease_id_sha256").and_then(Value::as_str) == Some(lease)
        })
        .map(|revoke| {
            serde_json::json!({
                "time": text(revoke, "time"),
                "outcome": text(revoke, "outcome"),
                "reason": text(revoke, "reason"),
            })
        })
}
