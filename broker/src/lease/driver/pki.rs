//! PKI certificates: issued with names rendered from the pod's identity, not
//! renewable (a successor is issued at the policy's fraction of the
//! lifetime), kept by the end sealed in the handle, revoked by serial. With
//! `key: pod` Vault signs the pod's certificate request and no private key
//! passes through the broker.

use std::time::SystemTime;

use futures::{FutureExt as _, future::BoxFuture};

use super::{Context, Driver, Minted, Standing, Values, pod_key_of, vault_error, wrong_kind};
use crate::{
    clock::from_unix,
    error::Error,
    feed::Freshness,
    handle::Claims,
    identity::Identity,
    lease::{credential::identity_names, records::RecordKind, schedule::refresh_in},
    lease_id::LeaseId,
    policy::{Binding, KeyMaker, RenderError, Source},
    vault::{Scope, Vault, VaultError},
};

/// The PKI driver.
pub(super) struct Pki;

impl Driver for Pki {
    fn issue<'a>(
        &'a self,
        cx: Context<'a>,
        binding: &'a Binding,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<Minted, Error>> {
        async move {
            let Source::Pki(pki) = &binding.source else {
                return Err(wrong_kind(binding, "pki"));
            };
            let names = std::iter::once(&pki.common_name).chain(&pki.alt_names);
            let names = identity_names(names, identity).map_err(|field| Error::Render {
                binding: binding.name.clone(),
                problem: RenderError::Missing(field),
            })?;
            let scope = cx.scope(pki.namespace.as_deref());
            let issued = match pki.key {
                KeyMaker::Vault => {
                    cx.vault
                        .pki_issue(
                            &pki.mount,
                            &pki.role,
                            &names[0],
                            &names[1..],
                            binding.ttl,
                            scope,
                        )
                        .await
                }
                KeyMaker::Pod => {
                    let csr = pod_key_of(cx, binding)?;
                    check_request(csr, &names).map_err(|problem| {
                        Error::InvalidRequest(format!("binding `{}`: {problem}", binding.name))
                    })?;
                    cx.vault
                        .pki_sign(&pki.mount, &pki.role, csr, &names, binding.ttl, scope)
                        .await
                }
            }
            .map_err(vault_error(binding))?;
            Ok(Minted {
                values: Values::Own(issued.fields),
                version: issued.serial.replace(':', ""),
                issued_at: issued.issued,
                not_after: Some(issued.not_after),
                renewable: false,
                lease: Some(LeaseId::new(issued.serial)),
                freshness: Freshness::now(),
            })
        }
        .boxed()
    }

    fn look_up<'a>(
        &'a self,
        _cx: Context<'a>,
        binding: &'a Binding,
        claims: &'a Claims,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Standing, Error>> {
        async move {
            let issued_at = from_unix(claims.issued_at);
            let not_after = from_unix(claims.not_after);
            if refresh_in(issued_at, not_after, binding.renew_fraction, 0.0, now).is_zero() {
                return Ok(Standing::Gone);
            }
            // A certificate stands on its own until it expires.
            Ok(Standing::Good {
                not_after,
                renewable: false,
                freshness: Freshness::confirmed_at(issued_at),
            })
        }
        .boxed()
    }

    fn lease_kind(&self) -> Option<RecordKind> {
        Some(RecordKind::Pki)
    }

    fn asks_ttl(&self) -> bool {
        true
    }
}

/// Whether the pod's certificate request `pem` is one Vault may sign for
/// `names`: well formed, signed by its key, and naming nothing the policy
/// does not (its names are the policy's, or none: the policy names the
/// certificate, never the pod). The problem, in a sentence, when not.
fn check_request(pem: &str, names: &[String]) -> Result<(), String> {
    use rcgen::{CertificateSigningRequestParams, DnType, DnValue, SanType};
    let request = CertificateSigningRequestParams::from_pem(pem).map_err(|error| {
        format!("the certificate request does not parse or its signature does not verify ({error})")
    })?;
    let allowed = |name: &str| names.iter().any(|n| n == name);
    for (kind, value) in request.params.distinguished_name.iter() {
        let value = match value {
            DnValue::Utf8String(text) => Some(text.as_str()),
            DnValue::PrintableString(text) => Some(text.as_str()),
            DnValue::Ia5String(text) => Some(text.as_str()),
            _ => None,
        };
        if *kind != DnType::CommonName || !value.is_some_and(allowed) {
            return Err("the certificate request's subject names something the policy does not: leave it empty (the policy names the certificate)".to_owned());
        }
    }
    for name in &request.params.subject_alt_names {
        let fits = match name {
            SanType::DnsName(dns) => allowed(dns.as_str()),
            SanType::IpAddress(ip) => allowed(&ip.to_string()),
            _ => false,
        };
        if !fits {
            return Err("the certificate request asks for a subject alternative name the policy does not give: leave them out (the policy names the certificate)".to_owned());
        }
    }
    Ok(())
}

/// Revokes a certificate by serial at its mount.
pub(super) async fn revoke(
    vault: &Vault,
    mount: &str,
    serial: &str,
    scope: Scope<'_>,
) -> Result<(), VaultError> {
    vault.pki_revoke(mount, serial, scope).await
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    use super::check_request;

    /// A certificate request for `cn` (none when empty) and `sans`.
    fn request(cn: &str, sans: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = DistinguishedName::new();
        if !cn.is_empty() {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn names() -> Vec<String> {
        vec!["web.shop.svc".to_owned(), "web".to_owned()]
    }

    #[test]
    fn a_request_naming_nothing_or_the_policys_names_is_signed() {
        assert_eq!(check_request(&request("", &[]), &names()), Ok(()));
        let same = request("web.shop.svc", &["web"]);
        assert_eq!(check_request(&same, &names()), Ok(()));
    }

    #[test]
    fn a_request_naming_anything_else_is_refused_naming_the_fix() {
        let cn = check_request(&request("bank.example", &[]), &names()).unwrap_err();
        assert!(
            cn.contains("subject") && cn.contains("leave it empty"),
            "{cn}"
        );
        let san = check_request(&request("", &["bank.example"]), &names()).unwrap_err();
        assert!(san.contains("subject alternative name"), "{san}");
    }

    #[test]
    fn a_request_that_does_not_parse_or_verify_is_refused() {
        let garbage = check_request(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &names(),
        );
        assert!(garbage.unwrap_err().contains("does not parse"));
        // Another key's signature: one byte of the signed body changed.
        use base64::{Engine as _, engine::general_purpose::STANDARD};
        let pem = request("", &[]);
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut bytes = STANDARD.decode(body).unwrap();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x01;
        let forged = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            STANDARD.encode(bytes)
        );
        assert!(check_request(&forged, &names()).is_err());
    }
}
