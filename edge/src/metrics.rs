//! `vmedge_edge_*` Prometheus metrics.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use vmedge_model::{ServiceName, VmId};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    code: u16,
    service: ServiceLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: VmLabel,
    direction: &'static str,
}

/// A service name as a label value (empty: no route). Label sets are looked up on every
/// request: these are copied, and written out as text only when scraped.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ServiceLabel(Option<ServiceName>);

impl EncodeLabelValue for ServiceLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        encoder.write_str(self.0.as_ref().map_or("", |s| s.as_str()))
    }
}

/// A VM id as a label value, hyphenated.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct VmLabel(VmId);

impl EncodeLabelValue for VmLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        write!(encoder, "{}", self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every edge metric.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    direct_requests: Counter,
    refusals: Family<ReasonLabels, Counter>,
    bytes: Family<VmLabels, Counter<u64, AtomicU64>>,
    connect_seconds: Histogram,
    response_seconds: Histogram,
    open_requests: Gauge,
    open_connections: Gauge,
    parked_connections: Gauge,
    /// Requests done, all labels together, and connections parked: what
    /// [`Metrics::work_done`] reads.
    work: AtomicU64,
    wake_calls: Family<ResultLabels, Counter>,
    tls_reloads: Family<ResultLabels, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Metrics {
    /// Registers the metrics under `vmedge_edge`.
    pub fn register(registry: &mut Registry) -> std::sync::Arc<Metrics> {
        let m = Metrics {
            requests: Family::default(),
            direct_requests: Counter::default(),
            refusals: Family::default(),
            bytes: Family::default(),
            connect_seconds: Histogram::new(latency_buckets()),
            response_seconds: Histogram::new(latency_buckets()),
            open_requests: Gauge::default(),
            open_connections: Gauge::default(),
            parked_connections: Gauge::default(),
            work: AtomicU64::new(0),
            wake_calls: Family::default(),
            tls_reloads: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("vmedge_edge");
        sub.register(
            "requests",
            "Requests answered, by status code and service name (empty: no route)",
            m.requests.clone(),
        );
        sub.register(
            "direct_requests",
            "Of those, requests to HTTP/1.1 services proxied on the edge's own path, not pingora's",
            m.direct_requests.clone(),
        );
        sub.register(
            "refusals",
            "Requests the edge answered itself, by reason",
            m.refusals.clone(),
        );
        sub.register(
            "bytes",
            "Body bytes per VM: in = to the VM, out = from the VM (WebSocket frames included)",
            m.bytes.clone(),
        );
        sub.register(
            "upstream_connect_seconds",
            "Time to open a new connection to a VM",
            m.connect_seconds.clone(),
        );
        sub.register(
            "upstream_response_seconds",
            "Time from sending a request to a VM to its response header",
            m.response_seconds.clone(),
        );
        sub.register(
            "open_requests",
            "Requests in progress, open WebSocket and streaming exchanges included",
            m.open_requests.clone(),
        );
        sub.register(
            "open_connections",
            "Client connections open, plain and TLS",
            m.open_connections.clone(),
        );
        sub.register(
            "parked_connections",
            "Of those, idle plain connections parked off the runtime, waiting for their next request",
            m.parked_connections.clone(),
        );
        sub.register(
            "wake_calls",
            "Wake hook calls, by result",
            m.wake_calls.clone(),
        );
        sub.register(
            "tls_reloads",
            "Certificate reloads, by result",
            m.tls_reloads.clone(),
        );
        std::sync::Arc::new(m)
    }

    /// Requests done and connections parked since start: the process trims its heap
    /// after either (a request's machinery, a parked connection's task freed), not while
    /// the edge sits idle.
    pub fn work_done(&self) -> u64 {
        self.work.load(Ordering::Relaxed)
    }

    /// A request answered with `code`, for `service` (`None`: it had no route).
    pub(crate) fn request_done(&self, code: u16, service: Option<ServiceName>) {
        self.work.fetch_add(1, Ordering::Relaxed);
        let labels = RequestLabels {
            code,
            service: ServiceLabel(service),
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub(crate) fn direct_request(&self) {
        self.direct_requests.inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn vm_bytes(&self, vm: &VmId, bytes_in: u64, bytes_out: u64) {
        if bytes_in == 0 && bytes_out == 0 {
            return;
        }
        for (direction, n) in [("in", bytes_in), ("out", bytes_out)] {
            if n > 0 {
                let labels = VmLabels {
                    vm: VmLabel(*vm),
                    direction,
                };
                self.bytes.get_or_create(&labels).inc_by(n);
            }
        }
    }

    pub(crate) fn connected(&self, seconds: f64) {
        self.connect_seconds.observe(seconds);
    }

    pub(crate) fn responded(&self, seconds: f64) {
        self.response_seconds.observe(seconds);
    }

    pub(crate) fn open(&self) {
        self.open_requests.inc();
    }

    pub(crate) fn closed(&self) {
        self.open_requests.dec();
    }

    /// Counts a client connection open until the returned value is dropped.
    pub(crate) fn connection_opened(&self) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.open_connections.clone())
    }

    /// A connection parked ([`crate::park`]).
    pub(crate) fn connection_parked(&self) {
        self.work.fetch_add(1, Ordering::Relaxed);
        self.parked_connections.inc();
    }

    /// `n` parked connections resumed or closed.
    pub(crate) fn connections_unparked(&self, n: usize) {
        self.parked_connections.dec_by(n as i64);
    }

    pub(crate) fn wake_call(&self, result: &'static str) {
        self.wake_calls
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub(crate) fn tls_reload(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// A client connection counted in `vmedge_edge_open_connections` while this lives.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
