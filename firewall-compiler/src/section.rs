//! One VM's part of the table, as typed set elements.
//!
//! A [`VmSection`] is what a VM's effective policy compiles to: its elements in its
//! shard's block sets, its entries in the worker-wide sets
//! (anti-spoof, `block_bypass`, default deny), and its fqdn sets and rules. It is written
//! two ways from the same values: as `nft -f` text (full syncs, the CLI and golden
//! tests) and as netlink messages (`netlink`, for incremental syncs), so the two cannot
//! disagree on what a policy means, only on spelling, which an end-to-end test compares.

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use foldhash::HashMap;
use ipnet::IpNet;
use vmedge_model::{
    Action, DirectionPolicy, DomainPattern, FirewallPolicy, Ports, Protocol, Vm, VmId,
};

use crate::canonical::{canonicalize, CanonicalDirection, Family, PortRange, L4};
use crate::names::{self, Direction};
use crate::text;

/// How the base chain knows a VM's packets: by its tap, or (no tap in the state) by its
/// IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dispatch {
    /// `iifname` / `oifname` of the VM's tap (shared with the VM's members).
    Tap(Arc<str>),
    /// `ip6 saddr` / `ip6 daddr` of the VM's public address.
    Address(Ipv6Addr),
}

impl Dispatch {
    fn of(vm: &Vm) -> Dispatch {
        match &vm.interface {
            Some(tap) => Dispatch::Tap(Arc::from(tap.as_str())),
            None => Dispatch::Address(vm.public_ipv6),
        }
    }
}

/// What a block set holds, whatever the shard: one direction's block of one verdict and
/// kind. Ordered as a shard chain looks them up: by direction, then block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKind {
    /// Whose rules: the VM as destination (ingress) or source (egress).
    pub direction: Direction,
    /// The block's position in the canonical policy.
    pub block: u16,
    /// The block's verdict (VMs of a shard may differ at the same block).
    pub action: Action,
    /// Address family of both addresses.
    pub family: Family,
    /// With a port (`. inet_service`) for tcp or udp; address only for `protocol any`.
    pub l4: Option<L4>,
}

/// A set shared by the VMs of a shard for one [`BlockKind`]:
/// `in_s<shard>_b<block>_<allow|deny>_<kind>`. Its elements start with the VM's own
/// address, so VMs never see each other's rules. A plain set, not a verdict map: the
/// kernel walks every element of a verdict map whenever a rule is added anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSet {
    /// What it holds.
    pub kind: BlockKind,
    /// Whose elements it holds: the VMs' addresses of this shard ([`names::shard_of`]).
    pub shard: u8,
}

impl BlockSet {
    /// Its declaration: `type ipv6_addr . ipv6_addr . inet_service; flags interval;`.
    pub fn declaration(&self) -> String {
        let at = addr_type(self.kind.family);
        match self.kind.l4 {
            Some(_) => format!("type {at} . {at} . inet_service; flags interval;"),
            None => format!("type {at} . {at}; flags interval;"),
        }
    }

    /// Writes its name onto `out` (what `Display` writes, without allocating).
    pub(crate) fn push_name(&self, out: &mut String) {
        names::push_shard_chain(out, self.kind.direction, self.shard);
        out.push_str("_b");
        text::push_u32(out, u32::from(self.kind.block));
        out.push_str(match self.kind.action {
            Action::Allow => "_allow_",
            Action::Deny => "_deny_",
        });
        out.push_str(match self.kind.l4 {
            Some(L4::Tcp) => "tcp",
            Some(L4::Udp) => "udp",
            None => "any",
        });
        out.push_str(suffix(self.kind.family));
    }
}

impl fmt::Display for BlockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut name = String::new();
        self.push_name(&mut name);
        f.write_str(&name)
    }
}

/// One element of a block set: `<vm address> . <far side> [. <ports>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    /// The VM's own address (destination for ingress, source for egress).
    pub own: IpAddr,
    /// The other side.
    pub far: IpNet,
    /// Destination ports, for tcp and udp sets.
    pub ports: Option<PortRange>,
}

impl Element {
    /// Writes it onto `out` (what `Display` writes, without going through `fmt`).
    pub(crate) fn push_to(&self, out: &mut String) {
        text::push_ip(out, self.own);
        out.push_str(" . ");
        text::push_net(out, self.far);
        if let Some(r) = self.ports {
            out.push_str(" . ");
            text::push_ports(out, r.first, r.last);
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        self.push_to(&mut text);
        f.write_str(&text)
    }
}

/// A VM's entry in one of the worker-wide sets the base and shard chains look up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Member {
    /// In `tap_vms`: a VM with a tap; its packets are the VM's, and their sources are
    /// checked.
    Tap(Arc<str>),
    /// In `vm_addrs`: a VM without a tap, known by its IPv6 address.
    Address(Ipv6Addr),
    /// In `tap_src6` / `tap_src4`: an address the VM behind a tap may send from.
    TapSource(Arc<str>, IpAddr),
    /// In `block_bypass6` / `block_bypass4`: a VM address whose DoT and DoH are dropped.
    BlockBypass(IpAddr),
    /// In `default_deny_<in|out>_<if|addr>`: a VM whose default in a direction is deny.
    DefaultDeny(Direction, Dispatch),
}

impl Member {
    /// The set it belongs to.
    pub fn set(&self) -> &'static str {
        match self {
            Member::Tap(_) => names::TAP_VMS,
            Member::Address(_) => names::VM_ADDRS,
            Member::TapSource(_, IpAddr::V6(_)) => names::TAP_SRC6,
            Member::TapSource(_, IpAddr::V4(_)) => names::TAP_SRC4,
            Member::BlockBypass(IpAddr::V6(_)) => names::BLOCK_BYPASS6,
            Member::BlockBypass(IpAddr::V4(_)) => names::BLOCK_BYPASS4,
            Member::DefaultDeny(direction, dispatch) => {
                names::default_deny(*direction, matches!(dispatch, Dispatch::Tap(_)))
            }
        }
    }

    /// The element as nft writes it.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        self.push_to(&mut text);
        text
    }

    /// Writes [`Member::to_text`] onto `out`.
    pub(crate) fn push_to(&self, out: &mut String) {
        let quoted = |out: &mut String, tap: &str| {
            out.push('"');
            out.push_str(tap);
            out.push('"');
        };
        match self {
            Member::Tap(tap) | Member::DefaultDeny(_, Dispatch::Tap(tap)) => quoted(out, tap),
            Member::TapSource(tap, addr) => {
                quoted(out, tap);
                out.push_str(" . ");
                text::push_ip(out, *addr);
            }
            Member::BlockBypass(addr) => text::push_ip(out, *addr),
            Member::Address(addr) | Member::DefaultDeny(_, Dispatch::Address(addr)) => {
                text::push_ipv6(out, *addr);
            }
        }
    }
}

/// An egress fqdn rule of one VM, in its shard's egress chain at its block:
/// `ip6 saddr <vm> ip6 daddr @fq_..._6 tcp dport 443 return`, one per family.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FqdnRule {
    /// Its block in the VM's canonical egress policy.
    pub block: u16,
    /// The VM's own address of the set's family.
    pub own: IpAddr,
    /// The set the DNS gate fills (shared with the section's `fqdn_sets`).
    pub set: Arc<str>,
    /// The rule's protocol.
    pub protocol: Protocol,
    /// The rule's ports.
    pub ports: Ports,
    /// The rule's verdict.
    pub action: Action,
    /// The name or wildcard, for the rule's comment.
    pub pattern: Arc<str>,
}

/// One VM's part of a ruleset: entries in shared sets, its fqdn sets and rules.
/// It has no chain of its own: its packets go to its shard's chains, whose lookups are
/// keyed by the VM's own address, so a change to one VM is (nearly always) a change of
/// set elements, whatever the number of VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSection {
    /// The VM.
    pub vm: VmId,
    /// Its org, for the section's comment.
    pub org: String,
    /// How the base chain knows its packets.
    pub dispatch: Dispatch,
    /// Its elements in its shard's block sets, each with its set: sorted, none twice.
    /// One vector, not a map of sets: the canonical form gives each set's elements
    /// sorted already, and tree inserts and their frees were a fifth of a 10k-VM
    /// compile.
    pub elements: Vec<(BlockSet, Element)>,
    /// Its entries in the worker-wide sets.
    pub members: BTreeSet<Member>,
    /// Its fqdn sets: each pattern's, of each family the VM has an address of.
    pub fqdn_sets: Vec<(Arc<str>, Family)>,
    /// Its fqdn rules, in order.
    pub fqdn_rules: Vec<FqdnRule>,
}

impl VmSection {
    /// The shards it has entries in: those of its addresses (each family's may differ).
    pub fn shards(&self) -> BTreeSet<u8> {
        let sets = self.elements.iter().map(|(set, _)| set.shard);
        let rules = self.fqdn_rules.iter().map(|rule| names::shard_of(rule.own));
        sets.chain(rules).collect()
    }

    /// The names of its own objects: its fqdn sets.
    pub fn objects(&self) -> BTreeSet<String> {
        self.fqdn_sets
            .iter()
            .map(|(set, _)| set.to_string())
            .collect()
    }

    /// The block sets it uses.
    pub fn sets(&self) -> impl Iterator<Item = BlockSet> + '_ {
        self.elements_by_set().map(|(set, _)| set)
    }

    /// Its elements, set by set.
    pub fn elements_by_set(&self) -> impl Iterator<Item = (BlockSet, &[(BlockSet, Element)])> {
        by_set(&self.elements)
    }

    /// A comment line naming the VM, for the ruleset text.
    pub fn comment(&self) -> String {
        match &self.dispatch {
            Dispatch::Tap(tap) => format!("# -- vm {} (org {}), tap {tap}", self.vm, self.org),
            Dispatch::Address(a) => {
                format!("# -- vm {} (org {}), by address {a}", self.vm, self.org)
            }
        }
    }
}

/// The fqdn patterns of a VM's egress rules that the compiled section keeps (a rule
/// shadowed by an earlier one has no sets), each with its two sets: what the DNS gate
/// fills. Patterns are distinct, in rule order.
pub fn fqdn_targets(vm: &Vm) -> Vec<(DomainPattern, names::FqdnSets)> {
    let policy = vm.effective_policy();
    let mut targets: Vec<(DomainPattern, names::FqdnSets)> = Vec::new();
    for block in canonicalize(&policy.egress).blocks {
        for fqdn in block.fqdn {
            if !targets.iter().any(|(p, _)| *p == fqdn.pattern) {
                let sets = names::fqdn_sets(vm, &fqdn.pattern);
                targets.push((fqdn.pattern, sets));
            }
        }
    }
    targets
}

/// Canonical forms already worked out in one compile, by the (effective) direction
/// policy they came from: VMs that share a policy (a template's, the default with the
/// same services) share its canonical form instead of each working it out again.
#[derive(Default)]
pub struct Canonicals(HashMap<PolicyShape, Arc<CanonicalDirection>>);

/// A direction policy as far as its canonical form goes: everything but the rules'
/// descriptions. Leaving them out is also what makes a lookup cheap: comparing two empty
/// strings cost ~150 ns here (glibc's AVX-512 `memcmp` on an empty string's dangling
/// pointer), three quarters of a 10k-VM template compile's lookups.
struct PolicyShape(DirectionPolicy);

impl PartialEq for PolicyShape {
    fn eq(&self, other: &PolicyShape) -> bool {
        let (a, b) = (&self.0, &other.0);
        a.default == b.default
            && a.rules.len() == b.rules.len()
            && a.rules.iter().zip(&b.rules).all(|(a, b)| {
                a.action == b.action
                    && a.target == b.target
                    && a.protocol == b.protocol
                    && a.ports == b.ports
            })
    }
}

impl Eq for PolicyShape {}

impl Hash for PolicyShape {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.default.hash(state);
        state.write_usize(self.0.rules.len());
        for rule in &self.0.rules {
            (rule.action, &rule.target, rule.protocol, rule.ports).hash(state);
        }
    }
}

/// Policies remembered at most: enough for a fleet's templates. Where every VM has its
/// own policy, remembering them all only costs (memory, and a slower text after it).
const CANONICALS_KEPT: usize = 1024;

impl Canonicals {
    /// The canonical form of `policy` (taken, not copied, when it is new).
    fn of(&mut self, policy: DirectionPolicy) -> Arc<CanonicalDirection> {
        let shape = PolicyShape(policy);
        if let Some(canonical) = self.0.get(&shape) {
            return Arc::clone(canonical);
        }
        let canonical = Arc::new(canonicalize(&shape.0));
        if self.0.len() < CANONICALS_KEPT {
            self.0.insert(shape, Arc::clone(&canonical));
        }
        canonical
    }
}

/// One VM's elements, members and fqdn rules.
pub fn compile_vm(vm: &Vm) -> VmSection {
    compile_vm_with(vm, &mut Canonicals::default())
}

/// [`compile_vm`] for one of many VMs compiled together, sharing `canonicals`.
pub fn compile_vm_with(vm: &Vm, canonicals: &mut Canonicals) -> VmSection {
    let FirewallPolicy {
        ingress,
        egress,
        dns,
    } = vm.effective_policy();
    let dispatch = Dispatch::of(vm);
    // The VM's own address of each family: the key of its entries in shared
    // sets. Without an IPv4 address in the state, IPv4 cannot be attributed to the VM
    // (and a VM with a tap may send none: `tap_src4` has nothing for it).
    let own = |family: Family| -> Option<IpAddr> {
        match family {
            Family::V6 => Some(IpAddr::V6(vm.public_ipv6)),
            Family::V4 => vm.ipv4.map(IpAddr::V4),
        }
    };
    let mut section = VmSection {
        vm: vm.id,
        org: vm.org_id.clone(),
        dispatch: dispatch.clone(),
        elements: Vec::new(),
        members: BTreeSet::new(),
        fqdn_sets: Vec::new(),
        fqdn_rules: Vec::new(),
    };
    match &dispatch {
        Dispatch::Tap(tap) => section.members.insert(Member::Tap(Arc::clone(tap))),
        Dispatch::Address(addr) => section.members.insert(Member::Address(*addr)),
    };
    if let Dispatch::Tap(tap) = &dispatch {
        for family in [Family::V6, Family::V4] {
            if let Some(addr) = own(family) {
                section
                    .members
                    .insert(Member::TapSource(Arc::clone(tap), addr));
            }
        }
    }
    if dns.block_bypass {
        for family in [Family::V6, Family::V4] {
            if let Some(addr) = own(family) {
                section.members.insert(Member::BlockBypass(addr));
            }
        }
    }
    let canonicals = [ingress, egress].map(|rules| canonicals.of(rules));
    // One allocation for the elements: blocks' groups are known before they are copied.
    let elements = canonicals.iter().flat_map(|c| &c.blocks).map(|b| {
        let ported: usize = b.ported.values().map(Vec::len).sum();
        ported + b.any.values().map(Vec::len).sum::<usize>()
    });
    section.elements.reserve_exact(elements.sum());
    for (direction, canonical) in [Direction::Ingress, Direction::Egress]
        .into_iter()
        .zip(canonicals)
    {
        for (index, b) in canonical.blocks.iter().enumerate() {
            let action = b.action.unwrap_or(canonical.default);
            let block = u16::try_from(index).unwrap_or(u16::MAX);
            // Each address's elements go to the shard of that address.
            let set = |own, family, l4| BlockSet {
                kind: BlockKind {
                    direction,
                    block,
                    action,
                    family,
                    l4,
                },
                shard: names::shard_of(own),
            };
            for ((family, l4), elements) in &b.ported {
                let Some(own) = own(*family) else { continue };
                let elements = elements.iter().map(|(far, ports)| Element {
                    own,
                    far: *far,
                    ports: Some(*ports),
                });
                let set = set(own, *family, Some(*l4));
                section.elements.extend(elements.map(|e| (set, e)));
            }
            for (family, nets) in &b.any {
                let Some(own) = own(*family) else { continue };
                let elements = nets.iter().map(|far| Element {
                    own,
                    far: *far,
                    ports: None,
                });
                let set = set(own, *family, None);
                section.elements.extend(elements.map(|e| (set, e)));
            }
            for fqdn in &b.fqdn {
                let sets = names::fqdn_sets(vm, &fqdn.pattern);
                let pattern: Arc<str> = Arc::from(fqdn.pattern.to_string());
                for (family, set) in [(Family::V4, sets.v4), (Family::V6, Some(sets.v6))] {
                    // A family the VM has no address of has no set (`FqdnSets::v4`).
                    let (Some(set), Some(own)) = (set, own(family)) else {
                        continue;
                    };
                    let set: Arc<str> = match section.fqdn_sets.iter().find(|(s, _)| **s == *set) {
                        Some((known, _)) => Arc::clone(known),
                        None => {
                            let set: Arc<str> = Arc::from(set);
                            section.fqdn_sets.push((Arc::clone(&set), family));
                            set
                        }
                    };
                    section.fqdn_rules.push(FqdnRule {
                        block,
                        own,
                        set,
                        protocol: fqdn.protocol,
                        ports: fqdn.ports,
                        action,
                        pattern: Arc::clone(&pattern),
                    });
                }
            }
        }
        if canonical.default == Action::Deny {
            section
                .members
                .insert(Member::DefaultDeny(direction, dispatch.clone()));
        }
    }
    // A set is one block's (family, protocol) group, whose elements the canonical form
    // keeps sorted and apart; the VM's own address is the same in all of them.
    // Stable: each set's elements keep their order.
    section.elements.sort_by_key(|(set, _)| *set);
    debug_assert!(section.elements.is_sorted_by(|a, b| a < b));
    section
}

/// Sorted `(set, element)` pairs, set by set.
pub(crate) fn by_set<E>(
    elements: &[(BlockSet, E)],
) -> impl Iterator<Item = (BlockSet, &[(BlockSet, E)])> {
    elements
        .chunk_by(|a, b| a.0 == b.0)
        .filter_map(|chunk| chunk.first().map(|(set, _)| (*set, chunk)))
}

pub(crate) fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

pub(crate) fn ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

pub(crate) fn family_of(addr: &IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

pub(crate) fn doh_set(family: Family) -> &'static str {
    match family {
        Family::V4 => names::DOH_V4,
        Family::V6 => names::DOH_V6,
    }
}

pub(crate) fn l4_name(l4: L4) -> &'static str {
    match l4 {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
    }
}
