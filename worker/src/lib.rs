//! The worker agent: keeps this worker's `table inet vmedge` in step with the registry.
//!
//! # Layout
//! - [`reconcile`]: [`Reconciler`], one sync or drift check at a time, no I/O of its own
//!   beyond the [`FirewallBackend`](vmedge_firewall::FirewallBackend) it drives.
//! - [`metrics`]: the agent's Prometheus metrics.
//! - [`run`] (this file): the loop: a full sync at start, a sync on every registry change,
//!   a drift check (and retry of a failed sync) on an interval, until shutdown.
//!
//! The state is validated before the registry publishes it, so an invalid state never
//! reaches the agent: the table keeps the last good ruleset.

pub mod metrics;
pub mod reconcile;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::Metrics;
pub use reconcile::{Reconciler, Synced};
use vmedge_firewall::FirewallBackend;
use vmedge_registry::{Registry, Snapshot};

/// Runs the agent until `shutdown` completes. nft is a short blocking call, made on a
/// blocking-capable thread so the runtime's other tasks keep going.
pub async fn run<B>(
    mut reconciler: Reconciler<B>,
    registry: Arc<dyn Registry>,
    drift_interval: Duration,
    shutdown: impl Future<Output = ()>,
) where
    B: FirewallBackend + Send + 'static,
{
    let mut changes = registry.subscribe();
    let mut tick = tokio::time::interval(drift_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: the start sync below covers it
    let snapshot = changes.borrow_and_update().clone();
    sync_logged(&mut reconciler, &snapshot);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = changes.borrow_and_update().clone();
                sync_logged(&mut reconciler, &snapshot);
            }
            _ = tick.tick() => {
                let snapshot = registry.snapshot();
                if reconciler.needs_full_sync() {
                    sync_logged(&mut reconciler, &snapshot);
                } else {
                    drift_logged(&mut reconciler, &snapshot);
                }
            }
        }
    }
    tracing::info!("worker agent stopped; the kernel keeps the last ruleset");
}

fn sync_logged<B: FirewallBackend>(reconciler: &mut Reconciler<B>, snapshot: &Snapshot) {
    let generation = snapshot.generation();
    match tokio::task::block_in_place(|| reconciler.sync(snapshot)) {
        Ok(Synced::Unchanged) => tracing::debug!(generation, "firewall already in step"),
        Ok(Synced::Full { vms }) => tracing::info!(generation, vms, "firewall synced in full"),
        Ok(Synced::Incremental) => tracing::info!(generation, "firewall updated for changed VMs"),
        Err(e) => tracing::error!(
            generation,
            "firewall sync failed; the previous ruleset stays in force: {e}"
        ),
    }
}

fn drift_logged<B: FirewallBackend>(reconciler: &mut Reconciler<B>, snapshot: &Snapshot) {
    match tokio::task::block_in_place(|| reconciler.check_drift(snapshot)) {
        Ok(None) => {}
        Ok(Some(drift)) => {
            tracing::warn!(%drift, "the firewall table was changed outside vmedge; restored")
        }
        Err(e) => tracing::error!("firewall drift check failed: {e}"),
    }
}
