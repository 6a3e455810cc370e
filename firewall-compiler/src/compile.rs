//! A worker's VMs to the text of one nftables transaction on `table inet vmedge`.
//!
//! The text only adds and flushes: every object is `add`ed (a no-op when it exists)
//! and then flushed and refilled, so applying it twice gives the same table, one `nft -f`
//! makes the whole change atomically, and conntrack entries (established flows) are
//! never touched. fqdn sets are added but never flushed: what the DNS gate put there
//! stays. Deleting the objects of VMs that left needs the live table: see `backend`.
//!
//! The forward hook: established/related accepted, invalid dropped, essential ICMPv6
//! accepted; then the VM's egress chain (by tap, else by IPv6 source) and the VM's
//! ingress chain (by tap, else by IPv6 destination). VM chains `return` on allow and
//! `drop` on deny, so traffic between two VMs of a worker passes both policies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use vmedge_model::{Action, Ports, Protocol, Vm, VmId};

use crate::canonical::{canonicalize, Family, L4};
use crate::names::{self, Direction};

struct Out {
    text: String,
    objects: BTreeSet<String>,
    sets: BTreeMap<String, String>,
    elements: BTreeMap<String, BTreeSet<String>>,
}

impl Out {
    fn new() -> Out {
        Out {
            text: String::new(),
            objects: BTreeSet::new(),
            sets: BTreeMap::new(),
            elements: BTreeMap::new(),
        }
    }
}

impl Out {
    fn line(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
    }
}

macro_rules! emit {
    ($out:expr, $($arg:tt)*) => { $out.line(format_args!($($arg)*)) };
}

/// What the compiler needs besides the VMs.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The worker's DNS gate addresses: the only place a VM may send port 53.
    pub dns_gates: Vec<IpAddr>,
    /// Public DoH resolvers dropped under `block_bypass`.
    pub doh: Vec<IpNet>,
}

impl CompileOptions {
    /// Options with the built-in DoH list.
    pub fn new(dns_gates: Vec<IpAddr>) -> CompileOptions {
        CompileOptions {
            dns_gates,
            doh: builtin_doh_resolvers(),
        }
    }
}

/// The curated DoH resolver list shipped in `data/doh-resolvers.txt`.
pub fn builtin_doh_resolvers() -> Vec<IpNet> {
    parse_address_list(include_str!("../data/doh-resolvers.txt"))
}

/// One address or prefix per line, `#` comments; bad lines are skipped (a test keeps the
/// shipped file clean).
pub fn parse_address_list(text: &str) -> Vec<IpNet> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.parse::<IpNet>()
                .ok()
                .or_else(|| l.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

/// A compiled transaction, and the per-VM objects it defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The `nft -f` text.
    pub text: String,
    /// Names of the per-VM chains and sets the text defines (what a sync keeps).
    pub objects: BTreeSet<String>,
}

impl Ruleset {
    /// The text plus the deletion of live per-VM objects this ruleset no longer has.
    pub fn with_deletions(&self, live: &BTreeSet<String>) -> String {
        let mut out = Out::new();
        out.text = self.text.clone();
        let stale: Vec<&String> = live
            .iter()
            .filter(|n| names::is_managed(n) && !self.objects.contains(*n))
            .collect();
        if !stale.is_empty() {
            emit!(out, "# objects of VMs or rules that are gone");
            delete_objects(&mut out, stale.into_iter());
        }
        out.text
    }
}

const ICMPV6_ESSENTIAL: &[&str] = &[
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "echo-request",
    "echo-reply",
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
];

/// How packets find a VM's chains: by its tap, or (no tap in the state) by its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dispatch {
    /// `iifname` / `oifname` of the VM's tap.
    Tap(String),
    /// `ip6 saddr` / `ip6 daddr` of the VM's public address.
    Address(std::net::Ipv6Addr),
}

impl Dispatch {
    fn of(vm: &Vm) -> Dispatch {
        match &vm.interface {
            Some(tap) => Dispatch::Tap(tap.clone()),
            None => Dispatch::Address(vm.public_ipv6),
        }
    }

    /// The two (map, key) pairs that lead to this VM's chains: egress first.
    fn entries(&self) -> [(&'static str, String); 2] {
        match self {
            Dispatch::Tap(tap) => [
                (names::EGRESS_BY_IF, format!("\"{tap}\"")),
                (names::INGRESS_BY_IF, format!("\"{tap}\"")),
            ],
            Dispatch::Address(addr) => [
                (names::EGRESS_BY_ADDR, addr.to_string()),
                (names::INGRESS_BY_ADDR, addr.to_string()),
            ],
        }
    }
}

/// One VM's part of a ruleset: self-contained (it adds and flushes its own objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSection {
    /// The VM.
    pub vm: VmId,
    /// Its chains, sets and rules.
    pub text: String,
    /// The names of its own chains and (fqdn) sets.
    pub objects: BTreeSet<String>,
    /// The shared block sets it uses, with their declarations (`type ...; flags ...`).
    pub sets: BTreeMap<String, String>,
    /// Its elements in the shared block sets.
    pub elements: BTreeMap<String, BTreeSet<String>>,
    /// How packets reach its chains.
    pub dispatch: Dispatch,
}

impl VmSection {
    /// Rules per chain this section puts in the table.
    pub fn rule_counts(&self) -> BTreeMap<String, usize> {
        rule_counts(&self.text)
    }

    fn chains(&self) -> [String; 2] {
        [
            names::vm_chain(&self.vm, Direction::Egress),
            names::vm_chain(&self.vm, Direction::Ingress),
        ]
    }
}

/// The number of rules the base chain holds after a full sync.
pub const FORWARD_RULES: usize = 7;

/// Rules per chain that a transaction text adds (`add rule inet vmedge CHAIN ...`).
pub fn rule_counts(text: &str) -> BTreeMap<String, usize> {
    let prefix = format!("add rule inet {} ", names::TABLE);
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some(chain) = line
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split(' ').next())
        {
            *counts.entry(chain.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Compiles the VMs of one worker (any order: output is sorted by VM id).
pub fn compile<'a>(
    worker: &str,
    vms: impl IntoIterator<Item = &'a Vm>,
    options: &CompileOptions,
) -> Ruleset {
    let mut sections: Vec<VmSection> = vms.into_iter().map(|vm| compile_vm(vm, options)).collect();
    sections.sort_by_key(|s| s.vm);
    let sections: Vec<&VmSection> = sections.iter().collect();
    assemble(worker, &sections, options)
}

/// A full ruleset from compiled sections (sorted by VM id), read, not copied.
pub fn assemble(worker: &str, sections: &[&VmSection], options: &CompileOptions) -> Ruleset {
    let mut out = Out::new();
    // One allocation for the whole text: growing a large string by doubling copies it
    // over and over (this was a tenth of a 10k-VM compile).
    let size: usize = sections
        .iter()
        .map(|s| {
            s.text.len()
                + s.elements
                    .values()
                    .flatten()
                    .map(|e| e.len() + 2)
                    .sum::<usize>()
                + 256
        })
        .sum();
    out.text.reserve(size + 4096);
    base(&mut out, worker, sections.len(), options);
    let t = names::TABLE;
    let sets: BTreeMap<&String, &String> = sections.iter().flat_map(|s| s.sets.iter()).collect();
    if !sets.is_empty() {
        emit!(
            out,
            "# -- block sets shared by the VMs: elements are <vm address> . <far side> [. <ports>]"
        );
    }
    for (set, declaration) in &sets {
        emit!(out, "add set inet {t} {set} {{ {declaration} }}");
        emit!(out, "flush set inet {t} {set}");
        out.objects.insert((*set).clone());
    }
    for section in sections {
        for (set, elements) in &section.elements {
            emit!(out, "add element inet {t} {set} {{ {} }}", join(elements));
        }
    }
    let mut map_elements: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for section in sections {
        out.text.push_str(&section.text);
        out.objects.extend(section.objects.iter().cloned());
        for ((map, key), chain) in section.dispatch.entries().into_iter().zip(section.chains()) {
            map_elements
                .entry(map)
                .or_default()
                .push(format!("{key} : jump {chain}"));
        }
    }
    emit!(out, "# -- dispatch to the VMs' chains");
    for (map, elements) in &map_elements {
        emit!(
            out,
            "add element inet {t} {map} {{ {} }}",
            elements.join(", ")
        );
    }
    let f = names::FORWARD_CHAIN;
    emit!(
        out,
        "add rule inet {t} {f} ct state established,related accept"
    );
    emit!(out, "add rule inet {t} {f} ct state invalid drop");
    emit!(
        out,
        "add rule inet {t} {f} icmpv6 type @{} accept",
        names::ICMPV6_ESSENTIAL
    );
    emit!(
        out,
        "add rule inet {t} {f} iifname vmap @{}",
        names::EGRESS_BY_IF
    );
    emit!(
        out,
        "add rule inet {t} {f} ip6 saddr vmap @{}",
        names::EGRESS_BY_ADDR
    );
    emit!(
        out,
        "add rule inet {t} {f} oifname vmap @{}",
        names::INGRESS_BY_IF
    );
    emit!(
        out,
        "add rule inet {t} {f} ip6 daddr vmap @{}",
        names::INGRESS_BY_ADDR
    );
    Ruleset {
        text: out.text,
        objects: out.objects,
    }
}

/// The table, base chain, maps and shared sets, flushed: what every full sync starts with.
fn base(out: &mut Out, worker: &str, vm_count: usize, options: &CompileOptions) {
    let t = names::TABLE;
    emit!(
        out,
        "# vmedge firewall of worker {worker:?}: {vm_count} VMs. Generated; do not edit."
    );
    emit!(out, "add table inet {t}");
    emit!(
        out,
        "add chain inet {t} {} {{ type filter hook forward priority filter; policy accept; }}",
        names::FORWARD_CHAIN
    );
    emit!(out, "flush chain inet {t} {}", names::FORWARD_CHAIN);
    for (map, key) in [
        (names::EGRESS_BY_IF, "ifname"),
        (names::EGRESS_BY_ADDR, "ipv6_addr"),
        (names::INGRESS_BY_IF, "ifname"),
        (names::INGRESS_BY_ADDR, "ipv6_addr"),
    ] {
        emit!(out, "add map inet {t} {map} {{ type {key} : verdict; }}");
        emit!(out, "flush map inet {t} {map}");
    }
    emit!(
        out,
        "add set inet {t} {} {{ type icmpv6_type; }}",
        names::ICMPV6_ESSENTIAL
    );
    emit!(out, "flush set inet {t} {}", names::ICMPV6_ESSENTIAL);
    emit!(
        out,
        "add element inet {t} {} {{ {} }}",
        names::ICMPV6_ESSENTIAL,
        ICMPV6_ESSENTIAL.join(", ")
    );
    for (set, family) in [(names::DOH_V4, Family::V4), (names::DOH_V6, Family::V6)] {
        emit!(
            out,
            "add set inet {t} {set} {{ type {}; flags interval; }}",
            addr_type(family)
        );
        emit!(out, "flush set inet {t} {set}");
        let nets: Vec<String> = IpNet::aggregate(&options.doh)
            .iter()
            .filter(|n| Family::of(n) == family)
            .map(|n| n.to_string())
            .collect();
        if !nets.is_empty() {
            emit!(out, "add element inet {t} {set} {{ {} }}", nets.join(", "));
        }
    }
}

/// The transaction that turns a table holding `previous` into one holding `next`,
/// touching only the VMs that differ; `None` when nothing does. Both are keyed by VM id.
/// The base objects must already be in place (a full sync made them).
pub fn update(
    previous: &BTreeMap<VmId, VmSection>,
    next: &BTreeMap<VmId, VmSection>,
) -> Option<String> {
    let t = names::TABLE;
    let mut out = Out::new();
    let mut changed = 0;
    let no_elements = BTreeMap::new();
    for (id, old) in previous {
        if !next.contains_key(id) {
            changed += 1;
            emit!(out, "# -- vm {id} left");
            for (map, key) in old.dispatch.entries() {
                emit!(out, "delete element inet {t} {map} {{ {key} }}");
            }
            element_changes(&mut out, &old.elements, &no_elements);
            delete_objects(&mut out, old.objects.iter());
        }
    }
    for (id, new) in next {
        let old = previous.get(id);
        if old == Some(new) {
            continue;
        }
        changed += 1;
        // The shared sets may be new to the table (a VM with more blocks than any before).
        for (set, declaration) in &new.sets {
            emit!(out, "add set inet {t} {set} {{ {declaration} }}");
        }
        out.text.push_str(&new.text);
        element_changes(
            &mut out,
            old.map_or(&no_elements, |o| &o.elements),
            &new.elements,
        );
        if let Some(old) = old {
            let stale = old.objects.difference(&new.objects);
            delete_objects(&mut out, stale);
            if old.dispatch != new.dispatch {
                for (map, key) in old.dispatch.entries() {
                    emit!(out, "delete element inet {t} {map} {{ {key} }}");
                }
            }
        }
        if old.map(|o| &o.dispatch) != Some(&new.dispatch) {
            for ((map, key), chain) in new.dispatch.entries().into_iter().zip(new.chains()) {
                emit!(out, "add element inet {t} {map} {{ {key} : jump {chain} }}");
            }
        }
    }
    (changed > 0).then(|| format!("# vmedge: {changed} VMs changed\n{}", out.text))
}

/// Deletes the elements only in `old` and adds those only in `new`, set by set.
fn element_changes(
    out: &mut Out,
    old: &BTreeMap<String, BTreeSet<String>>,
    new: &BTreeMap<String, BTreeSet<String>>,
) {
    let t = names::TABLE;
    let empty = BTreeSet::new();
    let sets: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for set in sets {
        let (was, is) = (
            old.get(set).unwrap_or(&empty),
            new.get(set).unwrap_or(&empty),
        );
        let gone: BTreeSet<&String> = was.difference(is).collect();
        let added: BTreeSet<&String> = is.difference(was).collect();
        if !gone.is_empty() {
            emit!(out, "delete element inet {t} {set} {{ {} }}", join(gone));
        }
        if !added.is_empty() {
            emit!(out, "add element inet {t} {set} {{ {} }}", join(added));
        }
    }
}

fn join<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> String {
    let mut text = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(item.as_ref());
    }
    text
}

/// Deletes chains (flushed first: their rules hold the sets) and then sets.
fn delete_objects<'a>(out: &mut Out, objects: impl Iterator<Item = &'a String>) {
    let t = names::TABLE;
    let (chain_names, set_names): (Vec<&String>, Vec<&String>) =
        objects.partition(|o| names::is_vm_chain(o));
    for chain in &chain_names {
        emit!(out, "flush chain inet {t} {chain}");
        emit!(out, "delete chain inet {t} {chain}");
    }
    for set in set_names {
        emit!(out, "delete set inet {t} {set}");
    }
}

fn addr_type(family: Family) -> &'static str {
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

fn verdict(action: Action) -> &'static str {
    match action {
        Action::Allow => "return",
        Action::Deny => "drop",
    }
}

/// `tcp dport 443`, `tcp dport 8080-8090`, `meta l4proto tcp`, or nothing for any.
fn l4_match(protocol: Protocol, ports: Ports) -> String {
    let name = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => return String::new(),
    };
    match ports {
        Ports::Any => format!(" meta l4proto {name}"),
        ports => format!(" {name} dport {ports}"),
    }
}

/// One VM's chains, sets and rules.
pub fn compile_vm(vm: &Vm, options: &CompileOptions) -> VmSection {
    let mut out = Out::new();
    vm_rules(&mut out, vm, options);
    VmSection {
        vm: vm.id,
        text: out.text,
        objects: out.objects,
        sets: out.sets,
        elements: out.elements,
        dispatch: Dispatch::of(vm),
    }
}

fn vm_rules(out: &mut Out, vm: &Vm, options: &CompileOptions) {
    let t = names::TABLE;
    let policy = vm.effective_policy();
    emit!(
        out,
        "# -- vm {} (org {}), {}",
        vm.id,
        vm.org_id,
        vm.interface.as_deref().map_or_else(
            || format!("by address {}", vm.public_ipv6),
            |tap| format!("tap {tap}")
        )
    );
    for direction in [Direction::Ingress, Direction::Egress] {
        let chain = names::vm_chain(&vm.id, direction);
        emit!(out, "add chain inet {t} {chain}");
        emit!(out, "flush chain inet {t} {chain}");
        out.objects.insert(chain.clone());
        if direction == Direction::Egress {
            egress_guards(out, vm, &chain, options, policy.dns.block_bypass);
        }
        let rules = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        let canonical = canonicalize(rules);
        // The VM's own address of each family: the key of its elements in shared sets.
        // Without an IPv4 address in the state, IPv4 cannot be attributed to the VM.
        let own = |family: Family| -> Option<String> {
            match family {
                Family::V6 => Some(vm.public_ipv6.to_string()),
                Family::V4 => vm.ipv4.map(|a| a.to_string()),
            }
        };
        // Ingress: the VM is the destination; egress: the source.
        let (own_side, far_side) = match direction {
            Direction::Ingress => ("daddr", "saddr"),
            Direction::Egress => ("saddr", "daddr"),
        };
        for (b, block) in canonical.blocks.iter().enumerate() {
            let action = verdict(block.action.unwrap_or(canonical.default));
            for ((family, l4), elements) in &block.ported {
                let Some(key) = own(*family) else { continue };
                let proto = match l4 {
                    L4::Tcp => "tcp",
                    L4::Udp => "udp",
                };
                let set = names::block_set(direction, b, &format!("{proto}{}", suffix(*family)));
                let at = addr_type(*family);
                out.sets.insert(
                    set.clone(),
                    format!("type {at} . {at} . inet_service; flags interval;"),
                );
                out.elements
                    .entry(set.clone())
                    .or_default()
                    .extend(elements.iter().map(|(net, r)| {
                        if r.first == r.last {
                            format!("{key} . {net} . {}", r.first)
                        } else {
                            format!("{key} . {net} . {}-{}", r.first, r.last)
                        }
                    }));
                let ip = ip(*family);
                emit!(out, "add rule inet {t} {chain} {ip} {own_side} . {ip} {far_side} . {proto} dport @{set} {action}");
            }
            for (family, nets) in &block.any {
                let Some(key) = own(*family) else { continue };
                let set = names::block_set(direction, b, &format!("any{}", suffix(*family)));
                let at = addr_type(*family);
                out.sets
                    .insert(set.clone(), format!("type {at} . {at}; flags interval;"));
                out.elements
                    .entry(set.clone())
                    .or_default()
                    .extend(nets.iter().map(|net| format!("{key} . {net}")));
                let ip = ip(*family);
                emit!(
                    out,
                    "add rule inet {t} {chain} {ip} {own_side} . {ip} {far_side} @{set} {action}"
                );
            }
            for fqdn in &block.fqdn {
                let sets = names::fqdn_sets(&vm.id, &fqdn.pattern);
                let l4 = l4_match(fqdn.protocol, fqdn.ports);
                for (family, set) in [(Family::V4, &sets.v4), (Family::V6, &sets.v6)] {
                    // Added, never flushed: the DNS gate's entries survive every sync.
                    emit!(
                        out,
                        "add set inet {t} {set} {{ type {}; flags timeout; }}",
                        addr_type(family)
                    );
                    emit!(out, "add rule inet {t} {chain} {} daddr @{set}{l4} {action} comment \"fqdn {}\"", ip(family), fqdn.pattern);
                    out.objects.insert(set.clone());
                }
            }
        }
        if canonical.default == Action::Deny {
            emit!(
                out,
                "add rule inet {t} {chain} counter drop comment \"default deny\""
            );
        }
    }
}

/// The egress rules that come before the user's: anti-spoof, DNS only to the gate,
/// and DoT / DoH blocking under `block_bypass`.
fn egress_guards(
    out: &mut Out,
    vm: &Vm,
    chain: &str,
    options: &CompileOptions,
    block_bypass: bool,
) {
    let t = names::TABLE;
    if vm.interface.is_some() {
        emit!(
            out,
            "add rule inet {t} {chain} ip6 saddr != {} drop comment \"anti-spoof\"",
            vm.public_ipv6
        );
        match vm.ipv4 {
            Some(v4) => emit!(out, "add rule inet {t} {chain} ip saddr != {v4} drop comment \"anti-spoof\""),
            None => emit!(out, "add rule inet {t} {chain} meta nfproto ipv4 drop comment \"anti-spoof: no IPv4 address\""),
        }
    }
    for gate in &options.dns_gates {
        let family = if gate.is_ipv4() { "ip" } else { "ip6" };
        for proto in ["udp", "tcp"] {
            emit!(out, "add rule inet {t} {chain} {family} daddr {gate} {proto} dport 53 return comment \"dns gate\"");
        }
    }
    for proto in ["udp", "tcp"] {
        emit!(
            out,
            "add rule inet {t} {chain} {proto} dport 53 drop comment \"dns: only the gate\""
        );
    }
    if block_bypass {
        for proto in ["tcp", "udp"] {
            emit!(
                out,
                "add rule inet {t} {chain} {proto} dport 853 drop comment \"block_bypass: DoT\""
            );
        }
        emit!(
            out,
            "add rule inet {t} {chain} ip daddr @{} drop comment \"block_bypass: DoH\"",
            names::DOH_V4
        );
        emit!(
            out,
            "add rule inet {t} {chain} ip6 daddr @{} drop comment \"block_bypass: DoH\"",
            names::DOH_V6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(doc: &str) -> Vec<Vm> {
        vmedge_model::parse_state(doc).unwrap().value.vms
    }

    fn sections(vms: &[Vm]) -> BTreeMap<VmId, VmSection> {
        let options = CompileOptions::new(vec![]);
        vms.iter()
            .map(|v| (v.id, compile_vm(v, &options)))
            .collect()
    }

    const TWO: &str = r#"{"vms": [
        {"id": "00000000-0000-4000-8000-000000000001", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::1", "status": "running", "interface": "tap1",
         "services": [{"name": "web", "port": 8080}]},
        {"id": "b0000000-0000-4000-8000-000000000002", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::2", "status": "running",
         "services": [{"name": "web", "port": 8080}, {"name": "udp-thing", "port": 9000}]}]}"#;

    #[test]
    fn an_update_touches_only_what_changed() {
        let before = sections(&vms(TWO));
        assert_eq!(
            update(&before, &before),
            None,
            "nothing changed, nothing to do"
        );

        // VM 2 drops a service: its chain is rewritten, and nothing of VM 1 appears.
        let changed = TWO.replace(r#", {"name": "udp-thing", "port": 9000}"#, "");
        let text = update(&before, &sections(&vms(&changed))).unwrap();
        assert!(text.contains("flush chain inet vmedge in_b0000000000040008000000000000002"));
        assert!(!text.contains("00000000000040008000000000000001"), "{text}");
        assert!(
            !text.contains("add element inet vmedge ingress_by_addr"),
            "dispatch unchanged: {text}"
        );

        // VM 1 leaves: its map entries, chains and sets go; VM 2 is not touched.
        let mut left = vms(TWO);
        let gone = left.remove(0);
        let text = update(&before, &sections(&left)).unwrap();
        assert!(
            text.contains(r#"delete element inet vmedge egress_by_if { "tap1" }"#),
            "{text}"
        );
        assert!(text.contains("delete chain inet vmedge out_00000000000040008000000000000001"));
        assert!(
            text.contains("delete element inet vmedge in_b0_tcp6 { fd5e:ed00::1 . ::/0 . 8080 }"),
            "its elements leave the shared set: {text}"
        );
        assert!(!text.contains("delete set"), "shared sets stay: {text}");
        assert!(!text.contains("b0000000000040008000000000000002"), "{text}");

        // ...and comes back: added with its map entries.
        let text = update(&sections(&left), &before).unwrap();
        assert!(
            text.contains(&format!(
                r#"add element inet vmedge egress_by_if {{ "tap1" : jump out_{} }}"#,
                gone.id.hex()
            )),
            "{text}"
        );
    }

    #[test]
    fn a_full_ruleset_deletes_what_the_live_table_has_beyond_it() {
        let ruleset = compile("w", vms(TWO).iter().skip(1), &CompileOptions::new(vec![]));
        let live: BTreeSet<String> = [
            "in_00000000000040008000000000000001",
            "in_00000000000040008000000000000001_b0_tcp6",
            "in_b0000000000040008000000000000002",
            "forward",
        ]
        .map(String::from)
        .into();
        let text = ruleset.with_deletions(&live);
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        assert_eq!(
            tail,
            [
                "delete set inet vmedge in_00000000000040008000000000000001_b0_tcp6",
                "delete chain inet vmedge in_00000000000040008000000000000001",
                "flush chain inet vmedge in_00000000000040008000000000000001",
            ]
        );
    }

    #[test]
    fn the_shipped_doh_list_is_clean() {
        let text = include_str!("../data/doh-resolvers.txt");
        let lines = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .count();
        let parsed = builtin_doh_resolvers();
        assert_eq!(
            parsed.len(),
            lines,
            "every line of data/doh-resolvers.txt parses"
        );
        assert!(parsed
            .iter()
            .any(|n| n.contains(&"1.1.1.1".parse::<IpAddr>().unwrap())));
        assert!(parsed
            .iter()
            .any(|n| n.contains(&"2001:4860:4860::8888".parse::<IpAddr>().unwrap())));
        assert!(text.contains("# version: "), "the list says its version");
    }
}
