//! The webhook's HTTPS server: `POST /mutate` on its own port, TLS 1.3,
//! bounded bodies and connections.

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio_util::sync::CancellationToken;

use super::review::{ADMISSION_API_VERSION, Webhook, review_json};
use crate::listener::{ConnectionLimits, Gate, GateAcceptor};

/// Largest AdmissionReview body read (a pod spec is far smaller).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Time a client has to send the whole body, and to send its first request.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

async fn mutate(
    State(webhook): State<Arc<Webhook>>,
    body: axum::body::Body,
) -> (StatusCode, Json<serde_json::Value>) {
    let invalid = |status: StatusCode, message: String| {
        (
            status,
            Json(review_json(AdmissionResponse::invalid(message))),
        )
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            return invalid(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("tessera: cannot read the body (at most {MAX_BODY_BYTES} bytes): {error}"),
            );
        }
        Err(_) => {
            return invalid(
                StatusCode::REQUEST_TIMEOUT,
                format!("tessera: the body did not arrive within {BODY_TIMEOUT:?}"),
            );
        }
    };
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(review_json(AdmissionResponse::invalid(format!(
                    "tessera: the body is not an AdmissionReview of a pod: {error}"
                )))),
            );
        }
    };
    // Only the version the chart registers: anything else is not the API server.
    if review.types.api_version != ADMISSION_API_VERSION || review.types.kind != "AdmissionReview" {
        let shown: String = review
            .types
            .api_version
            .chars()
            .take(64)
            .flat_map(char::escape_debug)
            .collect();
        return (
            StatusCode::BAD_REQUEST,
            Json(review_json(AdmissionResponse::invalid(format!(
                "tessera: AdmissionReview apiVersion `{shown}` is not supported (only {ADMISSION_API_VERSION})"
            )))),
        );
    }
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(review_json(AdmissionResponse::invalid(
                    "tessera: the AdmissionReview has no request",
                ))),
            );
        }
    };
    (StatusCode::OK, Json(review_json(webhook.review(&request))))
}

/// The HTTP routes: `POST /mutate`.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .with_state(webhook)
}

/// The webhook with its TLS configuration, ready to serve.
pub struct Server {
    /// Decides on each AdmissionReview.
    pub webhook: Arc<Webhook>,
    /// The serving certificate (reloaded from disk as it changes).
    pub tls: Arc<rustls::ServerConfig>,
}

impl Server {
    /// Serves the webhook over TLS on `listener` within `limits` until `shutdown`.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn serve(
        self,
        listener: std::net::TcpListener,
        limits: ConnectionLimits,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        serve(self.webhook, &self.tls, listener, limits, shutdown).await
    }
}

async fn serve(
    webhook: Arc<Webhook>,
    tls: &rustls::ServerConfig,
    listener: std::net::TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The API server speaks HTTP/2 or HTTP/1.1.
    let mut config = tls.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    let gate = Gate::new("webhook", limits);
    let errors = gate.clone();
    let broken = gate.clone();
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .handshake_timeout(limits.handshake_timeout)
        .acceptor(GateAcceptor(gate));
    let handle = axum_server::Handle::new();
    listener.set_nonblocking(true)?;
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle.clone())
        .first_request_timeout(BODY_TIMEOUT)
        .accept_error_handler(move |peer, error: &std::io::Error| match peer {
            None => errors.accept_failed(error),
            Some(_) => errors.connection_failed(error),
        });
    server
        .http_builder()
        .http1()
        .header_read_timeout(BODY_TIMEOUT);
    server
        .http_builder()
        .http2()
        .keep_alive_interval(crate::listener::HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(crate::listener::HTTP2_KEEPALIVE_TIMEOUT);
    let serving = server.serve(router(webhook).into_make_service());
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served,
        error = broken.broken() => return Err(error),
        () = shutdown.cancelled() => handle.graceful_shutdown(Some(Duration::from_secs(5))),
    }
    serving.await
}
