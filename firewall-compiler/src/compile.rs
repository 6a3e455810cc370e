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

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use foldhash::{HashSet, HashSetExt as _};
use ipnet::IpNet;
use vmedge_model::{Vm, VmId};

use crate::canonical::Family;
use crate::names;
use crate::section::addr_type;
pub use crate::section::{
    compile_vm, compile_vm_with, BlockSet, Canonicals, Dispatch, Element, VmRule, VmSection,
};

struct Out {
    text: String,
    objects: HashSet<String>,
}

impl Out {
    fn new() -> Out {
        Out {
            text: String::new(),
            objects: HashSet::new(),
        }
    }

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
    /// Names of the per-VM chains and sets the text defines (what a sync keeps). A hash
    /// set: 10k VMs name 60k objects, and ordered inserts were a tenth of a compile.
    pub objects: HashSet<String>,
    /// The shared block sets it defines.
    pub block_sets: BTreeSet<BlockSet>,
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
            delete_objects_text(&mut out, stale.into_iter());
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
    let sections = compile_sections(vms, options);
    let sections: Vec<&VmSection> = sections.iter().collect();
    assemble(worker, &sections, options)
}

/// Each VM's section (a chunk of VMs per core), sorted by VM id.
pub fn compile_sections<'a>(
    vms: impl IntoIterator<Item = &'a Vm>,
    options: &CompileOptions,
) -> Vec<VmSection> {
    let vms: Vec<&Vm> = vms.into_iter().collect();
    compile_sections_in(&vms, options, chunks_for(vms.len()))
}

/// [`compile_sections`] in `chunks` parts (one thread each).
fn compile_sections_in(vms: &[&Vm], options: &CompileOptions, chunks: usize) -> Vec<VmSection> {
    let mut sections: Vec<VmSection> = in_parallel(vms, chunks, |chunk| {
        let mut canonicals = Canonicals::default();
        let compiled: Vec<VmSection> = chunk
            .iter()
            .map(|vm| compile_vm_with(vm, options, &mut canonicals))
            .collect();
        compiled
    })
    .into_iter()
    .flatten()
    .collect();
    sections.sort_by_key(|s| s.vm);
    sections
}

/// A full ruleset from compiled sections (sorted by VM id), read, not copied.
pub fn assemble(worker: &str, sections: &[&VmSection], options: &CompileOptions) -> Ruleset {
    assemble_in(worker, sections, options, chunks_for(sections.len()))
}

/// The block sets a table holding `sections` declares: each one they use, in every shard,
/// so that no VM is ever the first of its shard to need a set.
pub fn declared_block_sets<'a>(
    sections: impl IntoIterator<Item = &'a VmSection>,
) -> BTreeSet<BlockSet> {
    let used: BTreeSet<BlockSet> = sections
        .into_iter()
        .flat_map(|s| s.sets().copied())
        .collect();
    used.into_iter().flat_map(BlockSet::all_shards).collect()
}

/// [`assemble`] with the VMs' text written in `chunks` parts (one thread each).
fn assemble_in(
    worker: &str,
    sections: &[&VmSection],
    options: &CompileOptions,
    chunks: usize,
) -> Ruleset {
    let mut out = Out::new();
    // One allocation for each text: growing a large string by doubling copies it over
    // and over (this was a tenth of a 10k-VM compile).
    let size = |sections: &[&VmSection]| -> (usize, usize) {
        let elements = sections
            .iter()
            .map(|s| s.elements.values().map(BTreeSet::len).sum::<usize>());
        let rules = sections.iter().map(|s| s.ingress.len() + s.egress.len());
        (
            64 * elements.sum::<usize>(),
            sections.len() * 1024 + 160 * rules.sum::<usize>(),
        )
    };
    let (elements, chains) = size(sections);
    out.text.reserve(elements + chains + 4096);
    base(&mut out, worker, sections.len(), options);
    let t = names::TABLE;
    let sets = declared_block_sets(sections.iter().copied());
    if !sets.is_empty() {
        emit!(
            out,
            "# -- block sets shared by the VMs: elements are <vm address> . <far side> [. <ports>]"
        );
    }
    for set in &sets {
        emit!(out, "add set inet {t} {set} {{ {} }}", set.declaration());
        emit!(out, "flush set inet {t} {set}");
        out.objects.insert(set.to_string());
    }
    // The VMs' own text (their elements, then their chains) is most of a ruleset: written
    // a chunk of VMs per core, then joined in order.
    let parts = in_parallel(sections, chunks, |chunk| {
        let (elements, chains) = size(chunk);
        let mut part = Part {
            elements: String::with_capacity(elements),
            chains: String::with_capacity(chains),
            objects: Vec::with_capacity(chunk.len() * 4),
        };
        for section in chunk {
            for (set, elements) in &section.elements {
                element_line(&mut part.elements, "add", set, elements.iter());
            }
            section.render(&mut part.chains);
            part.objects.extend(section.chains());
            let fqdn_sets = section.fqdn_sets().map(|(set, _)| set.to_string());
            part.objects.extend(fqdn_sets);
        }
        part
    });
    for part in &parts {
        out.text.push_str(&part.elements);
    }
    for part in parts {
        out.text.push_str(&part.chains);
        out.objects.extend(part.objects);
    }
    let mut map_elements: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for section in sections {
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
        block_sets: sets,
    }
}

/// The text of a chunk of VMs, written apart from the others.
struct Part {
    elements: String,
    chains: String,
    objects: Vec<String>,
}

/// Below this many items, one thread does it all: starting threads would cost more.
const PARALLEL_FROM: usize = 512;

/// How many parts `items` things are cut into: one per core (at most 8), or one.
fn chunks_for(items: usize) -> usize {
    if items < PARALLEL_FROM {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// `work` on `items` cut into `chunks` parts, each on a thread of its own (the caller's
/// for one part), the results in order.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    chunks: usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    if chunks <= 1 || items.is_empty() {
        return vec![work(items)];
    }
    let chunk = items.len().div_ceil(chunks);
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// `<verb> element inet vmedge <set> { a, b, ... }` (nothing for no elements).
fn element_line<'e>(
    out: &mut String,
    verb: &str,
    set: &BlockSet,
    elements: impl Iterator<Item = &'e Element>,
) {
    let mut elements = elements.peekable();
    if elements.peek().is_none() {
        return;
    }
    let _ = write!(out, "{verb} element inet {} ", names::TABLE);
    set.push_name(out);
    out.push_str(" { ");
    for (i, element) in elements.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        element.push_to(out);
    }
    out.push_str(" }\n");
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

/// What turns a table holding some sections into one holding others: typed, so the
/// same change can be written as `nft -f` text ([`Update::text`]) or sent over netlink.
#[derive(Debug)]
pub struct Update<'a> {
    /// VMs added, changed or gone.
    pub changed: usize,
    /// In order.
    pub ops: Vec<Op<'a>>,
}

/// One step of an [`Update`].
#[derive(Debug)]
pub enum Op<'a> {
    /// A shared block set a VM uses, declared in every shard (a no-op when it exists).
    AddBlockSet(BlockSet),
    /// A VM's chains (added, flushed, refilled) and fqdn sets (added).
    Section(&'a VmSection),
    /// A VM's elements leaving a shared set.
    DeleteElements(BlockSet, Vec<&'a Element>),
    /// A VM's elements entering a shared set.
    AddElements(BlockSet, Vec<&'a Element>),
    /// A chain of a VM that is gone: flushed (its rules hold sets), then deleted.
    DeleteChain(String),
    /// An fqdn set of a VM that is gone, or of a rule that is gone.
    DeleteSet(String),
    /// The map entries that lead to a VM's chains.
    AddDispatch(&'a VmSection),
    /// The map entries of a VM that is gone or moved.
    DeleteDispatch(&'a Dispatch),
}

impl Update<'_> {
    /// The update as one `nft -f` transaction.
    pub fn text(&self) -> String {
        let t = names::TABLE;
        let mut out = Out::new();
        emit!(out, "# vmedge: {} VMs changed", self.changed);
        // Every changed VM names the sets it uses; each is declared (in every shard) once.
        let mut declared = BTreeSet::new();
        for op in &self.ops {
            match op {
                Op::AddBlockSet(set) => {
                    for set in set.all_shards().filter(|s| declared.insert(*s)) {
                        emit!(out, "add set inet {t} {set} {{ {} }}", set.declaration());
                    }
                }
                Op::Section(section) => section.render(&mut out.text),
                Op::DeleteElements(set, elements) => {
                    element_line(&mut out.text, "delete", set, elements.iter().copied())
                }
                Op::AddElements(set, elements) => {
                    element_line(&mut out.text, "add", set, elements.iter().copied())
                }
                Op::DeleteChain(chain) => {
                    emit!(out, "flush chain inet {t} {chain}");
                    emit!(out, "delete chain inet {t} {chain}");
                }
                Op::DeleteSet(set) => emit!(out, "delete set inet {t} {set}"),
                Op::AddDispatch(section) => {
                    let entries = section.dispatch.entries();
                    for ((map, key), chain) in entries.into_iter().zip(section.chains()) {
                        emit!(out, "add element inet {t} {map} {{ {key} : jump {chain} }}");
                    }
                }
                Op::DeleteDispatch(dispatch) => {
                    for (map, key) in dispatch.entries() {
                        emit!(out, "delete element inet {t} {map} {{ {key} }}");
                    }
                }
            }
        }
        out.text
    }
}

/// The change that turns a table holding `previous` into one holding `next`, touching
/// only the VMs that differ; `None` when nothing does. Both are keyed by VM id. The
/// base objects must already be in place (a full sync made them). Sections may be
/// shared (`Arc`): one that is the same object on both sides is not even compared.
pub fn update<'a, S: Borrow<VmSection>>(
    previous: &'a BTreeMap<VmId, S>,
    next: &'a BTreeMap<VmId, S>,
) -> Option<Update<'a>> {
    static NO_ELEMENTS: BTreeMap<BlockSet, BTreeSet<Element>> = BTreeMap::new();
    let no_elements = &NO_ELEMENTS;
    let mut ops = Vec::new();
    let mut changed = 0;
    for (id, old) in previous {
        let old = old.borrow();
        if !next.contains_key(id) {
            changed += 1;
            ops.push(Op::DeleteDispatch(&old.dispatch));
            element_changes(&mut ops, &old.elements, no_elements);
            delete_objects(&mut ops, &old.objects(), &BTreeSet::new());
        }
    }
    for (id, new) in next {
        let new = new.borrow();
        let old = previous.get(id).map(Borrow::borrow);
        if old.is_some_and(|old| std::ptr::eq(old, new) || old == new) {
            continue;
        }
        changed += 1;
        // The shared sets may be new to the table (a VM with more blocks than any before).
        ops.extend(new.sets().map(|set| Op::AddBlockSet(*set)));
        // Rules the chains already hold are left alone: the kernel checks the whole table
        // (every VM's chains, O(VMs)) when a transaction adds a rule, not when it only
        // changes set elements (a changed CIDR or port range).
        let same_chains = old.is_some_and(|o| o.ingress == new.ingress && o.egress == new.egress);
        if !same_chains {
            ops.push(Op::Section(new));
        }
        element_changes(
            &mut ops,
            old.map_or(no_elements, |o| &o.elements),
            &new.elements,
        );
        if let Some(old) = old {
            delete_objects(&mut ops, &old.objects(), &new.objects());
            if old.dispatch != new.dispatch {
                ops.push(Op::DeleteDispatch(&old.dispatch));
            }
        }
        if old.map(|o| &o.dispatch) != Some(&new.dispatch) {
            ops.push(Op::AddDispatch(new));
        }
    }
    (changed > 0).then_some(Update { changed, ops })
}

/// Deletes the elements only in `old` and adds those only in `new`, set by set.
fn element_changes<'a>(
    ops: &mut Vec<Op<'a>>,
    old: &'a BTreeMap<BlockSet, BTreeSet<Element>>,
    new: &'a BTreeMap<BlockSet, BTreeSet<Element>>,
) {
    static EMPTY: BTreeSet<Element> = BTreeSet::new();
    let empty = &EMPTY;
    let sets: BTreeSet<&BlockSet> = old.keys().chain(new.keys()).collect();
    for set in sets {
        let (was, is) = (old.get(set).unwrap_or(empty), new.get(set).unwrap_or(empty));
        let gone: Vec<&Element> = was.difference(is).collect();
        let added: Vec<&Element> = is.difference(was).collect();
        if !gone.is_empty() {
            ops.push(Op::DeleteElements(*set, gone));
        }
        if !added.is_empty() {
            ops.push(Op::AddElements(*set, added));
        }
    }
}

/// Deletes the objects of `old` that `new` does not have: chains first (their rules
/// hold the sets), then sets.
fn delete_objects(ops: &mut Vec<Op<'_>>, old: &BTreeSet<String>, new: &BTreeSet<String>) {
    let stale = old.difference(new);
    let (chains, sets): (Vec<&String>, Vec<&String>) = stale.partition(|o| names::is_vm_chain(o));
    ops.extend(chains.into_iter().map(|c| Op::DeleteChain(c.clone())));
    ops.extend(sets.into_iter().map(|s| Op::DeleteSet(s.clone())));
}

/// Deletes chains (flushed first: their rules hold the sets) and then sets, as text.
fn delete_objects_text<'a>(out: &mut Out, objects: impl Iterator<Item = &'a String>) {
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

    #[test]
    fn text_written_in_parts_is_the_text_written_in_one() {
        // The example's VMs again and again under new ids and addresses: 5 x 9 VMs.
        let text = include_str!("../../examples/state.json");
        let mut all = Vec::new();
        for copy in 0..5u16 {
            for mut vm in vms(text) {
                let mut id = vm.id.to_string();
                id.replace_range(0..4, &format!("{copy:04x}"));
                vm.id = VmId::parse(&id).unwrap();
                let mut segments = vm.public_ipv6.segments();
                segments[2] = copy;
                vm.public_ipv6 = segments.into();
                all.push(vm);
            }
        }
        let options = CompileOptions::new(vec!["fd5e:ed00::53".parse().unwrap()]);
        let all: Vec<&Vm> = all.iter().collect();
        let sections = compile_sections_in(&all, &options, 3);
        let sections: Vec<&VmSection> = sections.iter().collect();
        let one = assemble_in("w", &sections, &options, 1);
        for chunks in [2, 3, 7] {
            assert!(
                assemble_in("w", &sections, &options, chunks) == one,
                "{chunks} parts"
            );
        }
        let alone: Vec<VmSection> = all.iter().map(|vm| compile_vm(vm, &options)).collect();
        let mut alone: Vec<&VmSection> = alone.iter().collect();
        alone.sort_by_key(|s| s.vm);
        assert!(
            sections == alone,
            "sections compiled in parts are the ones compiled alone"
        );
    }

    #[test]
    fn vms_compiled_together_share_canonical_forms_and_get_what_they_get_alone() {
        let vms = vms(include_str!("../../examples/state.json"));
        let options = CompileOptions::new(vec!["fd5e:ed00::53".parse().unwrap()]);
        let mut canonicals = Canonicals::default();
        // Twice over: the second round is all from the cache.
        for vm in vms.iter().chain(&vms) {
            let shared = compile_vm_with(vm, &options, &mut canonicals);
            assert_eq!(shared, compile_vm(vm, &options), "{}", vm.id);
        }
    }

    const TWO: &str = r#"{"vms": [
        {"id": "00000000-0000-4000-8000-000000000001", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::1", "status": "running", "interface": "tap1",
         "services": [{"name": "web", "port": 8080}]},
        {"id": "b0000000-0000-4000-8000-000000000002", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::2", "status": "running",
         "services": [{"name": "web", "port": 8080}, {"name": "udp-thing", "port": 9000}]}]}"#;

    #[test]
    fn an_update_touches_only_what_changed() {
        let before = sections(&vms(TWO));
        assert!(
            update(&before, &before).is_none(),
            "nothing changed, nothing to do"
        );

        // VM 2 drops a service: its element leaves its shard's set, its chains are left
        // alone (their rules are the same), and nothing of VM 1 appears.
        let changed = TWO.replace(r#", {"name": "udp-thing", "port": 9000}"#, "");
        let after = sections(&vms(&changed));
        let text = update(&before, &after).unwrap().text();
        assert!(
            text.contains(
                "delete element inet vmedge in_b0_tcp6_s2 { fd5e:ed00::2 . ::/0 . 9000 }"
            ),
            "{text}"
        );
        assert!(!text.contains("chain"), "chains unchanged: {text}");
        assert!(!text.contains("00000000000040008000000000000001"), "{text}");
        assert!(
            !text.contains("add element inet vmedge ingress_by_addr"),
            "dispatch unchanged: {text}"
        );

        // VM 2 gets a rule of a new shape: its chain is rewritten.
        let changed = TWO.replace(
            r#"{"name": "udp-thing", "port": 9000}]"#,
            r#"{"name": "udp-thing", "port": 9000}], "firewall": {"ingress": {"default": "deny", "rules": [{"action": "allow", "kind": "cidr", "value": "2001:db8::/32", "protocol": "udp", "ports": "53"}]}}"#,
        );
        let after = sections(&vms(&changed));
        let text = update(&before, &after).unwrap().text();
        assert!(
            text.contains("flush chain inet vmedge in_b0000000000040008000000000000002"),
            "{text}"
        );
        assert!(!text.contains("00000000000040008000000000000001"), "{text}");

        // VM 1 leaves: its map entries, chains and sets go; VM 2 is not touched.
        let mut left = vms(TWO);
        let gone = left.remove(0);
        let after = sections(&left);
        let text = update(&before, &after).unwrap().text();
        assert!(
            text.contains(r#"delete element inet vmedge egress_by_if { "tap1" }"#),
            "{text}"
        );
        assert!(text.contains("delete chain inet vmedge out_00000000000040008000000000000001"));
        assert!(
            text.contains(
                "delete element inet vmedge in_b0_tcp6_s1 { fd5e:ed00::1 . ::/0 . 8080 }"
            ),
            "its elements leave the shared set: {text}"
        );
        assert!(!text.contains("delete set"), "shared sets stay: {text}");
        assert!(!text.contains("b0000000000040008000000000000002"), "{text}");

        // ...and comes back: added with its map entries.
        let text = update(&after, &before).unwrap().text();
        assert!(
            text.contains(&format!(
                r#"add element inet vmedge egress_by_if {{ "tap1" : jump out_{} }}"#,
                gone.id.hex()
            )),
            "{text}"
        );
    }

    #[test]
    fn an_update_declares_each_block_set_once_in_every_shard() {
        // Both VMs use the ingress tcp6 set of block 0, in shards 1 and 2.
        let text = update(&BTreeMap::new(), &sections(&vms(TWO)))
            .unwrap()
            .text();
        let declared: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add set inet vmedge in_b0_tcp6_s"))
            .collect();
        assert_eq!(
            declared.len(),
            usize::from(names::BLOCK_SET_SHARDS),
            "{text}"
        );
        let distinct: BTreeSet<&str> = declared.iter().copied().collect();
        assert_eq!(distinct.len(), declared.len());
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
