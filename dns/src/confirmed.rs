//! fqdn set elements the kernel confirmed a moment ago, so an answer repeated within that
//! moment (the same name asked again, a cache hit) does not wait for another netlink
//! commit that would change nothing but push an expiry a second further.
//!
//! An answer skips the insert only if every one of its elements was confirmed within the
//! window with an expiry no more than the window short of what this answer would set. The
//! window is [`WINDOW`] or the grace added to every timeout (`[dns] fqdn_grace`), whichever
//! is shorter, so the element still outlives the TTL the VM was told. The
//! record is forgotten whenever the state changes (a VM's sets may have been remade
//! empty), and entries older than the window are dropped as the map grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sets::FqdnElement;

/// How long a confirmation stands in for a new insert, at most.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Entries kept before old ones are swept.
const SWEEP_AT: usize = 1 << 16;

#[derive(Debug, Clone, Copy)]
struct Confirmation {
    at: Instant,
    expires: Instant,
}

/// Recently confirmed elements, by (set, address).
#[derive(Debug)]
pub struct Confirmed {
    window: Duration,
    entries: Mutex<HashMap<(String, IpAddr), Confirmation>>,
}

impl Confirmed {
    /// For timeouts that carry `grace` beyond the TTL (a zero grace: nothing is skipped).
    pub fn new(grace: Duration) -> Confirmed {
        Confirmed {
            window: grace.min(WINDOW),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// True when every element was confirmed recently enough that inserting it again
    /// now would change nothing that matters.
    pub fn covers(&self, now: Instant, elements: &[FqdnElement]) -> bool {
        let Ok(entries) = self.entries.lock() else {
            return false;
        };
        elements.iter().all(|e| {
            entries.get(&(e.set.clone(), e.addr)).is_some_and(|c| {
                now < c.at + self.window && c.expires + self.window >= now + e.timeout
            })
        })
    }

    /// Records that the kernel confirmed `elements` at `at`.
    pub fn record(&self, at: Instant, elements: &[FqdnElement]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= SWEEP_AT {
            let window = self.window;
            entries.retain(|_, c| at < c.at + window);
        }
        for e in elements {
            entries.insert(
                (e.set.clone(), e.addr),
                Confirmation {
                    at,
                    expires: at + e.timeout,
                },
            );
        }
    }

    /// Forgets everything (the state changed: sets may have been remade).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(addr: &str, timeout: u64) -> FqdnElement {
        FqdnElement {
            set: "fq_v6".into(),
            addr: addr.parse().unwrap(),
            timeout: Duration::from_secs(timeout),
        }
    }

    #[test]
    fn covers_only_recent_confirmations_with_enough_expiry() {
        let c = Confirmed::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let a = [element("fd5e:ed00::1", 90)];
        assert!(!c.covers(t0, &a), "nothing confirmed yet");
        c.record(t0, &a);
        assert!(c.covers(t0 + Duration::from_millis(500), &a));
        assert!(!c.covers(t0 + WINDOW, &a), "too old");
        assert!(
            !c.covers(t0, &[element("fd5e:ed00::1", 120)]),
            "this answer needs a later expiry"
        );
        let both = [element("fd5e:ed00::1", 90), element("fd5e:ed00::2", 90)];
        assert!(!c.covers(t0, &both), "one element is new");
        c.clear();
        assert!(!c.covers(t0, &a), "forgotten");
    }

    #[test]
    fn no_grace_means_no_skipping() {
        let c = Confirmed::new(Duration::ZERO);
        let t0 = Instant::now();
        let a = [element("fd5e:ed00::1", 90)];
        c.record(t0, &a);
        assert!(!c.covers(t0, &a));
    }
}
