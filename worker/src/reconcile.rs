//! [`Reconciler`]: keeps `table inet vmedge` equal to what the snapshot says for this worker.
//!
//! The first sync, and any sync after a failure or drift, writes the whole table (and
//! deletes what the live table has beyond it); every other sync sends only the VMs that
//! changed, so its cost does not grow with the number of VMs on the worker. Between
//! syncs, [`Reconciler::check_drift`] compares the live table with what was applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use vmedge_firewall::compile::table_shape;
use vmedge_firewall::{
    assemble, compile_vm_with, update, Canonicals, CompileOptions, FirewallBackend, FirewallError,
    VmSection,
};
use vmedge_model::{Vm, VmId};
use vmedge_registry::Snapshot;

use crate::metrics::{Metrics, SyncLabels};

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// The whole table was written.
    Full {
        /// VMs in the table.
        vms: usize,
    },
    /// Only changed VMs were written.
    Incremental,
    /// Nothing had changed.
    Unchanged,
}

/// Drives a [`FirewallBackend`] from snapshots.
pub struct Reconciler<B> {
    worker: String,
    backend: B,
    options: CompileOptions,
    /// What the live table holds, as far as we know; `None` forces a full sync.
    applied: Option<BTreeMap<VmId, Arc<VmSection>>>,
    /// The VM objects the applied sections were compiled from: an unchanged VM is not
    /// compiled again, so a sync costs what changed, not what the worker holds.
    compiled_from: BTreeMap<VmId, Vm>,
    metrics: Arc<Metrics>,
}

impl<B: FirewallBackend> Reconciler<B> {
    /// A reconciler for `worker`; nothing is applied until the first [`Reconciler::sync`].
    pub fn new(
        worker: impl Into<String>,
        backend: B,
        options: CompileOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reconciler {
            worker: worker.into(),
            backend,
            options,
            applied: None,
            compiled_from: BTreeMap::new(),
            metrics,
        }
    }

    /// Brings the table in line with `snapshot`. On error the live table keeps its last
    /// good ruleset (nft transactions are all or nothing) and the next sync is a full one.
    pub fn sync(&mut self, snapshot: &Snapshot) -> Result<Synced, FirewallError> {
        let started = Instant::now();
        let mut next: BTreeMap<VmId, Arc<VmSection>> = BTreeMap::new();
        let mut recompiled: Vec<&Vm> = Vec::new();
        let mut canonicals = Canonicals::default();
        for vm in snapshot.worker_vms(&self.worker) {
            let reuse = self
                .compiled_from
                .get(&vm.id)
                .filter(|old| *old == vm)
                .and_then(|_| self.applied.as_ref().and_then(|a| a.get(&vm.id)).cloned());
            let section = match reuse {
                Some(section) => section,
                None => {
                    recompiled.push(vm);
                    Arc::new(compile_vm_with(vm, &mut canonicals))
                }
            };
            next.insert(vm.id, section);
        }
        let result = match &self.applied {
            Some(previous) => match update(previous, &next, &self.options) {
                None => return Ok(Synced::Unchanged),
                Some(update) => self
                    .backend
                    .apply_update(&update)
                    .map(|()| Synced::Incremental),
            },
            None => {
                let sections: Vec<&VmSection> = next.values().map(|s| &**s).collect();
                let ruleset = assemble(&self.worker, &sections, &self.options);
                self.backend.apply(&ruleset).map(|()| Synced::Full {
                    vms: sections.len(),
                })
            }
        };
        match result {
            Ok(synced) => {
                let kind = if matches!(synced, Synced::Full { .. }) {
                    "full"
                } else {
                    "incremental"
                };
                self.metrics.syncs.get_or_create(&SyncLabels { kind }).inc();
                self.metrics
                    .sync_duration
                    .get_or_create(&SyncLabels { kind })
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.vms.set(next.len() as i64);
                self.compiled_from.retain(|id, _| next.contains_key(id));
                for vm in recompiled {
                    self.compiled_from.insert(vm.id, vm.clone());
                }
                self.applied = Some(next);
                Ok(synced)
            }
            Err(e) => {
                self.metrics.sync_failures.inc();
                self.applied = None;
                Err(e)
            }
        }
    }

    /// True when the last sync failed (or none ran): the next one will be full.
    pub fn needs_full_sync(&self) -> bool {
        self.applied.is_none()
    }

    /// Compares the live table with what was applied; on a difference, writes the whole
    /// table again. Returns what differed, if anything.
    pub fn check_drift(&mut self, snapshot: &Snapshot) -> Result<Option<String>, FirewallError> {
        let Some(applied) = &self.applied else {
            return Ok(None);
        };
        let live = self.backend.live_table()?;
        let expected = table_shape(applied.values().map(Arc::as_ref), &self.options);
        let (expected_objects, expected_rules) = (expected.objects, expected.rules);
        let drift = if live.objects != expected_objects {
            let missing = expected_objects.difference(&live.objects).count();
            let extra = live.objects.difference(&expected_objects).count();
            Some(format!("{missing} objects missing, {extra} unexpected"))
        } else {
            expected_rules
                .iter()
                .find(|(chain, n)| live.rules.get(*chain) != Some(n))
                .map(|(chain, n)| {
                    format!(
                        "chain {chain} has {} rules, {n} expected",
                        live.rules.get(chain).copied().unwrap_or(0)
                    )
                })
        };
        let Some(drift) = drift else {
            return Ok(None);
        };
        self.applied = None;
        self.sync(snapshot)?;
        self.metrics.drift_repairs.inc();
        Ok(Some(drift))
    }
}
