//! How to reach the broker: the TLS channel, and the pod's token read fresh
//! from its file for every call (the kubelet rotates it).

use std::{path::PathBuf, time::Duration};

use tessera_proto::v1::broker_client::BrokerClient;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use zeroize::Zeroizing;

/// A call that could not be prepared: the token, the CA or the address.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The directory for [`crate::Client::with_store`] cannot hold
    /// credentials.
    #[error("credential store {dir}: {reason}")]
    Store {
        /// The store directory that cannot be used.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A setting the environment should carry is missing.
    #[error(
        "environment variable {0} is not set (the webhook sets it for pods annotated tessera.dev/api-client: \"true\")"
    )]
    Env(&'static str),
    /// The service-account token file could not be read.
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The token file holds something that cannot be a token.
    #[error("service-account token {0} is empty or not printable ASCII")]
    BadToken(PathBuf),
    /// A TLS file (CA, client certificate or key) could not be read.
    #[error("cannot read {path}: {source}")]
    Ca {
        /// The CA file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The broker address is not a valid URI or TLS could not be configured.
    #[error("broker endpoint {uri}: {detail}")]
    Endpoint {
        /// The configured address.
        uri: String,
        /// What was wrong.
        detail: String,
    },
}

/// The CA bundle that signed the broker's certificate.
#[derive(Clone, Debug)]
pub enum TrustAnchors {
    /// A PEM file, read at every connection.
    File(PathBuf),
    /// PEM text (the injected sidecar gets it in `TESSERA_CA_PEM`, as
    /// Linkerd's proxy gets its trust anchors, so no ConfigMap has to exist
    /// in every namespace).
    Pem(String),
}

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct BrokerTarget {
    /// `https://host:port`.
    pub uri: String,
    /// CA bundle that signed the broker's certificate.
    pub ca: TrustAnchors,
    /// TLS server name to verify, when it differs from the URI's host.
    pub server_name: Option<String>,
    /// The projected service-account token.
    pub token_file: PathBuf,
    /// Client certificate and key (PEM) for mTLS, read at every connection
    /// so a renewed certificate is used without restart.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// How long connecting to the broker (TCP and TLS) may take before the call fails as unavailable.
    pub connect_timeout: Duration,
}

/// How long a connection attempt may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl BrokerTarget {
    /// A client over a lazily connecting TLS channel.
    ///
    /// # Errors
    /// When the CA cannot be read or the URI is invalid.
    pub fn client(&self) -> Result<BrokerClient<Channel>, SetupError> {
        let endpoint_error = |detail: String| SetupError::Endpoint {
            uri: self.uri.clone(),
            detail,
        };
        // tonic would connect to an http:// address in the clear, and every
        // call carries the pod's token.
        if !self
            .uri
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        {
            return Err(endpoint_error(
                "the address must start with https:// (the pod's token is sent with every call and must never travel in the clear)".to_owned(),
            ));
        }
        let ca = match &self.ca {
            TrustAnchors::File(path) => std::fs::read(path).map_err(|source| SetupError::Ca {
                path: path.clone(),
                source,
            })?,
            TrustAnchors::Pem(pem) => pem.as_bytes().to_vec(),
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        if let Some((cert, key)) = &self.client_identity {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| SetupError::Ca {
                    path: path.clone(),
                    source,
                })
            };
            let key = Zeroizing::new(read(key)?);
            tls = tls.identity(Identity::from_pem(read(cert)?, key.as_slice()));
        }
        let endpoint = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(BrokerClient::new(endpoint.connect_lazy()))
    }

    /// Wraps `message` in a request carrying the current token as sensitive
    /// `authorization: Bearer` metadata.
    ///
    /// # Errors
    /// When the token file cannot be read or is not a token.
    pub fn request<T>(&self, message: T) -> Result<Request<T>, SetupError> {
        let text = Zeroizing::new(std::fs::read_to_string(&self.token_file).map_err(|source| {
            SetupError::Token {
                path: self.token_file.clone(),
                source,
            }
        })?);
        let token = text.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SetupError::BadToken(self.token_file.clone()));
        }
        let header = Zeroizing::new(format!("Bearer {token}"));
        let mut value = MetadataValue::try_from(header.as_str())
            .map_err(|_| SetupError::BadToken(self.token_file.clone()))?;
        value.set_sensitive(true);
        let mut request = Request::new(message);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
