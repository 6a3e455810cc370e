//! The per-worker DNS gate: each VM's DNS policy, a shared cache, and the fqdn firewall
//! sets filled before an answer leaves.
//!
//! # Layout
//! - [`gate`]: [`Gate`], one query start to finish: source -> VM (REFUSED for anyone
//!   else), rate budget, policy on the name, cache or upstream, policy on every CNAME
//!   target, rebinding filter, fqdn set insert (SERVFAIL when not confirmed in time),
//!   size cap with TC.
//! - [`policy`]: [`VmView`], a VM's dns policy and fqdn patterns as hashed indexes, built
//!   once per change; block_bypass names (`data/doh-hostnames.txt`).
//! - [`names`]: pattern matching at one hash lookup per label.
//! - [`cache`]: answers by question, TTLs counted down, negative caching, serve-stale.
//! - [`upstream`]: forwarding over UDP with TCP on truncation, with spoofing defences.
//! - [`sets`]: the [`SetWriter`] seam; [`NetlinkSets`] commits one nf_tables batch per
//!   answer from a thread of its own.
//! - [`server`]: UDP and TCP listeners with a bound on queries in flight.
//! - [`metrics`]: the `vmedge_dns_*` counters and histograms.
//!
//! A query's path: `server` -> `Gate::handle()` -> `VmView::verdict()` -> `Cache::get()`
//! or `Upstream::query()` -> `SetWriter::insert()` -> the answer.

pub mod cache;
pub mod confirmed;
pub mod gate;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod server;
pub mod sets;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use cache::CacheConfig;
pub use gate::{Gate, GateConfig, Transport};
pub use metrics::Metrics;
pub use policy::VmView;
pub use server::{serve, Listeners, ServerConfig};
pub use sets::{NetlinkSets, NoFirewall, RecordingSets, SetError, SetWriter};
pub use upstream::UpstreamConfig;
pub use vmedge_model::RateLimit;
use vmedge_registry::Registry;

/// Keeps the gate on the registry's state in force until `shutdown` completes, and
/// sweeps the cache now and then.
pub async fn follow_registry(
    gate: Arc<Gate>,
    registry: Arc<dyn Registry>,
    shutdown: impl Future<Output = ()>,
) {
    let mut changes = registry.subscribe();
    gate.update(changes.borrow_and_update().clone());
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let snapshot = changes.borrow_and_update().clone();
                tracing::debug!(generation = snapshot.generation(), "dns gate: new state");
                gate.update(snapshot);
            }
            _ = sweep.tick() => gate.sweep_cache(),
        }
    }
}
