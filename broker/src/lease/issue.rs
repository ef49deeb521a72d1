//! Issuing a fresh credential: a KV read (from the feed when it follows the
//! secret), a database user or a certificate, recorded and sealed in a handle.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Issues a fresh credential for `binding` to the caller. A leased
    /// credential issued to a pod is recorded first-class in Vault; when the
    /// pod already holds the most live leases allowed on the binding, the
    /// oldest are revoked to make room.
    ///
    /// # Errors
    /// A Vault, lease record or rendering [`Error`].
    pub async fn issue(
        &self,
        binding: &Arc<Binding>,
        caller: &Caller,
    ) -> Result<(Live, Credential), Error> {
        let identity = &caller.identity;
        if binding.source.is_leased() && identity.pod.is_none() && !binding.allow_unbound {
            return Err(Error::UnboundCaller {
                binding: binding.name.clone(),
            });
        }
        let vault_stamp = stamp(identity);
        let pod = owner(identity).filter(|_| binding.source.is_leased());
        if let Some(pod) = &pod {
            self.make_room(binding, pod, caller).await?;
        }
        let (mut live, fields) = match &binding.source {
            Source::Kv2(kv) => {
                let fed = match self.feeds.latest(kv) {
                    Some(fed) => fed,
                    None => Fed {
                        secret: Arc::new(
                            self.vault
                                .read_kv2(kv, Some(&vault_stamp))
                                .await
                                .map_err(Self::vault_error(binding))?,
                        ),
                        freshness: Freshness::now(),
                    },
                };
                let (live, credential) = Self::kv_credential(binding, &fed);
                return Ok((live, credential?));
            }
            Source::Database(db) => {
                let leased = self
                    .vault
                    .database_creds(&db.mount, &db.role, Some(&vault_stamp))
                    .await
                    .map_err(Self::vault_error(binding))?;
                let lease = LeaseId::new(leased.lease_id);
                // The role's TTL may be longer than the binding's (or than a
                // pod asked for, `max_ttl_seconds`): the credential must never
                // end later than asked, so the lease is cut down to it now.
                let ttl = if leased.ttl > binding.ttl {
                    self.shorten(binding, &lease, leased.renewable, &vault_stamp)
                        .await?
                } else {
                    leased.ttl
                };
                let live = Live {
                    binding: binding.clone(),
                    version: lease.version(),
                    issued_at: leased.issued,
                    not_after: Some(leased.issued + ttl),
                    renewable: leased.renewable,
                    lease: Some(lease),
                    handle: Handle::default(),
                    freshness: Freshness::now(),
                };
                (live, leased.fields)
            }
            Source::Pki(pki) => {
                let names =
                    pki_names(&pki.common_name, &pki.alt_names, identity).map_err(|field| {
                        Error::Render {
                            binding: binding.name.clone(),
                            problem: RenderError::Missing(field),
                        }
                    })?;
                let issued = self
                    .vault
                    .pki_issue(
                        &pki.mount,
                        &pki.role,
                        &names[0],
                        &names[1..],
                        binding.ttl,
                        Some(&vault_stamp),
                    )
                    .await
                    .map_err(Self::vault_error(binding))?;
                let live = Live {
                    binding: binding.clone(),
                    version: issued.serial.replace(':', ""),
                    issued_at: issued.issued,
                    not_after: Some(issued.not_after),
                    renewable: false,
                    lease: Some(LeaseId::new(issued.serial)),
                    handle: Handle::default(),
                    freshness: Freshness::now(),
                };
                (live, issued.fields)
            }
        };
        if binding.source.is_leased() {
            live.handle = self.seal(binding, identity, &live);
        }
        if let Some(record) = pod.and_then(|pod| self.record_of(&pod, identity, &live))
            && let Err(error) = self.records.put(&record).await
        {
            // A lease nobody could find again must not outlive this request.
            let reason = "its lease record could not be written";
            let _ = self.revoke(&live, caller, reason).await;
            return Err(self.record_error(binding)(error));
        }
        let credential = credential::credential(&live, Some(&fields))?;
        Ok((live, credential))
    }

    /// A KV secret's version as a credential: what [`Engine::issue`] serves
    /// and what a stream pushes when the secret changes. The [`Live`] comes
    /// back even when the fields do not make the binding's files
    /// ([`Error::Render`]), so that failure can be audited with it.
    pub fn kv_credential(binding: &Arc<Binding>, fed: &Fed) -> (Live, Result<Credential, Error>) {
        let secret = &fed.secret;
        let live = Live {
            binding: binding.clone(),
            version: secret.version.to_string(),
            issued_at: secret.created.unwrap_or_else(SystemTime::now),
            not_after: None,
            renewable: false,
            lease: None,
            handle: Handle::default(),
            freshness: fed.freshness,
        };
        let credential = credential::credential(&live, Some(&secret.fields));
        (live, credential)
    }
}
