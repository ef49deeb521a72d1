//! The `tessera.v1.Broker` gRPC service: authenticate, rate-limit, authorize,
//! hand the work to the lease engine, move messages, and audit every
//! decision.

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tessera_proto::v1::{
    Credential, FetchRequest, FetchResponse, RevokeRequest, RevokeResponse, WatchRequest,
    WatchResponse, WhoAmIRequest, WhoAmIResponse, broker_server::Broker,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    audit::{Action, Event, Outcome},
    clock::from_unix,
    error::Error,
    feed::Feeds,
    handle::Handle,
    identity::{Identity, Verifier},
    lease::{
        Caller, Engine,
        stream::{self, OpenStream, Streams},
    },
    metrics::Metrics,
    policy::{Binding, Source, store::PolicyStore},
    ratelimit::Limiter,
    tasks::Spawner,
    text::printable,
};

mod deliver;
mod pod_keys;
mod request;
mod rpc_layer;

pub use self::rpc_layer::RpcLayer;

use request::{bearer, check_names, log_failure, proto_identity, unique_handles};

/// Most bindings one request may name, and most lease handles one Revoke may carry.
const MAX_BINDINGS_PER_REQUEST: usize = 64;

/// What the service is built from.
pub struct Parts {
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The policy in force, swapped whole on every reload.
    pub policy: Arc<PolicyStore>,
    /// Issues, renews, rotates and revokes credentials, and audits them.
    pub engine: Arc<Engine>,
    /// Shared change feeds for `Watch`.
    pub feeds: Arc<Feeds>,
    /// Per-identity rate limits.
    pub limiter: Arc<Limiter>,
    /// Where request counts and durations are reported.
    pub metrics: Arc<Metrics>,
    /// Ends open streams on shutdown.
    pub shutdown: CancellationToken,
    /// Where each `Watch` stream runs.
    pub streams: Spawner,
}

/// The broker service; cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    parts: Arc<Parts>,
    streams: Arc<Streams>,
}

impl BrokerService {
    /// A service over its parts.
    pub fn new(parts: Parts) -> Self {
        let streams = Arc::new(Streams::new(
            parts.engine.clone(),
            parts.policy.clone(),
            parts.verifier.clone(),
            parts.metrics.clone(),
            parts.shutdown.clone(),
        ));
        Self {
            parts: Arc::new(parts),
            streams,
        }
    }

    fn audit(&self, event: &Event) {
        self.parts.engine.report(event);
    }

    /// The one way a request is refused: its audit line (the binding, and
    /// whether it was denied or failed, taken from the error), its log line
    /// and its status. A refusal that bypasses it goes unaudited.
    fn refuse(&self, error: Error, refused: Refused<'_>) -> Status {
        let mut event = Event::new(refused.action, outcome_of(&error), refused.identity);
        event.binding = error.binding().map(str::to_owned);
        event.source = refused.source;
        event.reason = Some(error.to_string());
        event.peer = refused.peer;
        event.policy_generation = refused.generation;
        self.audit(&event);
        log_failure(error)
    }

    /// Verifies the bearer token, applies the rate limit, and records the
    /// identity on the current span. Refusals are audited.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let peer = request.remote_addr().map(|a| a.to_string());
        let (verified, token) = match bearer(request) {
            Ok(token) => (
                self.parts
                    .verifier
                    .verify(&token)
                    .instrument(tracing::info_span!("verify_token"))
                    .await
                    .map_err(Error::from),
                Some(token),
            ),
            Err(error) => (Err(error), None),
        };
        let identity = verified.map_err(|error| {
            self.refuse(
                error,
                Refused::new(Action::Authenticate, None, peer.clone()),
            )
        })?;
        let span = tracing::Span::current();
        span.record("namespace", identity.namespace.as_str());
        span.record("service_account", identity.service_account.as_str());
        if let Some(pod) = &identity.pod {
            span.record("pod", pod.name.as_str());
        }
        if let Err(retry_after) = self.parts.limiter.check(&identity) {
            let refused = Refused::new(Action::Authenticate, Some(&identity), peer);
            return Err(self.refuse(Error::RateLimited { retry_after }, refused));
        }
        Ok(Caller {
            identity,
            peer,
            bearer: token,
        })
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
            let refused = Refused::issue(caller).in_generation(loaded.generation);
            self.refuse(error, refused)
        })
    }

    /// The bindings as the caller asked for them: shorter TTLs applied. A
    /// TTL the policy does not allow is an audited refusal.
    fn narrow(
        &self,
        caller: &Caller,
        (generation, bindings): (u64, Vec<Arc<Binding>>),
        asked: &BTreeMap<String, u32>,
    ) -> Result<(Vec<Arc<Binding>>, stream::Narrowing), Status> {
        let narrowing = stream::Narrowing::from_request(asked, &bindings).map_err(|message| {
            let refused = Refused::issue(caller).in_generation(generation);
            self.refuse(Error::InvalidRequest(message), refused)
        })?;
        let bindings = bindings
            .iter()
            .map(|binding| Arc::new(narrowing.apply(binding)))
            .collect();
        Ok((bindings, narrowing))
    }
}

/// What a refusal's audit line says besides the error.
struct Refused<'a> {
    action: Action,
    identity: Option<&'a Identity>,
    peer: Option<String>,
    generation: Option<u64>,
    source: Option<String>,
}

impl<'a> Refused<'a> {
    fn new(action: Action, identity: Option<&'a Identity>, peer: Option<String>) -> Self {
        Self {
            action,
            identity,
            peer,
            generation: None,
            source: None,
        }
    }

    /// An `issue` refused to `caller`.
    fn issue(caller: &'a Caller) -> Self {
        Self::new(Action::Issue, Some(&caller.identity), caller.peer.clone())
    }

    /// A `revoke` refused to `caller`.
    fn revoke(caller: &'a Caller) -> Self {
        Self::new(Action::Revoke, Some(&caller.identity), caller.peer.clone())
    }

    fn in_generation(mut self, generation: u64) -> Self {
        self.generation = Some(generation);
        self
    }

    fn with_source(mut self, source: Option<String>) -> Self {
        self.source = source;
        self
    }
}

/// Whether a refusal was the caller's to fix (`denied`) or the broker's or
/// Vault's failure (`error`), as the audit trail records it.
fn outcome_of(error: &Error) -> Outcome {
    match error {
        Error::Vault { .. } | Error::LeaseRecord { .. } | Error::Render { .. } => Outcome::Error,
        _ => Outcome::Denied,
    }
}

type WatchStreamOut = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let loaded = self.parts.policy.current();
        let mut bindings: Vec<String> = loaded
            .policy
            .granted(&caller.identity)
            .map(|b| b.name.clone())
            .collect();
        bindings.sort();
        Ok(Response::new(WhoAmIResponse {
            token_expires_at: Some(from_unix(caller.identity.expires_at).into()),
            identity: Some(proto_identity(caller.identity)),
            bindings,
        }))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
        let (bindings, _) = self.narrow(
            &caller,
            (generation, bindings),
            &request.get_ref().max_ttl_seconds,
        )?;
        let keys =
            pod_keys::checked(&bindings, &request.get_ref().public_keys).map_err(|error| {
                self.refuse(error, Refused::issue(&caller).in_generation(generation))
            })?;
        let order: Vec<String> = bindings.iter().map(|b| b.name.clone()).collect();
        let (wanted, bindings) = pod_keys::split_wanted(bindings, &keys);
        let (delivered, undelivered) = self
            .deliver_all(
                &caller,
                generation,
                &bindings,
                (&request.get_ref().held, &keys),
            )
            .await?;
        undelivered.disarm();
        let mut credentials: Vec<Credential> = delivered
            .into_iter()
            .map(|(_, c)| c)
            .chain(wanted)
            .collect();
        credentials.sort_by_key(|c| order.iter().position(|name| *name == c.binding));
        Ok(Response::new(FetchResponse { credentials }))
    }

    type WatchStream = WatchStreamOut;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.authenticate(&request).await?;
        let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
        let (bindings, narrowing) = self.narrow(
            &caller,
            (generation, bindings),
            &request.get_ref().max_ttl_seconds,
        )?;
        // A binding whose key the pod makes is answered with the key to
        // make, and renewed by the pod with Fetch: the stream carries the rest.
        let (wanted, bindings) = pod_keys::split_wanted(bindings, &BTreeMap::new());
        let slots = self.streams.open(&caller, &bindings).map_err(|error| {
            self.refuse(error, Refused::issue(&caller).in_generation(generation))
        })?;
        let (delivered, undelivered) = self
            .deliver_all(
                &caller,
                generation,
                &bindings,
                (&request.get_ref().held, &BTreeMap::new()),
            )
            .await?;

        let (tx, rx) = mpsc::channel(bindings.len() + wanted.len() + 4);
        let first = tx.clone();
        for credential in wanted {
            let _ = first.try_send(Ok(Box::new(WatchResponse {
                credential: Some(credential),
            })));
        }
        // The pod's token stays with the stream only when a binding behind
        // the second gate needs it to log in again; most streams keep none.
        let mut caller = caller;
        if bindings.iter().all(|b| b.gate.is_none()) {
            caller.bearer = None;
        }
        let mut stream = OpenStream::new(
            self.streams.clone(),
            caller,
            (generation, bindings.clone(), narrowing),
            tx,
            slots,
        );
        for (live, credential) in delivered {
            // The channel has room for every initial message.
            let _ = first.try_send(Ok(Box::new(WatchResponse {
                credential: Some(credential),
            })));
            stream.delivered(live);
        }
        drop(first);
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
        self.parts
            .streams
            .spawn(stream.run(changes).instrument(tracing::Span::current()));
        let stream: Self::WatchStream =
            Box::pin(ReceiverStream::new(rx).map(|message| message.map(|boxed| *boxed)));
        Ok(Response::new(stream))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let held = unique_handles(&request.get_ref().held, &request.get_ref().bindings)
            .map_err(|error| self.refuse(error, Refused::revoke(&caller)))?;
        // Each handle is a Vault call and an audit record: beyond the
        // first, each counts against the caller's rate limit.
        let extra = u32::try_from(held.len().saturating_sub(1)).unwrap_or(u32::MAX);
        if let Err(retry_after) = self.parts.limiter.check_n(&caller.identity, extra) {
            let error = Error::RateLimited { retry_after };
            return Err(self.refuse(error, Refused::revoke(&caller)));
        }
        let loaded = self.parts.policy.current();
        let mut revoked = Vec::new();
        for held in held {
            let live = loaded
                .policy
                .binding(&held.binding)
                .map(|b| Arc::new(b.clone()))
                .ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "binding `{}` is not in the policy",
                        printable(&held.binding)
                    ))
                })
                .and_then(|binding| {
                    self.parts.engine.held(
                        &binding,
                        &caller.identity,
                        &Handle::presented(&held.handle),
                    )
                });
            let live = match live {
                Ok(live) => live,
                Err(error) => return Err(self.refuse(error, Refused::revoke(&caller))),
            };
            // The engine audits the revocation, failed or not.
            self.parts
                .engine
                .revoke(&live, &caller, "given back by the pod")
                .await
                .map_err(log_failure)?;
            revoked.push(live.binding.name.clone());
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
                self.audit(&event);
                revoked.push(binding.name.clone());
            }
        }
        tracing::info!(?revoked, "credentials revoked or released");
        Ok(Response::new(RevokeResponse { revoked }))
    }
}
