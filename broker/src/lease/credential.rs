//! What a lease engine step hands over: the [`Live`] credential as a pod
//! holds it, the wire [`Credential`] rendered from it, and the one builder of
//! audit events about it.

use std::{sync::Arc, time::SystemTime};

use tessera_proto::v1::{Credential, KeyKind};

use crate::{
    audit::{Action, Event, Outcome},
    error::Error,
    feed::Freshness,
    handle::Handle,
    identity::Identity,
    lease_id::LeaseId,
    policy::{Binding, PodKey, render::Template},
    secret::Secret,
};

/// A credential as last delivered to one pod.
#[derive(Clone, Debug)]
pub struct Live {
    /// The policy binding it was issued under (narrowed by the caller's TTL, if any).
    pub binding: Arc<Binding>,
    /// The version delivered; a new one means new values.
    pub version: String,
    /// When it was issued (or last renewed).
    pub issued_at: SystemTime,
    /// When it stops being valid; `None` for KV.
    pub not_after: Option<SystemTime>,
    /// Whether Vault can extend it.
    pub renewable: bool,
    /// Vault lease id (database) or certificate serial (PKI).
    pub lease: Option<LeaseId>,
    /// The sealed handle the pod holds; empty for KV.
    pub handle: Handle,
    /// When Vault last vouched for the values.
    pub freshness: Freshness,
}

/// Who a credential is for: the verified identity and, for the audit
/// trail, the peer address it called from (none for the broker's own sweeps).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The identity verified from the caller's token.
    pub identity: Identity,
    /// The caller's address.
    pub peer: Option<String>,
    /// The token it presented, for Vault's second gate (a login as the
    /// pod); `None` for the broker's own sweeps.
    pub bearer: Option<Secret>,
}

/// An audit event about `live`: every lease event carries the binding, its
/// source, the version, the lease digest, the lifetime left and the peer.
pub fn event(action: Action, outcome: Outcome, caller: &Caller, live: &Live) -> Event {
    let mut event = Event::new(action, outcome, Some(&caller.identity));
    event.binding = Some(live.binding.name.clone());
    event.source = Some(live.binding.source.to_string());
    event.version = Some(live.version.clone());
    event.peer = caller.peer.clone();
    event.lease_id_sha256 = live.lease.as_ref().map(LeaseId::digest);
    event.ttl_seconds = live.not_after.map(|not_after| {
        not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs()
    });
    event
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

/// Renders name templates (PKI names, SSH principals) from the caller's
/// identity, in order; the field a template lacks when one cannot be.
pub(super) fn identity_names<'a>(
    texts: impl IntoIterator<Item = &'a String>,
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
    texts
        .into_iter()
        .map(|text| {
            let template = Template::parse(text)?;
            let rendered = template.render(|name| values.get(name).map(Secret::expose_secret))?;
            Ok(String::from_utf8_lossy(&rendered).into_owned())
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
    let pod_key = binding.source.pod_key();
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
        handle: live.handle.as_str().to_owned(),
        unchanged: fields.is_none(),
        confirmed_at: Some(live.freshness.confirmed_at.into()),
        last_known_good: live.freshness.last_known_good,
        key_wanted: KeyKind::Unspecified.into(),
        // The pod asks for a successor itself (with a fresh key) at the
        // policy's fraction of the lifetime.
        renew_after: pod_key
            .and(live.not_after)
            .map(|not_after| renew_after(live.issued_at, not_after, binding.renew_fraction).into()),
        key_file: pod_key
            .map(|key| key_file(binding, key))
            .unwrap_or_default(),
    })
}

/// The answer for a binding whose key the pod makes when the request
/// brought none: which key to make, and the file to keep it in.
pub fn key_wanted(binding: &Binding, key: PodKey) -> Credential {
    Credential {
        binding: binding.name.clone(),
        file_mode: binding.output.mode.unwrap_or(0),
        group_id: binding.output.group,
        key_wanted: match key {
            PodKey::SshEd25519 => KeyKind::SshEd25519,
            PodKey::Pkcs10 => KeyKind::Pkcs10,
        }
        .into(),
        key_file: key_file(binding, key),
        ..Credential::default()
    }
}

/// The file the pod keeps its private key in: the key's field, or the name
/// the policy's `output.files` gives it.
fn key_file(binding: &Binding, key: PodKey) -> String {
    let field = key.field();
    binding
        .output
        .files
        .get(field)
        .map_or(field, String::as_str)
        .to_owned()
}

/// When a credential issued at `issued_at`, valid until `not_after`, is due
/// for a successor: at `fraction` of its lifetime.
fn renew_after(issued_at: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let lifetime = not_after.duration_since(issued_at).unwrap_or_default();
    issued_at + lifetime.mul_f64(fraction.clamp(0.0, 1.0))
}
