//! The `tessera.v1.Broker` gRPC service: authenticate, authorize, fetch, stream.

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
    error::Error,
    feed::Feeds,
    identity::{Identity, Verifier},
    policy::{Binding, Source, store::PolicyStore},
    secret::Secret,
    vault::{KvSecret, Vault},
};

/// Most bindings one request may name.
const MAX_BINDINGS_PER_REQUEST: usize = 64;

/// The broker service state; cheap to clone.
#[derive(Clone)]
pub struct BrokerService {
    verifier: Arc<Verifier>,
    policy: Arc<PolicyStore>,
    vault: Arc<Vault>,
    feeds: Arc<Feeds>,
    shutdown: CancellationToken,
}

impl BrokerService {
    /// A service over its parts.
    pub fn new(
        verifier: Arc<Verifier>,
        policy: Arc<PolicyStore>,
        vault: Arc<Vault>,
        feeds: Arc<Feeds>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            verifier,
            policy,
            vault,
            feeds,
            shutdown,
        }
    }

    /// Verifies the bearer token and records the identity on the current span.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Identity, Error> {
        let value = request
            .metadata()
            .get("authorization")
            .ok_or(Error::MissingToken(
                "missing `authorization: Bearer <service-account token>` metadata",
            ))?;
        let value = value
            .to_str()
            .map_err(|_| Error::MissingToken("`authorization` metadata is not ASCII"))?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => {
                return Err(Error::MissingToken(
                    "`authorization` metadata is not `Bearer <token>`",
                ));
            }
        };
        let identity = self.verifier.verify(&Secret::from(token.to_owned()))?;
        let span = tracing::Span::current();
        span.record("namespace", identity.namespace.as_str());
        span.record("service_account", identity.service_account.as_str());
        if let Some(pod) = &identity.pod {
            span.record("pod", pod.name.as_str());
        }
        Ok(identity)
    }

    /// The bindings named in a request, each granted to `identity`, all from
    /// one policy generation.
    fn authorize(&self, identity: &Identity, names: &[String]) -> Result<Vec<Binding>, Error> {
        let loaded = self.policy.current();
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
        names
            .iter()
            .map(|name| {
                if !seen.insert(name) {
                    return Err(Error::InvalidRequest(format!(
                        "binding `{name}` is named twice"
                    )));
                }
                loaded
                    .policy
                    .lookup(identity, name)
                    .cloned()
                    .ok_or_else(|| Error::Denied {
                        binding: name.chars().take(253).collect(),
                        namespace: identity.namespace.clone(),
                        service_account: identity.service_account.clone(),
                    })
            })
            .collect()
    }

    async fn issue(&self, binding: &Binding) -> Result<Credential, Error> {
        let Source::Kv2(source) = &binding.source;
        let secret = self
            .vault
            .read_kv2(source)
            .await
            .map_err(|source| Error::Vault {
                binding: binding.name.clone(),
                source,
            })?;
        credential(binding, &secret)
    }

    async fn issue_all(&self, bindings: &[Binding]) -> Result<Vec<Credential>, Error> {
        let credentials = try_join_all(bindings.iter().map(|b| self.issue(b))).await?;
        for credential in &credentials {
            tracing::info!(binding = %credential.binding, version = %credential.version, "credential issued");
        }
        Ok(credentials)
    }
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
        let identity = self.authenticate(&request).map_err(log_failure)?;
        let loaded = self.policy.current();
        let mut bindings: Vec<String> = loaded
            .policy
            .granted(&identity)
            .map(|b| b.name.clone())
            .collect();
        bindings.sort();
        Ok(Response::new(WhoAmIResponse {
            token_expires_at: Some((UNIX_EPOCH + Duration::from_secs(identity.expires_at)).into()),
            identity: Some(proto_identity(identity)),
            bindings,
        }))
    }

    #[tracing::instrument(skip_all, fields(rpc = "Fetch", namespace, service_account, pod))]
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let identity = self.authenticate(&request).map_err(log_failure)?;
        let bindings = self
            .authorize(&identity, &request.get_ref().bindings)
            .map_err(log_failure)?;
        let credentials = self.issue_all(&bindings).await.map_err(log_failure)?;
        Ok(Response::new(FetchResponse { credentials }))
    }

    type WatchStream = WatchStreamOut;

    #[tracing::instrument(skip_all, fields(rpc = "Watch", namespace, service_account, pod))]
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let identity = self.authenticate(&request).map_err(log_failure)?;
        let bindings = self
            .authorize(&identity, &request.get_ref().bindings)
            .map_err(log_failure)?;
        let initial = self.issue_all(&bindings).await.map_err(log_failure)?;
        let mut sent: HashMap<String, String> = initial
            .iter()
            .map(|c| (c.binding.clone(), c.version.clone()))
            .collect();

        let (tx, rx) = mpsc::channel(bindings.len() + 4);
        for credential in initial {
            // The channel holds every initial message.
            let _ = tx.try_send(Ok(WatchResponse {
                credential: Some(credential),
            }));
        }
        let mut changes = futures::stream::select_all(bindings.iter().map(|binding| {
            let Source::Kv2(source) = &binding.source;
            let binding = Arc::new(binding.clone());
            WatchStream::new(self.feeds.subscribe(source))
                .map(move |latest| (binding.clone(), latest))
        }));
        let expires_in = Duration::from_secs(identity.expires_at).saturating_sub(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let shutdown = self.shutdown.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let expiry = tokio::time::sleep(expires_in);
                tokio::pin!(expiry);
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
        let identity = self.authenticate(&request).map_err(log_failure)?;
        let names = &request.get_ref().bindings;
        // KV secrets carry no lease: releasing them is an acknowledgement.
        // Leased sources (database, PKI) revoke in Vault here.
        let revoked = if names.is_empty() {
            let loaded = self.policy.current();
            loaded
                .policy
                .granted(&identity)
                .map(|b| b.name.clone())
                .collect()
        } else {
            self.authorize(&identity, names)
                .map_err(log_failure)?
                .into_iter()
                .map(|b| b.name)
                .collect()
        };
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
