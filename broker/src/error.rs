//! The broker's request errors and the gRPC status each one becomes.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{identity::TokenError, vault::VaultError};

/// Whether a token was refused or could not be checked at all.
fn verdict(error: &TokenError) -> &'static str {
    match error {
        TokenError::Unavailable(_) => "not checked",
        _ => "rejected",
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable `authorization: Bearer` metadata.
    #[error("{0}")]
    MissingToken(&'static str),
    /// The token did not verify.
    #[error("service-account token {}: {}", verdict(.0), .0)]
    Token(#[from] TokenError),
    /// The policy does not grant the binding to the caller (or it does not exist).
    #[error("binding `{binding}` is not granted to {namespace}/{service_account}")]
    Denied {
        /// The binding the caller asked for (as it asked, made printable).
        binding: String,
        /// The caller's namespace.
        namespace: String,
        /// The caller's service account.
        service_account: String,
    },
    /// The caller exceeded its rate limit.
    #[error("rate limit exceeded; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When a request would be allowed again.
        retry_after: Duration,
    },
    /// The pod already holds the most open streams allowed on a leased binding.
    #[error(
        "binding `{binding}`: this pod already holds {limit} open Watch streams on it, each with its own lease (close one, or resume with the held handle)"
    )]
    TooManyStreams {
        /// The leased binding the streams are on.
        binding: String,
        /// Most streams a pod may hold on it ([`crate::lease::stream::MAX_STREAMS_PER_POD_BINDING`]).
        limit: usize,
    },
    /// A leased binding asked for with a token that names no pod.
    #[error(
        "binding `{binding}` gives its leased credentials only to tokens bound to a pod (a projected service-account token), so they are revoked with the pod; this token names no pod. Use the pod's projected token, or ask the policy owners for `callers: {{ unbound: allow }}` on the binding"
    )]
    UnboundCaller {
        /// The leased binding that was asked for.
        binding: String,
    },
    /// Vault's own policy refused the pod at the binding's second gate
    /// (`vaultGate`): the login as the pod, or the read with its token.
    #[error(
        "binding `{binding}`: Vault refused it to this pod at the second gate ({gate}): {detail}. The Tessera policy grants it; Vault's policy for this pod's role must allow it too"
    )]
    GateDenied {
        /// The binding asked for.
        binding: String,
        /// The gate, e.g. ``auth/jwt role `shop-orders` ``.
        gate: String,
        /// Vault's answer.
        detail: String,
    },
    /// A held lease handle was refused.
    #[error(transparent)]
    Handle(#[from] crate::handle::HandleError),
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The source's fields do not make the binding's files.
    #[error("binding `{binding}`: {problem}")]
    Render {
        /// The binding being served.
        binding: String,
        /// What is wrong with the fields.
        problem: crate::policy::RenderError,
    },
    /// Vault failed for a binding.
    #[error("binding `{binding}`: {source}")]
    Vault {
        /// The binding being served.
        binding: String,
        /// What Vault said.
        source: VaultError,
    },
    /// The lease record of a binding could not be read or written, so the
    /// lease could not be owned durably (and was not handed out).
    #[error(
        "binding `{binding}`: cannot keep its lease record in Vault ({source}); the broker's Vault policy needs create, read, update, delete and list on `{mount}/*`, a KV version 1 mount (leases.recordMount)"
    )]
    LeaseRecord {
        /// The binding being served.
        binding: String,
        /// The KV v1 mount the records live in (`leases.recordMount`).
        mount: String,
        /// What Vault said.
        source: VaultError,
    },
}

impl Error {
    /// The binding the error is about, when it is about one.
    pub fn binding(&self) -> Option<&str> {
        match self {
            Error::Vault { binding, .. }
            | Error::LeaseRecord { binding, .. }
            | Error::Render { binding, .. }
            | Error::TooManyStreams { binding, .. }
            | Error::UnboundCaller { binding }
            | Error::GateDenied { binding, .. }
            | Error::Handle(
                crate::handle::HandleError::Invalid(binding)
                | crate::handle::HandleError::NotYours(binding),
            )
            | Error::Denied { binding, .. } => Some(binding),
            _ => None,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Token(TokenError::Unavailable(_)) => Code::Unavailable,
            Error::MissingToken(_) | Error::Token(_) => Code::Unauthenticated,
            Error::Denied { .. } | Error::UnboundCaller { .. } | Error::GateDenied { .. } => {
                Code::PermissionDenied
            }
            Error::InvalidRequest(_) => Code::InvalidArgument,
            Error::Handle(crate::handle::HandleError::Invalid(_)) => Code::InvalidArgument,
            Error::Handle(crate::handle::HandleError::NotYours(_)) => Code::PermissionDenied,
            Error::RateLimited { .. } | Error::TooManyStreams { .. } => Code::ResourceExhausted,
            Error::Render { .. } => Code::FailedPrecondition,
            Error::Vault { source, .. } | Error::LeaseRecord { source, .. } => match source {
                VaultError::Unavailable(_) | VaultError::Login(_) => Code::Unavailable,
                VaultError::Denied(_)
                | VaultError::NotFound(_)
                | VaultError::Invalid(_)
                | VaultError::Unexpected { .. } => Code::FailedPrecondition,
            },
        };
        let message = match &error {
            // The client learns Vault is down, not Vault's internal detail;
            // the broker logs the detail.
            Error::Vault { binding, source }
            | Error::LeaseRecord {
                binding, source, ..
            } => match code {
                Code::Unavailable => {
                    format!("binding `{binding}`: Vault is unavailable, retry with backoff")
                }
                _ if matches!(error, Error::LeaseRecord { .. }) => format!(
                    "binding `{binding}`: the broker cannot record the lease in Vault ({source}); ask the platform team to check leases.recordMount"
                ),
                _ => format!("binding `{binding}`: broker cannot read its source: {source}"),
            },
            other => other.to_string(),
        };
        let retry_after = match &error {
            Error::RateLimited { retry_after } => Some(*retry_after),
            _ if code == Code::Unavailable => Some(Duration::from_secs(1)),
            _ => None,
        };
        // One binding's source, not the request: say which, so a client can
        // ask for the others without it.
        if code == Code::FailedPrecondition
            && let Some(binding) = error.binding()
        {
            return tessera_proto::reason::StreamEnd::BindingUnservable
                .status_for(message, Some(binding));
        }
        match retry_after {
            Some(delay) => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_retry_info(Some(delay)),
            ),
            None => Status::new(code, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::HandleError;

    fn vault(source: VaultError) -> Error {
        Error::Vault {
            binding: "db".into(),
            source,
        }
    }

    /// The whole error → status table: the code a client branches on, the
    /// retry hint, and what the message may (and may not) say.
    #[test]
    fn every_error_becomes_its_documented_status() {
        let cases: Vec<(Error, Code, bool, &str)> = vec![
            (
                Error::MissingToken("missing `authorization`"),
                Code::Unauthenticated,
                false,
                "authorization",
            ),
            (
                Error::Token(TokenError::Expired(10)),
                Code::Unauthenticated,
                false,
                "rejected",
            ),
            (
                Error::Token(TokenError::Unavailable("api down".into())),
                Code::Unavailable,
                true,
                "api down",
            ),
            (
                Error::Denied {
                    binding: "db".into(),
                    namespace: "shop".into(),
                    service_account: "orders".into(),
                },
                Code::PermissionDenied,
                false,
                "not granted to shop/orders",
            ),
            (
                Error::RateLimited {
                    retry_after: Duration::from_millis(1500),
                },
                Code::ResourceExhausted,
                true,
                "1500 ms",
            ),
            (
                Error::TooManyStreams {
                    binding: "db".into(),
                    limit: 4,
                },
                Code::ResourceExhausted,
                false,
                "4 open Watch streams",
            ),
            (
                Error::Handle(HandleError::Invalid("db".into())),
                Code::InvalidArgument,
                false,
                "not valid",
            ),
            (
                Error::Handle(HandleError::NotYours("db".into())),
                Code::PermissionDenied,
                false,
                "another pod",
            ),
            (
                Error::InvalidRequest("twice".into()),
                Code::InvalidArgument,
                false,
                "twice",
            ),
            (
                Error::Render {
                    binding: "db".into(),
                    problem: crate::policy::RenderError::Missing("password".into()),
                },
                Code::FailedPrecondition,
                false,
                "db",
            ),
            (
                vault(VaultError::Unavailable(
                    "connection refused at 10.0.0.7".into(),
                )),
                Code::Unavailable,
                true,
                "retry with backoff",
            ),
            (
                vault(VaultError::Login("bad secret id".into())),
                Code::Unavailable,
                true,
                "retry with backoff",
            ),
            (
                vault(VaultError::Denied("database/creds/orders".into())),
                Code::FailedPrecondition,
                false,
                "grant the broker",
            ),
            (
                vault(VaultError::NotFound("secret/shop".into())),
                Code::FailedPrecondition,
                false,
                "no secret",
            ),
            (
                vault(VaultError::Invalid("lease".into())),
                Code::FailedPrecondition,
                false,
                "refused",
            ),
            (
                Error::LeaseRecord {
                    binding: "db".into(),
                    mount: "tessera-leases".into(),
                    source: VaultError::Denied("tessera-leases/pods".into()),
                },
                Code::FailedPrecondition,
                false,
                "leases.recordMount",
            ),
            (
                Error::LeaseRecord {
                    binding: "db".into(),
                    mount: "tessera-leases".into(),
                    source: VaultError::Unavailable("down".into()),
                },
                Code::Unavailable,
                true,
                "retry with backoff",
            ),
        ];
        for (error, code, retry, says) in cases {
            let shown = format!("{error:?}");
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{shown}");
            assert_eq!(status.get_details_retry_info().is_some(), retry, "{shown}");
            assert!(
                status.message().contains(says),
                "{shown}: {}",
                status.message()
            );
        }
    }

    #[test]
    fn an_unavailable_vault_does_not_tell_the_caller_its_internals() {
        let status = Status::from(vault(VaultError::Unavailable(
            "connection refused at 10.0.0.7:8200".into(),
        )));
        assert!(
            !status.message().contains("10.0.0.7"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn errors_name_their_binding() {
        assert_eq!(vault(VaultError::Invalid("x".into())).binding(), Some("db"));
        assert_eq!(Error::InvalidRequest("x".into()).binding(), None);
    }
}
