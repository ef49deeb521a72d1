//! The release's CA and serving certificates: made once (the CA), renewed
//! before they expire (the serving certificate, by the same CA).

#[allow(clippy::wildcard_imports)]
use super::*;

/// The CA's certificate (PEM) and key.
pub(super) struct CaPair {
    cert_pem: String,
    key: KeyPair,
}

impl CaPair {
    pub(super) fn from_secret(secret: &Secret, full: &str) -> Result<Self, BootstrapError> {
        let field = |key: &str| -> Result<Zeroizing<String>, BootstrapError> {
            let bytes = entry(
                secret,
                full,
                key,
                "a new CA (injected pods then need re-creating)",
            )?;
            Ok(Zeroizing::new(
                String::from_utf8_lossy(&bytes.0).into_owned(),
            ))
        };
        let key = KeyPair::from_pem(&field("ca.key")?).map_err(|e| BootstrapError::Malformed {
            name: full.to_owned(),
            detail: format!("`ca.key` is not a PEM private key: {e}"),
        })?;
        Ok(Self {
            cert_pem: field("ca.crt")?.to_string(),
            key,
        })
    }
}

/// The CA's parameters, the same every time: a renewed serving certificate
/// names the stored CA as its issuer by these.
pub(super) fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "Tessera broker CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A TLS Secret with a serving certificate for `dns_names`, signed by `ca`
/// or by a new CA.
pub(super) fn mint_serving(
    name: &str,
    namespace: &str,
    dns_names: &[String],
    ca: Option<CaPair>,
) -> Result<Secret, BootstrapError> {
    let now = SystemTime::now();
    let ca = match ca {
        Some(ca) => ca,
        None => {
            let key = KeyPair::generate()?;
            let mut params = ca_params()?;
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + CA_LIFETIME).into();
            let cert_pem = params.self_signed(&key)?.pem();
            CaPair { cert_pem, key }
        }
    };
    let issuer = rcgen::Issuer::new(ca_params()?, &ca.key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().map_or("tessera", String::as_str),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = (now + SERVING_LIFETIME).into();
    let cert = params.signed_by(&key, &issuer)?;
    let renew_after = humantime::format_rfc3339_seconds(now + SERVING_LIFETIME - RENEW_BEFORE);
    let data = BTreeMap::from([
        ("ca.crt".to_owned(), ByteString(ca.cert_pem.into_bytes())),
        (
            "ca.key".to_owned(),
            ByteString(ca.key.serialize_pem().into_bytes()),
        ),
        ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
        (
            "tls.key".to_owned(),
            ByteString(key.serialize_pem().into_bytes()),
        ),
    ]);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            annotations: Some(BTreeMap::from([
                (RENEW_AFTER_ANNOTATION.to_owned(), renew_after.to_string()),
                (DNS_NAMES_ANNOTATION.to_owned(), dns_names.join(",")),
            ])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "tessera-broker".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}
