//! Time as the broker stores and waits for it: Unix seconds in records and
//! handles, and sleeping until an optional deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `secs` after the Unix epoch; the epoch itself (already expired, the safe
/// side) when that does not fit in a `SystemTime`.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Sleeps until `at`; forever when there is no deadline (a `select!` arm
/// that never fires).
pub async fn sleep_until(at: Option<impl Into<tokio::time::Instant>>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_unix_times_count_as_expired_instead_of_panicking() {
        assert_eq!(from_unix(u64::MAX), UNIX_EPOCH);
        assert_eq!(from_unix(10), UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(unix(from_unix(10)), 10);
    }
}
