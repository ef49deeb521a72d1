//! Prometheus metrics and the admin HTTP endpoints (`/metrics`, `/livez`,
//! `/readyz`). Label values are bounded: binding names come from the policy
//! (a denied request's binding is not a label: it is caller input), never pod
//! names (those are in the audit log).

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{Action, Event, Outcome},
    listener::{ConnectionLimits, Gate, Guarded},
};

/// Labels of `tessera_credential_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    action: &'static str,
    outcome: &'static str,
    binding: String,
}

/// Labels naming an RPC, e.g. `rpc="Fetch"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

/// Labels naming a Vault operation (the request type: bounded by the code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// Labels naming a binding from the policy (bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindingLabels {
    binding: String,
}

/// Counts one Watch stream's leases in `tessera_active_leases` and takes
/// them out again when dropped (the stream ended).
pub struct LeaseTracker {
    family: Family<BindingLabels, Gauge>,
    counted: BTreeSet<String>,
}

impl LeaseTracker {
    /// Makes the stream's count follow the bindings it now holds leases for.
    pub fn set<'a>(&mut self, bindings: impl Iterator<Item = &'a String>) {
        let now: BTreeSet<String> = bindings.cloned().collect();
        for gone in self.counted.difference(&now) {
            self.family
                .get_or_create(&BindingLabels {
                    binding: gone.clone(),
                })
                .dec();
        }
        for new in now.difference(&self.counted) {
            self.family
                .get_or_create(&BindingLabels {
                    binding: new.clone(),
                })
                .inc();
        }
        self.counted = now;
    }
}

impl Drop for LeaseTracker {
    fn drop(&mut self) {
        self.set(std::iter::empty());
    }
}

/// Labels of `tessera_admission_reviews_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

/// Labels of `tessera_lease_sweeps_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SweepLabels {
    /// `full` (every record read) or `light`.
    kind: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. about 4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Observes the time from its creation to its drop into an RPC histogram.
pub struct TimedFamily<'a> {
    family: &'a Histograms<RpcLabels>,
    labels: RpcLabels,
    started: Instant,
}

impl Drop for TimedFamily<'_> {
    fn drop(&mut self) {
        self.family
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The broker's Prometheus registry and every metric it reports.
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    rpc_duration: Histograms<RpcLabels>,
    vault_duration: Histograms<OperationLabels>,
    vault_errors: Family<OperationLabels, Counter>,
    /// The generation of the policy in force (1 at start, +1 per change).
    pub policy_generation: Gauge,
    /// 1 while the last policy reload failed.
    pub policy_reload_failing: Gauge,
    /// 1 while Vault answers.
    pub vault_up: Gauge,
    /// 1 while Vault's change feed (its audit device) reaches this replica;
    /// 0 when it went silent and KV secrets are polled at the short interval.
    pub change_feed_up: Gauge,
    /// KV secrets read again at once because the change feed named them.
    pub change_feed_rereads: Counter,
    /// Canary requests this replica sent to check Vault's change feed.
    pub change_feed_canaries: Counter,
    /// `Watch` streams open on this replica.
    pub watch_streams: Gauge,
    /// Lease records left alone because this replica cannot open or
    /// attribute them (sealed under an unknown key, another cluster's).
    pub lease_records_left_alone: Counter,
    /// `ClusterAccessPolicy` and `AccessBinding` resources whose newest
    /// generation is rejected.
    pub policy_resources_rejected: Gauge,
    drift: [Gauge; 4],
    admission_reviews: Family<DecisionLabels, Counter>,
    admission_duration: Histogram,
    lease_sweeps: Family<SweepLabels, Counter>,
    active_leases: Family<BindingLabels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "credential_events",
            "Credential decisions by action (authenticate, issue, renew, rotate, revoke), outcome and binding",
            events.clone(),
        );
        let rpc_duration: Histograms<RpcLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a unary RPC, or to open a Watch stream",
            rpc_duration.clone(),
        );
        let vault_duration: Histograms<OperationLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "vault_request_duration_seconds",
            "Time of Vault requests by operation",
            vault_duration.clone(),
        );
        let vault_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "vault_request_errors",
            "Failed Vault requests by operation",
            vault_errors.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Generation of the policy in force",
            policy_generation.clone(),
        );
        let policy_reload_failing = Gauge::default();
        registry.register(
            "policy_reload_failing",
            "1 while the last policy reload failed (the previous policy stays in force)",
            policy_reload_failing.clone(),
        );
        let vault_up = Gauge::default();
        registry.register(
            "vault_up",
            "1 while Vault answers the broker",
            vault_up.clone(),
        );
        let change_feed_up = Gauge::default();
        registry.register(
            "change_feed_up",
            "1 while Vault's change feed reaches this replica (0: silent, polling at the short interval)",
            change_feed_up.clone(),
        );
        let change_feed_rereads = Counter::default();
        registry.register(
            "change_feed_rereads",
            "KV secrets read again at once because Vault's change feed named them",
            change_feed_rereads.clone(),
        );
        let change_feed_canaries = Counter::default();
        registry.register(
            "change_feed_canaries",
            "Canary requests this replica sent to check that Vault's change feed arrives (among peers, one replica sends them)",
            change_feed_canaries.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register("watch_streams", "Open Watch streams", watch_streams.clone());
        let lease_records_left_alone = Counter::default();
        registry.register(
            "lease_records_left_alone",
            "Lease records a sweep found but left alone, neither revoked nor deleted: sealed under a key this replica does not hold (the log names each path)",
            lease_records_left_alone.clone(),
        );
        let lease_sweeps = Family::<SweepLabels, Counter>::default();
        registry.register(
            "lease_sweeps",
            "Sweeps of this cluster's lease records that completed, by kind (light: pods that ended; full: every record)",
            lease_sweeps.clone(),
        );
        let active_leases = Family::<BindingLabels, Gauge>::default();
        registry.register(
            "active_leases",
            "Leases (database users, certificates) held by open Watch streams and kept renewed, by binding",
            active_leases.clone(),
        );
        let policy_resources_rejected = Gauge::default();
        registry.register(
            "policy_resources_rejected",
            "ClusterAccessPolicy and AccessBinding resources whose newest generation is rejected (their status says why)",
            policy_resources_rejected.clone(),
        );
        let drift: [Gauge; 4] = Default::default();
        for (gauge, (name, help)) in drift.iter().zip([
            ("drift_pods_without_sidecar", "Pods in opted-in namespaces that ask for the sidecar and run without it, at the last drift check"),
            ("drift_orphaned_leases", "Leases in Vault under the policy's sources that no lease record owns, at the last drift check"),
            ("drift_records_without_lease", "Lease records of live leases that Vault no longer knows, at the last drift check"),
            ("drift_unchecked", "Parts the last drift check could not check (permissions, an unreachable API server or Vault; the log says which)"),
        ]) {
            registry.register(name, help, gauge.clone());
        }
        let admission_reviews = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "admission_reviews",
            "Pod admission reviews answered, by decision (injected, skipped, denied, error)",
            admission_reviews.clone(),
        );
        let admission_duration = latency_histogram();
        registry.register(
            "admission_duration_seconds",
            "Time to answer a pod admission review",
            admission_duration.clone(),
        );
        Self {
            registry,
            events,
            rpc_duration,
            vault_duration,
            vault_errors,
            policy_generation,
            policy_reload_failing,
            vault_up,
            change_feed_up,
            change_feed_rereads,
            change_feed_canaries,
            watch_streams,
            lease_records_left_alone,
            policy_resources_rejected,
            drift,
            admission_reviews,
            admission_duration,
            lease_sweeps,
            active_leases,
            ready: AtomicBool::new(false),
        }
    }

    /// What the last drift check found: pods without the sidecar, orphaned
    /// leases, records without a lease, and parts not checked.
    pub fn set_drift(&self, found: [usize; 4]) {
        for (gauge, count) in self.drift.iter().zip(found) {
            gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Counts an audit event.
    pub fn record(&self, event: &Event) {
        // A denied request's binding is caller input: not a label.
        let binding = match event.outcome {
            Some(Outcome::Denied) => None,
            _ => event.binding.clone(),
        };
        self.events
            .get_or_create(&EventLabels {
                action: event.action.map_or("-", Action::as_str),
                outcome: event.outcome.map_or("-", Outcome::as_str),
                binding: binding.unwrap_or_else(|| "-".to_owned()),
            })
            .inc();
    }

    /// Times an RPC until the returned guard drops.
    pub fn time_rpc(&self, rpc: &'static str) -> TimedFamily<'_> {
        TimedFamily {
            family: &self.rpc_duration,
            labels: RpcLabels { rpc },
            started: Instant::now(),
        }
    }

    /// Records one Vault request of `operation` (a request type name).
    pub fn vault_request(&self, operation: &'static str, seconds: f64, failed: bool) {
        let labels = OperationLabels { operation };
        self.vault_duration.get_or_create(&labels).observe(seconds);
        if failed {
            self.vault_errors.get_or_create(&labels).inc();
        }
    }

    /// A tracker for one Watch stream's leases.
    pub fn lease_tracker(&self) -> LeaseTracker {
        LeaseTracker {
            family: self.active_leases.clone(),
            counted: BTreeSet::new(),
        }
    }

    /// Records one admission review and its decision.
    pub fn admission(&self, decision: &'static str, seconds: f64) {
        self.admission_reviews
            .get_or_create(&DecisionLabels { decision })
            .inc();
        self.admission_duration.observe(seconds);
    }

    /// Counts a completed sweep of the lease records.
    pub fn sweep(&self, full: bool) {
        let kind = if full { "full" } else { "light" };
        self.lease_sweeps.get_or_create(&SweepLabels { kind }).inc();
    }

    /// Whether this replica can serve: started, not shutting down (Vault's
    /// state is `vault_up`, not readiness).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics_text(
    State(m): State<Arc<Metrics>>,
) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or shutting down\n",
        )
    }
}

/// Serves `/metrics`, `/livez` and `/readyz` on `listener` until `shutdown`.
///
/// # Errors
/// When the server fails (the broker then stops: probes need it).
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let gate = Gate::new("admin", ConnectionLimits::default());
    let listener = GatedListener {
        inner: listener,
        gate: gate.clone(),
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()) => served,
        error = gate.broken() => Err(error),
    }
}

/// The admin listener for axum: connections within the gate's limits, accept
/// errors through it (backing off; pending for good once the socket is gone,
/// which ends [`serve_admin`] with the gate's error).
struct GatedListener {
    inner: TcpListener,
    gate: Gate,
}

impl axum::serve::Listener for GatedListener {
    type Io = Guarded<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    if let Some(stream) = self.gate.admit(stream) {
                        return (stream, peer);
                    }
                }
                Err(error) => {
                    self.gate.accept_failed(&error);
                    if self.gate.is_broken() {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
