//! `tessera-broker policy check|explain|diff`: the security team's review
//! of a policy, for people and CI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Subcommand, ValueEnum};
use tessera_broker::{
    identity::Identity,
    policy::{
        Policy, report,
        resources::{ClusterResource, check_all},
    },
};

use super::{emit, exit, print_json};

/// How `policy` subcommands print their answer.
#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people reading a terminal or a review comment.
    #[default]
    Text,
    /// One JSON document on stdout, for CI bots (docs/policy.md shows its shape).
    Json,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files or directories; lists every problem as file:line:column.
    Check {
        /// Policy files or directories (`Policy`, `ClusterAccessPolicy`,
        /// `AccessBinding`, or a `List` of them as kubectl prints it).
        #[arg(required_unless_present = "from_cluster")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        from: FromCluster,
        /// `text` or `json`.
        #[arg(long, short, default_value = "text")]
        output: Output,
    },
    /// Print what an identity gets and why.
    Explain {
        /// The namespace of the identity to explain.
        #[arg(long)]
        namespace: String,
        /// The service account of the identity to explain.
        #[arg(long)]
        service_account: String,
        /// A pod label `key=value` (repeat), as pod lookup would report it.
        #[arg(long = "pod-label", value_parser = parse_label)]
        pod_labels: Vec<(String, String)>,
        /// The cluster (`cluster.name`) the identity is in: subjects naming
        /// other clusters do not match. Without it, only subjects that name
        /// no cluster match.
        #[arg(long)]
        cluster: Option<String>,
        /// Policy files or directories.
        #[arg(required_unless_present = "from_cluster")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        from: FromCluster,
        /// `text` or `json`.
        #[arg(long, short, default_value = "text")]
        output: Output,
    },
    /// Print the access a change grants and removes.
    Diff {
        /// The policy before (file or directory).
        old: PathBuf,
        /// The policy after (file or directory).
        new: PathBuf,
        /// Exit 1 when anything changed, 0 when nothing did (2 when the
        /// policies cannot be compared, as always).
        #[arg(long)]
        exit_code: bool,
        /// `text` or `json`.
        #[arg(long, short, default_value = "text")]
        output: Output,
    },
}

/// Where a policy command reads the cluster's policy resources.
#[derive(clap::Args)]
pub struct FromCluster {
    /// Add the cluster's ClusterAccessPolicy and AccessBinding resources
    /// (as the broker with `policy.resources` reads them).
    #[arg(long)]
    from_cluster: bool,
    /// The kubeconfig for `--from-cluster`; `KUBECONFIG` or
    /// `~/.kube/config` when absent.
    #[arg(long, requires = "from_cluster")]
    kubeconfig: Option<PathBuf>,
}

impl FromCluster {
    /// The resources, when asked for.
    fn read(&self, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Vec<ClusterResource>> {
        if !self.from_cluster {
            return Ok(Vec::new());
        }
        runtime.block_on(async {
            let client = match &self.kubeconfig {
                Some(path) => tessera_broker::kube_client(Some(path)).await?,
                None => kube::Client::try_default().await.map_err(|e| {
                    anyhow::anyhow!("--from-cluster: no Kubernetes configuration ({e}); pass --kubeconfig")
                })?,
            };
            tessera_broker::policy_resources::list(&client)
                .await
                .map_err(|e| anyhow::anyhow!("--from-cluster: listing ClusterAccessPolicy and AccessBinding resources: {e}"))
        })
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

/// The answer of `policy check --output json`, and of any policy command
/// whose policy does not load.
#[derive(serde::Serialize)]
struct CheckReport<'a> {
    /// True when the policy loaded.
    ok: bool,
    /// How many bindings the policy defines.
    bindings: usize,
    /// The files the policy was read from.
    files: usize,
    /// Every problem, located.
    problems: &'a [tessera_broker::policy::Problem],
}

/// Loads a policy, or prints every problem: status 1 for problems, 66 for a
/// path that does not exist (`missing` overrides the status, for `diff`).
fn load_or_report(
    paths: &[PathBuf],
    resources: &[ClusterResource],
    missing: Option<u8>,
    output: Output,
) -> Result<Policy, ExitCode> {
    let problems = if let Some(path) = paths.iter().find(|p| !p.exists()) {
        let problem = tessera_broker::policy::Problem {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: "no such file or directory".to_owned(),
        };
        match output {
            Output::Text => eprintln!("{problem}"),
            Output::Json => print_json(&CheckReport {
                ok: false,
                bindings: 0,
                files: 0,
                problems: &[problem],
            }),
        }
        return Err(ExitCode::from(missing.unwrap_or(exit::NO_INPUT)));
    } else {
        match check_all(paths, resources) {
            Ok(policy) => return Ok(policy),
            Err(error) => error.problems,
        }
    };
    match output {
        Output::Text => {
            let mut text = String::new();
            for problem in &problems {
                text.push_str(&format!("{problem}\n"));
            }
            text.push_str(&format!(
                "{} problem{} found\n",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            ));
            emit(&text);
        }
        Output::Json => print_json(&CheckReport {
            ok: false,
            bindings: 0,
            files: 0,
            problems: &problems,
        }),
    }
    Err(ExitCode::from(missing.unwrap_or(1)))
}

/// Runs one `policy` subcommand.
///
/// # Errors
/// The cluster's resources could not be read (`--from-cluster`).
pub fn run(runtime: &tokio::runtime::Runtime, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check {
            paths,
            from,
            output,
        } => Ok(
            match load_or_report(&paths, &from.read(runtime)?, None, output) {
                Ok(policy) => {
                    match output {
                        Output::Text => emit(&format!(
                            "ok: {} binding{} in {} file{}\n",
                            policy.bindings.len(),
                            if policy.bindings.len() == 1 { "" } else { "s" },
                            policy.files.len(),
                            if policy.files.len() == 1 { "" } else { "s" }
                        )),
                        Output::Json => print_json(&CheckReport {
                            ok: true,
                            bindings: policy.bindings.len(),
                            files: policy.files.len(),
                            problems: &[],
                        }),
                    }
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
        ),
        PolicyCommand::Explain {
            namespace,
            service_account,
            pod_labels,
            cluster,
            paths,
            from,
            output,
        } => {
            let policy = match load_or_report(&paths, &from.read(runtime)?, None, output) {
                Ok(policy) => match &cluster {
                    Some(name) => policy.for_cluster(name),
                    None => policy.for_cluster_unnamed(),
                },
                Err(code) => return Ok(code),
            };
            let identity = Identity {
                namespace,
                service_account,
                service_account_uid: String::new(),
                pod: None,
                node: None,
                pod_labels: (!pod_labels.is_empty()).then(|| pod_labels.into_iter().collect()),
                expires_at: 0,
            };
            let mut explanation = report::Explanation::of(&policy, &identity);
            explanation.cluster = cluster;
            match output {
                Output::Text => emit(&explanation.to_string()),
                Output::Json => print_json(&explanation),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff {
            old,
            new,
            exit_code,
            output,
        } => {
            let error = Some(exit::DIFF_ERROR);
            let (old, new) = match load_or_report(&[old], &[], error, output)
                .and_then(|old| Ok((old, load_or_report(&[new], &[], error, output)?)))
            {
                Ok(both) => both,
                Err(code) => return Ok(code),
            };
            let changes = report::diff(&old, &new);
            match output {
                Output::Text if changes.is_empty() => emit("no change\n"),
                Output::Text => emit(&changes.iter().map(|c| format!("{c}\n")).collect::<String>()),
                Output::Json => print_json(&serde_json::json!({
                    "changed": !changes.is_empty(),
                    "changes": changes,
                })),
            }
            Ok(if exit_code && !changes.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
