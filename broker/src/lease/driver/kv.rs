//! KV version 2: a static secret. Issued from the feed's last good read
//! when a poller follows the secret (else read once), never resumed (the
//! feed serves it again at no cost), nothing to end.

use std::{sync::Arc, time::SystemTime};

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, vault_error, wrong_kind};
use crate::{
    error::Error,
    feed::{Fed, Freshness},
    handle::Claims,
    identity::Identity,
    lease::records::RecordKind,
    policy::{Binding, Source},
};

/// The KV v2 driver.
pub(super) struct Kv;

impl Driver for Kv {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        _identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Kv2(kv) = &binding.source else {
                return Err(wrong_kind(binding, "kv2"));
            };
            // Behind the second gate every delivery is read with the pod's
            // own token: never from the feed the broker reads with its own.
            let fed = match cx.feeds.latest(kv).filter(|_| cx.gate.is_none()) {
                Some(fed) => fed,
                None => {
                    let fed = Fed {
                        secret: Arc::new(
                            cx.vault
                                .read_kv2(kv, Some(cx.stamp), cx.gate)
                                .await
                                .map_err(vault_error(binding))?,
                        ),
                        freshness: Freshness::now(),
                    };
                    // Read with the broker's own token: the next pod is
                    // served from it. A pod's own read stays its own.
                    if cx.gate.is_none() {
                        cx.feeds.keep(kv, fed.clone());
                    }
                    fed
                }
            };
            Ok(kv_credential_parts(&fed))
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
        async { Ok(Standing::Gone) }.boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        None
    }
}

/// A KV secret's version as a credential's parts: what issuing serves and
/// what a stream pushes when the secret changes.
pub(in crate::lease) fn kv_credential_parts(fed: &Fed) -> Minted {
    let secret = &fed.secret;
    Minted {
        values: Values::Shared(secret.clone()),
        version: secret.version.to_string(),
        issued_at: secret.created.unwrap_or_else(SystemTime::now),
        not_after: None,
        renewable: false,
        lease: None,
        freshness: fed.freshness,
    }
}
