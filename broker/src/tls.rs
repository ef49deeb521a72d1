//! The broker's TLS: TLS 1.3 only, ring provider, h2 ALPN, a serving
//! certificate reloaded without restart, optional mTLS, and an accept loop
//! that handshakes concurrently so one slow client cannot stall the rest.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{
    listener::{FirstRequest, Gate, Guarded},
    tasks::Spawner,
};

/// Errors loading the serving certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain could not be read.
    #[error("TLS certificate {path}: {detail} (expected a PEM certificate chain)")]
    Cert {
        /// The certificate or key file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The private key could not be read.
    #[error("TLS key {path}: {detail} (expected a PEM private key)")]
    Key {
        /// The certificate or key file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the pair.
    #[error("TLS certificate and key do not make a valid server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The serving certificate and, for mTLS, the client CA.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// CA bundle for client certificates; when set, clients must present one.
    pub client_ca: Option<PathBuf>,
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            detail: "no certificate found".to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match()?;
    Ok(certified)
}

/// The serving certificate, swapped in place when its files change, so a
/// renewed certificate (cert-manager, a rotated Secret) needs no restart.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamp_now = stamp(cert, key);
        Ok(Self {
            current: ArcSwap::from_pointee(load_certified_key(cert, key)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
            stamp: Mutex::new(stamp_now),
        })
    }

    /// Re-reads the files when their modification times changed; a bad pair
    /// keeps the current certificate. Returns whether a new one is served.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert, &self.key);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now == *last {
            return Ok(false);
        }
        let loaded = load_certified_key(&self.cert, &self.key)?;
        self.current.store(Arc::new(loaded));
        *last = now;
        Ok(true)
    }

    /// Checks the files every `interval` until `shutdown`.
    pub async fn follow(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "serving certificate reload failed; keeping the current one")
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Builds a TLS 1.3-only server configuration offering `h2`, with a reloading
/// serving certificate and, when a client CA is set, required client
/// certificates (mTLS).
///
/// # Errors
/// When the files cannot be read or do not match.
pub fn server_config(
    settings: &TlsSettings,
) -> Result<(Arc<ServerConfig>, Arc<ReloadingCert>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(ReloadingCert::load(&settings.cert, &settings.key)?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(|iter| iter.collect::<Result<_, _>>())
                .map_err(|e| TlsError::Cert {
                    path: ca.display().to_string(),
                    detail: e.to_string(),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Cert {
                    path: ca.display().to_string(),
                    detail: "no usable CA certificate for client authentication".to_owned(),
                });
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Cert {
                    path: ca.display().to_string(),
                    detail: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), resolver))
}

/// Accepts TCP connections on `listener` within `gate`'s limits and yields
/// finished TLS streams, each with the handshake timeout again for its first
/// request, until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    gate: Gate,
    handshakes: Spawner,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<FirstRequest<TlsStream<Guarded<tokio::net::TcpStream>>>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshake_timeout = gate.limits().handshake_timeout;
    let accepting = handshakes.clone();
    accepting.spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => {
                        backoff = Duration::from_millis(10);
                        pair
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning,
                        // and say so without filling the log. A socket that
                        // is gone ends the stream (the server fails).
                        gate.accept_failed(&error);
                        if gate.is_broken() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tcp) = gate.admit(tcp) else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            handshakes.spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // The same time again for the first request.
                        let stream = FirstRequest::new(stream, handshake_timeout);
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
