//! The edges of a request: its bearer token, the names and handles it
//! carries (checked before any work), its span, and how a failure becomes
//! the caller's status.

use std::collections::BTreeSet;

use tessera_proto::v1::{Held, Identity as ProtoIdentity};
use tonic::{Request, Status};

use super::MAX_BINDINGS_PER_REQUEST;
use crate::{error::Error, identity::Identity, secret::Secret, text::printable};

/// The token from `authorization: Bearer <token>`.
pub(super) fn bearer<T>(request: &Request<T>) -> Result<Secret, Error> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or(Error::MissingToken(
            "missing `authorization: Bearer <service-account token>` metadata",
        ))?;
    let value = value
        .to_str()
        .map_err(|_| Error::MissingToken("`authorization` metadata is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Secret::from(token.trim().to_owned()))
        }
        _ => Err(Error::MissingToken(
            "`authorization` metadata is not `Bearer <token>`",
        )),
    }
}

/// The distinct handles of a Revoke, at most [`MAX_BINDINGS_PER_REQUEST`]
/// of them and of the bindings it names.
pub(super) fn unique_handles<'a>(
    held: &'a [Held],
    bindings: &[String],
) -> Result<Vec<&'a Held>, Error> {
    if held.len() > MAX_BINDINGS_PER_REQUEST || bindings.len() > MAX_BINDINGS_PER_REQUEST {
        return Err(Error::InvalidRequest(format!(
            "{} lease handles and {} bindings in one Revoke; at most {MAX_BINDINGS_PER_REQUEST} of each",
            held.len(),
            bindings.len()
        )));
    }
    let mut seen = BTreeSet::new();
    Ok(held
        .iter()
        .filter(|h| seen.insert((h.binding.as_str(), h.handle.as_str())))
        .collect())
}

pub(super) fn check_names(names: &[String]) -> Result<(), Error> {
    if names.is_empty() {
        return Err(Error::InvalidRequest(
            "name at least one binding".to_owned(),
        ));
    }
    if names.len() > MAX_BINDINGS_PER_REQUEST {
        return Err(Error::InvalidRequest(format!(
            "{} bindings requested; at most {MAX_BINDINGS_PER_REQUEST} per request",
            names.len()
        )));
    }
    let mut seen = BTreeSet::new();
    if let Some(twice) = names.iter().find(|n| !seen.insert(*n)) {
        return Err(Error::InvalidRequest(format!(
            "binding `{}` is named twice",
            printable(twice)
        )));
    }
    Ok(())
}

pub(super) fn log_failure(error: Error) -> Status {
    match &error {
        Error::Vault { .. } | Error::LeaseRecord { .. } => {
            tracing::warn!(%error, "request failed");
        }
        _ => tracing::info!(%error, "request refused"),
    }
    error.into()
}

pub(super) fn proto_identity(identity: Identity) -> ProtoIdentity {
    let (pod_name, pod_uid) = identity.pod.map(|p| (p.name, p.uid)).unwrap_or_default();
    ProtoIdentity {
        namespace: identity.namespace,
        service_account: identity.service_account,
        service_account_uid: identity.service_account_uid,
        pod_name,
        pod_uid,
        node_name: identity.node.map(|n| n.name).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_names_with_newlines_cannot_forge_log_lines() {
        let forged = "db\n2026-12-01T00:00:00Z INFO credential delivered binding=admin\r";
        let shown = printable(forged);
        assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown}");
        assert!(shown.starts_with("db\\n2026"), "{shown}");
        assert_eq!(printable("orders-db"), "orders-db");
        assert_eq!(printable(&"x".repeat(300)).len(), 253);
    }

    #[test]
    fn revoke_handles_are_capped_and_deduplicated() {
        let held = |binding: &str, handle: &str| Held {
            binding: binding.into(),
            handle: handle.into(),
        };
        let same = vec![held("db", "h1"); MAX_BINDINGS_PER_REQUEST];
        assert_eq!(unique_handles(&same, &[]).unwrap().len(), 1);
        let mixed = [held("db", "h1"), held("db", "h2"), held("db", "h1")];
        assert_eq!(unique_handles(&mixed, &[]).unwrap().len(), 2);
        let flood = vec![held("db", "h1"); 10_000];
        assert!(matches!(
            unique_handles(&flood, &[]),
            Err(Error::InvalidRequest(_))
        ));
        let names = vec!["kv".to_owned(); 10_000];
        assert!(matches!(
            unique_handles(&[], &names),
            Err(Error::InvalidRequest(_))
        ));
    }
}
