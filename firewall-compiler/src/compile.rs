//! A worker's VMs to the text of one nftables transaction on `table inet vmedge`.
//!
//! The text only adds and flushes: every object is `add`ed (a no-op when it exists)
//! and then flushed and refilled, so applying it twice gives the same table, one `nft -f`
//! makes the whole change atomically, and conntrack entries (established flows) are
//! never touched. fqdn sets are added but never flushed: what the DNS gate put there
//! stays. Deleting the objects of VMs that left needs the live table: see `backend`.
//!
//! The forward hook: established/related accepted, invalid dropped, essential ICMPv6
//! accepted, a VM behind a tap may send only from its own addresses; then, for a packet
//! from a VM (its tap, else its IPv6 source), the egress chain of its source address's
//! shard, and for a packet to a VM (its tap, else its IPv6 destination), the ingress
//! chain of its destination address's shard. The shard is a kernel hash of the address
//! (`jhash`, [`names::shard_of`]), so a VM has no dispatch entry of its own. Shard chains
//! `return` on allow and `drop` on deny, so traffic between two VMs of a worker passes
//! both policies. What a shard chain holds: see `shard`.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use foldhash::{HashSet, HashSetExt as _};
use ipnet::IpNet;
use vmedge_model::{Vm, VmId};

use crate::canonical::Family;
use crate::names::{self, Direction};
use crate::section::{addr_type, by_set};
pub use crate::section::{
    compile_vm, compile_vm_with, BlockSet, Canonicals, Element, Member, VmSection,
};
use crate::shard::{render_chain, shard_rules, shard_uses, ShardRule, ShardUse};

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

/// A compiled transaction, and the objects it defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The `nft -f` text.
    pub text: String,
    /// Names of the managed objects the text defines (what a sync keeps): shard chains,
    /// block sets and fqdn sets. A hash set: 10k VMs name 20k fqdn sets, and ordered
    /// inserts were a tenth of a compile.
    pub objects: HashSet<String>,
    /// How many VMs it holds.
    pub vms: usize,
}

impl Ruleset {
    /// The text plus the deletion of live managed objects this ruleset no longer has
    /// (including the per-VM chains and block sets of older versions).
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
pub const FORWARD_RULES: usize = 9;

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
    let sections = compile_sections(vms);
    let sections: Vec<&VmSection> = sections.iter().collect();
    assemble(worker, &sections, options)
}

/// Each VM's section (a chunk of VMs per core), sorted by VM id.
pub fn compile_sections<'a>(vms: impl IntoIterator<Item = &'a Vm>) -> Vec<VmSection> {
    let vms: Vec<&Vm> = vms.into_iter().collect();
    compile_sections_in(&vms, chunks_for(vms.len()))
}

/// [`compile_sections`] in `chunks` parts (one thread each).
fn compile_sections_in(vms: &[&Vm], chunks: usize) -> Vec<VmSection> {
    let mut sections: Vec<VmSection> = in_parallel(vms, chunks, |chunk| {
        let mut canonicals = Canonicals::default();
        let compiled: Vec<VmSection> = chunk
            .iter()
            .map(|vm| compile_vm_with(vm, &mut canonicals))
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

/// What a table holding some sections has, as a listing shows it: what a drift check
/// compares with the live table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Managed objects: shard chains, block sets and fqdn sets.
    pub objects: BTreeSet<String>,
    /// Rules per chain, the base chain's included.
    pub rules: BTreeMap<String, usize>,
}

/// The [`TableShape`] of a table holding `sections`.
pub fn table_shape<'a>(
    sections: impl IntoIterator<Item = &'a VmSection> + Clone,
    options: &CompileOptions,
) -> TableShape {
    let mut shape = TableShape::default();
    for section in sections.clone() {
        shape.objects.extend(section.objects());
    }
    let sets = declared_sets(sections.clone());
    shape.objects.extend(sets.iter().map(ToString::to_string));
    let uses = shard_uses(sections, None);
    for (direction, shard, rules) in every_shard_chain(&uses, options) {
        let chain = names::shard_chain(direction, shard);
        shape.rules.insert(chain.clone(), rules.len());
        shape.objects.insert(chain);
    }
    shape
        .rules
        .insert(names::FORWARD_CHAIN.to_string(), FORWARD_RULES);
    for direction in [Direction::Egress, Direction::Ingress] {
        let chain = names::dispatch_chain(direction).to_string();
        shape.rules.insert(chain, dispatch_rules(direction).len());
    }
    shape
}

/// Every shard chain of a table whose shards' use is `uses`, with its rules: ingress,
/// then egress, shard by shard.
fn every_shard_chain<'a>(
    uses: &'a [ShardUse<'a>],
    options: &'a CompileOptions,
) -> impl Iterator<Item = (Direction, u8, Vec<ShardRule<'a>>)> + 'a {
    (0..names::SHARDS)
        .zip(uses)
        .flat_map(move |(shard, shard_use)| {
            [Direction::Ingress, Direction::Egress].map(|direction| {
                let rules = shard_rules(direction, shard, shard_use, &options.dns_gates);
                (direction, shard, rules)
            })
        })
}

/// The block sets a table holding `sections` has: each set a VM of a shard uses.
pub fn declared_sets<'a>(sections: impl IntoIterator<Item = &'a VmSection>) -> BTreeSet<BlockSet> {
    sections.into_iter().flat_map(|s| s.sets()).collect()
}

/// [`assemble`] with the VMs' text written in `chunks` parts (one thread each).
fn assemble_in(
    worker: &str,
    sections: &[&VmSection],
    options: &CompileOptions,
    chunks: usize,
) -> Ruleset {
    let mut out = Out::new();
    base(&mut out, worker, sections.len(), options);
    let t = names::TABLE;
    let sets = declared_sets(sections.iter().copied());
    if !sets.is_empty() {
        emit!(
            out,
            "# -- block sets of the shards: <vm address> . <far side> [. <ports>]"
        );
    }
    for set in &sets {
        emit!(out, "add set inet {t} {set} {{ {} }}", set.declaration());
        emit!(out, "flush set inet {t} {set}");
        out.objects.insert(set.to_string());
    }
    // The VMs' own text (fqdn sets, then elements) is most of a ruleset: written a chunk
    // of VMs per core, then joined in order. Each text is allocated once, at a size
    // that holds it: growing a large string by doubling copies it over and over (a
    // tenth of a 10k-VM compile, when the estimate fell short).
    let parts = in_parallel(sections, chunks, |chunk| {
        let mut part = Part {
            text: String::with_capacity(chunk.iter().map(|s| text_size(s)).sum()),
            objects: Vec::new(),
        };
        for section in chunk {
            if !section.fqdn_sets.is_empty() {
                part.text.push_str(&section.comment());
                part.text.push('\n');
            }
            for (set, family) in &section.fqdn_sets {
                // Added, never flushed: the DNS gate's entries survive every sync.
                for piece in [
                    "add set inet ",
                    t,
                    " ",
                    set,
                    " { ",
                    fqdn_set_declaration(*family),
                    " }\n",
                ] {
                    part.text.push_str(piece);
                }
                part.objects.push(set.to_string());
            }
            for (set, elements) in section.elements_by_set() {
                element_line(&mut part.text, "add", &set, elements.iter().map(|(_, e)| e));
            }
        }
        part
    });
    let tail: usize = sections.iter().map(|s| tail_size(s)).sum();
    out.text
        .reserve(parts.iter().map(|p| p.text.len()).sum::<usize>() + tail + TAIL_FIXED);
    for part in parts {
        out.text.push_str(&part.text);
        out.objects.extend(part.objects);
    }
    let mut members: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
    for section in sections {
        for member in &section.members {
            members.entry(member.set()).or_default().push(member);
        }
    }
    if !members.is_empty() {
        emit!(out, "# -- the VMs in the worker-wide sets");
    }
    for (set, members) in &members {
        let _ = write!(out.text, "add element inet {t} {set} {{ ");
        for (i, member) in members.iter().enumerate() {
            if i > 0 {
                out.text.push_str(", ");
            }
            member.push_to(&mut out.text);
        }
        out.text.push_str(" }\n");
    }
    emit!(out, "# -- the shards' chains");
    let uses = shard_uses(sections.iter().copied(), None);
    for (direction, shard, rules) in every_shard_chain(&uses, options) {
        render_chain(&mut out.text, direction, shard, &rules);
        out.objects.insert(names::shard_chain(direction, shard));
    }
    dispatch_chains(&mut out);
    forward_rules(&mut out);
    Ruleset {
        text: out.text,
        objects: out.objects,
        vms: sections.len(),
    }
}

/// The base chain's rules ([`FORWARD_RULES`] of them).
fn forward_rules(out: &mut Out) {
    let (t, f) = (names::TABLE, names::FORWARD_CHAIN);
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
    for (ip, set) in [("ip6", names::TAP_SRC6), ("ip", names::TAP_SRC4)] {
        emit!(
            out,
            "add rule inet {t} {f} iifname @{} iifname . {ip} saddr != @{set} drop comment \"anti-spoof\"",
            names::TAP_VMS
        );
    }
    let (egress, ingress) = (names::EGRESS_CHAIN, names::INGRESS_CHAIN);
    let (taps, addrs) = (names::TAP_VMS, names::VM_ADDRS);
    for rule in [
        format!("iifname @{taps} jump {egress}"),
        format!("ip6 saddr @{addrs} jump {egress}"),
        format!("oifname @{taps} jump {ingress}"),
        format!("ip6 daddr @{addrs} jump {ingress}"),
    ] {
        emit!(out, "add rule inet {t} {f} {rule}");
    }
}

/// The rules of the two dispatch chains, in order: each sends a packet to the chain of
/// its VM address's shard, by the same hash as [`names::shard_of`].
fn dispatch_rules(direction: Direction) -> [String; 2] {
    let own = match direction {
        Direction::Egress => "saddr",
        Direction::Ingress => "daddr",
    };
    let mut targets = String::new();
    for shard in 0..names::SHARDS {
        if shard > 0 {
            targets.push_str(", ");
        }
        let _ = write!(
            targets,
            "{shard} : jump {}",
            names::shard_chain(direction, shard)
        );
    }
    // An inline map: nft 1.0.6 cannot list a named map typed by a hash.
    ["ip6", "ip"].map(|ip| {
        format!(
            "jhash {ip} {own} mod {} seed {:#x} vmap {{ {targets} }}",
            names::SHARDS,
            names::SHARD_SEED
        )
    })
}

/// The dispatch chains, added and flushed, with their rules.
fn dispatch_chains(out: &mut Out) {
    let t = names::TABLE;
    emit!(out, "# -- dispatch: a VM address to its shard's chain");
    for direction in [Direction::Egress, Direction::Ingress] {
        let chain = names::dispatch_chain(direction);
        emit!(out, "add chain inet {t} {chain}");
        emit!(out, "flush chain inet {t} {chain}");
        for rule in dispatch_rules(direction) {
            emit!(out, "add rule inet {t} {chain} {rule}");
        }
    }
}

/// The text of a chunk of VMs, written apart from the others.
struct Part {
    text: String,
    objects: Vec<String>,
}

/// An fqdn set's declaration.
fn fqdn_set_declaration(family: Family) -> &'static str {
    match family {
        Family::V4 => "type ipv4_addr; flags timeout;",
        Family::V6 => "type ipv6_addr; flags timeout;",
    }
}

/// At least the length of a section's own text (its comment, fqdn sets and elements),
/// from the longest each line can be.
fn text_size(section: &VmSection) -> usize {
    // `add element inet vmedge out_s63_b65535_allow_tcp6 { ` and ` }`.
    const SET_LINE: usize = 56;
    // `<ipv6> . <ipv6>/128 . 65535-65535, `
    const ELEMENT: usize = 39 + 3 + 43 + 3 + 11 + 2;
    // `add set inet vmedge fq_<32>_<16>_4 { type ipv4_addr; flags timeout; }`
    const FQDN_SET: usize = 112;
    // `# -- vm <uuid> (org <org>), by address <ipv6>`
    let comment = 104 + section.org.len();
    comment
        + SET_LINE * section.sets().count()
        + ELEMENT * section.elements.len()
        + FQDN_SET * section.fqdn_sets.len()
}

/// About the length of what a section adds after its own text: its members, and its
/// fqdn rules in a shard chain.
fn tail_size(section: &VmSection) -> usize {
    // `"<tap>" . <ipv6>, `
    const MEMBER: usize = 64;
    // `add rule inet vmedge out_s63 ip6 saddr <ipv6> ip6 daddr @fq_<..>_6 tcp dport
    // 65535 return comment "fqdn <pattern>"`
    const FQDN_RULE: usize = 200;
    MEMBER * section.members.len()
        + section
            .fqdn_rules
            .iter()
            .map(|r| FQDN_RULE + r.pattern.len())
            .sum::<usize>()
}

/// About the length of what every ruleset has after the VMs' text: the shard chains'
/// own rules and the dispatch and base chains.
const TAIL_FIXED: usize = 2 * names::SHARDS as usize * 1024 + 16 * 1024;

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
    for piece in [verb, " element inet ", names::TABLE, " "] {
        out.push_str(piece);
    }
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

/// The table, base chain, maps and worker-wide sets, flushed: what every full sync
/// starts with.
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
    let mut worker_sets = vec![
        (names::TAP_VMS, "ifname"),
        (names::VM_ADDRS, "ipv6_addr"),
        (names::TAP_SRC6, "ifname . ipv6_addr"),
        (names::TAP_SRC4, "ifname . ipv4_addr"),
        (names::BLOCK_BYPASS6, "ipv6_addr"),
        (names::BLOCK_BYPASS4, "ipv4_addr"),
    ];
    for direction in [Direction::Ingress, Direction::Egress] {
        worker_sets.push((names::default_deny(direction, true), "ifname"));
        worker_sets.push((names::default_deny(direction, false), "ipv6_addr"));
    }
    for (set, key) in worker_sets {
        emit!(out, "add set inet {t} {set} {{ type {key}; }}");
        emit!(out, "flush set inet {t} {set}");
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
    /// A block set new to its shard.
    AddBlockSet(BlockSet),
    /// An fqdn set (a no-op when it exists; never flushed).
    AddFqdnSet(&'a str, Family),
    /// A VM's elements leaving a block set.
    DeleteElements(BlockSet, Vec<&'a Element>),
    /// A VM's elements entering a block set.
    AddElements(BlockSet, Vec<&'a Element>),
    /// A VM's entry leaving a worker-wide set.
    DeleteMember(&'a Member),
    /// A VM's entry entering a worker-wide set.
    AddMember(&'a Member),
    /// A shard chain whose rules change from `was` to `is`: written as a flush and
    /// refill, or (over netlink) as the rules deleted and inserted in place.
    Chain {
        /// Its direction.
        direction: Direction,
        /// Its shard.
        shard: u8,
        /// The rules it has.
        was: Vec<ShardRule<'a>>,
        /// The rules it gets.
        is: Vec<ShardRule<'a>>,
    },
    /// A block set no VM of its shard uses any more.
    DeleteBlockSet(BlockSet),
    /// An fqdn set of a VM that is gone, or of a rule that is gone.
    DeleteSet(&'a str),
}

impl Update<'_> {
    /// The update as one `nft -f` transaction.
    pub fn text(&self) -> String {
        let t = names::TABLE;
        let mut out = Out::new();
        emit!(out, "# vmedge: {} VMs changed", self.changed);
        for op in &self.ops {
            match op {
                Op::AddBlockSet(set) => {
                    emit!(out, "add set inet {t} {set} {{ {} }}", set.declaration())
                }
                Op::AddFqdnSet(set, family) => emit!(
                    out,
                    "add set inet {t} {set} {{ {} }}",
                    fqdn_set_declaration(*family)
                ),
                Op::DeleteElements(set, elements) => {
                    element_line(&mut out.text, "delete", set, elements.iter().copied())
                }
                Op::AddElements(set, elements) => {
                    element_line(&mut out.text, "add", set, elements.iter().copied())
                }
                Op::DeleteMember(member) => emit!(
                    out,
                    "delete element inet {t} {} {{ {} }}",
                    member.set(),
                    member.to_text()
                ),
                Op::AddMember(member) => emit!(
                    out,
                    "add element inet {t} {} {{ {} }}",
                    member.set(),
                    member.to_text()
                ),
                Op::Chain {
                    direction,
                    shard,
                    is,
                    ..
                } => render_chain(&mut out.text, *direction, *shard, is),
                Op::DeleteBlockSet(set) => emit!(out, "delete set inet {t} {set}"),
                Op::DeleteSet(set) => emit!(out, "delete set inet {t} {set}"),
            }
        }
        out.text
    }
}

/// The change that turns a table holding `previous` into one holding `next`, touching
/// only the VMs that differ and the chains of their shards where what those look up
/// changed; `None` when nothing does. Both are keyed by VM id. The base objects must
/// already be in place (a full sync made them). Sections may be shared (`Arc`): one that
/// is the same object on both sides is not even compared.
pub fn update<'a, S: Borrow<VmSection>>(
    previous: &'a BTreeMap<VmId, S>,
    next: &'a BTreeMap<VmId, S>,
    options: &CompileOptions,
) -> Option<Update<'a>> {
    static NO_MEMBERS: BTreeSet<Member> = BTreeSet::new();
    let mut changes = Vec::new();
    let mut changed = 0;
    let mut dirty = BTreeSet::new();
    let mut fqdn_sets_gone: Vec<&'a str> = Vec::new();
    let mut fqdn_sets_new: Vec<(&'a str, Family)> = Vec::new();
    for (id, old) in previous {
        let old = old.borrow();
        if !next.contains_key(id) {
            changed += 1;
            dirty.extend(old.shards());
            element_changes(&mut changes, &old.elements, &[]);
            member_changes(&mut changes, &old.members, &NO_MEMBERS);
            fqdn_sets_gone.extend(old.fqdn_sets.iter().map(|(set, _)| &**set));
        }
    }
    for (id, new) in next {
        let new = new.borrow();
        let old = previous.get(id).map(Borrow::borrow);
        if old.is_some_and(|old| std::ptr::eq(old, new) || old == new) {
            continue;
        }
        changed += 1;
        dirty.extend(new.shards());
        let had = |set: &str| old.is_some_and(|o| o.fqdn_sets.iter().any(|(s, _)| **s == *set));
        for (set, family) in &new.fqdn_sets {
            if !had(set) {
                fqdn_sets_new.push((set, *family));
            }
        }
        if let Some(old) = old {
            dirty.extend(old.shards());
            for (set, _) in &old.fqdn_sets {
                if !new.fqdn_sets.iter().any(|(s, _)| s == set) {
                    fqdn_sets_gone.push(set);
                }
            }
        }
        element_changes(
            &mut changes,
            old.map_or(&[], |o| &o.elements),
            &new.elements,
        );
        member_changes(
            &mut changes,
            old.map_or(&NO_MEMBERS, |o| &o.members),
            &new.members,
        );
    }
    if changed == 0 {
        return None;
    }
    // What the changed VMs' shards look up, before and after: one pass over the VMs.
    let was = shard_uses(previous.values().map(Borrow::borrow), Some(&dirty));
    let is = shard_uses(next.values().map(Borrow::borrow), Some(&dirty));
    let mut ops = Vec::new();
    let mut sets_gone = BTreeSet::new();
    for &shard in &dirty {
        let (was, is) = (&was[usize::from(shard)], &is[usize::from(shard)]);
        let old_sets: BTreeSet<BlockSet> = was.sets(shard).collect();
        let new_sets: BTreeSet<BlockSet> = is.sets(shard).collect();
        ops.extend(new_sets.difference(&old_sets).copied().map(Op::AddBlockSet));
        sets_gone.extend(old_sets.difference(&new_sets).copied());
    }
    ops.extend(fqdn_sets_new.into_iter().map(|(s, f)| Op::AddFqdnSet(s, f)));
    // A set that goes takes its elements with it. Deleting them first would cost the
    // kernel a walk of the table's sets to find it, and the removals themselves.
    ops.extend(
        changes
            .into_iter()
            .filter(|op| !matches!(op, Op::DeleteElements(set, _) if sets_gone.contains(set))),
    );
    for &shard in &dirty {
        let (was, is) = (&was[usize::from(shard)], &is[usize::from(shard)]);
        for direction in [Direction::Ingress, Direction::Egress] {
            if was.differs_for(is, direction) {
                ops.push(Op::Chain {
                    direction,
                    shard,
                    was: shard_rules(direction, shard, was, &options.dns_gates),
                    is: shard_rules(direction, shard, is, &options.dns_gates),
                });
            }
        }
    }
    ops.extend(sets_gone.into_iter().map(Op::DeleteBlockSet));
    ops.extend(fqdn_sets_gone.into_iter().map(Op::DeleteSet));
    Some(Update { changed, ops })
}

/// Deletes the elements only in `old`, then adds those only in `new`, set by set (both
/// sorted, as a section keeps them). Deletions first: an element replaced by one that
/// overlaps it (a port range grown) must be out of an interval set before its
/// successor comes in.
fn element_changes<'a>(
    ops: &mut Vec<Op<'a>>,
    old: &'a [(BlockSet, Element)],
    new: &'a [(BlockSet, Element)],
) {
    let gone = sorted_difference(old, new);
    for (set, elements) in by_set(&gone) {
        ops.push(Op::DeleteElements(
            set,
            elements.iter().map(|(_, e)| *e).collect(),
        ));
    }
    let added = sorted_difference(new, old);
    for (set, elements) in by_set(&added) {
        ops.push(Op::AddElements(
            set,
            elements.iter().map(|(_, e)| *e).collect(),
        ));
    }
}

/// The pairs of `a` not in `b`, both sorted, each pair's element by reference.
fn sorted_difference<'a>(
    a: &'a [(BlockSet, Element)],
    b: &[(BlockSet, Element)],
) -> Vec<(BlockSet, &'a Element)> {
    let mut rest = b;
    a.iter()
        .filter(|pair| {
            while rest.first().is_some_and(|first| first < *pair) {
                rest = &rest[1..];
            }
            rest.first() != Some(*pair)
        })
        .map(|(set, element)| (*set, element))
        .collect()
}

/// Deletes the members only in `old` and adds those only in `new`.
fn member_changes<'a>(ops: &mut Vec<Op<'a>>, old: &'a BTreeSet<Member>, new: &'a BTreeSet<Member>) {
    ops.extend(old.difference(new).map(Op::DeleteMember));
    ops.extend(new.difference(old).map(Op::AddMember));
}

/// Deletes stale objects, as text.
fn delete_objects_text<'a>(out: &mut Out, objects: impl Iterator<Item = &'a String>) {
    let t = names::TABLE;
    let (chain_names, set_names): (Vec<&String>, Vec<&String>) =
        objects.partition(|o| names::is_managed_chain(o));
    // Rules hold sets, and an older version's dispatch maps hold jumps to its chains:
    // the chains are emptied, then those maps go, then the chains, then the sets.
    let (legacy, set_names): (Vec<&String>, Vec<&String>) = set_names
        .into_iter()
        .partition(|o| names::LEGACY_MAPS.contains(&o.as_str()));
    for chain in &chain_names {
        emit!(out, "flush chain inet {t} {chain}");
    }
    for map in legacy {
        emit!(out, "delete map inet {t} {map}");
    }
    for chain in &chain_names {
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
        vms.iter().map(|v| (v.id, compile_vm(v))).collect()
    }

    fn options() -> CompileOptions {
        CompileOptions::new(vec!["fd5e:ed00::53".parse().unwrap()])
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
        let options = options();
        let all: Vec<&Vm> = all.iter().collect();
        let sections = compile_sections_in(&all, 3);
        let sections: Vec<&VmSection> = sections.iter().collect();
        let one = assemble_in("w", &sections, &options, 1);
        for chunks in [2, 3, 7] {
            assert!(
                assemble_in("w", &sections, &options, chunks) == one,
                "{chunks} parts"
            );
        }
        let alone: Vec<VmSection> = all.iter().map(|vm| compile_vm(vm)).collect();
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
        let mut canonicals = Canonicals::default();
        // Twice over: the second round is all from the cache.
        for vm in vms.iter().chain(&vms) {
            let shared = compile_vm_with(vm, &mut canonicals);
            assert_eq!(shared, compile_vm(vm), "{}", vm.id);
        }
    }

    const TWO: &str = r#"{"vms": [
        {"id": "00000000-0000-4000-8000-000000000001", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::1", "status": "running", "interface": "tap1",
         "services": [{"name": "web", "port": 8080}]},
        {"id": "b0000000-0000-4000-8000-000000000002", "org_id": "o", "worker": "w", "public_ipv6": "fd5e:ed00::2", "status": "running",
         "services": [{"name": "web", "port": 8080}, {"name": "udp-thing", "port": 9000}]}]}"#;

    #[test]
    fn a_vm_without_an_ipv4_address_gets_no_ipv4_fqdn_set_until_it_has_one() {
        let options = options();
        let doc = r#"{"vms": [{"id": "00000000-0000-4000-8000-000000000001", "org_id": "o",
            "worker": "w", "public_ipv6": "fd5e:ed00::1", "status": "running", "services": [],
            "interface": "tap1", "firewall": {"egress": {"default": "deny", "rules": [
                {"action": "allow", "kind": "fqdn", "value": "*.pypi.org", "protocol": "tcp", "ports": "443"}]}}}]}"#;
        let pattern = vmedge_model::DomainPattern::parse("*.pypi.org").unwrap();
        let v6_only = vms(doc);
        let sets = names::fqdn_sets(&v6_only[0], &pattern);
        assert_eq!(sets.v4, None);
        assert_eq!(
            crate::fqdn_targets(&v6_only[0]),
            [(pattern.clone(), sets.clone())]
        );
        let text = compile("w", v6_only.iter(), &options).text;
        let fqdn: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("@fq_") || l.contains(" fq_"))
            .collect();
        assert_eq!(fqdn.len(), 2, "{fqdn:#?}");
        assert!(fqdn.iter().all(|l| l.contains(&*sets.v6)), "{fqdn:#?}");

        // Given an address, it gets the IPv4 set and its rule; its IPv6 set stays as it is
        // (the DNS gate's entries in it with it).
        let dual = vms(&doc.replace(
            r#""interface": "tap1""#,
            r#""interface": "tap1", "ipv4": "198.18.0.2""#,
        ));
        let v4 = names::fqdn_sets(&dual[0], &pattern).v4.unwrap();
        let text = update(&sections(&v6_only), &sections(&dual), &options)
            .unwrap()
            .text();
        let fqdn: Vec<&str> = text.lines().filter(|l| l.contains("fq_")).collect();
        assert!(fqdn.iter().all(|l| l.contains(&v4)), "{text}");
        assert!(fqdn.iter().any(|l| l.starts_with("add set")), "{text}");
        assert!(
            fqdn.iter()
                .any(|l| l.contains("ip saddr 198.18.0.2 ip daddr @")),
            "{text}"
        );
    }

    #[test]
    fn an_update_touches_only_what_changed() {
        let options = options();
        let before = sections(&vms(TWO));
        assert!(
            update(&before, &before, &options).is_none(),
            "nothing changed, nothing to do"
        );
        // Each VM's IPv6 address is in its own shard.
        let shard = |addr: &str| names::shard_of(addr.parse().unwrap());
        let (s1, s2) = (shard("fd5e:ed00::1"), shard("fd5e:ed00::2"));
        assert_ne!(s1, s2);

        // VM 2 drops a service: its element leaves its shard's set, and that is all.
        let changed = TWO.replace(r#", {"name": "udp-thing", "port": 9000}"#, "");
        let after = sections(&vms(&changed));
        let text = update(&before, &after, &options).unwrap().text();
        assert_eq!(
            text.lines().skip(1).collect::<Vec<_>>(),
            [format!(
                "delete element inet vmedge in_s{s2}_b0_allow_tcp6 {{ fd5e:ed00::2 . ::/0 . 9000 }}"
            )],
            "{text}"
        );

        // VM 2 gets a rule of a shape new to its shard: the set is added and a rule
        // inserted in the shard's ingress chain; nothing of VM 1's shard or of egress.
        let changed = TWO.replace(
            r#"{"name": "udp-thing", "port": 9000}]"#,
            r#"{"name": "udp-thing", "port": 9000}], "firewall": {"ingress": {"default": "deny", "rules": [{"action": "allow", "kind": "cidr", "value": "2001:db8::/32", "protocol": "udp", "ports": "53"}]}}"#,
        );
        let after = sections(&vms(&changed));
        let text = update(&before, &after, &options).unwrap().text();
        for line in [
            format!("add set inet vmedge in_s{s2}_b0_allow_udp6 "),
            format!("flush chain inet vmedge in_s{s2}\n"),
            format!("add rule inet vmedge in_s{s2} ip6 daddr . ip6 saddr . udp dport @in_s{s2}_b0_allow_udp6 return"),
        ] {
            assert!(text.contains(&line), "{line}: {text}");
        }
        assert!(
            !text.contains(&format!("_s{s1}")) && !text.contains(&format!("out_s{s2}")),
            "{text}"
        );

        // VM 1 leaves: its members go, and the sets its shard no longer uses (their
        // elements with them, not one by one first); VM 2 is not touched.
        let mut left = vms(TWO);
        left.remove(0);
        let after = sections(&left);
        let text = update(&before, &after, &options).unwrap().text();
        for line in [
            r#"delete element inet vmedge tap_vms { "tap1" }"#.to_string(),
            r#"delete element inet vmedge tap_src6 { "tap1" . fd5e:ed00::1 }"#.to_string(),
            r#"delete element inet vmedge default_deny_in_if { "tap1" }"#.to_string(),
            format!("delete set inet vmedge in_s{s1}_b0_allow_tcp6"),
        ] {
            assert!(text.contains(&line), "{line}: {text}");
        }
        assert!(
            !text.contains(&format!(
                "delete element inet vmedge in_s{s1}_b0_allow_tcp6"
            )),
            "{text}"
        );
        assert!(!text.contains(&format!("_s{s2}")), "{text}");

        // ...and comes back.
        let text = update(&after, &before, &options).unwrap().text();
        for line in [
            r#"add element inet vmedge tap_vms { "tap1" }"#.to_string(),
            format!(
                "add element inet vmedge in_s{s1}_b0_allow_tcp6 {{ fd5e:ed00::1 . ::/0 . 8080 }}"
            ),
        ] {
            assert!(text.contains(&line), "{line}: {text}");
        }
    }

    #[test]
    fn an_update_writes_each_chain_it_rewrites_as_a_full_compile_does() {
        let options = options();
        let example = vms(include_str!("../../examples/state.json"));
        let before = sections(&example);
        let mut changed = example.clone();
        // Every VM loses its egress policy: fqdn rules and blocks go from their shards.
        for vm in &mut changed {
            vm.firewall.egress = vmedge_model::FirewallPolicy::default().egress;
        }
        let after = sections(&changed);
        let update = update(&before, &after, &options).unwrap();
        let full = compile("w", &changed, &options).text;
        let mut rewritten = 0;
        for op in &update.ops {
            if let Op::Chain {
                direction,
                shard,
                is,
                ..
            } = op
            {
                rewritten += 1;
                let mut text = String::new();
                render_chain(&mut text, *direction, *shard, is);
                assert!(full.contains(&text), "{text}");
            }
        }
        assert!(rewritten > 0, "the change reaches some chains");
    }

    #[test]
    fn the_shape_a_drift_check_expects_is_the_one_the_text_makes() {
        let options = options();
        let vms = vms(include_str!("../../examples/state.json"));
        let sections = compile_sections(&vms);
        let ruleset = assemble("w", &sections.iter().collect::<Vec<_>>(), &options);
        let shape = table_shape(&sections, &options);
        assert_eq!(shape.rules, rule_counts(&ruleset.text));
        let objects: BTreeSet<String> = ruleset.objects.iter().cloned().collect();
        assert_eq!(shape.objects, objects);
    }

    #[test]
    fn a_full_ruleset_deletes_what_the_live_table_has_beyond_it() {
        let ruleset = compile("w", vms(TWO).iter().skip(1), &options());
        let live: BTreeSet<String> = [
            // An older version's dispatch map, per-VM chain and block set.
            "egress_by_if",
            "in_00000000000040008000000000000001",
            "in_b0_tcp6_s1",
            // A set its shard no longer uses.
            "in_s9_b3_deny_tcp6",
            "in_s2",
            "forward",
        ]
        .map(String::from)
        .into();
        let text = ruleset.with_deletions(&live);
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        assert_eq!(
            tail,
            [
                "delete set inet vmedge in_s9_b3_deny_tcp6",
                "delete set inet vmedge in_b0_tcp6_s1",
                "delete chain inet vmedge in_00000000000040008000000000000001",
                "delete map inet vmedge egress_by_if",
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

    mod element_changes {
        use super::*;
        use proptest::prelude::*;

        /// Sets and elements from a small space, so the two sides share some.
        fn arb_elements() -> impl Strategy<Value = BTreeMap<BlockSet, BTreeSet<Element>>> {
            let set = (0u16..4, 0u8..3).prop_map(|(block, shard)| BlockSet {
                kind: crate::section::BlockKind {
                    direction: Direction::Egress,
                    block,
                    action: vmedge_model::Action::Allow,
                    family: Family::V4,
                    l4: None,
                },
                shard,
            });
            let element = (0u8..6).prop_map(|far| Element {
                own: "198.18.0.2".parse().unwrap(),
                far: IpNet::new(IpAddr::from([10, 0, far, 0]), 24).unwrap(),
                ports: None,
            });
            proptest::collection::btree_map(
                set,
                proptest::collection::btree_set(element, 1..5),
                0..5,
            )
        }

        fn sorted(map: &BTreeMap<BlockSet, BTreeSet<Element>>) -> Vec<(BlockSet, Element)> {
            map.iter()
                .flat_map(|(set, elements)| elements.iter().map(|e| (*set, *e)))
                .collect()
        }

        proptest! {
            #[test]
            fn are_what_ordered_sets_say(old in arb_elements(), new in arb_elements()) {
                let (old_sorted, new_sorted) = (sorted(&old), sorted(&new));
                let mut ops = Vec::new();
                element_changes(&mut ops, &old_sorted, &new_sorted);
                // Every set's deletions, then every set's additions.
                let mut expected = Vec::new();
                let empty = BTreeSet::new();
                let sets: BTreeSet<_> = old.keys().chain(new.keys()).collect();
                for (verb, from, to) in [("delete", &old, &new), ("add", &new, &old)] {
                    for set in &sets {
                        let (a, b) = (from.get(set).unwrap_or(&empty), to.get(set).unwrap_or(&empty));
                        let only: Vec<Element> = a.difference(b).copied().collect();
                        if !only.is_empty() {
                            expected.push((verb, **set, only));
                        }
                    }
                }
                let got: Vec<_> = ops
                    .iter()
                    .map(|op| match op {
                        Op::DeleteElements(set, e) => ("delete", *set, e.iter().copied().copied().collect()),
                        Op::AddElements(set, e) => ("add", *set, e.iter().copied().copied().collect()),
                        other => panic!("not an element change: {other:?}"),
                    })
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
