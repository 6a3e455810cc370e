//! An [`Update`] as nf_tables netlink messages: the same rules the text spells, in the
//! expressions nft itself generates for them (`nft --debug=netlink` shows them).

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use vmedge_model::{Action, Ports, Protocol};

use super::wire::{Batch, NLM_F_APPEND, NLM_F_CREATE};
use crate::canonical::{Family, L4};
use crate::compile::{Op, Update};
use crate::names::{self, Direction};
use crate::section::{doh_set, family_of, BlockSet, Dispatch, Element, Member};
use crate::shard::ShardRule;

// Message types (enum nf_tables_msg_types).
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

// Attributes.
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_POSITION: u16 = 6;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

// Values.
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_01: u32 = 9;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NF_DROP: i32 = 0;
const NFT_RETURN: i32 = -5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// nft's datatype ids, as set key types (`ipv4_addr`, `ipv6_addr`).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
/// `IFNAMSIZ`: an `ifname` key is the name, NUL-padded to 16 bytes.
const IFNAMSIZ: usize = 16;
/// `NFTNL_UDATA_RULE_COMMENT`.
const UDATA_RULE_COMMENT: u8 = 0;

/// Encodes `update` as one batch numbered from `first_seq`. `handles` are the rule handles
/// of live chains, in order (what [`NetlinkSocket::rule_handles`](super::NetlinkSocket::rule_handles)
/// reads): a chain whose handles match the rules it should have is edited in place;
/// any other is flushed and refilled.
pub fn encode_update(
    update: &Update<'_>,
    first_seq: u32,
    handles: &BTreeMap<String, Vec<u64>>,
) -> Batch {
    let mut b = Batch::new(first_seq);
    let mut set_ids = 0u32;
    // Block sets this batch creates, by their id in it: their elements name them by id.
    let mut new_sets: BTreeMap<BlockSet, u32> = BTreeMap::new();
    for op in &update.ops {
        match op {
            Op::AddBlockSet(set) => {
                set_ids += 1;
                block_set(&mut b, set, set_ids);
                new_sets.insert(*set, set_ids);
            }
            Op::AddFqdnSet(set, family) => {
                set_ids += 1;
                fqdn_set(&mut b, set, *family, set_ids);
            }
            Op::AddElements(set, elements) => {
                let id = new_sets.get(set).copied();
                block_elements(&mut b, NFT_MSG_NEWSETELEM, set, id, elements)
            }
            Op::DeleteElements(set, elements) => {
                block_elements(&mut b, NFT_MSG_DELSETELEM, set, None, elements)
            }
            Op::AddMember(member) => member_element(&mut b, NFT_MSG_NEWSETELEM, member),
            Op::DeleteMember(member) => member_element(&mut b, NFT_MSG_DELSETELEM, member),
            Op::Chain {
                direction,
                shard,
                was,
                is,
            } => {
                let chain = names::shard_chain(*direction, *shard);
                match handles.get(&chain).filter(|h| h.len() == was.len()) {
                    Some(handles) => edit_chain(&mut b, &chain, *direction, was, is, handles),
                    None => {
                        flush_chain(&mut b, &chain);
                        for rule in is {
                            add_rule(&mut b, &chain, *direction, rule, None);
                        }
                    }
                }
            }
            Op::DeleteBlockSet(set) => delete_set(&mut b, &set.to_string()),
            Op::DeleteSet(set) => delete_set(&mut b, set),
        }
    }
    b
}

fn delete_set(b: &mut Batch, set: &str) {
    let at = b.message(NFT_MSG_DELSET, 0, format!("delete set {set}"));
    b.str(NFTA_SET_TABLE, names::TABLE);
    b.str(NFTA_SET_NAME, set);
    b.finish(at);
}

/// One address for an fqdn set, with how long it stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FqdnElement {
    /// The set (one of [`names::fqdn_sets`]); its family must be the address's.
    pub set: String,
    /// An address a DNS answer gave.
    pub addr: IpAddr,
    /// How long the address stays in the set from now.
    pub timeout: std::time::Duration,
}

/// Adds `elements` to their fqdn sets, one message per set. An address already present
/// gets the new timeout and expiry in place (the kernel updates an element's timeout
/// when an add without `NLM_F_EXCL` carries one; Linux 6.10 and later).
pub fn encode_fqdn_elements(b: &mut Batch, elements: &[FqdnElement]) {
    let mut by_set: BTreeMap<&str, Vec<&FqdnElement>> = BTreeMap::new();
    for element in elements {
        by_set.entry(&element.set).or_default().push(element);
    }
    for (set, elements) in by_set {
        let describe = format!("add {} elements to {set}", elements.len());
        let list = element_list(b, NFT_MSG_NEWSETELEM, SetRef::Name(set), describe);
        for element in elements {
            let ms = u64::try_from(element.timeout.as_millis()).unwrap_or(u64::MAX);
            let item = b.nest(NFTA_LIST_ELEM);
            let key = b.nest(NFTA_SET_ELEM_KEY);
            b.bytes(NFTA_DATA_VALUE, &addr_bytes(&element.addr));
            b.end_nest(key);
            b.u64(NFTA_SET_ELEM_TIMEOUT, ms);
            b.u64(NFTA_SET_ELEM_EXPIRATION, ms);
            b.end_nest(item);
        }
        end_element_list(b, list);
    }
}

fn flush_chain(b: &mut Batch, chain: &str) {
    let at = b.message(NFT_MSG_DELRULE, 0, format!("flush chain {chain}"));
    b.str(NFTA_RULE_TABLE, names::TABLE);
    b.str(NFTA_RULE_CHAIN, chain);
    b.finish(at);
}

/// Where a new rule goes: after or before a rule that stays, or at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    After(u64),
    Before(u64),
    End,
}

/// Turns a chain's rules from `was` (whose live handles are `handles`) into `is`, touching
/// only the rules that differ: each rule added costs the kernel a walk of the table's
/// sets (by name, to resolve its lookups), so rewriting a chain of a hundred rules for
/// one new one cost a hundred walks.
fn edit_chain(
    b: &mut Batch,
    chain: &str,
    direction: Direction,
    was: &[ShardRule<'_>],
    is: &[ShardRule<'_>],
    handles: &[u64],
) {
    // Diffed as numbers: the same number for equal rules.
    let mut ids: HashMap<&ShardRule<'_>, u32> = HashMap::default();
    let mut id = |rule| {
        let next = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        *ids.entry(rule).or_insert(next)
    };
    let was_ids: Vec<u32> = was.iter().map(&mut id).collect();
    let is_ids: Vec<u32> = is.iter().map(&mut id).collect();
    let ops = similar::capture_diff_slices(similar::Algorithm::Myers, &was_ids, &is_ids);
    let first_kept = ops.iter().find_map(|op| match op {
        similar::DiffOp::Equal { old_index, .. } => Some(handles[*old_index]),
        _ => None,
    });
    let mut last_kept = None;
    let mut deleted = Vec::new();
    let mut inserted: Vec<(Position, &[ShardRule<'_>])> = Vec::new();
    for op in &ops {
        let (old, new) = (op.old_range(), op.new_range());
        match op {
            similar::DiffOp::Equal { .. } => last_kept = Some(handles[old.end - 1]),
            _ => {
                deleted.extend(old.map(|i| handles[i]));
                if !new.is_empty() {
                    let at = match (last_kept, first_kept) {
                        (Some(h), _) => Position::After(h),
                        (None, Some(h)) => Position::Before(h),
                        (None, None) => Position::End,
                    };
                    inserted.push((at, &is[new]));
                }
            }
        }
    }
    for handle in deleted {
        let at = b.message(
            NFT_MSG_DELRULE,
            0,
            format!("delete rule {handle} of {chain}"),
        );
        b.str(NFTA_RULE_TABLE, names::TABLE);
        b.str(NFTA_RULE_CHAIN, chain);
        b.u64(NFTA_RULE_HANDLE, handle);
        b.finish(at);
    }
    for (at, rules) in inserted {
        match at {
            // Each one right after the same rule: the last first, so they end up in order.
            Position::After(_) => {
                for rule in rules.iter().rev() {
                    add_rule(b, chain, direction, rule, Some(at));
                }
            }
            Position::Before(_) | Position::End => {
                for rule in rules {
                    add_rule(b, chain, direction, rule, Some(at));
                }
            }
        }
    }
}

/// One rule added to `chain`: at its end, or at `position`.
fn add_rule(
    b: &mut Batch,
    chain: &str,
    direction: Direction,
    rule: &ShardRule<'_>,
    position: Option<Position>,
) {
    let mut text = String::new();
    rule.write_body(&mut text); // the nft spelling, for error messages
    let flags = match position {
        Some(Position::Before(_)) => NLM_F_CREATE,
        _ => NLM_F_CREATE | NLM_F_APPEND,
    };
    let at = b.message(
        NFT_MSG_NEWRULE,
        flags,
        format!("add rule to {chain}: {text}"),
    );
    b.str(NFTA_RULE_TABLE, names::TABLE);
    b.str(NFTA_RULE_CHAIN, chain);
    if let Some(Position::After(handle) | Position::Before(handle)) = position {
        b.u64(NFTA_RULE_POSITION, handle);
    }
    let list = b.nest(NFTA_RULE_EXPRESSIONS);
    expressions(b, rule, direction);
    b.end_nest(list);
    if let Some(comment) = rule.comment() {
        let mut udata = vec![UDATA_RULE_COMMENT, 0];
        udata.extend_from_slice(comment.as_bytes());
        udata.push(0);
        udata[1] = u8::try_from(comment.len() + 1).unwrap_or(u8::MAX);
        b.bytes(NFTA_RULE_USERDATA, &udata);
    }
    b.finish(at);
}

/// `add set ... { type ipv6_addr . ipv6_addr . inet_service; flags interval; }`, as nft
/// sends it (`nft --debug=mnl`): a no-op when the set exists.
fn block_set(b: &mut Batch, set: &BlockSet, id: u32) {
    let name = set.to_string();
    let at = b.message(NFT_MSG_NEWSET, NLM_F_CREATE, format!("add set {name}"));
    b.str(NFTA_SET_TABLE, names::TABLE);
    b.str(NFTA_SET_NAME, &name);
    b.u32(NFTA_SET_FLAGS, NFT_SET_INTERVAL | NFT_SET_CONCAT);
    let (addr_type, addr_len) = match set.kind.family {
        Family::V4 => (TYPE_IPV4_ADDR, 4),
        Family::V6 => (TYPE_IPV6_ADDR, 16),
    };
    // A concatenation's type packs its fields' types, 6 bits each; each field takes
    // whole 32-bit registers.
    let mut fields: Vec<(u32, u32)> = vec![(addr_type, addr_len), (addr_type, addr_len)];
    if set.kind.l4.is_some() {
        fields.push((TYPE_INET_SERVICE, 2));
    }
    let key_type = fields.iter().fold(0, |t, (field, _)| (t << 6) | field);
    let key_len: u32 = fields.iter().map(|(_, len)| len.next_multiple_of(4)).sum();
    b.u32(NFTA_SET_KEY_TYPE, key_type);
    b.u32(NFTA_SET_KEY_LEN, key_len);
    b.u32(NFTA_SET_ID, id);
    let desc = b.nest(NFTA_SET_DESC);
    let concat = b.nest(NFTA_SET_DESC_CONCAT);
    for (_, len) in &fields {
        let field = b.nest(NFTA_LIST_ELEM);
        b.u32(NFTA_SET_FIELD_LEN, *len);
        b.end_nest(field);
    }
    b.end_nest(concat);
    b.end_nest(desc);
    b.bytes(NFTA_SET_USERDATA, &BLOCK_SET_USERDATA);
    b.finish(at);
}

/// The userdata nft 1.0.6 gives such a set (key byte order and a typeof hint for its own
/// listing), the same for every block set.
const BLOCK_SET_USERDATA: [u8; 16] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00,
];

/// `add set ... { type ipv4_addr; flags timeout; }`: a no-op when the set exists.
fn fqdn_set(b: &mut Batch, set: &str, family: Family, id: u32) {
    let at = b.message(NFT_MSG_NEWSET, NLM_F_CREATE, format!("add set {set}"));
    b.str(NFTA_SET_TABLE, names::TABLE);
    b.str(NFTA_SET_NAME, set);
    b.u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT);
    let (key_type, key_len) = match family {
        Family::V4 => (TYPE_IPV4_ADDR, 4),
        Family::V6 => (TYPE_IPV6_ADDR, 16),
    };
    b.u32(NFTA_SET_KEY_TYPE, key_type);
    b.u32(NFTA_SET_KEY_LEN, key_len);
    b.u32(NFTA_SET_ID, id);
    b.finish(at);
}

fn expressions(b: &mut Batch, rule: &ShardRule<'_>, direction: Direction) {
    match rule {
        ShardRule::DnsGate(gate, l4) => {
            let family = family_of(gate);
            nfproto(b, family);
            daddr(b, family);
            cmp(b, NFT_CMP_EQ, &addr_bytes(gate));
            l4proto(b, *l4);
            dport(b);
            cmp(b, NFT_CMP_EQ, &53u16.to_be_bytes());
            verdict(b, NFT_RETURN);
        }
        ShardRule::DnsElsewhere(l4) => drop_port(b, *l4, 53),
        ShardRule::DnsOverTls(family, l4) => {
            nfproto(b, *family);
            saddr(b, *family);
            lookup(b, block_bypass_set(*family));
            drop_port(b, *l4, 853);
        }
        ShardRule::DnsOverHttps(family) => {
            nfproto(b, *family);
            saddr(b, *family);
            lookup(b, block_bypass_set(*family));
            daddr(b, *family);
            lookup(b, doh_set(*family));
            verdict(b, NF_DROP);
        }
        ShardRule::Block(set) => {
            let kind = set.kind;
            nfproto(b, kind.family);
            if let Some(l4) = kind.l4 {
                l4proto(b, l4);
            }
            // The VM's own address first: the key's layout (`vm . far [. port]`).
            let (saddr, daddr, len) = match kind.family {
                Family::V4 => (12, 16, 4),
                Family::V6 => (8, 24, 16),
            };
            let (own, far) = match direction {
                Direction::Ingress => (daddr, saddr),
                Direction::Egress => (saddr, daddr),
            };
            // Concatenations fill consecutive 32-bit registers from register 1.
            let (second, third) = match kind.family {
                Family::V4 => (NFT_REG32_01, NFT_REG32_01 + 1),
                Family::V6 => (NFT_REG_1 + 1, NFT_REG_1 + 2),
            };
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, own, len, NFT_REG_1);
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, far, len, second);
            if kind.l4.is_some() {
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, third);
            }
            lookup(b, &set.to_string());
            verdict(b, verdict_code(kind.action));
        }
        ShardRule::Fqdn(rule) => {
            let family = family_of(&rule.own);
            nfproto(b, family);
            saddr(b, family);
            cmp(b, NFT_CMP_EQ, &addr_bytes(&rule.own));
            daddr(b, family);
            lookup(b, &rule.set);
            let l4 = match rule.protocol {
                Protocol::Tcp => Some(L4::Tcp),
                Protocol::Udp => Some(L4::Udp),
                Protocol::Any => None,
            };
            if let Some(l4) = l4 {
                l4proto(b, l4);
                if let Ports::Range { first, last } = rule.ports {
                    dport(b);
                    if first == last {
                        cmp(b, NFT_CMP_EQ, &first.to_be_bytes());
                    } else {
                        cmp(b, NFT_CMP_GTE, &first.to_be_bytes());
                        cmp(b, NFT_CMP_LTE, &last.to_be_bytes());
                    }
                }
            }
            verdict(b, verdict_code(rule.action));
        }
        ShardRule::DefaultDeny(direction, by_tap) => {
            if *by_tap {
                meta(
                    b,
                    match direction {
                        Direction::Ingress => NFT_META_OIFNAME,
                        Direction::Egress => NFT_META_IIFNAME,
                    },
                );
            } else {
                nfproto(b, Family::V6);
                match direction {
                    Direction::Ingress => daddr(b, Family::V6),
                    Direction::Egress => saddr(b, Family::V6),
                }
            }
            lookup(b, names::default_deny(*direction, *by_tap));
            let at = expr(b, "counter");
            b.u64(NFTA_COUNTER_BYTES, 0);
            b.u64(NFTA_COUNTER_PACKETS, 0);
            end_expr(b, at);
            verdict(b, NF_DROP);
        }
    }
}

fn block_bypass_set(family: Family) -> &'static str {
    match family {
        Family::V4 => names::BLOCK_BYPASS4,
        Family::V6 => names::BLOCK_BYPASS6,
    }
}

/// `tcp dport 53 drop` and the like.
fn drop_port(b: &mut Batch, l4: L4, port: u16) {
    l4proto(b, l4);
    dport(b);
    cmp(b, NFT_CMP_EQ, &port.to_be_bytes());
    verdict(b, NF_DROP);
}

fn verdict_code(action: Action) -> i32 {
    match action {
        Action::Allow => NFT_RETURN,
        Action::Deny => NF_DROP,
    }
}

/// Starts `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }`.
fn expr(b: &mut Batch, name: &str) -> (usize, usize) {
    let elem = b.nest(NFTA_LIST_ELEM);
    b.str(NFTA_EXPR_NAME, name);
    let data = b.nest(NFTA_EXPR_DATA);
    (elem, data)
}

fn end_expr(b: &mut Batch, (elem, data): (usize, usize)) {
    b.end_nest(data);
    b.end_nest(elem);
}

fn meta(b: &mut Batch, key: u32) {
    let at = expr(b, "meta");
    b.u32(NFTA_META_DREG, NFT_REG_1);
    b.u32(NFTA_META_KEY, key);
    end_expr(b, at);
}

fn nfproto(b: &mut Batch, family: Family) {
    meta(b, NFT_META_NFPROTO);
    cmp(
        b,
        NFT_CMP_EQ,
        &[match family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }],
    );
}

fn l4proto(b: &mut Batch, l4: L4) {
    meta(b, NFT_META_L4PROTO);
    cmp(
        b,
        NFT_CMP_EQ,
        &[match l4 {
            L4::Tcp => 6,
            L4::Udp => 17,
        }],
    );
}

fn payload(b: &mut Batch, base: u32, offset: u32, len: u32, dreg: u32) {
    let at = expr(b, "payload");
    b.u32(NFTA_PAYLOAD_DREG, dreg);
    b.u32(NFTA_PAYLOAD_BASE, base);
    b.u32(NFTA_PAYLOAD_OFFSET, offset);
    b.u32(NFTA_PAYLOAD_LEN, len);
    end_expr(b, at);
}

fn daddr(b: &mut Batch, family: Family) {
    match family {
        Family::V4 => payload(b, NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG_1),
        Family::V6 => payload(b, NFT_PAYLOAD_NETWORK_HEADER, 24, 16, NFT_REG_1),
    }
}

fn saddr(b: &mut Batch, family: Family) {
    match family {
        Family::V4 => payload(b, NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1),
        Family::V6 => payload(b, NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_1),
    }
}

fn dport(b: &mut Batch) {
    payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1);
}

fn cmp(b: &mut Batch, op: u32, value: &[u8]) {
    let at = expr(b, "cmp");
    b.u32(NFTA_CMP_SREG, NFT_REG_1);
    b.u32(NFTA_CMP_OP, op);
    let data = b.nest(NFTA_CMP_DATA);
    b.bytes(NFTA_DATA_VALUE, value);
    b.end_nest(data);
    end_expr(b, at);
}

fn lookup(b: &mut Batch, set: &str) {
    let at = expr(b, "lookup");
    b.str(NFTA_LOOKUP_SET, set);
    b.u32(NFTA_LOOKUP_SREG, NFT_REG_1);
    end_expr(b, at);
}

/// `immediate reg 0 <verdict>` (drop, return: no chain).
fn verdict(b: &mut Batch, code: i32) {
    let at = expr(b, "immediate");
    b.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
    let data = b.nest(NFTA_IMMEDIATE_DATA);
    let v = b.nest(NFTA_DATA_VERDICT);
    b.u32(NFTA_VERDICT_CODE, code as u32);
    b.end_nest(v);
    b.end_nest(data);
    end_expr(b, at);
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A concatenation field: its bytes, zero-padded to a 4-byte register.
fn field(key: &mut Vec<u8>, bytes: &[u8]) {
    key.extend_from_slice(bytes);
    while !key.len().is_multiple_of(4) {
        key.push(0);
    }
}

/// The element's interval: `own . first address . first port` to `own . last . last`.
fn element_keys(element: &Element) -> (Vec<u8>, Vec<u8>) {
    let own = addr_bytes(&element.own);
    let (first, last) = match element.far {
        IpNet::V4(n) => (
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        ),
        IpNet::V6(n) => (
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        ),
    };
    let mut start = Vec::with_capacity(40);
    let mut end = Vec::with_capacity(40);
    field(&mut start, &own);
    field(&mut end, &own);
    field(&mut start, &first);
    field(&mut end, &last);
    if let Some(ports) = element.ports {
        field(&mut start, &ports.first.to_be_bytes());
        field(&mut end, &ports.last.to_be_bytes());
    }
    (start, end)
}

/// Starts a message adding (`NFT_MSG_NEWSETELEM`) or deleting elements of `set`, and its
/// element list; close both with [`end_element_list`].
fn element_list(b: &mut Batch, kind: u16, set: SetRef<'_>, describe: String) -> (usize, usize) {
    let flags = if kind == NFT_MSG_NEWSETELEM {
        NLM_F_CREATE
    } else {
        0
    };
    let at = b.message(kind, flags, describe);
    b.str(NFTA_SET_ELEM_LIST_TABLE, names::TABLE);
    match set {
        SetRef::Name(name) => b.str(NFTA_SET_ELEM_LIST_SET, name),
        SetRef::NewInBatch(id) => b.u32(NFTA_SET_ELEM_LIST_SET_ID, id),
    }
    (at, b.nest(NFTA_SET_ELEM_LIST_ELEMENTS))
}

/// How an element message names its set.
#[derive(Debug, Clone, Copy)]
enum SetRef<'a> {
    Name(&'a str),
    /// A set this batch creates, by its `NFTA_SET_ID`.
    NewInBatch(u32),
}

fn end_element_list(b: &mut Batch, (at, list): (usize, usize)) {
    b.end_nest(list);
    b.finish(at);
}

fn verb(kind: u16) -> &'static str {
    if kind == NFT_MSG_NEWSETELEM {
        "add"
    } else {
        "delete"
    }
}

/// `new_id`: the set's id when this batch creates it. The kernel finds a set by name by
/// walking the table's list of sets, thousands long with the fqdn sets, and a new set is
/// last in it; by id it looks only through this batch.
fn block_elements(
    b: &mut Batch,
    kind: u16,
    set: &BlockSet,
    new_id: Option<u32>,
    elements: &[&Element],
) {
    let name = set.to_string();
    let describe = format!("{} {} elements of {name}", verb(kind), elements.len());
    let named = match new_id {
        Some(id) => SetRef::NewInBatch(id),
        None => SetRef::Name(&name),
    };
    let list = element_list(b, kind, named, describe);
    for element in elements {
        let (start, end) = element_keys(element);
        let item = b.nest(NFTA_LIST_ELEM);
        let key = b.nest(NFTA_SET_ELEM_KEY);
        b.bytes(NFTA_DATA_VALUE, &start);
        b.end_nest(key);
        let key_end = b.nest(NFTA_SET_ELEM_KEY_END);
        b.bytes(NFTA_DATA_VALUE, &end);
        b.end_nest(key_end);
        b.end_nest(item);
    }
    end_element_list(b, list);
}

/// An interface name as a set key: NUL-padded to `IFNAMSIZ`.
fn ifname(tap: &str) -> Vec<u8> {
    let mut key = tap.as_bytes().to_vec();
    key.resize(IFNAMSIZ, 0);
    key
}

/// A VM's entry in a worker-wide set, added or deleted.
fn member_element(b: &mut Batch, kind: u16, member: &Member) {
    let key = match member {
        Member::Tap(tap) | Member::DefaultDeny(_, Dispatch::Tap(tap)) => ifname(tap),
        Member::TapSource(tap, addr) => {
            let mut key = ifname(tap);
            field(&mut key, &addr_bytes(addr));
            key
        }
        Member::BlockBypass(addr) => addr_bytes(addr),
        Member::Address(addr) | Member::DefaultDeny(_, Dispatch::Address(addr)) => {
            addr.octets().to_vec()
        }
    };
    let set = member.set();
    let describe = format!("{} {} in {set}", verb(kind), member.to_text());
    let list = element_list(b, kind, SetRef::Name(set), describe);
    let item = b.nest(NFTA_LIST_ELEM);
    let k = b.nest(NFTA_SET_ELEM_KEY);
    b.bytes(NFTA_DATA_VALUE, &key);
    b.end_nest(k);
    b.end_nest(item);
    end_element_list(b, list);
}
