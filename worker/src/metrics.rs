//! The worker agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Kind of a sync.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// "full" (the whole table) or "incremental" (the VMs that changed).
    pub kind: &'static str,
}

fn sync_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Counters and histograms of the agent.
#[derive(Debug)]
pub struct Metrics {
    /// Syncs that changed the table, by kind.
    pub syncs: Family<SyncLabels, Counter>,
    /// Syncs nft refused or that failed otherwise.
    pub sync_failures: Counter,
    /// Time from snapshot to applied ruleset, seconds.
    pub sync_duration: Family<SyncLabels, Histogram, fn() -> Histogram>,
    /// Times the live table differed from what was applied and was restored.
    pub drift_repairs: Counter,
    /// VMs of this worker in the table.
    pub vms: Gauge,
}

impl Metrics {
    /// Registers every metric under `vmedge_worker_`.
    pub fn register(registry: &mut Registry) -> std::sync::Arc<Metrics> {
        let metrics = Metrics {
            syncs: Family::default(),
            sync_failures: Counter::default(),
            sync_duration: Family::new_with_constructor(sync_histogram),
            drift_repairs: Counter::default(),
            vms: Gauge::default(),
        };
        let sub = registry.sub_registry_with_prefix("vmedge_worker");
        sub.register(
            "syncs",
            "Syncs that changed the table, by kind",
            metrics.syncs.clone(),
        );
        sub.register(
            "sync_failures",
            "Syncs that failed (the previous ruleset stayed)",
            metrics.sync_failures.clone(),
        );
        sub.register(
            "sync_duration_seconds",
            "Time to compile and apply a sync",
            metrics.sync_duration.clone(),
        );
        sub.register(
            "drift_repairs",
            "Times the live table was found changed by hand and restored",
            metrics.drift_repairs.clone(),
        );
        sub.register(
            "vms",
            "VMs of this worker in the table",
            metrics.vms.clone(),
        );
        std::sync::Arc::new(metrics)
    }
}
