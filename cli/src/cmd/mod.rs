//! One module per subcommand.

pub mod config;
pub mod dns;
pub mod edge;
pub mod firewall;
pub mod ssh;
pub mod state;
pub mod up;
pub mod worker;

use std::io::Read;
use std::path::Path;

use std::sync::Arc;

use anyhow::Context;
use vmedge_registry::{
    EtcdRegistry, EtcdWatcher, FileRegistry, FileWatcher, Registry, RegistryError,
};

use crate::config::{Config, RegistrySource};

/// The config's state source, opened: the registry every server reads, and how to keep
/// it following its source.
pub struct Source {
    registry: Arc<dyn Registry>,
    follow: Follow,
}

enum Follow {
    File(Arc<FileRegistry>),
    Etcd(Arc<EtcdRegistry>),
}

/// Keeps a [`Source`]'s registry following the file or etcd; dropping it stops that.
#[allow(dead_code)] // held for its Drop, never read
pub enum Following {
    /// The file watcher.
    File(FileWatcher),
    /// The etcd watch thread.
    Etcd(EtcdWatcher),
}

impl Source {
    /// The registry to read the state through.
    pub fn registry(&self) -> Arc<dyn Registry> {
        self.registry.clone()
    }

    /// Starts following the source (a file's changes, etcd's watch), and trimming the
    /// heap after each change (see `memory.rs`).
    pub fn watch(&self) -> Result<Following, RegistryError> {
        if let Err(e) = crate::memory::trim_after_changes(self.registry.subscribe()) {
            tracing::warn!(error = %e, "cannot start the heap trimmer; memory freed by state changes may stay resident");
        }
        match &self.follow {
            Follow::File(file) => file.watch().map(Following::File),
            Follow::Etcd(etcd) => etcd.watch().map(Following::Etcd),
        }
    }
}

/// Opens the config's state source; `None` (errors printed) when a state file is invalid.
/// An etcd registry opens when a member answers; its invalid keys are refused one by one.
pub fn open_registry(config: &Config) -> anyhow::Result<Option<Source>> {
    match &config.registry {
        RegistrySource::File(path) => match FileRegistry::open(path) {
            Ok(r) => {
                let file = Arc::new(r);
                Ok(Some(Source {
                    registry: file.clone(),
                    follow: Follow::File(file),
                }))
            }
            Err(e @ (RegistryError::Invalid { .. } | RegistryError::Syntax { .. })) => {
                eprintln!("{e}");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        },
        RegistrySource::Etcd(endpoints) => {
            let etcd = Arc::new(EtcdRegistry::open(endpoints.clone())?);
            Ok(Some(Source {
                registry: etcd.clone(),
                follow: Follow::Etcd(etcd),
            }))
        }
    }
}

/// The multi-threaded runtime the servers run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A future that completes on SIGINT or SIGTERM. The handlers are registered here, when
/// this is called (inside the runtime), not when the future is first polled: a signal
/// that comes between start-up and the first await must not kill the process outright.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Completes when `stop` turns true: the shutdown future each server task is given.
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads a file, or standard input for "-".
pub fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Reads and validates a state file; prints its warnings, or every error and `None`.
pub fn load_state(path: &Path) -> anyhow::Result<Option<vmedge_model::State>> {
    Ok(check_state(path, &read_input(path)?))
}

/// Validates a state document read from `path`; prints its warnings, or every error and `None`.
pub fn check_state(path: &Path, text: &str) -> Option<vmedge_model::State> {
    match vmedge_model::parse_state(text) {
        Ok(parsed) => {
            print_warnings(path, &parsed.warnings);
            Some(parsed.value)
        }
        Err(e) => {
            print_model_error(path, &e);
            None
        }
    }
}

/// Prints a refused document: `FILE:LINE:COL: ...` for syntax, else a count and one error per line.
pub fn print_model_error(origin: &Path, error: &vmedge_model::ModelError) {
    match error {
        vmedge_model::ModelError::Syntax {
            line,
            column,
            message,
        } => {
            eprintln!(
                "{}:{line}:{column}: not valid JSON: {message}",
                origin.display()
            );
        }
        vmedge_model::ModelError::Invalid(errors) => {
            let n = errors.len();
            eprintln!(
                "{}: {n} error{}:",
                origin.display(),
                if n == 1 { "" } else { "s" }
            );
            for e in errors.iter() {
                eprintln!("  {e}");
            }
        }
    }
}

/// Prints warnings of an accepted document.
pub fn print_warnings(origin: &Path, warnings: &[vmedge_model::FieldError]) {
    for w in warnings {
        eprintln!("{}: warning: {w}", origin.display());
    }
}
