//! Optional Prometheus metrics (`run --metrics-listen ADDR`): computed from
//! the status file at every scrape, so they say exactly what `check` and the
//! operator see, and hold no secret. `tessera_sidecar_seconds_until_expiry`
//! is the one to alert on.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BindingLabels {
    binding: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn seconds(rfc3339: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(rfc3339)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// The exposition for the status in `out`, as of `now`.
pub fn render(out: &Path, now: SystemTime) -> String {
    let status = Status::read(out);
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut registry = Registry::with_prefix("tessera_sidecar");
    let expiry = Family::<BindingLabels, FloatGauge>::default();
    registry.register(
        "credential_expiry_timestamp_seconds",
        "When the credential on disk stops being valid (Unix time), for credentials that expire",
        expiry.clone(),
    );
    let confirmed = Family::<BindingLabels, FloatGauge>::default();
    registry.register(
        "credential_confirmed_timestamp_seconds",
        "When the broker last delivered or confirmed the credential (Unix time)",
        confirmed.clone(),
    );
    let vouched = Family::<BindingLabels, FloatGauge>::default();
    registry.register(
        "credential_vault_confirmed_timestamp_seconds",
        "When Vault last vouched for the credential's values, as the broker reports it (Unix time)",
        vouched.clone(),
    );
    let stale = Family::<BindingLabels, Gauge>::default();
    registry.register(
        "credential_stale",
        "1 while the broker cannot be reached or serves its last-known-good copy (Vault does not answer it): the files are kept but may be outdated",
        stale.clone(),
    );
    let last_known_good = Family::<BindingLabels, Gauge>::default();
    registry.register(
        "credential_last_known_good",
        "1 while the broker serves the credential from its last-known-good copy because Vault does not answer it",
        last_known_good.clone(),
    );
    let write_failures = Family::<BindingLabels, Counter>::default();
    registry.register(
        "write_failures",
        "Writes of a binding's files that failed (full volume, credential larger than the volume, unsafe field name); the previous version stays",
        write_failures.clone(),
    );
    let mut soonest: Option<f64> = None;
    for (binding, state) in &status.bindings {
        let labels = BindingLabels {
            binding: binding.clone(),
        };
        if let Some(at) = state.not_after.as_deref().and_then(seconds) {
            expiry.get_or_create(&labels).set(at);
            soonest = Some(soonest.map_or(at, |s: f64| s.min(at)));
        }
        if let Some(at) = seconds(&state.confirmed_at) {
            confirmed.get_or_create(&labels).set(at);
        }
        if let Some(at) = state.vault_confirmed_at.as_deref().and_then(seconds) {
            vouched.get_or_create(&labels).set(at);
        }
        stale.get_or_create(&labels).set(i64::from(state.stale));
        last_known_good
            .get_or_create(&labels)
            .set(i64::from(state.last_known_good));
        write_failures
            .get_or_create(&labels)
            .inc_by(state.write_failures);
    }
    if let Some(soonest) = soonest {
        let until = FloatGauge::default();
        until.set(soonest - now);
        registry.register(
            "seconds_until_expiry",
            "Seconds until the soonest-expiring credential on disk expires (negative: expired)",
            until,
        );
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// Serves `GET /metrics` (any path) over HTTP/1.1 on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, out: PathBuf, shutdown: CancellationToken) {
    let out = Arc::new(out);
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let out = out.clone();
        let service = service_fn(move |_request: Request<Incoming>| {
            let body = render(&out, SystemTime::now());
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(hyper::body::Bytes::from(body)))
                        .unwrap_or_default(),
                )
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::status::Vouched;

    use super::*;

    #[test]
    fn exposition_follows_the_status_file() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut status = Status::default();
        let fresh = Vouched {
            confirmed_at: Some(now),
            last_known_good: false,
        };
        status.confirmed("db", "3", Some(now + Duration::from_secs(600)), fresh);
        status.confirmed("tls", "7", Some(now + Duration::from_secs(90)), fresh);
        status.confirmed(
            "kv",
            "12",
            None,
            Vouched {
                confirmed_at: Some(now - Duration::from_secs(120)),
                last_known_good: true,
            },
        );
        status.write(dir.path());

        let text = render(dir.path(), now);
        let until: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tessera_sidecar_seconds_until_expiry "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((89.0..=90.0).contains(&until), "soonest is tls: {until}");
        assert!(text.contains(r#"tessera_sidecar_credential_stale{binding="db"} 0"#));
        assert!(text.contains(r#"tessera_sidecar_credential_stale{binding="kv"} 1"#));
        assert!(text.contains(r#"tessera_sidecar_credential_last_known_good{binding="kv"} 1"#));
        assert!(text.contains(r#"tessera_sidecar_credential_last_known_good{binding="db"} 0"#));
        assert!(text.contains(
            r#"tessera_sidecar_credential_vault_confirmed_timestamp_seconds{binding="kv"}"#
        ));
        assert!(
            text.contains(r#"tessera_sidecar_credential_expiry_timestamp_seconds{binding="db"}"#)
        );
        assert!(
            !text.contains(r#"expiry_timestamp_seconds{binding="kv"}"#),
            "kv does not expire"
        );

        status.stale("broker unreachable");
        status.write(dir.path());
        assert!(
            render(dir.path(), now).contains(r#"tessera_sidecar_credential_stale{binding="db"} 1"#)
        );
    }

    #[test]
    fn no_status_yet_means_no_expiry_series() {
        let dir = tempfile::tempdir().unwrap();
        let text = render(dir.path(), SystemTime::now());
        assert!(!text.contains("seconds_until_expiry "));
        assert!(text.ends_with("# EOF\n"));
    }
}
