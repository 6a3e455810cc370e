//! [`FirewallBackend`]: where a compiled ruleset goes. [`NftBackend`] pipes it to
//! `nft -f -`, which applies a file as one transaction: all of it or none of it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use std::sync::{Arc, Mutex, PoisonError};

use crate::compile::{Op, Ruleset, Update};
use crate::errors::FirewallError;
use crate::names;
use crate::netlink::{encode_update, NetlinkSocket, MAX_BATCH};

/// The oldest nftables whose syntax and features the generated text needs.
pub const NFT_MIN_VERSION: (u32, u32, u32) = (1, 0, 0);

/// Where rulesets are applied.
pub trait FirewallBackend {
    /// Applies `ruleset` as one transaction and deletes the per-VM objects of the live
    /// table that it no longer defines. On error nothing changed.
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError>;

    /// Runs a transaction text as it is (an incremental update); all or nothing.
    fn run(&self, text: &str) -> Result<(), FirewallError>;

    /// Applies an incremental change as one transaction.
    fn apply_update(&self, update: &Update<'_>) -> Result<(), FirewallError> {
        self.run(&update.text())
    }

    /// The names of the live table's managed objects (shard chains, block and fqdn sets).
    fn live_objects(&self) -> Result<BTreeSet<String>, FirewallError> {
        Ok(self.live_table()?.objects)
    }

    /// What the live table holds, for drift checks; empty when there is no table.
    fn live_table(&self) -> Result<LiveTable, FirewallError>;
}

/// The shape of the live table: enough to notice someone editing or flushing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveTable {
    /// Managed objects ([`names::is_managed`](crate::names::is_managed)).
    pub objects: BTreeSet<String>,
    /// Rules per chain (every chain of the table, the base chain too).
    pub rules: BTreeMap<String, usize>,
}

/// Applies full rulesets with the `nft` command and incremental updates over netlink
/// (falling back to `nft -f` for what the netlink path does not cover).
#[derive(Debug, Clone)]
pub struct NftBackend {
    program: Vec<String>,
    /// `None`: every change through `nft -f`.
    netlink: Option<Arc<Mutex<Netlink>>>,
}

/// The netlink side of [`NftBackend`].
#[derive(Debug, Default)]
struct Netlink {
    /// The namespace to open the socket in (`None`: this process's).
    netns: Option<String>,
    /// Opened on first use, dropped after an I/O error.
    socket: Option<NetlinkSocket>,
    /// Updates committed over netlink.
    committed: u64,
}

impl Default for NftBackend {
    fn default() -> Self {
        NftBackend {
            program: vec!["nft".into()],
            netlink: Some(Arc::default()),
        }
    }
}

impl NftBackend {
    /// `nft` on this host.
    pub fn new() -> NftBackend {
        NftBackend::default()
    }

    /// A given program in place of `nft` (another path, or a wrapper).
    pub fn with_program(program: Vec<String>) -> NftBackend {
        NftBackend {
            program,
            netlink: None,
        }
    }

    /// How many updates went to the kernel as netlink batches (the rest, if any, went
    /// through `nft -f`).
    pub fn netlink_updates(&self) -> u64 {
        self.netlink.as_ref().map_or(0, |n| {
            n.lock().unwrap_or_else(PoisonError::into_inner).committed
        })
    }

    /// Sends incremental updates through `nft -f` too (to compare the two paths).
    pub fn without_netlink(mut self) -> NftBackend {
        self.netlink = None;
        self
    }

    /// `nft` inside a network namespace (`ip netns exec NAME nft`): for tests and tools.
    pub fn in_netns(name: &str) -> NftBackend {
        NftBackend {
            program: ["ip", "netns", "exec", name, "nft"]
                .map(String::from)
                .to_vec(),
            netlink: Some(Arc::new(Mutex::new(Netlink {
                netns: Some(name.to_string()),
                ..Netlink::default()
            }))),
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

    /// `nft list table inet vmedge` as text; empty when there is no table.
    pub fn list_table(&self) -> Result<String, FirewallError> {
        let out = self
            .command()
            .args(["list", "table", "inet", names::TABLE])
            .output()
            .map_err(FirewallError::NftMissing)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(String::new());
        }
        Err(FirewallError::Listing(err.trim().to_string()))
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
        let live = self.live_objects()?;
        self.run(&ruleset.with_deletions(&live))
    }

    /// One netlink batch (its cost does not grow with the table), or `nft -f` with the
    /// update's text when there is no socket or the batch is too large.
    fn apply_update(&self, update: &Update<'_>) -> Result<(), FirewallError> {
        let Some(netlink) = &self.netlink else {
            return self.run(&update.text());
        };
        let mut netlink = netlink.lock().unwrap_or_else(PoisonError::into_inner);
        if netlink.socket.is_none() {
            netlink.socket = match &netlink.netns {
                Some(name) => NetlinkSocket::open_in_netns(name).ok(),
                None => NetlinkSocket::open().ok(),
            };
        }
        let batch = netlink.socket.as_mut().and_then(|s| {
            // The live handles of the chains it edits: a chain it cannot read is
            // rewritten whole.
            let mut handles = BTreeMap::new();
            for op in &update.ops {
                if let Op::Chain {
                    direction, shard, ..
                } = op
                {
                    let chain = names::shard_chain(*direction, *shard);
                    if let Ok(h) = s.rule_handles(&chain) {
                        handles.insert(chain, h);
                    }
                }
            }
            Some(encode_update(update, s.next_seq(), &handles))
                .filter(|batch| batch.size_bytes() <= MAX_BATCH)
        });
        if let (Some(batch), Some(socket)) = (batch, netlink.socket.as_mut()) {
            let result = socket.commit(batch);
            match result {
                Ok(()) => netlink.committed += 1,
                Err(FirewallError::Io(_)) => netlink.socket = None,
                Err(_) => {}
            }
            return result;
        }
        self.run(&update.text())
    }

    /// `nft -f -` with `text`; a refusal is mapped to the generated line it names.
    fn run(&self, text: &str) -> Result<(), FirewallError> {
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

    fn live_table(&self) -> Result<LiveTable, FirewallError> {
        let out = self
            .command()
            .args(["-j", "list", "table", "inet", names::TABLE])
            .output()
            .map_err(FirewallError::NftMissing)?;
        if !out.status.success() {
            // No table yet: nothing is live.
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No such file or directory") {
                return Ok(LiveTable::default());
            }
            return Err(FirewallError::Listing(err.trim().to_string()));
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| FirewallError::Listing(e.to_string()))?;
        let mut live = LiveTable::default();
        let items = doc["nftables"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for item in items {
            if let Some(name) = item["chain"]["name"].as_str() {
                live.rules.entry(name.to_string()).or_insert(0);
            }
            if let Some(chain) = item["rule"]["chain"].as_str() {
                *live.rules.entry(chain.to_string()).or_insert(0) += 1;
            }
            for kind in ["chain", "set", "map"] {
                if let Some(name) = item[kind]["name"].as_str() {
                    if names::is_managed(name) {
                        live.objects.insert(name.to_string());
                    }
                }
            }
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_old_nft_is_named_at_start() {
        let old = NftBackend::with_program(
            ["sh", "-c", "echo 'nftables v0.9.3 (Topsy)'", "nft"]
                .map(String::from)
                .to_vec(),
        );
        match old.check_version() {
            Err(e @ FirewallError::NftTooOld { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("v0.9.3") && text.contains("1.0.0 or newer"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        let missing = NftBackend::with_program(vec!["/nonexistent/nft".into()]);
        assert!(matches!(
            missing.check_version(),
            Err(FirewallError::NftMissing(_))
        ));
        let new = NftBackend::with_program(
            [
                "sh",
                "-c",
                "echo 'nftables v1.0.6 (Lester Gooch #5)'",
                "nft",
            ]
            .map(String::from)
            .to_vec(),
        );
        assert!(new.check_version().unwrap().contains("v1.0.6"));
    }

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
