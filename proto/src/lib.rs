//! The Tessera public gRPC API, package `tessera.v1`.
//!
//! Generated from `proto/tessera/v1/broker.proto` at build time with `protox`, so
//! building needs no system `protoc`. Applications in other languages compile the
//! same `.proto` file with their own toolchain.

pub mod codec;
pub mod reason;
mod reload_url;

pub use reload_url::{ReloadUrl, parse_reload_url};

/// Messages and the `Broker` client and server of `tessera.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/tessera.v1.rs"));
}

/// Between broker replicas only (not part of the public API): the copies
/// of KV secrets one replica reads from Vault for the others.
pub mod peer {
    /// `tessera.peer.v1`.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, unused_qualifications)]
        include!(concat!(env!("OUT_DIR"), "/tessera.peer.v1.rs"));
    }
}

impl std::fmt::Debug for peer::v1::KvCopy {
    /// Values are secrets: only the source, the version and field names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCopy")
            .field("source", &self.source)
            .field("version", &self.version)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("last_known_good", &self.last_known_good)
            .finish()
    }
}

impl std::fmt::Debug for v1::Credential {
    /// Field values are secrets: only their names and lengths are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: std::collections::BTreeMap<&str, String> = self
            .fields
            .iter()
            .map(|(name, value)| (name.as_str(), format!("<{} bytes>", value.len())))
            .collect();
        f.debug_struct("Credential")
            .field("binding", &self.binding)
            .field("fields", &fields)
            .field("version", &self.version)
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .field("renewable", &self.renewable)
            .field("file_mode", &self.file_mode)
            .field("group_id", &self.group_id)
            .field("handle", &format_args!("<{} bytes>", self.handle.len()))
            .field("unchanged", &self.unchanged)
            .field("confirmed_at", &self.confirmed_at)
            .field("last_known_good", &self.last_known_good)
            .field("key_wanted", &self.key_wanted)
            .field("renew_after", &self.renew_after)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));

/// Whether `name` is acceptable as a binding or field name: it becomes a file or
/// directory name in the pod's volume, so no `/` or NUL, not empty or `.`, no
/// leading `..` (reserved for the writer's `..data` entries), at most 253 bytes.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && !name.starts_with("..")
        && !name.contains(['/', '\0'])
}

#[cfg(test)]
mod tests {
    use super::v1::Credential;

    #[test]
    fn credential_debug_hides_values() {
        let credential = Credential {
            binding: "db".into(),
            fields: [("password".to_owned(), b"hunter2".to_vec())].into(),
            handle: "sealed-handle".into(),
            ..Credential::default()
        };
        let shown = format!("{credential:?}");
        assert!(
            shown.contains("password") && shown.contains("<7 bytes>"),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("sealed-handle"),
            "{shown}"
        );
        assert!(
            !format!("{:?}", vec![credential]).contains("104, 117"),
            "no raw bytes"
        );
    }
}
