//! `vmedge config check FILE`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// Validates a config file; `print` shows every value, defaults filled in.
pub fn check(file: &Path, print: bool) -> anyhow::Result<ExitCode> {
    match Config::load(file) {
        Ok(config) => {
            if print {
                println!("{config:#?}");
            } else {
                println!("{}: ok", file.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}
