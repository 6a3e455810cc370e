//! `vmedge firewall check POLICY`.

use std::path::Path;
use std::process::ExitCode;

use vmedge_model::PolicyShape;

use super::{print_model_error, print_warnings, read_input};

/// Validates one policy document; `print` shows it as the worker reads it.
pub fn check(file: &Path, print: bool) -> anyhow::Result<ExitCode> {
    let text = read_input(file)?;
    match vmedge_model::parse_policy(&text) {
        Ok(parsed) => {
            print_warnings(file, &parsed.warnings);
            let (policy, shape) = parsed.value;
            if print {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                let shape = match shape {
                    PolicyShape::Current => "seed 001 shape",
                    PolicyShape::Legacy => "seed 002 shape, converted",
                };
                println!(
                    "{}: ok ({shape}): ingress {} rules, default {}; egress {} rules, default {}; dns {} mode with {} domains",
                    file.display(),
                    policy.ingress.rules.len(),
                    policy.ingress.default,
                    policy.egress.rules.len(),
                    policy.egress.default,
                    policy.dns.mode,
                    policy.dns.domains.len(),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            print_model_error(file, &e);
            Ok(ExitCode::FAILURE)
        }
    }
}
