//! What a client does when a call or a stream ends: the documented reaction
//! to each of the broker's `ErrorInfo` reasons, then to the status code, and
//! the backoff between attempts.

use std::time::Duration;

use tessera_proto::reason::StreamEnd;
use tonic::Code;

/// What to do when the broker ends a stream (or refuses a call) with a status.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaction {
    /// Reconnect at once (token expired, replica shutting down, policy
    /// changed): nothing is wrong with this pod. The reason is named.
    ReconnectNow(&'static str),
    /// Reconnect with backoff, without presenting this binding's handle
    /// (its lease ended and could be neither renewed nor replaced).
    DropHandle(String),
    /// The binding's source cannot be served as it stands: ask again slowly.
    Slow,
    /// This binding's source cannot be served as it stands: ask for the
    /// others without it now, and for it alone, slowly.
    SetAside(String),
    /// Reconnect with backoff.
    Backoff,
    /// Retrying cannot help (denied, invalid request).
    Stop,
}

impl Reaction {
    /// The reaction to `status`.
    pub fn to(status: &tonic::Status) -> Self {
        match StreamEnd::of(status) {
            Some(
                end
                @ (StreamEnd::TokenExpired | StreamEnd::ShuttingDown | StreamEnd::PolicyChanged),
            ) => Self::ReconnectNow(end.reason()),
            Some(StreamEnd::LeaseLost) => match StreamEnd::binding(status) {
                Some(binding) => Self::DropHandle(binding),
                None => Self::Backoff,
            },
            Some(StreamEnd::BindingUnservable) => match StreamEnd::binding(status) {
                Some(binding) => Self::SetAside(binding),
                None => Self::Slow,
            },
            None if status.code() == Code::FailedPrecondition => Self::Slow,
            None if is_retryable(status.code()) => Self::Backoff,
            None => Self::Stop,
        }
    }
}

/// Whether a call that failed with `code` can succeed if made again.
pub fn is_retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::PermissionDenied | Code::InvalidArgument | Code::FailedPrecondition
    )
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never waits longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next wait: uniformly random in [0, min(max, base * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use tonic::Status as Grpc;

    use super::*;

    #[test]
    fn each_stream_end_reason_gets_its_documented_reaction() {
        for (status, reaction) in [
            (
                StreamEnd::TokenExpired.status("expired"),
                Reaction::ReconnectNow("TOKEN_EXPIRED"),
            ),
            (
                StreamEnd::ShuttingDown.status("bye"),
                Reaction::ReconnectNow("SHUTTING_DOWN"),
            ),
            (
                StreamEnd::PolicyChanged.status("changed"),
                Reaction::ReconnectNow("POLICY_CHANGED"),
            ),
            (
                StreamEnd::LeaseLost.status_for("lost", Some("db")),
                Reaction::DropHandle("db".into()),
            ),
            (StreamEnd::LeaseLost.status("lost"), Reaction::Backoff),
            (Grpc::failed_precondition("unsafe key"), Reaction::Slow),
            (Grpc::unavailable("vault"), Reaction::Backoff),
            // Text alone is not a reason: an old broker's "expired" backs off.
            (Grpc::unauthenticated("token expired"), Reaction::Backoff),
            (Grpc::permission_denied("no"), Reaction::Stop),
            (Grpc::invalid_argument("dup"), Reaction::Stop),
        ] {
            assert_eq!(Reaction::to(&status), reaction, "{status:?}");
        }
    }

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
