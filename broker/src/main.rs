//! `tessera-broker`: the credential broker's command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tessera_broker::{
    config::Config,
    dev,
    identity::Identity,
    policy::{Policy, report},
};
use tokio_util::sync::CancellationToken;

mod audit_query;

/// Every freed heap block is cleared: no secret lingers in freed memory.
#[cfg(feature = "zeroize-on-free")]
#[global_allocator]
static ALLOC: tessera_memory::ZeroOnFree = tessera_memory::ZERO_ON_FREE;

/// Exit statuses (sysexits.h), as docs/configuration.md lists them.
mod exit {
    /// EX_USAGE: the command line is wrong.
    pub const USAGE: u8 = 64;
    /// EX_NOINPUT: a file named on the command line does not exist.
    pub const NO_INPUT: u8 = 66;
    /// EX_UNAVAILABLE: a service the broker needs at start (Vault, the
    /// Kubernetes API) cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_NOPERM: a service refused the broker (its Vault or RBAC permissions).
    pub const NO_PERMISSION: u8 = 77;
    /// EX_CONFIG: the configuration (or a policy, key or certificate it
    /// names) is invalid.
    pub const CONFIG: u8 = 78;
    /// `policy diff --exit-code` when the policies could not be compared.
    pub const DIFF_ERROR: u8 = 2;
}

#[derive(Parser)]
#[command(name = "tessera-broker", version, about = "Tessera credential broker")]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "TESSERA_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        /// Configuration file (YAML).
        #[arg(long, env = "TESSERA_CONFIG")]
        config: PathBuf,
        /// Listen address, overriding the file's `listen`.
        #[arg(long, env = "TESSERA_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Check, explain and diff access policies (for review and CI).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Answer "who got which binding when" from audit logs (JSON lines).
    Audit {
        /// Only this binding.
        #[arg(long)]
        binding: Option<String>,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// From this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        /// Until this time (RFC 3339).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: Option<std::time::SystemTime>,
        /// Include denials and errors, not only deliveries.
        #[arg(long)]
        all: bool,
        /// Audit log files; `-` reads standard input (`kubectl logs … | tessera-broker audit -`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// DEVELOPMENT ONLY: keys, certificates and tokens for a local demo.
    #[command(subcommand)]
    Dev(DevCommand),
}

/// How `policy` subcommands print their answer.
#[derive(Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document on stdout, for CI bots (docs/policy.md shows its shape).
    Json,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files or directories; lists every problem as file:line:column.
    Check {
        /// Policy files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// `text` or `json`.
        #[arg(long, short, default_value = "text")]
        output: Output,
    },
    /// Print what an identity gets and why.
    Explain {
        /// Namespace of the identity.
        #[arg(long)]
        namespace: String,
        /// Service account of the identity.
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
        #[arg(required = true)]
        paths: Vec<PathBuf>,
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

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

#[derive(Subcommand)]
enum DevCommand {
    /// Create a token signing key, its JWKS, and a CA + serving certificate.
    Init {
        /// Directory to write into.
        #[arg(long)]
        dir: PathBuf,
        /// Names and IPs for the serving certificate.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
    /// Mint a token shaped like a projected service-account token.
    Token {
        /// Signing key written by `dev init`.
        #[arg(long)]
        key: PathBuf,
        /// `kubernetes.io.namespace`.
        #[arg(long)]
        namespace: String,
        /// `kubernetes.io.serviceaccount.name`.
        #[arg(long)]
        service_account: String,
        /// Pod name (default `<service-account>-0`).
        #[arg(long)]
        pod: Option<String>,
        /// Node name.
        #[arg(long, default_value = "dev-node")]
        node: String,
        /// Lifetime, e.g. `10m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// `iss`.
        #[arg(long, default_value = dev::DEFAULT_ISSUER)]
        issuer: String,
        /// `aud`.
        #[arg(long, default_value = dev::DEFAULT_AUDIENCE)]
        audience: String,
        /// Write the token to this file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are not errors; anything else is EX_USAGE.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tessera_broker::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let serving = matches!(cli.command, Command::Serve { .. });
    let telemetry = {
        // The OTLP exporter's connection lives on this runtime.
        let _entered = runtime.enter();
        tessera_telemetry::init(
            "tessera-broker",
            matches!(cli.log_format, LogFormat::Json),
            serving,
        )
    };
    let result = match cli.command {
        Command::Serve { config, listen } => serve(&runtime, &config, listen),
        Command::Policy(command) => run_policy(command),
        Command::Audit {
            binding,
            namespace,
            since,
            until,
            all,
            files,
        } => {
            if let Some(path) = files.iter().find(|p| p.as_os_str() != "-" && !p.exists()) {
                eprintln!("{}: no such file", path.display());
                return ExitCode::from(exit::NO_INPUT);
            }
            let query = audit_query::Query {
                binding,
                namespace,
                since,
                until,
                all,
            };
            audit_query::run(&query, &files)
        }
        Command::Dev(command) => run_dev(command),
    };
    runtime.block_on(telemetry.shutdown());
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    runtime: &tokio::runtime::Runtime,
    path: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    if !path.exists() {
        tracing::error!("config {}: no such file", path.display());
        return Ok(ExitCode::from(exit::NO_INPUT));
    }
    let mut config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return Ok(ExitCode::from(exit::CONFIG));
        }
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    // Before any secret is read: no core dumps, memory locked where allowed.
    log_hardening(
        &tessera_memory::harden(config.memory_lock),
        config.memory_lock,
    );
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let grace = config.shutdown_grace;
        let listen = config.listen;
        let admin_listen = config.admin_listen;
        let webhook_listen = config.webhook.as_ref().map(|w| w.listen);
        let connections = config.connections;
        let mut prepared = match tessera_broker::prepare(config, &shutdown).await {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!("{error}");
                return Ok(ExitCode::from(start_exit_code(&error)));
            }
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        if let Some(admin) = admin_listen {
            let admin_listener = tokio::net::TcpListener::bind(admin)
                .await
                .with_context(|| format!("binding the admin address {admin}"))?;
            tracing::info!(address = %admin, "admin endpoints listening (/metrics, /livez, /readyz)");
            tokio::spawn(tessera_broker::metrics::serve_admin(
                admin_listener,
                prepared.metrics(),
                shutdown.clone(),
            ));
        }
        if let (Some(address), Some(webhook)) = (webhook_listen, prepared.take_webhook()) {
            let webhook_listener = std::net::TcpListener::bind(address)
                .with_context(|| format!("binding the webhook address {address}"))?;
            tracing::info!(%address, "admission webhook listening (HTTPS, POST /mutate)");
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(error) = webhook
                    .serve(webhook_listener, connections, shutdown.clone())
                    .await {
                    // Stop, so the pod restarts instead of running without its webhook.
                    tracing::error!(%error, "admission webhook failed; stopping the broker");
                    shutdown.cancel();
                }
            });
        }
        let server = tokio::spawn(tessera_broker::run(prepared, listener, shutdown.clone()));
        wait_for_signal().await;
        tracing::info!(grace = ?grace, "shutting down");
        shutdown.cancel();
        match tokio::time::timeout(grace, server).await {
            Ok(Ok(Ok(()))) => Ok(ExitCode::SUCCESS),
            Ok(Ok(Err(error))) => Err(error.into()),
            Ok(Err(join)) => Err(anyhow::anyhow!("server task failed: {join}")),
            Err(_) => {
                tracing::warn!("grace period over; aborting open connections");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// The exit status for a broker that could not start.
fn start_exit_code(error: &tessera_broker::StartError) -> u8 {
    use tessera_broker::{StartError, bootstrap::BootstrapError};
    match error {
        StartError::Kubernetes(_) => exit::UNAVAILABLE,
        StartError::Bootstrap(BootstrapError::Api { source, .. }) => match source.as_ref() {
            kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                exit::NO_PERMISSION
            }
            _ => exit::UNAVAILABLE,
        },
        StartError::Serve(_) => 1,
        _ => exit::CONFIG,
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the broker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The answer of `policy check --output json`, and of any policy command
/// whose policy does not load.
#[derive(serde::Serialize)]
struct CheckReport<'a> {
    /// True when the policy loaded.
    ok: bool,
    /// Bindings defined.
    bindings: usize,
    /// Files read.
    files: usize,
    /// Every problem, located.
    problems: &'a [tessera_broker::policy::Problem],
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => emit(&format!("{text}\n")),
        Err(error) => eprintln!("cannot print JSON: {error}"),
    }
}

/// Writes `text` to standard output. A reader that closed the pipe early
/// (`policy diff -o json | head`) ends the command quietly, as any Unix
/// filter does, instead of a panic in `println!`.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("cannot write to standard output: {error}");
    }
}

/// Loads a policy, or prints every problem: status 1 for problems, 66 for a
/// path that does not exist (`missing` overrides the status, for `diff`).
fn load_or_report(
    paths: &[PathBuf],
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
        match Policy::load(paths) {
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

fn run_policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { paths, output } => Ok(match load_or_report(&paths, None, output) {
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
        }),
        PolicyCommand::Explain {
            namespace,
            service_account,
            pod_labels,
            cluster,
            paths,
            output,
        } => {
            let policy = match load_or_report(&paths, None, output) {
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
            let (old, new) = match load_or_report(&[old], error, output)
                .and_then(|old| Ok((old, load_or_report(&[new], error, output)?)))
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

fn run_dev(command: DevCommand) -> anyhow::Result<ExitCode> {
    match command {
        DevCommand::Init { dir, hosts } => {
            dev::init(&dir, &hosts)?;
            eprintln!(
                "DEVELOPMENT ONLY: wrote signing key, JWKS and TLS files to {}",
                dir.display()
            );
        }
        DevCommand::Token {
            key,
            namespace,
            service_account,
            pod,
            node,
            ttl,
            issuer,
            audience,
            out,
        } => {
            let pem = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            let signer = dev::SigningKey::from_pem(&pem)?;
            let mut spec = dev::TokenSpec::new(&namespace, &service_account);
            spec.pod = Some(pod.unwrap_or_else(|| format!("{service_account}-0")));
            spec.node = Some(node);
            spec.ttl = ttl;
            spec.issuer = issuer;
            spec.audience = audience;
            let token = zeroize::Zeroizing::new(signer.mint(&spec));
            match out {
                Some(path) => dev::write_secret_file(&path, token.as_bytes())?,
                None => println!("{}", token.as_str()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says once at start how memory is protected: a warning only when locking
/// was asked for and is not allowed.
fn log_hardening(report: &tessera_memory::Hardening, asked: tessera_memory::Lock) {
    let zero_on_free = cfg!(feature = "zeroize-on-free");
    match (&report.not_locked_because, asked) {
        (Some(why), tessera_memory::Lock::IfAllowed) => {
            tracing::warn!(zero_on_free, "memory hygiene: {report}: {why}")
        }
        (Some(why), tessera_memory::Lock::Off) => {
            tracing::info!(zero_on_free, "memory hygiene: {report}: {why}")
        }
        (None, _) => tracing::info!(zero_on_free, "memory hygiene: {report}"),
    }
}
