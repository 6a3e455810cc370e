//! Where the state comes from, and fast lookups into it.
//!
//! # Layout
//! - [`Registry`] (this file): the one seam every server reads the state through.
//! - [`index`]: [`Snapshot`], an immutable state with its indexes: (service, vm) ->
//!   route, vm id -> VM, source address -> VM, key fingerprint -> user, worker -> VMs.
//!   Lookups allocate nothing.
//! - [`memory`]: [`MemoryRegistry`], the cell every source publishes through (arc-swap
//!   for lock-free reads, a watch channel for subscribers); a registry of its own in tests.
//! - [`file`]: [`FileRegistry`], a JSON state file, reloaded when it changes (notify). An
//!   invalid document is refused as a whole and the last good snapshot keeps serving,
//!   except that an error confined to one VM object quarantines that VM only.
//! - [`keyed`]: [`keyed::KeyedState`], the state as one object per key (etcd's layout),
//!   changed key by key: a refused value keeps its key's last good object.
//! - [`etcd`]: [`EtcdRegistry`], the keys under `/vmedge/` read at one revision and
//!   watched from the next; a lost watch is a full resync; an outage serves the last state.
//! - [`errors`]: [`RegistryError`], naming the file it is about.
//!
//! A request's path: `Registry::load()` -> `Snapshot::route_host()` -> `Route::target()`.

pub mod errors;
pub mod etcd;
pub mod file;
pub mod index;
pub mod keyed;
pub mod memory;

use std::sync::Arc;
use std::time::SystemTime;

pub use arc_swap::Guard;
pub use errors::RegistryError;
pub use etcd::{EtcdRegistry, EtcdWatcher};
pub use file::{FileRegistry, FileWatcher, Reload};
pub use index::{Route, RouteError, Snapshot};
pub use memory::MemoryRegistry;
pub use tokio::sync::watch;

/// The state in force, wherever it comes from (a file, etcd, memory).
pub trait Registry: Send + Sync {
    /// The snapshot in force. Lock-free and allocation-free: call it once per request
    /// and keep the guard for that request only (hold an `Arc` from [`Registry::snapshot`]
    /// across long waits instead).
    fn load(&self) -> Guard<Arc<Snapshot>>;

    /// The snapshot in force, as an owned `Arc`.
    fn snapshot(&self) -> Arc<Snapshot>;

    /// A receiver that sees each new snapshot as it is put in force. Consumers that must
    /// act on changes (the worker agent, the DNS gate) wait on `changed()`.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;

    /// Where states come from and how loading went, for logs, metrics and health checks.
    fn status(&self) -> Status;
}

/// How a registry is doing.
#[derive(Debug, Clone)]
pub struct Status {
    /// Where states come from, e.g. `file:examples/state.json`.
    pub source: String,
    /// Generation of the snapshot in force.
    pub generation: u64,
    /// When the snapshot in force was put in force.
    pub loaded_at: SystemTime,
    /// VMs in the snapshot in force.
    pub vms: usize,
    /// Users in the snapshot in force.
    pub users: usize,
    /// States refused since start.
    pub refusals: u64,
    /// Why the last refused state was refused.
    pub last_refusal: Option<String>,
    /// VMs of the state in force whose own object was invalid: each is served as its
    /// last good version, fenced, or not at all (see [`vmedge_model::StandIn`]).
    pub quarantined: Vec<vmedge_model::VmId>,
    /// Why the source does not answer (etcd: no member is followed), while it does not;
    /// the snapshot in force keeps serving meanwhile. See [`Status::source_up`].
    pub source_error: Option<String>,
    /// Full re-reads of the source after a lost watch.
    pub resyncs: u64,
}

impl Status {
    fn new(source: String, snapshot: &Snapshot) -> Status {
        let mut status = Status {
            source,
            generation: 0,
            loaded_at: SystemTime::now(),
            vms: 0,
            users: 0,
            refusals: 0,
            last_refusal: None,
            quarantined: Vec::new(),
            source_error: None,
            resyncs: 0,
        };
        status.published(snapshot);
        status
    }

    /// The source answers.
    pub fn source_up(&self) -> bool {
        self.source_error.is_none()
    }

    fn published(&mut self, snapshot: &Snapshot) {
        self.generation = snapshot.generation();
        self.loaded_at = snapshot.loaded_at();
        self.vms = snapshot.vms().len();
        self.users = snapshot.users().len();
    }
}
