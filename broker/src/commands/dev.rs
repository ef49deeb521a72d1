//! `tessera-broker dev`: DEVELOPMENT ONLY keys, certificates and tokens for
//! a local demo.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Subcommand;
use tessera_broker::dev;

#[derive(Subcommand)]
pub enum DevCommand {
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
        /// The node the token names, as the kubelet's tokens do.
        #[arg(long, default_value = "dev-node")]
        node: String,
        /// Lifetime, e.g. `10m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The token's issuer (`iss`); the dev issuer by default.
        #[arg(long, default_value = dev::DEFAULT_ISSUER)]
        issuer: String,
        /// The token's audience (`aud`); `tessera` by default.
        #[arg(long, default_value = dev::DEFAULT_AUDIENCE)]
        audience: String,
        /// Write the token to this file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs one `dev` subcommand.
///
/// # Errors
/// A file that cannot be read or written, a key that does not parse.
pub fn run(command: DevCommand) -> anyhow::Result<ExitCode> {
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
