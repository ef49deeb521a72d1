//! The configuration file as written: its blocks, their defaults, and the
//! duration parser every block uses.

#[allow(clippy::wildcard_imports)]
use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct File {
    #[serde(default = "default_listen")]
    pub(super) listen: SocketAddr,
    pub(super) tls: TlsFile,
    pub(super) identity: IdentityFile,
    pub(super) policy: PolicyFile,
    pub(super) vault: VaultFile,
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub(super) shutdown_grace: Duration,
    #[serde(default)]
    pub(super) audit: AuditFile,
    #[serde(default)]
    pub(super) rate_limit: RateLimitFile,
    #[serde(default)]
    pub(super) kubernetes: KubernetesFile,
    #[serde(default)]
    pub(super) leases: LeasesFile,
    #[serde(default)]
    pub(super) admin: AdminFile,
    #[serde(default)]
    pub(super) connections: ConnectionsFile,
    #[serde(default)]
    pub(super) memory: MemoryFile,
    pub(super) webhook: Option<webhook::WebhookFile>,
    pub(super) bootstrap: Option<BootstrapFile>,
    pub(super) cluster: Option<ClusterFile>,
    pub(super) peers: Option<PeersFile>,
    pub(super) drift: Option<DriftFile>,
}

/// `drift:`: the broker checks for drift itself and reports it as metrics.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DriftFile {
    #[serde(default = "default_drift_interval", deserialize_with = "duration")]
    pub(super) interval: Duration,
    #[serde(default = "default_namespace_label")]
    pub(super) namespace_label: String,
}

fn default_drift_interval() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_namespace_label() -> String {
    "tessera.dev/injection=enabled".to_owned()
}

/// `peers:`: the replicas that share the reading of Vault.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PeersFile {
    pub(super) listen: SocketAddr,
    pub(super) advertise: String,
    pub(super) addresses: Option<Vec<String>>,
    pub(super) endpoint_slices: Option<EndpointSlicesFile>,
    pub(super) tls: PeerTlsFile,
}

/// `peers.endpointSlices:`: the broker's Service, whose endpoints are the peers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct EndpointSlicesFile {
    pub(super) namespace: String,
    pub(super) service: String,
    #[serde(default = "default_peer_port_name")]
    pub(super) port: String,
}

fn default_peer_port_name() -> String {
    "peer".to_owned()
}

/// `peers.tls:`: the peer certificate and the CA that signs them all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PeerTlsFile {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    pub(super) ca_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ClusterFile {
    pub(super) name: String,
}

/// Checks `cluster.name`: a DNS label (lowercase letters, digits and `-`,
/// at most 63), so it is safe in Vault paths, headers and audit lines.
pub(super) fn cluster_name(file: Option<ClusterFile>) -> Result<String, String> {
    let Some(ClusterFile { name }) = file else {
        return Err(
            "cluster.name is required: name this Kubernetes cluster (e.g. prod-eu-1); it keeps this cluster's lease records apart from other clusters' in a shared Vault (docs/install.md, \"Several clusters on one Vault\")".to_owned(),
        );
    };
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if label {
        Ok(name)
    } else {
        Err(format!(
            "cluster.name `{}` is not a DNS label (lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit)",
            name.escape_debug()
        ))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AdminFile {
    pub(super) listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AuditFile {
    /// `-` for standard output, else a file appended to.
    #[serde(default = "default_audit_path")]
    pub(super) path: String,
}

impl Default for AuditFile {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RateLimitFile {
    #[serde(default = "default_per_second")]
    pub(super) per_second: u32,
    #[serde(default = "default_burst")]
    pub(super) burst: u32,
}

impl Default for RateLimitFile {
    fn default() -> Self {
        Self {
            per_second: default_per_second(),
            burst: default_burst(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicyFile {
    #[serde(default)]
    pub(super) paths: Vec<PathBuf>,
    /// Read `ClusterAccessPolicy` and `AccessBinding` resources too.
    #[serde(default)]
    pub(super) resources: bool,
    #[serde(default = "default_reload", deserialize_with = "duration")]
    pub(super) reload_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct TlsFile {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    pub(super) client_ca_file: Option<PathBuf>,
    #[serde(default = "default_reload", deserialize_with = "duration")]
    pub(super) reload_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct IdentityFile {
    pub(super) issuer: String,
    pub(super) audiences: Vec<String>,
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub(super) leeway: Duration,
    #[serde(default)]
    pub(super) source: SourceName,
    pub(super) jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) pod_lookup: bool,
    #[serde(default, deserialize_with = "optional_duration")]
    pub(super) cache_ttl: Option<Duration>,
    #[serde(default = "default_key_refresh", deserialize_with = "duration")]
    pub(super) key_refresh_interval: Duration,
}

pub(super) fn default_key_refresh() -> Duration {
    Duration::from_secs(10)
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(super) enum SourceName {
    #[default]
    JwksFile,
    OidcDiscovery,
    TokenReview,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct KubernetesFile {
    pub(super) kubeconfig: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VaultFile {
    pub(super) address: String,
    pub(super) namespace: Option<String>,
    pub(super) ca_cert_file: Option<PathBuf>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) app_role: Option<AppRoleFile>,
    pub(super) jwt: Option<JwtFile>,
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub(super) timeout: Duration,
    #[serde(default = "default_poll", deserialize_with = "duration")]
    pub(super) kv_poll_interval: Duration,
    #[serde(default = "default_health_check", deserialize_with = "duration")]
    pub(super) health_check_interval: Duration,
    pub(super) change_feed: Option<ChangeFeedFile>,
}

/// `vault.changeFeed:`: Vault's audit device posting to the broker.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ChangeFeedFile {
    pub(super) listen: SocketAddr,
    pub(super) token_file: Option<PathBuf>,
    #[serde(default = "default_backstop", deserialize_with = "duration")]
    pub(super) backstop_interval: Duration,
    #[serde(default = "default_feed_check", deserialize_with = "duration")]
    pub(super) check_interval: Duration,
}

fn default_backstop() -> Duration {
    Duration::from_secs(300)
}

fn default_feed_check() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AppRoleFile {
    #[serde(default = "default_approle_mount")]
    pub(super) mount: String,
    pub(super) role_id: String,
    pub(super) secret_id_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct JwtFile {
    #[serde(default = "default_jwt_mount")]
    pub(super) mount: String,
    pub(super) role: String,
    pub(super) token_file: PathBuf,
}

pub(super) fn default_jwt_mount() -> String {
    "jwt".to_owned()
}

pub(super) fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
pub(super) fn default_grace() -> Duration {
    Duration::from_secs(20)
}
pub(super) fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_poll() -> Duration {
    Duration::from_secs(15)
}
pub(super) fn default_health_check() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_reload() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_audit_path() -> String {
    "-".to_owned()
}
pub(super) fn default_per_second() -> u32 {
    5
}
pub(super) fn default_burst() -> u32 {
    20
}
pub(super) fn default_approle_mount() -> String {
    "approle".to_owned()
}

/// The longest duration a configuration may name: every interval, timeout
/// and grace period the broker has is far shorter.
pub(super) const MAX_CONFIG_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The shortest interval between two re-reads of a file (policy, TLS).
pub(super) const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let parsed = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("`{text}` is not a duration like 30s or 5m: {e}"))
    })?;
    if parsed > MAX_CONFIG_DURATION {
        return Err(serde::de::Error::custom(format!(
            "`{text}` is longer than 24h, the most any setting here takes"
        )));
    }
    Ok(parsed)
}

pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}
