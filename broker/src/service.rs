//! The `tessera.v1.Broker` gRPC service: authenticate, rate-limit, authorize,
//! fetch, stream, and audit every decision.

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt, future::try_join_all};
use tessera_proto::v1::{
    Credential, FetchRequest, FetchResponse, Identity as ProtoIdentity, RevokeRequest,
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
    error::Error,
    feed::Feeds,
    identity::{Identity, Verifier},
    policy::{Binding, Source, store::PolicyStore},
    ratelimit::Limiter,
    secret::Secret,
    vault::{KvSecret, Vault},
};

/// Most bindings one request may name.
const MAX_BINDINGS_PER_REQUEST: usize = 64;

/// What the service is built from.
pub struct Parts {
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The live policy.
    pub policy: Arc<PolicyStore>,
    /// Vault access.
    pub vault: Arc<Vault>,
    /// Shared change feeds for `Watch`.
    pub feeds: Arc<Feeds>,
    /// The audit trail.
    pub audit: Arc<Audit>,
    /// Per-identity rate limits.
    pub limiter: Arc<Limiter>,
    /// Ends open streams on shutdown.
    pub shutdown: CancellationToken,
}

/// The broker service; cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    parts: Arc<Parts>,
}

/// A request's verified identity and where it came from.
struct Caller {
    identity: Identity,
    peer: Option<String>,
}

impl Caller {
    /// `namespace/service-account/pod/pod-uid`, stamped into Vault's audit log.
    fn stamp(&self) -> String {
        let id = &self.identity;
        let (pod, uid) = id
            .pod
            .as_ref()
            .map_or(("-", "-"), |p| (p.name.as_str(), p.uid.as_str()));
        format!("{}/{}/{pod}/{uid}", id.namespace, id.service_account)
    }
}

impl BrokerService {
    /// A service over its parts.
    pub fn new(parts: Parts) -> Self {
        Self {
            parts: Arc::new(parts),
        }
    }

    fn audit(&self, event: Event) {
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
    fn authorize(&self, caller: &Caller, names: &[String]) -> Result<(u64, Vec<Binding>), Status> {
        let loaded = self.parts.policy.current();
        let result = check_names(names).and_then(|()| {
            names
                .iter()
                .map(|name| {
                    loaded
                        .policy
                        .lookup(&caller.identity, name)
                        .cloned()
                        .ok_or_else(|| Error::Denied {
                            binding: name.chars().take(253).collect(),
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

    async fn issue(&self, binding: &Binding, caller: &str) -> Result<Credential, Error> {
        let Source::Kv2(source) = &binding.source;
        let secret = self
            .parts
            .vault
            .read_kv2(source, Some(caller))
            .await
            .map_err(|source| Error::Vault {
                binding: binding.name.clone(),
                source,
            })?;
        credential(binding, &secret)
    }

    /// Issues every binding (all or nothing) and audits the outcome.
    async fn issue_all(
        &self,
        caller: &Caller,
        generation: u64,
        bindings: &[Binding],
    ) -> Result<Vec<Credential>, Status> {
        let stamp = caller.stamp();
        let result = try_join_all(bindings.iter().map(|b| self.issue(b, &stamp))).await;
        match result {
            Ok(credentials) => {
                for (binding, credential) in bindings.iter().zip(&credentials) {
                    tracing::info!(binding = %binding.name, version = %credential.version, "credential issued");
                    let mut event =
                        Event::new(Action::Issue, Outcome::Success, Some(&caller.identity));
                    event.binding = Some(binding.name.clone());
                    event.source = Some(binding.source.to_string());
                    event.version = Some(credential.version.clone());
                    event.peer = caller.peer.clone();
                    event.policy_generation = Some(generation);
                    self.audit(event);
                }
                Ok(credentials)
            }
            Err(error) => {
                let mut event = Event::new(Action::Issue, Outcome::Error, Some(&caller.identity));
                if let Error::Vault { binding, .. } | Error::Render { binding, .. } = &error {
                    event.binding = Some(binding.clone());
                }
                event.reason = Some(error.to_string());
                event.peer = caller.peer.clone();
                event.policy_generation = Some(generation);
                self.audit(event);
                Err(log_failure(error))
            }
        }
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
            twice.chars().take(253).collect::<String>()
        )));
    }
    Ok(())
}

/// Builds the wire credential for one KV version: the binding's files
/// (renamed fields and rendered templates) and its file mode and group.
fn credential(binding: &Binding, secret: &KvSecret) -> Result<Credential, Error> {
    let files = binding
        .render(&secret.fields)
        .map_err(|missing| Error::Render {
            binding: binding.name.clone(),
            field: missing,
        })?;
    Ok(Credential {
        binding: binding.name.clone(),
        fields: files
            .iter()
            .map(|(k, v)| (k.clone(), v.expose_secret().to_vec()))
            .collect(),
        version: secret.version.to_string(),
        issued_at: secret.created.map(Into::into),
        not_after: None,
        renewable: false,
        file_mode: binding.output.mode.unwrap_or(0),
        group_id: binding.output.group,
    })
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
    #[tracing::instrument(skip_all, fields(rpc = "WhoAmI", namespace, service_account, pod))]
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
            token_expires_at: Some(
                (UNIX_EPOCH + Duration::from_secs(caller.identity.expires_at)).into(),
            ),
            identity: Some(proto_identity(caller.identity)),
            bindings,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Fetch", namespace, service_account, pod))]
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
        let credentials = self.issue_all(&caller, generation, &bindings).await?;
        Ok(Response::new(FetchResponse { credentials }))
    }

    type WatchStream = WatchStreamOut;

    #[tracing::instrument(skip_all, fields(rpc = "Watch", namespace, service_account, pod))]
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.authenticate(&request).await?;
        let (generation, bindings) = self.authorize(&caller, &request.get_ref().bindings)?;
        let initial = self.issue_all(&caller, generation, &bindings).await?;
        let mut sent: HashMap<String, String> = initial
            .iter()
            .map(|c| (c.binding.clone(), c.version.clone()))
            .collect();

        let (tx, rx) = mpsc::channel(bindings.len() + 4);
        for credential in initial {
            // The channel has room for every initial message.
            let _ = tx.try_send(Ok(WatchResponse {
                credential: Some(credential),
            }));
        }
        let mut changes = futures::stream::select_all(bindings.iter().map(|binding| {
            let Source::Kv2(source) = &binding.source;
            let binding = Arc::new(binding.clone());
            WatchStream::new(self.parts.feeds.subscribe(source))
                .map(move |latest| (binding.clone(), latest))
        }));
        let expires_in = Duration::from_secs(caller.identity.expires_at).saturating_sub(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let service = self.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let expiry = tokio::time::sleep(expires_in);
                tokio::pin!(expiry);
                let shutdown = service.parts.shutdown.clone();
                loop {
                    let end = tokio::select! {
                        () = tx.closed() => return,
                        () = &mut expiry => Status::unauthenticated(
                            "service-account token expired; reconnect with the current token",
                        ),
                        () = shutdown.cancelled() => Status::unavailable(
                            "broker is shutting down; reconnect",
                        ),
                        change = changes.next() => match change {
                            Some((binding, Some(secret))) => {
                                let version = secret.version.to_string();
                                if sent.get(&binding.name) == Some(&version) {
                                    continue;
                                }
                                let credential = match credential(&binding, &secret) {
                                    Ok(credential) => credential,
                                    Err(error) => {
                                        // The pod keeps its current files.
                                        tracing::warn!(%error, "cannot render a changed credential");
                                        continue;
                                    }
                                };
                                tracing::info!(binding = %binding.name, %version, "credential changed; pushing");
                                let mut event = Event::new(Action::Rotate, Outcome::Success, Some(&caller.identity));
                                event.binding = Some(binding.name.clone());
                                event.source = Some(binding.source.to_string());
                                event.version = Some(version.clone());
                                event.peer = caller.peer.clone();
                                service.audit(event);
                                sent.insert(binding.name.clone(), version);
                                let message = WatchResponse { credential: Some(credential) };
                                if tx.send(Ok(message)).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            Some((_, None)) => continue,
                            None => return,
                        },
                    };
                    let _ = tx.send(Err(end)).await;
                    return;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Revoke", namespace, service_account, pod))]
    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let names = &request.get_ref().bindings;
        // KV secrets carry no lease: releasing them is an acknowledgement.
        // Leased sources (database, PKI) revoke in Vault here.
        let revoked: Vec<Binding> = if names.is_empty() {
            let loaded = self.parts.policy.current();
            loaded.policy.granted(&caller.identity).cloned().collect()
        } else {
            self.authorize(&caller, names)?.1
        };
        for binding in &revoked {
            let mut event = Event::new(Action::Revoke, Outcome::Success, Some(&caller.identity));
            event.binding = Some(binding.name.clone());
            event.source = Some(binding.source.to_string());
            event.peer = caller.peer.clone();
            self.audit(event);
        }
        let revoked: Vec<String> = revoked.into_iter().map(|b| b.name).collect();
        tracing::info!(?revoked, "credentials released");
        Ok(Response::new(RevokeResponse { revoked }))
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
