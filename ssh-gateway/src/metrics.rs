//! `vmedge_ssh_*` Prometheus metrics.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Every gateway metric.
#[derive(Debug)]
pub struct Metrics {
    connections: Counter,
    sessions: Counter,
    open_sessions: Gauge,
    auth_failures: Family<ReasonLabels, Counter>,
    refused_connections: Family<ReasonLabels, Counter>,
    channels: Family<KindLabels, Counter>,
    bytes_to_vm: Counter<u64, AtomicU64>,
    bytes_from_vm: Counter<u64, AtomicU64>,
    upstream_connect_seconds: Histogram,
    upstream_failures: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Registers the metrics under `vmedge_ssh`.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics {
            connections: Counter::default(),
            sessions: Counter::default(),
            open_sessions: Gauge::default(),
            auth_failures: Family::default(),
            refused_connections: Family::default(),
            channels: Family::default(),
            bytes_to_vm: Counter::default(),
            bytes_from_vm: Counter::default(),
            upstream_connect_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            upstream_failures: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("vmedge_ssh");
        sub.register(
            "connections",
            "TCP connections accepted",
            m.connections.clone(),
        );
        sub.register(
            "sessions",
            "Connections that authenticated (one user on one VM)",
            m.sessions.clone(),
        );
        sub.register(
            "open_sessions",
            "Authenticated connections open now",
            m.open_sessions.clone(),
        );
        sub.register(
            "auth_failures",
            "Refused authentication attempts, by reason (the client is told nothing)",
            m.auth_failures.clone(),
        );
        sub.register(
            "refused_connections",
            "Connections closed before the SSH handshake, by reason",
            m.refused_connections.clone(),
        );
        sub.register("channels", "Channels bridged, by kind", m.channels.clone());
        // One family; its two counters are kept so the data path does no label lookup.
        // (Each lookup in its own statement: the family's read guard lives to the end of it.)
        let bytes = Family::<DirectionLabels, Counter<u64, AtomicU64>>::default();
        let to_vm = bytes
            .get_or_create(&DirectionLabels { direction: "to_vm" })
            .clone();
        let from_vm = bytes
            .get_or_create(&DirectionLabels {
                direction: "from_vm",
            })
            .clone();
        let m = Metrics {
            bytes_to_vm: to_vm,
            bytes_from_vm: from_vm,
            ..m
        };
        sub.register(
            "bytes",
            "Channel bytes bridged, by direction (to_vm, from_vm)",
            bytes,
        );
        sub.register(
            "upstream_connect_seconds",
            "From authentication to a logged-in SSH connection to the VM",
            m.upstream_connect_seconds.clone(),
        );
        sub.register(
            "upstream_failures",
            "Sessions whose VM could not be reached, by reason",
            m.upstream_failures.clone(),
        );
        Arc::new(m)
    }

    /// A detached set (tests, benches).
    pub fn detached() -> Arc<Metrics> {
        Metrics::register(&mut Registry::default())
    }

    pub(crate) fn connection(&self) {
        self.connections.inc();
    }

    pub(crate) fn session_opened(&self) {
        self.sessions.inc();
        self.open_sessions.inc();
    }

    pub(crate) fn session_closed(&self) {
        self.open_sessions.dec();
    }

    pub(crate) fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn channel(&self, kind: &'static str) {
        self.channels.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn bytes_to_vm(&self, n: usize) {
        self.bytes_to_vm.inc_by(n as u64);
    }

    pub(crate) fn bytes_from_vm(&self, n: usize) {
        self.bytes_from_vm.inc_by(n as u64);
    }

    pub(crate) fn upstream_connected(&self, took: Duration) {
        self.upstream_connect_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_failure(&self, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
