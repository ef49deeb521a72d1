//! SSH certificates for an Ed25519 key the pod makes and keeps: Vault's SSH
//! engine signs the public key for principals rendered from the pod's
//! identity. Nothing to renew (the pod asks again with a fresh key) and
//! nothing to revoke (Vault keeps no list of revoked SSH certificates): a
//! short TTL is the control.

use std::time::SystemTime;

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, pod_key_of, vault_error, wrong_kind};
use crate::{
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::{credential::identity_names, records::RecordKind},
    policy::{Binding, RenderError, Source},
    vault::SshSigning,
};

/// The SSH driver.
pub(super) struct Ssh;

impl Driver for Ssh {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Ssh(ssh) = &binding.source else {
                return Err(wrong_kind(binding, "ssh"));
            };
            let public_key = pod_key_of(cx, binding)?;
            let principals =
                identity_names(&ssh.principals, identity).map_err(|field| Error::Render {
                    binding: binding.name.clone(),
                    problem: RenderError::Missing(field),
                })?;
            let signing = SshSigning {
                public_key,
                principals: &principals,
                extensions: &ssh.extensions,
                ttl: binding.ttl,
            };
            let scope = cx.scope(ssh.namespace.as_deref());
            let issued = cx
                .vault
                .ssh_sign(&ssh.mount, &ssh.role, &signing, scope)
                .await
                .map_err(vault_error(binding))?;
            Ok(Minted {
                values: Values::Own(issued.fields),
                version: issued.serial,
                issued_at: issued.issued,
                not_after: Some(issued.not_after),
                renewable: false,
                lease: None,
                freshness: Freshness::now(),
            })
        }
        .boxed()
    }

    fn look_up<'a>(
        &'a self,
        _cx: Context<'a>,
        _binding: &'a Binding,
        _claims: &'a Claims,
        _now: SystemTime,
    ) -> BoxFuture<'a, Result<Standing, Error>> {
        // No handle is sealed for an SSH certificate: each one is asked for
        // with a fresh key, never resumed.
        async { Ok(Standing::Gone) }.boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        None
    }

    fn asks_ttl(&self) -> bool {
        true
    }
}
