//! `tessera-broker serve`: load the configuration, start the broker, serve
//! until SIGTERM, drain within the grace period.

use std::process::ExitCode;

use anyhow::Context;
use tessera_broker::config::Config;
use tokio_util::sync::CancellationToken;

use super::exit;

/// Binds `address` (`what`, for the error) when there is one.
async fn bind(
    address: Option<std::net::SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match address {
        Some(address) => Ok(Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {what} {address}"))?,
        )),
        None => Ok(None),
    }
}

/// Serves with the configuration at `path` (`listen` overriding its own).
///
/// # Errors
/// A listener that cannot be bound, or the server failing.
pub fn serve(
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
        let peer_listen = config.peers.as_ref().map(|p| p.listen);
        let feed_listen = config.change_feed.as_ref().map(|f| f.listen);
        let prepared = match tessera_broker::prepare(config, &shutdown).await {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!("{error}");
                return Ok(ExitCode::from(start_exit_code(&error)));
            }
        };
        let grpc = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let admin = match admin_listen {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding the admin address {address}"))?;
                tracing::info!(%address, "admin endpoints listening (/metrics, /livez, /readyz)");
                Some(listener)
            }
            None => None,
        };
        let webhook = match webhook_listen {
            Some(address) => {
                let listener = std::net::TcpListener::bind(address)
                    .with_context(|| format!("binding the webhook address {address}"))?;
                tracing::info!(%address, "admission webhook listening (HTTPS, POST /mutate)");
                Some(listener)
            }
            None => None,
        };
        let peers = bind(peer_listen, "the peer address").await?;
        let change_feed = bind(feed_listen, "the change feed address").await?;
        let listeners = tessera_broker::Listeners {
            grpc,
            admin,
            webhook,
            peers,
            change_feed,
        };
        let mut running = tessera_broker::spawn(prepared, listeners, shutdown.clone());
        // A server or loop that ends before shutdown stops the broker, so
        // Kubernetes restarts it instead of it running without a part.
        let failure = tokio::select! {
            () = wait_for_signal() => None,
            ended = running.ended() => Some(ended),
        };
        match &failure {
            Some(ended) => tracing::error!("{ended}; stopping the broker"),
            None => tracing::info!(grace = ?grace, "shutting down"),
        }
        shutdown.cancel();
        match tokio::time::timeout(grace, running.drain()).await {
            Ok(failed) => {
                for ended in &failed {
                    tracing::warn!("{ended} while shutting down");
                }
            }
            Err(_) => tracing::warn!("grace period over; aborting open connections"),
        }
        Ok(match failure {
            Some(_) => ExitCode::FAILURE,
            None => ExitCode::SUCCESS,
        })
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
