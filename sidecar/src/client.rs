//! The connection to the broker is `tessera-client`'s, the one the
//! applications use; the sidecar adds the trace context to each call.

use tonic::Request;

pub use tessera_client::{BrokerTarget, SetupError, TrustAnchors};

/// `target`'s request for `message` (the pod's current token), carrying the
/// current span's trace context.
///
/// # Errors
/// When the token file cannot be read or is not a token.
pub fn request<T>(target: &BrokerTarget, message: T) -> Result<Request<T>, SetupError> {
    let mut request = target.request(message)?;
    tessera_telemetry::inject_context(request.metadata_mut());
    Ok(request)
}
