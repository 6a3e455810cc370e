//! [`MemoryRegistry`]: the cell every source publishes through, and a registry of its own
//! for tests and for states built in code.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;
use vmedge_model::{State, User, Vm, VmId};

use crate::index::Snapshot;
use crate::{Registry, Status};

/// Holds the snapshot in force; publishing swaps it atomically and tells subscribers.
pub struct MemoryRegistry {
    current: ArcSwap<Snapshot>,
    changes: watch::Sender<Arc<Snapshot>>,
    status: Mutex<Status>,
}

impl MemoryRegistry {
    /// A registry serving `state` as generation 1. `source` says where states come from, for logs.
    pub fn new(source: impl Into<String>, state: State) -> MemoryRegistry {
        let vms = state.vms.into_iter().map(Arc::new).collect();
        MemoryRegistry::from_parts(source, vms, state.users)
    }

    /// [`MemoryRegistry::new`] from VMs that may be shared with another snapshot.
    pub fn from_parts(
        source: impl Into<String>,
        vms: Vec<Arc<Vm>>,
        users: Vec<User>,
    ) -> MemoryRegistry {
        let snapshot = Arc::new(Snapshot::from_parts(vms, users, 1));
        let status = Status::new(source.into(), &snapshot);
        MemoryRegistry {
            current: ArcSwap::new(snapshot.clone()),
            changes: watch::Sender::new(snapshot),
            status: Mutex::new(status),
        }
    }

    /// Indexes `state` as the next generation and puts it in force.
    pub fn publish(&self, state: State) -> Arc<Snapshot> {
        self.publish_partial(state, Vec::new())
    }

    /// [`MemoryRegistry::publish`] for a state in which `quarantined` VMs stand in for
    /// invalid objects.
    pub fn publish_partial(&self, state: State, quarantined: Vec<VmId>) -> Arc<Snapshot> {
        let vms = state.vms.into_iter().map(Arc::new).collect();
        self.publish_parts(vms, state.users, quarantined)
    }

    /// [`MemoryRegistry::publish_partial`] from VMs that may be shared with the snapshot
    /// in force (only what changed is new).
    pub fn publish_parts(
        &self,
        vms: Vec<Arc<Vm>>,
        users: Vec<User>,
        quarantined: Vec<VmId>,
    ) -> Arc<Snapshot> {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = Arc::new(Snapshot::from_parts(vms, users, status.generation + 1));
        status.published(&snapshot);
        status.quarantined = quarantined;
        self.current.store(snapshot.clone());
        self.changes.send_replace(snapshot.clone());
        snapshot
    }

    /// Records which VMs of the snapshot in force stand in for invalid objects.
    pub(crate) fn set_quarantined(&self, quarantined: Vec<VmId>) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.quarantined = quarantined;
    }

    /// Records that the source stopped answering; true when it was up until now.
    pub fn set_source_down(&self, why: String) -> bool {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.source_error.replace(why).is_none()
    }

    /// Records that the source answers again; true when it was down until now.
    pub fn set_source_up(&self) -> bool {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.source_error.take().is_some()
    }

    /// Records a full re-read of the source.
    pub fn resynced(&self) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.resyncs += 1;
    }

    /// Records that a new state was refused; the snapshot in force stays.
    pub fn refused(&self, why: String) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.refusals += 1;
        status.last_refusal = Some(why);
    }
}

impl Registry for MemoryRegistry {
    fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.changes.subscribe()
    }

    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_swaps_and_notifies() {
        let registry = MemoryRegistry::new("test", State::default());
        let mut changes = registry.subscribe();
        assert_eq!(registry.load().generation(), 1);
        let text = include_str!("../../examples/state.json");
        registry.publish(vmedge_model::parse_state(text).unwrap().value);
        changes.changed().await.unwrap();
        assert_eq!(changes.borrow_and_update().generation(), 2);
        assert_eq!(registry.load().vms().len(), 9);
        registry.refused("bad".into());
        let status = registry.status();
        assert_eq!((status.generation, status.vms, status.refusals), (2, 9, 1));
        assert_eq!(status.last_refusal.as_deref(), Some("bad"));
    }
}
