//! The life of a credential: issue, resume from a held handle, renew at the
//! policy's fraction of its lifetime, rotate when it cannot be extended, and
//! revoke. Pure decisions (`refresh_in`) are separate from the Vault calls.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ring::digest;
use tessera_proto::v1::Credential;

use crate::{
    error::Error,
    feed::Feeds,
    handle::{Handle, HandleKey},
    identity::Identity,
    policy::{Binding, RenderError, Source, render::Template},
    secret::Secret,
    vault::{Vault, VaultError},
};

/// A credential as last delivered to one pod.
#[derive(Clone, Debug)]
pub struct Live {
    /// The binding.
    pub binding: Arc<Binding>,
    /// The version delivered.
    pub version: String,
    /// When it was issued (or last renewed).
    pub issued_at: SystemTime,
    /// When it stops being valid; `None` for KV.
    pub not_after: Option<SystemTime>,
    /// Whether Vault can extend it.
    pub renewable: bool,
    /// Vault lease id (database) or certificate serial (PKI).
    pub lease: Option<String>,
    /// The sealed handle the pod holds; empty for KV.
    pub handle: String,
}

/// What happened at a lifecycle step.
#[derive(Debug)]
pub enum Step {
    /// The lease was extended: the pod keeps its values.
    Renewed(Live),
    /// New values replace the old; the old lease is revoked after the overlap.
    Rotated(Box<Rotation>),
}

/// A credential and its successor.
#[derive(Debug)]
pub struct Rotation {
    /// The new credential.
    pub live: Live,
    /// What to send.
    pub credential: Credential,
    /// The superseded credential.
    pub old: Live,
}

/// `secs` after the Unix epoch; the epoch itself (already expired, the safe
/// side) when that does not fit in a `SystemTime`.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// When to act on a credential issued at `issued` and valid until
/// `not_after`: at `fraction` of its lifetime, pulled earlier by up to 10 % of
/// the lifetime by `jitter` (0..1), so a fleet started together does not renew
/// together. Zero when that moment has passed.
pub fn refresh_in(
    issued: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    jitter: f64,
    now: SystemTime,
) -> Duration {
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    // The policy refuses a fraction that is not a finite number; should one
    // reach here anyway, act at the built-in 70 % instead of panicking.
    let fraction = if fraction.is_finite() { fraction } else { 0.7 };
    let jitter = if jitter.is_finite() { jitter } else { 0.0 };
    let spread = (fraction - 0.1 * jitter.clamp(0.0, 1.0)).clamp(0.05, 0.95);
    let at = issued
        .checked_add(fraction_of(lifetime, spread))
        .unwrap_or(not_after);
    at.duration_since(now).unwrap_or_default()
}

/// `fraction` of `duration`, never panicking: zero for a fraction that is
/// negative or not a number, `duration` itself for one above 1.
pub fn fraction_of(duration: Duration, fraction: f64) -> Duration {
    if fraction.is_nan() || fraction <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(duration.as_secs_f64() * fraction.min(1.0)).unwrap_or(duration)
}

/// SHA-256 of a lease id, in hex: how the audit log names a lease without
/// giving it away (hash Vault's `lease_id` to match Vault's audit log).
pub fn lease_digest(lease_id: &str) -> String {
    digest::digest(&digest::SHA256, lease_id.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Short, stable version of a lease: the first 12 hex digits of its digest.
fn lease_version(lease_id: &str) -> String {
    let mut digest = lease_digest(lease_id);
    digest.truncate(12);
    digest
}

/// The `namespace/service-account/pod/uid` stamp for Vault's audit log.
pub fn stamp(identity: &Identity) -> String {
    let (pod, uid) = identity
        .pod
        .as_ref()
        .map_or(("-", "-"), |p| (p.name.as_str(), p.uid.as_str()));
    format!(
        "{}/{}/{pod}/{uid}",
        identity.namespace, identity.service_account
    )
}

/// Issues, resumes, renews, rotates and revokes credentials.
pub struct Lifecycle {
    vault: Arc<Vault>,
    keys: Arc<HandleKey>,
    feeds: Arc<Feeds>,
}

impl Lifecycle {
    /// Over `vault`, sealing handles with `keys`; KV reads are served from
    /// `feeds` while a poller follows the secret (some stream watches it).
    pub fn new(vault: Arc<Vault>, keys: Arc<HandleKey>, feeds: Arc<Feeds>) -> Self {
        Self { vault, keys, feeds }
    }

    fn vault_error(binding: &Binding) -> impl FnOnce(VaultError) -> Error + '_ {
        move |source| Error::Vault {
            binding: binding.name.clone(),
            source,
        }
    }

    fn seal(&self, binding: &Binding, identity: &Identity, live: &Live) -> String {
        self.keys.seal(&Handle {
            binding: binding.name.clone(),
            pod_uid: identity
                .pod
                .as_ref()
                .map(|p| p.uid.clone())
                .unwrap_or_default(),
            lease: live.lease.clone().unwrap_or_default(),
            version: live.version.clone(),
            issued_at: unix(live.issued_at),
            // Certificates cannot be extended: their end travels in the handle.
            // Leases are looked up in Vault instead.
            not_after: match binding.source {
                Source::Pki(_) => live.not_after.map_or(0, unix),
                _ => 0,
            },
        })
    }

    /// Issues a fresh credential for `binding` to `identity`.
    ///
    /// # Errors
    /// A Vault or rendering [`Error`].
    pub async fn issue(
        &self,
        binding: &Arc<Binding>,
        identity: &Identity,
    ) -> Result<(Live, Credential), Error> {
        let caller = stamp(identity);
        let (mut live, fields) = match &binding.source {
            Source::Kv2(kv) => {
                let secret = match self.feeds.latest(kv) {
                    Some(latest) => latest,
                    None => Arc::new(
                        self.vault
                            .read_kv2(kv, Some(&caller))
                            .await
                            .map_err(Self::vault_error(binding))?,
                    ),
                };
                let live = Live {
                    binding: binding.clone(),
                    version: secret.version.to_string(),
                    issued_at: secret.created.unwrap_or_else(SystemTime::now),
                    not_after: None,
                    renewable: false,
                    lease: None,
                    handle: String::new(),
                };
                (live, secret.fields.clone())
            }
            Source::Database(db) => {
                let leased = self
                    .vault
                    .database_creds(&db.mount, &db.role, Some(&caller))
                    .await
                    .map_err(Self::vault_error(binding))?;
                let live = Live {
                    binding: binding.clone(),
                    version: lease_version(&leased.lease_id),
                    issued_at: leased.issued,
                    not_after: Some(leased.issued + leased.ttl),
                    renewable: leased.renewable,
                    lease: Some(leased.lease_id),
                    handle: String::new(),
                };
                (live, leased.fields)
            }
            Source::Pki(pki) => {
                let names =
                    pki_names(&pki.common_name, &pki.alt_names, identity).map_err(|field| {
                        Error::Render {
                            binding: binding.name.clone(),
                            problem: RenderError::Missing(field),
                        }
                    })?;
                let issued = self
                    .vault
                    .pki_issue(
                        &pki.mount,
                        &pki.role,
                        &names[0],
                        &names[1..],
                        binding.ttl,
                        Some(&caller),
                    )
                    .await
                    .map_err(Self::vault_error(binding))?;
                let live = Live {
                    binding: binding.clone(),
                    version: issued.serial.replace(':', ""),
                    issued_at: issued.issued,
                    not_after: Some(issued.not_after),
                    renewable: false,
                    lease: Some(issued.serial),
                    handle: String::new(),
                };
                (live, issued.fields)
            }
        };
        if binding.source.is_leased() {
            live.handle = self.seal(binding, identity, &live);
        }
        let credential = credential(&live, Some(&fields))?;
        Ok((live, credential))
    }

    /// Resumes a credential the pod holds, when it is still good: the pod
    /// keeps its values (no second database user). `None` when it must be
    /// reissued (expired, revoked, or due for rotation).
    ///
    /// # Errors
    /// [`Error::Handle`] for a forged handle or one of another pod.
    pub async fn resume(
        &self,
        binding: &Arc<Binding>,
        identity: &Identity,
        held: &str,
    ) -> Result<Option<(Live, Credential)>, Error> {
        let pod_uid = identity.pod.as_ref().map_or("", |p| p.uid.as_str());
        let handle = self.keys.open(held, &binding.name, pod_uid)?;
        let now = SystemTime::now();
        let issued_at = from_unix(handle.issued_at);
        let live = match &binding.source {
            Source::Kv2(_) => return Ok(None),
            Source::Database(_) => {
                let Some(lookup) = self
                    .vault
                    .lease_lookup(&handle.lease)
                    .await
                    .map_err(Self::vault_error(binding))?
                else {
                    return Ok(None);
                };
                if lookup.ttl == 0 {
                    return Ok(None);
                }
                Live {
                    binding: binding.clone(),
                    version: handle.version,
                    issued_at,
                    not_after: Some(
                        now.checked_add(Duration::from_secs(lookup.ttl))
                            .unwrap_or(now),
                    ),
                    renewable: lookup.renewable,
                    lease: Some(handle.lease),
                    handle: held.to_owned(),
                }
            }
            Source::Pki(_) => {
                let not_after = from_unix(handle.not_after);
                if refresh_in(issued_at, not_after, binding.renew_fraction, 0.0, now).is_zero() {
                    return Ok(None);
                }
                Live {
                    binding: binding.clone(),
                    version: handle.version,
                    issued_at,
                    not_after: Some(not_after),
                    renewable: false,
                    lease: Some(handle.lease),
                    handle: held.to_owned(),
                }
            }
        };
        let credential = credential(&live, None)?;
        Ok(Some((live, credential)))
    }

    /// When the next renewal or rotation of `live` is due (from now).
    pub fn due_in(&self, live: &Live, jitter: f64) -> Option<Duration> {
        let not_after = live.not_after?;
        Some(refresh_in(
            live.issued_at,
            not_after,
            live.binding.renew_fraction,
            jitter,
            SystemTime::now(),
        ))
    }

    /// Renews `live` if Vault will extend it meaningfully; otherwise issues
    /// its successor.
    ///
    /// # Errors
    /// A Vault [`Error`]; the caller retries with backoff.
    pub async fn renew_or_rotate(&self, live: &Live, identity: &Identity) -> Result<Step, Error> {
        let binding = &live.binding;
        if let (Source::Database(_), true, Some(lease)) =
            (&binding.source, live.renewable, &live.lease)
        {
            match self
                .vault
                .lease_renew(lease, binding.ttl, Some(&stamp(identity)))
                .await
            {
                Ok(granted) => {
                    let now = SystemTime::now();
                    let old_end = live.not_after.unwrap_or(now);
                    let new_end = now.checked_add(granted).unwrap_or(now);
                    // Keep the lease if it was extended and will still have at
                    // least the overlap left at the next refresh; otherwise it is
                    // near its max TTL, and a successor delivered now leaves the
                    // app the whole overlap to switch.
                    let left_at_next_refresh = fraction_of(granted, 1.0 - binding.renew_fraction);
                    if new_end > old_end && left_at_next_refresh >= binding.overlap {
                        let mut renewed = live.clone();
                        renewed.issued_at = now;
                        renewed.not_after = Some(new_end);
                        return Ok(Step::Renewed(renewed));
                    }
                }
                // Vault no longer knows the lease (revoked by hand, or expired
                // during an outage): renewing again can never succeed, so a
                // successor is issued now.
                Err(VaultError::Invalid(detail) | VaultError::NotFound(detail)) => {
                    tracing::warn!(binding = %binding.name, %detail, "Vault no longer knows the lease; issuing a successor");
                }
                Err(error) => return Err(Self::vault_error(binding)(error)),
            }
        }
        let (new, credential) = self.issue(binding, identity).await?;
        Ok(Step::Rotated(Box::new(Rotation {
            live: new,
            credential,
            old: live.clone(),
        })))
    }

    /// Ends a credential in Vault: revokes a lease or a certificate; KV has
    /// nothing to end.
    ///
    /// # Errors
    /// A Vault [`Error`].
    pub async fn revoke(&self, live: &Live, identity: &Identity) -> Result<(), Error> {
        let binding = &live.binding;
        let caller = stamp(identity);
        match (&binding.source, &live.lease) {
            (Source::Database(_), Some(lease)) => self
                .vault
                .lease_revoke(lease, Some(&caller))
                .await
                .map_err(Self::vault_error(binding)),
            (Source::Pki(pki), Some(serial)) => self
                .vault
                .pki_revoke(&pki.mount, serial, Some(&caller))
                .await
                .map_err(Self::vault_error(binding)),
            _ => Ok(()),
        }
    }

    /// The live credential a held handle names, for revocation.
    ///
    /// # Errors
    /// [`Error::Handle`] for a forged handle or one of another pod.
    pub fn held(
        &self,
        binding: &Arc<Binding>,
        identity: &Identity,
        held: &str,
    ) -> Result<Live, Error> {
        let pod_uid = identity.pod.as_ref().map_or("", |p| p.uid.as_str());
        let handle = self.keys.open(held, &binding.name, pod_uid)?;
        Ok(Live {
            binding: binding.clone(),
            version: handle.version,
            issued_at: from_unix(handle.issued_at),
            not_after: None,
            renewable: false,
            lease: (!handle.lease.is_empty()).then_some(handle.lease),
            handle: held.to_owned(),
        })
    }
}

/// Renders PKI names from the caller's identity: the common name first.
fn pki_names(
    common_name: &str,
    alt_names: &[String],
    identity: &Identity,
) -> Result<Vec<String>, String> {
    let values: std::collections::BTreeMap<String, Secret> = [
        ("pod", identity.pod.as_ref().map_or("", |p| p.name.as_str())),
        ("namespace", identity.namespace.as_str()),
        ("serviceAccount", identity.service_account.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Secret::from(v.to_owned())))
    .collect();
    std::iter::once(common_name)
        .chain(alt_names.iter().map(String::as_str))
        .map(|text| {
            let template = Template::parse(text)?;
            let rendered = template.render(&values)?;
            Ok(String::from_utf8_lossy(rendered.expose_secret()).into_owned())
        })
        .collect()
}

/// The wire credential: the binding's files from `fields`, or, without
/// fields, an `unchanged` notice for values the caller already holds.
///
/// # Errors
/// [`Error::Render`] when the source's fields do not make the binding's
/// files (a missing template field, a collision, an unsafe field name).
pub fn credential(
    live: &Live,
    fields: Option<&std::collections::BTreeMap<String, Secret>>,
) -> Result<Credential, Error> {
    let binding = &live.binding;
    let files = match fields {
        Some(fields) => binding.render(fields).map_err(|problem| Error::Render {
            binding: binding.name.clone(),
            problem,
        })?,
        None => Default::default(),
    };
    Ok(Credential {
        binding: binding.name.clone(),
        fields: files
            .iter()
            .map(|(k, v)| (k.clone(), v.expose_secret().to_vec()))
            .collect(),
        version: live.version.clone(),
        issued_at: Some(live.issued_at.into()),
        not_after: live.not_after.map(Into::into),
        renewable: live.renewable,
        file_mode: binding.output.mode.unwrap_or(0),
        group_id: binding.output.group,
        handle: live.handle.clone(),
        unchanged: fields.is_none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn refresh_happens_at_the_fraction_of_the_lifetime() {
        let d = refresh_in(at(1000), at(2000), 0.7, 0.0, at(1000));
        assert_eq!(d, Duration::from_secs(700));
        let later = refresh_in(at(1000), at(2000), 0.7, 0.0, at(1500));
        assert_eq!(later, Duration::from_secs(200));
        assert_eq!(
            refresh_in(at(1000), at(2000), 0.7, 0.0, at(1900)),
            Duration::ZERO
        );
    }

    #[test]
    fn jitter_spreads_refreshes_earlier_within_a_tenth_of_the_lifetime() {
        let early = refresh_in(at(0), at(1000), 0.7, 1.0, at(0));
        assert_eq!(early, Duration::from_secs(600));
        let mid = refresh_in(at(0), at(1000), 0.7, 0.5, at(0));
        assert_eq!(mid, Duration::from_secs(650));
    }

    #[test]
    fn absurd_unix_times_count_as_expired_instead_of_panicking() {
        assert_eq!(from_unix(u64::MAX), UNIX_EPOCH);
        assert_eq!(from_unix(10), at(10));
    }

    #[test]
    fn refresh_survives_fractions_that_are_not_numbers() {
        for fraction in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                refresh_in(at(0), at(100), fraction, 0.0, at(0)),
                Duration::from_secs(70)
            );
            assert_eq!(
                refresh_in(at(0), at(100), 0.7, fraction, at(0)),
                Duration::from_secs(70)
            );
        }
        assert_eq!(
            fraction_of(Duration::from_secs(10), f64::NAN),
            Duration::ZERO
        );
        assert_eq!(
            fraction_of(Duration::from_secs(10), 2.0),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn refresh_is_clamped_for_odd_fractions() {
        assert_eq!(
            refresh_in(at(0), at(100), 1.5, 0.0, at(0)),
            Duration::from_secs(95)
        );
        assert_eq!(
            refresh_in(at(0), at(100), 0.0, 0.0, at(0)),
            Duration::from_secs(5)
        );
    }
}
