//! The state document: every user and VM the edge serves (DESIGN.md, "The state").

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use serde_json::Value;

use crate::errors::{FieldError, FieldErrors, ModelError};
use crate::policy::{decode_policy, FirewallPolicy, PolicyShape};
use crate::user::{decode_user, Fingerprint, User};
use crate::validate::{array, deny_unknown, object, optional, Path, Report};
use crate::vm::{decode_vm, Vm, VmId};

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

fn parse_json(text: &str) -> Result<Value, ModelError> {
    serde_json::from_str(text).map_err(|e| ModelError::syntax(&e))
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
pub fn parse_state(text: &str) -> Result<Parsed<State>, ModelError> {
    state_from_value(&parse_json(text)?)
}

/// Validates an already-parsed state document.
pub fn state_from_value(doc: &Value) -> Result<Parsed<State>, ModelError> {
    let mut report = Report::default();
    let state = decode_state(doc, &mut report);
    finish(state, report)
}

/// Parses and validates one VM object (as stored per key in etcd).
pub fn parse_vm(text: &str) -> Result<Parsed<Vm>, ModelError> {
    let mut report = Report::default();
    let vm = decode_vm(&parse_json(text)?, &Path::Root, &mut report);
    finish(vm, report)
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

fn decode_state(doc: &Value, report: &mut Report) -> Option<State> {
    let root = Path::Root;
    let map = object(doc, &root, report)?;
    deny_unknown(map, &["users", "vms"], &root, report);

    // Each object keeps its document index so that duplicate messages can name both sides.
    let mut users = Vec::new();
    if let Some(v) = optional(map, "users") {
        let p = root.field("users");
        let items = array(v, &p, report).unwrap_or_default();
        users.reserve(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(user) = decode_user(item, &p.index(i), report) {
                users.push((i, user));
            }
        }
    }
    let mut vms = Vec::new();
    if let Some(v) = optional(map, "vms") {
        let p = root.field("vms");
        let items = array(v, &p, report).unwrap_or_default();
        vms.reserve(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(vm) = decode_vm(item, &p.index(i), report) {
                vms.push((i, vm));
            }
        }
    }
    check_users_unique(&users, report);
    check_vms_unique(&vms, report);
    Some(State {
        users: users.into_iter().map(|(_, u)| u).collect(),
        vms: vms.into_iter().map(|(_, v)| v).collect(),
    })
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

fn check_vms_unique(vms: &[(usize, Vm)], report: &mut Report) {
    let root = Path::Root;
    let p = root.field("vms");
    let mut ids: HashMap<VmId, usize> = HashMap::with_capacity(vms.len());
    let mut addrs: HashMap<Ipv6Addr, usize> = HashMap::with_capacity(vms.len());
    let mut taps: HashMap<(&str, &str), usize> = HashMap::new();
    let mut v4s: HashMap<(&str, Ipv4Addr), usize> = HashMap::new();
    for (i, vm) in vms {
        let vp = p.index(*i);
        if let Some(first) = ids.insert(vm.id, *i) {
            report.error(
                &vp.field("id"),
                format!("{} is also the id of vms[{first}]", vm.id),
            );
        }
        if let Some(first) = addrs.insert(vm.public_ipv6, *i) {
            report.error(
                &vp.field("public_ipv6"),
                format!("{} is also the address of vms[{first}]", vm.public_ipv6),
            );
        }
        if let Some(tap) = &vm.interface {
            if let Some(first) = taps.insert((&vm.worker, tap), *i) {
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
            if let Some(first) = v4s.insert((&vm.worker, v4), *i) {
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
