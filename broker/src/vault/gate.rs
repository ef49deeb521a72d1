//! Vault as a second gate: a login with a pod's own service-account token
//! (Vault's `jwt` or `kubernetes` auth method), whose token then reads the
//! pod's binding, so Vault's policy for that pod must allow it too and
//! Vault's audit log names the pod's entity.

use std::time::Duration;

use rustify_derive::Endpoint;
use serde::Serialize;

use super::{Scope, Vault, VaultError};
use crate::secret::Secret;

/// `POST auth/<mount>/login`: the same body for the `jwt` and `kubernetes`
/// methods.
#[derive(Endpoint, Serialize)]
#[endpoint(
    path = "auth/{self.mount}/login",
    method = "POST",
    response = "serde_json::Value"
)]
struct GateLogin<'a> {
    #[endpoint(skip)]
    #[serde(skip)]
    mount: &'a str,
    role: &'a str,
    jwt: &'a str,
}

/// `POST auth/token/revoke-self`.
#[derive(Endpoint, Serialize)]
#[endpoint(path = "auth/token/revoke-self", method = "POST")]
struct RevokeSelf {}

/// A pod's own Vault token and how long it lives.
#[derive(Debug)]
pub struct PodToken {
    /// The token (never shown).
    pub token: Secret,
    /// Its lifetime from the login.
    pub ttl: Duration,
}

impl Vault {
    /// Logs in at `auth/<mount>/login` as `role` with the pod's service
    /// account token `jwt`, in `scope`'s namespace.
    ///
    /// # Errors
    /// A [`VaultError`]: Vault's refusal of the pod, or an answer without a token.
    pub async fn pod_login(
        &self,
        mount: &str,
        role: &str,
        jwt: &Secret,
        scope: Scope<'_>,
    ) -> Result<PodToken, VaultError> {
        let what = format!("auth/{mount}/login (role {role})");
        let jwt = std::str::from_utf8(jwt.expose_secret()).map_err(|_| VaultError::Unexpected {
            what: what.clone(),
            detail: "the pod's token is not text".to_owned(),
        })?;
        let endpoint = GateLogin { mount, role, jwt };
        // Sent with no token of the broker's: only the pod's is presented.
        let empty = Secret::from(String::new());
        let result = self
            .exec(endpoint, &what, scope.with_token(Some(&empty)))
            .await?;
        let auth = result.auth.ok_or_else(|| VaultError::Unexpected {
            what,
            detail: "the login answered without a token".to_owned(),
        })?;
        Ok(PodToken {
            token: Secret::from(auth.client_token),
            ttl: Duration::from_secs(auth.lease_duration),
        })
    }

    /// Revokes a pod's token (`auth/token/revoke-self` with it).
    ///
    /// # Errors
    /// A [`VaultError`].
    pub async fn revoke_pod_token(
        &self,
        token: &Secret,
        scope: Scope<'_>,
    ) -> Result<(), VaultError> {
        self.exec_empty(
            RevokeSelf {},
            "auth/token/revoke-self",
            scope.with_token(Some(token)),
        )
        .await
    }
}
