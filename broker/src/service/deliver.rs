//! Delivering a request's credentials: resume what the caller holds or
//! issue anew, all or nothing, with a guard that revokes what was issued but
//! never handed over.

use std::{collections::BTreeMap, sync::Arc};

use futures::future::join_all;
use tessera_proto::v1::{Credential, Held};
use tonic::Status;

use super::{BrokerService, Refused};
use crate::{
    audit::{Action, Outcome},
    error::Error,
    handle::Handle,
    lease::{Caller, Engine, Live, Resumed, event},
    policy::Binding,
};

impl BrokerService {
    /// Resumes what the caller holds, or issues anew, for every binding (all
    /// or nothing) and audits the outcome. What was issued comes with an
    /// [`Undelivered`] guard: the caller disarms it once the credentials are on
    /// their way; dropped armed (the request failed, or its task panicked), it
    /// revokes the leases nobody received. A binding whose key the pod
    /// makes is issued for its public part in `pod_keys`, never resumed.
    #[tracing::instrument(name = "deliver", skip_all, fields(bindings = bindings.len()))]
    pub(super) async fn deliver_all(
        &self,
        caller: &Caller,
        generation: u64,
        bindings: &[Arc<Binding>],
        (held, pod_keys): (&[Held], &BTreeMap<&str, &str>),
    ) -> Result<(Vec<(Live, Credential)>, Undelivered), Status> {
        let engine = &self.parts.engine;
        // Every binding runs to its end (no early cancel), so each lease
        // Vault minted is known and can be revoked if another binding fails.
        // KV bindings (no lease, nothing minted) are served first: one that
        // cannot be served fails the request before any lease is issued, so
        // a bad secret never costs the other bindings a lease.
        let serve = |binding: Arc<Binding>| async move {
            let pod_key = pod_keys.get(binding.name.as_str()).copied();
            let handle = held.iter().find(|h| h.binding == binding.name);
            if let Some(handle) = handle.filter(|_| pod_key.is_none()) {
                match engine
                    .resume(&binding, caller, &Handle::presented(&handle.handle))
                    .await?
                {
                    Some(Resumed::Held(live, credential)) => {
                        return Ok::<_, Error>((live, credential, true));
                    }
                    Some(Resumed::Rotated(live, credential)) => {
                        return Ok((live, credential, false));
                    }
                    None => {}
                }
            }
            let (live, credential) = engine.issue(&binding, caller, pod_key).await?;
            Ok((live, credential, false))
        };
        let (unleased, leased): (Vec<_>, Vec<_>) = bindings
            .iter()
            .cloned()
            .partition(|b| !b.source.is_leased());
        let mut results = join_all(unleased.into_iter().map(serve)).await;
        if results.iter().all(Result::is_ok) {
            results.extend(join_all(leased.into_iter().map(serve)).await);
        }
        let mut guard = Undelivered {
            engine: engine.clone(),
            caller: caller.clone(),
            lives: Vec::new(),
        };
        let mut delivered = Vec::with_capacity(results.len());
        let mut failure = None;
        for result in results {
            match result {
                Ok((live, credential, resumed)) => {
                    if !resumed {
                        guard.lives.push(live.clone());
                    }
                    delivered.push((live, credential, resumed));
                }
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            // `guard` drops armed here: the leases issued for the other
            // bindings are revoked, not leaked.
            let source = error.binding().and_then(|binding| {
                bindings
                    .iter()
                    .find(|b| b.name == binding)
                    .map(|b| b.source.to_string())
            });
            let refused = Refused::issue(caller)
                .in_generation(generation)
                .with_source(source);
            return Err(self.refuse(error, refused));
        }
        let delivered = delivered
            .into_iter()
            .map(|(live, credential, resumed)| {
                tracing::info!(
                    binding = %live.binding.name,
                    version = %live.version,
                    resumed,
                    "credential delivered"
                );
                if !resumed {
                    let mut issued = event(Action::Issue, Outcome::Success, caller, &live);
                    issued.policy_generation = Some(generation);
                    self.audit(&issued);
                }
                (live, credential)
            })
            .collect();
        Ok((delivered, guard))
    }
}

/// Leases issued for a request and not yet handed to the caller. Dropped
/// without [`Undelivered::disarm`], it has the engine revoke their database
/// leases in the background, so a failed or panicked request leaks no
/// database user. (Certificates nobody received simply expire: revoking
/// grows the CRL.)
pub(super) struct Undelivered {
    engine: Arc<Engine>,
    caller: Caller,
    lives: Vec<Live>,
}

impl Undelivered {
    /// The credentials are on their way: nothing to revoke.
    pub(super) fn disarm(mut self) {
        self.lives.clear();
    }
}

impl Drop for Undelivered {
    fn drop(&mut self) {
        let lives: Vec<Live> = self
            .lives
            .drain(..)
            .filter(Engine::revokes_unused)
            .collect();
        if !lives.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            self.engine.revoke_undelivered(lives, self.caller.clone());
        }
    }
}
