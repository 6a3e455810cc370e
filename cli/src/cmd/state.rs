//! `vmedge state check FILE`, `vmedge state push FILE --etcd URL`, `vmedge state pull --etcd URL`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use vmedge_registry::etcd;
use vmedge_registry::keyed::{user_key, vm_key, USERS, VMS};

/// Validates a state file: a summary on success, every error with its JSON path otherwise.
pub fn check(file: &Path) -> anyhow::Result<ExitCode> {
    let Some(state) = super::load_state(file)? else {
        return Ok(ExitCode::FAILURE);
    };
    let workers: BTreeSet<&str> = state.vms.iter().map(|v| v.worker.as_str()).collect();
    let services: usize = state.vms.iter().map(|v| v.services.len()).sum();
    println!(
        "{}: ok: {} VMs on {} workers, {} services, {} users",
        file.display(),
        state.vms.len(),
        workers.len(),
        services,
        state.users.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Validates a state file, then makes etcd hold exactly its objects, each as the file
/// gives it (fields the edge does not read are kept), in one transaction.
pub fn push(file: &Path, endpoints: Vec<String>) -> anyhow::Result<ExitCode> {
    let text = super::read_input(file)?;
    let Some(state) = super::check_state(file, &text) else {
        return Ok(ExitCode::FAILURE);
    };
    // Valid, so both arrays are there in document order, one element per object.
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: cannot read as JSON", file.display()))?;
    let mut objects = BTreeMap::new();
    let elements = |name: &str| {
        doc.get(name)
            .and_then(|v| v.as_array())
            .map_or(&[][..], Vec::as_slice)
    };
    for (user, raw) in state.users.iter().zip(elements("users")) {
        objects.insert(user_key(&user.id), raw.to_string().into_bytes());
    }
    for (vm, raw) in state.vms.iter().zip(elements("vms")) {
        objects.insert(vm_key(&vm.id), raw.to_string().into_bytes());
    }
    let pushed = super::runtime()?.block_on(etcd::push(&endpoints, &objects))?;
    println!(
        "{}: pushed to etcd at revision {}: {} written, {} deleted, {} unchanged ({} VMs, {} users)",
        file.display(),
        pushed.revision,
        pushed.put,
        pushed.deleted,
        pushed.unchanged,
        state.vms.len(),
        state.users.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints what etcd holds as one state document (users, then VMs, in key order). Keys
/// whose value is not JSON are named and left out; the document is checked and its
/// errors printed to stderr (exit 1), so a pull is also a check of what etcd holds.
pub fn pull(endpoints: Vec<String>) -> anyhow::Result<ExitCode> {
    let (keys, revision) = super::runtime()?.block_on(etcd::pull(&endpoints))?;
    let mut users = Vec::new();
    let mut vms = Vec::new();
    let mut ok = true;
    for (key, value) in keys {
        let value: serde_json::Value = match serde_json::from_slice(&value) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{key}: not JSON, left out: {e}");
                ok = false;
                continue;
            }
        };
        if key.starts_with(USERS) {
            users.push(value);
        } else if key.starts_with(VMS) {
            vms.push(value);
        }
    }
    let doc = serde_json::json!({ "users": users, "vms": vms });
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    let origin = format!("etcd revision {revision}");
    ok &= super::check_state(Path::new(&origin), &text).is_some();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
