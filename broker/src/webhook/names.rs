//! The names Tessera gives what it adds to a pod: containers, volumes and
//! paths. Reserved: a pod that already uses one is refused.

/// Name of the sidecar (native or classic) container.
pub const SIDECAR: &str = "tessera-sidecar";
/// Name of the classic init container.
pub const INIT: &str = "tessera-init";
/// The in-memory volume holding the credentials.
pub const CREDENTIALS_VOLUME: &str = "tessera-credentials";
/// The projected service-account token volume.
pub const TOKEN_VOLUME: &str = "tessera-token";
/// Where the sidecar finds its token directory.
pub const TOKEN_DIR: &str = "/var/run/secrets/tessera.dev/serviceaccount";
/// Tessera's own directory in the pod (the sidecar's token, the api-client
/// volume): no credentials mount path may overlap it.
pub const RESERVED_DIR: &str = "/var/run/secrets/tessera.dev";
/// The sidecar binary inside its image.
pub(super) const SIDECAR_BINARY: &str = "/tessera-sidecar";

/// The init container that copies the binary.
pub const INSTALL: &str = "tessera-install";
/// The in-memory volume holding the binary.
pub const BIN_VOLUME: &str = "tessera-bin";
/// Where the wrapped containers find it (inside Tessera's own directory).
pub const BIN_DIR: &str = "/var/run/secrets/tessera.dev/bin";
/// The in-memory volume where each wrapper keeps its credentials and lease
/// handles across container restarts (one directory per container).
pub const STATE_VOLUME: &str = "tessera-state";
/// Where the wrapped containers mount it.
pub const STATE_DIR: &str = "/var/run/secrets/tessera.dev/state";

/// Names env mode reserves, besides the sidecar's.
pub const RESERVED: [&str; 3] = [INSTALL, SIDECAR, INIT];

/// Whether one of two normalized absolute paths is the other or below it.
pub(super) fn overlaps(a: &str, b: &str) -> bool {
    let below = |inner: &str, outer: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    below(a, b) || below(b, a)
}
