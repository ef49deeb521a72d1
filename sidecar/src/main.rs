//! `tessera-sidecar`: `once` for init containers and Jobs, `run` for the sidecar.

use std::process::ExitCode;

use clap::Parser;
use tessera_sidecar::{
    agent::{self, AgentError},
    cli::{Cli, LogFormat, Mode},
};
use tokio_util::sync::CancellationToken;

/// Every freed heap block is cleared: no secret lingers in freed memory.
#[cfg(feature = "zeroize-on-free")]
#[global_allocator]
static ALLOC: tessera_memory::ZeroOnFree = tessera_memory::ZERO_ON_FREE;

/// EX_USAGE: invalid arguments or output directory.
const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE: the broker could not be reached or failed.
const EXIT_UNAVAILABLE: u8 = 69;
/// EX_NOPERM: the broker denied a binding.
const EXIT_DENIED: u8 = 77;
/// EX_NOINPUT: the token, CA or client certificate file cannot be read.
const EXIT_NO_INPUT: u8 = 66;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are not errors; anything else is EX_USAGE.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Probes (`check`) run every second: they never export traces.
        let telemetry = tessera_telemetry::init(
            "tessera-sidecar",
            matches!(cli.log_format, LogFormat::Json),
            !matches!(cli.command, Mode::Check(_)),
        );
        let code = serve(&cli).await;
        telemetry.shutdown().await;
        code
    })
}

async fn serve(cli: &Cli) -> ExitCode {
    let (common, backoff_max, revoke_on_exit, metrics_listen) = match &cli.command {
        Mode::Check(args) => {
            return match tessera_sidecar::status::check(&args.out, &args.bindings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("{error}");
                    ExitCode::FAILURE
                }
            };
        }
        Mode::Whoami(connection) => return whoami(connection).await,
        Mode::Exec(exec) => return run_exec(exec).await,
        Mode::Install { dir } => {
            return match tessera_sidecar::exec::install(dir) {
                Ok(path) => {
                    tracing::info!(path = %path.display(), "installed");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    tracing::error!(dir = %dir.display(), %error, "cannot install the binary");
                    ExitCode::FAILURE
                }
            };
        }
        Mode::Once(common) => (common, None, false, None),
        Mode::Run {
            common,
            backoff_max,
            revoke_on_exit,
            metrics_listen,
        } => (common, Some(*backoff_max), *revoke_on_exit, *metrics_listen),
    };
    // Before any secret arrives: no core dumps, memory locked where allowed.
    let report = tessera_memory::harden(if common.lock_memory {
        tessera_memory::Lock::IfAllowed
    } else {
        tessera_memory::Lock::Off
    });
    let zero_on_free = cfg!(feature = "zeroize-on-free");
    match &report.not_locked_because {
        None => tracing::info!(zero_on_free, "memory hygiene: {report}"),
        Some(why) => tracing::info!(zero_on_free, "memory hygiene: {report}: {why}"),
    }
    let job = match common.job() {
        Ok(job) => job,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = match backoff_max {
        None => agent::once(&job).await,
        Some(backoff_max) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            if let Some(address) = metrics_listen {
                match tokio::net::TcpListener::bind(address).await {
                    Ok(listener) => {
                        tracing::info!(%address, "metrics listening");
                        tokio::spawn(tessera_sidecar::metrics::serve(
                            listener,
                            job.writer.out().to_owned(),
                            shutdown.clone(),
                        ));
                    }
                    Err(error) => {
                        tracing::error!(%address, %error, "cannot listen for metrics");
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            let result = agent::run(&job, backoff_max, shutdown).await;
            if result.is_ok() && revoke_on_exit {
                match agent::revoke(&job).await {
                    Ok(revoked) => {
                        tracing::info!(?revoked, "revoked the pod's credentials on exit")
                    }
                    Err(error) => tracing::warn!(
                        "could not revoke on exit ({error}); leases expire by their TTL"
                    ),
                }
            }
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// `exec`: the app as a child with its credentials in the environment.
async fn run_exec(exec: &tessera_sidecar::cli::Exec) -> ExitCode {
    let job = match exec.job() {
        Ok(job) => job,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Not `harden`: its core-dump limit would be inherited by the app. Being
    // non-dumpable is this process's alone (execve resets it for the child).
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    match tessera_sidecar::exec::run(job).await {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::from(match &error {
                tessera_sidecar::exec::ExecError::Broker(
                    tessera_client::Error::Denied { .. }
                    | tessera_client::Error::Unauthenticated { .. },
                ) => EXIT_DENIED,
                tessera_sidecar::exec::ExecError::Broker(tessera_client::Error::Setup(_)) => {
                    EXIT_NO_INPUT
                }
                tessera_sidecar::exec::ExecError::Spawn { .. } => 127,
                _ => EXIT_UNAVAILABLE,
            })
        }
    }
}

/// `whoami`: prints the verified identity and its granted bindings.
async fn whoami(connection: &tessera_sidecar::cli::Connection) -> ExitCode {
    let target = match connection.target() {
        Ok(target) => target,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match agent::who_am_i(&target).await {
        Ok(answer) => {
            let identity = answer.identity.unwrap_or_default();
            println!(
                "namespace: {}\nservice account: {}\npod: {}\nbindings granted: {}",
                identity.namespace,
                identity.service_account,
                if identity.pod_name.is_empty() {
                    "(token not bound to a pod)"
                } else {
                    &identity.pod_name
                },
                if answer.bindings.is_empty() {
                    "none".to_owned()
                } else {
                    answer.bindings.join(", ")
                }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &AgentError) -> u8 {
    use tessera_client::{Error, SetupError};
    match error {
        AgentError::Client(Error::Denied { .. }) => EXIT_DENIED,
        AgentError::Client(Error::Setup(SetupError::Token { .. } | SetupError::Ca { .. })) => {
            EXIT_NO_INPUT
        }
        AgentError::Client(Error::Setup(_)) | AgentError::Write { .. } => 1,
        AgentError::Client(_) | AgentError::Incomplete(_) => EXIT_UNAVAILABLE,
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping; files stay in place");
    shutdown.cancel();
}
