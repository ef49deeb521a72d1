//! PKI certificates: issued with names rendered from the pod's identity, not
//! renewable (a successor is issued at the policy's fraction of the
//! lifetime), kept by the end sealed in the handle, revoked by serial.

use std::time::SystemTime;

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, vault_error, wrong_kind};
use crate::{
    clock::from_unix,
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::{credential::pki_names, records::RecordKind, schedule::refresh_in},
    lease_id::LeaseId,
    policy::{Binding, RenderError, Source},
    vault::{Scope, Vault, VaultError},
};

/// The PKI driver.
pub(super) struct Pki;

impl Driver for Pki {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Pki(pki) = &binding.source else {
                return Err(wrong_kind(binding, "pki"));
            };
            let names = pki_names(&pki.common_name, &pki.alt_names, identity).map_err(|field| {
                Error::Render {
                    binding: binding.name.clone(),
                    problem: RenderError::Missing(field),
                }
            })?;
            let issued = cx
                .vault
                .pki_issue(
                    &pki.mount,
                    &pki.role,
                    &names[0],
                    &names[1..],
                    binding.ttl,
                    Scope::new(Some(cx.stamp), pki.namespace.as_deref()),
                )
                .await
                .map_err(vault_error(binding))?;
            Ok(Minted {
                values: Values::Own(issued.fields),
                version: issued.serial.replace(':', ""),
                issued_at: issued.issued,
                not_after: Some(issued.not_after),
                renewable: false,
                lease: Some(LeaseId::new(issued.serial)),
                freshness: Freshness::now(),
            })
        }
        .boxed()
    }

    fn look_up<'a>(
        &'a self,
        _cx: Context<'a>,
        binding: &'a Binding,
        claims: &'a Claims,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Standing, Error>> {
        async move {
            let issued_at = from_unix(claims.issued_at);
            let not_after = from_unix(claims.not_after);
            if refresh_in(issued_at, not_after, binding.renew_fraction, 0.0, now).is_zero() {
                return Ok(Standing::Gone);
            }
            // A certificate stands on its own until it expires.
            Ok(Standing::Good {
                not_after,
                renewable: false,
                freshness: Freshness::confirmed_at(issued_at),
            })
        }
        .boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        Some(RecordKind::Pki)
    }

    fn asks_ttl(&self) -> bool {
        true
    }
}

/// Revokes a certificate by serial at its mount.
pub(super) async fn revoke(
    vault: &Vault,
    mount: &str,
    serial: &str,
    scope: Scope<'_>,
) -> Result<(), VaultError> {
    vault.pki_revoke(mount, serial, scope).await
}
