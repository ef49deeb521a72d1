//! Per-identity rate limits (token buckets, GCRA via `governor`): one pod in a
//! crash loop cannot starve the others or hammer Vault through the broker.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::identity::Identity;

/// Requests per second and burst for each identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests allowed at once after a quiet period.
    pub burst: NonZeroU32,
}

/// Keyed limiter: the pod UID when the token names a pod, else the service account.
pub struct Limiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl Limiter {
    /// A limiter with `limit` for every identity.
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self {
            limiter: RateLimiter::dashmap(quota),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` when `identity` may make a request now; otherwise how long to wait.
    ///
    /// # Errors
    /// The wait until the next request would be allowed.
    pub fn check(&self, identity: &Identity) -> Result<(), Duration> {
        self.limiter
            .check_key(&key(identity))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// `Ok` when `identity` may do `n` more units of work now (one per lease
    /// handle in a Revoke); otherwise how long to wait. More than the burst
    /// at once is never allowed.
    ///
    /// # Errors
    /// The wait until that much work would be allowed.
    pub fn check_n(&self, identity: &Identity, n: u32) -> Result<(), Duration> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match self.limiter.check_key_n(&key(identity), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.clock.now())),
            Err(_insufficient) => Err(Duration::from_secs(1)),
        }
    }

    /// Forgets identities whose buckets are full again (bounded memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The bucket of an identity: its pod when the token names one.
fn key(identity: &Identity) -> String {
    match &identity.pod {
        Some(pod) => format!("pod/{}", pod.uid),
        None => format!("sa/{}/{}", identity.namespace, identity.service_account),
    }
}
