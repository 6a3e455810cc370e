//! [`FirewallBackend`]: where a compiled ruleset goes. [`NftBackend`] pipes it to
//! `nft -f -`, which applies a file as one transaction: all of it or none of it.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::compile::Ruleset;
use crate::errors::FirewallError;
use crate::names;

/// The oldest nftables whose syntax and features the generated text needs.
pub const NFT_MIN_VERSION: (u32, u32, u32) = (1, 0, 0);

/// Where rulesets are applied.
pub trait FirewallBackend {
    /// Applies `ruleset` as one transaction and deletes the per-VM objects of the live
    /// table that it no longer defines. On error nothing changed.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError>;

    /// The per-VM chains and sets of the live table: (every object, the chains among them).
    fn live_objects(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), FirewallError>;
}

/// Applies rulesets with the `nft` command.
#[derive(Debug, Clone)]
pub struct NftBackend {
    program: Vec<String>,
}

impl Default for NftBackend {
    fn default() -> Self {
        NftBackend {
            program: vec!["nft".into()],
        }
    }
}

impl NftBackend {
    /// `nft` on this host.
    pub fn new() -> NftBackend {
        NftBackend::default()
    }

    /// `nft` inside a network namespace (`ip netns exec NAME nft`): for tests and tools.
    pub fn in_netns(name: &str) -> NftBackend {
        NftBackend {
            program: ["ip", "netns", "exec", name, "nft"]
                .map(String::from)
                .to_vec(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..]);
        c
    }

    /// Checks that nft runs and is new enough; returns the version it printed.
    pub fn check_version(&self) -> Result<String, FirewallError> {
        let out = self
            .command()
            .arg("--version")
            .output()
            .map_err(FirewallError::NftMissing)?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // "nftables v1.0.6 (Lester Gooch #5)"
        let version = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('v'))
            .unwrap_or_default();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        if !out.status.success() || found < NFT_MIN_VERSION {
            let (a, b, c) = NFT_MIN_VERSION;
            return Err(FirewallError::NftTooOld {
                found: if text.is_empty() {
                    "(no version printed)".into()
                } else {
                    text
                },
                needed: format!("{a}.{b}.{c}"),
            });
        }
        Ok(text)
    }

    /// Runs `nft -f -` with `text`; maps a refusal to the generated line it names.
    pub fn run_transaction(&self, text: &str) -> Result<(), FirewallError> {
        let mut child = self
            .command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FirewallError::NftMissing)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .map_err(FirewallError::Io)?;
        }
        let out = child.wait_with_output().map_err(FirewallError::Io)?;
        if out.status.success() {
            return Ok(());
        }
        Err(refusal(&String::from_utf8_lossy(&out.stderr), text))
    }
}

/// nft reports `/dev/stdin:LINE:COL-COL: Error: ...`; keep the first error and its line.
fn refusal(stderr: &str, text: &str) -> FirewallError {
    let first = stderr
        .lines()
        .find(|l| l.contains("Error:"))
        .unwrap_or(stderr.trim())
        .to_string();
    let line = first
        .strip_prefix("/dev/stdin:")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| {
            text.lines()
                .nth(n.checked_sub(1)?)
                .map(|l| (n, l.to_string()))
        });
    let message = first
        .split_once("Error: ")
        .map_or(first.as_str(), |(_, m)| m)
        .to_string();
    FirewallError::Refused { message, line }
}

impl FirewallBackend for NftBackend {
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let (live, chains) = self.live_objects()?;
        self.run_transaction(&ruleset.with_deletions(&live, &chains))
    }

    fn live_objects(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), FirewallError> {
        let out = self
            .command()
            .args(["-j", "list", "table", "inet", names::TABLE])
            .output()
            .map_err(FirewallError::NftMissing)?;
        if !out.status.success() {
            // No table yet: nothing is live.
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No such file or directory") {
                return Ok(Default::default());
            }
            return Err(FirewallError::Listing(err.trim().to_string()));
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| FirewallError::Listing(e.to_string()))?;
        let mut all = BTreeSet::new();
        let mut chains = BTreeSet::new();
        for item in doc["nftables"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            for (kind, is_chain) in [("chain", true), ("set", false), ("map", false)] {
                if let Some(name) = item[kind]["name"].as_str() {
                    if names::is_per_vm(name) {
                        all.insert(name.to_string());
                        if is_chain {
                            chains.insert(name.to_string());
                        }
                    }
                }
            }
        }
        Ok((all, chains))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_generated_line() {
        let text = "add table inet vmedge\nadd rule inet vmedge nope drop\n";
        let stderr = "/dev/stdin:2:22-25: Error: No such file or directory; did you mean chain 'x'?\nadd rule inet vmedge nope drop\n                     ^^^^\n";
        match refusal(stderr, text) {
            FirewallError::Refused { message, line } => {
                assert_eq!(
                    message,
                    "No such file or directory; did you mean chain 'x'?"
                );
                assert_eq!(
                    line,
                    Some((2, "add rule inet vmedge nope drop".to_string()))
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
