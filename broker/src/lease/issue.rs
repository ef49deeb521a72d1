//! Issuing a fresh credential through its kind's driver: a leased one is
//! cut down to the binding's TTL when Vault gave more, sealed in a handle
//! and recorded before it is delivered.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Issues a fresh credential for `binding` to the caller. A leased
    /// credential issued to a pod is recorded first-class in Vault; when the
    /// pod already holds the most live leases allowed on the binding, the
    /// oldest are revoked to make room. `pod_key` is the public part of the
    /// key the pod made, for a binding whose key stays in the pod.
    ///
    /// # Errors
    /// A Vault, lease record or rendering [`Error`].
    pub async fn issue(
        &self,
        binding: &Arc<Binding>,
        caller: &Caller,
        pod_key: Option<&str>,
    ) -> Result<(Live, Credential), Error> {
        let identity = &caller.identity;
        let driver = driver::of(&binding.source);
        let leased = driver.lease_kind().is_some();
        if leased && identity.pod.is_none() && !binding.allow_unbound {
            return Err(Error::UnboundCaller {
                binding: binding.name.clone(),
            });
        }
        let vault_stamp = stamp(identity);
        let pod = owner(identity).filter(|_| leased);
        // Room for the new lease is made while Vault mints it: a new pod's
        // first credential waits for one Vault round trip, not three.
        let room = async {
            match &pod {
                Some(pod) => self.make_room(binding, pod, caller).await,
                None => Ok(()),
            }
        };
        let mint = async {
            let gate = self.gate_token(binding, caller).await?;
            let mut cx = self.context(&vault_stamp, pod_key);
            cx.gate = gate.as_deref();
            driver.issue(cx, binding, identity).await.map_err(|error| {
                match (error, &binding.gate) {
                    // Vault refused the pod's own token: its policy, not the broker's.
                    (
                        Error::Vault {
                            source: VaultError::Denied(detail),
                            ..
                        },
                        Some(gate_of),
                    ) if gate.is_some() => gate::gate_denied(binding, gate_of, detail),
                    (error, _) => error,
                }
            })
        };
        let (room, minted) = tokio::join!(room, mint);
        let (mut live, values) = live_of(binding, minted?);
        if let Err(error) = room {
            // No room was made: the new lease must not stay beyond the limit.
            let _ = self
                .revoke(&live, caller, "room for it could not be made")
                .await;
            return Err(error);
        }
        if !leased {
            let credential = credential::credential(&live, Some(values.fields()))?;
            return Ok((live, credential));
        }
        // The source's TTL may be longer than the binding's (or than a pod
        // asked for, `max_ttl_seconds`): the credential must never end later
        // than asked, so the lease is cut down to it now.
        if let (false, Some(lease), Some(not_after)) =
            (driver.asks_ttl(), &live.lease, live.not_after)
            && not_after > live.issued_at + binding.ttl
        {
            let ttl = self
                .shorten(binding, lease, live.renewable, &vault_stamp)
                .await?;
            live.not_after = Some(live.issued_at + ttl);
        }
        live.handle = self.seal(binding, identity, &live);
        if let Some(record) = pod.and_then(|pod| self.record_of(&pod, identity, &live))
            && let Err(error) = self.records.put(&record).await
        {
            // A lease nobody could find again must not outlive this request.
            let reason = "its lease record could not be written";
            let _ = self.revoke(&live, caller, reason).await;
            return Err(self.record_error(binding)(error));
        }
        let credential = credential::credential(&live, Some(values.fields()))?;
        Ok((live, credential))
    }

    /// A KV secret's version as a credential: what [`Engine::issue`] serves
    /// and what a stream pushes when the secret changes. The [`Live`] comes
    /// back even when the fields do not make the binding's files
    /// ([`Error::Render`]), so that failure can be audited with it.
    pub fn kv_credential(binding: &Arc<Binding>, fed: &Fed) -> (Live, Result<Credential, Error>) {
        let (live, values) = live_of(binding, driver::kv_credential_parts(fed));
        let credential = credential::credential(&live, Some(values.fields()));
        (live, credential)
    }

    /// What a driver may use, for a request stamped `vault_stamp` (with the
    /// pod's `pod_key`, if it sent one).
    pub(super) fn context<'a>(
        &'a self,
        vault_stamp: &'a str,
        pod_key: Option<&'a str>,
    ) -> driver::Context<'a> {
        driver::Context {
            vault: &self.vault,
            feeds: &self.feeds,
            stamp: vault_stamp,
            pod_key,
            gate: None,
        }
    }
}

/// A minted credential as the pod will hold it (its handle not yet sealed),
/// and its values.
fn live_of(binding: &Arc<Binding>, minted: driver::Minted) -> (Live, driver::Values) {
    let live = Live {
        binding: binding.clone(),
        version: minted.version,
        issued_at: minted.issued_at,
        not_after: minted.not_after,
        renewable: minted.renewable,
        lease: minted.lease,
        handle: Handle::default(),
        freshness: minted.freshness,
    };
    (live, minted.values)
}
