//! Signing keys a pod made and keeps: its SSH public key by the `ssh`
//! engine (`mount/sign/role`), its certificate request by the PKI engine
//! (`mount/sign/role`). Only public parts travel; the answers carry no key.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use vaultrs::api::{pki::requests::SignCertificateRequest, ssh::requests::SignSSHKeyRequest};

use super::{Scope, Vault, VaultError, leases::Issued, unbuildable};
use crate::secret::Secret;

/// The field of a signed SSH certificate: the file `ssh` looks for beside
/// the key `id_ed25519`.
pub const SSH_CERTIFICATE_FIELD: &str = "id_ed25519-cert.pub";

/// What Vault's SSH engine is asked to sign.
pub struct SshSigning<'a> {
    /// The pod's public key, one OpenSSH line.
    pub public_key: &'a str,
    /// Principals; the role's default when empty.
    pub principals: &'a [String],
    /// Extensions; the role's default when empty.
    pub extensions: &'a BTreeMap<String, String>,
    /// The lifetime asked for (the role may cut it).
    pub ttl: Duration,
}

impl Vault {
    /// An SSH user certificate for `signing.public_key` from `mount/sign/role`.
    ///
    /// # Errors
    /// A [`VaultError`], also when the answer is no Ed25519 certificate.
    pub async fn ssh_sign(
        &self,
        mount: &str,
        role: &str,
        signing: &SshSigning<'_>,
        scope: Scope<'_>,
    ) -> Result<Issued, VaultError> {
        let what = format!("{mount}/sign/{role}");
        let mut builder = SignSSHKeyRequest::builder();
        builder
            .mount(mount)
            .name(role)
            .public_key(signing.public_key)
            .cert_type("user")
            .ttl(format!("{}s", signing.ttl.as_secs()));
        if !signing.principals.is_empty() {
            builder.valid_principals(signing.principals.join(","));
        }
        if !signing.extensions.is_empty() {
            let extensions: HashMap<String, String> = signing
                .extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            builder.extensions(extensions);
        }
        let endpoint = builder.build().map_err(unbuildable(&what))?;
        let data = self
            .exec(endpoint, &what, scope)
            .await?
            .data
            .ok_or_else(|| unexpected(&what, "no certificate in the answer"))?;
        let valid_before = ssh_validity(&data.signed_key)
            .ok_or_else(|| unexpected(&what, "the answer is no Ed25519 SSH certificate"))?;
        Ok(Issued {
            serial: data.serial_number,
            // Not the certificate's `valid after`: Vault backdates it (30 s)
            // for clock skew, which would bring the renewal that much closer.
            issued: SystemTime::now(),
            not_after: crate::clock::from_unix(valid_before),
            fields: [(
                SSH_CERTIFICATE_FIELD.to_owned(),
                Secret::from(data.signed_key),
            )]
            .into(),
        })
    }

    /// A certificate for the pod's certificate request `csr` (PEM) from
    /// `mount/sign/role`, named as the policy says (the names in the request
    /// are the role's to honour or ignore: `use_csr_common_name` and
    /// `use_csr_sans` off make the policy's names the only ones).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn pki_sign(
        &self,
        mount: &str,
        role: &str,
        csr: &str,
        names: &[String],
        ttl: Duration,
        scope: Scope<'_>,
    ) -> Result<Issued, VaultError> {
        let what = format!("{mount}/sign/{role}");
        let endpoint = SignCertificateRequest::builder()
            .mount(mount)
            .role(role)
            .csr(csr)
            .common_name(names.first().cloned().unwrap_or_default())
            .alt_names(names.get(1..).unwrap_or_default().join(","))
            .ttl(format!("{}s", ttl.as_secs()))
            .build()
            .map_err(unbuildable(&what))?;
        let data = self
            .exec(endpoint, &what, scope)
            .await?
            .data
            .ok_or_else(|| unexpected(&what, "no certificate in the answer"))?;
        Ok(Issued::certificate(
            data.serial_number,
            crate::clock::from_unix(data.expiration),
            [data.certificate, data.issuing_ca],
            data.ca_chain,
        ))
    }
}

fn unexpected(what: &str, detail: &str) -> VaultError {
    VaultError::Unexpected {
        what: what.to_owned(),
        detail: detail.to_owned(),
    }
}

/// `valid before` (Unix seconds) of an OpenSSH Ed25519 certificate line
/// (`ssh-ed25519-cert-v01@openssh.com AAAA…`), as laid out in OpenSSH's
/// PROTOCOL.certkeys; `None` for anything else.
fn ssh_validity(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    if words.next()? != "ssh-ed25519-cert-v01@openssh.com" {
        return None;
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(words.next()?)
        .ok()?;
    let mut cert = Reader(&blob);
    if cert.string()? != b"ssh-ed25519-cert-v01@openssh.com" {
        return None;
    }
    let _nonce = cert.string()?;
    let _public_key = cert.string()?;
    let _serial_and_type = cert.bytes(12)?;
    let _key_id = cert.string()?;
    let _principals = cert.string()?;
    let _valid_after = cert.u64()?;
    cert.u64()
}

/// Reads SSH wire encoding (RFC 4251): big-endian integers, length-prefixed
/// strings.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (value, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(value)
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.bytes(4)?.try_into().ok()?);
        self.bytes(usize::try_from(len).ok()?)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of an OpenSSH Ed25519 certificate valid over `valid`,
    /// laid out field by field (the signature is not read).
    fn certificate(valid: (u64, u64)) -> String {
        fn string(blob: &mut Vec<u8>, bytes: &[u8]) {
            blob.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
            blob.extend_from_slice(bytes);
        }
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-ed25519-cert-v01@openssh.com");
        string(&mut blob, &[7; 32]);
        string(&mut blob, &[9; 32]);
        blob.extend_from_slice(&42u64.to_be_bytes());
        blob.extend_from_slice(&1u32.to_be_bytes());
        string(&mut blob, b"id");
        string(&mut blob, b"\0\0\0\x03app");
        blob.extend_from_slice(&valid.0.to_be_bytes());
        blob.extend_from_slice(&valid.1.to_be_bytes());
        blob.extend_from_slice(&[0; 16]);
        format!(
            "ssh-ed25519-cert-v01@openssh.com {} vault",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    #[test]
    fn reads_the_validity_of_an_ed25519_certificate() {
        let line = certificate((1_767_225_600, 1_767_229_200));
        assert_eq!(ssh_validity(&line), Some(1_767_229_200));
    }

    #[test]
    fn anything_else_has_no_validity() {
        let line = certificate((1, 2));
        assert_eq!(
            ssh_validity("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== x"),
            None
        );
        assert_eq!(
            ssh_validity(&line.replace("ssh-ed25519-cert", "ssh-rsa-cert")),
            None
        );
        assert_eq!(ssh_validity(&line[..line.len() - 20]), None);
        assert_eq!(ssh_validity("ssh-ed25519-cert-v01@openssh.com !!!"), None);
        assert_eq!(ssh_validity(""), None);
    }
}
