use super::*;

fn names() -> Vec<String> {
    vec!["tessera.tessera.svc".to_owned(), "tessera".to_owned()]
}

fn data(secret: &Secret, key: &str) -> Vec<u8> {
    secret.data.as_ref().unwrap()[key].0.clone()
}

#[test]
fn a_fresh_secret_is_not_due_and_names_its_dns_names() {
    let secret = mint_serving("tls", "tessera", &names(), None).unwrap();
    assert!(!renewal_due(&secret, &names(), SystemTime::now()));
    assert!(renewal_due(
        &secret,
        &["other.svc".to_owned()],
        SystemTime::now()
    ));
    let later = SystemTime::now() + SERVING_LIFETIME - RENEW_BEFORE + Duration::from_secs(60);
    assert!(renewal_due(&secret, &names(), later));
    let mut bare = secret.clone();
    bare.metadata.annotations = None;
    assert!(renewal_due(&bare, &names(), SystemTime::now()));
}

#[test]
fn a_renewed_certificate_chains_to_the_stored_ca() {
    let first = mint_serving("tls", "tessera", &names(), None).unwrap();
    let ca = CaPair::from_secret(&first, "tessera/tls").unwrap();
    let renewed = mint_serving("tls", "tessera", &names(), Some(ca)).unwrap();
    assert_eq!(data(&first, "ca.crt"), data(&renewed, "ca.crt"));
    assert_ne!(data(&first, "tls.crt"), data(&renewed, "tls.crt"));

    // A TLS client trusting only the first CA accepts the renewed leaf.
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&data(&first, "ca.crt")).unwrap())
        .unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.into(),
        rustls::crypto::ring::default_provider().into(),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(&data(&renewed, "tls.crt")).unwrap();
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("tessera.tessera.svc").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap();
}

#[test]
fn a_secret_without_the_ca_key_says_what_to_do() {
    let mut secret = mint_serving("tls", "tessera", &names(), None).unwrap();
    secret.data.as_mut().unwrap().remove("ca.key");
    let error = CaPair::from_secret(&secret, "tessera/tls")
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("has no `ca.key`") && error.contains("delete it"),
        "{error}"
    );
}

#[test]
fn files_are_replaced_only_when_changed_and_keys_are_private() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.key");
    write_if_changed(&path, b"one", 0o400).unwrap();
    let first = std::fs::metadata(&path).unwrap();
    assert_eq!(first.permissions().mode() & 0o777, 0o400);
    write_if_changed(&path, b"one", 0o400).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        first.ino(),
        "rewritten unchanged"
    );
    write_if_changed(&path, b"two", 0o400).unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), first.ino());
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
}
