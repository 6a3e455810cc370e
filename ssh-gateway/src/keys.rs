//! The gateway's own keys and what it accepts from others.
//!
//! - Its host key and its user CA are made at first start and kept in the state directory
//!   (OpenSSH private key files, mode 0600), so clients' `known_hosts` and VM images'
//!   `TrustedUserCAKeys` stay valid across restarts.
//! - [`UserCa::issue`] signs the short-lived certificate the gateway logs in to a VM with.
//! - [`USER_KEY_ALGORITHMS`]: the signature algorithms users may authenticate with.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{self, Algorithm, Certificate, EcdsaCurve, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use vmedge_model::Fingerprint;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file exists but is not a usable private key.
    #[error("{path}: not an OpenSSH private key without passphrase: {reason}")]
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The key could not be made or written.
    #[error("{path}: cannot create: {reason}")]
    Create {
        /// The key file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A certificate could not be signed.
    #[error("cannot sign a certificate: {0}")]
    Sign(String),
}

/// The signature algorithms users authenticate with: ed25519, ECDSA P-256/384/521, RSA with
/// SHA-2 only (`ssh-rsa`, SHA-1, is left out and refused), and both FIDO2 types, which
/// russh's default list leaves out. Also the list advertised in `server-sig-algs`.
pub const USER_KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::SkEd25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::SkEcdsaSha2NistP256,
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Smallest RSA modulus accepted from a user, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Whether a user may sign in with `algorithm` (the one named in the request).
pub fn user_algorithm_accepted(algorithm: &Algorithm) -> bool {
    USER_KEY_ALGORITHMS.contains(algorithm)
}

/// Whether the key itself is strong enough (RSA: at least [`MIN_RSA_BITS`]).
pub fn user_key_strong_enough(key: &PublicKey) -> bool {
    match key.key_data().rsa() {
        Some(rsa) => rsa.key_size() as usize >= MIN_RSA_BITS,
        None => true,
    }
}

/// A key's SHA256 fingerprint in the model's type (the registry is indexed by it).
pub fn fingerprint(key: &PublicKey) -> Fingerprint {
    match key.fingerprint(HashAlg::Sha256) {
        ssh_key::Fingerprint::Sha256(bytes) => Fingerprint::from_bytes(bytes),
        // Asked for SHA256 above; ssh-key has no other answer for it.
        _ => Fingerprint::from_bytes([0; 32]),
    }
}

/// Loads the ed25519 private key at `path`, or makes one there (mode 0600) when the file
/// does not exist. An existing file that cannot be read is an error, never replaced.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, KeyError> {
    if path.exists() {
        return russh::keys::load_secret_key(path, None).map_err(|e| KeyError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        });
    }
    let create = |reason: String| KeyError::Create {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| create(e.to_string()))?;
    }
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| create(e.to_string()))?;
    // Written under a temporary name and renamed: a crash never leaves half a key behind.
    let tmp = path.with_extension("tmp");
    key.write_openssh_file(&tmp, LineEnding::LF)
        .map_err(|e| create(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| create(e.to_string()))?;
    Ok(key)
}

/// Loads a private key that must exist (a configured static key).
pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
    russh::keys::load_secret_key(path, None).map_err(|e| KeyError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Who a login certificate is for; its key id names them in the VM's sshd log.
#[derive(Debug, Clone)]
pub struct CertSubject<'a> {
    /// The platform user.
    pub user_id: &'a str,
    /// The gateway session.
    pub session_id: &'a str,
    /// The user's key fingerprint.
    pub fingerprint: &'a Fingerprint,
}

/// The gateway's user certificate authority: VM images trust it with `TrustedUserCAKeys`.
#[derive(Debug)]
pub struct UserCa {
    key: PrivateKey,
}

/// A fresh key and the certificate that lets it in as the login user.
#[derive(Debug)]
pub struct LoginCredential {
    /// The ephemeral private key (made for this connection only).
    pub key: PrivateKey,
    /// Its certificate.
    pub certificate: Certificate,
}

impl UserCa {
    /// The CA with this private key.
    pub fn new(key: PrivateKey) -> UserCa {
        UserCa { key }
    }

    /// The CA's public key.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The lines an image needs to trust this CA: the public key file and sshd_config.
    pub fn image_instructions(&self) -> Result<String, KeyError> {
        let public = self
            .public_key()
            .to_openssh()
            .map_err(|e| KeyError::Sign(e.to_string()))?;
        Ok(format!(
            "# /etc/ssh/vmedge_user_ca.pub\n{public} vmedge-user-ca\n\n\
             # /etc/ssh/sshd_config\nTrustedUserCAKeys /etc/ssh/vmedge_user_ca.pub\n\
             # the key id (user and session) appears in sshd's log; LogLevel VERBOSE adds the serial\n"
        ))
    }

    /// An ephemeral ed25519 key and a user certificate for it: principal `login_user`,
    /// key id naming the user and session, `source-address` = `source`, valid from a minute
    /// ago (clock skew) for `lifetime`.
    pub fn issue(
        &self,
        subject: &CertSubject<'_>,
        login_user: &str,
        source: IpAddr,
        lifetime: Duration,
    ) -> Result<LoginCredential, KeyError> {
        let sign = |e: ssh_key::Error| KeyError::Sign(e.to_string());
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(sign)?;
        let now = SystemTime::now();
        let mut builder = Builder::new_with_validity_times(
            rand::random::<[u8; 32]>().to_vec(),
            key.public_key().key_data().clone(),
            now - Duration::from_secs(60),
            now + lifetime,
        )
        .map_err(sign)?;
        builder
            .serial(rand::random::<u64>())
            .map_err(sign)?
            .cert_type(CertType::User)
            .map_err(sign)?
            .key_id(format!(
                "vmedge user={} session={} key={}",
                subject.user_id, subject.session_id, subject.fingerprint
            ))
            .map_err(sign)?
            .valid_principal(login_user)
            .map_err(sign)?
            .critical_option("source-address", source.to_string())
            .map_err(sign)?;
        // An OpenSSH user certificate grants nothing it does not name.
        for extension in ["permit-pty", "permit-port-forwarding", "permit-user-rc"] {
            builder.extension(extension, "").map_err(sign)?;
        }
        let certificate = builder.sign(&self.key).map_err(sign)?;
        Ok(LoginCredential { key, certificate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host_key");
        let made = load_or_create(&path).unwrap();
        let again = load_or_create(&path).unwrap();
        assert_eq!(made.public_key(), again.public_key());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key file readable by others: {mode:o}");
    }

    #[test]
    fn a_broken_key_file_is_an_error_naming_it_and_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_key");
        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("host_key"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
    }

    #[test]
    fn login_certificates_name_the_user_and_validate_against_the_ca() {
        let ca = UserCa::new(PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap());
        let fp = Fingerprint::from_bytes([7; 32]);
        let subject = CertSubject {
            user_id: "u-1",
            session_id: "s-42",
            fingerprint: &fp,
        };
        let source: IpAddr = "fd5e:ed00::1".parse().unwrap();
        let cred = ca
            .issue(&subject, "root", source, Duration::from_secs(300))
            .unwrap();
        let cert = &cred.certificate;
        cert.validate([&ca.public_key().fingerprint(HashAlg::Sha256)])
            .unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_principals(), ["root".to_string()]);
        assert!(cert.key_id().contains("user=u-1") && cert.key_id().contains("session=s-42"));
        assert_eq!(
            cert.critical_options()
                .get("source-address")
                .map(String::as_str),
            Some("fd5e:ed00::1")
        );
        assert!(cert.extensions().contains_key("permit-pty"));
        assert_eq!(cert.public_key(), cred.key.public_key().key_data());
        assert!(ca
            .image_instructions()
            .unwrap()
            .contains("TrustedUserCAKeys"));
    }

    /// Security keys sign `sha256(application) || flags || counter || sha256(message)`
    /// (OpenSSH PROTOCOL.u2f); no authenticator here, so the test plays one with a plain
    /// ed25519 key, and checks the verifier russh calls on a user's signature.
    #[test]
    fn security_key_signatures_are_verified() {
        use russh::keys::signature::{Signer, Verifier};
        use ssh_key::private::Ed25519Keypair;
        use ssh_key::public::{KeyData, SkEd25519};
        use ssh_key::Signature;

        let authenticator = Ed25519Keypair::random(&mut rand::rng());
        let public = PublicKey::new(
            KeyData::SkEd25519(SkEd25519::new(authenticator.public, "ssh:")),
            "",
        );
        assert!(user_algorithm_accepted(&public.algorithm()));
        let message = b"session id || SSH_MSG_USERAUTH_REQUEST ...";
        let sign = |flags_and_counter: [u8; 5]| {
            let mut signed = HashAlg::Sha256.digest(b"ssh:");
            signed.extend(flags_and_counter);
            signed.extend(HashAlg::Sha256.digest(message));
            let raw: Signature = authenticator.sign(&signed);
            let mut data = raw.as_bytes().to_vec();
            data.extend(flags_and_counter);
            Signature::new(Algorithm::SkEd25519, data).unwrap()
        };
        let good = sign([0x01, 0, 0, 0, 7]);
        assert!(Verifier::verify(&public, message, &good).is_ok());
        // The counter (or presence flag) is covered by the signature.
        let mut tampered = good.as_bytes().to_vec();
        *tampered.last_mut().unwrap() = 8;
        let tampered = Signature::new(Algorithm::SkEd25519, tampered).unwrap();
        assert!(Verifier::verify(&public, message, &tampered).is_err());
        assert!(Verifier::verify(&public, b"another message", &good).is_err());
    }

    #[test]
    fn sha1_rsa_signatures_are_not_accepted() {
        assert!(!user_algorithm_accepted(&Algorithm::Rsa { hash: None }));
        assert!(user_algorithm_accepted(&Algorithm::Rsa {
            hash: Some(HashAlg::Sha256)
        }));
        assert!(user_algorithm_accepted(&Algorithm::SkEd25519));
    }
}
