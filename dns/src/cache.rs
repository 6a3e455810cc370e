//! The gate's shared cache: upstream answers by (name, type, class), positive and
//! negative, for as long as their TTLs say, then kept a short while longer to serve
//! stale when upstream is down (RFC 8767).
//!
//! Answers are cached as upstream gave them; the asking VM's policy is applied on the
//! way out, so a policy change takes effect at once, cache or not.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, Record};

/// What is cached about one question.
#[derive(Debug, Clone)]
pub struct Answer {
    /// NOERROR or NXDOMAIN.
    pub rcode: ResponseCode,
    /// The answer section (CNAME chain and records).
    pub answers: Vec<Record>,
    /// The authority section (the SOA of a negative answer).
    pub authorities: Vec<Record>,
}

impl Answer {
    /// How long the answer may be cached: the smallest TTL of its answer records, or for a
    /// negative answer the SOA's (RFC 2308: min of the SOA's TTL and its MINIMUM), or
    /// `no_soa` when a negative answer carries none.
    pub fn ttl(&self, no_soa: u32) -> u32 {
        if let Some(ttl) = self.answers.iter().map(|r| r.ttl).min() {
            return ttl;
        }
        self.authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .unwrap_or(no_soa)
    }
}

/// The key: the question's name (normalized), type and class.
pub type Key = (Box<str>, u16, u16);

#[derive(Debug)]
struct Entry {
    answer: Answer,
    stored: Instant,
    ttl: u32,
}

/// A cached answer found for a question.
#[derive(Debug)]
pub enum Lookup {
    /// Within its TTL; the records' TTLs count down from when it was stored.
    Fresh(Answer),
    /// Past its TTL but within the stale window: served only when upstream fails.
    Stale(Answer),
    /// Nothing usable.
    Miss,
}

/// Limits of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Entries at most; when full, expired entries are swept and new answers skipped.
    pub capacity: usize,
    /// TTLs are capped here.
    pub max_ttl: u32,
    /// A negative answer without an SOA is cached this long.
    pub negative_ttl: u32,
    /// How long past its TTL an answer may still be served while upstream is down.
    pub stale_window: Duration,
    /// The TTL of a stale answer (RFC 8767 suggests 30 s).
    pub stale_ttl: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 100_000,
            max_ttl: 86_400,
            negative_ttl: 60,
            stale_window: Duration::from_secs(300),
            stale_ttl: 30,
        }
    }
}

/// The cache, shared by every query of the gate.
#[derive(Debug)]
pub struct Cache {
    map: DashMap<Key, Entry, foldhash::fast::RandomState>,
    config: CacheConfig,
}

impl Cache {
    /// An empty cache.
    pub fn new(config: CacheConfig) -> Cache {
        Cache {
            map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            config,
        }
    }

    /// The answer for `key`, with TTLs as they stand now.
    pub fn get(&self, key: &Key, now: Instant) -> Lookup {
        let Some(entry) = self.map.get(key) else {
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(entry.stored);
        let age_secs = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        if age_secs < entry.ttl {
            let mut answer = entry.answer.clone();
            for record in answer.answers.iter_mut().chain(&mut answer.authorities) {
                record.ttl = record.ttl.min(entry.ttl).saturating_sub(age_secs);
            }
            return Lookup::Fresh(answer);
        }
        if age < Duration::from_secs(u64::from(entry.ttl)) + self.config.stale_window {
            let mut answer = entry.answer.clone();
            for record in answer.answers.iter_mut().chain(&mut answer.authorities) {
                record.ttl = self.config.stale_ttl;
            }
            return Lookup::Stale(answer);
        }
        Lookup::Miss
    }

    /// Stores an upstream answer (NOERROR or NXDOMAIN; anything else is not cached).
    pub fn put(&self, key: Key, answer: &Answer, now: Instant) {
        if !matches!(answer.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            return;
        }
        let ttl = answer
            .ttl(self.config.negative_ttl)
            .min(self.config.max_ttl);
        if ttl == 0 {
            return;
        }
        if self.map.len() >= self.config.capacity && !self.map.contains_key(&key) {
            self.sweep(now);
            if self.map.len() >= self.config.capacity {
                return;
            }
        }
        self.map.insert(
            key,
            Entry {
                answer: answer.clone(),
                stored: now,
                ttl,
            },
        );
    }

    /// Drops entries past their TTL and the stale window.
    pub fn sweep(&self, now: Instant) {
        let window = self.config.stale_window;
        self.map.retain(|_, e| {
            now.saturating_duration_since(e.stored) < Duration::from_secs(u64::from(e.ttl)) + window
        });
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::Ipv4Addr;

    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn positive(ttl: u32) -> Answer {
        Answer {
            rcode: ResponseCode::NoError,
            answers: vec![Record::from_rdata(
                name("a.test."),
                ttl,
                RData::A(A(Ipv4Addr::new(198, 18, 0, 1))),
            )],
            authorities: vec![],
        }
    }

    fn key() -> Key {
        ("a.test".into(), 1, 1)
    }

    #[test]
    fn a_fresh_answer_counts_its_ttl_down() {
        let cache = Cache::new(CacheConfig::default());
        let t0 = Instant::now();
        cache.put(key(), &positive(100), t0);
        let Lookup::Fresh(a) = cache.get(&key(), t0 + Duration::from_secs(40)) else {
            panic!("expected fresh")
        };
        assert_eq!(a.answers[0].ttl, 60);
    }

    #[test]
    fn past_its_ttl_an_answer_is_stale_then_gone() {
        let config = CacheConfig {
            stale_window: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        let cache = Cache::new(config);
        let t0 = Instant::now();
        cache.put(key(), &positive(5), t0);
        let Lookup::Stale(a) = cache.get(&key(), t0 + Duration::from_secs(6)) else {
            panic!("expected stale")
        };
        assert_eq!(a.answers[0].ttl, config.stale_ttl);
        assert!(matches!(
            cache.get(&key(), t0 + Duration::from_secs(16)),
            Lookup::Miss
        ));
        cache.sweep(t0 + Duration::from_secs(16));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_negative_answer_lives_as_long_as_its_soa_says() {
        let soa = SOA::new(name("test."), name("h.test."), 1, 1, 1, 1, 7);
        let answer = Answer {
            rcode: ResponseCode::NXDomain,
            answers: vec![],
            authorities: vec![Record::from_rdata(name("test."), 50, RData::SOA(soa))],
        };
        assert_eq!(answer.ttl(60), 7);
        let no_soa = Answer {
            authorities: vec![],
            ..answer
        };
        assert_eq!(no_soa.ttl(60), 60);
    }

    #[test]
    fn servfail_and_zero_ttls_are_not_cached_and_a_full_cache_skips() {
        let cache = Cache::new(CacheConfig {
            capacity: 1,
            ..CacheConfig::default()
        });
        let t0 = Instant::now();
        let failed = Answer {
            rcode: ResponseCode::ServFail,
            ..positive(100)
        };
        cache.put(key(), &failed, t0);
        cache.put(key(), &positive(0), t0);
        assert!(cache.is_empty());
        cache.put(key(), &positive(100), t0);
        cache.put(("b.test".into(), 1, 1), &positive(100), t0);
        assert_eq!(cache.len(), 1);
    }
}
