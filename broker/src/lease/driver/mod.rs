//! What differs between the kinds of credential, one driver each: how one
//! is issued, what Vault says of one a pod holds, and how its lease ends.
//! The engine keeps everything else the same for every kind: handles,
//! lease records, the per-pod cap, renewal schedules, rotation with overlap
//! and the audit trail. A new kind is a driver here, its policy source, its
//! docs and its tests.

mod database;
mod kv;
mod pki;
mod ssh;
mod vault_path;

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use futures::future::BoxFuture;

use super::records::RecordKind;
use crate::{
    error::Error,
    feed::{Feeds, Freshness},
    handle::Claims,
    identity::Identity,
    lease_id::LeaseId,
    policy::{Binding, Source},
    secret::Secret,
    vault::{KvSecret, Scope, Vault, VaultError},
};

pub(super) use kv::kv_credential_parts;

/// What a driver may use: Vault, the KV feeds, the stamp naming the caller
/// in Vault's audit log, the public part of the key the pod made (for a
/// binding whose key stays in the pod), and the pod's own Vault token (for
/// a binding behind Vault's second gate: every read uses it, none the
/// broker's).
#[derive(Clone, Copy)]
pub(super) struct Context<'a> {
    pub vault: &'a Vault,
    pub feeds: &'a Feeds,
    pub stamp: &'a str,
    pub pod_key: Option<&'a str>,
    pub gate: Option<&'a Secret>,
}

impl<'a> Context<'a> {
    /// A request for the caller in `namespace`, with the pod's own token
    /// when the binding is behind the second gate.
    pub(super) fn scope(&self, namespace: Option<&'a str>) -> Scope<'a> {
        Scope::new(Some(self.stamp), namespace).with_token(self.gate)
    }
}

/// A credential's values as the source delivered them: its own, or the KV
/// feed's shared read (not copied per pod).
pub(super) enum Values {
    /// Made for this credential.
    Own(BTreeMap<String, Secret>),
    /// A KV secret's version, shared with every pod it is served to.
    Shared(Arc<KvSecret>),
}

impl Values {
    /// Field name to value.
    pub(super) fn fields(&self) -> &BTreeMap<String, Secret> {
        match self {
            Values::Own(fields) => fields,
            Values::Shared(secret) => &secret.fields,
        }
    }
}

/// A credential as a driver made it.
pub(super) struct Minted {
    /// Field name to value, as the source delivered them.
    pub values: Values,
    /// Changes whenever the values change.
    pub version: String,
    /// When Vault made it.
    pub issued_at: SystemTime,
    /// When it stops being valid; `None` for a static secret.
    pub not_after: Option<SystemTime>,
    /// Whether Vault can extend it.
    pub renewable: bool,
    /// The lease id or serial that ends it; `None` for a static secret.
    pub lease: Option<LeaseId>,
    /// When Vault last vouched for the values.
    pub freshness: Freshness,
}

/// What Vault says of a credential a pod holds.
pub(super) enum Standing {
    /// Still good until `not_after`; `renewable` when Vault can extend it.
    Good {
        /// Its current end.
        not_after: SystemTime,
        /// Whether Vault can extend it.
        renewable: bool,
        /// When Vault last vouched for it, and whether it answered now.
        freshness: Freshness,
    },
    /// Gone, or too close to its end to keep: the pod gets a fresh one.
    Gone,
}

/// One kind of credential.
pub(super) trait Driver: Sync {
    /// Issues a credential for `binding` to `identity`.
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>>;

    /// What Vault says now of the credential `claims` describe (sealed in
    /// the handle the pod presented).
    fn look_up<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        claims: &'a Claims,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Standing, Error>>;

    /// How its lease is filed in a record and ended; `None` for a static
    /// secret, which has no lease.
    fn lease_kind(&self) -> Option<RecordKind>;

    /// Whether Vault is asked for the binding's TTL at issue (a
    /// certificate), rather than choosing one the engine may have to cut
    /// down (a lease, whose role sets its default).
    fn asks_ttl(&self) -> bool {
        false
    }
}

/// The driver of `source`'s kind.
pub(super) fn of(source: &Source) -> &'static dyn Driver {
    match source {
        Source::Kv2(_) => &kv::Kv,
        Source::Database(_) => &database::Database,
        Source::Pki(_) => &pki::Pki,
        Source::Ssh(_) => &ssh::Ssh,
        Source::Vault(_) => &vault_path::VaultPath,
    }
}

impl RecordKind {
    /// Ends the lease `lease` (an id or a serial) issued at `mount` in
    /// `scope`'s namespace: what revocation needs, with or without the policy.
    pub(super) async fn revoke(
        self,
        vault: &Vault,
        mount: &str,
        lease: &str,
        scope: Scope<'_>,
    ) -> Result<(), VaultError> {
        match self {
            RecordKind::Database => database::revoke(vault, lease, scope).await,
            RecordKind::Pki => pki::revoke(vault, mount, lease, scope).await,
        }
    }

    /// Whether a credential of this kind nobody uses any more (superseded,
    /// or never delivered) is revoked (a lease), or left to expire (a
    /// certificate: revoking it would only grow the CRL).
    pub(super) fn revokes_unused(self) -> bool {
        match self {
            RecordKind::Database => true,
            RecordKind::Pki => false,
        }
    }
}

/// The binding's source is not the driver's kind: a bug, reported as an
/// error rather than a panic.
fn wrong_kind(binding: &Binding, kind: &str) -> Error {
    Error::InvalidRequest(format!(
        "binding `{}`: its source is not {kind} (an internal error; please report it)",
        binding.name
    ))
}

/// The public key (or certificate request) the pod sent for `binding`.
fn pod_key_of<'a>(cx: Context<'a>, binding: &Binding) -> Result<&'a str, Error> {
    cx.pod_key.ok_or_else(|| {
        Error::InvalidRequest(format!(
            "binding `{}`: its key is made by the pod: Fetch it with the public part in `public_keys`",
            binding.name
        ))
    })
}

fn vault_error(binding: &Binding) -> impl FnOnce(VaultError) -> Error + '_ {
    move |source| Error::Vault {
        binding: binding.name.clone(),
        source,
    }
}
