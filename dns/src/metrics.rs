//! The gate's Prometheus metrics. Each counter a query touches is resolved once here, so
//! counting allocates nothing.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a query ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// See [`Outcome`].
    pub result: &'static str,
}

/// How a query ended, as counted in `vmedge_dns_queries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An upstream or cached answer went out.
    Answered,
    /// A stale cached answer went out because upstream failed.
    Stale,
    /// The name (or a CNAME target) is blocked by the VM's policy: NXDOMAIN.
    Blocked,
    /// Answered by the gate itself (DDR NODATA, ANY per RFC 8482).
    Synthesized,
    /// The source is no VM of this worker, or the query is one we never serve.
    Refused,
    /// The VM went over its query rate.
    RateLimited,
    /// Upstream failed with nothing stale, or the fqdn sets could not be filled in time.
    ServFail,
    /// Unreadable or malformed query.
    FormErr,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Answered,
        Outcome::Stale,
        Outcome::Blocked,
        Outcome::Synthesized,
        Outcome::Refused,
        Outcome::RateLimited,
        Outcome::ServFail,
        Outcome::FormErr,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Stale => "stale",
            Outcome::Blocked => "blocked",
            Outcome::Synthesized => "synthesized",
            Outcome::Refused => "refused",
            Outcome::RateLimited => "rate_limited",
            Outcome::ServFail => "servfail",
            Outcome::FormErr => "formerr",
        }
    }
}

fn latency() -> Histogram {
    // 50 µs to 2 s, with a bound at 2 ms (the fqdn insert goal).
    Histogram::new([
        0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003,
        0.005, 0.007_5, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
    ])
}

/// Every metric of the gate.
#[derive(Debug)]
pub struct Metrics {
    outcomes: [Counter; 8],
    /// Answers served from the cache.
    pub cache_hits: Counter,
    /// Questions the cache could not answer.
    pub cache_misses: Counter,
    /// Time to an upstream answer, seconds.
    pub upstream_seconds: Histogram,
    /// Upstream queries that got no answer.
    pub upstream_failures: Counter,
    /// fqdn set inserts that were confirmed.
    pub set_inserts: Counter,
    /// fqdn set inserts refused or not confirmed in time (the VM got SERVFAIL).
    pub set_insert_failures: Counter,
    /// fqdn answers whose elements the kernel confirmed within the last second (no insert).
    pub set_insert_skips: Counter,
    /// Time from asking for an insert to its confirmation, seconds.
    pub set_insert_seconds: Histogram,
    /// Queries being handled now.
    pub in_flight: Gauge,
    /// Datagrams dropped because too many queries were in flight.
    pub dropped: Counter,
    /// Answers that did not fit and went out truncated (TC).
    pub truncated: Counter,
}

impl Metrics {
    /// Registers every metric under `vmedge_dns_`.
    pub fn register(registry: &mut Registry) -> std::sync::Arc<Metrics> {
        let queries = Family::<ResultLabel, Counter>::default();
        let metrics = Metrics {
            outcomes: Outcome::ALL.map(|o| {
                queries
                    .get_or_create(&ResultLabel { result: o.label() })
                    .clone()
            }),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            upstream_seconds: latency(),
            upstream_failures: Counter::default(),
            set_inserts: Counter::default(),
            set_insert_failures: Counter::default(),
            set_insert_skips: Counter::default(),
            set_insert_seconds: latency(),
            in_flight: Gauge::default(),
            dropped: Counter::default(),
            truncated: Counter::default(),
        };
        let sub = registry.sub_registry_with_prefix("vmedge_dns");
        sub.register("queries", "Queries by how they ended", queries);
        sub.register(
            "cache_hits",
            "Answers served from the cache",
            metrics.cache_hits.clone(),
        );
        sub.register(
            "cache_misses",
            "Questions the cache could not answer",
            metrics.cache_misses.clone(),
        );
        sub.register(
            "upstream_seconds",
            "Time to an upstream answer",
            metrics.upstream_seconds.clone(),
        );
        sub.register(
            "upstream_failures",
            "Upstream queries that got no answer from any resolver",
            metrics.upstream_failures.clone(),
        );
        sub.register(
            "set_inserts",
            "fqdn set inserts confirmed by the kernel",
            metrics.set_inserts.clone(),
        );
        sub.register(
            "set_insert_failures",
            "fqdn set inserts refused or not confirmed in time (the VM got SERVFAIL)",
            metrics.set_insert_failures.clone(),
        );
        sub.register(
            "set_insert_skips",
            "fqdn answers whose elements were confirmed within the last second: no new insert",
            metrics.set_insert_skips.clone(),
        );
        sub.register(
            "set_insert_seconds",
            "Time from an answer's insert request to the kernel's confirmation",
            metrics.set_insert_seconds.clone(),
        );
        sub.register(
            "in_flight",
            "Queries being handled",
            metrics.in_flight.clone(),
        );
        sub.register(
            "dropped",
            "Datagrams dropped because too many queries were in flight",
            metrics.dropped.clone(),
        );
        sub.register(
            "truncated",
            "Answers sent truncated (TC) because they did not fit",
            metrics.truncated.clone(),
        );
        std::sync::Arc::new(metrics)
    }

    /// A registry of its own, for tests and tools that do not export metrics.
    pub fn unregistered() -> std::sync::Arc<Metrics> {
        Metrics::register(&mut Registry::default())
    }

    /// Counts a query's outcome.
    pub fn count(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.outcomes[i].inc();
    }
}
