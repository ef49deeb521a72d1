//! When to act on a lease: renewal at a fraction of its lifetime with jitter,
//! and backoff after failures. Pure functions of their inputs (time is
//! passed in), so every branch is tested without waiting.

use std::time::{Duration, SystemTime};

/// Longest wait between retries of a failed renewal or rotation.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// When to act on a credential issued at `issued` and valid until
/// `not_after`: at `fraction` of its lifetime, pulled earlier by up to 10 % of
/// the lifetime by `jitter` (0..1), so a fleet started together does not renew
/// together. Zero when that moment has passed.
pub fn refresh_in(
    issued: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    jitter: f64,
    now: SystemTime,
) -> Duration {
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    // The policy refuses a fraction that is not a finite number; should one
    // reach here anyway, act at the built-in 70 % instead of panicking.
    let fraction = if fraction.is_finite() { fraction } else { 0.7 };
    let jitter = if jitter.is_finite() { jitter } else { 0.0 };
    let spread = (fraction - 0.1 * jitter.clamp(0.0, 1.0)).clamp(0.05, 0.95);
    let at = issued
        .checked_add(fraction_of(lifetime, spread))
        .unwrap_or(not_after);
    at.duration_since(now).unwrap_or_default()
}

/// `fraction` of `duration`, never panicking: zero for a fraction that is
/// negative or not a number, `duration` itself for one above 1.
pub fn fraction_of(duration: Duration, fraction: f64) -> Duration {
    if fraction.is_nan() || fraction <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(duration.as_secs_f64() * fraction.min(1.0)).unwrap_or(duration)
}

/// The wait before retry number `failures` (1 for the first) of a failed
/// renewal: capped exponential backoff (1 s, 2 s, 4 s … [`RETRY_MAX`]) with
/// full jitter (`jitter` in 0..1), never under a tenth of the step.
pub fn retry_in(failures: u32, jitter: f64) -> Duration {
    let ceiling = Duration::from_secs(1u64 << failures.clamp(1, 5).saturating_sub(1))
        .saturating_mul(2)
        .min(RETRY_MAX);
    let jitter = if jitter.is_finite() { jitter } else { 1.0 };
    ceiling.mul_f64(jitter.clamp(0.1, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn refresh_happens_at_the_fraction_of_the_lifetime() {
        let d = refresh_in(at(1000), at(2000), 0.7, 0.0, at(1000));
        assert_eq!(d, Duration::from_secs(700));
        let later = refresh_in(at(1000), at(2000), 0.7, 0.0, at(1500));
        assert_eq!(later, Duration::from_secs(200));
        assert_eq!(
            refresh_in(at(1000), at(2000), 0.7, 0.0, at(1900)),
            Duration::ZERO
        );
    }

    #[test]
    fn jitter_spreads_refreshes_earlier_within_a_tenth_of_the_lifetime() {
        let early = refresh_in(at(0), at(1000), 0.7, 1.0, at(0));
        assert_eq!(early, Duration::from_secs(600));
        let mid = refresh_in(at(0), at(1000), 0.7, 0.5, at(0));
        assert_eq!(mid, Duration::from_secs(650));
    }

    #[test]
    fn refresh_survives_fractions_that_are_not_numbers() {
        for fraction in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                refresh_in(at(0), at(100), fraction, 0.0, at(0)),
                Duration::from_secs(70)
            );
            assert_eq!(
                refresh_in(at(0), at(100), 0.7, fraction, at(0)),
                Duration::from_secs(70)
            );
        }
        assert_eq!(
            fraction_of(Duration::from_secs(10), f64::NAN),
            Duration::ZERO
        );
        assert_eq!(
            fraction_of(Duration::from_secs(10), 2.0),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn refresh_is_clamped_for_odd_fractions() {
        assert_eq!(
            refresh_in(at(0), at(100), 1.5, 0.0, at(0)),
            Duration::from_secs(95)
        );
        assert_eq!(
            refresh_in(at(0), at(100), 0.0, 0.0, at(0)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_with_jitter() {
        let full: Vec<u64> = (1..=7).map(|n| retry_in(n, 1.0).as_secs()).collect();
        assert_eq!(full, [2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(
            retry_in(0, 1.0),
            Duration::from_secs(2),
            "zero counts as the first"
        );
        assert_eq!(retry_in(3, 0.5), Duration::from_secs(4));
        assert_eq!(
            retry_in(3, 0.0),
            Duration::from_millis(800),
            "never under a tenth"
        );
        assert_eq!(retry_in(u32::MAX, f64::NAN), RETRY_MAX);
    }
}
