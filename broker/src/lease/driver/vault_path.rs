//! Any Vault path (`vault:` in the policy): what Vault answers decides the
//! life. A lease is a lease like a database user's (looked up, renewed if
//! renewable and rotated at the end if not, revoked with the pod through
//! `sys/leases/revoke`); an answer without a lease is read again whenever
//! the pod asks (its handle names no lease to resume) and, on a stream, at
//! the binding's `refreshInterval`: new values are pushed, the same ones
//! are not.

use std::{collections::BTreeMap, sync::OnceLock, time::SystemTime};

use futures::{FutureExt as _, future::BoxFuture};
use ring::{hmac, rand::SystemRandom};

use super::{Context, Driver, Minted, Standing, Values, database, vault_error, wrong_kind};
use crate::{
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::records::RecordKind,
    policy::{Binding, RenderError, Source},
    secret::Secret,
};

/// The version of values read without a lease: the same for the same
/// values (a re-read that found nothing new pushes nothing), and keyed with
/// a random key this process made, so that no one who sees versions can
/// guess short secrets (a TOTP code) from them. Another replica's versions
/// differ; a pod reconnecting there gets the values again.
fn values_version(fields: &BTreeMap<String, Secret>) -> String {
    static KEY: OnceLock<Option<hmac::Key>> = OnceLock::new();
    let key = KEY.get_or_init(|| hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).ok());
    let Some(key) = key else {
        // No randomness for a key: each read is a version of its own.
        return format!("{:016x}", fastrand::u64(..));
    };
    let mut context = hmac::Context::with_key(key);
    for (name, value) in fields {
        for part in [name.as_bytes(), value.expose_secret()] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
    }
    let tag = context.sign();
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The driver of `vault:` sources.
pub(super) struct VaultPath;

impl Driver for VaultPath {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        _identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Vault(source) = &binding.source else {
                return Err(wrong_kind(binding, "vault"));
            };
            let answer = cx
                .vault
                .call_path(
                    &source.path,
                    source.write.then_some(&source.data),
                    cx.scope(source.namespace.as_deref()),
                )
                .await
                .map_err(vault_error(binding))?;
            let mut fields = answer.fields;
            if let Some(wanted) = &source.fields {
                if let Some(missing) = wanted.iter().find(|f| !fields.contains_key(*f)) {
                    return Err(Error::Render {
                        binding: binding.name.clone(),
                        problem: RenderError::Missing(missing.clone()),
                    });
                }
                fields.retain(|name, _| wanted.contains(name));
            }
            let lease = answer.lease;
            let version = match &lease {
                Some(lease) => lease.version(),
                None => values_version(&fields),
            };
            Ok(Minted {
                values: Values::Own(fields),
                version,
                issued_at: answer.issued,
                not_after: (!answer.ttl.is_zero()).then(|| answer.issued + answer.ttl),
                renewable: lease.is_some() && answer.renewable,
                lease,
                freshness: Freshness::now(),
            })
        }
        .boxed()
    }

    fn look_up<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        claims: &'a Claims,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Standing, Error>> {
        async move {
            if claims.lease.is_empty() {
                return Ok(Standing::Gone);
            }
            database::look_up_lease(cx.vault, binding, claims, now).await
        }
        .boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        Some(RecordKind::Database)
    }
}
