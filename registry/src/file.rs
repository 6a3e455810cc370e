//! [`FileRegistry`]: the state from a JSON file, reloaded when the file changes.
//!
//! The directory is watched rather than the file, so that editors and deploy tools that
//! replace the file (write a temporary, rename it over) or swap a symlink are seen, and
//! so that a deleted file that comes back is picked up. Events are debounced; a reload
//! stats the file first and publishes only when the content really changed.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime};

use arc_swap::Guard;
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use vmedge_model::{parse_state_isolating, StandIn, State, VmId};

use crate::errors::RegistryError;
use crate::index::Snapshot;
use crate::memory::MemoryRegistry;
use crate::{Registry, Status};

/// Quiet time after the last file event before a reload: editors write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The file's content is what is already in force.
    Unchanged,
    /// A new snapshot of this generation is in force.
    Published(u64),
}

/// The file's identity and content, to tell a real change from a touch.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    content: u64,
}

/// A registry fed by one JSON state file.
pub struct FileRegistry {
    path: PathBuf,
    cell: MemoryRegistry,
    seen: Mutex<Seen>,
}

impl FileRegistry {
    /// Loads the file; an unreadable or invalid file is an error (there is nothing to serve yet).
    pub fn open(path: impl Into<PathBuf>) -> Result<FileRegistry, RegistryError> {
        let path = path.into();
        let (text, seen) = read_file(&path)?;
        let (state, quarantined) = parse(&path, &text, None)?;
        let cell = MemoryRegistry::new(format!("file:{}", path.display()), state);
        cell.set_quarantined(quarantined);
        Ok(FileRegistry {
            path,
            cell,
            seen: Mutex::new(seen),
        })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again and puts it in force if it changed and is valid. On error the
    /// snapshot in force stays, and the refusal is recorded in [`Registry::status`].
    pub fn reload(&self) -> Result<Reload, RegistryError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if looks_unchanged(&self.path, &seen) {
            return Ok(Reload::Unchanged);
        }
        let loaded = read_file(&self.path).and_then(|(text, now)| {
            if now.content == seen.content && now.len == seen.len {
                return Ok((None, now)); // touched, not changed
            }
            let in_force = self.cell.load();
            parse(&self.path, &text, Some(&in_force)).map(|parsed| (Some(parsed), now))
        });
        let (state, now) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                self.cell.refused(e.to_string());
                return Err(e);
            }
        };
        *seen = now;
        let Some((state, quarantined)) = state else {
            return Ok(Reload::Unchanged);
        };
        let snapshot = self.cell.publish_partial(state, quarantined);
        Ok(Reload::Published(snapshot.generation()))
    }

    /// [`FileRegistry::reload`], with the outcome logged: every error on its own line.
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(Reload::Unchanged) => {
                tracing::debug!(file = %self.path.display(), "state file event, content unchanged")
            }
            Ok(Reload::Published(generation)) => {
                let status = self.cell.status();
                tracing::info!(
                    file = %self.path.display(),
                    generation,
                    vms = status.vms,
                    users = status.users,
                    "state reloaded"
                );
            }
            Err(e) => log_refusal(&e, self.cell.load().generation()),
        }
    }

    /// Starts watching the file; changes are loaded until the returned watcher is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<FileWatcher, RegistryError> {
        let watch_error = |source| RegistryError::Watch {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .map_err(watch_error)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        let registry = Arc::clone(self);
        let thread = thread::Builder::new()
            .name("vmedge-state-watch".into())
            .spawn(move || watch_loop(&registry, &rx))
            .map_err(|e| watch_error(notify::Error::io(e)))?;
        tracing::info!(file = %self.path.display(), "watching the state file");
        Ok(FileWatcher {
            _watcher: watcher,
            _thread: thread,
        })
    }
}

impl Registry for FileRegistry {
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

/// Keeps a [`FileRegistry`] in step with its file; dropping it stops the watch.
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
    _thread: thread::JoinHandle<()>,
}

type Events = mpsc::Receiver<notify::Result<notify::Event>>;

fn watch_loop(registry: &FileRegistry, events: &Events) {
    // Ends when the watcher (and with it the sender) is dropped.
    while let Ok(event) = events.recv() {
        if let Err(e) = event {
            tracing::warn!(file = %registry.path.display(), error = %e, "state file watch error");
        }
        loop {
            match events.recv_timeout(DEBOUNCE) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        registry.reload_and_log();
    }
}

fn log_refusal(e: &RegistryError, generation_kept: u64) {
    match e {
        RegistryError::Invalid { path, errors } => {
            tracing::error!(
                file = %path.display(),
                errors = errors.len(),
                generation_kept,
                "state refused; still serving the last good state"
            );
            for error in errors.iter() {
                tracing::error!(file = %path.display(), "{error}");
            }
        }
        RegistryError::Read { source, path } if source.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %path.display(), generation_kept, "state file is gone; still serving the last good state");
        }
        other => tracing::error!(
            generation_kept,
            "{other}; still serving the last good state"
        ),
    }
}

/// Reads the file and fingerprints what was read.
fn read_file(path: &Path) -> Result<(String, Seen), RegistryError> {
    let read_error = |source| RegistryError::Read {
        path: path.to_path_buf(),
        source,
    };
    let modified = std::fs::metadata(path).map_err(read_error)?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    // Only tells a touch from a change; the file's writer is trusted, so no need for SipHash.
    let mut hasher = foldhash::quality::FixedState::with_seed(0).build_hasher();
    hasher.write(text.as_bytes());
    let seen = Seen {
        len: text.len() as u64,
        modified,
        content: hasher.finish(),
    };
    Ok((text, seen))
}

/// True when the file's size and modification time are what was last read.
fn looks_unchanged(path: &Path, seen: &Seen) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => {
            meta.len() == seen.len
                && seen.modified.is_some()
                && meta.modified().ok() == seen.modified
        }
        Err(_) => false,
    }
}

/// Parses the state; a VM whose own object is invalid stands in as its version in
/// `in_force` (the last good one), fenced, or not at all, and is logged with every error.
fn parse(
    path: &Path,
    text: &str,
    in_force: Option<&Snapshot>,
) -> Result<(State, Vec<VmId>), RegistryError> {
    let invalid = |e| RegistryError::from_model(path.to_path_buf(), e);
    let resolved = parse_state_isolating(text)
        .and_then(|partial| partial.resolve(|id| in_force.and_then(|s| s.vm(id)).cloned()))
        .map_err(invalid)?;
    for warning in &resolved.warnings {
        tracing::warn!(file = %path.display(), "{warning}");
    }
    for q in &resolved.quarantined {
        let vm = q.rejected.id;
        let serving = match q.stand_in {
            StandIn::LastGood => "its last good version",
            StandIn::Fenced => "a closed firewall (no last good policy)",
            StandIn::Absent => "nothing (no last good version)",
        };
        tracing::error!(
            file = %path.display(),
            %vm,
            errors = q.rejected.errors.len(),
            "VM object refused; serving {serving} in its place, every other VM updated"
        );
        for error in &q.rejected.errors {
            tracing::error!(file = %path.display(), %vm, "{error}");
        }
    }
    let quarantined = resolved.quarantined.iter().map(|q| q.rejected.id).collect();
    Ok((resolved.state, quarantined))
}
