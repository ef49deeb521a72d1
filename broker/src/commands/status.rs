//! `tessera-broker status`: drift the broker cannot see from a request
//! (pods running without the sidecar, leases no record owns, records whose
//! lease is gone), checked against the cluster and Vault its configuration
//! names. Read-only; exit 1 when anything drifted, for cron jobs and CI.

use std::{path::PathBuf, process::ExitCode};

use tessera_broker::{config::Config, drift::Report};

use super::{emit, exit, policy::Output, print_json};

/// What to check, and how to print it.
#[derive(clap::Args)]
pub struct Status {
    /// The broker's configuration file: its policy, Vault and cluster.
    #[arg(long, env = "TESSERA_CONFIG")]
    pub config: PathBuf,
    /// The label of namespaces that opt in to injection (`key=value`).
    #[arg(long, default_value = "tessera.dev/injection=enabled")]
    pub namespace_label: String,
    /// `text` or `json`.
    #[arg(long, short, default_value = "text")]
    pub output: Output,
}

/// Checks and prints the report.
///
/// # Errors
/// None of its own: a configuration or policy that does not load is an
/// exit status, what cannot be reached is listed as not checked.
pub fn run(runtime: &tokio::runtime::Runtime, status: &Status) -> anyhow::Result<ExitCode> {
    if !status.config.exists() {
        eprintln!("config {}: no such file", status.config.display());
        return Ok(ExitCode::from(exit::NO_INPUT));
    }
    let config = match Config::load(&status.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(exit::CONFIG));
        }
    };
    let report = match runtime.block_on(tessera_broker::drift::check(
        &config,
        &status.namespace_label,
    )) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(exit::CONFIG));
        }
    };
    match status.output {
        Output::Json => print_json(&report),
        Output::Text => emit(&text(&report)),
    }
    Ok(if report.drifted() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The report for a terminal: one section per kind of drift.
fn text(report: &Report) -> String {
    let mut out = String::new();
    let mut section = |title: &str, lines: Vec<String>| {
        out.push_str(&format!("{title}: {}\n", lines.len()));
        for line in lines {
            out.push_str(&format!("  {line}\n"));
        }
    };
    section(
        "pods without the sidecar",
        report
            .pods_without_sidecar
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect(),
    );
    section(
        "leases no record owns",
        report
            .orphaned_leases
            .iter()
            .map(|l| {
                let namespace = if l.vault_namespace.is_empty() {
                    String::new()
                } else {
                    format!(" (namespace {})", l.vault_namespace)
                };
                format!("{}… lease sha256 {}{namespace}", l.prefix, l.lease_sha256)
            })
            .collect(),
    );
    section(
        "records whose lease is gone",
        report
            .records_without_lease
            .iter()
            .map(|r| {
                format!(
                    "{}/{} binding {} ({}) lease sha256 {}",
                    r.namespace, r.pod, r.binding, r.source, r.lease_sha256
                )
            })
            .collect(),
    );
    if !report.not_checked.is_empty() {
        section("not checked", report.not_checked.clone());
    }
    out
}
