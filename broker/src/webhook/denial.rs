//! Why a pod was refused: the one error type of the webhook's checks,
//! depending on nothing else in the webhook.

/// Why a pod was refused; the message goes back to whoever created it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("tessera: {0}")]
pub struct Denial(pub String);
