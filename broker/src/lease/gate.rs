//! Pods' own Vault tokens for bindings behind Vault's second gate
//! (`vaultGate`): one login per pod, auth mount and role, kept until
//! shortly before it ends and revoked when the pod is gone.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::{policy::VaultGate, secret::Secret};

/// A login kept for reuse: the token, and when to log in again (at 80 % of
/// its life, so no request carries a token about to end).
struct Kept {
    token: Arc<Secret>,
    until: Instant,
}

/// Whose login a token is: the holder's UID, the auth mount, the role and
/// the Vault namespace.
type Login = (String, String, String, Option<String>);

/// The pods' tokens, by login.
#[derive(Default)]
pub(super) struct PodTokens {
    kept: Mutex<HashMap<Login, Kept>>,
}

impl Engine {
    /// The pod's own Vault token for `binding`'s second gate, logging in
    /// with the token it presented when none is kept; `None` for a binding
    /// without a gate.
    ///
    /// # Errors
    /// [`Error::GateDenied`] when Vault refuses the login (the role does not
    /// take this pod), a Vault error when it does not answer.
    pub(super) async fn gate_token(
        &self,
        binding: &Binding,
        caller: &Caller,
    ) -> Result<Option<Arc<Secret>>, Error> {
        let Some(gate) = &binding.gate else {
            return Ok(None);
        };
        let identity = &caller.identity;
        let role = credential::identity_names([&gate.role], identity)
            .map_err(|field| Error::Render {
                binding: binding.name.clone(),
                problem: crate::policy::RenderError::Missing(field),
            })?
            .into_iter()
            .next()
            .unwrap_or_default();
        let namespace = gate
            .namespace
            .clone()
            .or_else(|| binding.source.namespace().map(str::to_owned));
        let key = (
            holder_uid(identity).to_owned(),
            gate.mount.clone(),
            role.clone(),
            namespace.clone(),
        );
        if let Some(kept) = self.pod_tokens.lock().get(&key)
            && kept.until > Instant::now()
        {
            return Ok(Some(kept.token.clone()));
        }
        let Some(jwt) = &caller.bearer else {
            return Err(gate_denied(
                binding,
                gate,
                "no token of the pod's to log in with (the broker's own work)".to_owned(),
            ));
        };
        let vault_stamp = stamp(identity);
        let scope = Scope::new(Some(&vault_stamp), namespace.as_deref());
        let login = self
            .vault
            .pod_login(&gate.mount, &role, jwt, scope)
            .await
            .map_err(|error| match error {
                VaultError::Unavailable(_) => Self::vault_error(binding)(error),
                refused => gate_denied(binding, gate, refused.to_string()),
            })?;
        let token = Arc::new(login.token);
        let until = Instant::now() + login.ttl.mul_f64(0.8).max(Duration::from_secs(1));
        self.pod_tokens.lock().insert(
            key,
            Kept {
                token: token.clone(),
                until,
            },
        );
        Ok(Some(token))
    }

    /// Revokes and forgets the tokens kept for `identity`'s pod: it is gone.
    pub(super) async fn end_pod_tokens(&self, identity: &Identity) {
        let holder = holder_uid(identity);
        let ended: Vec<(Option<String>, Arc<Secret>)> = {
            let mut kept = self.pod_tokens.lock();
            let keys: Vec<_> = kept.keys().filter(|k| k.0 == holder).cloned().collect();
            keys.into_iter()
                .filter_map(|key| kept.remove(&key).map(|k| (key.3, k.token)))
                .collect()
        };
        for (namespace, token) in ended {
            if let Err(error) = self
                .vault
                .revoke_pod_token(&token, Scope::new(None, namespace.as_deref()))
                .await
            {
                tracing::warn!(%error, "a gone pod's Vault token could not be revoked; it ends by its TTL");
            }
        }
    }
}

impl PodTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Login, Kept>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Vault refused `binding` to the pod at `gate`; an error from the driver
/// that is Vault's refusal of the pod's token becomes this too.
pub(super) fn gate_denied(binding: &Binding, gate: &VaultGate, detail: String) -> Error {
    Error::GateDenied {
        binding: binding.name.clone(),
        gate: gate.to_string(),
        detail,
    }
}
