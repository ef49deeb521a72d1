//! The sidecar's status file, `<out>/..tessera-status.json` (mode 0444, no
//! secrets): per binding the version, when it stops being valid, when it was
//! last delivered, when Vault last vouched for it, and whether it is stale
//! (the broker unreachable, or serving its last-known-good copy while Vault
//! does not answer).
//! `tessera-sidecar check` reads it for probes.

use std::{collections::BTreeMap, fs, path::Path, time::SystemTime};

use serde::{Deserialize, Serialize};

/// The status file's name in the output directory.
pub const STATUS_FILE: &str = "..tessera-status.json";

/// One binding's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindingStatus {
    /// The credential version on disk.
    pub version: String,
    /// When it stops being valid (RFC 3339), if it expires.
    pub not_after: Option<String>,
    /// When it was last delivered or confirmed (RFC 3339).
    pub confirmed_at: String,
    /// When Vault last vouched for the values, as the broker reports it
    /// (RFC 3339, milliseconds): issued, renewed, or a KV read that found
    /// them current.
    #[serde(default)]
    pub vault_confirmed_at: Option<String>,
    /// True while the broker serves the values from its last-known-good copy
    /// because Vault does not answer it.
    #[serde(default)]
    pub last_known_good: bool,
    /// True while the sidecar cannot reach the broker, or the broker cannot
    /// reach Vault (`last_known_good`): the files are kept but may be outdated.
    pub stale: bool,
    /// The last error, while stale.
    pub error: Option<String>,
    /// Writes of this binding's files that failed so far (a full volume, a
    /// credential larger than the volume, an unsafe field name); the files on
    /// disk are then the previous version and `stale` is true.
    #[serde(default)]
    pub write_failures: u64,
}

/// What the broker says of Vault's confirmation of a credential.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vouched {
    /// When Vault last confirmed the values; `None` when the broker did not say.
    pub confirmed_at: Option<SystemTime>,
    /// The broker serves its last-known-good copy.
    pub last_known_good: bool,
}

/// The whole status file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Per binding.
    pub bindings: BTreeMap<String, BindingStatus>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Status {
    /// Reads `<out>/..tessera-status.json`; empty when absent or unreadable.
    pub fn read(out: &Path) -> Self {
        fs::read(out.join(STATUS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Records a delivery or confirmation of `binding` by the broker, with
    /// what it says of Vault's confirmation (`vouched`).
    pub fn confirmed(
        &mut self,
        binding: &str,
        version: &str,
        not_after: Option<SystemTime>,
        vouched: Vouched,
    ) {
        let write_failures = self.bindings.get(binding).map_or(0, |s| s.write_failures);
        self.bindings.insert(
            binding.to_owned(),
            BindingStatus {
                version: version.to_owned(),
                not_after: not_after.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                confirmed_at: now(),
                vault_confirmed_at: vouched
                    .confirmed_at
                    .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                last_known_good: vouched.last_known_good,
                stale: vouched.last_known_good,
                error: vouched.last_known_good.then(|| {
                    "the broker serves its last-known-good copy: Vault did not answer its last check"
                        .to_owned()
                }),
                write_failures,
            },
        );
    }

    /// Records that `binding`'s delivered credential could not be written:
    /// what is on disk is the previous version (or nothing).
    pub fn write_failed(&mut self, binding: &str, error: &str) {
        let status = self.bindings.entry(binding.to_owned()).or_default();
        status.stale = true;
        status.error = Some(error.chars().take(512).collect());
        status.write_failures = status.write_failures.saturating_add(1);
    }

    /// Records that the broker cannot serve `binding` as its source stands:
    /// its current files (if any) stay, marked stale with the reason.
    pub fn unservable(&mut self, binding: &str, error: &str) {
        let status = self.bindings.entry(binding.to_owned()).or_default();
        status.stale = true;
        status.error = Some(error.chars().take(512).collect());
    }

    /// Marks stale every binding whose credential expired at or before `now`
    /// without a successor (Vault or the broker away longer than its TTL);
    /// returns whether anything changed.
    pub fn expire(&mut self, now: SystemTime) -> bool {
        let mut changed = false;
        for status in self.bindings.values_mut() {
            let expired = status
                .not_after
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t <= now);
            if expired && !status.stale {
                status.stale = true;
                status.error = Some(format!(
                    "expired at {} and no successor was delivered",
                    status.not_after.as_deref().unwrap_or_default()
                ));
                changed = true;
            }
        }
        changed
    }

    /// Marks every binding stale with `error`.
    pub fn stale(&mut self, error: &str) {
        for status in self.bindings.values_mut() {
            status.stale = true;
            status.error = Some(error.chars().take(512).collect());
        }
    }

    /// Writes the file atomically (temp file, then rename). Failures are
    /// logged: the status is advisory.
    pub fn write(&self, out: &Path) {
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        if let Err(error) = tessera_atomic_file::replace(&out.join(STATUS_FILE), &text, 0o444) {
            tracing::warn!(%error, "cannot write the status file");
        }
    }
}

/// Why `check` failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// The binding has no files yet.
    #[error("binding `{0}` has not been written yet")]
    Missing(String),
    /// The binding has no files, and the sidecar recorded why (a pod
    /// annotation that does not fit what the broker delivers, a source the
    /// broker cannot serve): the probe's output says it at once.
    #[error("binding `{0}` has not been written: {1}")]
    NotWritten(String, String),
    /// The binding's credential has expired.
    #[error("binding `{0}` expired at {1} and was not renewed")]
    Expired(String, String),
}

/// Whether every binding has files that have not expired.
///
/// # Errors
/// The first binding that is missing or expired.
pub fn check(out: &Path, bindings: &[String]) -> Result<(), CheckError> {
    let status = Status::read(out);
    for binding in bindings {
        if !out.join(binding).join("..data").is_dir() {
            return Err(
                match status.bindings.get(binding).and_then(|s| s.error.clone()) {
                    Some(error) => CheckError::NotWritten(binding.clone(), error),
                    None => CheckError::Missing(binding.clone()),
                },
            );
        }
        if let Some(not_after) = status
            .bindings
            .get(binding)
            .and_then(|s| s.not_after.as_deref())
            && humantime::parse_rfc3339(not_after).is_ok_and(|t| t <= SystemTime::now())
        {
            return Err(CheckError::Expired(binding.clone(), not_after.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt as _, time::Duration};

    use super::*;

    #[test]
    fn status_round_trips_and_check_sees_missing_and_expired() {
        let out = tempfile::tempdir().unwrap();
        assert_eq!(
            check(out.path(), &["db".into()]),
            Err(CheckError::Missing("db".into()))
        );
        // A write refused for good: the probe names the reason.
        let mut status = Status::default();
        status.write_failed(
            "db",
            "tessera.dev/files renames `pasword`, which the broker did not deliver",
        );
        status.write(out.path());
        assert_eq!(
            check(out.path(), &["db".into()]).unwrap_err().to_string(),
            "binding `db` has not been written: tessera.dev/files renames `pasword`, which the broker did not deliver"
        );
        fs::create_dir_all(out.path().join("db/..data")).unwrap();
        let mut status = Status::default();
        status.confirmed(
            "db",
            "v1",
            Some(SystemTime::now() + Duration::from_secs(60)),
            Vouched::default(),
        );
        status.write(out.path());
        assert_eq!(Status::read(out.path()), status);
        assert_eq!(check(out.path(), &["db".into()]), Ok(()));
        status.stale("broker unreachable");
        status.write(out.path());
        assert!(Status::read(out.path()).bindings["db"].stale);
        status.confirmed(
            "db",
            "v1",
            Some(SystemTime::now() - Duration::from_secs(5)),
            Vouched::default(),
        );
        status.write(out.path());
        assert!(matches!(
            check(out.path(), &["db".into()]),
            Err(CheckError::Expired(..))
        ));
        assert!(
            status.expire(SystemTime::now()),
            "an expired credential is stale"
        );
        assert!(!status.expire(SystemTime::now()), "once");
        // The broker says it serves a last-known-good copy: stale, and why.
        let vouched = Vouched {
            confirmed_at: Some(SystemTime::now() - Duration::from_secs(300)),
            last_known_good: true,
        };
        status.confirmed("kv", "4", None, vouched);
        let kv = &status.bindings["kv"];
        assert!(kv.stale && kv.last_known_good, "{kv:?}");
        assert!(
            kv.error
                .as_deref()
                .unwrap()
                .contains("Vault did not answer")
        );
        assert!(kv.vault_confirmed_at.is_some());
        status.confirmed(
            "kv",
            "4",
            None,
            Vouched {
                last_known_good: false,
                ..vouched
            },
        );
        assert!(!status.bindings["kv"].stale, "confirmed again");
        let mode = fs::metadata(out.path().join(STATUS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
    }
}
