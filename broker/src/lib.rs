//! Tessera broker: verifies a pod's projected service-account token, looks the
//! identity up in the access policy (deny by default) and serves the granted
//! credentials from Vault over gRPC (`tessera.v1.Broker`), with TLS 1.3.
//!
//! [`run`] serves on a listener it is given until a cancellation token fires,
//! so tests start a real broker in-process or as a process alike.

pub mod audit;
pub mod bootstrap;
pub mod clock;
pub mod config;
pub mod dev;
pub mod error;
pub mod feed;
#[cfg(test)]
mod fuzz;
pub mod handle;
pub mod identity;
pub mod lease;
pub mod lease_id;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod secret;
pub mod service;
pub mod tasks;
pub mod text;
pub mod tls;
pub mod vault;
pub mod webhook;

use std::sync::Arc;

use tessera_proto::v1::broker_server::BrokerServer;
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
        /// The configured target.
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
}

/// The ports the broker serves, bound by the caller.
pub struct Listeners {
    /// The gRPC API.
    pub grpc: TcpListener,
    /// `/metrics`, `/livez`, `/readyz`, when configured.
    pub admin: Option<TcpListener>,
    /// The admission webhook, when configured.
    pub webhook: Option<std::net::TcpListener>,
}

/// Health service name that reports whether the last policy reload worked.
pub const POLICY_HEALTH_SERVICE: &str = "tessera.v1.Broker/policy";
/// Health service name that reports whether Vault answers the broker.
pub const VAULT_HEALTH_SERVICE: &str = "tessera.v1.Broker/vault";

/// Keeps the health statuses and gauges in step. Readiness means "this
/// replica can serve": the Broker service (and `""`) is SERVING, and
/// `/readyz` answers 200, from start until shutdown, whatever Vault does: a
/// Vault outage must not empty the Service (the webhook would then refuse
/// every pod, and sidecars lose what the broker still serves). Vault's state
/// is its own health service, the `tessera_vault_up` gauge and an alert; the
/// last policy reload's is another.
async fn report_health(
    policy: Arc<PolicyStore>,
    vault: Arc<Vault>,
    metrics: Arc<metrics::Metrics>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    health
        .set_service_status("tessera.v1.Broker", Serving)
        .await;
    health.set_service_status("", Serving).await;
    metrics.set_ready(true);
    let (mut last_policy, mut last_vault) = (None, None);
    loop {
        let failing = policy.last_error().is_some();
        metrics.policy_reload_failing.set(i64::from(failing));
        metrics
            .policy_generation
            .set(i64::try_from(policy.current().generation).unwrap_or(i64::MAX));
        let status = if failing { NotServing } else { Serving };
        if last_policy != Some(status) {
            health
                .set_service_status(POLICY_HEALTH_SERVICE, status)
                .await;
            last_policy = Some(status);
        }
        let up = vault.reachable().await;
        metrics.vault_up.set(i64::from(up));
        let status = if up { Serving } else { NotServing };
        if last_vault != Some(status) {
            health
                .set_service_status(VAULT_HEALTH_SERVICE, status)
                .await;
            last_vault = Some(status);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
    // Draining: the Service stops sending new callers here.
    metrics.set_ready(false);
    health
        .set_service_status("tessera.v1.Broker", NotServing)
        .await;
    health.set_service_status("", NotServing).await;
}

/// Builds the Kubernetes client from the kubeconfig, or in-cluster.
/// The webhook's view of KV secrets: the keys of the feed's last good read.
fn kv_keys(feeds: Arc<Feeds>) -> webhook::KvKeysLookup {
    Box::new(move |source| {
        feeds
            .latest(source)
            .map(|fed| fed.secret.fields.keys().cloned().collect())
    })
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, StartError> {
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
    let kube = if config.identity.needs_kubernetes() || config.bootstrap.is_some() {
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
    let policy = Arc::new(PolicyStore::load(
        config.policy_paths.clone(),
        &config.cluster,
    )?);
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
    let vault = Arc::new(Vault::new(config.vault.clone(), metrics.clone())?);
    let feeds = Arc::new(Feeds::new(
        vault.clone(),
        config.kv_poll_interval,
        tasks.spawner(),
        shutdown.clone(),
    ));
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
    let reconciler = Arc::new(lease::reconcile::Reconciler::new(
        engine.clone(),
        verifier.clone(),
    ));
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
    let service = BrokerService::new(service::Parts {
        metrics: metrics.clone(),
        verifier,
        policy: policy.clone(),
        engine,
        feeds,
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
    })
}

/// How often the broker pings each HTTP/2 connection.
pub const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most concurrent RPCs (streams) on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The broker, running: its tasks, watched and drained.
pub struct Running {
    tasks: Tasks,
}

impl Running {
    /// The first task to end. Before shutdown, any ending is a failure:
    /// the caller stops the process with it.
    pub async fn ended(&mut self) -> tasks::Ended {
        self.tasks.ended().await
    }

    /// Shuts down (once `shutdown` is cancelled), in this order: the
    /// servers stop accepting and end their streams with `SHUTTING_DOWN`
    /// (sidecars reconnect to another replica), the loops stop, then the
    /// short-lived tasks end: connections close, KV pollers stop and
    /// revocations in flight finish (the caller bounds it all by the
    /// shutdown grace; revocations that only wait for an overlap are left to
    /// Vault). Returns the tasks that failed on the way out.
    pub async fn drain(mut self) -> Vec<tasks::Ended> {
        self.tasks.drain().await
    }
}

/// Starts the broker on `listeners`: the servers (gRPC, and the webhook
/// and admin endpoints when given) and every task [`prepare`] set up, in
/// one tracker, until `shutdown`.
pub fn spawn(mut prepared: Prepared, listeners: Listeners, shutdown: CancellationToken) -> Running {
    let mut tasks = std::mem::take(&mut prepared.tasks);
    let (health, health_service) = tonic_health::server::health_reporter();
    tasks.add(
        "health reporter",
        report_health(
            prepared.policy.clone(),
            prepared.vault.clone(),
            prepared.metrics.clone(),
            health,
            shutdown.clone(),
        ),
    );
    tasks.add(
        "lease sweep",
        prepared.reconciler.clone().run(
            prepared.config.leases.sweep_interval,
            prepared.config.leases.full_sweep_interval,
            shutdown.clone(),
        ),
    );
    if let Some(listener) = listeners.admin {
        tasks.add_fallible(
            "admin server",
            metrics::serve_admin(listener, prepared.metrics.clone(), shutdown.clone()),
        );
    }
    if let (Some(listener), Some(webhook)) = (listeners.webhook, prepared.webhook.take()) {
        let limits = prepared.config.connections;
        tasks.add_fallible(
            "webhook server",
            webhook.serve(listener, limits, shutdown.clone()),
        );
    }
    let handshakes = tasks.spawner();
    tasks.add_fallible(
        "gRPC server",
        serve_grpc(
            prepared,
            health_service,
            listeners.grpc,
            handshakes,
            shutdown,
        ),
    );
    tasks.start();
    Running { tasks }
}

/// Serves gRPC (Broker, health, reflection) on `listener` until `shutdown`.
async fn serve_grpc(
    prepared: Prepared,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    listener: TcpListener,
    handshakes: tasks::Spawner,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // Reflection v1 and v1alpha: grpcurl and older clients (grpcio's) ask
    // for the latter.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| tracing::error!(error = %e, "reflection descriptor is invalid"))
        .ok();
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| tracing::error!(error = %e, "reflection descriptor is invalid"))
        .ok();
    tracing::info!(
        address = %listener.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string()),
        audiences = ?prepared.config.identity.audiences,
        "broker listening (TLS 1.3)"
    );
    let gate = listener::Gate::new("grpc", prepared.config.connections);
    let incoming = tls::incoming(
        listener,
        prepared.tls,
        gate.clone(),
        handshakes,
        shutdown.clone(),
    );
    let serving = tonic::transport::Server::builder()
        .layer(service::RpcLayer::new(prepared.metrics.clone()))
        // Dead peers are found by keepalive pings; live ones answer them,
        // which also keeps them clear of the idle timeout.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .max_connection_age(prepared.config.connections.max_age)
        .max_connection_age_grace(listener::MAX_AGE_GRACE)
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(BrokerServer::new(prepared.service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned());
    tokio::select! {
        served = serving => served?,
        error = gate.broken() => return Err(StartError::Listener(error)),
    }
    Ok(())
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
