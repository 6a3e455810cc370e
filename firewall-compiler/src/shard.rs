//! The chains of a shard: one per direction, shared by the shard's VMs.
//!
//! A shard chain holds one lookup per block set its VMs use, in block order, each a set
//! keyed by the VM's own address (so a VM only ever meets its own entries);
//! the fqdn rules of its VMs at their blocks (their sets are per VM and rule); the DNS
//! guards every VM has; and the default, looked up per VM. First match wins within a VM's
//! entries because blocks are looked up in order, and only a VM's own entries can match.
//!
//! A chain is rewritten (flushed and refilled) only when what it looks up changes: a
//! block kind new to the shard or gone from it, or an fqdn rule. Everything else about a
//! VM is set elements.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use vmedge_model::{Action, Ports, Protocol};

use crate::canonical::{Family, L4};
use crate::names::{self, Direction};
use crate::section::{doh_set, family_of, ip, l4_name, BlockKind, BlockSet, FqdnRule, VmSection};
use crate::text;

/// The rules a shard chain can hold: every form the compiler emits there, and only those.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ShardRule<'a> {
    /// `ip6 daddr G udp dport 53 return`: DNS to the worker's gate.
    DnsGate(IpAddr, L4),
    /// `udp dport 53 drop`: DNS anywhere else.
    DnsElsewhere(L4),
    /// `ip6 saddr @block_bypass6 tcp dport 853 drop`: DNS over TLS, under `block_bypass`.
    DnsOverTls(Family, L4),
    /// `ip6 saddr @block_bypass6 ip6 daddr @doh_v6 drop`: public DoH resolvers, under
    /// `block_bypass`.
    DnsOverHttps(Family),
    /// `ip6 daddr . ip6 saddr . tcp dport @in_s3_b0_allow_tcp6 return`: one block of one
    /// verdict and kind.
    Block(BlockSet),
    /// `ip6 saddr A ip6 daddr @fq_..._6 tcp dport 443 return`: a VM's fqdn rule.
    Fqdn(&'a FqdnRule),
    /// `oifname @default_deny_in_if counter drop`: VMs whose default is deny, by tap
    /// (`true`) or by address.
    DefaultDeny(Direction, bool),
}

impl ShardRule<'_> {
    /// The rule as nft writes it, after `add rule inet vmedge <chain> `.
    pub fn write_body(&self, out: &mut String) {
        let _ = match self {
            ShardRule::DnsGate(gate, l4) => write!(
                out,
                "{} daddr {gate} {} dport 53 return comment \"dns gate\"",
                ip(family_of(gate)),
                l4_name(*l4)
            ),
            ShardRule::DnsElsewhere(l4) => write!(
                out,
                "{} dport 53 drop comment \"dns: only the gate\"",
                l4_name(*l4)
            ),
            ShardRule::DnsOverTls(family, l4) => write!(
                out,
                "{} saddr @{} {} dport 853 drop comment \"block_bypass: DoT\"",
                ip(*family),
                block_bypass_set(*family),
                l4_name(*l4)
            ),
            ShardRule::DnsOverHttps(family) => write!(
                out,
                "{ip} saddr @{} {ip} daddr @{} drop comment \"block_bypass: DoH\"",
                block_bypass_set(*family),
                doh_set(*family),
                ip = ip(*family),
            ),
            ShardRule::Block(set) => {
                let ip = ip(set.kind.family);
                let (own, far) = match set.kind.direction {
                    Direction::Ingress => ("daddr", "saddr"),
                    Direction::Egress => ("saddr", "daddr"),
                };
                let _ = write!(out, "{ip} {own} . {ip} {far}");
                if let Some(l4) = set.kind.l4 {
                    let _ = write!(out, " . {} dport", l4_name(l4));
                }
                write!(out, " @{set} {}", verdict(set.kind.action))
            }
            ShardRule::Fqdn(rule) => {
                // Written piece by piece, not through `fmt`: a shard chain holds one of
                // these per VM, rule and family (40k lines at 10k VMs).
                let ip = ip(family_of(&rule.own));
                for piece in [ip, " saddr "] {
                    out.push_str(piece);
                }
                text::push_ip(out, rule.own);
                for piece in [" ", ip, " daddr @", &rule.set] {
                    out.push_str(piece);
                }
                let protocol = protocol_name(rule.protocol);
                match (rule.protocol, rule.ports) {
                    (Protocol::Any, _) => {}
                    (Protocol::Tcp | Protocol::Udp, Ports::Any) => {
                        for piece in [" meta l4proto ", protocol] {
                            out.push_str(piece);
                        }
                    }
                    (Protocol::Tcp | Protocol::Udp, Ports::Range { first, last }) => {
                        for piece in [" ", protocol, " dport "] {
                            out.push_str(piece);
                        }
                        text::push_ports(out, first, last);
                    }
                }
                for piece in [
                    " ",
                    verdict(rule.action),
                    " comment \"fqdn ",
                    &rule.pattern,
                    "\"",
                ] {
                    out.push_str(piece);
                }
                Ok(())
            }
            ShardRule::DefaultDeny(direction, by_tap) => {
                let key = match (direction, by_tap) {
                    (Direction::Ingress, true) => "oifname",
                    (Direction::Egress, true) => "iifname",
                    (Direction::Ingress, false) => "ip6 daddr",
                    (Direction::Egress, false) => "ip6 saddr",
                };
                write!(
                    out,
                    "{key} @{} counter drop comment \"default deny\"",
                    names::default_deny(*direction, *by_tap)
                )
            }
        };
    }

    /// The rule's comment, as nft stores it (rule userdata).
    pub fn comment(&self) -> Option<String> {
        match self {
            ShardRule::DnsGate(..) => Some("dns gate".into()),
            ShardRule::DnsElsewhere(_) => Some("dns: only the gate".into()),
            ShardRule::DnsOverTls(..) => Some("block_bypass: DoT".into()),
            ShardRule::DnsOverHttps(_) => Some("block_bypass: DoH".into()),
            ShardRule::Block(_) => None,
            ShardRule::Fqdn(rule) => Some(format!("fqdn {}", rule.pattern)),
            ShardRule::DefaultDeny(..) => Some("default deny".into()),
        }
    }
}

/// What a shard's chains look up besides the guards every chain has: the block kinds its
/// VMs use, and their fqdn rules (in VM order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShardUse<'a> {
    /// Block kinds, both directions.
    pub kinds: BTreeSet<BlockKind>,
    /// fqdn rules (egress).
    pub fqdn: Vec<&'a FqdnRule>,
}

impl ShardUse<'_> {
    /// Does this differ from `other` for the chain of `direction`?
    pub fn differs_for(&self, other: &ShardUse<'_>, direction: Direction) -> bool {
        let kinds = |u: &ShardUse<'_>| -> Vec<BlockKind> {
            u.kinds
                .iter()
                .filter(|k| k.direction == direction)
                .copied()
                .collect()
        };
        kinds(self) != kinds(other) || (direction == Direction::Egress && self.fqdn != other.fqdn)
    }

    /// The block sets of shard `shard`.
    pub fn sets(&self, shard: u8) -> impl Iterator<Item = BlockSet> + '_ {
        self.kinds.iter().map(move |&kind| BlockSet { kind, shard })
    }
}

/// The use of each shard listed in `wanted` (all, when `None`) by `sections`, indexed by
/// shard. One pass over the sections.
pub fn shard_uses<'a>(
    sections: impl IntoIterator<Item = &'a VmSection>,
    wanted: Option<&BTreeSet<u8>>,
) -> Vec<ShardUse<'a>> {
    let mut uses: Vec<ShardUse<'a>> = (0..names::SHARDS).map(|_| ShardUse::default()).collect();
    let wanted = |shard: &u8| wanted.is_none_or(|w| w.contains(shard));
    for section in sections {
        for set in section.sets().filter(|s| wanted(&s.shard)) {
            uses[usize::from(set.shard)].kinds.insert(set.kind);
        }
        for rule in &section.fqdn_rules {
            let shard = names::shard_of(rule.own);
            if wanted(&shard) {
                uses[usize::from(shard)].fqdn.push(rule);
            }
        }
    }
    uses
}

/// The rules of the chain of `shard` for `direction`, in order.
pub fn shard_rules<'a>(
    direction: Direction,
    shard: u8,
    shard_use: &ShardUse<'a>,
    dns_gates: &[IpAddr],
) -> Vec<ShardRule<'a>> {
    let mut rules = Vec::new();
    if direction == Direction::Egress {
        for gate in dns_gates {
            for l4 in [L4::Udp, L4::Tcp] {
                rules.push(ShardRule::DnsGate(*gate, l4));
            }
        }
        for l4 in [L4::Udp, L4::Tcp] {
            rules.push(ShardRule::DnsElsewhere(l4));
        }
        for family in [Family::V6, Family::V4] {
            for l4 in [L4::Tcp, L4::Udp] {
                rules.push(ShardRule::DnsOverTls(family, l4));
            }
            rules.push(ShardRule::DnsOverHttps(family));
        }
    }
    // Blocks in order; at each, the shard's sets of that block, then its fqdn rules.
    let kinds: Vec<&BlockKind> = shard_use
        .kinds
        .iter()
        .filter(|k| k.direction == direction)
        .collect();
    let fqdn: &[&FqdnRule] = match direction {
        Direction::Egress => &shard_use.fqdn,
        Direction::Ingress => &[],
    };
    let blocks: BTreeSet<u16> = kinds
        .iter()
        .map(|k| k.block)
        .chain(fqdn.iter().map(|r| r.block))
        .collect();
    for block in blocks {
        for kind in kinds.iter().filter(|k| k.block == block) {
            rules.push(ShardRule::Block(BlockSet {
                kind: **kind,
                shard,
            }));
        }
        for rule in fqdn.iter().filter(|r| r.block == block) {
            rules.push(ShardRule::Fqdn(rule));
        }
    }
    rules.push(ShardRule::DefaultDeny(direction, true));
    rules.push(ShardRule::DefaultDeny(direction, false));
    rules
}

/// Writes a shard chain's rules as `nft -f` lines (the chain is added and flushed first).
pub fn render_chain(out: &mut String, direction: Direction, shard: u8, rules: &[ShardRule<'_>]) {
    let t = names::TABLE;
    let chain = names::shard_chain(direction, shard);
    let _ = writeln!(out, "add chain inet {t} {chain}");
    let _ = writeln!(out, "flush chain inet {t} {chain}");
    for rule in rules {
        let _ = write!(out, "add rule inet {t} {chain} ");
        rule.write_body(out);
        out.push('\n');
    }
}

fn verdict(action: Action) -> &'static str {
    match action {
        Action::Allow => "return",
        Action::Deny => "drop",
    }
}

fn block_bypass_set(family: Family) -> &'static str {
    match family {
        Family::V4 => names::BLOCK_BYPASS4,
        Family::V6 => names::BLOCK_BYPASS6,
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fqdn_rule_is_written_for_each_protocol_and_ports() {
        let rule = |own: &str, protocol, ports| FqdnRule {
            block: 0,
            own: own.parse().unwrap(),
            set: "fq_x_6".into(),
            protocol,
            ports,
            action: Action::Allow,
            pattern: "*.example.com".into(),
        };
        let range = Ports::Range {
            first: 8000,
            last: 8080,
        };
        for (rule, expected) in [
            (
                rule("fd5e:ed00::2", Protocol::Tcp, Ports::single(443)),
                "ip6 saddr fd5e:ed00::2 ip6 daddr @fq_x_6 tcp dport 443 return",
            ),
            (
                rule("fd5e:ed00::2", Protocol::Udp, range),
                "ip6 saddr fd5e:ed00::2 ip6 daddr @fq_x_6 udp dport 8000-8080 return",
            ),
            (
                rule("198.18.0.2", Protocol::Tcp, Ports::Any),
                "ip saddr 198.18.0.2 ip daddr @fq_x_6 meta l4proto tcp return",
            ),
            (
                rule("198.18.0.2", Protocol::Any, Ports::Any),
                "ip saddr 198.18.0.2 ip daddr @fq_x_6 return",
            ),
        ] {
            let mut text = String::new();
            ShardRule::Fqdn(&rule).write_body(&mut text);
            assert_eq!(text, format!("{expected} comment \"fqdn *.example.com\""));
        }
    }
}
