//! The state document: every user and VM the edge serves (DESIGN.md, "The state").

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

// Keys come from the state itself, never from clients: a fast hasher is safe here.
use foldhash::{HashMap, HashMapExt};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;

use crate::errors::{FieldError, FieldErrors, ModelError};
use crate::json::Node;
use crate::policy::{decode_policy, FirewallPolicy, PolicyShape};
use crate::user::{decode_user, Fingerprint, User};
use crate::validate::{Path, Report};
use crate::vm::{decode_vm, decode_vm_checked, DecodedVm, Vm, VmId};

/// Users and VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct State {
    /// Platform users with their orgs and keys.
    pub users: Vec<User>,
    /// VMs with their services and policies.
    pub vms: Vec<Vm>,
}

/// A document accepted, with what is worth a word about it.
#[derive(Debug, Clone)]
pub struct Parsed<T> {
    /// The decoded value.
    pub value: T,
    /// Accepted but probably not meant: each with its path.
    pub warnings: Vec<FieldError>,
}

fn parse_json(text: &str) -> Result<Node<'_>, ModelError> {
    Node::parse(text).map_err(|e| ModelError::syntax(&e))
}

fn finish<T>(value: Option<T>, report: Report) -> Result<Parsed<T>, ModelError> {
    match value {
        Some(value) if report.errors.is_empty() => Ok(Parsed {
            value,
            warnings: report.warnings,
        }),
        _ => Err(ModelError::Invalid(FieldErrors(report.errors))),
    }
}

/// Parses and validates a state document; every error is reported, with its JSON path.
///
/// The `users` and `vms` arrays are decoded element by element as the parser reaches
/// them, so only one object's JSON tree is in memory at a time: on a 100k-VM state,
/// building the whole tree first cost more (in fresh pages) than the decoding itself.
pub fn parse_state(text: &str) -> Result<Parsed<State>, ModelError> {
    let decoded = decode_state(text, false)?;
    let mut report = decoded.report;
    check_users_unique(&decoded.users, &mut report);
    check_vms_unique(decoded.vms.iter().map(|(i, vm)| (*i, vm)), &mut report);
    let state = State {
        users: decoded.users.into_iter().map(|(_, u)| u).collect(),
        vms: decoded.vms.into_iter().map(|(_, v)| v).collect(),
    };
    finish(Some(state), report)
}

/// A state whose broken VM objects were set aside rather than refusing the document:
/// what [`parse_state_isolating`] returns. [`PartialState::resolve`] makes it a [`State`].
#[derive(Debug)]
pub struct PartialState {
    users: Vec<(usize, User)>,
    vms: Vec<(usize, Vm)>,
    rejected: Vec<RejectedVm>,
    warnings: Vec<FieldError>,
}

/// One VM object that failed validation.
#[derive(Debug, Clone)]
pub struct RejectedVm {
    /// Its index in `vms`.
    pub index: usize,
    /// Its id (a VM whose id cannot be read cannot be set aside).
    pub id: VmId,
    /// Every error of the object, with its JSON path.
    pub errors: Vec<FieldError>,
    /// The VM with [`FirewallPolicy::closed`], when only its policy is invalid.
    pub fenced: Option<Vm>,
}

/// What stands in for a rejected VM in the resolved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandIn {
    /// Its last good version, as the caller had it.
    LastGood,
    /// The VM as given, with the closed policy: only its policy was invalid, and there
    /// was no last good version.
    Fenced,
    /// Nothing: a new VM that is not valid is not served at all.
    Absent,
}

/// A rejected VM and what stands in for it.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The object as rejected.
    pub rejected: RejectedVm,
    /// What is served in its place.
    pub stand_in: StandIn,
}

/// A state to serve, and the VMs in it that stand in for rejected objects.
#[derive(Debug)]
pub struct Resolved {
    /// What to serve.
    pub state: State,
    /// Rejected VM objects, in document order.
    pub quarantined: Vec<Quarantined>,
    /// Accepted but probably not meant: each with its path.
    pub warnings: Vec<FieldError>,
}

/// Like [`parse_state`], but an error confined to one VM object (and its id readable)
/// sets that VM aside instead of refusing the document, so that one customer's bad
/// policy does not hold back every other VM's update. Any other error (syntax, the
/// document's shape, a user, an unreadable VM id) still refuses the whole document.
pub fn parse_state_isolating(text: &str) -> Result<PartialState, ModelError> {
    let decoded = decode_state(text, true)?;
    let mut report = decoded.report;
    check_users_unique(&decoded.users, &mut report);
    if !report.errors.is_empty() {
        report
            .errors
            .extend(decoded.rejected.into_iter().flat_map(|r| r.errors));
        return Err(ModelError::Invalid(FieldErrors(report.errors)));
    }
    Ok(PartialState {
        users: decoded.users,
        vms: decoded.vms,
        rejected: decoded.rejected,
        warnings: report.warnings,
    })
}

impl PartialState {
    /// The VM objects set aside.
    pub fn rejected(&self) -> &[RejectedVm] {
        &self.rejected
    }

    /// The state to serve: every valid object, and for each rejected VM its last good
    /// version (`last_good`, from the snapshot in force), else its fenced form, else
    /// nothing. Fails when the result breaks a uniqueness rule (say a rejected VM's last
    /// good address is now another VM's): then nothing of the document is served.
    pub fn resolve(
        self,
        mut last_good: impl FnMut(&VmId) -> Option<Vm>,
    ) -> Result<Resolved, ModelError> {
        let mut vms = self.vms;
        let mut quarantined = Vec::with_capacity(self.rejected.len());
        for rejected in self.rejected {
            let (stand_in, vm) = match (last_good(&rejected.id), &rejected.fenced) {
                (Some(vm), _) => (StandIn::LastGood, Some(vm)),
                (None, Some(fenced)) => (StandIn::Fenced, Some(fenced.clone())),
                (None, None) => (StandIn::Absent, None),
            };
            if let Some(vm) = vm {
                vms.push((rejected.index, vm));
            }
            quarantined.push(Quarantined { rejected, stand_in });
        }
        if !quarantined.is_empty() {
            vms.sort_by_key(|(i, _)| *i);
        }
        let mut report = Report::default();
        check_vms_unique(vms.iter().map(|(i, vm)| (*i, vm)), &mut report);
        if !report.errors.is_empty() {
            let mut errors: Vec<FieldError> = quarantined
                .into_iter()
                .flat_map(|q| q.rejected.errors)
                .collect();
            errors.extend(report.errors);
            return Err(ModelError::Invalid(FieldErrors(errors)));
        }
        Ok(Resolved {
            state: State {
                users: self.users.into_iter().map(|(_, u)| u).collect(),
                vms: vms.into_iter().map(|(_, v)| v).collect(),
            },
            quarantined,
            warnings: self.warnings,
        })
    }
}

/// The arrays as decoded, before the checks across objects.
struct DecodedState {
    report: Report,
    users: Vec<(usize, User)>,
    vms: Vec<(usize, Vm)>,
    rejected: Vec<RejectedVm>,
}

fn decode_state(text: &str, isolate: bool) -> Result<DecodedState, ModelError> {
    let mut report = Report::default();
    let mut users = Vec::new();
    let mut vms = Vec::new();
    let mut rejected = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = StateSeed {
        report: &mut report,
        users: &mut users,
        vms: &mut vms,
        rejected: isolate.then_some(&mut rejected),
    };
    seed.deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| ModelError::syntax(&e))?;
    Ok(DecodedState {
        report,
        users,
        vms,
        rejected,
    })
}

/// [`parse_state`] for a document built in code (tests, tools); it is printed and parsed.
pub fn state_from_value(doc: &serde_json::Value) -> Result<Parsed<State>, ModelError> {
    parse_state(&doc.to_string())
}

/// Parses and validates one VM object (as stored per key in etcd).
pub fn parse_vm(text: &str) -> Result<Parsed<Vm>, ModelError> {
    let mut report = Report::default();
    let vm = decode_vm(&parse_json(text)?, &Path::Root, &mut report);
    finish(vm, report)
}

/// A VM object that failed validation, as [`parse_vm_checked`] reports it.
#[derive(Debug, Clone)]
pub struct InvalidVm {
    /// Every error, with its JSON path inside the object.
    pub error: ModelError,
    /// The VM with [`FirewallPolicy::closed`], when only its policy is invalid (boxed:
    /// the error path should not make every `Result` this large).
    pub fenced: Option<Box<Vm>>,
}

/// [`parse_vm`], telling a VM whose only fault is its policy (it can be served fenced,
/// as [`parse_state_isolating`] does) from a broken one.
pub fn parse_vm_checked(text: &str) -> Result<Parsed<Vm>, InvalidVm> {
    let node = parse_json(text).map_err(|error| InvalidVm {
        error,
        fenced: None,
    })?;
    let mut report = Report::default();
    let (vm, fenced) = match decode_vm_checked(&node, &Path::Root, &mut report) {
        DecodedVm::Valid(vm) => (Some(vm), None),
        DecodedVm::Fenced(vm) => (None, Some(Box::new(vm))),
        DecodedVm::Invalid(_) => (None, None),
    };
    finish(vm, report).map_err(|error| InvalidVm { error, fenced })
}

/// Parses and validates one user object (as stored per key in etcd).
pub fn parse_user(text: &str) -> Result<Parsed<User>, ModelError> {
    let mut report = Report::default();
    let user = decode_user(&parse_json(text)?, &Path::Root, &mut report);
    finish(user, report)
}

/// Parses and validates one FirewallPolicy, in the seed 001 shape or the older seed 002 shape.
pub fn parse_policy(text: &str) -> Result<Parsed<(FirewallPolicy, PolicyShape)>, ModelError> {
    let mut report = Report::default();
    let policy = decode_policy(&parse_json(text)?, &Path::Root, &mut report);
    finish(policy, report)
}

/// The scalar `visit_*` methods of a visitor that wanted a container: each reports
/// "expected <what>, found <kind>" through `self.wrong_kind` and lets decoding go on.
macro_rules! wrong_kind_scalars {
    ($expected:literal) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            self.wrong_kind(concat!("expected ", $expected, ", found a boolean"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            self.wrong_kind(concat!("expected ", $expected, ", found a number"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            self.wrong_kind(concat!("expected ", $expected, ", found a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            self.wrong_kind(concat!("expected ", $expected, ", found a number"))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            self.wrong_kind(concat!("expected ", $expected, ", found a string"))
        }
    };
}

/// The top-level object: `{"users": [...], "vms": [...]}`, decoded as it streams by.
/// Each element keeps its document index so duplicate messages can name both sides.
struct StateSeed<'r> {
    report: &'r mut Report,
    users: &'r mut Vec<(usize, User)>,
    vms: &'r mut Vec<(usize, Vm)>,
    /// Where broken VM objects go when they are set aside rather than refusing the document.
    rejected: Option<&'r mut Vec<RejectedVm>>,
}

impl StateSeed<'_> {
    fn wrong_kind<E>(self, message: &'static str) -> Result<(), E> {
        self.report.error(&Path::Root, message);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for StateSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StateSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a state object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let root = Path::Root;
        let mut seen: Vec<String> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                self.report.error(&root.field(&key), "is given twice");
            }
            match key.as_str() {
                "users" => map.next_value_seed(ArraySeed {
                    path: root.field("users"),
                    report: self.report,
                    decode: &mut |node: &Node<'_>, i, report: &mut Report| {
                        let p = root.field("users");
                        if let Some(user) = decode_user(node, &p.index(i), report) {
                            self.users.push((i, user));
                        }
                    },
                })?,
                "vms" => map.next_value_seed(ArraySeed {
                    path: root.field("vms"),
                    report: self.report,
                    decode: &mut |node: &Node<'_>, i, report: &mut Report| {
                        let p = root.field("vms");
                        let errors_before = report.errors.len();
                        let (id, fenced) = match decode_vm_checked(node, &p.index(i), report) {
                            DecodedVm::Valid(vm) => return self.vms.push((i, vm)),
                            DecodedVm::Fenced(vm) => (Some(vm.id), Some(vm)),
                            DecodedVm::Invalid(id) => (id, None),
                        };
                        if let (Some(rejected), Some(id)) = (self.rejected.as_deref_mut(), id) {
                            rejected.push(RejectedVm {
                                index: i,
                                id,
                                errors: report.errors.split_off(errors_before),
                                fenced,
                            });
                        }
                    },
                })?,
                other => {
                    self.report.error(
                        &root.field(other),
                        "unknown field; expected one of: users, vms",
                    );
                    map.next_value::<IgnoredAny>()?;
                }
            }
            seen.push(key);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.wrong_kind("expected an object, found an array")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.wrong_kind("expected an object, found null")
    }

    wrong_kind_scalars!("an object");
}

type DecodeElement<'f> = dyn FnMut(&Node<'_>, usize, &mut Report) + 'f;

/// An array whose elements are decoded one at a time; `null` is an empty array.
struct ArraySeed<'p, 'r, 'f> {
    path: Path<'p>,
    report: &'r mut Report,
    decode: &'f mut DecodeElement<'f>,
}

impl ArraySeed<'_, '_, '_> {
    fn wrong_kind<E>(self, message: &'static str) -> Result<(), E> {
        self.report.error(&self.path, message);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for ArraySeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ArraySeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(node) = seq.next_element::<Node<'de>>()? {
            (self.decode)(&node, i, self.report);
            i += 1;
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.wrong_kind("expected an array, found an object")
    }

    wrong_kind_scalars!("an array");
}

fn check_users_unique(users: &[(usize, User)], report: &mut Report) {
    let root = Path::Root;
    let p = root.field("users");
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(users.len());
    let mut keys: HashMap<Fingerprint, (usize, usize, &str)> = HashMap::new();
    for (i, user) in users {
        let up = p.index(*i);
        if let Some(first) = ids.insert(&user.id, *i) {
            report.error(
                &up.field("id"),
                format!("{:?} is also the id of users[{first}]", user.id),
            );
        }
        let kp = up.field("ssh_keys");
        for (k, key) in user.ssh_keys.iter().enumerate() {
            if let Some((fi, fk, owner)) = keys.insert(key.fingerprint, (*i, k, &user.id)) {
                report.error(
                    &kp.index(k).field("public_key"),
                    format!(
                        "the same key ({}) is users[{fi}].ssh_keys[{fk}] (user {owner:?}): a key identifies one user",
                        key.fingerprint
                    ),
                );
            }
        }
    }
}

fn check_vms_unique<'v>(vms: impl ExactSizeIterator<Item = (usize, &'v Vm)>, report: &mut Report) {
    let root = Path::Root;
    let p = root.field("vms");
    let mut ids: HashMap<VmId, usize> = HashMap::with_capacity(vms.len());
    let mut addrs: HashMap<Ipv6Addr, usize> = HashMap::with_capacity(vms.len());
    let mut taps: HashMap<(&str, &str), usize> = HashMap::new();
    let mut v4s: HashMap<(&str, Ipv4Addr), usize> = HashMap::new();
    for (i, vm) in vms {
        let vp = p.index(i);
        if let Some(first) = ids.insert(vm.id, i) {
            report.error(
                &vp.field("id"),
                format!("{} is also the id of vms[{first}]", vm.id),
            );
        }
        if let Some(first) = addrs.insert(vm.public_ipv6, i) {
            report.error(
                &vp.field("public_ipv6"),
                format!("{} is also the address of vms[{first}]", vm.public_ipv6),
            );
        }
        if let Some(tap) = &vm.interface {
            if let Some(first) = taps.insert((&vm.worker, tap), i) {
                report.error(
                    &vp.field("interface"),
                    format!(
                        "{tap:?} on worker {:?} is also the interface of vms[{first}]",
                        vm.worker
                    ),
                );
            }
        }
        if let Some(v4) = vm.ipv4 {
            if let Some(first) = v4s.insert((&vm.worker, v4), i) {
                report.error(
                    &vp.field("ipv4"),
                    format!(
                        "{v4} on worker {:?} is also the address of vms[{first}]",
                        vm.worker
                    ),
                );
            }
        }
    }
}
