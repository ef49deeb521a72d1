//! Typed errors, following the broker's documented status codes, `RetryInfo`
//! details and `ErrorInfo` reasons.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt as _;

use crate::{retry, target::SetupError};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call could not be prepared: the token file, the CA, the address.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The policy does not grant a binding to this pod (`PERMISSION_DENIED`);
    /// asking again does not help until the policy changes.
    #[error("denied: {message}")]
    Denied {
        /// The broker's message, naming the binding.
        message: String,
    },
    /// The token was refused (`UNAUTHENTICATED`): expired, wrong audience,
    /// or its pod is gone. A fresh token may help.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// What was wrong with the token.
        message: String,
    },
    /// The broker or Vault cannot serve it now (`UNAVAILABLE`, or
    /// `RESOURCE_EXHAUSTED` for a rate limit); retry after `retry_after`
    /// when the broker suggests a wait.
    #[error("unavailable: {message}")]
    Unavailable {
        /// What is unavailable.
        message: String,
        /// The wait the broker suggests (`RetryInfo`).
        retry_after: Option<Duration>,
    },
    /// The request is malformed (`INVALID_ARGUMENT`): no bindings, a
    /// duplicate, a handle of another pod.
    #[error("invalid request: {message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// The binding's source cannot be served as it stands
    /// (`FAILED_PRECONDITION`: a field that makes no safe file name, a
    /// template field missing from the secret); the security team can fix it.
    #[error("cannot be served as it stands: {message}")]
    Unservable {
        /// What is wrong with the source.
        message: String,
        /// The binding, when the broker named it (`BINDING_UNSERVABLE`):
        /// the others can be asked for without it.
        binding: Option<String>,
    },
    /// Any other status.
    #[error("broker: {}: {}", .0.code(), .0.message())]
    Broker(tonic::Status),
    /// A key for a binding whose private key stays in the pod could not be
    /// made here.
    #[error("key: {0}")]
    Key(String),
}

impl Error {
    /// Whether asking again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Denied { .. }
            | Self::InvalidRequest { .. }
            | Self::Unservable { .. }
            | Self::Key(_) => false,
            Self::Setup(SetupError::Token { .. } | SetupError::BadToken(_)) => true,
            Self::Setup(_) => false,
            Self::Unauthenticated { .. } | Self::Unavailable { .. } => true,
            Self::Broker(status) => retry::is_retryable(status.code()),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::PermissionDenied => Self::Denied { message },
            Code::Unauthenticated => Self::Unauthenticated { message },
            Code::Unavailable | Code::ResourceExhausted => Self::Unavailable {
                message,
                retry_after: status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay),
            },
            Code::InvalidArgument => Self::InvalidRequest { message },
            Code::FailedPrecondition => Self::Unservable {
                binding: tessera_proto::reason::StreamEnd::binding(&status),
                message,
            },
            _ => Self::Broker(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    #[test]
    fn statuses_map_to_typed_errors_with_their_retry_hint() {
        let status = tonic::Status::with_error_details(
            Code::Unavailable,
            "Vault is unavailable",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
        );
        match Error::from(status) {
            Error::Unavailable { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(1)));
            }
            other => panic!("{other:?}"),
        }
        let denied = Error::from(tonic::Status::permission_denied(
            "binding `db` is not granted",
        ));
        assert!(matches!(denied, Error::Denied { .. }) && !denied.is_retryable());
        assert!(Error::from(tonic::Status::unauthenticated("expired")).is_retryable());
        assert!(!Error::from(tonic::Status::invalid_argument("dup")).is_retryable());
    }
}
