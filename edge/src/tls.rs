//! The edge's certificate: `*.proxy.<domain>` from the config's PEM files, or a
//! self-signed one made at first start and kept in the state directory.
//!
//! The certificate in force sits behind an `ArcSwap` that rustls asks on every handshake,
//! so [`CertStore::reload`] swaps it without touching open connections. A file that does
//! not load leaves the last good certificate serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files from the config.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Self-signed for `*.proxy.<domain>`, kept in `dir` (made when absent).
    SelfSigned {
        /// The state directory.
        dir: PathBuf,
        /// The stack domain.
        domain: String,
    },
}

/// Why a certificate did not load; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the kind needed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key does not suit rustls (or the certificate).
    #[error("{path}: unusable private key: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The self-signed certificate could not be made.
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
}

/// The certificate in force, and where it came from.
#[derive(Debug)]
pub struct CertStore {
    source: CertSource,
    current: ArcSwap<CertifiedKey>,
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

/// The file names a self-signed certificate is kept under in the state directory.
pub const SELF_SIGNED_CERT: &str = "edge-cert.pem";
/// See [`SELF_SIGNED_CERT`].
pub const SELF_SIGNED_KEY: &str = "edge-key.pem";

impl CertStore {
    /// Loads the certificate (making the self-signed one if needed).
    pub fn open(source: CertSource) -> Result<Arc<CertStore>, TlsError> {
        let (cert, key) = match &source {
            CertSource::Files { cert, key } => (cert.clone(), key.clone()),
            CertSource::SelfSigned { dir, domain } => self_signed(dir, domain)?,
        };
        let loaded = load(&cert, &key)?;
        Ok(Arc::new(CertStore {
            stamp: std::sync::Mutex::new(stamps(&cert, &key)),
            source,
            current: ArcSwap::from_pointee(loaded),
        }))
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        match &self.source {
            CertSource::Files { cert, key } => (cert.clone(), key.clone()),
            CertSource::SelfSigned { dir, .. } => {
                (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY))
            }
        }
    }

    /// Reloads when either file changed since the last load. `Ok(true)` when a new
    /// certificate is in force; on error the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert, key) = self.paths();
        let now = stamps(&cert, &key);
        {
            let Ok(last) = self.stamp.lock() else {
                return Ok(false);
            };
            if *last == now || now.is_none() {
                return Ok(false);
            }
        }
        let loaded = load(&cert, &key);
        // Remember the stamps either way: a broken file is reported once, not every poll.
        if let Ok(mut last) = self.stamp.lock() {
            *last = now;
        }
        self.current.store(Arc::new(loaded?));
        Ok(true)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

fn load(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let cert_pem = std::fs::read(cert_path).map_err(io(cert_path))?;
    let key_pem = std::fs::read(key_path).map_err(io(key_path))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_path_buf(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_path_buf(),
        reason: format!("no private key: {e}"),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Key {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The kept self-signed pair, made (ECDSA P-256) when absent.
fn self_signed(dir: &Path, domain: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(SELF_SIGNED_CERT);
    let key = dir.join(SELF_SIGNED_KEY);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let names = vec![format!("*.proxy.{domain}"), format!("proxy.{domain}")];
    let made =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, made.cert.pem()).map_err(|source| TlsError::Io {
        path: cert.clone(),
        source,
    })?;
    tracing::info!(cert = %cert.display(), "made a self-signed certificate for *.proxy.{domain}");
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource::SelfSigned {
            dir: dir.path().to_path_buf(),
            domain: "example.dev".into(),
        };
        let first = CertStore::open(source.clone()).unwrap();
        let der = first.current.load().cert[0].clone();
        let again = CertStore::open(source).unwrap();
        assert_eq!(again.current.load().cert[0], der, "kept, not made again");
        let pem = std::fs::read_to_string(dir.path().join(SELF_SIGNED_CERT)).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn a_bad_file_is_named_and_the_old_certificate_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::open(CertSource::SelfSigned {
            dir: dir.path().to_path_buf(),
            domain: "example.dev".into(),
        })
        .unwrap();
        let before = store.current.load_full();
        let cert = dir.path().join(SELF_SIGNED_CERT);
        std::fs::write(&cert, "not a certificate").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&cert)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let e = store.reload_if_changed().unwrap_err();
        assert!(e.to_string().contains("edge-cert.pem"), "{e}");
        assert!(Arc::ptr_eq(&before, &store.current.load_full()));
        assert!(!store.reload_if_changed().unwrap(), "reported once");
    }

    #[test]
    fn files_that_do_not_exist_are_named() {
        let e = CertStore::open(CertSource::Files {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/cert.pem"), "{e}");
    }
}
