//! Why the broker ended a `Watch` stream, as a client matches it: the
//! status carries a `google.rpc.ErrorInfo` whose `domain` is [`DOMAIN`] and
//! whose `reason` is one of [`StreamEnd`]'s stable names. Match on those,
//! never on the message text, which is for people and may change.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of Tessera's reasons.
pub const DOMAIN: &str = "tessera.dev";

/// Why the broker ended a stream, and what a client should do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// `TOKEN_EXPIRED` (`UNAUTHENTICATED`): the service-account token the
    /// stream was opened with expired. Reconnect now with the current token
    /// (the kubelet has rotated the file), presenting the held handles.
    TokenExpired,
    /// `SHUTTING_DOWN` (`UNAVAILABLE`): this broker replica is stopping.
    /// Reconnect now (another replica answers), presenting the held handles.
    ShuttingDown,
    /// `LEASE_LOST` (`UNAVAILABLE`): a lease on the stream ended and could
    /// be neither renewed nor replaced (e.g. Vault was down past its end).
    /// Reconnect with backoff, without the lost binding's handle.
    LeaseLost,
    /// `POLICY_CHANGED` (`ABORTED`): the policy changed a binding on the
    /// stream (changed its source or withdrew the grant). Reconnect now: the
    /// new stream follows the new policy, or is refused with the reason.
    PolicyChanged,
    /// One binding's source cannot be served as it stands (a KV key that is
    /// no safe file name, two outputs of one name, Vault refusing its path):
    /// `FAILED_PRECONDITION`, the binding in the metadata. The others can be
    /// asked for without it; it can be asked for again, slowly, on its own.
    BindingUnservable,
}

impl StreamEnd {
    /// Every reason.
    pub const ALL: [Self; 5] = [
        Self::TokenExpired,
        Self::ShuttingDown,
        Self::LeaseLost,
        Self::PolicyChanged,
        Self::BindingUnservable,
    ];

    /// The stable `ErrorInfo.reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::LeaseLost => "LEASE_LOST",
            Self::PolicyChanged => "POLICY_CHANGED",
            Self::BindingUnservable => "BINDING_UNSERVABLE",
        }
    }

    /// The gRPC code the stream ends with.
    pub fn code(self) -> Code {
        match self {
            Self::TokenExpired => Code::Unauthenticated,
            Self::ShuttingDown | Self::LeaseLost => Code::Unavailable,
            Self::PolicyChanged => Code::Aborted,
            Self::BindingUnservable => Code::FailedPrecondition,
        }
    }

    /// The status that ends a stream for this reason, with `message` for
    /// people.
    pub fn status(self, message: impl Into<String>) -> Status {
        self.status_for(message, None)
    }

    /// The status that ends a stream for this reason about one binding,
    /// named in the `ErrorInfo` metadata as `binding`.
    pub fn status_for(self, message: impl Into<String>, binding: Option<&str>) -> Status {
        let metadata: std::collections::HashMap<String, String> = binding
            .map(|b| ("binding".to_owned(), b.to_owned()))
            .into_iter()
            .collect();
        Status::with_error_details(
            self.code(),
            message,
            ErrorDetails::with_error_info(self.reason(), DOMAIN, metadata),
        )
    }

    /// The binding a status's reason is about, when it names one.
    pub fn binding(status: &Status) -> Option<String> {
        let info = status.get_details_error_info()?;
        (info.domain == DOMAIN)
            .then(|| info.metadata.get("binding").cloned())
            .flatten()
    }

    /// The reason a status carries, if it is one of Tessera's.
    pub fn of(status: &Status) -> Option<Self> {
        let info = status.get_details_error_info()?;
        if info.domain != DOMAIN {
            return None;
        }
        Self::ALL
            .into_iter()
            .find(|end| end.reason() == info.reason && end.code() == status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_trip_through_a_status() {
        for end in StreamEnd::ALL {
            let status = end.status("people read this");
            assert_eq!(status.code(), end.code());
            assert_eq!(StreamEnd::of(&status), Some(end), "{end:?}");
            assert_eq!(StreamEnd::binding(&status), None);
        }
        let lost = StreamEnd::LeaseLost.status_for("gone", Some("db"));
        assert_eq!(StreamEnd::of(&lost), Some(StreamEnd::LeaseLost));
        assert_eq!(StreamEnd::binding(&lost).as_deref(), Some("db"));
    }

    #[test]
    fn statuses_without_a_tessera_reason_are_not_matched() {
        assert_eq!(
            StreamEnd::of(&Status::unauthenticated("token expired")),
            None
        );
        let foreign = Status::with_error_details(
            Code::Unavailable,
            "x",
            ErrorDetails::with_error_info("SHUTTING_DOWN", "example.com", []),
        );
        assert_eq!(StreamEnd::of(&foreign), None);
    }
}
