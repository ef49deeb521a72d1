//! Compiles `tessera/v1/broker.proto` with protox (pure Rust, no system `protoc`)
//! and generates the prost messages and tonic client/server.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let proto = "tessera/v1/broker.proto";
    let peer = "tessera/peer/v1/peer.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={peer}");
    let descriptors = protox::compile([proto], ["."])?;
    let peer_descriptors = protox::compile([peer], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tessera_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .btree_map(".")
        // Credential carries secret values: its Debug (in lib.rs) prints only
        // field names and lengths.
        .skip_debug([".tessera.v1.Credential"])
        // A request that does not parse is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(descriptors)?;
    // The peer protocol: copies of KV values travel in it.
    tonic_prost_build::configure()
        .btree_map(".")
        .skip_debug([".tessera.peer.v1.KvCopy"])
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(peer_descriptors)?;
    Ok(())
}
