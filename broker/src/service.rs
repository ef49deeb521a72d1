//! The `tessera.v1.Broker` gRPC service: authenticate, rate-limit, authorize,
//! fetch, stream, and audit every decision.

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt, future::join_all};
use tessera_proto::v1::{
    Credential, FetchRequest, FetchResponse, Held, Identity as ProtoIdentity, RevokeRequest,
    RevokeResponse, WatchRequest, WatchResponse, WhoAmIRequest, WhoAmIResponse,
    broker_server::Broker,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    audit::{Action, Audit, Event, Outcome},
    error::{Error, printable},
    feed::{Feeds, Latest},
    identity::{Identity, Verifier},
    lifecycle::{self, Lifecycle, Live, Step},
    metrics::Metrics,
    policy::{Binding, Source, store::PolicyStore},
    ratelimit::Limiter,
    secret::Secret,
    vault::KvSecret,
};

/// Most bindings one request may name, and most lease handles one Revoke may carry.
const MAX_BINDINGS_PER_REQUEST: usize = 64;
/// Most open `Watch` streams one pod may hold on one leased binding: each
/// holds a live lease (a database user), so a pod cannot mint without bound.
/// A few allow for a reconnect racing the old stream's end.
pub const MAX_STREAMS_PER_POD_BINDING: usize = 4;

/// What the service is built from.
pub struct Parts {
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The live policy.
    pub policy: Arc<PolicyStore>,
    /// Issues, renews, rotates and revokes credentials.
    pub lifecycle: Arc<Lifecycle>,
    /// Shared change feeds for `Watch`.
    pub feeds: Arc<Feeds>,
    /// The audit trail.
    pub audit: Arc<Audit>,
    /// Per-identity rate limits.
    pub limiter: Arc<Limiter>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Ends open streams on shutdown.
    pub shutdown: CancellationToken,
}

/// The broker service; cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    parts: Arc<Parts>,
    /// Open `Watch` streams per pod and leased binding.
    streams: Arc<Mutex<HashMap<(String, String), usize>>>,
}

/// A request's verified identity and where it came from.
struct Caller {
    identity: Identity,
    peer: Option<String>,
}

impl BrokerService {
    /// A service over its parts.
    pub fn new(parts: Parts) -> Self {
        Self {
            parts: Arc::new(parts),
            streams: Arc::default(),
        }
    }

    /// Counts a new `Watch` stream of the caller's pod on each leased
    /// binding; refused past [`MAX_STREAMS_PER_POD_BINDING`]. Tokens that
    /// name no pod are not counted (their rate limit still applies).
    fn open_streams(
        &self,
        caller: &Caller,
        bindings: &[Arc<Binding>],
    ) -> Result<StreamSlots, Status> {
        let mut slots = StreamSlots {
            counts: self.streams.clone(),
            keys: Vec::new(),
        };
        let Some(pod) = &caller.identity.pod else {
            return Ok(slots);
        };
        let mut counts = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        for binding in bindings.iter().filter(|b| b.source.is_leased()) {
            let key = (pod.uid.clone(), binding.name.clone());
            let count = counts.entry(key.clone()).or_default();
            if *count >= MAX_STREAMS_PER_POD_BINDING {
                drop(counts);
                let error = Error::TooManyStreams {
                    binding: binding.name.clone(),
                    limit: MAX_STREAMS_PER_POD_BINDING,
                };
                let mut event = Event::new(Action::Issue, Outcome::Denied, Some(&caller.identity));
                event.binding = Some(binding.name.clone());
                event.reason = Some(error.to_string());
                event.peer = caller.peer.clone();
                self.audit(event);
                return Err(log_failure(error));
            }
            *count += 1;
            slots.keys.push(key);
        }
        Ok(slots)
    }

    fn audit(&self, event: Event) {
        self.parts.metrics.record(&event);
        self.parts.audit.record(&event);
    }

    /// Verifies the bearer token, applies the rate limit, and records the
    /// identity on the current span. Refusals are audited.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let peer = request.remote_addr().map(|a| a.to_string());
        let verified = match bearer(request) {
            Ok(token) => self
                .parts
                .verifier
                .verify(&token)
                .instrument(tracing::info_span!("verify_token"))
                .await
                .map_err(Error::from),
            Err(error) => Err(error),
        };
        let identity = verified.map_err(|error| {
            let mut event = Event::new(Action::Authenticate, Outcome::Denied, None);
            event.reason = Some(error.to_string());
            event.peer = peer.clone();
            self.audit(event);
            log_failure(error)
        })?;
        let span = tracing::Span::current();
        span.record("namespace", identity.namespace.as_str());
        span.record("service_account", identity.service_account.as_str());
        if let Some(pod) = &identity.pod {
            span.record("pod", pod.name.as_str());
        }
        if let Err(retry_after) = self.parts.limiter.check(&identity) {
            let error = Error::RateLimited { retry_after };
            let mut event = Event::new(Action::Authenticate, Outcome::Denied, Some(&identity));
            event.reason = Some(error.to_string());
            event.peer = peer;
            self.audit(event);
            return Err(log_failure(error));
        }
        Ok(Caller { identity, peer })
    }

    /// The bindings named in a request, each granted to the caller, all from
    /// one policy generation. A denial is audited.
    fn authorize(
        &self,
        caller: &Caller,
        names: &[String],
    ) -> Result<(u64, Vec<Arc<Binding>>), Status> {
        let _span = tracing::info_span!("policy", bindings = names.len()).entered();
        let loaded = self.parts.policy.current();
        let result = check_names(names).and_then(|()| {
            names
                .iter()
                .map(|name| {
                    loaded
                        .policy
                        .lookup(&caller.identity, name)
                        .map(|b| Arc::new(b.clone()))
                        .ok_or_else(|| Error::Denied {
                            binding: printable(name),
                            namespace: caller.identity.namespace.clone(),
                            service_account: caller.identity.service_account.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        });
        result.map(|b| (loaded.generation, b)).map_err(|error| {
            let mut event = Event::new(Action::Issue, Outcome::Denied, Some(&caller.identity));
            if let Error::Denied { binding, .. } = &error {
                event.binding = Some(binding.clone());
            }
            event.reason = Some(error.to_string());
            event.peer = caller.peer.clone();
            event.policy_generation = Some(loaded.generation);
            self.audit(event);
            log_failure(error)
        })
    }

    /// Revokes `live` in Vault for `identity` and audits the outcome, with
    /// `reason`; a failure is logged (the lease then ends by its TTL).
    async fn revoke_audited(
        &self,
        live: &Live,
        identity: &Identity,
        reason: &str,
        peer: Option<String>,
    ) {
        let outcome = self.parts.lifecycle.revoke(live, identity).await;
        if let Err(error) = &outcome {
            tracing::warn!(binding = %live.binding.name, %error, reason, "revocation failed; the lease ends by its TTL");
        }
        let mut event = Event::new(
            Action::Revoke,
            if outcome.is_ok() {
                Outcome::Success
            } else {
                Outcome::Error
            },
            Some(identity),
        );
        event.binding = Some(live.binding.name.clone());
        event.source = Some(live.binding.source.to_string());
        event.version = Some(live.version.clone());
        event.reason = Some(reason.to_owned());
        event.peer = peer;
        if let Some(lease) = &live.lease {
            event.lease_id_sha256 = Some(lifecycle::lease_digest(lease));
        }
        self.audit(event);
    }

    fn audit_delivery(
        &self,
        caller: &Caller,
        action: Action,
        live: &Live,
        generation: Option<u64>,
    ) {
        let mut event = Event::new(action, Outcome::Success, Some(&caller.identity));
        event.binding = Some(live.binding.name.clone());
        event.source = Some(live.binding.source.to_string());
        event.version = Some(live.version.clone());
        event.peer = caller.peer.clone();
        event.policy_generation = generation;
        if let (Source::Database(_), Some(lease)) = (&live.binding.source, &live.lease) {
            event.lease_id_sha256 = Some(lifecycle::lease_digest(lease));
        }
        if let Some(not_after) = live.not_after {
            event.ttl_seconds = Some(
                not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs(),
            );
        }
        self.audit(event);
    }

    /// Resumes what the caller holds, or issues anew, for every binding (all
    /// or nothing) and audits the outcome. What was issued comes with an
    /// [`Undelivered`] guard: the caller disarms it once the credentials are on
    /// their way; dropped armed (the request failed, or its task panicked), it
    /// revokes the leases nobody received.
    #[tracing::instrument(name = "deliver", skip_all, fields(bindings = bindings.len()))]
    async fn deliver_all(
        &self,
        caller: &Caller,
        generation: u64,
        bindings: &[Arc<Binding>],
        held: &[Held],
    ) -> Result<(Vec<(Live, Credential)>, Undelivered), Status> {
        let lifecycle = &self.parts.lifecycle;
        // Every binding runs to its end (no early cancel), so each lease
        // Vault minted is known and can be revoked if another binding fails.
        let results = join_all(bindings.iter().map(|binding| async move {
            let handle = held.iter().find(|h| h.binding == binding.name);
            if let Some(handle) = handle
                && let Some((live, credential)) = lifecycle
                    .resume(binding, &caller.identity, &handle.handle)
                    .await?
            {
                return Ok::<_, Error>((live, credential, true));
            }
            let (live, credential) = lifecycle.issue(binding, &caller.identity).await?;
            Ok((live, credential, false))
        }))
        .await;
        let mut guard = Undelivered {
            service: self.clone(),
            identity: caller.identity.clone(),
            lives: Vec::new(),
        };
        let mut delivered = Vec::with_capacity(results.len());
        let mut failure = None;
        for result in results {
            match result {
                Ok((live, credential, resumed)) => {
                    if !resumed {
                        guard.lives.push(live.clone());
                    }
                    delivered.push((live, credential, resumed));
                }
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            // `guard` drops armed here: the leases issued for the other
            // bindings are revoked, not leaked.
            let mut event = Event::new(Action::Issue, Outcome::Error, Some(&caller.identity));
            if let Error::Vault { binding, .. } | Error::Render { binding, .. } = &error {
                event.binding = Some(binding.clone());
                event.source = bindings
                    .iter()
                    .find(|b| &b.name == binding)
                    .map(|b| b.source.to_string());
            }
            if let Error::Handle(_) = &error {
                event.outcome = Some(Outcome::Denied);
            }
            event.reason = Some(error.to_string());
            event.peer = caller.peer.clone();
            event.policy_generation = Some(generation);
            self.audit(event);
            return Err(log_failure(error));
        }
        let delivered = delivered
            .into_iter()
            .map(|(live, credential, resumed)| {
                tracing::info!(
                    binding = %live.binding.name,
                    version = %live.version,
                    resumed,
                    "credential delivered"
                );
                if !resumed {
                    self.audit_delivery(caller, Action::Issue, &live, Some(generation));
                }
                (live, credential)
            })
            .collect();
        Ok((delivered, guard))
    }
}

/// Open-stream counts a `Watch` holds; released when the stream ends.
struct StreamSlots {
    counts: Arc<Mutex<HashMap<(String, String), usize>>>,
    keys: Vec<(String, String)>,
}

impl Drop for StreamSlots {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        for key in self.keys.drain(..) {
            if let Some(count) = counts.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }
    }
}

/// Database leases issued for a request and not yet handed to the caller.
/// Dropped without [`Undelivered::disarm`], it revokes them in the
/// background, so a failed or panicked request leaks no database user.
/// (Certificates nobody received simply expire: revoking grows the CRL.)
struct Undelivered {
    service: BrokerService,
    identity: Identity,
    lives: Vec<Live>,
}

impl Undelivered {
    /// The credentials are on their way: nothing to revoke.
    fn disarm(mut self) {
        self.lives.clear();
    }
}

impl Drop for Undelivered {
    fn drop(&mut self) {
        let lives: Vec<Live> = self
            .lives
            .drain(..)
            .filter(|live| matches!(live.binding.source, Source::Database(_)))
            .collect();
        if lives.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let service = self.service.clone();
        let identity = self.identity.clone();
        runtime.spawn(async move {
            for live in lives {
                let reason = "issued but never delivered (the request failed)";
                service.revoke_audited(&live, &identity, reason, None).await;
            }
        });
    }
}

/// The token from `authorization: Bearer <token>`.
fn bearer<T>(request: &Request<T>) -> Result<Secret, Error> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or(Error::MissingToken(
            "missing `authorization: Bearer <service-account token>` metadata",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| Error::MissingToken("`authorization` metadata is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Secret::from(token.trim().to_owned()))
        }
        _ => Err(Error::MissingToken(
            "`authorization` metadata is not `Bearer <token>`",
        )),
    }
}

/// The distinct handles of a Revoke, at most [`MAX_BINDINGS_PER_REQUEST`]
/// of them and of the bindings it names.
fn unique_handles<'a>(held: &'a [Held], bindings: &[String]) -> Result<Vec<&'a Held>, Error> {
    if held.len() > MAX_BINDINGS_PER_REQUEST || bindings.len() > MAX_BINDINGS_PER_REQUEST {
        return Err(Error::InvalidRequest(format!(
            "{} lease handles and {} bindings in one Revoke; at most {MAX_BINDINGS_PER_REQUEST} of each",
            held.len(),
            bindings.len()
        )));
    }
    let mut seen = BTreeSet::new();
    Ok(held
        .iter()
        .filter(|h| seen.insert((h.binding.as_str(), h.handle.as_str())))
        .collect())
}

fn check_names(names: &[String]) -> Result<(), Error> {
    if names.is_empty() {
        return Err(Error::InvalidRequest(
            "name at least one binding".to_owned(),
        ));
    }
    if names.len() > MAX_BINDINGS_PER_REQUEST {
        return Err(Error::InvalidRequest(format!(
            "{} bindings requested; at most {MAX_BINDINGS_PER_REQUEST} per request",
            names.len()
        )));
    }
    let mut seen = BTreeSet::new();
    if let Some(twice) = names.iter().find(|n| !seen.insert(*n)) {
        return Err(Error::InvalidRequest(format!(
            "binding `{}` is named twice",
            printable(twice)
        )));
    }
    Ok(())
}

/// The span of one RPC: named for it, a child of the caller's trace when
/// the caller sent its context (`traceparent`), filled with the caller's
/// identity once the token is verified.
fn rpc_span(rpc: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        otel.name = rpc,
        rpc,
        namespace = tracing::field::Empty,
        service_account = tracing::field::Empty,
        pod = tracing::field::Empty,
    );
    tessera_telemetry::adopt_remote_parent(&span, metadata);
    span
}

fn log_failure(error: Error) -> Status {
    match &error {
        Error::Vault { .. } => tracing::warn!(%error, "request failed"),
        _ => tracing::info!(%error, "request refused"),
    }
    error.into()
}

type WatchStreamOut = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let span = rpc_span("WhoAmI", request.metadata());
        async move {
            let _timer = self.parts.metrics.time_rpc("WhoAmI");
            let caller = self.authenticate(&request).await?;
            let loaded = self.parts.policy.current();
            let mut bindings: Vec<String> = loaded
                .policy
                .granted(&caller.identity)
                .map(|b| b.name.clone())
                .collect();
            bindings.sort();
            Ok(Response::new(WhoAmIResponse {
                token_expires_at: Some(lifecycle::from_unix(caller.identity.expires_at).into()),
                identity: Some(proto_identity(caller.identity)),
                bindings,
            }))
        }
        .instrument(span)
        .await
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let span = rpc_span("Fetch", request.metadata());
        async move {
            let _timer = self.parts.metrics.time_rpc("Fetch");
            let caller = self.authenticate(&request).await?;
            let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
            let (delivered, undelivered) = self
                .deliver_all(&caller, generation, &bindings, &request.get_ref().held)
                .await?;
            undelivered.disarm();
            Ok(Response::new(FetchResponse {
                credentials: delivered.into_iter().map(|(_, c)| c).collect(),
            }))
        }
        .instrument(span)
        .await
    }

    type WatchStream = WatchStreamOut;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let span = rpc_span("Watch", request.metadata());
        async move {
            let _timer = self.parts.metrics.time_rpc("Watch");
            let caller = self.authenticate(&request).await?;
            let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
            let slots = self.open_streams(&caller, &bindings)?;
            let (delivered, undelivered) = self
                .deliver_all(&caller, generation, &bindings, &request.get_ref().held)
                .await?;

            let (tx, rx) = mpsc::channel(bindings.len() + 4);
            let mut stream = OpenStream {
                service: self.clone(),
                caller,
                tx,
                kv_sent: HashMap::new(),
                leased: HashMap::new(),
                _slots: slots,
            };
            for (live, credential) in delivered {
                // The channel has room for every initial message.
                let _ = stream.tx.try_send(Ok(WatchResponse {
                    credential: Some(credential),
                }));
                if live.binding.source.is_leased() {
                    stream.schedule(live, 0);
                } else {
                    stream
                        .kv_sent
                        .insert(live.binding.name.clone(), live.version.clone());
                }
            }
            undelivered.disarm();
            let changes = futures::stream::select_all(bindings.iter().filter_map(|binding| {
                let Source::Kv2(source) = &binding.source else {
                    return None;
                };
                let binding = binding.clone();
                Some(
                    WatchStream::new(self.parts.feeds.subscribe(source))
                        .map(move |latest| (binding.clone(), latest)),
                )
            }));
            tokio::spawn(stream.run(changes).instrument(tracing::Span::current()));
            let stream: Self::WatchStream = Box::pin(ReceiverStream::new(rx));
            Ok(Response::new(stream))
        }
        .instrument(span)
        .await
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let span = rpc_span("Revoke", request.metadata());
        async move {
            let _timer = self.parts.metrics.time_rpc("Revoke");
            let caller = self.authenticate(&request).await?;
            let held = unique_handles(&request.get_ref().held, &request.get_ref().bindings)
                .map_err(log_failure)?;
            // Each handle is a Vault call and an audit record: beyond the
            // first, each counts against the caller's rate limit.
            let extra = u32::try_from(held.len().saturating_sub(1)).unwrap_or(u32::MAX);
            if let Err(retry_after) = self.parts.limiter.check_n(&caller.identity, extra) {
                return Err(log_failure(Error::RateLimited { retry_after }));
            }
            let loaded = self.parts.policy.current();
            let mut revoked = Vec::new();
            for held in held {
                let binding = loaded
                    .policy
                    .binding(&held.binding)
                    .map(|b| Arc::new(b.clone()))
                    .ok_or_else(|| {
                        log_failure(Error::InvalidRequest(format!(
                            "binding `{}` is not in the policy",
                            printable(&held.binding)
                        )))
                    })?;
                let live = self
                    .parts
                    .lifecycle
                    .held(&binding, &caller.identity, &held.handle)
                    .map_err(log_failure)?;
                self.parts
                    .lifecycle
                    .revoke(&live, &caller.identity)
                    .await
                    .map_err(log_failure)?;
                self.audit_delivery(&caller, Action::Revoke, &live, Some(loaded.generation));
                revoked.push(binding.name.clone());
            }
            // Static (KV) bindings carry no lease: releasing them is an acknowledgement.
            for name in &request.get_ref().bindings {
                if revoked.contains(name) {
                    continue;
                }
                if let Some(binding) = loaded.policy.lookup(&caller.identity, name)
                    && !binding.source.is_leased()
                {
                    let mut event =
                        Event::new(Action::Revoke, Outcome::Success, Some(&caller.identity));
                    event.binding = Some(binding.name.clone());
                    event.source = Some(binding.source.to_string());
                    event.peer = caller.peer.clone();
                    self.audit(event);
                    revoked.push(binding.name.clone());
                }
            }
            tracing::info!(?revoked, "credentials revoked or released");
            Ok(Response::new(RevokeResponse { revoked }))
        }
        .instrument(span)
        .await
    }
}

/// Longest wait between retries of a failed renewal or rotation.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One open `Watch` stream: pushes KV changes, and renews and rotates the
/// caller's leases while it is open.
struct OpenStream {
    service: BrokerService,
    caller: Caller,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    kv_sent: HashMap<String, String>,
    /// Leased credentials: the live credential, when to act, failures so far.
    leased: HashMap<String, (Live, Instant, u32)>,
    /// This stream's place in the per-pod count, released when it ends.
    _slots: StreamSlots,
}

impl OpenStream {
    fn schedule(&mut self, live: Live, failures: u32) {
        let due = if failures == 0 {
            self.service
                .parts
                .lifecycle
                .due_in(&live, fastrand::f64())
                .unwrap_or(RETRY_MAX)
        } else {
            // Capped exponential backoff with full jitter.
            let ceiling = Duration::from_secs(1u64 << failures.min(5)).min(RETRY_MAX);
            ceiling.mul_f64(fastrand::f64().max(0.1))
        };
        self.leased.insert(
            live.binding.name.clone(),
            (live, Instant::now() + due, failures),
        );
    }

    async fn send(&self, credential: Credential) -> bool {
        self.tx
            .send(Ok(WatchResponse {
                credential: Some(credential),
            }))
            .await
            .is_ok()
    }

    async fn run(mut self, mut changes: impl Stream<Item = (Arc<Binding>, Latest)> + Unpin) {
        let gauge = self.service.parts.metrics.watch_streams.clone();
        gauge.inc();
        let _open = scopeguard(move || {
            gauge.dec();
        });
        let expires_in = Duration::from_secs(self.caller.identity.expires_at).saturating_sub(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let expiry = tokio::time::sleep(expires_in);
        tokio::pin!(expiry);
        let shutdown = self.service.parts.shutdown.clone();
        let mut watching_kv = true;
        let mut leases = self.service.parts.metrics.lease_tracker();
        loop {
            leases.set(self.leased.keys());
            let next_due = self.leased.values().map(|(_, due, _)| *due).min();
            let end = tokio::select! {
                () = self.tx.closed() => {
                    self.closed().await;
                    return;
                }
                () = &mut expiry => Status::unauthenticated(
                    "service-account token expired; reconnect with the current token",
                ),
                () = shutdown.cancelled() => Status::unavailable("broker is shutting down; reconnect"),
                change = changes.next(), if watching_kv => match change {
                    Some((binding, Some(secret))) => {
                        if !self.kv_changed(&binding, &secret).await {
                            self.closed().await;
                            return;
                        }
                        continue;
                    }
                    Some((_, None)) => continue,
                    // No KV binding on this stream (or its feeds ended).
                    None => {
                        watching_kv = false;
                        continue;
                    }
                },
                () = sleep_until(next_due) => {
                    if !self.act_on_due().await {
                        self.closed().await;
                        return;
                    }
                    continue;
                }
            };
            let _ = self.tx.send(Err(end)).await;
            return;
        }
    }

    /// Pushes a new KV version; false when the caller is gone.
    async fn kv_changed(&mut self, binding: &Arc<Binding>, secret: &KvSecret) -> bool {
        let version = secret.version.to_string();
        if self.kv_sent.get(&binding.name) == Some(&version) {
            return true;
        }
        let live = Live {
            binding: binding.clone(),
            version: version.clone(),
            issued_at: secret.created.unwrap_or_else(SystemTime::now),
            not_after: None,
            renewable: false,
            lease: None,
            handle: String::new(),
        };
        let credential = match lifecycle::credential(&live, Some(&secret.fields)) {
            Ok(credential) => credential,
            Err(error) => {
                // The pod keeps its current files; the security team hears of it.
                tracing::warn!(%error, "cannot render a changed credential; the pod keeps the previous version");
                let mut event =
                    Event::new(Action::Rotate, Outcome::Error, Some(&self.caller.identity));
                event.binding = Some(binding.name.clone());
                event.source = Some(binding.source.to_string());
                event.version = Some(version.clone());
                event.reason = Some(error.to_string());
                event.peer = self.caller.peer.clone();
                self.service.audit(event);
                self.kv_sent.insert(binding.name.clone(), version);
                return true;
            }
        };
        tracing::info!(binding = %binding.name, %version, "credential changed; pushing");
        self.service
            .audit_delivery(&self.caller, Action::Rotate, &live, None);
        self.kv_sent.insert(binding.name.clone(), version);
        self.send(credential).await
    }

    /// Renews or rotates every lease that is due; false when the caller is gone.
    async fn act_on_due(&mut self) -> bool {
        let now = Instant::now();
        let due: Vec<String> = self
            .leased
            .iter()
            .filter(|(_, (_, at, _))| *at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        let lifecycle = self.service.parts.lifecycle.clone();
        for name in due {
            let Some((live, _, failures)) = self.leased.remove(&name) else {
                continue;
            };
            match lifecycle
                .renew_or_rotate(&live, &self.caller.identity)
                .await
            {
                Ok(Step::Renewed(renewed)) => {
                    tracing::info!(binding = %name, "lease renewed");
                    self.service
                        .audit_delivery(&self.caller, Action::Renew, &renewed, None);
                    let notice = lifecycle::credential(&renewed, None);
                    self.schedule(renewed, 0);
                    if let Ok(notice) = notice
                        && !self.send(notice).await
                    {
                        return false;
                    }
                }
                Ok(Step::Rotated(rotation)) => {
                    let lifecycle::Rotation {
                        live: new,
                        credential,
                        old,
                    } = *rotation;
                    tracing::info!(binding = %name, version = %new.version, "credential rotated; pushing");
                    self.service
                        .audit_delivery(&self.caller, Action::Rotate, &new, None);
                    self.schedule(new, 0);
                    let delivered = self.send(credential).await;
                    self.revoke_after_overlap(old);
                    if !delivered {
                        return false;
                    }
                }
                Err(error) => {
                    tracing::warn!(binding = %name, %error, failures = failures + 1, "renewal failed; the pod keeps its current credential; retrying");
                    if failures == 0 {
                        let mut event =
                            Event::new(Action::Renew, Outcome::Error, Some(&self.caller.identity));
                        event.binding = Some(name.clone());
                        event.reason = Some(error.to_string());
                        self.service.audit(event);
                    }
                    self.schedule(live, failures + 1);
                }
            }
        }
        true
    }

    /// Revokes a superseded credential once the overlap has passed, so the
    /// app has time to switch to its successor.
    fn revoke_after_overlap(&self, old: Live) {
        if !matches!(old.binding.source, Source::Database(_)) {
            // Superseded certificates simply expire: revoking them would grow the CRL.
            return;
        }
        let service = self.service.clone();
        let identity = self.caller.identity.clone();
        let caller = self.caller.peer.clone();
        tokio::spawn(async move {
            tokio::time::sleep(old.binding.overlap).await;
            let reason = "superseded after the overlap";
            service
                .revoke_audited(&old, &identity, reason, caller)
                .await;
        });
    }

    /// The caller hung up. A restarting sidecar resumes with its handles; a
    /// deleted pod will not, so its leases are revoked now (when the broker
    /// can see pods). Otherwise they expire by their TTL.
    async fn closed(&mut self) {
        if self.leased.is_empty() {
            return;
        }
        let verifier = &self.service.parts.verifier;
        if verifier.pod_exists(&self.caller.identity).await != Some(false) {
            return;
        }
        for (live, _, _) in self.leased.values() {
            let peer = self.caller.peer.clone();
            self.service
                .revoke_audited(live, &self.caller.identity, "pod deleted", peer)
                .await;
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn proto_identity(identity: Identity) -> ProtoIdentity {
    let (pod_name, pod_uid) = identity.pod.map(|p| (p.name, p.uid)).unwrap_or_default();
    ProtoIdentity {
        namespace: identity.namespace,
        service_account: identity.service_account,
        service_account_uid: identity.service_account_uid,
        pod_name,
        pod_uid,
        node_name: identity.node.map(|n| n.name).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_names_with_newlines_cannot_forge_log_lines() {
        let forged = "db\n2026-12-01T00:00:00Z INFO credential delivered binding=admin\r";
        let shown = printable(forged);
        assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown}");
        assert!(shown.starts_with("db\\n2026"), "{shown}");
        assert_eq!(printable("orders-db"), "orders-db");
        assert_eq!(printable(&"x".repeat(300)).len(), 253);
    }

    #[test]
    fn revoke_handles_are_capped_and_deduplicated() {
        let held = |binding: &str, handle: &str| Held {
            binding: binding.into(),
            handle: handle.into(),
        };
        let same = vec![held("db", "h1"); MAX_BINDINGS_PER_REQUEST];
        assert_eq!(unique_handles(&same, &[]).unwrap().len(), 1);
        let mixed = [held("db", "h1"), held("db", "h2"), held("db", "h1")];
        assert_eq!(unique_handles(&mixed, &[]).unwrap().len(), 2);
        let flood = vec![held("db", "h1"); 10_000];
        assert!(matches!(
            unique_handles(&flood, &[]),
            Err(Error::InvalidRequest(_))
        ));
        let names = vec!["kv".to_owned(); 10_000];
        assert!(matches!(
            unique_handles(&[], &names),
            Err(Error::InvalidRequest(_))
        ));
    }
}
