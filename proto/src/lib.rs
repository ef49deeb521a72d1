//! The Tessera public gRPC API, package `tessera.v1`.
//!
//! Generated from `proto/tessera/v1/broker.proto` at build time with `protox`, so
//! building needs no system `protoc`. Applications in other languages compile the
//! same `.proto` file with their own toolchain.

/// Messages and the `Broker` client and server of `tessera.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, unused_qualifications)]
    include!(concat!(env!("OUT_DIR"), "/tessera.v1.rs"));
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
