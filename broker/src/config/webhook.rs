//! The `webhook:` section of the broker configuration: where the admission
//! webhook listens and what it injects.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity,
};
use serde::Deserialize;

use crate::tls::TlsSettings;

/// How the sidecar is added to a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): the
    /// app starts after its credentials exist and Jobs still complete.
    #[default]
    Native,
    /// An init container that writes once, plus a regular sidecar container
    /// (older clusters). Pods that do not restart (Jobs) get the init
    /// container only, so they can complete.
    Classic,
    /// `native` when the API server is 1.29 or newer, else `classic`
    /// (asked once at start).
    Auto,
}

/// The validated webhook settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// HTTPS address the API server calls.
    pub listen: SocketAddr,
    /// Serving certificate (the one the webhook configuration's `caBundle` trusts).
    pub tls: TlsSettings,
    /// What is injected.
    pub injection: Injection,
}

/// What the webhook adds to an annotated pod.
#[derive(Clone, Debug)]
pub struct Injection {
    /// The sidecar's image reference (the chart pins it by digest).
    pub image: String,
    /// `imagePullPolicy` of the injected containers (`IfNotPresent`, `Always`).
    pub image_pull_policy: String,
    /// Broker address the sidecar dials (`https://host:port`).
    pub broker_address: String,
    /// TLS name to verify, when it differs from the address's host.
    pub server_name: Option<String>,
    /// CA bundle that signed the broker's certificate, read for every
    /// admission so a rotated CA reaches new pods.
    pub ca_file: PathBuf,
    /// Audience of the projected token (one the broker accepts).
    pub audience: String,
    /// Lifetime of the projected token (the kubelet refreshes it at 80%).
    pub token_expiration: Duration,
    /// Native or classic sidecar.
    pub mode: SidecarMode,
    /// Where the credentials appear in app containers, unless a pod says otherwise.
    pub mount_path: String,
    /// `sizeLimit` of the in-memory `emptyDir`.
    pub volume_size_limit: Quantity,
    /// The sidecar's requests and limits.
    pub resources: ResourceRequirements,
    /// The highest limits a pod owner may give the sidecar
    /// (`tessera.dev/sidecar-cpu`, `tessera.dev/sidecar-memory`).
    pub max_resources: std::collections::BTreeMap<String, Quantity>,
    /// User the sidecar runs as when the pod has an `fsGroup`.
    pub run_as_user: i64,
    /// Port of the sidecar's Prometheus metrics (credential expiry); none: off.
    pub metrics_port: Option<u16>,
    /// Whether the broker looks pods up (then `podLabels` subjects can match
    /// at admission too; without it they never match, as at runtime).
    pub pod_labels_known: bool,
}

/// The `webhook:` section as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WebhookFile {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    sidecar: SidecarFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SidecarFile {
    image: String,
    #[serde(default = "default_pull_policy")]
    image_pull_policy: String,
    broker_address: String,
    server_name: Option<String>,
    ca_file: PathBuf,
    audience: Option<String>,
    #[serde(
        default = "default_token_expiration",
        deserialize_with = "crate::config::duration"
    )]
    token_expiration: Duration,
    #[serde(default)]
    mode: SidecarMode,
    #[serde(default = "default_mount_path")]
    mount_path: String,
    #[serde(default = "default_size_limit")]
    volume_size_limit: Quantity,
    #[serde(default = "default_resources")]
    resources: ResourceRequirements,
    #[serde(default = "default_max_resources")]
    max_resources: std::collections::BTreeMap<String, Quantity>,
    #[serde(default = "default_run_as_user")]
    run_as_user: i64,
    metrics_port: Option<u16>,
}

/// Where the credentials appear in app containers by default.
pub const DEFAULT_MOUNT_PATH: &str = "/var/run/secrets/tessera";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9443))
}
fn default_pull_policy() -> String {
    "IfNotPresent".to_owned()
}
fn default_token_expiration() -> Duration {
    Duration::from_secs(600)
}
fn default_mount_path() -> String {
    DEFAULT_MOUNT_PATH.to_owned()
}
fn default_size_limit() -> Quantity {
    Quantity("1Mi".to_owned())
}
fn default_run_as_user() -> i64 {
    65532
}

/// Sized from what the sidecar uses (docs/BENCHMARKS.md: 6.3 MiB RSS, no
/// measurable idle CPU), with room for a TLS handshake and a rotation burst.
pub fn default_resources() -> ResourceRequirements {
    let quantities = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                .collect(),
        )
    };
    ResourceRequirements {
        requests: quantities(&[("cpu", "5m"), ("memory", "16Mi")]),
        limits: quantities(&[("cpu", "100m"), ("memory", "32Mi")]),
        ..ResourceRequirements::default()
    }
}

/// The most a pod owner may raise the sidecar's limits to, unless configured.
fn default_max_resources() -> std::collections::BTreeMap<String, Quantity> {
    [("cpu", "500m"), ("memory", "128Mi")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
        .collect()
}

/// A quantity's value in base units (cores, bytes); `None` when `text` is
/// not a quantity.
pub fn quantity_value(text: &str) -> Option<f64> {
    if !is_quantity(text) {
        return None;
    }
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let number: f64 = number.parse().ok()?;
    let binary = |power: i32| 1024_f64.powi(power);
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exponent => 10_f64.powi(exponent.get(1..)?.parse().ok()?),
    };
    Some(number * factor)
}

/// Whether `text` is a Kubernetes quantity (`5m`, `16Mi`, `0.5`, `1e3`), so a
/// typo fails at start instead of making every injected pod invalid.
fn is_quantity(text: &str) -> bool {
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|exp| {
        let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

impl WebhookFile {
    /// Validates the section; `resolve` makes relative paths relative to the
    /// configuration file, `tls` is the broker's own serving certificate.
    pub(crate) fn validate(
        self,
        resolve: impl Fn(PathBuf) -> PathBuf,
        tls: &TlsSettings,
        audiences: &[String],
        pod_lookup: bool,
    ) -> Result<Settings, String> {
        let sidecar = self.sidecar;
        let tls = match (self.cert_file, self.key_file) {
            (Some(cert), Some(key)) => TlsSettings {
                cert: resolve(cert),
                key: resolve(key),
                client_ca: None,
            },
            (None, None) => TlsSettings {
                client_ca: None,
                ..tls.clone()
            },
            _ => return Err("webhook: set both `certFile` and `keyFile`, or neither".to_owned()),
        };
        if sidecar.image.trim().is_empty() {
            return Err(
                "webhook.sidecar.image is empty (name the tessera-sidecar image)".to_owned(),
            );
        }
        if !matches!(
            sidecar.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(format!(
                "webhook.sidecar.imagePullPolicy `{}` must be Always, IfNotPresent or Never",
                sidecar.image_pull_policy
            ));
        }
        if !sidecar.broker_address.starts_with("https://") {
            return Err(format!(
                "webhook.sidecar.brokerAddress `{}` must start with https://",
                sidecar.broker_address
            ));
        }
        let audience = sidecar
            .audience
            .or_else(|| audiences.first().cloned())
            .unwrap_or_default();
        if !audiences.contains(&audience) {
            return Err(format!(
                "webhook.sidecar.audience `{audience}` is not one of identity.audiences, so the broker would refuse the injected token"
            ));
        }
        // The API server refuses projected tokens shorter than 10 minutes.
        if sidecar.token_expiration < Duration::from_secs(600) {
            return Err("webhook.sidecar.tokenExpiration must be at least 10m".to_owned());
        }
        check_mount_path(&sidecar.mount_path)
            .map_err(|e| format!("webhook.sidecar.mountPath: {e}"))?;
        let quantities =
            std::iter::once(("volumeSizeLimit".to_owned(), &sidecar.volume_size_limit)).chain(
                [
                    ("requests", &sidecar.resources.requests),
                    ("limits", &sidecar.resources.limits),
                ]
                .into_iter()
                .flat_map(|(kind, map)| {
                    map.iter()
                        .flatten()
                        .map(move |(name, q)| (format!("resources.{kind}.{name}"), q))
                })
                .chain(
                    sidecar
                        .max_resources
                        .iter()
                        .map(|(name, q)| (format!("maxResources.{name}"), q)),
                ),
            );
        for (name, quantity) in quantities {
            if !is_quantity(&quantity.0) {
                return Err(format!(
                    "webhook.sidecar.{name}: `{}` is not a Kubernetes quantity like 16Mi or 5m",
                    quantity.0
                ));
            }
        }
        if sidecar.run_as_user <= 0 {
            return Err("webhook.sidecar.runAsUser must be a non-root user id".to_owned());
        }
        Ok(Settings {
            listen: self.listen,
            tls,
            injection: Injection {
                image: sidecar.image,
                image_pull_policy: sidecar.image_pull_policy,
                broker_address: sidecar.broker_address,
                server_name: sidecar.server_name,
                ca_file: resolve(sidecar.ca_file),
                audience,
                token_expiration: sidecar.token_expiration,
                mode: sidecar.mode,
                mount_path: sidecar.mount_path,
                volume_size_limit: sidecar.volume_size_limit,
                resources: sidecar.resources,
                max_resources: sidecar.max_resources,
                run_as_user: sidecar.run_as_user,
                metrics_port: sidecar.metrics_port.filter(|p| *p != 0),
                pod_labels_known: pod_lookup,
            },
        })
    }
}

/// Checks a mount path: absolute, normalized, not `/`.
///
/// # Errors
/// A sentence saying what is wrong.
pub fn check_mount_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path == "/" {
        return Err(format!("`{path}` must be an absolute path below /"));
    }
    if path
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "`{path}` must be normalized (no `//`, `.`, `..` or trailing `/`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(yaml: &str) -> Result<Settings, String> {
        let file: WebhookFile = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        let tls = TlsSettings {
            cert: PathBuf::from("tls.crt"),
            key: PathBuf::from("tls.key"),
            client_ca: None,
        };
        file.validate(|p| p, &tls, &["tessera".to_owned()], false)
    }

    const SIDECAR: &str = "sidecar:\n  image: tessera-sidecar:1\n  brokerAddress: https://tessera:8443\n  caFile: ca.crt\n";

    #[test]
    fn defaults_fill_a_minimal_section() {
        let settings = validate(SIDECAR).unwrap();
        let injection = settings.injection;
        assert_eq!(injection.audience, "tessera");
        assert_eq!(injection.mode, SidecarMode::Native);
        assert_eq!(injection.mount_path, DEFAULT_MOUNT_PATH);
        assert_eq!(injection.resources, default_resources());
        assert_eq!(settings.tls.cert, PathBuf::from("tls.crt"));
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        for (extra, expected) in [
            ("  volumeSizeLimit: lots\n", "volumeSizeLimit: `lots`"),
            (
                "  resources: { requests: { memory: 16MB } }\n",
                "resources.requests.memory: `16MB`",
            ),
            ("  audience: other\n", "not one of identity.audiences"),
            ("  tokenExpiration: 5m\n", "at least 10m"),
            ("  mountPath: relative\n", "mountPath"),
            ("  imagePullPolicy: Sometimes\n", "imagePullPolicy"),
            ("  runAsUser: 0\n", "non-root"),
        ] {
            let error = validate(&format!("{SIDECAR}{extra}")).unwrap_err();
            assert!(error.contains(expected), "{extra}: {error}");
        }
        let plain = validate(&SIDECAR.replace("https://", "http://")).unwrap_err();
        assert!(plain.contains("must start with https://"), "{plain}");
    }

    #[test]
    fn quantities_follow_kubernetes() {
        for good in ["5m", "16Mi", "1", "0.5", "100k", "1e3", "2E-2", "1Gi"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "Mi", "16MB", "1..5", "lots", "5 m", "-1"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
