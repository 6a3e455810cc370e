//! Every nftables name vmedge uses, and only here.
//!
//! Per-VM objects carry the VM id as 32 hex digits, so a listing of the live table says
//! which VM each object belongs to, and stale objects of VMs that left can be found by
//! name. fqdn sets are named by (VM, pattern), not by rule position, so re-ordering or
//! editing other rules never empties a set the DNS gate has filled.

use vmedge_model::{DomainPattern, VmId};

/// The table: `table inet vmedge`.
pub const TABLE: &str = "vmedge";
/// The base chain on the forward hook.
pub const FORWARD_CHAIN: &str = "forward";
/// Egress by the VM's tap (`iifname`).
pub const EGRESS_BY_IF: &str = "egress_by_if";
/// Egress by the VM's IPv6 source, for VMs without a tap in the state.
pub const EGRESS_BY_ADDR: &str = "egress_by_addr";
/// Ingress by the VM's tap (`oifname`).
pub const INGRESS_BY_IF: &str = "ingress_by_if";
/// Ingress by the VM's IPv6 destination, for VMs without a tap in the state.
pub const INGRESS_BY_ADDR: &str = "ingress_by_addr";
/// ICMPv6 types that always pass.
pub const ICMPV6_ESSENTIAL: &str = "icmpv6_essential";
/// Public DoH resolvers, IPv4 (for `block_bypass`).
pub const DOH_V4: &str = "doh_v4";
/// Public DoH resolvers, IPv6 (for `block_bypass`).
pub const DOH_V6: &str = "doh_v6";

/// A direction of a VM's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// To the VM.
    Ingress,
    /// From the VM.
    Egress,
}

impl Direction {
    fn prefix(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        }
    }
}

/// How many shards the VMs are split into, by id ([`shard_of`]). Each shard has a chain
/// per direction and its own block maps.
///
/// Taking an element out of a concatenated interval set (the kernel's pipapo) costs time
/// linear in the set's size: with one map shared by all VMs, one VM's change cost O(VMs)
/// (63% of a one-VM sync at 1000 VMs, bench/RESULTS.md). A shard holds about 1/64 of the
/// VMs, while the number of chains and maps stays independent of the number of VMs
/// (the kernel checks every chain a transaction can reach when it adds a rule).
pub const SHARDS: u8 = 64;

/// The shard of a VM: from its id's last byte (random in a v4 UUID), so it never changes
/// while the VM lives.
pub fn shard_of(vm: &VmId) -> u8 {
    vm.as_uuid().as_bytes()[15] % SHARDS
}

/// The chain of a shard for a direction: `in_s<shard>`, `out_s<shard>`. The dispatch maps
/// send each VM's packets to its shard's chain.
pub fn shard_chain(direction: Direction, shard: u8) -> String {
    let mut name = String::new();
    push_shard_chain(&mut name, direction, shard);
    name
}

/// [`shard_chain`] written onto `out` (block map names start with it).
pub(crate) fn push_shard_chain(out: &mut String, direction: Direction, shard: u8) {
    out.push_str(direction.prefix());
    out.push_str("_s");
    crate::text::push_u32(out, u32::from(shard));
}

/// VMs with a tap: their packets' sources are checked.
pub const TAP_VMS: &str = "tap_vms";
/// `tap . IPv6 address` a VM with a tap may send from.
pub const TAP_SRC6: &str = "tap_src6";
/// `tap . IPv4 address` a VM with a tap may send from.
pub const TAP_SRC4: &str = "tap_src4";
/// IPv6 addresses of VMs under `block_bypass` (DoT and DoH dropped).
pub const BLOCK_BYPASS6: &str = "block_bypass6";
/// IPv4 addresses of VMs under `block_bypass`.
pub const BLOCK_BYPASS4: &str = "block_bypass4";

/// The set of VMs whose default in `direction` is deny, keyed by tap or by address.
pub fn default_deny(direction: Direction, by_tap: bool) -> &'static str {
    match (direction, by_tap) {
        (Direction::Ingress, true) => "default_deny_in_if",
        (Direction::Ingress, false) => "default_deny_in_addr",
        (Direction::Egress, true) => "default_deny_out_if",
        (Direction::Egress, false) => "default_deny_out_addr",
    }
}

/// The two dynamic sets (IPv4, IPv6) the DNS gate fills for an egress fqdn pattern of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnSets {
    /// `type ipv4_addr; flags timeout`
    pub v4: String,
    /// `type ipv6_addr; flags timeout`
    pub v6: String,
}

/// The sets of (VM, fqdn pattern). Rules of the VM with the same pattern share them.
pub fn fqdn_sets(vm: &VmId, pattern: &DomainPattern) -> FqdnSets {
    let tag = fnv1a64(pattern.to_string().as_bytes());
    FqdnSets {
        v4: format!("fq_{}_{tag:016x}_4", vm.hex()),
        v6: format!("fq_{}_{tag:016x}_6", vm.hex()),
    }
}

/// True for the objects a sync creates and may delete: shard chains, block maps and fqdn
/// sets (and the per-VM chains of older versions), not the table's fixed objects.
pub fn is_managed(name: &str) -> bool {
    ["in_", "out_", "fq_"].iter().any(|p| name.starts_with(p))
}

/// True for a chain a sync manages (a shard's, or a VM's of an older version), not a map
/// or set.
pub fn is_managed_chain(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("in_")
        .or_else(|| name.strip_prefix("out_"))
    else {
        return false;
    };
    let shard = rest
        .strip_prefix('s')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()));
    let vm = rest.len() == 32 && rest.bytes().all(|c| c.is_ascii_hexdigit());
    shard || vm
}

/// FNV-1a: stable across builds and versions (the names outlive the process).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_per_vm() {
        let vm = VmId::parse("6f1c2d3e-0000-4000-8000-0000000000aa").unwrap();
        assert_eq!(shard_of(&vm), 0xaa % SHARDS);
        assert_eq!(shard_chain(Direction::Ingress, 42), "in_s42");
        let sets = fqdn_sets(&vm, &DomainPattern::parse("*.pypi.org").unwrap());
        // Fixed forever: the DNS gate and running tables depend on it.
        assert_eq!(
            sets.v4,
            "fq_6f1c2d3e0000400080000000000000aa_63a47daa1aeccd41_4"
        );
        assert_eq!(
            fqdn_sets(&vm, &DomainPattern::parse("*.PyPI.org.").unwrap()),
            sets,
            "case and dot do not matter"
        );
        assert!(is_managed(&sets.v6) && is_managed(&shard_chain(Direction::Egress, 3)));
        assert!(!is_managed(FORWARD_CHAIN) && !is_managed(EGRESS_BY_IF) && !is_managed(DOH_V4));
        assert!(!is_managed(TAP_SRC6) && !is_managed(default_deny(Direction::Ingress, true)));
        assert!(is_managed_chain(&shard_chain(Direction::Egress, 63)));
        assert!(
            is_managed_chain("in_6f1c2d3e0000400080000000000000aa"),
            "an older version's"
        );
        assert!(!is_managed_chain("in_s3_b0_allow_tcp6"));
        assert!(!is_managed_chain(&sets.v4));
    }
}
