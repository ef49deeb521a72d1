//! Dynamic database users: a Vault lease, looked up when a pod presents its
//! handle (kept through a Vault outage until the end sealed in the handle),
//! renewed through `sys/leases/renew`, ended through `sys/leases/revoke`.

use std::time::{Duration, SystemTime};

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, vault_error, wrong_kind};
use crate::{
    clock::from_unix,
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::records::RecordKind,
    lease_id::LeaseId,
    policy::{Binding, Source},
    vault::{Scope, Vault, VaultError},
};

/// The database driver.
pub(super) struct Database;

impl Driver for Database {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        _identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Database(db) = &binding.source else {
                return Err(wrong_kind(binding, "database"));
            };
            let leased = cx
                .vault
                .database_creds(&db.mount, &db.role, cx.scope(db.namespace.as_deref()))
                .await
                .map_err(vault_error(binding))?;
            let lease = LeaseId::new(leased.lease_id);
            Ok(Minted {
                values: Values::Own(leased.fields),
                version: lease.version(),
                issued_at: leased.issued,
                not_after: Some(leased.issued + leased.ttl),
                renewable: leased.renewable,
                lease: Some(lease),
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
        async move { look_up_lease(cx.vault, binding, claims, now).await }.boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        Some(RecordKind::Database)
    }
}

/// A Vault lease's standing: Vault's lookup; while Vault is away, the lease
/// stands until the end sealed in its handle (marked as not confirmed), and
/// only an ended one fails the request.
pub(super) async fn look_up_lease(
    vault: &Vault,
    binding: &Binding,
    claims: &Claims,
    now: SystemTime,
) -> Result<Standing, Error> {
    let lookup = match vault
        .lease_lookup(&claims.lease, binding.source.namespace())
        .await
    {
        Ok(lookup) => lookup,
        Err(error @ VaultError::Unavailable(_)) => {
            let not_after = from_unix(claims.not_after);
            if claims.not_after == 0 || not_after <= now {
                return Err(vault_error(binding)(error));
            }
            tracing::warn!(binding = %binding.name, %error, "Vault does not answer; the pod keeps its held lease, not yet renewed");
            return Ok(Standing::Good {
                not_after,
                renewable: true,
                freshness: Freshness {
                    confirmed_at: from_unix(claims.issued_at),
                    last_known_good: true,
                },
            });
        }
        Err(error) => return Err(vault_error(binding)(error)),
    };
    Ok(match lookup {
        Some(lookup) if lookup.ttl > 0 => Standing::Good {
            not_after: now
                .checked_add(Duration::from_secs(lookup.ttl))
                .unwrap_or(now),
            renewable: lookup.renewable,
            freshness: Freshness::now(),
        },
        _ => Standing::Gone,
    })
}

/// Ends a Vault lease issued in `scope`'s namespace.
pub(super) async fn revoke(vault: &Vault, lease: &str, scope: Scope<'_>) -> Result<(), VaultError> {
    vault.lease_revoke(lease, scope).await
}
