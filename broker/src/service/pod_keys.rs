//! Bindings whose private key the pod makes and keeps (SSH, PKI with
//! `key: pod`): the public parts a request brings, checked before any work,
//! and the answer for such a binding asked for without one (which key to
//! make).

use std::{collections::BTreeMap, sync::Arc};

use tessera_proto::v1::Credential;

use crate::{
    error::Error,
    lease::key_wanted,
    policy::{Binding, PodKey},
    text::printable,
};

/// The longest public key or certificate request accepted: an Ed25519 line
/// is under 100 bytes, a P-256 request under 1 KiB.
const MAX_PUBLIC_KEY: usize = 8 * 1024;

/// The public parts `sent` (binding name to bytes) as text, each for a
/// requested binding whose key the pod makes and of the kind it wants.
///
/// # Errors
/// [`Error::InvalidRequest`] naming the binding and what is wrong.
pub(super) fn checked<'a>(
    bindings: &[Arc<Binding>],
    sent: &'a BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<&'a str, &'a str>, Error> {
    let mut keys = BTreeMap::new();
    for (name, bytes) in sent {
        let shown = printable(name);
        let binding = bindings.iter().find(|b| &b.name == name).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "`public_keys` has a key for binding `{shown}`, which the request does not name"
            ))
        })?;
        let kind = binding.source.pod_key().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "`public_keys` has a key for binding `{shown}`, whose key is not made by the pod ({})",
                binding.source.kind()
            ))
        })?;
        let text = std::str::from_utf8(bytes)
            .ok()
            .filter(|text| bytes.len() <= MAX_PUBLIC_KEY && looks_like(kind, text))
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "binding `{shown}`: the public key is not {} (at most {MAX_PUBLIC_KEY} bytes)",
                    expected(kind)
                ))
            })?;
        keys.insert(name.as_str(), text);
    }
    Ok(keys)
}

/// Splits `bindings` into the answers for those whose key the pod makes and
/// `keys` lacks (which key to make), and the ones to serve.
pub(super) fn split_wanted(
    bindings: Vec<Arc<Binding>>,
    keys: &BTreeMap<&str, &str>,
) -> (Vec<Credential>, Vec<Arc<Binding>>) {
    let mut wanted = Vec::new();
    let mut served = Vec::new();
    for binding in bindings {
        match binding.source.pod_key() {
            Some(kind) if !keys.contains_key(binding.name.as_str()) => {
                wanted.push(key_wanted(&binding, kind));
            }
            _ => served.push(binding),
        }
    }
    (wanted, served)
}

fn looks_like(kind: PodKey, text: &str) -> bool {
    match kind {
        PodKey::SshEd25519 => text.starts_with("ssh-ed25519 ") && !text.trim_end().contains('\n'),
        PodKey::Pkcs10 => text
            .trim_start()
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
    }
}

fn expected(kind: PodKey) -> &'static str {
    match kind {
        PodKey::SshEd25519 => "one OpenSSH line `ssh-ed25519 AAAA…`",
        PodKey::Pkcs10 => "a PEM certificate request (`-----BEGIN CERTIFICATE REQUEST-----`)",
    }
}
