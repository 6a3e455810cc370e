//! Every nftables name vmedge uses, and only here.
//!
//! The only per-VM objects are fqdn sets; they carry the VM id (in base 62, its last
//! digits first), so no two VMs' sets share a name whatever their patterns. They are
//! named by (VM, pattern), not by rule position, so re-ordering or editing other rules
//! never empties a set the DNS gate has filled.
//! Everything else is shared: shard chains and block sets (by a hash of the VM's
//! address) and worker-wide sets keyed by tap or address.

use std::net::IpAddr;

use vmedge_model::{DomainPattern, Vm};

/// The table: `table inet vmedge`.
pub const TABLE: &str = "vmedge";
/// The base chain on the forward hook.
pub const FORWARD_CHAIN: &str = "forward";
/// The chain a VM's packets go to first (by tap, or by IPv6 source): it picks the egress
/// chain of the source address's shard.
pub const EGRESS_CHAIN: &str = "egress";
/// The chain packets to a VM go to first (by tap, or by IPv6 destination): it picks the
/// ingress chain of the destination address's shard.
pub const INGRESS_CHAIN: &str = "ingress";
/// IPv6 addresses of the VMs without a tap in the state: their packets are theirs by
/// address.
pub const VM_ADDRS: &str = "vm_addrs";
/// The dispatch chain of a direction.
pub fn dispatch_chain(direction: Direction) -> &'static str {
    match direction {
        Direction::Egress => EGRESS_CHAIN,
        Direction::Ingress => INGRESS_CHAIN,
    }
}

/// The dispatch maps of older versions (VM -> its own chains), deleted when found.
pub const LEGACY_MAPS: [&str; 4] = [
    "egress_by_if",
    "egress_by_addr",
    "ingress_by_if",
    "ingress_by_addr",
];
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

/// How many shards the VMs' addresses are split into ([`shard_of`]). Each shard has a
/// chain per direction and its own block sets.
///
/// Taking an element out of a concatenated interval set (the kernel's pipapo) costs time
/// linear in the set's size: with one set shared by all VMs, one VM's change cost O(VMs)
/// (63% of a one-VM sync at 1000 VMs, bench/RESULTS.md). A shard holds about 1/64 of the
/// VMs, while the number of chains and sets stays independent of the number of VMs.
pub const SHARDS: u8 = 64;

/// The seed of the shard hash: the kernel's `jhash ... seed 0x76656467` ("vedg").
pub const SHARD_SEED: u32 = 0x7665_6467;

/// The shard of a VM's address: what the kernel's `jhash <addr> mod 64 seed SHARD_SEED`
/// gives for it, so the dispatch chains find a packet's shard with no per-VM entry (a
/// per-VM verdict map entry made the kernel check the shard's chain once per VM whenever
/// a rule was added).
pub fn shard_of(addr: IpAddr) -> u8 {
    let hash = match addr {
        IpAddr::V4(a) => jhash(&a.octets(), SHARD_SEED),
        IpAddr::V6(a) => jhash(&a.octets(), SHARD_SEED),
    };
    // The kernel's reciprocal_scale: (hash * n) >> 32.
    u8::try_from((u64::from(hash) * u64::from(SHARDS)) >> 32).unwrap_or(0)
}

/// The kernel's `jhash()` (Bob Jenkins' lookup3, include/linux/jhash.h), as `nft_hash`
/// runs it over a register's bytes: words are read in the host's byte order.
fn jhash(key: &[u8], initval: u32) -> u32 {
    fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
        *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }
    let word = |k: &[u8]| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
    let length = u32::try_from(key.len()).unwrap_or(u32::MAX);
    let init = 0xdead_beef_u32.wrapping_add(length).wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = key;
    while k.len() > 12 {
        a = a.wrapping_add(word(&k[0..4]));
        b = b.wrapping_add(word(&k[4..8]));
        c = c.wrapping_add(word(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    if k.is_empty() {
        return c;
    }
    // The last 1..=12 bytes, little end first, whatever the host.
    let mut tail = [0u32; 3];
    for (i, byte) in k.iter().enumerate() {
        tail[i / 4] = tail[i / 4].wrapping_add(u32::from(*byte) << (8 * (i % 4)));
    }
    a = a.wrapping_add(tail[0]);
    b = b.wrapping_add(tail[1]);
    c = c.wrapping_add(tail[2]);
    c = (c ^ b).wrapping_sub(b.rotate_left(14));
    a = (a ^ c).wrapping_sub(c.rotate_left(11));
    b = (b ^ a).wrapping_sub(a.rotate_left(25));
    c = (c ^ b).wrapping_sub(b.rotate_left(16));
    a = (a ^ c).wrapping_sub(c.rotate_left(4));
    b = (b ^ a).wrapping_sub(a.rotate_left(14));
    (c ^ b).wrapping_sub(b.rotate_left(24))
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

/// The dynamic sets the DNS gate fills for an egress fqdn pattern of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnSets {
    /// `type ipv4_addr; flags timeout`. None for a VM without an IPv4 address (the
    /// state's `ipv4`): no IPv4 packet is attributed to it, so no rule would look in the
    /// set, and every set there is makes each walk of the table's set list longer.
    pub v4: Option<String>,
    /// `type ipv6_addr; flags timeout`
    pub v6: String,
}

/// The sets of (VM, fqdn pattern). Rules of the VM with the same pattern share them.
/// An IPv4 set only for a VM with an IPv4 address (see [`FqdnSets::v4`]).
///
/// `fq_<VM id>_<pattern hash>_4`, both numbers in base 62 with their last digits first:
/// the kernel finds a set by walking the table's list of sets and comparing each name
/// (its length, then its bytes), and every fqdn set is created, looked up and deleted
/// by name. A name of ~38 characters that differs from its neighbours' in its first few
/// (ids made in sequence differ in their last digits) makes every step of such a walk
/// cheaper than one of 55 that begins with the id in hex (bench/RESULTS.md, session 17).
pub fn fqdn_sets(vm: &Vm, pattern: &DomainPattern) -> FqdnSets {
    let mut v6 = String::with_capacity(40);
    v6.push_str("fq_");
    push_base62_reversed(&mut v6, vm.id.as_uuid().as_u128());
    v6.push('_');
    push_base62_reversed(&mut v6, u128::from(fnv1a64(pattern.to_string().as_bytes())));
    v6.push_str("_6");
    // The same name but its last character: one format, not two (10k VMs name 40k sets).
    let v4 = vm.ipv4.map(|_| {
        let mut v4 = v6.clone();
        v4.pop();
        v4.push('4');
        v4
    });
    FqdnSets { v4, v6 }
}

/// `n` in base 62 (`0-9a-zA-Z`, characters nft takes in a name), least significant digit
/// first; at least one digit.
fn push_base62_reversed(out: &mut String, mut n: u128) {
    const DIGITS: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    loop {
        out.push(char::from(DIGITS[(n % 62) as usize]));
        n /= 62;
        if n == 0 {
            break;
        }
    }
}

/// True for the objects a sync creates and may delete: shard chains, block sets and fqdn
/// sets (and the per-VM chains, sets and maps of older versions), not the table's fixed
/// objects.
pub fn is_managed(name: &str) -> bool {
    ["in_", "out_", "fq_"].iter().any(|p| name.starts_with(p)) || LEGACY_MAPS.contains(&name)
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
    fn shards_are_the_kernels_jhash() {
        // What `jhash ip6 saddr mod 64 seed 0x76656467` (and `ip saddr`) gave these
        // source addresses on Linux 6.18 (packets counted in 64 chains).
        for (addr, shard) in [
            ("fd5e:ed00:77::1", 6),
            ("fd5e:ed00:77::2", 14),
            ("fd5e:ed00:77::3", 3),
            ("198.18.77.1", 18),
            ("198.18.77.2", 17),
            ("198.18.77.3", 29),
        ] {
            assert_eq!(shard_of(addr.parse().unwrap()), shard, "{addr}");
        }
    }

    /// A VM named by `id`, with an IPv4 address or without.
    fn vm_of(id: &str, ipv4: Option<&str>) -> Vm {
        Vm {
            id: vmedge_model::VmId::parse(id).unwrap(),
            org_id: "o".into(),
            worker: "w".into(),
            public_ipv6: "fd5e:ed00:1::2".parse().unwrap(),
            status: vmedge_model::VmStatus::Running,
            services: Vec::new(),
            firewall: vmedge_model::FirewallPolicy::default(),
            ssh_host_keys: None,
            interface: Some("vmtap0".into()),
            ipv4: ipv4.map(|a| a.parse().unwrap()),
        }
    }

    #[test]
    fn names_are_stable_and_per_vm() {
        let vm = vm_of("6f1c2d3e-0000-4000-8000-0000000000aa", Some("198.18.0.2"));
        assert_eq!(shard_chain(Direction::Ingress, 42), "in_s42");
        let sets = fqdn_sets(&vm, &DomainPattern::parse("*.pypi.org").unwrap());
        // Fixed: the DNS gate and running tables depend on it. A change makes the next
        // sync replace every fqdn set with an empty one.
        let v4 = sets.v4.as_deref().unwrap();
        assert_eq!(v4, "fq_INezmjmKdAX8tnd3ty1Fn3_FQmjQq3uoy8_4");
        assert_eq!(sets.v6, "fq_INezmjmKdAX8tnd3ty1Fn3_FQmjQq3uoy8_6");
        // The next VM's sets differ from the first character of the id on.
        let next = vm_of("6f1c2d3e-0000-4000-8000-0000000000ab", None);
        let next = fqdn_sets(&next, &DomainPattern::parse("*.pypi.org").unwrap());
        assert_ne!(next.v6.as_bytes()[3], sets.v6.as_bytes()[3]);
        assert!(next.v6.len() <= 40 && v4.len() <= 40);
        // A VM without an IPv4 address has no IPv4 set.
        assert_eq!(next.v4, None);
        assert_eq!(
            fqdn_sets(&vm, &DomainPattern::parse("*.PyPI.org.").unwrap()),
            sets,
            "case and dot do not matter"
        );
        assert!(is_managed(&sets.v6) && is_managed(&shard_chain(Direction::Egress, 3)));
        assert!(!is_managed(FORWARD_CHAIN) && !is_managed(EGRESS_CHAIN) && !is_managed(DOH_V4));
        assert!(
            is_managed(LEGACY_MAPS[0]),
            "an older version's map is deleted when found"
        );
        assert!(!is_managed(TAP_SRC6) && !is_managed(default_deny(Direction::Ingress, true)));
        assert!(is_managed_chain(&shard_chain(Direction::Egress, 63)));
        assert!(
            is_managed_chain("in_6f1c2d3e0000400080000000000000aa"),
            "an older version's"
        );
        assert!(!is_managed_chain("in_s3_b0_allow_tcp6"));
        assert!(!is_managed_chain(v4));
    }
}
