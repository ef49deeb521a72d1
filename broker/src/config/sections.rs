//! The `bootstrap:`, `connections:`, `leases:` and `memory:` blocks of the
//! configuration file, with their defaults and the checks that turn them into
//! settings.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::duration;
use crate::{bootstrap, lease::LeaseSettings, listener::ConnectionLimits, tls::TlsSettings};

/// `bootstrap:`: the Secrets the broker creates and shares across replicas
/// instead of the chart rendering them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct BootstrapFile {
    namespace: String,
    directory: PathBuf,
    tls_secret: Option<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    handle_key_secret: Option<String>,
    #[serde(default = "default_true")]
    create_handle_key: bool,
    webhook_configuration: Option<String>,
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    check_interval: Duration,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(60)
}

impl BootstrapFile {
    /// The settings, checked against the files the rest of the
    /// configuration names (`tls`, the handle key, the webhook's CA).
    pub(super) fn settings(
        self,
        resolve: impl Fn(PathBuf) -> PathBuf,
        tls: &TlsSettings,
        handle_key_file: Option<&Path>,
        webhook_ca_file: Option<&Path>,
    ) -> Result<bootstrap::Settings, String> {
        let settings = bootstrap::Settings {
            namespace: self.namespace,
            directory: resolve(self.directory),
            tls_secret: self.tls_secret,
            dns_names: self.dns_names,
            handle_key_secret: self.handle_key_secret,
            create_handle_key: self.create_handle_key,
            ca_file: self
                .webhook_configuration
                .as_ref()
                .and(webhook_ca_file.map(Path::to_owned)),
            webhook_configuration: self.webhook_configuration,
            check_interval: self.check_interval,
        };
        if settings.namespace.is_empty() {
            return Err("bootstrap.namespace must name the broker's namespace".to_owned());
        }
        if settings.tls_secret.is_some() {
            if settings.dns_names.is_empty() {
                return Err("bootstrap.dnsNames must list the Service's DNS names (the serving certificate is made for them)".to_owned());
            }
            if tls.cert != settings.cert_file() || tls.key != settings.key_file() {
                return Err(format!(
                    "with bootstrap.tlsSecret, tls.certFile and tls.keyFile must be {} and {} (the broker writes them there)",
                    settings.cert_file().display(),
                    settings.key_file().display()
                ));
            }
        }
        if settings.handle_key_secret.is_some() && handle_key_file.is_some() {
            return Err(
                "set either bootstrap.handleKeySecret or leases.handleKeyFile, not both".to_owned(),
            );
        }
        if settings.webhook_configuration.is_some() && settings.ca_file.is_none() {
            return Err("bootstrap.webhookConfiguration needs the webhook (its caBundle is set to webhook.sidecar.caFile)".to_owned());
        }
        if settings.check_interval < Duration::from_secs(1) {
            return Err("bootstrap.checkInterval must be at least 1s".to_owned());
        }
        Ok(settings)
    }
}

/// `memory:`: how the process keeps secrets out of swap.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct MemoryFile {
    /// Lock memory (`mlockall`) when the process may.
    #[serde(default = "default_true")]
    pub(super) lock: bool,
}

impl Default for MemoryFile {
    fn default() -> Self {
        Self { lock: true }
    }
}

pub(super) fn default_true() -> bool {
    true
}

/// `connections:`: limits on each listener (gRPC and webhook).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ConnectionsFile {
    #[serde(default = "default_max_connections")]
    pub(super) max: usize,
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub(super) handshake_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "default_max_age", deserialize_with = "duration")]
    pub(super) max_age: Duration,
}

impl Default for ConnectionsFile {
    fn default() -> Self {
        Self {
            max: default_max_connections(),
            handshake_timeout: default_handshake_timeout(),
            idle_timeout: default_idle_timeout(),
            max_age: default_max_age(),
        }
    }
}

fn default_max_connections() -> usize {
    ConnectionLimits::default().max
}
fn default_handshake_timeout() -> Duration {
    ConnectionLimits::default().handshake_timeout
}
fn default_idle_timeout() -> Duration {
    ConnectionLimits::default().idle_timeout
}
fn default_max_age() -> Duration {
    ConnectionLimits::default().max_age
}

/// `leases:`: the handle key, and where and how leases are recorded.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LeasesFile {
    pub(super) handle_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) retired_handle_key_files: Vec<PathBuf>,
    #[serde(default = "default_record_mount")]
    pub(super) record_mount: String,
    #[serde(default = "default_max_per_pod_binding")]
    pub(super) max_per_pod_binding: usize,
    #[serde(default = "default_sweep_interval", deserialize_with = "duration")]
    pub(super) sweep_interval: Duration,
    #[serde(default = "default_full_sweep_interval", deserialize_with = "duration")]
    pub(super) full_sweep_interval: Duration,
}

impl Default for LeasesFile {
    fn default() -> Self {
        Self {
            handle_key_file: None,
            retired_handle_key_files: Vec::new(),
            record_mount: default_record_mount(),
            max_per_pod_binding: default_max_per_pod_binding(),
            sweep_interval: default_sweep_interval(),
            full_sweep_interval: default_full_sweep_interval(),
        }
    }
}

fn default_record_mount() -> String {
    LeaseSettings::default().record_mount
}
fn default_max_per_pod_binding() -> usize {
    LeaseSettings::default().max_per_pod_binding
}
fn default_sweep_interval() -> Duration {
    LeaseSettings::default().sweep_interval
}
fn default_full_sweep_interval() -> Duration {
    LeaseSettings::default().full_sweep_interval
}

/// Most live leases per pod and binding a configuration may allow.
const MAX_LEASES_PER_POD_BINDING: usize = 16;

impl ConnectionsFile {
    /// The connection limits, checked against each other and the open-file limit.
    pub(super) fn limits(&self) -> Result<ConnectionLimits, String> {
        let connections = ConnectionLimits {
            max: self.max,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_age: self.max_age,
        };
        if connections.max == 0 {
            return Err("connections.max must be at least 1".to_owned());
        }
        if connections.handshake_timeout < Duration::from_millis(100)
            || connections.idle_timeout < connections.handshake_timeout
            || connections.max_age < Duration::from_secs(1)
        {
            return Err(
                "connections.handshakeTimeout must be at least 100ms, connections.idleTimeout at least as long, and connections.maxAge at least 1s".to_owned(),
            );
        }
        Ok(connections)
    }
}

impl LeasesFile {
    /// The lease settings, each checked.
    pub(super) fn settings(&self) -> Result<LeaseSettings, String> {
        let leases = LeaseSettings {
            record_mount: self.record_mount.clone(),
            max_per_pod_binding: self.max_per_pod_binding,
            sweep_interval: self.sweep_interval,
            full_sweep_interval: self.full_sweep_interval,
            // Set from `cluster.name` by the caller.
            cluster: String::new(),
        };
        if leases.record_mount.is_empty()
            || leases.record_mount.starts_with('/')
            || leases.record_mount.ends_with('/')
        {
            return Err(format!(
                "leases.recordMount `{}` is not a Vault mount path (e.g. tessera-leases, no leading or trailing /)",
                leases.record_mount
            ));
        }
        if !(1..=MAX_LEASES_PER_POD_BINDING).contains(&leases.max_per_pod_binding) {
            return Err(format!(
                "leases.maxPerPodBinding must be between 1 and {MAX_LEASES_PER_POD_BINDING} (it is {}; 2 leave room for one rotation overlap)",
                leases.max_per_pod_binding
            ));
        }
        if self.handle_key_file.is_none() && !self.retired_handle_key_files.is_empty() {
            return Err(
                "leases.retiredHandleKeyFiles needs leases.handleKeyFile (the current key)"
                    .to_owned(),
            );
        }
        if leases.sweep_interval < Duration::from_secs(1) {
            return Err("leases.sweepInterval must be at least 1s".to_owned());
        }
        if leases.full_sweep_interval < leases.sweep_interval {
            return Err(
                "leases.fullSweepInterval must be at least leases.sweepInterval (a full sweep is one of the sweeps)"
                    .to_owned(),
            );
        }
        Ok(leases)
    }
}
