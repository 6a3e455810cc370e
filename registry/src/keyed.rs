//! [`KeyedState`]: the state kept as one object per key, as etcd holds it
//! (`/vmedge/vms/<id>`, `/vmedge/users/<id>`), and changed key by key.
//!
//! Each key is validated on its own: an invalid value is refused for that key only, and
//! what stood there before (its last good object) keeps serving; a new VM whose only
//! fault is its policy is served fenced, as the file registry does. The rules across
//! objects (a VM address, tap or IPv4 address, a user's key: each belongs to one object)
//! are checked after a whole batch is in, so that a transaction that moves an address
//! from one VM to another is taken as one; a key whose change breaks them is refused.
//! The objects themselves are the caller's (the snapshot in force), lent to each batch
//! and given back changed, so a registry holds them once; a VM's `Arc` is shared with
//! the snapshot unless the batch changed it. No I/O here: the etcd source feeds it, the
//! unit tests below drive it directly.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use vmedge_model::{parse_user, parse_vm_checked, ModelError, User, Vm, VmId};

/// Everything vmedge keeps in etcd lives under this prefix.
pub const PREFIX: &str = "/vmedge/";
/// `/vmedge/vms/<id>`: one VM object (seed 001 shape), the id hyphenated.
pub const VMS: &str = "/vmedge/vms/";
/// `/vmedge/users/<id>`: one user object.
pub const USERS: &str = "/vmedge/users/";

/// The key of a VM's object.
pub fn vm_key(id: &VmId) -> String {
    format!("{VMS}{id}")
}

/// The key of a user's object.
pub fn user_key(id: &str) -> String {
    format!("{USERS}{id}")
}

/// One change to one key.
#[derive(Debug, Clone)]
pub enum Change {
    /// The key now holds this value.
    Put {
        /// The key.
        key: String,
        /// Its value: JSON text, one object.
        value: Vec<u8>,
    },
    /// The key is gone.
    Delete {
        /// The key.
        key: String,
    },
}

/// What serves in place of a refused value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// The key's last good object.
    LastGood,
    /// The VM as given, with a closed firewall: only its policy was invalid.
    Fenced,
    /// Nothing: the key had no good object yet.
    Nothing,
}

impl fmt::Display for Serving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Serving::LastGood => "its last good object",
            Serving::Fenced => "the VM with a closed firewall (only its policy is invalid)",
            Serving::Nothing => "nothing (no good object yet)",
        })
    }
}

/// A value refused for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The key.
    pub key: String,
    /// Every reason, each with its JSON path inside the object where there is one.
    pub errors: Vec<String>,
    /// What serves instead.
    pub serving: Serving,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: refused, serving {}", self.key, self.serving)?;
        for e in &self.errors {
            write!(f, "\n  {}: {e}", self.key)?;
        }
        Ok(())
    }
}

/// The objects a batch changes: the VMs (each shared with the snapshot it comes from, so
/// that a batch copies only what it changes) and the users.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// VMs, in key order after a batch.
    pub vms: Vec<Arc<Vm>>,
    /// Users, in key order after a batch.
    pub users: Vec<User>,
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The objects after the batch.
    pub objects: Objects,
    /// It differs from the state before the batch.
    pub changed: bool,
    /// Values refused in this batch.
    pub refusals: Vec<Refusal>,
    /// Keys under [`PREFIX`] that are neither a VM nor a user (left alone).
    pub ignored: Vec<String>,
}

/// The keys whose stored value is refused; the objects themselves are the caller's (the
/// snapshot in force), lent to each batch, so that a registry holds them once.
#[derive(Debug, Default)]
pub struct KeyedState {
    /// The objects of the batch being applied, by key; empty between batches.
    vms: BTreeMap<VmId, Arc<Vm>>,
    users: BTreeMap<String, User>,
    /// VM keys whose stored value is refused (serving last good, fenced or nothing).
    quarantined: BTreeSet<VmId>,
    /// User keys whose stored value is refused.
    refused_users: BTreeSet<String>,
}

/// The object a key names.
enum Key<'k> {
    Vm(VmId),
    User(&'k str),
    /// Under a known folder, but not a valid id.
    BadId(&'static str),
    /// Something else under the prefix.
    Other,
}

fn classify(key: &str) -> Key<'_> {
    if let Some(id) = key.strip_prefix(VMS) {
        return VmId::parse(id).map_or(Key::BadId("not a VM id (a UUID)"), Key::Vm);
    }
    if let Some(id) = key.strip_prefix(USERS) {
        return if id.is_empty() || id.contains('/') {
            Key::BadId("not a user id")
        } else {
            Key::User(id)
        };
    }
    Key::Other
}

/// The value of each key changed in a batch before the batch: what a refusal reverts to.
#[derive(Default)]
struct Before {
    vms: BTreeMap<VmId, Option<Arc<Vm>>>,
    users: BTreeMap<String, Option<User>>,
}

impl KeyedState {
    /// No key refused yet.
    pub fn new() -> KeyedState {
        KeyedState::default()
    }

    /// VMs whose stored value is refused.
    pub fn quarantined(&self) -> Vec<VmId> {
        self.quarantined.iter().copied().collect()
    }

    /// Replaces everything in `current` with the full content of the store (`(key, value)`
    /// for every key under [`PREFIX`]), as one batch: keys not listed are deleted. What a
    /// resync does.
    pub fn replace_all(&mut self, current: Objects, all: Vec<(String, Vec<u8>)>) -> Applied {
        self.lend(current);
        let listed: BTreeSet<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
        let mut gone: Vec<Change> = Vec::new();
        let vm_keys = self.vms.keys().chain(&self.quarantined).map(vm_key);
        let user_keys = self
            .users
            .keys()
            .chain(&self.refused_users)
            .map(|u| user_key(u));
        for key in vm_keys.chain(user_keys) {
            if !listed.contains(key.as_str()) {
                gone.push(Change::Delete { key });
            }
        }
        gone.sort_by(|a, b| change_key(a).cmp(change_key(b)));
        gone.dedup_by(|a, b| change_key(a) == change_key(b));
        let puts = all
            .into_iter()
            .map(|(key, value)| Change::Put { key, value });
        self.apply_lent(gone.into_iter().chain(puts))
    }

    /// Applies a batch of changes (one etcd watch response, in order) to `current`.
    pub fn apply(
        &mut self,
        current: Objects,
        changes: impl IntoIterator<Item = Change>,
    ) -> Applied {
        self.lend(current);
        self.apply_lent(changes)
    }

    fn lend(&mut self, current: Objects) {
        self.vms = current.vms.into_iter().map(|vm| (vm.id, vm)).collect();
        self.users = current
            .users
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
    }

    fn apply_lent(&mut self, changes: impl IntoIterator<Item = Change>) -> Applied {
        let mut applied = Applied::default();
        let mut before = Before::default();
        for change in changes {
            self.apply_one(change, &mut before, &mut applied);
        }
        self.enforce_uniqueness(&mut before, &mut applied);
        applied.changed = before
            .vms
            .iter()
            .any(|(id, old)| self.vms.get(id) != old.as_ref())
            || before
                .users
                .iter()
                .any(|(id, old)| self.users.get(id) != old.as_ref());
        applied.objects = Objects {
            users: std::mem::take(&mut self.users).into_values().collect(),
            vms: std::mem::take(&mut self.vms).into_values().collect(),
        };
        applied
    }

    fn apply_one(&mut self, change: Change, before: &mut Before, applied: &mut Applied) {
        let (key, value) = match change {
            Change::Put { key, value } => (key, Some(value)),
            Change::Delete { key } => (key, None),
        };
        match classify(&key) {
            Key::Other => applied.ignored.push(key),
            Key::BadId(why) => {
                if value.is_some() {
                    applied.refusals.push(Refusal {
                        key,
                        errors: vec![format!("the key's last part is {why}")],
                        serving: Serving::Nothing,
                    });
                }
            }
            Key::Vm(id) => {
                before
                    .vms
                    .entry(id)
                    .or_insert_with(|| self.vms.get(&id).cloned());
                let Some(value) = value else {
                    self.vms.remove(&id);
                    self.quarantined.remove(&id);
                    return;
                };
                match parse_vm_value(&id, &value) {
                    Ok(vm) => {
                        self.vms.insert(id, Arc::new(vm));
                        self.quarantined.remove(&id);
                    }
                    Err((errors, fenced)) => {
                        let serving = match (self.vms.entry(id), fenced) {
                            (Entry::Occupied(_), _) => Serving::LastGood,
                            (Entry::Vacant(slot), Some(vm)) => {
                                slot.insert(Arc::new(*vm));
                                Serving::Fenced
                            }
                            (Entry::Vacant(_), None) => Serving::Nothing,
                        };
                        self.quarantined.insert(id);
                        applied.refusals.push(Refusal {
                            key,
                            errors,
                            serving,
                        });
                    }
                }
            }
            Key::User(id) => {
                let id = id.to_string();
                before
                    .users
                    .entry(id.clone())
                    .or_insert_with(|| self.users.get(&id).cloned());
                let Some(value) = value else {
                    self.users.remove(&id);
                    self.refused_users.remove(&id);
                    return;
                };
                match parse_user_value(&id, &value) {
                    Ok(user) => {
                        self.users.insert(id.clone(), user);
                        self.refused_users.remove(&id);
                    }
                    Err(errors) => {
                        let serving = if self.users.contains_key(&id) {
                            Serving::LastGood
                        } else {
                            Serving::Nothing
                        };
                        self.refused_users.insert(id);
                        applied.refusals.push(Refusal {
                            key,
                            errors,
                            serving,
                        });
                    }
                }
            }
        }
    }

    /// Refuses changed keys that break a rule across objects, reverting each to its value
    /// before the batch, until none does. Each round reverts at least one changed key,
    /// and the state before the batch kept the rules, so this ends.
    fn enforce_uniqueness(&mut self, before: &mut Before, applied: &mut Applied) {
        loop {
            let clashes = self.clashes(before);
            if clashes.is_empty() {
                return;
            }
            for (object, error) in clashes {
                let (key, serving) = match object {
                    Object::Vm(id) => {
                        let old = before.vms.remove(&id).flatten();
                        let serving = revert(&mut self.vms, id, old);
                        self.quarantined.insert(id);
                        (vm_key(&id), serving)
                    }
                    Object::User(id) => {
                        let old = before.users.remove(&id).flatten();
                        let serving = revert(&mut self.users, id.clone(), old);
                        self.refused_users.insert(id.clone());
                        (user_key(&id), serving)
                    }
                };
                applied.refusals.push(Refusal {
                    key,
                    errors: vec![error],
                    serving,
                });
            }
        }
    }

    /// Objects changed in this batch that take what another object holds (an address, a
    /// tap, a key), each with the reason. Of two changed objects, the later key yields.
    fn clashes(&self, before: &Before) -> Vec<(Object, String)> {
        let changed_vm = |id: &VmId| before.vms.contains_key(id);
        let mut out: BTreeMap<VmId, String> = BTreeMap::new();
        let mut addrs = HashMap::new();
        let mut taps = HashMap::new();
        let mut v4s = HashMap::new();
        // Unchanged objects claim first: they kept the rules before this batch.
        let order = self
            .vms
            .values()
            .filter(|vm| !changed_vm(&vm.id))
            .chain(self.vms.values().filter(|vm| changed_vm(&vm.id)));
        for vm in order {
            let mut claim = |taken: Option<VmId>, what: String| {
                if let Some(owner) = taken {
                    out.entry(vm.id)
                        .or_insert_with(|| format!("{what} is also held by {}", vm_key(&owner)));
                }
            };
            claim(
                addrs.insert(vm.public_ipv6, vm.id),
                format!("public_ipv6: {}", vm.public_ipv6),
            );
            if let Some(tap) = &vm.interface {
                claim(
                    taps.insert((vm.worker.as_str(), tap.as_str()), vm.id),
                    format!("interface: {tap:?} on worker {:?}", vm.worker),
                );
            }
            if let Some(v4) = vm.ipv4 {
                claim(
                    v4s.insert((vm.worker.as_str(), v4), vm.id),
                    format!("ipv4: {v4} on worker {:?}", vm.worker),
                );
            }
        }
        let mut clashes: Vec<(Object, String)> = out
            .into_iter()
            .filter(|(id, _)| changed_vm(id))
            .map(|(id, why)| (Object::Vm(id), why))
            .collect();

        let changed_user = |id: &str| before.users.contains_key(id);
        let mut owners = HashMap::new();
        let mut user_out: BTreeMap<&str, String> = BTreeMap::new();
        let order = self
            .users
            .values()
            .filter(|u| !changed_user(&u.id))
            .chain(self.users.values().filter(|u| changed_user(&u.id)));
        for user in order {
            for (k, key) in user.ssh_keys.iter().enumerate() {
                if let Some(owner) = owners.insert(key.fingerprint, user.id.as_str()) {
                    if owner != user.id {
                        user_out.entry(user.id.as_str()).or_insert_with(|| {
                            format!(
                                "ssh_keys[{k}].public_key: the same key ({}) belongs to {}: a key identifies one user",
                                key.fingerprint,
                                user_key(owner)
                            )
                        });
                    }
                }
            }
        }
        clashes.extend(
            user_out
                .into_iter()
                .filter(|(id, _)| changed_user(id))
                .map(|(id, why)| (Object::User(id.to_string()), why)),
        );
        clashes
    }
}

enum Object {
    Vm(VmId),
    User(String),
}

fn change_key(c: &Change) -> &str {
    match c {
        Change::Put { key, .. } | Change::Delete { key } => key,
    }
}

/// Puts `old` back under `id` (or removes the entry); says what now serves.
fn revert<K: Ord, V>(map: &mut BTreeMap<K, V>, id: K, old: Option<V>) -> Serving {
    match old {
        Some(v) => {
            map.insert(id, v);
            Serving::LastGood
        }
        None => {
            map.remove(&id);
            Serving::Nothing
        }
    }
}

fn model_errors(e: &ModelError) -> Vec<String> {
    match e {
        ModelError::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        syntax => vec![syntax.to_string()],
    }
}

fn utf8(value: &[u8]) -> Result<&str, Vec<String>> {
    std::str::from_utf8(value).map_err(|e| vec![format!("the value is not UTF-8 text: {e}")])
}

/// A VM's value, checked against its key; on error every reason and the fenced VM if any.
fn parse_vm_value(id: &VmId, value: &[u8]) -> Result<Vm, (Vec<String>, Option<Box<Vm>>)> {
    let text = utf8(value).map_err(|e| (e, None))?;
    match parse_vm_checked(text) {
        Ok(parsed) if parsed.value.id == *id => {
            for warning in parsed.warnings {
                tracing::warn!(key = %vm_key(id), "{warning}");
            }
            Ok(parsed.value)
        }
        Ok(parsed) => Err((
            vec![format!("id: {} does not match the key", parsed.value.id)],
            None,
        )),
        Err(invalid) => {
            let fenced = invalid.fenced.filter(|vm| vm.id == *id);
            Err((model_errors(&invalid.error), fenced))
        }
    }
}

/// A user's value, checked against its key.
fn parse_user_value(id: &str, value: &[u8]) -> Result<User, Vec<String>> {
    let parsed = parse_user(utf8(value)?).map_err(|e| model_errors(&e))?;
    if parsed.value.id != id {
        return Err(vec![format!(
            "id: {:?} does not match the key",
            parsed.value.id
        )]);
    }
    for warning in parsed.warnings {
        tracing::warn!(key = %user_key(id), "{warning}");
    }
    Ok(parsed.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const A: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
    const B: &str = "6f1c2d3e-0000-4000-8000-0000000000bb";

    fn vm(id: &str, addr: &str) -> Value {
        json!({"id": id, "org_id": "org-1", "worker": "w1", "public_ipv6": addr,
               "status": "running", "services": [{"name": "web", "port": 8080}]})
    }

    fn put(key: String, value: &Value) -> Change {
        Change::Put {
            key,
            value: value.to_string().into_bytes(),
        }
    }

    fn vmk(id: &str) -> String {
        format!("{VMS}{id}")
    }

    /// A keyed state and the state it serves, as a registry keeps them.
    #[derive(Default)]
    struct Store {
        keyed: KeyedState,
        state: Objects,
    }

    impl Store {
        fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Applied {
            let mut applied = self.keyed.apply(std::mem::take(&mut self.state), changes);
            self.state = std::mem::take(&mut applied.objects);
            applied
        }

        fn replace_all(&mut self, all: Vec<(String, Vec<u8>)>) -> Applied {
            let mut applied = self.keyed.replace_all(std::mem::take(&mut self.state), all);
            self.state = std::mem::take(&mut applied.objects);
            applied
        }

        fn quarantined(&self) -> Vec<VmId> {
            self.keyed.quarantined()
        }

        fn len(&self) -> (usize, usize) {
            (self.state.vms.len(), self.state.users.len())
        }
    }

    fn addr_of(store: &Store, id: &str) -> Option<String> {
        let id = VmId::parse(id).unwrap();
        let vm = store.state.vms.iter().find(|vm| vm.id == id);
        vm.map(|vm| vm.public_ipv6.to_string())
    }

    #[test]
    fn an_invalid_value_keeps_the_last_good_object_and_names_key_and_path() {
        let mut s = Store::default();
        let applied = s.apply([put(vmk(A), &vm(A, "fd5e:ed00::a"))]);
        assert!(applied.changed && applied.refusals.is_empty());

        let mut bad = vm(A, "fd5e:ed00::a");
        bad["services"][0]["port"] = json!(70000);
        let applied = s.apply([put(vmk(A), &bad)]);
        assert!(!applied.changed);
        let refusal = &applied.refusals[0];
        assert_eq!(refusal.key, vmk(A));
        assert_eq!(refusal.serving, Serving::LastGood);
        assert!(
            refusal.errors[0].starts_with("services[0].port"),
            "{refusal}"
        );
        assert_eq!(s.quarantined().len(), 1);
        assert_eq!(addr_of(&s, A).as_deref(), Some("fd5e:ed00::a"));

        // A good value lifts the quarantine.
        let applied = s.apply([put(vmk(A), &vm(A, "fd5e:ed00::aa"))]);
        assert!(applied.changed && s.quarantined().is_empty());
    }

    #[test]
    fn a_new_vm_with_only_a_bad_policy_is_fenced_a_broken_one_absent() {
        let mut s = Store::default();
        let mut policy_only = vm(A, "fd5e:ed00::a");
        policy_only["firewall"] = json!({"ingress": {"default": "maybe"}});
        let mut broken = vm(B, "fd5e:ed00::b");
        broken["public_ipv6"] = json!("nope");
        let applied = s.apply([put(vmk(A), &policy_only), put(vmk(B), &broken)]);
        let serving: Vec<Serving> = applied.refusals.iter().map(|r| r.serving).collect();
        assert_eq!(serving, [Serving::Fenced, Serving::Nothing]);
        assert!(applied.refusals[0].errors[0].starts_with("firewall.ingress.default"));
        assert_eq!(s.len(), (1, 0));
        assert_eq!(s.quarantined().len(), 2);
    }

    #[test]
    fn a_value_whose_id_is_not_its_key_is_refused() {
        let mut s = Store::default();
        let applied = s.apply([put(vmk(A), &vm(B, "fd5e:ed00::b"))]);
        assert_eq!(
            applied.refusals[0].errors,
            [format!("id: {B} does not match the key")]
        );
        assert_eq!(s.len(), (0, 0));
        let applied = s.apply([put(format!("{VMS}not-a-uuid"), &vm(A, "fd5e:ed00::a"))]);
        assert!(applied.refusals[0].errors[0].contains("not a VM id"));
        let applied = s.apply([put("/vmedge/config/x".into(), &json!({}))]);
        assert_eq!(applied.ignored, ["/vmedge/config/x"]);
        assert!(!applied.changed);
    }

    #[test]
    fn an_address_moved_between_vms_in_one_batch_is_taken_a_stolen_one_refused() {
        let mut s = Store::default();
        s.apply([
            put(vmk(A), &vm(A, "fd5e:ed00::1")),
            put(vmk(B), &vm(B, "fd5e:ed00::2")),
        ]);
        // One transaction: B takes A's address, A moves on. B's put comes first.
        let applied = s.apply([
            put(vmk(B), &vm(B, "fd5e:ed00::1")),
            put(vmk(A), &vm(A, "fd5e:ed00::3")),
        ]);
        assert!(
            applied.changed && applied.refusals.is_empty(),
            "{:?}",
            applied.refusals
        );
        assert_eq!(addr_of(&s, B).as_deref(), Some("fd5e:ed00::1"));

        // B alone takes A's address: B is refused and keeps its own.
        let applied = s.apply([put(vmk(B), &vm(B, "fd5e:ed00::3"))]);
        assert!(!applied.changed);
        assert_eq!(
            applied.refusals[0].errors,
            [format!(
                "public_ipv6: fd5e:ed00::3 is also held by {}",
                vmk(A)
            )]
        );
        assert_eq!(addr_of(&s, B).as_deref(), Some("fd5e:ed00::1"));
    }

    #[test]
    fn a_key_that_belongs_to_another_user_is_refused() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let user = |id: &str| json!({"id": id, "org_ids": ["org-1"], "ssh_keys": [{"name": "k", "public_key": key}]});
        let mut s = Store::default();
        s.apply([put(user_key("u-1"), &user("u-1"))]);
        let applied = s.apply([put(user_key("u-2"), &user("u-2"))]);
        assert!(!applied.changed);
        assert!(applied.refusals[0].errors[0].contains(&user_key("u-1")));
        assert_eq!(applied.refusals[0].serving, Serving::Nothing);
        assert_eq!(s.len(), (0, 1));
    }

    #[test]
    fn replace_all_deletes_what_is_gone_and_keeps_what_is_equal() {
        let mut s = Store::default();
        s.apply([
            put(vmk(A), &vm(A, "fd5e:ed00::1")),
            put(vmk(B), &vm(B, "fd5e:ed00::2")),
        ]);
        let same = vec![(vmk(A), vm(A, "fd5e:ed00::1").to_string().into_bytes())];
        let applied = s.replace_all(same.clone());
        assert!(applied.changed);
        assert_eq!(s.len(), (1, 0));
        assert!(!s.replace_all(same).changed);
    }
}
