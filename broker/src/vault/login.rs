//! The broker's own Vault login, following its token source: a token file
//! (loaded again when it changes), AppRole or JWT (logged in again at two
//! thirds of the token's TTL). A request only reads the current client until
//! the login's fresh time ends; then one request looks at the source.

use std::{
    sync::{Arc, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use vaultrs::{client::VaultClient, error::ClientError};

use super::{Vault, VaultAuth, VaultError};
use crate::secret::Secret;

/// How long a token file is trusted before it is looked at again (a
/// rotated file is picked up within this).
const TOKEN_FILE_RECHECK: Duration = Duration::from_secs(1);

/// The state of the broker's login.
#[derive(Default)]
pub(super) struct Login {
    /// Identifies the token source: the token file's (mtime, len), or the
    /// AppRole login time.
    stamp: Option<(SystemTime, u64)>,
    renew_at: Option<Instant>,
}

impl Vault {
    /// Makes sure the client holds a current token, then returns it. Within
    /// the login's fresh time this only reads the client; after it, one
    /// request at a time looks at the token source.
    pub(super) async fn authed(&self) -> Result<Arc<VaultClient>, VaultError> {
        let fresh = self
            .fresh_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until);
        if !fresh {
            self.log_in().await?;
        }
        Ok(self
            .client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }

    /// Logs in again when the token source says so, and sets how long the
    /// result needs no look.
    async fn log_in(&self) -> Result<(), VaultError> {
        let mut login = self.login.lock().await;
        match &self.settings.auth {
            VaultAuth::TokenFile(path) => {
                let meta = std::fs::metadata(path).map_err(|e| {
                    VaultError::Login(format!("cannot read token file {}: {e}", path.display()))
                })?;
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                if login.stamp != Some(stamp) {
                    let text = read_secret_file(path, "Vault token")?;
                    let token = Secret::from(text.trim().to_owned());
                    if token.is_empty() {
                        return Err(VaultError::Login(format!(
                            "token file {} is empty",
                            path.display()
                        )));
                    }
                    self.swap_client(&token)?;
                    login.stamp = Some(stamp);
                    tracing::info!(path = %path.display(), "loaded Vault token from file");
                }
            }
            VaultAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                if login.renew_at.is_none_or(|at| Instant::now() >= at) {
                    let secret_id = read_secret_file(secret_id_file, "AppRole secret id")?;
                    let anonymous = Self::client(&self.settings, &Secret::default())?;
                    let answer =
                        vaultrs::auth::approle::login(&anonymous, mount, role_id, secret_id.trim())
                            .await;
                    self.logged_in(&mut login, "AppRole", mount, answer)?;
                }
            }
            VaultAuth::Jwt {
                mount,
                role,
                token_file,
            } => {
                if login.renew_at.is_none_or(|at| Instant::now() >= at) {
                    let jwt = read_secret_file(token_file, "service-account token")?;
                    let anonymous = Self::client(&self.settings, &Secret::default())?;
                    let answer = vaultrs::auth::oidc::login(
                        &anonymous,
                        mount,
                        jwt.trim(),
                        Some(role.clone()),
                    )
                    .await;
                    self.logged_in(&mut login, "JWT", mount, answer)?;
                }
            }
        }
        let until = match &self.settings.auth {
            VaultAuth::TokenFile(_) => Some(Instant::now() + TOKEN_FILE_RECHECK),
            _ => login.renew_at,
        };
        *self
            .fresh_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
        Ok(())
    }

    /// Takes the token from a login answer and schedules the next login.
    fn logged_in(
        &self,
        login: &mut Login,
        method: &str,
        mount: &str,
        answer: Result<vaultrs::api::AuthInfo, ClientError>,
    ) -> Result<(), VaultError> {
        let auth = answer.map_err(|e| {
            match VaultError::from_client(&format!("{method} login at {mount}"), e) {
                unavailable @ VaultError::Unavailable(_) => unavailable,
                other => VaultError::Login(other.to_string()),
            }
        })?;
        let token = Secret::from(auth.client_token);
        self.swap_client(&token)?;
        let ttl = Duration::from_secs(auth.lease_duration.max(3));
        login.renew_at = Some(Instant::now() + ttl * 2 / 3);
        tracing::info!(mount, ttl = ?ttl, "logged in to Vault with {method}");
        Ok(())
    }

    fn swap_client(&self, token: &Secret) -> Result<(), VaultError> {
        let client = Arc::new(Self::client(&self.settings, token)?);
        *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
        Ok(())
    }

    /// Forgets the login so the next request logs in again (after a 403).
    pub(super) async fn invalidate(&self) {
        *self
            .fresh_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let mut login = self.login.lock().await;
        login.stamp = None;
        login.renew_at = None;
    }
}

/// Reads a login credential file, zeroized when dropped.
fn read_secret_file(
    path: &std::path::Path,
    what: &str,
) -> Result<zeroize::Zeroizing<String>, VaultError> {
    std::fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| {
            VaultError::Login(format!(
                "cannot read the {what} file {}: {e}",
                path.display()
            ))
        })
}
