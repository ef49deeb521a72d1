//! Tessera broker: verifies a pod's projected service-account token, looks the
//! identity up in the access policy (deny by default) and serves the granted
//! credentials from Vault over gRPC (`tessera.v1.Broker`), with TLS 1.3.
//!
//! [`run`] serves on a listener it is given until a cancellation token fires,
//! so tests start a real broker in-process or as a process alike.

pub mod audit;
pub mod bootstrap;
pub mod change_feed;
pub mod clock;
pub mod config;
pub mod dev;
pub mod drift;
pub mod error;
pub mod feed;
#[cfg(test)]
mod fuzz;
pub mod handle;
pub mod identity;
pub mod lease;
pub mod lease_id;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod peers;
pub mod policy;
pub mod policy_resources;
pub mod ratelimit;
mod running;
pub mod secret;
pub mod service;
pub mod tasks;
pub mod text;
pub mod tls;
pub mod vault;
pub mod webhook;

pub use running::{Running, spawn};

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    config::IdentitySource,
    feed::Feeds,
    identity::{Expectations, JwksFile, OidcKeys, Verifier},
    policy::store::PolicyStore,
    service::BrokerService,
    tasks::Tasks,
    vault::Vault,
};

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The JWKS could not be loaded.
    #[error(transparent)]
    Jwks(#[from] identity::JwksError),
    /// The policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// The serving certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The Vault client could not be built.
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log {target}: {source}")]
    Audit {
        /// Where the audit trail was to be written.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The lease handle key could not be loaded.
    #[error(transparent)]
    HandleKey(#[from] handle::HandleKeyError),
    /// The shared Secrets (CA, certificate, handle key) could not be had.
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    /// The Kubernetes API client could not be configured.
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    /// The gRPC server failed (the task's name says which server).
    #[error(transparent)]
    Serve(#[from] tonic::transport::Error),
    /// A server's listening socket is gone.
    #[error(transparent)]
    Listener(std::io::Error),
    /// Vault's change feed could not be served.
    #[error("Vault change feed: {0}")]
    ChangeFeed(String),
}

/// Everything `serve` needs, loaded and checked before a port is opened.
/// Building it starts nothing: its tasks run from [`spawn`].
pub struct Prepared {
    config: Config,
    tasks: Tasks,
    tls: Arc<rustls::ServerConfig>,
    policy: Arc<PolicyStore>,
    vault: Arc<Vault>,
    metrics: Arc<metrics::Metrics>,
    reconciler: Arc<lease::reconcile::Reconciler>,
    service: BrokerService,
    webhook: Option<webhook::Server>,
    feeds: Arc<Feeds>,
    peers: Option<Arc<peers::Peers>>,
    change_feed: Option<Arc<feed::ChangeFeedState>>,
    kube: Option<kube::Client>,
}

/// The ports the broker serves, bound by the caller.
pub struct Listeners {
    /// The gRPC listener (TLS): the `tessera.v1.Broker` API, health and reflection.
    pub grpc: TcpListener,
    /// `/metrics`, `/livez`, `/readyz`, when configured.
    pub admin: Option<TcpListener>,
    /// The admission webhook, when configured.
    pub webhook: Option<std::net::TcpListener>,
    /// The peer channel, when `peers:` is configured.
    pub peers: Option<TcpListener>,
    /// Vault's change feed, when `vault.changeFeed:` is configured.
    pub change_feed: Option<TcpListener>,
}

/// Health service name that reports whether the last policy reload worked.
pub const POLICY_HEALTH_SERVICE: &str = "tessera.v1.Broker/policy";
/// Health service name that reports whether Vault answers the broker.
pub const VAULT_HEALTH_SERVICE: &str = "tessera.v1.Broker/vault";

/// The webhook's view of KV secrets: the keys of the feed's last good read.
fn kv_keys(feeds: Arc<Feeds>) -> webhook::KvKeysLookup {
    Box::new(move |source| {
        feeds
            .latest(source)
            .map(|fed| fed.secret.fields.keys().cloned().collect())
    })
}

/// Builds the Kubernetes client from the kubeconfig, or in-cluster.
///
/// # Errors
/// [`StartError::Kubernetes`] naming the file or the missing environment.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, StartError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| StartError::Kubernetes(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| StartError::Kubernetes(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            StartError::Kubernetes(format!(
                "in-cluster configuration: {e} (set kubernetes.kubeconfig outside a cluster)"
            ))
        })?,
    };
    kube::Client::try_from(config).map_err(|e| StartError::Kubernetes(e.to_string()))
}

/// Loads the identity source, policy, TLS identity, audit log and Vault client
/// named by `config`, and sets up (without starting) the tasks that follow
/// them; [`spawn`] starts them. Call it after installing the ring rustls
/// provider as the process default.
///
/// # Errors
/// A [`StartError`] naming the file or setting at fault.
pub async fn prepare(
    mut config: Config,
    shutdown: &CancellationToken,
) -> Result<Prepared, StartError> {
    let mut tasks = Tasks::default();
    let discovers_peers = config.peers.as_ref().is_some_and(|peers| {
        matches!(peers.addresses, peers::PeerAddresses::EndpointSlices { .. })
    });
    let kube = if config.identity.needs_kubernetes()
        || config.bootstrap.is_some()
        || discovers_peers
        || config.policy_resources
        || config.drift.is_some()
    {
        Some(kube_client(config.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    if let (Some(settings), Some(client)) = (&config.bootstrap, &kube) {
        if let Some(keys) = bootstrap::materialize(client, settings).await? {
            config.handle_key_file = Some(keys.current);
            config.retired_handle_key_files = keys.accepted;
        }
        tasks.add(
            "bootstrap Secret follower",
            bootstrap::follow(client.clone(), settings.clone(), shutdown.clone()),
        );
    }
    let id = &config.identity;
    let source = match (&id.source, &kube) {
        (IdentitySource::JwksFile(path), _) => identity::Source::JwksFile(JwksFile::load(path)?),
        (IdentitySource::OidcDiscovery, Some(client)) => identity::Source::Oidc(
            OidcKeys::discover(client.clone(), &id.issuer, id.key_refresh_interval).await?,
        ),
        (IdentitySource::TokenReview, Some(client)) => {
            identity::Source::TokenReview(client.clone())
        }
        (_, None) => return Err(StartError::Kubernetes("no Kubernetes client".to_owned())),
    };
    let mut verifier = Verifier::new(
        source,
        Expectations {
            issuer: id.issuer.clone(),
            audiences: id.audiences.clone(),
            leeway: id.leeway,
        },
    )
    .with_cache_ttl(id.cache_ttl);
    if let (true, Some(client)) = (id.pod_lookup, &kube) {
        verifier = verifier.with_pod_lookup(client.clone());
    }
    let resources = match (&kube, config.policy_resources) {
        (Some(client), true) => policy_resources::list(client).await.map_err(|e| {
            StartError::Kubernetes(format!(
                "policy.resources: listing ClusterAccessPolicy and AccessBinding resources: {e} (are the chart's CRDs installed, and may the broker list them?)"
            ))
        })?,
        _ => Vec::new(),
    };
    let policy = Arc::new(PolicyStore::load_with(
        config.policy_paths.clone(),
        &config.cluster,
        resources,
    )?);
    if let (Some(client), true) = (&kube, config.policy_resources) {
        tasks.add(
            "policy resource follower",
            policy_resources::follow(client.clone(), policy.clone(), shutdown.clone()),
        );
    }
    let loaded = policy.current();
    tracing::info!(
        bindings = loaded.policy.bindings.len(),
        files = loaded.policy.files.len(),
        "policy loaded"
    );
    tasks.add(
        "policy follower",
        policy
            .clone()
            .follow(config.policy_reload_interval, shutdown.clone()),
    );
    let (tls, cert) = tls::server_config(&config.tls)?;
    tasks.add(
        "certificate follower",
        cert.follow(config.tls_reload_interval, shutdown.clone()),
    );
    let metrics = Arc::new(metrics::Metrics::new());
    if let (Some(client), true) = (&kube, config.policy_resources) {
        tasks.add(
            "policy resource status writer",
            policy_resources::write_status(
                client.clone(),
                (policy.clone(), metrics.clone()),
                shutdown.clone(),
            ),
        );
    }
    let vault = Arc::new(Vault::new(config.vault.clone(), metrics.clone())?);
    let peers = config
        .peers
        .as_ref()
        .map(|settings| Arc::new(peers::Peers::new(settings.advertise.clone())));
    let feeds = Feeds::new(
        vault.clone(),
        config.kv_poll_interval,
        tasks.spawner(),
        shutdown.clone(),
    );
    let feeds = match &peers {
        Some(peers) => feeds.shared_with(peers.clone()),
        None => feeds,
    };
    let change_feed = config.change_feed.as_ref().map(|settings| {
        Arc::new(feed::ChangeFeedState::new(
            settings.backstop,
            &config.leases.record_mount,
        ))
    });
    let feeds = Arc::new(match &change_feed {
        Some(state) => feeds.with_change_feed(state.clone()),
        None => feeds,
    });
    let webhook = match &config.webhook {
        None => None,
        Some(settings) => {
            let mode = settings.injection.mode;
            let client = match (&kube, mode) {
                (Some(client), _) => Some(client.clone()),
                (None, webhook::SidecarMode::Auto) => {
                    Some(kube_client(config.kubeconfig.as_deref()).await?)
                }
                (None, _) => None,
            };
            let mode = webhook::resolve_mode(mode, client.as_ref()).await;
            let (tls, cert) = tls::server_config(&settings.tls)?;
            tasks.add(
                "webhook certificate follower",
                cert.follow(config.tls_reload_interval, shutdown.clone()),
            );
            Some(webhook::Server {
                webhook: Arc::new(webhook::Webhook::new(
                    settings.injection.clone(),
                    mode,
                    policy.clone(),
                    metrics.clone(),
                    kv_keys(feeds.clone()),
                )),
                tls,
            })
        }
    };
    tasks.add(
        "KV warmer",
        feed::keep_warm(policy.clone(), feeds.clone(), shutdown.clone()),
    );
    let audit = Arc::new(
        audit::Audit::open(&config.audit, &config.cluster).map_err(|source| StartError::Audit {
            target: format!("{:?}", config.audit),
            source,
        })?,
    );
    let limiter = Arc::new(ratelimit::Limiter::new(config.rate_limit));
    let handle_key = Arc::new(match &config.handle_key_file {
        Some(path) => handle::HandleKey::load_rotated(path, &config.retired_handle_key_files)?,
        None => {
            tracing::warn!(
                "leases.handleKeyFile is not set: lease handles are sealed with a per-process key, so they do not survive a broker restart or work across replicas"
            );
            handle::HandleKey::generate()?
        }
    });
    tasks.add(
        "rate-limit cleaner",
        forget_idle_callers(limiter.clone(), shutdown.clone()),
    );
    let engine = Arc::new(lease::Engine::new(
        vault.clone(),
        handle_key,
        feeds.clone(),
        config.leases.clone(),
        audit,
        metrics.clone(),
        tasks.spawner(),
        shutdown.clone(),
    ));
    let verifier = Arc::new(verifier);
    let reconciler = lease::reconcile::Reconciler::new(engine.clone(), verifier.clone());
    let reconciler = Arc::new(match &peers {
        Some(peers) => reconciler.shared_with(peers.clone()),
        None => reconciler,
    });
    // A deleted pod's leases are revoked at once where the broker may see
    // pods; the sweep is the backstop everywhere.
    if let (true, Some(client)) = (config.identity.pod_lookup, &kube) {
        tasks.add(
            "pod watch",
            reconciler
                .clone()
                .follow_deletions(client.clone(), shutdown.clone()),
        );
    }
    if let Some(settings) = &config.drift {
        let parts = drift::DriftParts {
            policy: policy.clone(),
            vault: vault.clone(),
            records: lease::records::Records::new(
                vault.clone(),
                config.leases.record_mount.clone(),
                config.cluster.clone(),
            ),
            kube: kube.clone(),
            peers: peers.clone(),
            metrics: metrics.clone(),
        };
        tasks.add(
            "drift check",
            drift::follow(parts, settings.clone(), shutdown.clone()),
        );
    }
    let service = BrokerService::new(service::Parts {
        metrics: metrics.clone(),
        verifier,
        policy: policy.clone(),
        engine,
        feeds: feeds.clone(),
        limiter,
        shutdown: shutdown.clone(),
        streams: tasks.spawner(),
    });
    Ok(Prepared {
        config,
        tasks,
        tls,
        policy,
        vault,
        metrics,
        reconciler,
        service,
        webhook,
        feeds,
        peers,
        change_feed,
        kube,
    })
}

/// Drops idle rate-limit buckets once a minute so memory follows the live fleet.
async fn forget_idle_callers(limiter: Arc<ratelimit::Limiter>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => limiter.forget_idle(),
        }
    }
}

/// Installs ring as the process-wide rustls provider (idempotent). Call it
/// before building any TLS client or server, including the Vault client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
