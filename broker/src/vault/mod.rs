//! Vault (or OpenBao) access: authentication that follows its token source, and
//! KV v2 reads that keep the version metadata vaultrs' helpers drop.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use rustify::{
    endpoint::{Endpoint, MiddleWare},
    errors::ClientError as RestClientError,
};
use tokio::sync::Mutex;
use vaultrs::{
    api::{EndpointError, EndpointMiddleware, EndpointResult},
    client::{Client, VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
};

use tracing::Instrument;

use crate::secret::Secret;

mod gate;
pub mod kv1;
mod kv2;
pub mod leases;
mod login;
mod path;
mod sign;

pub use gate::PodToken;
pub use kv2::KvSecret;
use login::Login;
pub use path::PathAnswer;
pub use sign::{SSH_CERTIFICATE_FIELD, SshSigning};

/// How the broker logs in to Vault.
#[derive(Clone, Debug)]
pub enum VaultAuth {
    /// A token in a file, re-read whenever the file changes (e.g. written by a
    /// Vault Agent or a rotated Kubernetes Secret).
    TokenFile(PathBuf),
    /// AppRole login; the token is renewed by logging in again at 2/3 of its TTL.
    AppRole {
        /// Auth mount, usually `approle`.
        mount: String,
        /// The role id (not secret).
        role_id: String,
        /// The file holding the AppRole secret id, read at every login.
        secret_id_file: PathBuf,
    },
    /// Login with the broker's own projected service-account token, at
    /// Vault's `jwt` or `kubernetes` auth method (both take a role and the
    /// token), so the broker itself needs no static secret. The file is
    /// re-read for every login (the kubelet rotates it); the Vault token is
    /// renewed by logging in again at 2/3 of its TTL.
    Jwt {
        /// Auth mount, e.g. `jwt` or `kubernetes`.
        mount: String,
        /// The JWT method's role the broker logs in with.
        role: String,
        /// The projected service-account token presented to Vault's JWT method, read at every login.
        token_file: PathBuf,
    },
}

/// Where and how to reach Vault.
#[derive(Clone, Debug)]
pub struct VaultSettings {
    /// Base address, e.g. `https://vault.vault.svc:8200`.
    pub address: String,
    /// The namespace the broker logs in to and works in (Vault
    /// Enterprise, OpenBao 2.3+); a binding's source may name another.
    pub namespace: Option<String>,
    /// CA bundle for Vault's certificate; the system roots when absent.
    pub ca_cert: Option<PathBuf>,
    /// Login method.
    pub auth: VaultAuth,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Longest time without a successful request before the broker checks
    /// that Vault answers (a token self-lookup).
    pub health_check_interval: Duration,
    /// The cluster's name, first in the caller header of every request.
    pub cluster: String,
}

/// Errors talking to Vault, sorted by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Vault could not be reached or answered 5xx: retry later.
    #[error("Vault is unavailable: {0}")]
    Unavailable(String),
    /// Vault refused the broker's token (403): the broker's Vault policy is missing access.
    #[error("Vault denied the broker access to {0} (grant the broker's Vault policy read on it)")]
    Denied(String),
    /// The secret does not exist (404).
    #[error("no secret at {0} in Vault")]
    NotFound(String),
    /// Vault refused the request as invalid (400), e.g. an unknown lease.
    #[error("Vault refused {0}")]
    Invalid(String),
    /// The broker's own Vault credentials could not be loaded or used.
    #[error("Vault login failed: {0}")]
    Login(String),
    /// The answer was not what the API promises.
    #[error("unexpected answer from Vault for {what}: {detail}")]
    Unexpected {
        /// The request whose answer was malformed.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

impl VaultError {
    fn from_client(what: &str, error: ClientError) -> Self {
        match error {
            ClientError::APIError { code: 403, .. } => Self::Denied(what.to_owned()),
            ClientError::APIError { code: 404, .. } => Self::NotFound(what.to_owned()),
            ClientError::APIError { code: 400, errors } => {
                Self::Invalid(format!("{what}: {}", errors.join("; ")))
            }
            ClientError::APIError { code, errors } if code >= 500 || code == 429 => {
                Self::Unavailable(format!("{what}: status {code}: {}", errors.join("; ")))
            }
            ClientError::RestClientError { .. } => {
                Self::Unavailable(format!("{what}: {}", error_chain(&error)))
            }
            other => Self::Unexpected {
                what: what.to_owned(),
                detail: error_chain(&other),
            },
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The Vault request header that names the pod a request is made for
/// (`<cluster>/<namespace>/<service account>/<pod>/<pod uid>`). Vault's
/// audit devices record it once it is listed in
/// `sys/config/auditing/request-headers`, so Vault's own audit log says which
/// pod got what.
pub const CALLER_HEADER: &str = "x-tessera-caller";

/// vaultrs' middleware (API version, token) plus the caller header.
struct Stamped<'a> {
    inner: &'a EndpointMiddleware,
    caller: Option<http::HeaderValue>,
    namespace: Option<http::HeaderValue>,
    token: Option<http::HeaderValue>,
}

impl<'a> Stamped<'a> {
    fn new(client: &'a VaultClient, cluster: &str, scope: Scope<'_>) -> Self {
        Self {
            inner: client.middle(),
            caller: scope
                .caller
                .and_then(|c| http::HeaderValue::from_str(&format!("{cluster}/{c}")).ok()),
            namespace: scope
                .namespace
                .and_then(|ns| http::HeaderValue::from_str(ns).ok()),
            token: scope.token.and_then(|token| {
                let mut value = http::HeaderValue::from_bytes(token.expose_secret()).ok()?;
                value.set_sensitive(true);
                Some(value)
            }),
        }
    }
}

/// Who a request is for and where: the caller stamped into Vault's audit
/// log (`namespace/service-account/pod/uid`), and the Vault namespace of the
/// binding's source, sent as `X-Vault-Namespace` (the broker's own,
/// `vault.namespace`, when `None`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    /// The caller stamped into Vault's audit log; none for the broker's own work.
    pub caller: Option<&'a str>,
    /// The full path of the namespace the request is for, e.g. `team-a`.
    pub namespace: Option<&'a str>,
    /// A token to send instead of the broker's: a pod's own, from Vault's
    /// second gate (its refusal then says nothing of the broker's login).
    pub token: Option<&'a Secret>,
}

impl<'a> Scope<'a> {
    /// A request for `caller` in `namespace`.
    pub fn new(caller: Option<&'a str>, namespace: Option<&'a str>) -> Self {
        Self {
            caller,
            namespace,
            token: None,
        }
    }

    /// This scope, sending `token` instead of the broker's.
    pub fn with_token(self, token: Option<&'a Secret>) -> Self {
        Self { token, ..self }
    }
}

impl MiddleWare for Stamped<'_> {
    fn request<E: Endpoint>(
        &self,
        endpoint: &E,
        req: &mut http::Request<Vec<u8>>,
    ) -> Result<(), RestClientError> {
        self.inner.request(endpoint, req)?;
        if let Some(caller) = &self.caller {
            req.headers_mut().insert(CALLER_HEADER, caller.clone());
        }
        if let Some(namespace) = &self.namespace {
            req.headers_mut()
                .insert("X-Vault-Namespace", namespace.clone());
        }
        if let Some(token) = &self.token {
            req.headers_mut().insert("X-Vault-Token", token.clone());
        }
        Ok(())
    }

    fn response<E: Endpoint>(
        &self,
        endpoint: &E,
        resp: &mut http::Response<Vec<u8>>,
    ) -> Result<(), RestClientError> {
        self.inner.response(endpoint, resp)
    }
}

/// Maps a request builder's error (a bug, not Vault's answer) to a [`VaultError`].
fn unbuildable<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> VaultError + '_ {
    move |e| VaultError::Unexpected {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// Turns a REST error into vaultrs' error, with Vault's messages.
fn api_error(error: RestClientError) -> ClientError {
    if let RestClientError::ServerResponseError {
        code,
        content: Some(content),
    } = &error
        && let Ok(body) = serde_json::from_str::<EndpointError>(content)
    {
        return ClientError::APIError {
            code: *code,
            errors: body.errors,
        };
    }
    ClientError::from(error)
}

/// A span for one Vault request, inside a request's trace only: the
/// background pollers and health checks would each start a trace of their own.
fn vault_span(operation: &'static str) -> tracing::Span {
    if tracing::Span::current().is_none() {
        tracing::Span::none()
    } else {
        tracing::info_span!("vault", operation)
    }
}

/// The short name of an endpoint type, as a bounded metric label.
fn operation<E>() -> &'static str {
    let name = std::any::type_name::<E>();
    name.rsplit("::").next().unwrap_or(name)
}

/// A Vault client shared by all requests.
pub struct Vault {
    metrics: Arc<crate::metrics::Metrics>,
    settings: VaultSettings,
    client: RwLock<Arc<VaultClient>>,
    login: Mutex<Login>,
    /// Until when the current login needs no look (no lock, no stat).
    fresh_until: std::sync::Mutex<Option<Instant>>,
    reach: std::sync::Mutex<Reachability>,
}

/// What the broker knows of Vault's reachability. Its own requests (KV
/// polls, issues, renewals) are the main evidence; a token self-lookup is
/// sent only when none succeeded for `health_check_interval`, so an idle
/// broker costs Vault one request per interval, not a stream of checks.
#[derive(Default)]
struct Reachability {
    last_ok: Option<Instant>,
    /// When Vault last answered a peer's own requests, as the peer said.
    peer_ok: Option<Instant>,
    last_check: Option<Instant>,
    down: bool,
}

/// How often an unreachable Vault is checked again.
const DOWN_CHECK: Duration = Duration::from_secs(2);

impl Reachability {
    /// Whether to check Vault at `now` (and if so, note the check): every
    /// [`DOWN_CHECK`] while it is down, else only when neither a request
    /// nor a check succeeded within `idle`, and no peer said within twice
    /// that (a peer checks on its own once an interval, and says so a little
    /// later) that Vault answered its own. A peer's word never brings a
    /// Vault this replica found down back up: only its own check does.
    fn check_due(&mut self, now: Instant, idle: Duration) -> bool {
        let since = |at: Option<Instant>| at.map_or(Duration::MAX, |at| now - at);
        let due = if self.down {
            since(self.last_check) >= DOWN_CHECK
        } else {
            since(self.last_ok) >= idle
                && since(self.peer_ok) >= idle * 2
                && since(self.last_check) >= idle
        };
        if due {
            self.last_check = Some(now);
        }
        due
    }
}

impl Vault {
    /// Builds the client; the first request logs in.
    ///
    /// The process-wide rustls provider must be installed first (vaultrs is
    /// built without one so that only ring is linked).
    ///
    /// # Errors
    /// When the address or CA bundle is unusable.
    pub fn new(
        settings: VaultSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, VaultError> {
        let client = Self::client(&settings, &Secret::default())?;
        Ok(Self {
            metrics,
            settings,
            client: RwLock::new(Arc::new(client)),
            login: Mutex::new(Login::default()),
            fresh_until: std::sync::Mutex::default(),
            reach: std::sync::Mutex::default(),
        })
    }

    fn client(settings: &VaultSettings, token: &Secret) -> Result<VaultClient, VaultError> {
        let mut builder = VaultClientSettingsBuilder::default();
        builder
            .address(&settings.address)
            .namespace(settings.namespace.clone())
            .token(token.expose_str().unwrap_or_default())
            .timeout(Some(settings.timeout))
            .verify(true)
            .ca_certs(
                settings
                    .ca_cert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            );
        // Never format the settings: their Debug prints the token.
        let built = builder.build().map_err(|e| {
            VaultError::Login(format!(
                "invalid Vault settings (address `{}`): {e}",
                settings.address
            ))
        })?;
        VaultClient::new(built).map_err(|e| VaultError::Login(error_chain(&e)))
    }

    /// Executes `endpoint` with the current token in `scope` (its caller
    /// stamped into the audited caller header, its namespace sent), and keeps Vault's whole answer (lease id, duration, renewability).
    ///
    /// # Errors
    /// A [`VaultError`]; a 403 also forgets the login so the next request logs in again.
    pub async fn exec<E: Endpoint>(
        &self,
        endpoint: E,
        what: &str,
        scope: Scope<'_>,
    ) -> Result<EndpointResult<E::Response>, VaultError> {
        self.send(endpoint, what, scope, |response| {
            response
                .wrap::<EndpointResult<E::Response>>()
                .map_err(ClientError::from)
        })
        .await
    }

    /// Executes an endpoint that answers with no body (204).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn exec_empty<E: Endpoint>(
        &self,
        endpoint: E,
        what: &str,
        scope: Scope<'_>,
    ) -> Result<(), VaultError> {
        self.send(endpoint, what, scope, |_| Ok(())).await
    }

    /// Sends `endpoint` with the current token and `caller` stamped, timed
    /// and counted; `read` turns Vault's answer into the result.
    async fn send<E: Endpoint, T>(
        &self,
        endpoint: E,
        what: &str,
        scope: Scope<'_>,
        read: impl FnOnce(rustify::endpoint::EndpointResult<E::Response>) -> Result<T, ClientError>,
    ) -> Result<T, VaultError> {
        let client = self.authed().await?;
        let stamped = Stamped::new(&client, &self.settings.cluster, scope);
        let started = Instant::now();
        let result = endpoint
            .with_middleware(&stamped)
            .exec(client.http())
            .instrument(vault_span(operation::<E>()))
            .await
            .map_err(api_error)
            .and_then(read);
        self.metrics.vault_request(
            operation::<E>(),
            started.elapsed().as_secs_f64(),
            result.is_err(),
        );
        match result {
            Ok(result) => {
                self.answered();
                Ok(result)
            }
            // A pod's token refused is no reason to log the broker in again.
            Err(e) if scope.token.is_some() => Err(VaultError::from_client(what, e)),
            Err(e) => Err(self.failed(what, e).await),
        }
    }

    /// Whether Vault answers with the broker's credentials (a token self-lookup).
    async fn ping(&self) -> Result<(), VaultError> {
        let client = self.authed().await?;
        let started = Instant::now();
        let result = vaultrs::token::lookup_self(client.as_ref()).await;
        self.metrics.vault_request(
            "LookupTokenSelfRequest",
            started.elapsed().as_secs_f64(),
            result.is_err(),
        );
        match result {
            Ok(_) => {
                self.answered();
                Ok(())
            }
            Err(e) => Err(self.failed("auth/token/lookup-self", e).await),
        }
    }

    /// Classifies a failed request; a 403 also forgets the login so the next
    /// request logs in again.
    async fn failed(&self, what: &str, error: ClientError) -> VaultError {
        let error = VaultError::from_client(what, error);
        match error {
            VaultError::Denied(_) => self.invalidate().await,
            VaultError::Unavailable(_) => self.reach().down = true,
            // Vault answered, with the broker's credentials: nothing there,
            // or not that way. (The change feed's canary reads a path where
            // nothing is, by design.)
            VaultError::NotFound(_) | VaultError::Invalid(_) => self.answered(),
            _ => {}
        }
        error
    }

    fn reach(&self) -> std::sync::MutexGuard<'_, Reachability> {
        self.reach.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long ago Vault last answered this replica's own requests.
    pub fn answered_ago(&self) -> Option<Duration> {
        self.reach().last_ok.map(|at| at.elapsed())
    }

    /// A peer's word that Vault answered its own requests `ago`: among
    /// peers an idle replica needs no health check of its own while
    /// another's requests show Vault answers (more replicas, no more
    /// requests). A failed request of its own still marks Vault down.
    pub fn peer_answered(&self, ago: Duration) {
        let at = Instant::now().checked_sub(ago);
        let mut reach = self.reach();
        if at > reach.peer_ok {
            reach.peer_ok = at;
        }
    }

    /// How long an idle replica goes without a health check
    /// (`vault.healthCheckInterval`).
    pub fn health_check_interval(&self) -> Duration {
        self.settings.health_check_interval
    }

    /// Records that Vault answered a request.
    fn answered(&self) {
        let mut reach = self.reach();
        reach.last_ok = Some(Instant::now());
        reach.down = false;
    }

    /// Whether Vault answers the broker: from its recent requests, checked
    /// with a token self-lookup only when none succeeded within the health
    /// check interval (every 2 s while Vault is down). Call it often; it
    /// rarely sends anything.
    pub async fn reachable(&self) -> bool {
        let due = self
            .reach()
            .check_due(Instant::now(), self.settings.health_check_interval);
        if due && let Err(error) = self.ping().await {
            tracing::warn!(%error, "Vault health check failed");
            self.reach().down = true;
        }
        !self.reach().down
    }
}

#[cfg(test)]
mod tests;
