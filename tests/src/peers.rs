//! Replicas that follow each other: a peer CA and the one certificate every
//! replica holds (DNS name `tessera-peer`, server and client use), a
//! foreign CA's certificate for a caller that is no peer, and replicas
//! started with a `peers:` block naming each other.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use crate::{Env, PeerTlsConfig, PeersConfig, Replica, free_port};

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
    /// The foreign CA's certificate.
    pub foreign_ca: PathBuf,
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
            foreign_ca: write("foreign-ca.crt", &foreign_ca.pem()),
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
        let peers = PeersConfig {
            listen: advertise.to_owned(),
            advertise: advertise.to_owned(),
            addresses: addresses.to_vec(),
            tls: PeerTlsConfig {
                cert_file: pki.peer.cert.display().to_string(),
                key_file: pki.peer.key.display().to_string(),
                ca_file: pki.ca.display().to_string(),
            },
        };
        self.start_replica_with(name, |config| {
            config.peers = Some(peers);
            config.leases.full_sweep_interval = config.leases.sweep_interval.clone();
        })
        .await
    }
}
