//! One module per subcommand.

pub mod config;
pub mod firewall;
pub mod state;
pub mod up;

use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// Reads a file, or standard input for "-".
pub fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Prints a refused document: `FILE:LINE:COL: ...` for syntax, else a count and one error per line.
pub fn print_model_error(origin: &Path, error: &vmedge_model::ModelError) {
    match error {
        vmedge_model::ModelError::Syntax {
            line,
            column,
            message,
        } => {
            eprintln!(
                "{}:{line}:{column}: not valid JSON: {message}",
                origin.display()
            );
        }
        vmedge_model::ModelError::Invalid(errors) => {
            let n = errors.len();
            eprintln!(
                "{}: {n} error{}:",
                origin.display(),
                if n == 1 { "" } else { "s" }
            );
            for e in errors.iter() {
                eprintln!("  {e}");
            }
        }
    }
}

/// Prints warnings of an accepted document.
pub fn print_warnings(origin: &Path, warnings: &[vmedge_model::FieldError]) {
    for w in warnings {
        eprintln!("{}: warning: {w}", origin.display());
    }
}
