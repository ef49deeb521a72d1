//! `tessera-broker audit`: who got which binding, and when, from audit logs.

use std::{
    io::{BufRead, BufReader, Write},
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
    /// Audit log files; `-` reads standard input (`kubectl logs … | tessera-broker audit -`).
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

/// Prints one line per selected event; exits 66 when a file does not exist.
///
/// # Errors
/// When a file cannot be read.
pub fn run(query: &Query) -> anyhow::Result<ExitCode> {
    let files = &query.files;
    if let Some(path) = files.iter().find(|p| p.as_os_str() != "-" && !p.exists()) {
        eprintln!("{}: no such file", path.display());
        return Ok(ExitCode::from(super::exit::NO_INPUT));
    }
    let mut out = std::io::stdout().lock();
    // A reader that stopped reading (`| head`) ends the query quietly.
    let closed = |error: &std::io::Error| error.kind() == std::io::ErrorKind::BrokenPipe;
    if let Err(error) = writeln!(
        out,
        "time\taction\toutcome\tnamespace/service-account\tpod (uid)\tnode\tbinding\tversion\treason"
    ) {
        return if closed(&error) {
            Ok(ExitCode::SUCCESS)
        } else {
            Err(error.into())
        };
    }
    for path in files {
        let reader: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )
        };
        for (number, line) in BufReader::new(reader).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                eprintln!(
                    "{}:{}: not a JSON audit event; skipped",
                    path.display(),
                    number + 1
                );
                continue;
            };
            if !query.selects(&event) {
                continue;
            }
            if let Err(error) = writeln!(
                out,
                "{}\t{}\t{}\t{}/{}\t{} ({})\t{}\t{}\t{}\t{}",
                text(&event, "time"),
                text(&event, "action"),
                text(&event, "outcome"),
                text(&event, "namespace"),
                text(&event, "service_account"),
                text(&event, "pod_name"),
                text(&event, "pod_uid"),
                text(&event, "node"),
                text(&event, "binding"),
                text(&event, "version"),
                text(&event, "reason"),
            ) {
                return if closed(&error) {
                    Ok(ExitCode::SUCCESS)
                } else {
                    Err(error.into())
                };
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
