//! The policy's cluster-wide limits: ceilings and floors no binding, default
//! or pod may go past, and what to do with containers that run as root.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Cluster-wide ceilings that no binding or default may exceed.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Longest TTL any binding may ask for.
    pub max_ttl: Duration,
    /// Shortest TTL per leased source kind (`limits.minTtl`): no binding,
    /// pod annotation or API caller may ask Vault for less, so one pod
    /// cannot make the broker mint a credential every second.
    pub min_ttl: BTreeMap<String, Duration>,
    /// Lowest renew fraction (renewing earlier than this is refused).
    pub min_renew_fraction: f64,
    /// Highest renew fraction (renewing later than this is refused).
    pub max_renew_fraction: f64,
    /// Source kinds allowed; all when `None`.
    pub allowed_sources: Option<BTreeSet<String>>,
    /// Vault mounts allowed; all when `None`.
    pub allowed_mounts: Option<BTreeSet<String>>,
    /// What the webhook does for a pod whose containers name no single user.
    pub image_user: ImageUser,
    /// Whether pod owners may add templates of their own
    /// (`tessera.dev/templates.<binding>`).
    pub pod_templates: bool,
}

/// How the webhook makes the files readable when a pod sets no `fsGroup`
/// and its containers do not all name one `runAsUser` (they run as their
/// images' users): `limits.imageUser` in the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageUser {
    /// Set the pod's `fsGroup` to the sidecar's user id (with
    /// `fsGroupChangePolicy: OnRootMismatch`): every container gets it as a
    /// supplementary group and reads the 0440 files. The default.
    #[default]
    FsGroup,
    /// Refuse the pod, naming its containers' users.
    Refuse,
}

impl fmt::Display for ImageUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageUser::FsGroup => "fsGroup",
            ImageUser::Refuse => "refuse",
        })
    }
}

/// The TTL floors of `limits.minTtl` when the policy sets none: five
/// minutes for database users, certificates and Vault leases.
pub const DEFAULT_MIN_TTL: &[(&str, Duration)] = &[
    ("database", Duration::from_secs(300)),
    ("pki", Duration::from_secs(300)),
    ("ssh", Duration::from_secs(300)),
    ("vault", Duration::from_secs(300)),
];

impl Limits {
    /// The shortest TTL a credential of source kind `kind` may have; one
    /// second for a kind without a floor.
    pub fn min_ttl_for(&self, kind: &str) -> Duration {
        self.min_ttl
            .get(kind)
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(24 * 3600),
            min_ttl: DEFAULT_MIN_TTL
                .iter()
                .map(|(kind, floor)| ((*kind).to_owned(), *floor))
                .collect(),
            min_renew_fraction: 0.5,
            max_renew_fraction: 0.9,
            allowed_sources: None,
            allowed_mounts: None,
            image_user: ImageUser::default(),
            pod_templates: true,
        }
    }
}
