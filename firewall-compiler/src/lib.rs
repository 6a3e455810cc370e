//! The firewall compiler: VM policies to one atomic nftables transaction.
//!
//! # Layout
//! - [`canonical`]: one direction of an effective policy, merged into blocks of
//!   same-action set elements, first-match order kept, dead rules dropped.
//! - [`section`]: one VM's effective policy to its typed set elements and fqdn rules
//!   ([`VmSection`]), rendered as nft text or netlink messages.
//! - [`shard`]: the chains the VMs of a shard share, and the closed set of rule forms
//!   they hold.
//! - [`compile`]: a worker's sections to the text of one transaction on `table inet
//!   vmedge` (pure: no I/O, deterministic), and [`update`]: what changed between two.
//! - [`names`]: every nftables name, including the fqdn set names the DNS gate fills.
//! - [`diff`]: the live table against the desired one, as nft lists them.
//! - [`explain`]: which rule (or default) decides a packet, evaluated in process.
//! - [`backend`]: the [`FirewallBackend`] seam and [`NftBackend`] (`nft -f -`).
//! - [`errors`]: [`FirewallError`], with nft's own message and the line it points at.
//! - `text`: addresses and numbers written into the ruleset text without `fmt`.
//!
//! - [`netlink`]: an [`Update`] as one nf_tables batch, sent straight to the kernel.
//!
//! A full sync's path: `compile()` -> `backend.apply()` (`nft -f`; stale per-VM objects
//! found in the live table are deleted in the same transaction). An incremental sync's:
//! `compile_vm()` for the VMs that changed -> `update()` -> `backend.apply_update()`
//! (netlink; `nft -f` for a block map the table does not have yet).

pub mod backend;
pub mod canonical;
pub mod compile;
pub mod diff;
pub mod errors;
pub mod explain;
pub mod names;
pub mod netlink;
pub mod section;
pub mod shard;
mod text;

pub use compile::rule_counts;

pub use backend::{FirewallBackend, LiveTable, NftBackend};
pub use compile::{
    assemble, compile, compile_sections, update, CompileOptions, Op, Ruleset, Update,
};
pub use errors::FirewallError;
pub use explain::{explain, Explanation, Packet, Reason};
pub use names::{fqdn_sets, Direction, FqdnSets};
pub use section::{
    compile_vm, compile_vm_with, fqdn_targets, BlockKind, BlockSet, Canonicals, Dispatch, Element,
    FqdnRule, Member, VmSection,
};
