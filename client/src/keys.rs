//! Keys made here for bindings whose private key never leaves the pod (SSH,
//! and PKI with `key: pod`): only the public part is sent to the broker,
//! the private part stays in zeroizing memory until it is written.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::{
    rand::{SecureRandom as _, SystemRandom},
    signature::{Ed25519KeyPair, KeyPair as _},
};
use tessera_proto::v1::KeyKind;
use zeroize::Zeroizing;

use crate::Error;

/// A key made for one issue: the public part to send, the private part to keep.
pub(crate) struct MadeKey {
    /// An OpenSSH public key line, or a PEM certificate request.
    pub public: Vec<u8>,
    /// The private key as the files hold it (OpenSSH or PKCS #8 PEM).
    pub private: Zeroizing<Vec<u8>>,
}

/// Makes a fresh key of `kind`.
///
/// # Errors
/// [`Error::Key`] when the system's random source or the request fails, or
/// the broker asks for a kind this client does not know (update it).
pub(crate) fn make(kind: KeyKind) -> Result<MadeKey, Error> {
    match kind {
        KeyKind::SshEd25519 => ssh_ed25519(),
        KeyKind::Pkcs10 => pkcs10(),
        KeyKind::Unspecified => Err(Error::Key(
            "the broker asked for a key of a kind this client does not know (update tessera-client)"
                .to_owned(),
        )),
    }
}

/// An Ed25519 key: its public key line, and its private key in OpenSSH's
/// own format (`-----BEGIN OPENSSH PRIVATE KEY-----`, unencrypted), the one
/// `ssh -i` reads.
fn ssh_ed25519() -> Result<MadeKey, Error> {
    let random = SystemRandom::new();
    let mut seed = Zeroizing::new([0u8; 32]);
    random
        .fill(seed.as_mut())
        .map_err(|_| Error::Key("the system's random source failed".to_owned()))?;
    let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
        .map_err(|_| Error::Key("an Ed25519 key could not be made".to_owned()))?;
    let public = pair.public_key().as_ref();
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, public);
    let line = format!("ssh-ed25519 {}\n", STANDARD.encode(&blob));

    // PROTOCOL.key: the private section, checked by two equal random words
    // and padded to the cipher's block size (8 for "none").
    let mut check = [0u8; 4];
    random
        .fill(&mut check)
        .map_err(|_| Error::Key("the system's random source failed".to_owned()))?;
    let mut secret = Zeroizing::new(Vec::with_capacity(160));
    secret.extend_from_slice(&check);
    secret.extend_from_slice(&check);
    put_string(&mut secret, b"ssh-ed25519");
    put_string(&mut secret, public);
    let mut pair_bytes = Zeroizing::new(Vec::with_capacity(64));
    pair_bytes.extend_from_slice(seed.as_ref());
    pair_bytes.extend_from_slice(public);
    put_string(&mut secret, &pair_bytes);
    put_string(&mut secret, b"tessera");
    for pad in 1..=u8::MAX {
        if secret.len() % 8 == 0 {
            break;
        }
        secret.push(pad);
    }
    let mut body = Zeroizing::new(Vec::with_capacity(256));
    body.extend_from_slice(b"openssh-key-v1\0");
    put_string(&mut body, b"none");
    put_string(&mut body, b"none");
    put_string(&mut body, b"");
    body.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut body, &blob);
    put_string(&mut body, &secret);
    Ok(MadeKey {
        public: line.into_bytes(),
        private: pem("OPENSSH PRIVATE KEY", &body, 70),
    })
}

/// An ECDSA P-256 key and a certificate request for it naming nothing (the
/// policy names the certificate); the key as PKCS #8 PEM.
fn pkcs10() -> Result<MadeKey, Error> {
    let failed = |error: rcgen::Error| {
        Error::Key(format!("a certificate request could not be made: {error}"))
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let request = params.serialize_request(&key).map_err(failed)?;
    let public = request.pem().map_err(failed)?.into_bytes();
    let private = Zeroizing::new(key.serialize_der());
    Ok(MadeKey {
        public,
        private: pem("PRIVATE KEY", &private, 64),
    })
}

/// SSH wire encoding of a string: its length, then its bytes.
fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// `der` as PEM with `label`, lines of `width` characters.
fn pem(label: &str, der: &[u8], width: usize) -> Zeroizing<Vec<u8>> {
    let encoded = Zeroizing::new(STANDARD.encode(der));
    let mut out = Zeroizing::new(Vec::with_capacity(encoded.len() + 100));
    out.extend_from_slice(format!("-----BEGIN {label}-----\n").as_bytes());
    for line in encoded.as_bytes().chunks(width) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ssh_key_is_an_openssh_pair_with_matching_public_parts() {
        let key = make(KeyKind::SshEd25519).unwrap();
        let line = String::from_utf8(key.public.clone()).unwrap();
        let blob = STANDARD
            .decode(line.split_whitespace().nth(1).unwrap())
            .unwrap();
        assert!(line.starts_with("ssh-ed25519 "), "{line}");
        let private = std::str::from_utf8(&key.private).unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(private.lines().all(|l| l.len() <= 70));
        let body: String = private
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let body = STANDARD.decode(body).unwrap();
        assert!(body.starts_with(b"openssh-key-v1\0"));
        // The public blob: once after the key count, once more at the start
        // of the private section (its two strings, the same bytes).
        let found = body
            .windows(blob.len())
            .filter(|w| *w == blob.as_slice())
            .count();
        assert_eq!(found, 2);
        let fresh = make(KeyKind::SshEd25519).unwrap();
        assert_ne!(fresh.public, key.public, "each key is new");
    }

    #[test]
    fn a_certificate_request_names_nothing_and_keeps_its_key() {
        let key = make(KeyKind::Pkcs10).unwrap();
        let request = String::from_utf8(key.public).unwrap();
        assert!(request.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let private = std::str::from_utf8(&key.private).unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!request.contains("PRIVATE"));
    }

    #[test]
    fn an_unknown_kind_names_the_fix() {
        let Err(Error::Key(message)) = make(KeyKind::Unspecified) else {
            panic!("an unknown kind is an error");
        };
        assert!(message.contains("update tessera-client"), "{message}");
    }
}
