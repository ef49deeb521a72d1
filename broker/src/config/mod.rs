//! The broker's configuration file (`serve --config FILE`), read and validated
//! before anything starts.

use std::{
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use self::sections::{BootstrapFile, ConnectionsFile, LeasesFile, MemoryFile};

use crate::{
    audit::AuditTarget,
    bootstrap,
    lease::LeaseSettings,
    listener::ConnectionLimits,
    ratelimit::RateLimit,
    tls::TlsSettings,
    vault::{VaultAuth, VaultSettings},
};

pub(crate) use file::duration;
use file::{File, MIN_RELOAD_INTERVAL, SourceName, cluster_name};

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {detail}")]
pub struct ConfigError {
    /// The configuration file that was refused.
    pub path: String,
    /// What is wrong and how to fix it.
    pub detail: String,
}

/// Where tokens are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// A JWKS file with the cluster's signing keys.
    JwksFile(PathBuf),
    /// The API server's OIDC discovery (`/.well-known/openid-configuration`).
    OidcDiscovery,
    /// The API server's TokenReview.
    TokenReview,
}

/// How callers are identified.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Required token issuer (JWKS and OIDC sources).
    pub issuer: String,
    /// Audiences accepted: a token must be minted for one of them.
    pub audiences: Vec<String>,
    /// Clock skew tolerated on token times.
    pub leeway: Duration,
    /// Where tokens are checked.
    pub source: IdentitySource,
    /// Look each caller's pod up (labels; deleted pods refused at once).
    pub pod_lookup: bool,
    /// How long a verified token is remembered at most; until it expires when
    /// absent (10s by default with TokenReview or pod lookup).
    pub cache_ttl: Option<Duration>,
    /// Least time between two key refreshes caused by unknown key ids (OIDC).
    pub key_refresh_interval: Duration,
}

impl IdentityConfig {
    /// Whether the Kubernetes API is needed.
    pub fn needs_kubernetes(&self) -> bool {
        self.pod_lookup || !matches!(self.source, IdentitySource::JwksFile(_))
    }
}

/// How often the broker checks for drift, and where pods opt in.
#[derive(Clone, Debug)]
pub struct DriftSettings {
    /// Between two checks (`drift.interval`).
    pub interval: Duration,
    /// The label of namespaces that opt in to injection (`key=value`).
    pub namespace_label: String,
}

/// The validated broker configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This Kubernetes cluster's name (`cluster.name`): it files the lease
    /// records apart from other clusters' in a shared Vault and is named in
    /// every audit line and Vault request.
    pub cluster: String,
    /// Address the gRPC server listens on (used by `main`; tests pass their own listener).
    pub listen: SocketAddr,
    /// Serving certificate and optional client CA (mTLS).
    pub tls: TlsSettings,
    /// How often the certificate files are checked for changes.
    pub tls_reload_interval: Duration,
    /// How callers are identified.
    pub identity: IdentityConfig,
    /// Kubeconfig for the Kubernetes API; in-cluster configuration when absent.
    pub kubeconfig: Option<PathBuf>,
    /// The access policy: files and/or directories.
    pub policy_paths: Vec<PathBuf>,
    /// How often the policy files are checked for changes.
    pub policy_reload_interval: Duration,
    /// Whether the policy also comes from `ClusterAccessPolicy` and
    /// `AccessBinding` resources (`policy.resources`).
    pub policy_resources: bool,
    /// Where Vault is, how the broker logs in, how often it polls and checks it.
    pub vault: VaultSettings,
    /// How often a watched KV secret's version is checked.
    pub kv_poll_interval: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Where audit events go.
    pub audit: AuditTarget,
    /// Per-identity request limit.
    pub rate_limit: RateLimit,
    /// Key shared by the replicas to seal lease handles; a random per-process
    /// key when absent (one replica, handles die with it).
    pub handle_key_file: Option<PathBuf>,
    /// Keys the current one replaced: their handles still open.
    pub retired_handle_key_files: Vec<PathBuf>,
    /// Where leases are recorded, how many a pod may hold, how often they are swept.
    pub leases: LeaseSettings,
    /// Plain-HTTP admin address for `/metrics`, `/livez` and `/readyz`; none when absent.
    pub admin_listen: Option<SocketAddr>,
    /// The admission webhook; not served when absent.
    pub webhook: Option<webhook::Settings>,
    /// Vault's change feed (`vault.changeFeed:`): its audit device posting
    /// to the broker; KV secrets are only polled when absent.
    pub change_feed: Option<crate::change_feed::ChangeFeedSettings>,
    /// The replicas this one shares the reading of Vault with (`peers:`);
    /// alone when absent.
    pub peers: Option<crate::peers::PeerSettings>,
    /// The periodic drift check (`drift:`); off when absent.
    pub drift: Option<DriftSettings>,
    /// Limits on each listener's connections.
    pub connections: ConnectionLimits,
    /// Whether to lock memory where allowed (`memory.lock`).
    pub memory_lock: tessera_memory::Lock,
    /// Secrets the broker creates and shares (CA, certificate, handle key).
    pub bootstrap: Option<bootstrap::Settings>,
}

impl Config {
    /// Reads and validates a configuration file. Relative paths in it are
    /// resolved against the file's directory.
    ///
    /// # Errors
    /// When the file cannot be read, does not parse, or is inconsistent.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let error = |detail: String| ConfigError {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let file: File = serde_saphyr::from_str(&text).map_err(|e| error(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let auth = match (file.vault.token_file, file.vault.app_role, file.vault.jwt) {
            (Some(token_file), None, None) => VaultAuth::TokenFile(resolve(token_file)),
            (None, Some(role), None) => VaultAuth::AppRole {
                mount: role.mount,
                role_id: role.role_id,
                secret_id_file: resolve(role.secret_id_file),
            },
            (None, None, Some(jwt)) => VaultAuth::Jwt {
                mount: jwt.mount,
                role: jwt.role,
                token_file: resolve(jwt.token_file),
            },
            _ => {
                return Err(error(
                    "vault: set exactly one of `tokenFile`, `appRole` or `jwt`".to_owned(),
                ));
            }
        };
        if !file.vault.address.starts_with("http://") && !file.vault.address.starts_with("https://")
        {
            return Err(error(format!(
                "vault.address `{}` must start with http:// or https://",
                file.vault.address
            )));
        }
        let id = file.identity;
        if id.issuer.is_empty()
            || id.audiences.is_empty()
            || id.audiences.iter().any(String::is_empty)
        {
            return Err(error(
                "identity: `issuer` and `audiences` must not be empty".to_owned(),
            ));
        }
        let source = match (id.source, id.jwks_file) {
            (SourceName::JwksFile, Some(path)) => IdentitySource::JwksFile(resolve(path)),
            (SourceName::JwksFile, None) => {
                return Err(error(
                    "identity.source jwksFile needs identity.jwksFile".to_owned(),
                ));
            }
            (SourceName::OidcDiscovery, None) => IdentitySource::OidcDiscovery,
            (SourceName::TokenReview, None) => IdentitySource::TokenReview,
            (_, Some(_)) => {
                return Err(error(
                    "identity.jwksFile is only used with identity.source: jwksFile (remove it)"
                        .to_owned(),
                ));
            }
        };
        let uses_api = id.pod_lookup || !matches!(source, IdentitySource::JwksFile(_));
        let identity = IdentityConfig {
            issuer: id.issuer,
            audiences: id.audiences,
            leeway: id.leeway,
            cache_ttl: id.cache_ttl.or(uses_api.then_some(Duration::from_secs(10))),
            source,
            pod_lookup: id.pod_lookup,
            key_refresh_interval: id.key_refresh_interval,
        };
        if file.policy.paths.is_empty() && !file.policy.resources {
            return Err(error(
                "policy.paths is empty (name the policy file or directory, or set policy.resources: true to read ClusterAccessPolicy and AccessBinding resources)".to_owned(),
            ));
        }
        for (name, interval) in [
            ("policy.reloadInterval", file.policy.reload_interval),
            ("tls.reloadInterval", file.tls.reload_interval),
            ("vault.timeout", file.vault.timeout),
        ] {
            if interval < MIN_RELOAD_INTERVAL {
                return Err(error(format!(
                    "{name} must be at least 100ms (it is {})",
                    humantime::format_duration(interval)
                )));
            }
        }
        if file.vault.health_check_interval < Duration::from_secs(1) {
            return Err(error(
                "vault.healthCheckInterval must be at least 1s".to_owned(),
            ));
        }
        if file.vault.kv_poll_interval < Duration::from_millis(100) {
            return Err(error(
                "vault.kvPollInterval must be at least 100ms".to_owned(),
            ));
        }
        let connections = file.connections.limits().map_err(error)?;
        let cluster = cluster_name(file.cluster).map_err(error)?;
        let mut leases = file.leases.settings().map_err(error)?;
        leases.cluster.clone_from(&cluster);
        let (Some(per_second), Some(burst)) = (
            NonZeroU32::new(file.rate_limit.per_second),
            NonZeroU32::new(file.rate_limit.burst),
        ) else {
            return Err(error(
                "rateLimit.perSecond and rateLimit.burst must be at least 1".to_owned(),
            ));
        };
        let tls = TlsSettings {
            cert: resolve(file.tls.cert_file),
            key: resolve(file.tls.key_file),
            client_ca: file.tls.client_ca_file.map(resolve),
        };
        let webhook = file
            .webhook
            .map(|w| w.validate(resolve, &tls, &identity.audiences, identity.pod_lookup))
            .transpose()
            .map_err(error)?;
        let handle_key_file = file.leases.handle_key_file.clone().map(&resolve);
        let bootstrap = file
            .bootstrap
            .map(|b| {
                b.settings(
                    resolve,
                    &tls,
                    handle_key_file.as_deref(),
                    webhook.as_ref().map(|w| w.injection.ca_file.as_path()),
                )
            })
            .transpose()
            .map_err(error)?;
        let change_feed =
            file.vault
                .change_feed
                .map(|feed| crate::change_feed::ChangeFeedSettings {
                    listen: feed.listen,
                    token_file: feed.token_file.map(&resolve),
                    backstop: feed.backstop_interval,
                    check_interval: feed.check_interval,
                });
        let peers = file
            .peers
            .map(peer_settings(&resolve))
            .transpose()
            .map_err(error)?;
        let audit = match file.audit.path.as_str() {
            "-" => AuditTarget::Stdout,
            path => AuditTarget::File(resolve(PathBuf::from(path))),
        };
        Ok(Self {
            cluster: cluster.clone(),
            audit,
            rate_limit: RateLimit { per_second, burst },
            listen: file.listen,
            tls,
            webhook,
            peers,
            drift: file.drift.map(|drift| DriftSettings {
                interval: drift.interval,
                namespace_label: drift.namespace_label,
            }),
            change_feed,
            tls_reload_interval: file.tls.reload_interval,
            identity,
            kubeconfig: file.kubernetes.kubeconfig.map(resolve),
            handle_key_file,
            bootstrap,
            retired_handle_key_files: file
                .leases
                .retired_handle_key_files
                .iter()
                .cloned()
                .map(resolve)
                .collect(),
            leases,
            admin_listen: file.admin.listen,
            policy_paths: file.policy.paths.into_iter().map(resolve).collect(),
            policy_reload_interval: file.policy.reload_interval,
            policy_resources: file.policy.resources,
            vault: VaultSettings {
                address: file.vault.address,
                namespace: match file.vault.namespace {
                    Some(namespace) if !crate::policy::is_namespace_path(&namespace) => {
                        return Err(error(format!(
                            "vault.namespace `{namespace}` must be a namespace path like `team-a` or `org/team-a` (letters, digits, `-` and `_` between slashes)"
                        )));
                    }
                    namespace => namespace,
                },
                ca_cert: file.vault.ca_cert_file.map(resolve),
                auth,
                timeout: file.vault.timeout,
                health_check_interval: file.vault.health_check_interval,
                cluster,
            },
            kv_poll_interval: file.vault.kv_poll_interval,
            shutdown_grace: file.shutdown_grace,
            connections,
            memory_lock: if file.memory.lock {
                tessera_memory::Lock::IfAllowed
            } else {
                tessera_memory::Lock::Off
            },
        })
    }
}

/// `peers:`, checked: one source of addresses, and this replica among
/// the static ones.
fn peer_settings(
    resolve: &impl Fn(PathBuf) -> PathBuf,
) -> impl FnOnce(file::PeersFile) -> Result<crate::peers::PeerSettings, String> + '_ {
    move |peers| {
        use crate::peers::PeerAddresses;
        let addresses = match (peers.addresses, peers.endpoint_slices) {
            (Some(addresses), None) => {
                if !addresses.contains(&peers.advertise) {
                    return Err(format!(
                        "peers.advertise `{}` is not in peers.addresses: list every replica's peer address, this one's too, so every replica computes the same owners",
                        peers.advertise
                    ));
                }
                PeerAddresses::Static(addresses)
            }
            (None, Some(slices)) => PeerAddresses::EndpointSlices {
                namespace: slices.namespace,
                service: slices.service,
                port: slices.port,
            },
            _ => {
                return Err(
                    "peers needs one of `addresses` (every replica's) or `endpointSlices` (the broker's Service)"
                        .to_owned(),
                );
            }
        };
        Ok(crate::peers::PeerSettings {
            listen: peers.listen,
            advertise: peers.advertise,
            addresses,
            cert: resolve(peers.tls.cert_file),
            key: resolve(peers.tls.key_file),
            ca: resolve(peers.tls.ca_file),
        })
    }
}

mod file;
mod sections;
#[cfg(test)]
mod tests;
pub mod webhook;
