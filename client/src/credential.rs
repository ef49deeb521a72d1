//! Credentials as an application holds them: fields in zeroizing buffers,
//! with the version, lifetime and freshness the broker reports.

use std::{collections::BTreeMap, time::SystemTime};

use zeroize::Zeroizing;

/// One binding's credential.
#[derive(Clone)]
pub struct Credential {
    /// The binding name from the policy.
    pub binding: String,
    /// Field name to value (e.g. `username`, `password`); cleared from
    /// memory when dropped.
    pub fields: BTreeMap<String, Zeroizing<Vec<u8>>>,
    /// Changes whenever the values change.
    pub version: String,
    /// When the values stop being valid; `None` when they do not expire.
    pub not_after: Option<SystemTime>,
    /// When Vault last vouched for the values.
    pub confirmed_at: Option<SystemTime>,
    /// The broker serves its last-known-good copy: Vault did not answer its
    /// last check, so the values may be outdated.
    pub last_known_good: bool,
}

impl Credential {
    /// A field's value as UTF-8 text, when it is.
    pub fn text(&self, field: &str) -> Option<&str> {
        self.fields
            .get(field)
            .and_then(|value| std::str::from_utf8(value).ok())
    }
}

impl std::fmt::Debug for Credential {
    /// Values are secrets: only their names and lengths are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: BTreeMap<&str, String> = self
            .fields
            .iter()
            .map(|(name, value)| (name.as_str(), format!("<{} bytes>", value.len())))
            .collect();
        f.debug_struct("Credential")
            .field("binding", &self.binding)
            .field("fields", &fields)
            .field("version", &self.version)
            .field("not_after", &self.not_after)
            .field("confirmed_at", &self.confirmed_at)
            .field("last_known_good", &self.last_known_good)
            .finish()
    }
}

/// The current credential of every binding a watch asked for.
#[derive(Clone, Debug, Default)]
pub struct CredentialSet {
    credentials: BTreeMap<String, Credential>,
}

impl CredentialSet {
    /// The credential of `binding`.
    pub fn get(&self, binding: &str) -> Option<&Credential> {
        self.credentials.get(binding)
    }

    /// Every credential, by binding name.
    pub fn iter(&self) -> impl Iterator<Item = &Credential> {
        self.credentials.values()
    }

    /// How many bindings it holds.
    pub fn len(&self) -> usize {
        self.credentials.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    pub(crate) fn insert(&mut self, credential: Credential) {
        self.credentials
            .insert(credential.binding.clone(), credential);
    }

    pub(crate) fn remove(&mut self, binding: &str) {
        self.credentials.remove(binding);
    }

    pub(crate) fn get_mut(&mut self, binding: &str) -> Option<&mut Credential> {
        self.credentials.get_mut(binding)
    }
}

impl Credential {
    /// The credential as the broker sent it, with its lease `handle` (for
    /// the store; the copy's values are cleared by whoever drops it).
    pub(crate) fn to_wire(&self, handle: Option<&String>) -> tessera_proto::v1::Credential {
        tessera_proto::v1::Credential {
            binding: self.binding.clone(),
            fields: self
                .fields
                .iter()
                .map(|(name, value)| (name.clone(), value.to_vec()))
                .collect(),
            version: self.version.clone(),
            not_after: self.not_after.map(Into::into),
            confirmed_at: self.confirmed_at.map(Into::into),
            last_known_good: self.last_known_good,
            handle: handle.cloned().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// A wire timestamp as a `SystemTime`; `None` when absent or out of range.
fn time<T>(at: Option<T>) -> Option<SystemTime>
where
    SystemTime: TryFrom<T>,
{
    at.and_then(|t| SystemTime::try_from(t).ok())
}

impl From<tessera_proto::v1::Credential> for Credential {
    fn from(wire: tessera_proto::v1::Credential) -> Self {
        Self {
            binding: wire.binding,
            fields: wire
                .fields
                .into_iter()
                .map(|(name, value)| (name, Zeroizing::new(value)))
                .collect(),
            version: wire.version,
            not_after: time(wire.not_after),
            confirmed_at: time(wire.confirmed_at),
            last_known_good: wire.last_known_good,
        }
    }
}
