//! An [`Update`] as nf_tables netlink messages: the same rules the text spells, in the
//! expressions nft itself generates for them (`nft --debug=netlink` shows them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use vmedge_model::{Action, Ports, Protocol};

use super::wire::{Batch, NLM_F_APPEND, NLM_F_CREATE};
use crate::canonical::{Family, L4};
use crate::compile::{Op, Update};
use crate::names::{self, Direction};
use crate::section::{doh_set, family_of, BlockSet, Dispatch, Element, VmRule, VmSection};

// Message types (enum nf_tables_msg_types).
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

// Attributes.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
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
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_01: u32 = 9;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NF_DROP: i32 = 0;
const NFT_JUMP: i32 = -3;
const NFT_RETURN: i32 = -5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// nft's datatype ids, as set key types (`ipv4_addr`, `ipv6_addr`).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
/// `IFNAMSIZ`: an `ifname` key is the name, NUL-padded to 16 bytes.
const IFNAMSIZ: usize = 16;
/// `NFTNL_UDATA_RULE_COMMENT`.
const UDATA_RULE_COMMENT: u8 = 0;

/// Why an update goes through `nft -f` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsupported {
    /// It creates a shared block set the table does not have yet.
    NewBlockSet(String),
}

/// Encodes `update` as one batch numbered from `first_seq`. `known_sets` are the shared
/// block sets the live table is known to have.
pub fn encode_update(
    update: &Update<'_>,
    known_sets: &BTreeSet<BlockSet>,
    first_seq: u32,
) -> Result<Batch, Unsupported> {
    let mut b = Batch::new(first_seq);
    let mut set_ids = 0u32;
    for op in &update.ops {
        match op {
            Op::AddBlockSet(set) => {
                if !known_sets.contains(set) {
                    return Err(Unsupported::NewBlockSet(set.to_string()));
                }
            }
            Op::Section(section) => encode_section(&mut b, section, &mut set_ids),
            Op::AddElements(set, elements) => {
                block_elements(&mut b, NFT_MSG_NEWSETELEM, NLM_F_CREATE, set, elements)
            }
            Op::DeleteElements(set, elements) => {
                block_elements(&mut b, NFT_MSG_DELSETELEM, 0, set, elements)
            }
            Op::DeleteChain(chain) => {
                flush_chain(&mut b, chain);
                let at = b.message(NFT_MSG_DELCHAIN, 0, format!("delete chain {chain}"));
                b.str(NFTA_CHAIN_TABLE, names::TABLE);
                b.str(NFTA_CHAIN_NAME, chain);
                b.finish(at);
            }
            Op::DeleteSet(set) => {
                let at = b.message(NFT_MSG_DELSET, 0, format!("delete set {set}"));
                b.str(NFTA_SET_TABLE, names::TABLE);
                b.str(NFTA_SET_NAME, set);
                b.finish(at);
            }
            Op::AddDispatch(section) => dispatch(&mut b, &section.dispatch, Some(section)),
            Op::DeleteDispatch(d) => dispatch(&mut b, d, None),
        }
    }
    Ok(b)
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
        let at = b.message(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            format!("add {} elements to {set}", elements.len()),
        );
        b.str(NFTA_SET_ELEM_LIST_TABLE, names::TABLE);
        b.str(NFTA_SET_ELEM_LIST_SET, set);
        let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
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
        b.end_nest(list);
        b.finish(at);
    }
}

fn flush_chain(b: &mut Batch, chain: &str) {
    let at = b.message(NFT_MSG_DELRULE, 0, format!("flush chain {chain}"));
    b.str(NFTA_RULE_TABLE, names::TABLE);
    b.str(NFTA_RULE_CHAIN, chain);
    b.finish(at);
}

fn encode_section(b: &mut Batch, section: &VmSection, set_ids: &mut u32) {
    for (direction, rules) in section.rules() {
        let chain = section.chain(direction);
        let at = b.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, format!("add chain {chain}"));
        b.str(NFTA_CHAIN_TABLE, names::TABLE);
        b.str(NFTA_CHAIN_NAME, &chain);
        b.finish(at);
        flush_chain(b, &chain);
        for rule in rules {
            if let VmRule::Fqdn { set, family, .. } = rule {
                *set_ids += 1;
                fqdn_set(b, set, *family, *set_ids);
            }
            let mut text = String::new();
            rule.write_body(&mut text); // the nft spelling, for error messages
            let at = b.message(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                format!("add rule to {chain}: {text}"),
            );
            b.str(NFTA_RULE_TABLE, names::TABLE);
            b.str(NFTA_RULE_CHAIN, &chain);
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
    }
}

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

fn expressions(b: &mut Batch, rule: &VmRule, direction: Direction) {
    match rule {
        VmRule::AntiSpoof6(a) => {
            nfproto(b, Family::V6);
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_1);
            cmp(b, NFT_CMP_NEQ, &a.octets());
            verdict(b, NF_DROP, None);
        }
        VmRule::AntiSpoof4(a) => {
            nfproto(b, Family::V4);
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1);
            cmp(b, NFT_CMP_NEQ, &a.octets());
            verdict(b, NF_DROP, None);
        }
        VmRule::NoIpv4 => {
            nfproto(b, Family::V4);
            verdict(b, NF_DROP, None);
        }
        VmRule::DnsGate(gate, l4) => {
            let family = family_of(gate);
            nfproto(b, family);
            daddr(b, family);
            cmp(b, NFT_CMP_EQ, &addr_bytes(gate));
            l4proto(b, *l4);
            dport(b);
            cmp(b, NFT_CMP_EQ, &53u16.to_be_bytes());
            verdict(b, NFT_RETURN, None);
        }
        VmRule::DnsElsewhere(l4) => drop_port(b, *l4, 53),
        VmRule::DnsOverTls(l4) => drop_port(b, *l4, 853),
        VmRule::DnsOverHttps(family) => {
            nfproto(b, *family);
            daddr(b, *family);
            lookup(b, doh_set(*family));
            verdict(b, NF_DROP, None);
        }
        VmRule::Block { set, action } => {
            nfproto(b, set.family);
            if let Some(l4) = set.l4 {
                l4proto(b, l4);
            }
            // The VM's own address first: the key's layout (`vm . far [. port]`).
            let (saddr, daddr, len) = match set.family {
                Family::V4 => (12, 16, 4),
                Family::V6 => (8, 24, 16),
            };
            let (own, far) = match direction {
                Direction::Ingress => (daddr, saddr),
                Direction::Egress => (saddr, daddr),
            };
            // Concatenations fill consecutive 32-bit registers from register 1.
            let (second, third) = match set.family {
                Family::V4 => (NFT_REG32_01, NFT_REG32_01 + 1),
                Family::V6 => (NFT_REG_1 + 1, NFT_REG_1 + 2),
            };
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, own, len, NFT_REG_1);
            payload(b, NFT_PAYLOAD_NETWORK_HEADER, far, len, second);
            if set.l4.is_some() {
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, third);
            }
            lookup(b, &set.to_string());
            verdict(b, verdict_code(*action), None);
        }
        VmRule::Fqdn {
            set,
            family,
            protocol,
            ports,
            action,
            ..
        } => {
            nfproto(b, *family);
            daddr(b, *family);
            lookup(b, set);
            let l4 = match protocol {
                Protocol::Tcp => Some(L4::Tcp),
                Protocol::Udp => Some(L4::Udp),
                Protocol::Any => None,
            };
            if let Some(l4) = l4 {
                l4proto(b, l4);
                if let Ports::Range { first, last } = ports {
                    dport(b);
                    if first == last {
                        cmp(b, NFT_CMP_EQ, &first.to_be_bytes());
                    } else {
                        cmp(b, NFT_CMP_GTE, &first.to_be_bytes());
                        cmp(b, NFT_CMP_LTE, &last.to_be_bytes());
                    }
                }
            }
            verdict(b, verdict_code(*action), None);
        }
        VmRule::DefaultDeny => {
            let at = expr(b, "counter");
            b.u64(NFTA_COUNTER_BYTES, 0);
            b.u64(NFTA_COUNTER_PACKETS, 0);
            end_expr(b, at);
            verdict(b, NF_DROP, None);
        }
    }
}

/// `tcp dport 53 drop` and the like.
fn drop_port(b: &mut Batch, l4: L4, port: u16) {
    l4proto(b, l4);
    dport(b);
    cmp(b, NFT_CMP_EQ, &port.to_be_bytes());
    verdict(b, NF_DROP, None);
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

/// `immediate reg 0 <verdict>`.
fn verdict(b: &mut Batch, code: i32, chain: Option<&str>) {
    let at = expr(b, "immediate");
    b.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
    let data = b.nest(NFTA_IMMEDIATE_DATA);
    verdict_data(b, code, chain);
    b.end_nest(data);
    end_expr(b, at);
}

fn verdict_data(b: &mut Batch, code: i32, chain: Option<&str>) {
    let v = b.nest(NFTA_DATA_VERDICT);
    b.u32(NFTA_VERDICT_CODE, code as u32);
    if let Some(chain) = chain {
        b.str(NFTA_VERDICT_CHAIN, chain);
    }
    b.end_nest(v);
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

fn block_elements(b: &mut Batch, kind: u16, flags: u16, set: &BlockSet, elements: &[&Element]) {
    let verb = if kind == NFT_MSG_NEWSETELEM {
        "add"
    } else {
        "delete"
    };
    let name = set.to_string();
    let at = b.message(
        kind,
        flags,
        format!("{verb} {} elements of {name}", elements.len()),
    );
    b.str(NFTA_SET_ELEM_LIST_TABLE, names::TABLE);
    b.str(NFTA_SET_ELEM_LIST_SET, &name);
    let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
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
    b.end_nest(list);
    b.finish(at);
}

/// The two verdict map entries of a VM: added (with `to`, the section) or deleted.
fn dispatch(b: &mut Batch, dispatch: &Dispatch, to: Option<&VmSection>) {
    let key = match dispatch {
        Dispatch::Tap(tap) => {
            let mut key = tap.as_bytes().to_vec();
            key.resize(IFNAMSIZ, 0);
            key
        }
        Dispatch::Address(a) => a.octets().to_vec(),
    };
    let chains = to.map(VmSection::chains);
    for (i, map) in dispatch.maps().into_iter().enumerate() {
        let (kind, flags, verb) = match to {
            Some(_) => (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add"),
            None => (NFT_MSG_DELSETELEM, 0, "delete"),
        };
        let at = b.message(kind, flags, format!("{verb} the {map} entry {dispatch:?}"));
        b.str(NFTA_SET_ELEM_LIST_TABLE, names::TABLE);
        b.str(NFTA_SET_ELEM_LIST_SET, map);
        let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        let item = b.nest(NFTA_LIST_ELEM);
        let k = b.nest(NFTA_SET_ELEM_KEY);
        b.bytes(NFTA_DATA_VALUE, &key);
        b.end_nest(k);
        if let Some(chains) = &chains {
            let data = b.nest(NFTA_SET_ELEM_DATA);
            verdict_data(b, NFT_JUMP, Some(&chains[i]));
            b.end_nest(data);
        }
        b.end_nest(item);
        b.end_nest(list);
        b.finish(at);
    }
}
