//! `vmedge state check FILE`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use super::{print_model_error, print_warnings, read_input};

/// Validates a state file: a summary on success, every error with its JSON path otherwise.
pub fn check(file: &Path) -> anyhow::Result<ExitCode> {
    let text = read_input(file)?;
    match vmedge_model::parse_state(&text) {
        Ok(parsed) => {
            print_warnings(file, &parsed.warnings);
            let state = parsed.value;
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
        Err(e) => {
            print_model_error(file, &e);
            Ok(ExitCode::FAILURE)
        }
    }
}
