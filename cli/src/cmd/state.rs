//! `vmedge state check FILE`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

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
