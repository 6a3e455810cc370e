//! Who may reach which VM: the offered key's fingerprint -> user -> the user's orgs must
//! include the VM's org. Every refusal looks the same to the client (one "Permission
//! denied"); [`Denied`] exists for logs and metrics only.

use vmedge_model::{Fingerprint, VmId};
use vmedge_registry::Snapshot;

/// A user let in to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The VM (the SSH username).
    pub vm: VmId,
    /// The platform user who owns the key.
    pub user_id: String,
    /// The key's fingerprint.
    pub fingerprint: Fingerprint,
}

/// Why a key was refused (never told to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The username is not a VM id.
    NotAVmId,
    /// No user has this key.
    UnknownKey,
    /// No VM has this id.
    UnknownVm,
    /// The VM belongs to an org the user is not in.
    OtherOrg,
    /// The key type or signature algorithm is not accepted (SHA-1 RSA, short RSA, ...).
    KeyType,
}

impl Denied {
    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Denied::NotAVmId => "not_a_vm_id",
            Denied::UnknownKey => "unknown_key",
            Denied::UnknownVm => "unknown_vm",
            Denied::OtherOrg => "other_org",
            Denied::KeyType => "key_type",
        }
    }
}

/// Decides whether the key `fingerprint` may log in as `username` (a VM id, UUID or 32 hex).
/// All lookups are hash lookups: the time taken does not depend on which check fails.
pub fn decide(
    snapshot: &Snapshot,
    username: &str,
    fingerprint: &Fingerprint,
) -> Result<Grant, Denied> {
    let vm_id = VmId::parse(username);
    let user = snapshot.user_by_fingerprint(fingerprint).map(|(u, _)| u);
    let vm = vm_id.and_then(|id| snapshot.vm(&id));
    match (vm_id, user, vm) {
        (None, _, _) => Err(Denied::NotAVmId),
        (_, None, _) => Err(Denied::UnknownKey),
        (_, _, None) => Err(Denied::UnknownVm),
        (Some(_), Some(user), Some(vm)) if !user.in_org(&vm.org_id) => Err(Denied::OtherOrg),
        (Some(id), Some(user), Some(_)) => Ok(Grant {
            vm: id,
            user_id: user.id.clone(),
            fingerprint: *fingerprint,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmedge_model::{parse_state, SshKey};

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN+BAVihU1hyZei2uU6YDRx6eiY3pA8zpnhy14ufo2SC";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEa3+vSyNYRSF8E9eDNT/Wo0sgrwkIRGsSAcOKLhctPM";
    const VM1: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
    const VM2: &str = "6f1c2d3e-0000-4000-8000-0000000000bb";

    fn snapshot() -> Snapshot {
        let json = format!(
            r#"{{"users": [
                 {{"id": "u-1", "org_ids": ["org-1"], "ssh_keys": [{{"name": "a", "public_key": "{KEY_A}"}}]}},
                 {{"id": "u-2", "org_ids": ["org-2"], "ssh_keys": [{{"name": "b", "public_key": "{KEY_B}"}}]}}],
               "vms": [
                 {{"id": "{VM1}", "org_id": "org-1", "worker": "w", "public_ipv6": "fd5e:ed00:1::2", "status": "running"}},
                 {{"id": "{VM2}", "org_id": "org-2", "worker": "w", "public_ipv6": "fd5e:ed00:1::3", "status": "running"}}]}}"#
        );
        Snapshot::build(parse_state(&json).unwrap().value, 1)
    }

    fn fp(key: &str) -> Fingerprint {
        SshKey::parse_openssh("", key).unwrap().fingerprint
    }

    #[test]
    fn a_key_reaches_only_the_vms_of_its_users_orgs() {
        let s = snapshot();
        let grant = decide(&s, VM1, &fp(KEY_A)).unwrap();
        assert_eq!(grant.user_id, "u-1");
        // The 32-hex form of the id is the same VM.
        let hex = VM1.replace('-', "");
        assert_eq!(decide(&s, &hex, &fp(KEY_A)).unwrap().vm, grant.vm);
        assert_eq!(decide(&s, VM2, &fp(KEY_A)), Err(Denied::OtherOrg));
        assert_eq!(decide(&s, VM1, &fp(KEY_B)), Err(Denied::OtherOrg));
        assert_eq!(
            decide(&s, "6f1c2d3e-0000-4000-8000-0000000000cc", &fp(KEY_A)),
            Err(Denied::UnknownVm)
        );
        assert_eq!(decide(&s, "root", &fp(KEY_A)), Err(Denied::NotAVmId));
        let unknown = Fingerprint::from_bytes([1; 32]);
        assert_eq!(decide(&s, VM1, &unknown), Err(Denied::UnknownKey));
    }
}
