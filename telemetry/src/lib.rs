//! Logs and traces for the broker and the sidecar: structured logs (text or
//! JSON) filtered by `RUST_LOG` directives, OpenTelemetry trace export over
//! OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_*` variables are set, and
//! W3C trace context carried in gRPC metadata from the sidecar to the broker.

use std::path::PathBuf;

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// The endpoint variables that turn trace export on (the OTLP exporter's own).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// CA bundle for an `https://` collector (the OTLP exporter specification's name).
const CERTIFICATE_VAR: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter. Call it from async code before the
    /// runtime stops: the export runs on the runtime while this waits on a
    /// blocking thread.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "trace export did not flush");
            }
        }
    }
}

/// Installs the global subscriber: logs to standard error (JSON when `json`),
/// filtered by `RUST_LOG` (default `info`), and, when an OTLP endpoint is set,
/// spans exported as `service` (`OTEL_SERVICE_NAME` overrides it). Call it
/// inside the tokio runtime: the gRPC exporter's connection lives there.
///
/// `export: false` keeps traces off whatever the environment says (short
/// commands such as probes and policy checks).
///
/// A bad OTLP setting is reported in the logs and leaves export off; it
/// never stops the process.
pub fn init(service: &'static str, json: bool, export: bool) -> Telemetry {
    let filter = filter();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, problem) = match tracer_provider(service).map(|p| p.filter(|_| export)) {
        Ok(provider) => (provider, None),
        Err(problem) => (None, Some(problem)),
    };
    match &provider {
        // Without export the filter is global, so disabled spans are never
        // built (a per-layer filter next to an absent layer would enable
        // every span of every crate, at a cost on every request).
        None => tracing_subscriber::registry()
            .with(filter)
            .with(log_layer(json))
            .init(),
        Some(provider) => {
            let traces = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    // Tessera's own spans only; events stay in the logs, and
                    // the HTTP/2 stack's spans are noise in a trace.
                    meta.is_span() && meta.target().starts_with("tessera")
                }));
            tracing_subscriber::registry()
                .with(log_layer(json).with_filter(filter))
                .with(traces)
                .init();
        }
    }
    if let Some(problem) = problem {
        tracing::error!("trace export is off: {problem}");
    } else if provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP/gRPC");
    }
    Telemetry { provider }
}

/// `RUST_LOG`'s directives (default `info`), with the Vault client's own
/// records off unless `RUST_LOG` names it: Tessera logs every failed Vault
/// request itself, saying what it was for, while the client (rustify) logs
/// each 404 at ERROR, and a 404 is expected (a new pod's first lease finds
/// no records; the change feed's canary reads an empty path by design).
fn filter() -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let named = std::env::var("RUST_LOG").is_ok_and(|directives| directives.contains("rustify"));
    if !named && let Ok(quiet) = "rustify=off".parse() {
        filter = filter.add_directive(quiet);
    }
    filter
}

/// Log lines on standard error, as text or JSON.
fn log_layer<S>(json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    }
}

fn tracer_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    if !ENDPOINT_VARS
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.is_empty()))
    {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(path) = std::env::var_os(CERTIFICATE_VAR).map(PathBuf::from) {
        let pem = std::fs::read(&path)
            .map_err(|e| format!("{CERTIFICATE_VAR} {}: {e}", path.display()))?;
        builder = builder.with_tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        );
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service_name).build())
            .build(),
    ))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// A request's HTTP headers, read for the trace context.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes the current span's trace context (`traceparent`) into outgoing
/// gRPC metadata, so the broker's spans join the caller's trace.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// Makes the caller's trace (from an incoming request's headers, gRPC
/// metadata included) the parent of `span`, which must not have been entered
/// yet; no-op when the caller sent none.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if opentelemetry::trace::TraceContextExt::span(&parent)
        .span_context()
        .is_valid()
        && let Err(error) = span.set_parent(parent)
    {
        tracing::debug!(%error, "cannot join the caller's trace");
    }
}
