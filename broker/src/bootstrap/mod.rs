//! What the chart must not render, because a GitOps sync or a second
//! `helm template` would make it anew: the serving CA and certificate and the
//! lease-handle key. The first replica to start creates them in Secrets of
//! its own namespace; every replica reads them from there and writes them as
//! files the rest of the broker loads. While it runs, each replica renews the
//! serving certificate (same CA) before it expires and keeps the webhook
//! configuration's `caBundle` on the CA, as the Vault injector does.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use certs::{CaPair, mint_serving};

mod certs;

/// How long the CA is valid: rotating it means re-creating injected pods
/// (they trust the CA they were given), so it is long.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a serving certificate is valid.
const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A serving certificate is renewed once this much of its life is left.
const RENEW_BEFORE: Duration = Duration::from_secs(120 * 24 * 3600);
/// Annotation holding when the serving certificate is due for renewal (RFC 3339).
pub const RENEW_AFTER_ANNOTATION: &str = "tessera.dev/renew-after";
/// Annotation holding the DNS names the serving certificate was made for.
pub const DNS_NAMES_ANNOTATION: &str = "tessera.dev/dns-names";
/// The handle Secret's key holding the key that seals new handles.
pub const CURRENT_HANDLE_KEY: &str = "handle.key";
/// Attempts at one create-or-update before the next check tries again.
const ATTEMPTS: usize = 3;

/// `bootstrap:` in the broker's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The namespace of the Secrets (the broker's own).
    pub namespace: String,
    /// Where the files are written (an in-memory volume).
    pub directory: PathBuf,
    /// Secret holding the CA and serving certificate, created when absent.
    pub tls_secret: Option<String>,
    /// DNS names of the serving certificate (the Service's names).
    pub dns_names: Vec<String>,
    /// The Secret that holds the current and retired lease-handle keys.
    pub handle_key_secret: Option<String>,
    /// Whether the broker creates the handle-key Secret when it is absent
    /// (`false`: the operator provides it, e.g. with External Secrets).
    pub create_handle_key: bool,
    /// Mutating webhook configuration whose `caBundle` is kept on the CA file.
    pub webhook_configuration: Option<String>,
    /// The CA file the `caBundle` is set to (the one injected sidecars trust).
    pub ca_file: Option<PathBuf>,
    /// How often the Secrets and the `caBundle` are checked.
    pub check_interval: Duration,
}

impl Settings {
    /// The serving certificate file written from the TLS Secret.
    pub fn cert_file(&self) -> PathBuf {
        self.directory.join("tls.crt")
    }

    /// The serving key file written from the TLS Secret.
    pub fn key_file(&self) -> PathBuf {
        self.directory.join("tls.key")
    }

    /// The CA file written from the TLS Secret.
    pub fn written_ca_file(&self) -> PathBuf {
        self.directory.join("ca.crt")
    }

    fn handle_dir(&self) -> PathBuf {
        self.directory.join("handle")
    }
}

/// Why the shared material could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The API server refused or failed a request.
    #[error(
        "Kubernetes API: cannot {action}: {source} (the broker's service account needs {needs})"
    )]
    Api {
        /// What the broker tried.
        action: String,
        /// Which permission it takes.
        needs: &'static str,
        /// The client's error.
        source: Box<kube::Error>,
    },
    /// A Secret is there but does not hold what it should.
    #[error("Secret {name}: {detail}")]
    Malformed {
        /// The Secret, as `namespace/name`.
        name: String,
        /// What is missing or wrong, and what to do.
        detail: String,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file that could not be written.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A certificate could not be made.
    #[error("cannot make the serving certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Random,
}

/// The handle keys written from the Secret: the current one and the others
/// it accepts (retired, or the next one being rolled out).
#[derive(Clone, Debug)]
pub struct HandleKeyFiles {
    /// The key that seals new handles.
    pub current: PathBuf,
    /// Keys whose handles still open.
    pub accepted: Vec<PathBuf>,
}

/// Reads (or creates) the Secrets, writes their files and points the webhook
/// configuration at the CA. The `caBundle` is best effort here (the
/// configuration may not exist yet); [`follow`] keeps trying.
///
/// # Errors
/// When a Secret cannot be read, created or used, or a file written.
pub async fn materialize(
    client: &kube::Client,
    settings: &Settings,
) -> Result<Option<HandleKeyFiles>, BootstrapError> {
    std::fs::create_dir_all(&settings.directory)
        .map_err(|source| io(&settings.directory, source))?;
    if let Some(name) = &settings.tls_secret {
        let secret = serving_secret(client, settings, name).await?;
        write_tls(settings, &secret)?;
    }
    if let Err(error) = keep_ca_bundle(client, settings).await {
        tracing::warn!(%error, "the webhook configuration's caBundle is not set yet; retrying");
    }
    match &settings.handle_key_secret {
        None => Ok(None),
        Some(name) => handle_keys(client, settings, name).await.map(Some),
    }
}

/// Every `check_interval`: renews the serving certificate when due, rewrites
/// changed files (the TLS follower reloads them) and restores the
/// `caBundle` (a sync that applied the chart's empty one, say).
pub async fn follow(client: kube::Client, settings: Settings, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.check_interval) => {}
        }
        if let Some(name) = &settings.tls_secret {
            let written = serving_secret(&client, &settings, name)
                .await
                .and_then(|secret| write_tls(&settings, &secret));
            if let Err(error) = written {
                tracing::warn!(%error, "cannot refresh the serving certificate; keeping the current one");
            }
        }
        if let Err(error) = keep_ca_bundle(&client, &settings).await {
            tracing::warn!(%error, "cannot set the webhook configuration's caBundle");
        }
    }
}

fn secrets(client: &kube::Client, settings: &Settings) -> Api<Secret> {
    Api::namespaced(client.clone(), &settings.namespace)
}

fn api_error(action: String, needs: &'static str) -> impl FnOnce(kube::Error) -> BootstrapError {
    move |source| BootstrapError::Api {
        action,
        needs,
        source: Box::new(source),
    }
}

fn io(path: &Path, source: std::io::Error) -> BootstrapError {
    BootstrapError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn is_status(error: &kube::Error, check: fn(&kube::core::Status) -> bool) -> bool {
    matches!(error, kube::Error::Api(status) if check(status))
}

/// The TLS Secret, created when absent and renewed when due. Two replicas
/// racing settle on whichever write the API server took first.
async fn serving_secret(
    client: &kube::Client,
    settings: &Settings,
    name: &str,
) -> Result<Secret, BootstrapError> {
    let api = secrets(client, settings);
    let full = format!("{}/{name}", settings.namespace);
    for _ in 0..ATTEMPTS {
        let found = api
            .get_opt(name)
            .await
            .map_err(api_error(format!("read Secret {full}"), "get on secrets"))?;
        let Some(mut secret) = found else {
            let made = mint_serving(name, &settings.namespace, &settings.dns_names, None)?;
            match api.create(&PostParams::default(), &made).await {
                Ok(created) => {
                    tracing::info!(secret = %full, "created the serving CA and certificate");
                    return Ok(created);
                }
                Err(error) if is_status(&error, kube::core::Status::is_already_exists) => continue,
                Err(error) => {
                    return Err(api_error(
                        format!("create Secret {full}"),
                        "create on secrets",
                    )(error));
                }
            }
        };
        if !renewal_due(&secret, &settings.dns_names, SystemTime::now()) {
            return Ok(secret);
        }
        let ca = CaPair::from_secret(&secret, &full)?;
        let renewed = mint_serving(name, &settings.namespace, &settings.dns_names, Some(ca))?;
        secret.data = renewed.data;
        secret.metadata.annotations = renewed.metadata.annotations;
        match api.replace(name, &PostParams::default(), &secret).await {
            Ok(replaced) => {
                tracing::info!(secret = %full, "renewed the serving certificate");
                return Ok(replaced);
            }
            Err(error) if is_status(&error, kube::core::Status::is_conflict) => {}
            Err(error) => {
                return Err(api_error(
                    format!("update Secret {full}"),
                    "update on secrets",
                )(error));
            }
        }
    }
    Err(BootstrapError::Malformed {
        name: full,
        detail: format!("changed under the broker {ATTEMPTS} times in a row; retrying later"),
    })
}

/// Whether the serving certificate must be made again: due, made for other
/// names, or without the annotations the broker writes.
fn renewal_due(secret: &Secret, dns_names: &[String], now: SystemTime) -> bool {
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let due = annotations
        .get(RENEW_AFTER_ANNOTATION)
        .and_then(|at| humantime::parse_rfc3339(at).ok())
        .is_none_or(|at| at <= now);
    let names = annotations.get(DNS_NAMES_ANNOTATION).map(String::as_str);
    due || names != Some(dns_names.join(",").as_str())
}

/// The Secret's entry `key`; its absence says what deleting the Secret makes.
fn entry<'a>(
    secret: &'a Secret,
    full: &str,
    key: &str,
    remade: &str,
) -> Result<&'a ByteString, BootstrapError> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .ok_or_else(|| BootstrapError::Malformed {
            name: full.to_owned(),
            detail: format!("has no `{key}`; delete it and the broker makes {remade}"),
        })
}

/// Writes the CA, certificate and key (never the CA's key) where changed.
fn write_tls(settings: &Settings, secret: &Secret) -> Result<(), BootstrapError> {
    let full = format!(
        "{}/{}",
        settings.namespace,
        settings.tls_secret.as_deref().unwrap_or_default()
    );
    for (key, path, mode) in [
        ("ca.crt", settings.written_ca_file(), 0o444),
        ("tls.crt", settings.cert_file(), 0o444),
        ("tls.key", settings.key_file(), 0o400),
    ] {
        let bytes = entry(secret, &full, key, "a new one")?;
        write_if_changed(&path, &bytes.0, mode)?;
    }
    Ok(())
}

/// Replaces `path` atomically (write aside, rename) unless it holds `bytes`.
fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BootstrapError> {
    if std::fs::read(path).is_ok_and(|old| Zeroizing::new(old).as_slice() == bytes) {
        return Ok(());
    }
    tessera_atomic_file::replace(path, bytes, mode).map_err(|source| io(path, source))
}

/// Sets every webhook's `caBundle` in the configuration to the CA file, when
/// it differs.
async fn keep_ca_bundle(client: &kube::Client, settings: &Settings) -> Result<(), BootstrapError> {
    let (Some(name), Some(ca_file)) = (&settings.webhook_configuration, &settings.ca_file) else {
        return Ok(());
    };
    let ca = std::fs::read(ca_file).map_err(|source| io(ca_file, source))?;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = api.get(name).await.map_err(api_error(
        format!("read MutatingWebhookConfiguration {name}"),
        "get on mutatingwebhookconfigurations",
    ))?;
    let mut changed = false;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref().map(|b| &b.0) != Some(&ca) {
            webhook.client_config.ca_bundle = Some(ByteString(ca.clone()));
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &config)
            .await
            .map_err(api_error(
                format!("update MutatingWebhookConfiguration {name}"),
                "update on mutatingwebhookconfigurations",
            ))?;
        tracing::info!(configuration = %name, "set the webhook's caBundle to the serving CA");
    }
    Ok(())
}

/// The handle keys from their Secret (created with a random key when absent
/// and allowed), written one file per key.
async fn handle_keys(
    client: &kube::Client,
    settings: &Settings,
    name: &str,
) -> Result<HandleKeyFiles, BootstrapError> {
    let api = secrets(client, settings);
    let full = format!("{}/{name}", settings.namespace);
    let mut secret = None;
    for _ in 0..ATTEMPTS {
        if let Some(found) = api
            .get_opt(name)
            .await
            .map_err(api_error(format!("read Secret {full}"), "get on secrets"))?
        {
            secret = Some(found);
            break;
        }
        if !settings.create_handle_key {
            return Err(BootstrapError::Malformed {
                name: full,
                detail: format!(
                    "does not exist; create it with at least 32 random bytes under `{CURRENT_HANDLE_KEY}`"
                ),
            });
        }
        let mut key = Zeroizing::new(vec![0u8; 32]);
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| BootstrapError::Random)?;
        let made = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(settings.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "tessera-broker".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([(
                CURRENT_HANDLE_KEY.to_owned(),
                ByteString(key.to_vec()),
            )])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &made).await {
            Ok(created) => {
                tracing::info!(secret = %full, "created the lease handle key");
                secret = Some(created);
                break;
            }
            Err(error) if is_status(&error, kube::core::Status::is_already_exists) => {}
            Err(error) => {
                return Err(api_error(
                    format!("create Secret {full}"),
                    "create on secrets",
                )(error));
            }
        }
    }
    let data = secret.and_then(|s| s.data).unwrap_or_default();
    if !data.contains_key(CURRENT_HANDLE_KEY) {
        return Err(BootstrapError::Malformed {
            name: full,
            detail: format!("has no `{CURRENT_HANDLE_KEY}` (the key that seals new handles)"),
        });
    }
    let dir = settings.handle_dir();
    std::fs::create_dir_all(&dir).map_err(|source| io(&dir, source))?;
    let mut files = HandleKeyFiles {
        current: dir.join(CURRENT_HANDLE_KEY),
        accepted: Vec::new(),
    };
    for (key, value) in &data {
        if !key.ends_with(".key") || key.contains('/') {
            continue;
        }
        let path = dir.join(key);
        write_if_changed(&path, &value.0, 0o400)?;
        if key != CURRENT_HANDLE_KEY {
            files.accepted.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests;
