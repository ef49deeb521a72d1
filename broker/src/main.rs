//! `tessera-broker`: the credential broker's command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use self::commands::{audit, dev::DevCommand, exit, policy::PolicyCommand, status};

mod commands;

/// Every freed heap block is cleared: no secret lingers in freed memory.
#[cfg(feature = "zeroize-on-free")]
#[global_allocator]
static ALLOC: tessera_memory::ZeroOnFree = tessera_memory::ZERO_ON_FREE;

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
    Audit(audit::Query),
    /// Find drift: pods without the sidecar, leases no record owns, records
    /// whose lease is gone (exit 1 when any).
    Status(status::Status),
    /// DEVELOPMENT ONLY: keys, certificates and tokens for a local demo.
    #[command(subcommand)]
    Dev(DevCommand),
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
        Command::Serve { config, listen } => commands::serve::serve(&runtime, &config, listen),
        Command::Policy(command) => commands::policy::run(&runtime, command),
        Command::Audit(query) => audit::run(&runtime, &query),
        Command::Status(status) => status::run(&runtime, &status),
        Command::Dev(command) => commands::dev::run(command),
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
