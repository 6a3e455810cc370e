//! [`EtcdRegistry`]: the state from etcd, one key per object (DESIGN.md, "The state"),
//! followed with a watch.
//!
//! Start: every key under `/vmedge/` is read at one revision (in pages), then watched
//! from the next. A lost watch (the member died, lost its leader, or compacted past us)
//! ends the session; the next one connects to the next endpoint and resyncs in full,
//! which also catches whatever changed while nobody was listening. While no member
//! answers, the last good snapshot keeps serving and [`Registry::status`] says so
//! (`source_error`), and the outage is logged once, and its end.
//!
//! One endpoint at a time, in turn, rather than a balanced channel: a dead member is
//! found by a refused connect or a missed HTTP/2 keepalive, and the next one is tried
//! at once; only when every member has failed in a row does the loop back off.
//! Reads are linearizable and the watch requires a leader, so a member cut off from
//! its quorum is treated as down rather than served from.
//!
//! The follower runs on a thread of its own with a small runtime, like the file
//! watcher, so every server can use it whatever runtime it runs on.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use arc_swap::Guard;
use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::sync::watch;

use crate::errors::RegistryError;
use crate::index::Snapshot;
use crate::keyed::{Applied, Change, KeyedState, Objects, PREFIX};
use crate::memory::MemoryRegistry;
use crate::{Registry, Status};

mod store;

pub use store::{connect, pull, push, read_all, Keys, Pushed};
use store::{etcd_error, first_answer, MAX_MESSAGE, REQUEST_TIMEOUT};

/// Back-off after each round in which every member failed: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// A registry fed by etcd.
pub struct EtcdRegistry {
    endpoints: Vec<String>,
    cell: MemoryRegistry,
    /// Which keys are refused; the objects are the snapshot's, lent to each batch.
    keys: Mutex<KeyedState>,
    /// The store revision the snapshot in force reflects.
    revision: AtomicI64,
}

impl EtcdRegistry {
    /// Reads the whole state from the first member that answers. Fails only when none
    /// does (there is nothing to serve yet); invalid keys are refused one by one.
    pub async fn connect(endpoints: Vec<String>) -> Result<EtcdRegistry, RegistryError> {
        if endpoints.is_empty() {
            return Err(etcd_error(&endpoints, "no endpoint given".into()));
        }
        let source = format!("etcd:{}", endpoints.join(","));
        let (_, all, revision) = first_answer(&endpoints).await?;
        let mut keys = KeyedState::new();
        let mut applied = keys.replace_all(Objects::default(), all);
        let Objects { vms, users } = std::mem::take(&mut applied.objects);
        let counts = (vms.len(), users.len());
        let cell = MemoryRegistry::from_parts(source, vms, users);
        let registry = EtcdRegistry {
            endpoints,
            cell,
            keys: Mutex::new(keys),
            revision: AtomicI64::new(revision),
        };
        registry.record(&applied);
        registry.cell.set_quarantined(registry.keys().quarantined());
        tracing::info!(
            revision,
            vms = counts.0,
            users = counts.1,
            "state loaded from etcd"
        );
        Ok(registry)
    }

    /// [`EtcdRegistry::connect`] for callers outside any async runtime.
    pub fn open(endpoints: Vec<String>) -> Result<EtcdRegistry, RegistryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| etcd_error(&endpoints, format!("cannot start a runtime: {e}")))?;
        runtime.block_on(EtcdRegistry::connect(endpoints))
    }

    /// The store revision the snapshot in force reflects.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Starts following etcd; changes are put in force until the returned handle is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<EtcdWatcher, RegistryError> {
        let (stop, stopped) = watch::channel(false);
        let registry = Arc::clone(self);
        let spawn_error = |e: std::io::Error| {
            etcd_error(
                &self.endpoints,
                format!("cannot start the watch thread: {e}"),
            )
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(spawn_error)?;
        thread::Builder::new()
            .name("vmedge-etcd-watch".into())
            .spawn(move || runtime.block_on(registry.follow(stopped)))
            .map_err(spawn_error)?;
        tracing::info!(endpoints = %self.endpoints.join(","), "following etcd");
        Ok(EtcdWatcher { _stop: stop })
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, KeyedState> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The objects in force, for a batch to change: the VMs shared with the snapshot in
    /// force (which keeps serving meanwhile), the users copied.
    fn current(&self) -> Objects {
        let snapshot = self.cell.load();
        Objects {
            vms: snapshot.vms().to_vec(),
            users: snapshot.users().to_vec(),
        }
    }

    /// Sessions, one after another, until told to stop.
    async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut resync = false; // connect() has just read everything
        let mut turn = 0usize;
        let mut failed_in_a_row = 0usize;
        let mut backoff = BACKOFF.0;
        loop {
            let endpoint = &self.endpoints[turn % self.endpoints.len()];
            turn += 1;
            let outcome = tokio::select! {
                outcome = self.session(endpoint, resync, &mut failed_in_a_row) => outcome,
                _ = stop.wait_for(|s| *s) => return,
            };
            resync = true;
            let error = match outcome {
                Ok(()) => "the watch stream ended".to_string(),
                Err(e) => e,
            };
            failed_in_a_row += 1;
            let n = self.endpoints.len();
            if failed_in_a_row == 1 {
                backoff = BACKOFF.0;
            }
            if failed_in_a_row < n {
                tracing::warn!(%endpoint, %error, "lost the etcd member; trying the next");
                continue;
            }
            self.went_down(endpoint, &error);
            if failed_in_a_row.is_multiple_of(n) {
                // A whole round failed: wait before the next.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }

    /// One connection to one member: resync if asked, then apply the watch's events
    /// until it fails. Returns why it ended.
    async fn session(
        &self,
        endpoint: &str,
        resync: bool,
        failed_in_a_row: &mut usize,
    ) -> Result<(), String> {
        let client = connect(endpoint).await.map_err(|e| e.to_string())?;
        if resync {
            let (all, revision) = read_all(&client).await.map_err(|e| e.to_string())?;
            let applied = self.keys().replace_all(self.current(), all);
            let changed = applied.changed;
            self.put_in_force(applied, revision);
            self.cell.resynced();
            tracing::info!(%endpoint, revision, changed, "resynced from etcd");
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision() + 1)
            .with_progress_notify();
        let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let mut stream =
            tokio::time::timeout(REQUEST_TIMEOUT, watcher.watch(PREFIX, Some(options)))
                .await
                .map_err(|_| "no answer to the watch in time".to_string())?
                .map_err(|e| e.to_string())?;
        loop {
            // Wait for a response, then take every one already there as one batch: a bulk
            // change (a push of many objects, a resync's worth of events) is put in force
            // once rather than once per response.
            let mut batch = Batch::default();
            let mut next = Some(stream.message().await);
            while let Some(message) = next {
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => return self.end(batch, Ok(())),
                    Err(e) => return self.end(batch, Err(e.to_string())),
                };
                if response.canceled() {
                    let why = match response.compact_revision() {
                        0 => format!("watch cancelled: {}", response.cancel_reason()),
                        r => format!("compacted past our revision (now at {r})"),
                    };
                    return self.end(batch, Err(why));
                }
                if response.created() {
                    *failed_in_a_row = 0;
                    self.came_up(endpoint);
                }
                batch.absorb(&response);
                next = tokio::time::timeout(Duration::ZERO, stream.message())
                    .await
                    .ok();
            }
            self.put_batch_in_force(batch);
        }
    }

    /// Puts what was read before the session ended in force, and says why it ended.
    fn end(&self, batch: Batch, why: Result<(), String>) -> Result<(), String> {
        self.put_batch_in_force(batch);
        why
    }

    fn put_batch_in_force(&self, batch: Batch) {
        if !batch.changes.is_empty() {
            let applied = self.keys().apply(self.current(), batch.changes);
            self.put_in_force(applied, batch.revision);
        }
    }

    /// Publishes the objects if the batch changed them, and records the revision.
    fn put_in_force(&self, applied: Applied, revision: i64) {
        self.record(&applied);
        if applied.changed {
            let quarantined = self.keys().quarantined();
            let Objects { vms, users } = applied.objects;
            let snapshot = self.cell.publish_parts(vms, users, quarantined);
            tracing::debug!(
                revision,
                generation = snapshot.generation(),
                "etcd change in force"
            );
        } else {
            self.cell.set_quarantined(self.keys().quarantined());
        }
        self.revision.fetch_max(revision, Ordering::AcqRel);
    }

    /// Logs and counts what a batch refused or ignored.
    fn record(&self, applied: &Applied) {
        for refusal in &applied.refusals {
            tracing::error!(
                key = %refusal.key,
                errors = refusal.errors.len(),
                "etcd value refused; serving {} in its place",
                refusal.serving
            );
            for error in &refusal.errors {
                tracing::error!(key = %refusal.key, "{error}");
            }
            self.cell.refused(refusal.to_string());
        }
        for key in &applied.ignored {
            tracing::debug!(%key, "etcd key is neither a VM nor a user; ignored");
        }
    }

    fn went_down(&self, endpoint: &str, error: &str) {
        let generation = self.cell.load().generation();
        if self.cell.set_source_down(format!("{endpoint}: {error}")) {
            tracing::warn!(%endpoint, %error, generation_kept = generation,
                "no etcd member answers; still serving the last good state");
        } else {
            tracing::debug!(%endpoint, %error, "etcd member still unreachable");
        }
    }

    fn came_up(&self, endpoint: &str) {
        if self.cell.set_source_up() {
            tracing::info!(%endpoint, revision = self.revision(), "etcd reachable again; following");
        }
    }
}

impl Registry for EtcdRegistry {
    fn load(&self) -> Guard<Arc<Snapshot>> {
        self.cell.load()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.cell.snapshot()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.cell.subscribe()
    }

    fn status(&self) -> Status {
        self.cell.status()
    }
}

/// The events of one or more watch responses, in order, and the revision they reach.
#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    revision: i64,
}

impl Batch {
    fn absorb(&mut self, response: &WatchResponse) {
        let header = response.header().map_or(0, |h| h.revision());
        self.revision = self.revision.max(header);
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            let Ok(key) = kv.key_str() else {
                tracing::warn!(key = ?kv.key(), "etcd key is not UTF-8; ignored");
                continue;
            };
            let key = key.to_string();
            self.changes.push(match event.event_type() {
                EventType::Put => Change::Put {
                    key,
                    value: kv.value().to_vec(),
                },
                EventType::Delete => Change::Delete { key },
            });
        }
    }
}

/// Keeps an [`EtcdRegistry`] following etcd; dropping it stops the watch thread.
pub struct EtcdWatcher {
    _stop: watch::Sender<bool>,
}

impl Drop for EtcdWatcher {
    fn drop(&mut self) {
        let _ = self._stop.send(true);
    }
}
