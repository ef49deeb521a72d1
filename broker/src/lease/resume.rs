//! Taking back what a pod holds: its handle opened, its standing asked of
//! its kind's driver (and renewed or rotated when due), or the live
//! credential it names for revocation.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Resumes a credential the pod holds, when it is still good: the pod
    /// keeps its values (no second database user). A database lease due for
    /// renewal is renewed now, so a pod that only calls `Fetch` (no stream)
    /// keeps its lease alive by asking; one that cannot be extended is
    /// rotated (the successor comes back as [`Resumed::Rotated`]). `None`
    /// when it must be reissued (expired, revoked, or a handle this
    /// deployment can no longer read, e.g. after the shared key changed).
    ///
    /// # Errors
    /// [`Error::Handle`] for a handle of another pod or binding; a Vault
    /// [`Error`] when a due renewal fails.
    pub async fn resume(
        self: &Arc<Self>,
        binding: &Arc<Binding>,
        caller: &Caller,
        held: &Handle,
    ) -> Result<Option<Resumed>, Error> {
        let identity = &caller.identity;
        let pod_uid = holder_uid(identity);
        let claims = match self.keys.open(held, &binding.name, pod_uid) {
            Ok(claims) => claims,
            Err(HandleError::Invalid(_)) => {
                let mut event = Event::new(Action::Issue, Outcome::Denied, Some(identity));
                event.binding = Some(binding.name.clone());
                event.reason = Some(
                    "the held lease handle does not open (another deployment's, forged, or sealed under a replaced key); a fresh credential is issued"
                        .to_owned(),
                );
                event.peer = caller.peer.clone();
                self.report(&event);
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let driver = driver::of(&binding.source);
        if driver.lease_kind().is_none() {
            return Ok(None);
        }
        let vault_stamp = stamp(identity);
        let standing = driver
            .look_up(
                self.context(&vault_stamp, None),
                binding,
                &claims,
                SystemTime::now(),
            )
            .await?;
        let driver::Standing::Good {
            not_after,
            renewable,
            freshness,
        } = standing
        else {
            return Ok(None);
        };
        let live = Live {
            binding: binding.clone(),
            version: claims.version,
            issued_at: from_unix(claims.issued_at),
            not_after: Some(not_after),
            renewable,
            lease: Some(LeaseId::new(claims.lease)),
            handle: held.clone(),
            freshness,
        };
        // Vault does not answer: the pod keeps what it holds, not renewed.
        if live.freshness.last_known_good {
            let credential = credential::credential(&live, None)?;
            return Ok(Some(Resumed::Held(live, credential)));
        }
        if live.renewable && self.due_in(&live, 0.0) == Some(Duration::ZERO) {
            let step = match self.renew_or_rotate(&live, caller).await {
                Ok(step) => step,
                // A blip at the moment the renewal is due: the lease was
                // found alive just now, so the pod keeps it, marked as not
                // renewed; a stream retries the renewal with backoff, a
                // `Fetch` caller when it asks again.
                Err(Error::Vault {
                    source: error @ VaultError::Unavailable(_),
                    ..
                }) => {
                    tracing::warn!(binding = %binding.name, %error, "the due renewal failed; the pod keeps its held lease, not yet renewed");
                    let mut held = live;
                    held.freshness.last_known_good = true;
                    let credential = credential::credential(&held, None)?;
                    return Ok(Some(Resumed::Held(held, credential)));
                }
                Err(error) => return Err(error),
            };
            return match step {
                Step::Renewed(renewed) => {
                    self.report(&event(Action::Renew, Outcome::Success, caller, &renewed));
                    let credential = credential::credential(&renewed, None)?;
                    Ok(Some(Resumed::Held(renewed, credential)))
                }
                Step::Confirmed(same) => {
                    let credential = credential::credential(&same, None)?;
                    Ok(Some(Resumed::Held(same, credential)))
                }
                Step::Rotated(rotation) => {
                    let Rotation {
                        live,
                        credential,
                        old,
                    } = *rotation;
                    self.supersede(old, caller).await;
                    Ok(Some(Resumed::Rotated(live, credential)))
                }
            };
        }
        let credential = credential::credential(&live, None)?;
        Ok(Some(Resumed::Held(live, credential)))
    }

    /// The live credential a held handle names, for revocation.
    ///
    /// # Errors
    /// [`Error::Handle`] for a forged handle or one of another pod.
    pub fn held(
        &self,
        binding: &Arc<Binding>,
        identity: &Identity,
        held: &Handle,
    ) -> Result<Live, Error> {
        let pod_uid = holder_uid(identity);
        let claims = self.keys.open(held, &binding.name, pod_uid)?;
        Ok(Live {
            binding: binding.clone(),
            version: claims.version,
            issued_at: from_unix(claims.issued_at),
            not_after: None,
            renewable: false,
            lease: (!claims.lease.is_empty()).then(|| LeaseId::new(claims.lease)),
            handle: held.clone(),
            freshness: Freshness::confirmed_at(from_unix(claims.issued_at)),
        })
    }
}
