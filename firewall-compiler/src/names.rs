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

/// The chain that holds one VM's rules for one direction.
pub fn vm_chain(vm: &VmId, direction: Direction) -> String {
    format!("{}_{}", direction.prefix(), vm.hex())
}

/// How many sets each block set is split into, by VM ([`shard_of`]).
///
/// Taking an element out of a concatenated interval set (the kernel's pipapo) costs time
/// linear in the set's size: with one set shared by all VMs, one VM's change cost O(VMs)
/// (63% of a one-VM sync at 1000 VMs, bench/RESULTS.md). A shard holds about 1/64 of the
/// VMs, while the number of sets stays independent of the number of VMs.
pub const BLOCK_SET_SHARDS: u8 = 64;

/// The shard of a VM's block set elements: from its id's last byte (random in a v4 UUID),
/// so it never changes while the VM lives.
pub fn shard_of(vm: &VmId) -> u8 {
    vm.as_uuid().as_bytes()[15] % BLOCK_SET_SHARDS
}

/// The set shared by the VMs of shard `shard` for their block `block` of a direction:
/// `in_b<block>_<kind>_s<shard>`. Its elements start with the VM's own address, so VMs
/// never see each other's rules, and the number of sets does not grow with the number of
/// VMs (the kernel finds a set by name with a linear walk; nft's userspace cache grows
/// with them too).
pub fn block_set(direction: Direction, block: usize, kind: &str, shard: u8) -> String {
    let mut name = String::new();
    push_block_set(&mut name, direction, block, kind, "", shard);
    name
}

/// [`block_set`] written onto `out`, the kind in two parts (`tcp`, `6`): the text of a
/// full sync names a block set once per VM, so this allocates nothing.
pub(crate) fn push_block_set(
    out: &mut String,
    direction: Direction,
    block: usize,
    kind: &str,
    family: &str,
    shard: u8,
) {
    out.push_str(direction.prefix());
    out.push_str("_b");
    crate::text::push_u32(out, u32::try_from(block).unwrap_or(u32::MAX));
    out.push('_');
    out.push_str(kind);
    out.push_str(family);
    out.push_str("_s");
    crate::text::push_u32(out, u32::from(shard));
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

/// True for the objects a sync creates and may delete: VM chains, fqdn sets and the shared
/// block sets (not the table's fixed objects: base chain, maps, ICMPv6 and DoH sets).
pub fn is_managed(name: &str) -> bool {
    ["in_", "out_", "fq_"].iter().any(|p| name.starts_with(p))
}

/// True for a VM's chain (`in_<32 hex>` or `out_<32 hex>`), not one of its sets.
pub fn is_vm_chain(name: &str) -> bool {
    let hex = name
        .strip_prefix("in_")
        .or_else(|| name.strip_prefix("out_"));
    hex.is_some_and(|h| h.len() == 32 && h.bytes().all(|c| c.is_ascii_hexdigit()))
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
        assert_eq!(
            vm_chain(&vm, Direction::Ingress),
            "in_6f1c2d3e0000400080000000000000aa"
        );
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
        assert!(is_managed(&sets.v6) && is_managed(&vm_chain(&vm, Direction::Egress)));
        assert!(!is_managed(FORWARD_CHAIN) && !is_managed(EGRESS_BY_IF) && !is_managed(DOH_V4));
        let b_vm = VmId::parse("b2c3d4e5-7777-4000-8000-000000000022").unwrap();
        assert!(is_vm_chain(&vm_chain(&b_vm, Direction::Ingress)));
        assert!(!is_vm_chain(&block_set(Direction::Ingress, 0, "tcp6", 3)));
        assert!(!is_vm_chain(&sets.v4));
    }
}
