//! Any Vault path (`vault:` in the policy): what Vault answers decides the
//! life. A lease is a lease like a database user's (looked up, renewed if
//! renewable and rotated at the end if not, revoked with the pod through
//! `sys/leases/revoke`); an answer without a lease is read again whenever
//! the pod asks (its handle names no lease to resume).

use std::time::SystemTime;

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, database, vault_error, wrong_kind};
use crate::{
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::records::RecordKind,
    policy::{Binding, RenderError, Source},
    vault::Scope,
};

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
                    Scope::new(Some(cx.stamp), source.namespace.as_deref()),
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
            Ok(Minted {
                values: Values::Own(fields),
                // Without a lease, each read is a version of its own (a
                // digest of the values would let anyone who sees versions
                // guess short secrets, e.g. a TOTP code).
                version: match &lease {
                    Some(lease) => lease.version(),
                    None => format!("{:016x}", fastrand::u64(..)),
                },
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
