//! Token-bucket rate limits per key (a GM, a player, a client IP).
//!
//! Each relay limits on its own: with N relays behind nginx the effective limit is up to
//! N times the setting, which is enough to stop a runaway client or script without a Redis
//! round trip on every request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Keys tracked at once. Past it, keys whose bucket has refilled (idle ones) are dropped;
/// if every key is active, all are dropped, which at worst lets a burst through.
const MAX_TRACKED_KEYS: usize = 100_000;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Allows `per_s` events per second per key, with bursts of up to `per_s`; `0` is off.
pub struct RateLimiter<K> {
    per_s: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(per_s: u32) -> Self {
        Self { per_s: f64::from(per_s), buckets: Mutex::new(HashMap::new()) }
    }

    pub fn is_off(&self) -> bool {
        self.per_s == 0.0
    }

    /// Takes one token for `key`; false when the key is over its rate.
    pub fn allow(&self, key: &K) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &K, now: Instant) -> bool {
        if self.is_off() {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED_KEYS && !buckets.contains_key(key) {
            let per_s = self.per_s;
            buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * per_s < per_s);
            if buckets.len() >= MAX_TRACKED_KEYS {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.per_s, last: now });
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.per_s;
        bucket.tokens = (bucket.tokens + refill).min(self.per_s);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(5);
        let t0 = Instant::now();
        assert!((0..5).all(|_| limiter.allow_at(&1, t0)));
        assert!(!limiter.allow_at(&1, t0));
        assert!(limiter.allow_at(&2, t0), "keys are independent");
        assert!(limiter.allow_at(&1, t0 + Duration::from_millis(200)));
        assert!(!limiter.allow_at(&1, t0 + Duration::from_millis(200)));
    }

    #[test]
    fn zero_is_off() {
        let limiter = RateLimiter::new(0);
        assert!((0..10_000).all(|_| limiter.allow(&1)));
    }
}
