//! Replicas that follow each other: a peer CA and the one certificate every
//! replica holds (DNS name `tessera-peer`, server and client use), a
//! foreign CA's certificate for a caller that is no peer, and replicas
//! started with a `peers:` block naming each other.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use crate::{
    BrokerConfig, Env, PeerTlsConfig, PeersConfig, Replica, config::EndpointSlicesConfig, free_port,
};

/// Files of a certificate and its key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM key.
    pub key: PathBuf,
}

/// The peer CA and certificate, and a certificate of another CA.
pub struct PeerPki {
    /// The peer CA's certificate.
    pub ca: PathBuf,
    /// The certificate every replica holds.
    pub peer: CertFiles,
    /// A certificate for the same name from a CA the replicas do not trust
    /// (as a pod could hold).
    pub foreign: CertFiles,
}

impl PeerPki {
    /// Makes them in `dir`.
    pub fn new(dir: &Path) -> Self {
        let (foreign_ca, foreign_key) = new_ca("not the peer CA");
        let (ca, ca_key) = new_ca("Tessera peer CA");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let issue = |issuer_cert: &rcgen::Certificate, issuer_key: &KeyPair, name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["tessera-peer".to_owned()]).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "tessera-peer");
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let issuer = Issuer::from_ca_cert_der(issuer_cert.der(), issuer_key).unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            CertFiles {
                cert: write(&format!("{name}.crt"), &cert.pem()),
                key: write(&format!("{name}.key"), &key.serialize_pem()),
            }
        };
        Self {
            ca: write("peer-ca.crt", &ca.pem()),
            peer: issue(&ca, &ca_key, "peer"),
            foreign: issue(&foreign_ca, &foreign_key, "foreign"),
        }
    }
}

fn new_ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// This machine's own IPv4 address (the one its default route leaves
/// from; no packet is sent to learn it).
pub fn host_address() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .connect("192.0.2.254:9")
        .expect("a route off this machine (for its own address)");
    let address = socket.local_addr().unwrap().ip();
    assert!(!address.is_loopback(), "no address but loopback: {address}");
    address
}

/// The peer addresses of `count` replicas: free loopback ports.
pub fn peer_addresses(count: usize) -> Vec<String> {
    (0..count)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect()
}

impl Env {
    /// Starts replica `name` listening for peers at `advertise`, one of
    /// `addresses` (every replica's), holding the peer certificate of `pki`.
    /// Every sweep of its lease records is a full one while it owns the
    /// full pass, so a test sees who makes them.
    pub async fn start_peer(
        &self,
        name: &str,
        advertise: &str,
        addresses: &[String],
        pki: &PeerPki,
    ) -> Replica {
        let peers = peers_config(advertise, pki, Some(addresses.to_vec()), None);
        self.start_peer_with(name, peers).await
    }

    /// Starts replica `name` with its peer channel at `address` (on this
    /// machine's own address, [`host_address`]: the API server takes no
    /// loopback address in an EndpointSlice), finding its peers in the
    /// EndpointSlices of Service `service` in `namespace` (the
    /// environment's API server).
    pub async fn start_discovering_peer(
        &self,
        name: &str,
        address: &str,
        (namespace, service): (&str, &str),
        pki: &PeerPki,
    ) -> Replica {
        let slices = EndpointSlicesConfig {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        };
        let peers = peers_config(address, pki, None, Some(slices));
        self.start_peer_with(name, peers).await
    }

    /// Makes the environment's own broker a peer at `advertise` among
    /// `addresses` (restarted so).
    pub async fn join_peers(&mut self, advertise: &str, addresses: &[String], pki: &PeerPki) {
        let peers = peers_config(advertise, pki, Some(addresses.to_vec()), None);
        self.edit_config(|config| config.peers = Some(peers));
        self.restart_broker().await;
    }

    /// Starts replica `name` as [`Env::start_peer`] does, but with the
    /// hourly full pass over the lease records of a deployed broker (tests
    /// make it as often as the light sweep) and `edit` made to its
    /// configuration: what the bench measures.
    pub async fn start_peer_as_deployed(
        &self,
        name: &str,
        (advertise, addresses): (&str, &[String]),
        pki: &PeerPki,
        edit: impl FnOnce(&mut BrokerConfig),
    ) -> Replica {
        let peers = peers_config(advertise, pki, Some(addresses.to_vec()), None);
        self.start_replica_with(name, |config| {
            config.peers = Some(peers);
            edit(config);
        })
        .await
    }

    async fn start_peer_with(&self, name: &str, peers: PeersConfig) -> Replica {
        self.start_replica_with(name, |config| {
            config.peers = Some(peers);
            config.leases.full_sweep_interval = config.leases.sweep_interval.clone();
        })
        .await
    }
}

fn peers_config(
    advertise: &str,
    pki: &PeerPki,
    addresses: Option<Vec<String>>,
    endpoint_slices: Option<EndpointSlicesConfig>,
) -> PeersConfig {
    PeersConfig {
        listen: advertise.to_owned(),
        advertise: advertise.to_owned(),
        addresses,
        endpoint_slices,
        tls: PeerTlsConfig {
            cert_file: pki.peer.cert.display().to_string(),
            key_file: pki.peer.key.display().to_string(),
            ca_file: pki.ca.display().to_string(),
        },
    }
}
