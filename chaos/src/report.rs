//! The run's table, printed and (for a full run) written to
//! docs/RELIABILITY.md with the machine, the date and how to reproduce it.

use std::{fmt::Write as _, path::Path, time::Duration};

use crate::faults::Outcome;

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "did not".to_owned(),
        |d| format!("{:.1} s", d.as_secs_f64()),
    )
}

/// The table, as Markdown (readable as plain text too).
pub fn table(outcomes: &[Outcome]) -> String {
    let mut text = String::from(
        "| fault | lost a valid credential | double-minted leases | leases left after pod deleted | pods that could not start | recovered in | result |\n|---|---|---|---|---|---|---|\n",
    );
    for outcome in outcomes {
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} | {} |",
            outcome.fault.name(),
            outcome.lost.len(),
            outcome.double_minted,
            outcome.orphaned.len(),
            outcome.unstarted.len(),
            seconds(outcome.recovery),
            if outcome.passed() { "pass" } else { "FAIL" },
        );
    }
    text
}

/// What went wrong, pod by pod, for the faults that failed.
pub fn details(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes.iter().filter(|o| !o.passed()) {
        let _ = writeln!(text, "{}:", outcome.fault.name());
        for line in outcome
            .lost
            .iter()
            .map(|l| format!("lost: {l}"))
            .chain(outcome.orphaned.iter().map(|o| format!("left behind: {o}")))
            .chain(
                outcome
                    .unstarted
                    .iter()
                    .map(|u| format!("did not start: {u}")),
            )
            .chain(
                outcome
                    .unsettled
                    .iter()
                    .map(|u| format!("not recovered: {u}")),
            )
            .chain(
                outcome
                    .misanswered
                    .iter()
                    .map(|m| format!("answered wrongly: {m}")),
            )
        {
            let _ = writeln!(text, "  {line}");
        }
        if outcome.double_minted > 0 {
            let _ = writeln!(
                text,
                "  {} database leases beyond one per live pod",
                outcome.double_minted
            );
        }
    }
    text
}

/// The last line: `N passed, M failed`.
pub fn summary(outcomes: &[Outcome]) -> String {
    let passed = outcomes.iter().filter(|o| o.passed()).count();
    format!("{passed} passed, {} failed", outcomes.len() - passed)
}

/// Writes docs/RELIABILITY.md.
///
/// # Errors
/// When the file cannot be written.
pub fn write(
    path: &Path,
    outcomes: &[Outcome],
    setup: &str,
    control: usize,
) -> std::io::Result<()> {
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let text = format!(
        "# Reliability: the fault matrix\n\n\
Written by `scripts/chaos` (the full run) on {date}, on this machine: {machine}, {cores} cores.\n\
Reproduce with `scripts/chaos` (about 5 minutes; `scripts/chaos --quick` is the shorter run\n\
`scripts/test` includes).\n\n\
## What runs\n\n{setup}\n\n\
## What is measured, per fault\n\n\
- **lost a valid credential**: a live pod whose files went missing or empty, or whose database\n  \
user stopped logging in to PostgreSQL (while PostgreSQL ran), before the credential's expiry.\n  \
Checked twice a second for the whole run.\n\
- **double-minted leases**: once settled, database leases in Vault beyond one per live pod.\n\
- **leases left after pod deleted**: pods deleted during the fault whose database user still\n  \
logs in or whose lease records remain once settled.\n\
- **pods that could not start**: pods created during the fault that never got their files\n  \
(KV pods created during the Vault outage must start during it).\n\
- **recovered in**: from the heal (the kill, for Vault's active node) until every live pod holds\n  \
a valid credential that its sidecar reports confirmed (not stale, not last-known-good) and a\n  \
database pod created at the heal has its user.\n\n\
## Results\n\n{}\n{}\n\n\
The instrument's own check, run last: every database user was revoked in Vault behind the\n\
broker's back, and the watcher saw {control} pod(s) lose a credential (a run where it sees none\n\
fails: its zeros could not be trusted).\n",
        table(outcomes),
        summary(outcomes),
    );
    std::fs::write(path, text)
}
