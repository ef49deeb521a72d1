//! The broker's configuration file as the harness writes it: typed, edited
//! field by field (a replica's ports, a retired handle key, connection
//! limits) and written as JSON, which the broker's YAML reader takes as is.
//! Paths are relative to the environment's directory, as the broker resolves
//! them against the file's own directory.

use serde::Serialize;

use super::*;

/// `broker.yaml`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerConfig {
    /// This cluster's name.
    pub cluster: ClusterConfig,
    /// gRPC address.
    pub listen: String,
    /// Serving certificate.
    pub tls: TlsConfig,
    /// How callers are identified.
    pub identity: IdentityConfig,
    /// The policy directory.
    pub policy: PolicyConfig,
    /// Vault.
    pub vault: VaultConfig,
    /// How long shutdown waits.
    pub shutdown_grace: String,
    /// The audit log.
    pub audit: AuditConfig,
    /// The per-pod rate limit.
    pub rate_limit: RateLimitConfig,
    /// Handle keys and lease records.
    pub leases: LeasesConfig,
    /// The admin endpoints.
    pub admin: AdminConfig,
    /// The injection webhook.
    pub webhook: WebhookConfig,
    /// The Kubernetes API stand-in, when the environment has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
    /// Secrets the broker makes itself, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapConfig>,
    /// Connection limits; the broker's defaults when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionsConfig>,
    /// Memory locking; the broker's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    /// The replicas it shares the reading of Vault with; alone when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<PeersConfig>,
    /// The broker's own periodic drift check; off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftConfig>,
}

/// `drift:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftConfig {
    /// Between two checks.
    pub interval: String,
}

/// `peers:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeersConfig {
    /// Where the peer channel listens.
    pub listen: String,
    /// This replica's peer address.
    pub advertise: String,
    /// Every replica's peer address, for a static list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    /// The Service whose EndpointSlices list the peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_slices: Option<EndpointSlicesConfig>,
    /// The peer certificate and CA.
    pub tls: PeerTlsConfig,
}

/// `peers.endpointSlices:`.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointSlicesConfig {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
}

/// `peers.tls:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerTlsConfig {
    /// PEM chain.
    pub cert_file: String,
    /// PEM key.
    pub key_file: String,
    /// The peer CA.
    pub ca_file: String,
}

/// `cluster:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    /// `cluster.name`.
    pub name: String,
}

/// `tls:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    /// PEM chain.
    pub cert_file: String,
    /// PEM key.
    pub key_file: String,
    /// How often the files are checked.
    pub reload_interval: String,
    /// mTLS: the CA client certificates must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<String>,
}

/// Where tokens are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentitySource {
    /// The dev JWKS file.
    JwksFile,
    /// The API server's OIDC discovery.
    OidcDiscovery,
    /// The API server's TokenReview.
    TokenReview,
}

/// `identity:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityConfig {
    /// Token issuer.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Where tokens are checked.
    pub source: IdentitySource,
    /// The JWKS (source `jwksFile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// Clock skew tolerated.
    pub leeway: String,
    /// Look each caller's pod up.
    pub pod_lookup: bool,
    /// How long a verified token is remembered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<String>,
    /// Least time between two key refreshes (OIDC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_refresh_interval: Option<String>,
}

/// `policy:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConfig {
    /// Files and directories.
    pub paths: Vec<String>,
    /// How often they are checked.
    pub reload_interval: String,
    /// Whether ClusterAccessPolicy and AccessBinding resources are read too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resources: bool,
}

/// How the broker logs in to Vault.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum VaultLogin {
    /// A token in a file.
    TokenFile(String),
    /// AppRole.
    #[serde(rename_all = "camelCase")]
    AppRole {
        /// The role id.
        role_id: String,
        /// The file holding the secret id.
        secret_id_file: String,
    },
    /// JWT auth with the broker's own token.
    #[serde(rename_all = "camelCase")]
    Jwt {
        /// The Vault role.
        role: String,
        /// The broker's service-account token.
        token_file: String,
    },
}

/// `vault:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultConfig {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The login.
    #[serde(flatten)]
    pub login: VaultLogin,
    /// How often a KV secret's version is checked.
    pub kv_poll_interval: String,
    /// Longest time without a Vault answer before checking.
    pub health_check_interval: String,
    /// Vault's change feed, when the environment has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_feed: Option<ChangeFeedConfig>,
}

/// `vault.changeFeed:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeFeedConfig {
    /// Where the broker takes the audit device's posts.
    pub listen: String,
    /// Polling while the feed is up.
    pub backstop_interval: String,
    /// How often the canary checks the feed.
    pub check_interval: String,
}

/// `audit:`.
#[derive(Clone, Debug, Serialize)]
pub struct AuditConfig {
    /// The file, or `-`.
    pub path: String,
}

/// `rateLimit:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    /// Requests per second per pod.
    pub per_second: u32,
    /// Burst.
    pub burst: u32,
}

/// `leases:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeasesConfig {
    /// The shared handle key (absent with `bootstrap`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle_key_file: Option<String>,
    /// Keys it replaced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired_handle_key_files: Vec<String>,
    /// How often owed revocations are swept.
    pub sweep_interval: String,
    /// How often a sweep reads every record.
    pub full_sweep_interval: String,
}

/// `admin:`.
#[derive(Clone, Debug, Serialize)]
pub struct AdminConfig {
    /// Plain-HTTP address.
    pub listen: String,
}

/// `webhook:`.
#[derive(Clone, Debug, Serialize)]
pub struct WebhookConfig {
    /// HTTPS address.
    pub listen: String,
    /// What is injected.
    pub sidecar: SidecarConfig,
}

/// `webhook.sidecar:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarConfig {
    /// Image.
    pub image: String,
    /// The broker address injected sidecars dial.
    pub broker_address: String,
    /// The CA they trust.
    pub ca_file: String,
    /// `native`, `classic` or `auto`.
    pub mode: String,
}

/// `kubernetes:`.
#[derive(Clone, Debug, Serialize)]
pub struct KubernetesConfig {
    /// The stand-in's kubeconfig.
    pub kubeconfig: String,
}

/// `bootstrap:`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapConfig {
    /// The Secrets' namespace.
    pub namespace: String,
    /// Where the files are written.
    pub directory: String,
    /// The TLS Secret.
    pub tls_secret: String,
    /// The certificate's names.
    pub dns_names: Vec<String>,
    /// The handle-key Secret.
    pub handle_key_secret: String,
    /// The webhook configuration whose caBundle is kept.
    pub webhook_configuration: String,
    /// How often they are checked.
    pub check_interval: String,
}

/// `connections:`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsConfig {
    /// Most connections per listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<usize>,
    /// TLS handshake deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_timeout: Option<String>,
    /// Idle connections are closed after this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// gRPC connections are recycled after this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// `memory:`.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryConfig {
    /// mlockall when allowed.
    pub lock: bool,
}

impl BrokerConfig {
    /// Writes the file `name` in `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        fs::write(dir.join(name), serde_json::to_string_pretty(self).unwrap()).unwrap();
    }
}
