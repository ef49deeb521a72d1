//! The broker, running: [`spawn`] starts the servers (gRPC, webhook, admin)
//! and every loop [`prepare`](crate::prepare) set up on one tracker; the
//! returned [`Running`] reports the first part to end and drains them all at
//! shutdown, in one documented order.

use std::sync::Arc;

use tessera_proto::v1::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    Listeners, POLICY_HEALTH_SERVICE, Prepared, StartError, VAULT_HEALTH_SERVICE, change_feed,
    listener, metrics, peers, policy::store::PolicyStore, service, tasks, tasks::Tasks, tls,
    vault::Vault,
};

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
    if let (Some(listener), Some(settings), Some(peers)) = (
        listeners.peers,
        prepared.config.peers.clone(),
        prepared.peers.clone(),
    ) {
        let limits = prepared.config.connections;
        tasks.add_fallible(
            "peer server",
            peers::serve_peers(
                listener,
                settings.clone(),
                prepared.feeds.clone(),
                (limits, tasks.spawner()),
                shutdown.clone(),
            ),
        );
        tasks.add_fallible(
            "peer followers",
            peers::follow_peers(
                settings,
                (peers, prepared.feeds.clone()),
                prepared.kube.clone(),
                tasks.spawner(),
                shutdown.clone(),
            ),
        );
    }
    if let (Some(listener), Some(settings), Some(state)) = (
        listeners.change_feed,
        prepared.config.change_feed.clone(),
        prepared.change_feed.clone(),
    ) {
        tasks.add_fallible(
            "Vault change feed",
            change_feed::serve_change_feed(
                listener,
                settings,
                (prepared.feeds.clone(), state),
                (
                    prepared.vault.clone(),
                    prepared.config.leases.record_mount.clone(),
                ),
                prepared.metrics.clone(),
                shutdown.clone(),
            ),
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
        .http2_keepalive_interval(Some(listener::HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(listener::HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(listener::MAX_STREAMS_PER_CONNECTION))
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
    // The accept loop ends the incoming stream when the socket is gone, and
    // the server may notice that first.
    if gate.is_broken() {
        return Err(StartError::Listener(gate.broken().await));
    }
    Ok(())
}

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
