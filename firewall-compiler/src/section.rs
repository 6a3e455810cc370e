//! One VM's part of the table, as typed rules and set elements.
//!
//! A [`VmSection`] is what a VM's effective policy compiles to: its two chains (a
//! closed set of rule forms, [`VmRule`]), its fqdn sets, and its elements in the block
//! sets shared by all VMs. It is rendered two ways from the same values: as `nft -f`
//! text ([`VmSection::render`], for full syncs, the CLI and golden tests) and as
//! netlink messages (`netlink`, for incremental syncs), so the two cannot disagree on
//! what a policy means, only on spelling, which an end-to-end test compares.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use foldhash::HashMap;
use ipnet::IpNet;
use vmedge_model::{
    Action, DirectionPolicy, DomainPattern, FirewallPolicy, Ports, Protocol, Vm, VmId,
};

use crate::canonical::{canonicalize, CanonicalDirection, Family, PortRange, L4};
use crate::compile::CompileOptions;
use crate::names::{self, Direction};
use crate::text;

/// How packets find a VM's chains: by its tap, or (no tap in the state) by its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dispatch {
    /// `iifname` / `oifname` of the VM's tap.
    Tap(String),
    /// `ip6 saddr` / `ip6 daddr` of the VM's public address.
    Address(Ipv6Addr),
}

impl Dispatch {
    fn of(vm: &Vm) -> Dispatch {
        match &vm.interface {
            Some(tap) => Dispatch::Tap(tap.clone()),
            None => Dispatch::Address(vm.public_ipv6),
        }
    }

    /// The two verdict maps that lead to this VM's chains: egress first.
    pub fn maps(&self) -> [&'static str; 2] {
        match self {
            Dispatch::Tap(_) => [names::EGRESS_BY_IF, names::INGRESS_BY_IF],
            Dispatch::Address(_) => [names::EGRESS_BY_ADDR, names::INGRESS_BY_ADDR],
        }
    }

    /// The two (map, key) pairs that lead to this VM's chains, keys as nft writes them.
    pub fn entries(&self) -> [(&'static str, String); 2] {
        let key = match self {
            Dispatch::Tap(tap) => format!("\"{tap}\""),
            Dispatch::Address(addr) => addr.to_string(),
        };
        self.maps().map(|map| (map, key.clone()))
    }
}

/// A block set shared by the VMs of a shard: `in_b<block>_<l4 or any><4|6>_s<shard>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockSet {
    /// Whose rules: the VM as destination (ingress) or source (egress).
    pub direction: Direction,
    /// The block's position in the canonical policy.
    pub block: u16,
    /// Address family of both addresses.
    pub family: Family,
    /// With a port (`. inet_service`) for tcp or udp; address only for `protocol any`.
    pub l4: Option<L4>,
    /// Which VMs' elements it holds ([`names::shard_of`]).
    pub shard: u8,
}

impl BlockSet {
    /// Its declaration: `type ipv6_addr . ipv6_addr . inet_service; flags interval;`.
    pub fn declaration(&self) -> String {
        let at = addr_type(self.family);
        match self.l4 {
            Some(_) => format!("type {at} . {at} . inet_service; flags interval;"),
            None => format!("type {at} . {at}; flags interval;"),
        }
    }

    /// The same set in every shard, this one included (see
    /// [`declared_block_sets`](crate::compile::declared_block_sets)).
    pub fn all_shards(self) -> impl Iterator<Item = BlockSet> {
        (0..names::BLOCK_SET_SHARDS).map(move |shard| BlockSet { shard, ..self })
    }
}

impl BlockSet {
    /// Writes its name onto `out` (what `Display` writes, without allocating).
    pub(crate) fn push_name(&self, out: &mut String) {
        let kind = match self.l4 {
            Some(L4::Tcp) => "tcp",
            Some(L4::Udp) => "udp",
            None => "any",
        };
        let block = usize::from(self.block);
        names::push_block_set(
            out,
            self.direction,
            block,
            kind,
            suffix(self.family),
            self.shard,
        );
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
            text::push_u32(out, u32::from(r.first));
            if r.first != r.last {
                out.push('-');
                text::push_u32(out, u32::from(r.last));
            }
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {}", self.own, self.far)?;
        match self.ports {
            Some(r) if r.first == r.last => write!(f, " . {}", r.first),
            Some(r) => write!(f, " . {}-{}", r.first, r.last),
            None => Ok(()),
        }
    }
}

/// The rules a VM chain can hold: every form the compiler emits, and only those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRule {
    /// `ip6 saddr != A drop`: a VM with a tap sends only from its own address.
    AntiSpoof6(Ipv6Addr),
    /// `ip saddr != A drop`, the same for its IPv4 address.
    AntiSpoof4(Ipv4Addr),
    /// `meta nfproto ipv4 drop`: a VM with a tap and no IPv4 address sends no IPv4.
    NoIpv4,
    /// `ip6 daddr G udp dport 53 return`: DNS to the worker's gate.
    DnsGate(IpAddr, L4),
    /// `udp dport 53 drop`: DNS anywhere else.
    DnsElsewhere(L4),
    /// `tcp dport 853 drop`: DNS over TLS, under `block_bypass`.
    DnsOverTls(L4),
    /// `ip daddr @doh_v4 drop`: public DoH resolvers, under `block_bypass`.
    DnsOverHttps(Family),
    /// `ip6 daddr . ip6 saddr . tcp dport @in_b0_tcp6_s3 return`: one block of the policy.
    Block {
        /// The shared set holding the VM's elements.
        set: BlockSet,
        /// The block's verdict.
        action: Action,
    },
    /// `ip daddr @fq_..._4 tcp dport 443 return`: an egress fqdn rule, one per family.
    Fqdn {
        /// The set the DNS gate fills (added by the section, never flushed).
        set: String,
        /// Which of the rule's two sets this is.
        family: Family,
        /// The rule's protocol.
        protocol: Protocol,
        /// The rule's ports.
        ports: Ports,
        /// The rule's verdict.
        action: Action,
        /// The name or wildcard, for the rule's comment.
        pattern: String,
    },
    /// `counter drop`: the direction's default is deny.
    DefaultDeny,
}

impl VmRule {
    /// The rule as nft writes it, after `add rule inet vmedge <chain> `.
    pub(crate) fn write_body(&self, out: &mut String) {
        let _ = match self {
            VmRule::AntiSpoof6(a) => write!(out, "ip6 saddr != {a} drop comment \"anti-spoof\""),
            VmRule::AntiSpoof4(a) => write!(out, "ip saddr != {a} drop comment \"anti-spoof\""),
            VmRule::NoIpv4 => {
                write!(
                    out,
                    "meta nfproto ipv4 drop comment \"anti-spoof: no IPv4 address\""
                )
            }
            VmRule::DnsGate(gate, l4) => write!(
                out,
                "{} daddr {gate} {} dport 53 return comment \"dns gate\"",
                ip(family_of(gate)),
                l4_name(*l4)
            ),
            VmRule::DnsElsewhere(l4) => write!(
                out,
                "{} dport 53 drop comment \"dns: only the gate\"",
                l4_name(*l4)
            ),
            VmRule::DnsOverTls(l4) => write!(
                out,
                "{} dport 853 drop comment \"block_bypass: DoT\"",
                l4_name(*l4)
            ),
            VmRule::DnsOverHttps(family) => write!(
                out,
                "{} daddr @{} drop comment \"block_bypass: DoH\"",
                ip(*family),
                doh_set(*family)
            ),
            VmRule::Block { set, action } => {
                let ip = ip(set.family);
                let (own, far) = match set.direction {
                    Direction::Ingress => ("daddr", "saddr"),
                    Direction::Egress => ("saddr", "daddr"),
                };
                match set.l4 {
                    Some(l4) => write!(
                        out,
                        "{ip} {own} . {ip} {far} . {} dport @{set} {}",
                        l4_name(l4),
                        verdict(*action)
                    ),
                    None => write!(out, "{ip} {own} . {ip} {far} @{set} {}", verdict(*action)),
                }
            }
            VmRule::Fqdn {
                set,
                family,
                protocol,
                ports,
                action,
                pattern,
            } => {
                let _ = write!(out, "{} daddr @{set}", ip(*family));
                match (protocol, ports) {
                    (Protocol::Any, _) => {}
                    (Protocol::Tcp | Protocol::Udp, Ports::Any) => {
                        let _ = write!(out, " meta l4proto {}", protocol_name(*protocol));
                    }
                    (Protocol::Tcp | Protocol::Udp, ports) => {
                        let _ = write!(out, " {} dport {ports}", protocol_name(*protocol));
                    }
                }
                write!(out, " {} comment \"fqdn {pattern}\"", verdict(*action))
            }
            VmRule::DefaultDeny => write!(out, "counter drop comment \"default deny\""),
        };
    }

    /// The rule's comment, as nft stores it (rule userdata).
    pub fn comment(&self) -> Option<String> {
        match self {
            VmRule::AntiSpoof6(_) | VmRule::AntiSpoof4(_) => Some("anti-spoof".into()),
            VmRule::NoIpv4 => Some("anti-spoof: no IPv4 address".into()),
            VmRule::DnsGate(..) => Some("dns gate".into()),
            VmRule::DnsElsewhere(_) => Some("dns: only the gate".into()),
            VmRule::DnsOverTls(_) => Some("block_bypass: DoT".into()),
            VmRule::DnsOverHttps(_) => Some("block_bypass: DoH".into()),
            VmRule::Block { .. } => None,
            VmRule::Fqdn { pattern, .. } => Some(format!("fqdn {pattern}")),
            VmRule::DefaultDeny => Some("default deny".into()),
        }
    }
}

/// One VM's part of a ruleset: self-contained (it adds and flushes its own objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSection {
    /// The VM.
    pub vm: VmId,
    /// Its org, for the section's comment.
    pub org: String,
    /// How packets reach its chains.
    pub dispatch: Dispatch,
    /// Its ingress chain's rules, in order.
    pub ingress: Vec<VmRule>,
    /// Its egress chain's rules, in order.
    pub egress: Vec<VmRule>,
    /// Its elements in the shared block sets.
    pub elements: BTreeMap<BlockSet, BTreeSet<Element>>,
}

impl VmSection {
    /// The chain of a direction.
    pub fn chain(&self, direction: Direction) -> String {
        names::vm_chain(&self.vm, direction)
    }

    /// Its two chains, egress first (the order of [`Dispatch::entries`]).
    pub fn chains(&self) -> [String; 2] {
        [
            self.chain(Direction::Egress),
            self.chain(Direction::Ingress),
        ]
    }

    /// Each chain with its rules: ingress, then egress.
    pub fn rules(&self) -> [(Direction, &[VmRule]); 2] {
        [
            (Direction::Ingress, &self.ingress),
            (Direction::Egress, &self.egress),
        ]
    }

    /// The names of its own chains and fqdn sets.
    pub fn objects(&self) -> BTreeSet<String> {
        let mut objects: BTreeSet<String> = self.chains().into_iter().collect();
        objects.extend(self.fqdn_sets().map(|(set, _)| set.to_string()));
        objects
    }

    /// Its fqdn sets with their families, in rule order.
    pub fn fqdn_sets(&self) -> impl Iterator<Item = (&str, Family)> {
        self.egress.iter().filter_map(|r| match r {
            VmRule::Fqdn { set, family, .. } => Some((set.as_str(), *family)),
            _ => None,
        })
    }

    /// The shared block sets it uses.
    pub fn sets(&self) -> impl Iterator<Item = &BlockSet> {
        self.elements.keys()
    }

    /// Rules per chain this section puts in the table.
    pub fn rule_counts(&self) -> BTreeMap<String, usize> {
        self.rules()
            .into_iter()
            .map(|(direction, rules)| (self.chain(direction), rules.len()))
            .collect()
    }

    /// Writes its chains, fqdn sets and rules as `nft -f` lines (its elements and
    /// dispatch entries are written by the caller, which batches them across VMs).
    pub fn render(&self, out: &mut String) {
        let t = names::TABLE;
        let _ = match &self.dispatch {
            Dispatch::Tap(tap) => {
                writeln!(out, "# -- vm {} (org {}), tap {tap}", self.vm, self.org)
            }
            Dispatch::Address(a) => {
                writeln!(
                    out,
                    "# -- vm {} (org {}), by address {a}",
                    self.vm, self.org
                )
            }
        };
        for (direction, rules) in self.rules() {
            let chain = self.chain(direction);
            let _ = writeln!(out, "add chain inet {t} {chain}");
            let _ = writeln!(out, "flush chain inet {t} {chain}");
            for rule in rules {
                if let VmRule::Fqdn { set, family, .. } = rule {
                    // Added, never flushed: the DNS gate's entries survive every sync.
                    let _ = writeln!(
                        out,
                        "add set inet {t} {set} {{ type {}; flags timeout; }}",
                        addr_type(*family)
                    );
                }
                let _ = write!(out, "add rule inet {t} {chain} ");
                rule.write_body(out);
                out.push('\n');
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
                let sets = names::fqdn_sets(&vm.id, &fqdn.pattern);
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
pub struct Canonicals(HashMap<DirectionPolicy, Arc<CanonicalDirection>>);

/// Policies remembered at most: enough for a fleet's templates. Where every VM has its
/// own policy, remembering them all only costs (memory, and a slower text after it).
const CANONICALS_KEPT: usize = 1024;

impl Canonicals {
    /// The canonical form of `policy` (taken, not copied, when it is new).
    fn of(&mut self, policy: DirectionPolicy) -> Arc<CanonicalDirection> {
        if let Some(canonical) = self.0.get(&policy) {
            return Arc::clone(canonical);
        }
        let canonical = Arc::new(canonicalize(&policy));
        if self.0.len() < CANONICALS_KEPT {
            self.0.insert(policy, Arc::clone(&canonical));
        }
        canonical
    }
}

/// One VM's chains, sets and rules.
pub fn compile_vm(vm: &Vm, options: &CompileOptions) -> VmSection {
    compile_vm_with(vm, options, &mut Canonicals::default())
}

/// [`compile_vm`] for one of many VMs compiled together, sharing `canonicals`.
pub fn compile_vm_with(
    vm: &Vm,
    options: &CompileOptions,
    canonicals: &mut Canonicals,
) -> VmSection {
    let FirewallPolicy {
        ingress,
        egress,
        dns,
    } = vm.effective_policy();
    let mut section = VmSection {
        vm: vm.id,
        org: vm.org_id.clone(),
        dispatch: Dispatch::of(vm),
        ingress: Vec::new(),
        egress: egress_guards(vm, options, dns.block_bypass),
        elements: BTreeMap::new(),
    };
    let shard = names::shard_of(&vm.id);
    for (direction, rules) in [(Direction::Ingress, ingress), (Direction::Egress, egress)] {
        let canonical = canonicals.of(rules);
        // The VM's own address of each family: the key of its elements in shared sets.
        // Without an IPv4 address in the state, IPv4 cannot be attributed to the VM.
        let own = |family: Family| -> Option<IpAddr> {
            match family {
                Family::V6 => Some(IpAddr::V6(vm.public_ipv6)),
                Family::V4 => vm.ipv4.map(IpAddr::V4),
            }
        };
        let mut rules = Vec::new();
        for (b, block) in canonical.blocks.iter().enumerate() {
            let action = block.action.unwrap_or(canonical.default);
            let block_set = |family, l4| BlockSet {
                direction,
                block: u16::try_from(b).unwrap_or(u16::MAX),
                family,
                l4,
                shard,
            };
            for ((family, l4), elements) in &block.ported {
                let Some(own) = own(*family) else { continue };
                let set = block_set(*family, Some(*l4));
                section
                    .elements
                    .entry(set)
                    .or_default()
                    .extend(elements.iter().map(|(far, ports)| Element {
                        own,
                        far: *far,
                        ports: Some(*ports),
                    }));
                rules.push(VmRule::Block { set, action });
            }
            for (family, nets) in &block.any {
                let Some(own) = own(*family) else { continue };
                let set = block_set(*family, None);
                section
                    .elements
                    .entry(set)
                    .or_default()
                    .extend(nets.iter().map(|far| Element {
                        own,
                        far: *far,
                        ports: None,
                    }));
                rules.push(VmRule::Block { set, action });
            }
            for fqdn in &block.fqdn {
                let sets = names::fqdn_sets(&vm.id, &fqdn.pattern);
                for (family, set) in [(Family::V4, sets.v4), (Family::V6, sets.v6)] {
                    rules.push(VmRule::Fqdn {
                        set,
                        family,
                        protocol: fqdn.protocol,
                        ports: fqdn.ports,
                        action,
                        pattern: fqdn.pattern.to_string(),
                    });
                }
            }
        }
        if canonical.default == Action::Deny {
            rules.push(VmRule::DefaultDeny);
        }
        match direction {
            Direction::Ingress => section.ingress = rules,
            Direction::Egress => section.egress.extend(rules),
        }
    }
    section
}

/// The egress rules that come before the user's: anti-spoof, DNS only to the gate,
/// and DoT / DoH blocking under `block_bypass`.
fn egress_guards(vm: &Vm, options: &CompileOptions, block_bypass: bool) -> Vec<VmRule> {
    let mut rules = Vec::new();
    if vm.interface.is_some() {
        rules.push(VmRule::AntiSpoof6(vm.public_ipv6));
        rules.push(match vm.ipv4 {
            Some(v4) => VmRule::AntiSpoof4(v4),
            None => VmRule::NoIpv4,
        });
    }
    for gate in &options.dns_gates {
        for l4 in [L4::Udp, L4::Tcp] {
            rules.push(VmRule::DnsGate(*gate, l4));
        }
    }
    for l4 in [L4::Udp, L4::Tcp] {
        rules.push(VmRule::DnsElsewhere(l4));
    }
    if block_bypass {
        for l4 in [L4::Tcp, L4::Udp] {
            rules.push(VmRule::DnsOverTls(l4));
        }
        rules.push(VmRule::DnsOverHttps(Family::V4));
        rules.push(VmRule::DnsOverHttps(Family::V6));
    }
    rules
}

pub(crate) fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn ip(family: Family) -> &'static str {
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

fn l4_name(l4: L4) -> &'static str {
    match l4 {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    }
}

fn verdict(action: Action) -> &'static str {
    match action {
        Action::Allow => "return",
        Action::Deny => "drop",
    }
}
