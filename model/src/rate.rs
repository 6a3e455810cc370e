//! A request budget per VM: a token bucket, shared by the edge (requests) and the DNS gate
//! (queries).

use std::sync::Mutex;
use std::time::Instant;

/// A rate: `per_second` sustained, `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained rate, per second.
    pub per_second: f64,
    /// Allowed at once.
    pub burst: f64,
}

impl RateLimit {
    /// `rate` per second with bursts of twice that, as the config's `rate_limit` keys mean
    /// it; `None` for 0 (no limit).
    pub fn per_second_burst_twice(rate: u32) -> Option<RateLimit> {
        let rate = f64::from(rate);
        (rate > 0.0).then_some(RateLimit {
            per_second: rate,
            burst: 2.0 * rate,
        })
    }
}

/// One budget, starting full.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket for `limit`.
    pub fn new(limit: RateLimit) -> TokenBucket {
        TokenBucket {
            limit,
            state: Mutex::new((limit.burst, Instant::now())),
        }
    }

    /// Takes one token; false when the budget is spent.
    pub fn take(&self) -> bool {
        self.settle(1.0)
    }

    /// Whether a token is there, without taking it.
    pub fn has_token(&self) -> bool {
        self.settle(0.0)
    }

    /// Whether the bucket has refilled to its burst (an idle entry a map may drop).
    pub fn is_full(&self) -> bool {
        self.settle(0.0);
        self.state
            .lock()
            .map(|s| s.0 >= self.limit.burst)
            .unwrap_or(true)
    }

    /// Refills for the time passed, then takes `cost` if at least one token is there.
    fn settle(&self, cost: f64) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return true;
        };
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        let refill = now.duration_since(*at).as_secs_f64() * self.limit.per_second;
        *tokens = (*tokens + refill).min(self.limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_burst_then_refuses() {
        let bucket = TokenBucket::new(RateLimit {
            per_second: 0.001,
            burst: 3.0,
        });
        assert!(bucket.is_full());
        assert!((0..3).all(|_| bucket.take()));
        assert!(!bucket.has_token());
        assert!(!bucket.take());
        assert!(!bucket.is_full());
    }

    #[test]
    fn config_rates_burst_twice_and_zero_is_none() {
        assert_eq!(RateLimit::per_second_burst_twice(0), None);
        assert_eq!(
            RateLimit::per_second_burst_twice(5),
            Some(RateLimit {
                per_second: 5.0,
                burst: 10.0
            })
        );
    }
}
