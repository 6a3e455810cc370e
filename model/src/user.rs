//! Users and their SSH keys: the gateway's key -> user -> org check.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use ssh_key::public::KeyData;
use ssh_key::{EcdsaCurve, HashAlg, PublicKey};

use crate::json::Node;
use crate::validate::{array, object, optional, required_string, string, Path, Report};

/// A key's SHA256 fingerprint; shown as `SHA256:<base64>` exactly as `ssh-keygen -lf` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a parsed public key.
    pub fn of(key: &PublicKey) -> Fingerprint {
        Fingerprint::of_key_data(key.key_data())
    }

    /// The fingerprint of a key's wire-format data.
    pub fn of_key_data(key: &KeyData) -> Fingerprint {
        match key.fingerprint(HashAlg::Sha256) {
            ssh_key::Fingerprint::Sha256(bytes) => Fingerprint(bytes),
            // Asked for SHA256 above; any other variant would be a bug in ssh-key.
            _ => Fingerprint([0; 32]),
        }
    }

    /// From the raw 32-byte SHA256 digest of the key blob.
    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// Parses `SHA256:<base64>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a SHA256 fingerprint (SHA256:<base64>)");
        match ssh_key::Fingerprint::from_str(s).map_err(|_| bad())? {
            ssh_key::Fingerprint::Sha256(bytes) => Ok(Fingerprint(bytes)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&ssh_key::Fingerprint::Sha256(self.0), f)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The key types the platform accepts (seed 001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// `ssh-ed25519`
    Ed25519,
    /// `ssh-rsa`, with its modulus size.
    Rsa {
        /// Modulus size in bits.
        bits: u32,
    },
    /// `ecdsa-sha2-nistp256`
    EcdsaP256,
    /// `ecdsa-sha2-nistp384`
    EcdsaP384,
    /// `ecdsa-sha2-nistp521`
    EcdsaP521,
    /// `sk-ssh-ed25519@openssh.com` (FIDO2)
    SkEd25519,
    /// `sk-ecdsa-sha2-nistp256@openssh.com` (FIDO2)
    SkEcdsaP256,
}

impl KeyAlgorithm {
    fn of(key: &KeyData) -> Option<KeyAlgorithm> {
        Some(match key {
            KeyData::Ed25519(_) => KeyAlgorithm::Ed25519,
            KeyData::Rsa(rsa) => {
                let n = rsa.n.as_positive_bytes().unwrap_or_default();
                let bits =
                    (n.len() as u32 * 8).saturating_sub(n.first().map_or(8, |b| b.leading_zeros()));
                KeyAlgorithm::Rsa { bits }
            }
            KeyData::Ecdsa(ec) => match ec.curve() {
                EcdsaCurve::NistP256 => KeyAlgorithm::EcdsaP256,
                EcdsaCurve::NistP384 => KeyAlgorithm::EcdsaP384,
                EcdsaCurve::NistP521 => KeyAlgorithm::EcdsaP521,
            },
            KeyData::SkEd25519(_) => KeyAlgorithm::SkEd25519,
            KeyData::SkEcdsaSha2NistP256(_) => KeyAlgorithm::SkEcdsaP256,
            _ => return None,
        })
    }
}

/// Why a text is not an acceptable SSH public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    /// A line break inside the key text.
    #[error("must be one line (newlines are rejected)")]
    Newline,
    /// Not OpenSSH public key text.
    #[error("is not an OpenSSH public key (<type> <base64> [comment]): {0}")]
    Malformed(String),
    /// A key type the platform does not take (DSA, certificates, ...).
    #[error("{0} keys are not supported (ed25519, rsa, ecdsa nistp256/384/521, sk-ed25519, sk-ecdsa are)")]
    Unsupported(String),
}

/// An SSH public key of a user (or a VM host key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    /// Human label; may be empty.
    pub name: String,
    /// `<type> <base64>`, comment stripped.
    pub public_key: String,
    /// Key type and, for RSA, size.
    pub algorithm: KeyAlgorithm,
    /// SHA256 fingerprint.
    pub fingerprint: Fingerprint,
}

impl SshKey {
    /// Parses OpenSSH public key text (`ssh-ed25519 AAAA... comment`); the comment is dropped.
    pub fn parse_openssh(name: &str, text: &str) -> Result<SshKey, SshKeyError> {
        let text = text.trim_end_matches(['\n', '\r']).trim();
        if text.contains(['\n', '\r']) {
            return Err(SshKeyError::Newline);
        }
        let key = PublicKey::from_openssh(text).map_err(|e| {
            let kind = text.split_whitespace().next().unwrap_or_default();
            if kind == "ssh-dss" || kind.contains("-cert-v01@") {
                SshKeyError::Unsupported(kind.to_string())
            } else {
                SshKeyError::Malformed(e.to_string())
            }
        })?;
        let algorithm = KeyAlgorithm::of(key.key_data())
            .ok_or_else(|| SshKeyError::Unsupported(key.algorithm().to_string()))?;
        let mut canonical = key.clone();
        canonical.set_comment("");
        let public_key = canonical
            .to_openssh()
            .map_err(|e| SshKeyError::Malformed(e.to_string()))?
            .trim_end()
            .to_string();
        Ok(SshKey {
            name: name.to_string(),
            public_key,
            algorithm,
            fingerprint: Fingerprint::of(&key),
        })
    }
}

impl Serialize for SshKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut k = s.serialize_struct("SshKey", 3)?;
        k.serialize_field("name", &self.name)?;
        k.serialize_field("public_key", &self.public_key)?;
        k.serialize_field("fingerprint", &self.fingerprint)?;
        k.end()
    }
}

/// A platform user: who may reach the VMs of which orgs, with which keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// User id.
    pub id: String,
    /// Orgs the user belongs to.
    pub org_ids: Vec<String>,
    /// Authorized keys.
    pub ssh_keys: Vec<SshKey>,
}

impl User {
    /// Is the user a member of the org?
    pub fn in_org(&self, org_id: &str) -> bool {
        self.org_ids.iter().any(|o| o == org_id)
    }
}

/// Smallest RSA modulus the gateway accepts.
pub const RSA_MIN_BITS: u32 = 2048;

pub(crate) fn decode_user(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<User> {
    let map = object(v, path, report)?;
    let errors_before = report.errors.len();
    let id = required_string(map, "id", path, report);
    let mut org_ids = Vec::new();
    if let Some(v) = optional(map, "org_ids") {
        let p = path.field("org_ids");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            if let Some(org) = string(item, &p.index(i), report) {
                org_ids.push(org.to_string());
            }
        }
    }
    let mut ssh_keys = Vec::new();
    if let Some(v) = optional(map, "ssh_keys") {
        let p = path.field("ssh_keys");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            if let Some(key) = decode_ssh_key(item, &p.index(i), report) {
                ssh_keys.push(key);
            }
        }
    }
    let id = id?;
    (report.errors.len() == errors_before).then(|| User {
        id: id.to_string(),
        org_ids,
        ssh_keys,
    })
}

fn decode_ssh_key(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<SshKey> {
    let map = object(v, path, report)?;
    let name = match optional(map, "name") {
        Some(v) => string(v, &path.field("name"), report)?,
        None => "",
    };
    let text = required_string(map, "public_key", path, report)?;
    let key_path = path.field("public_key");
    let key = match SshKey::parse_openssh(name, text) {
        Ok(key) => key,
        Err(e) => {
            report.error(&key_path, e.to_string());
            return None;
        }
    };
    if let KeyAlgorithm::Rsa { bits } = key.algorithm {
        if bits < RSA_MIN_BITS {
            report.warn(
                &key_path,
                format!("a {bits}-bit RSA key: the SSH gateway refuses RSA keys under {RSA_MIN_BITS} bits"),
            );
        }
    }
    if let Some(v) = optional(map, "fingerprint") {
        let fp_path = path.field("fingerprint");
        let stated = string(v, &fp_path, report)?;
        if stated != key.fingerprint.to_string() {
            report.error(
                &fp_path,
                format!(
                    "{stated:?} is not the key's fingerprint; the key's is {}",
                    key.fingerprint
                ),
            );
            return None;
        }
    }
    Some(key)
}
