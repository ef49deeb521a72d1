//! Replicas that cooperate: each replica knows its peers (a static list of
//! addresses), follows them over mutual TLS (a certificate only brokers
//! hold, signed by the peer CA), and the live replicas share the work of
//! reading Vault: each KV secret is read by one replica, its owner, chosen
//! by rendezvous hashing over the live members, which tells every peer at
//! once when the secret changes. When a replica dies its secrets move to
//! the survivors as soon as their streams from it end; a replica that starts
//! while Vault is away takes the copies its peers hold.
//!
//! Rendezvous hashing rather than Kubernetes Lease objects: every replica
//! computes the same owner from the same live set with no write to the API
//! server and no election round; when a member goes, only its secrets move.

mod follow;
mod serve;

use std::{net::SocketAddr, path::PathBuf};

pub use follow::follow_peers;
pub use serve::serve_peers;

pub use crate::membership::{Peers, owner, source_key};

/// `peers:`: this replica's peer address and where its peers' are found.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// Where the peer channel listens.
    pub listen: SocketAddr,
    /// This replica's address as its peers dial it (`host:port`).
    pub advertise: String,
    /// Where the replicas' peer addresses come from.
    pub addresses: PeerAddresses,
    /// The peer certificate (PEM chain): server and client certificate of
    /// the peer channel, held only by brokers.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs peer certificates: the only one the channel trusts.
    pub ca: PathBuf,
}

/// Where the replicas' peer addresses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAddresses {
    /// Every replica's address, this one's too.
    Static(Vec<String>),
    /// The endpoints of the broker's Service, from its EndpointSlices
    /// (through the API server): each ready endpoint's address with the
    /// slice's port named `port`.
    EndpointSlices {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name (`kubernetes.io/service-name`).
        service: String,
        /// The name of the peer port in the slices.
        port: String,
    },
}

/// The name every peer certificate carries (a DNS SAN), and the one a
/// follower checks: peers are dialled by address, trusted by this name.
pub const PEER_NAME: &str = "tessera-peer";
