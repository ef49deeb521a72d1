//! One span and one duration measurement per Broker RPC, as a tower layer
//! on the gRPC server instead of repeated in each handler: the span is named
//! for the RPC, joins the caller's trace (`traceparent`) and is current while
//! the handler runs (which fills in the caller's identity); the timer stops
//! when the response (for `Watch`, the stream's start) is ready. Health and
//! reflection requests pass through untouched.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tracing::Instrument as _;

use crate::metrics::Metrics;

/// The RPCs of `tessera.v1.Broker`, by the name spans and metrics give them.
const RPCS: [&str; 4] = ["WhoAmI", "Fetch", "Watch", "Revoke"];

/// Wraps the gRPC server's services in [`Rpc`].
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    /// A layer that reports durations to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service whose Broker RPCs each run in their span, timed.
#[derive(Clone)]
pub struct Rpc<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for Rpc<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(rpc) = broker_rpc(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        let span = rpc_span(rpc, request.headers());
        let metrics = self.metrics.clone();
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let _timer = metrics.time_rpc(rpc);
                response.await
            }
            .instrument(span),
        )
    }
}

/// The Broker RPC a request path names (`/tessera.v1.Broker/Fetch`).
fn broker_rpc(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix("/tessera.v1.Broker/")?;
    RPCS.into_iter().find(|rpc| *rpc == method)
}

/// The span of one RPC: named for it, a child of the caller's trace when
/// the caller sent its context (`traceparent`), filled with the caller's
/// identity once the token is verified.
fn rpc_span(rpc: &'static str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        otel.name = rpc,
        rpc,
        namespace = tracing::field::Empty,
        service_account = tracing::field::Empty,
        pod = tracing::field::Empty,
    );
    tessera_telemetry::adopt_remote_parent(&span, headers);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_brokers_own_rpcs_are_spanned_and_timed() {
        assert_eq!(broker_rpc("/tessera.v1.Broker/Fetch"), Some("Fetch"));
        assert_eq!(broker_rpc("/tessera.v1.Broker/Watch"), Some("Watch"));
        assert_eq!(broker_rpc("/tessera.v1.Broker/Nope"), None);
        assert_eq!(broker_rpc("/grpc.health.v1.Health/Check"), None);
    }
}
