//! Errors of the registry: each names the source (file path, etcd endpoints) it is about.

use std::path::PathBuf;

use vmedge_model::ModelError;

/// Why a state could not be loaded or watched.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The state file could not be read.
    #[error("{}: cannot read the state file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The state file is not JSON.
    #[error("{}:{line}:{column}: not valid JSON: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// The state file breaks the platform's rules; every error with its JSON path.
    #[error("{}: {} error{}:\n{errors}", path.display(), errors.len(), if errors.len() == 1 { "" } else { "s" })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every error of the document.
        errors: vmedge_model::FieldErrors,
    },
    /// No etcd member could be read from (or the watch could not be started).
    #[error("etcd {endpoints}: {message}")]
    Etcd {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What went wrong, per endpoint.
        message: String,
    },
    /// The file watcher could not be set up.
    #[error("{}: cannot watch the state file: {source}", path.display())]
    Watch {
        /// The file.
        path: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
}

impl RegistryError {
    pub(crate) fn from_model(path: PathBuf, e: ModelError) -> Self {
        match e {
            ModelError::Syntax {
                line,
                column,
                message,
            } => RegistryError::Syntax {
                path,
                line,
                column,
                message,
            },
            ModelError::Invalid(errors) => RegistryError::Invalid { path, errors },
        }
    }
}
