//! One direction of a policy, canonicalised for the kernel.
//!
//! Rules are first-match-wins, then the default. Only the order between rules of
//! *different* actions matters, so the canonical form is a list of blocks, each a run of
//! same-action rules merged into set elements:
//! - rules fully covered by one earlier rule can never decide anything: dropped;
//! - rules at the end with the default's action change nothing: dropped;
//! - per block, the cidr rules become, per family and protocol, a set of
//!   non-overlapping `address . port-range` elements (nftables refuses overlapping
//!   intervals in a concatenated set), CIDRs aggregated, port ranges split at every
//!   boundary and merged back where their address lists agree; `protocol any` rules
//!   become an address-only set.
//!
//! [`CanonicalDirection::decide`] evaluates the result, so tests can check that it
//! decides every packet exactly as the original rules do.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use vmedge_model::{Action, DirectionPolicy, DomainPattern, Ports, Protocol, Rule, Target};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`ip`)
    V4,
    /// IPv6 (`ip6`)
    V6,
}

impl Family {
    /// The family of a prefix.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// A transport protocol that has ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// TCP
    Tcp,
    /// UDP
    Udp,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    fn of(ports: Ports) -> PortRange {
        match ports {
            Ports::Any => PortRange {
                first: 0,
                last: 65535,
            },
            Ports::Range { first, last } => PortRange { first, last },
        }
    }

    fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// An egress fqdn rule, kept as a rule: its addresses live in the DNS gate's sets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FqdnMatch {
    /// The name or wildcard.
    pub pattern: DomainPattern,
    /// Protocol to match.
    pub protocol: Protocol,
    /// Ports to match.
    pub ports: Ports,
}

/// A run of same-action rules, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    /// The verdict of every element of the block.
    pub action: Option<Action>,
    /// `protocol tcp|udp` rules: non-overlapping (prefix, port range) elements, sorted.
    pub ported: BTreeMap<(Family, L4), Vec<(IpNet, PortRange)>>,
    /// `protocol any` rules: aggregated prefixes, sorted.
    pub any: BTreeMap<Family, Vec<IpNet>>,
    /// fqdn rules in policy order.
    pub fqdn: Vec<FqdnMatch>,
    /// Indexes (in the policy given) of the rules merged into this block.
    pub rules: Vec<usize>,
}

/// One direction, canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalDirection {
    /// In order: the first block with a matching element decides.
    pub blocks: Vec<Block>,
    /// The verdict when no block matches.
    pub default: Action,
}

/// The protocol of a packet, as far as rules can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketProto {
    /// TCP to or from a port.
    Tcp,
    /// UDP to or from a port.
    Udp,
    /// Anything else (ICMP, ...): only `protocol any` rules match it.
    Other,
}

/// Does `rule` match a packet whose far side is `addr`, with `proto`/`port`?
/// `fqdn` says whether an address is in a pattern's set (what DNS answers put there).
pub fn rule_matches(
    rule: &Rule,
    addr: IpAddr,
    proto: PacketProto,
    port: u16,
    fqdn: &dyn Fn(&DomainPattern, IpAddr) -> bool,
) -> bool {
    let address = match &rule.target {
        Target::Cidr(net) => net.contains(&addr),
        Target::Fqdn(pattern) => fqdn(pattern, addr),
    };
    address && proto_matches(rule.protocol, rule.ports, proto, port)
}

fn proto_matches(protocol: Protocol, ports: Ports, proto: PacketProto, port: u16) -> bool {
    match (protocol, proto) {
        (Protocol::Any, _) => true,
        (Protocol::Tcp, PacketProto::Tcp) | (Protocol::Udp, PacketProto::Udp) => {
            ports.contains(port)
        }
        _ => false,
    }
}

/// True when every packet `later` matches, `earlier` matches too.
fn covers(earlier: &Rule, later: &Rule) -> bool {
    let address = match (&earlier.target, &later.target) {
        (Target::Cidr(a), Target::Cidr(b)) => a.contains(b),
        (Target::Fqdn(a), Target::Fqdn(b)) => a == b,
        _ => false,
    };
    let protocol = earlier.protocol == Protocol::Any
        || (earlier.protocol == later.protocol && ports_cover(earlier.ports, later.ports));
    address && protocol
}

fn ports_cover(a: Ports, b: Ports) -> bool {
    let (a, b) = (PortRange::of(a), PortRange::of(b));
    a.first <= b.first && b.last <= a.last
}

/// Canonicalises one direction of an (effective) policy.
pub fn canonicalize(policy: &DirectionPolicy) -> CanonicalDirection {
    // Live rules: not covered by an earlier rule.
    let mut live: Vec<usize> = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        if !live.iter().any(|&j| covers(&policy.rules[j], rule)) {
            live.push(i);
        }
    }
    // Trailing rules with the default's verdict decide nothing the default would not.
    while live
        .last()
        .is_some_and(|&i| policy.rules[i].action == policy.default)
    {
        live.pop();
    }
    let mut blocks: Vec<Block> = Vec::new();
    for i in live {
        let rule = &policy.rules[i];
        if blocks.last().and_then(|b| b.action) != Some(rule.action) {
            blocks.push(Block {
                action: Some(rule.action),
                ..Block::default()
            });
        }
        if let Some(block) = blocks.last_mut() {
            block.rules.push(i);
        }
    }
    for block in &mut blocks {
        fill(block, &policy.rules);
    }
    CanonicalDirection {
        blocks,
        default: policy.default,
    }
}

fn fill(block: &mut Block, rules: &[Rule]) {
    let mut ported: BTreeMap<(Family, L4), Vec<(IpNet, PortRange)>> = BTreeMap::new();
    let mut any: BTreeMap<Family, Vec<IpNet>> = BTreeMap::new();
    for &i in &block.rules {
        let rule = &rules[i];
        match (&rule.target, rule.protocol) {
            (Target::Fqdn(pattern), _) => block.fqdn.push(FqdnMatch {
                pattern: pattern.clone(),
                protocol: rule.protocol,
                ports: rule.ports,
            }),
            (Target::Cidr(net), Protocol::Any) => {
                any.entry(Family::of(net)).or_default().push(*net)
            }
            (Target::Cidr(net), Protocol::Tcp) => ported
                .entry((Family::of(net), L4::Tcp))
                .or_default()
                .push((*net, PortRange::of(rule.ports))),
            (Target::Cidr(net), Protocol::Udp) => ported
                .entry((Family::of(net), L4::Udp))
                .or_default()
                .push((*net, PortRange::of(rule.ports))),
        }
    }
    block.any = any
        .into_iter()
        .map(|(f, nets)| (f, aggregate(nets)))
        .collect();
    block.ported = ported
        .into_iter()
        .map(|(k, elems)| (k, disjoint(&elems)))
        .collect();
}

/// The fewest prefixes covering exactly `nets`, sorted.
fn aggregate(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    // One prefix is its own aggregate: most groups of a policy hold one rule, and
    // `IpNet::aggregate` sorts and allocates whatever it is given.
    if let [net] = nets.as_mut_slice() {
        *net = net.trunc();
        return nets;
    }
    IpNet::aggregate(&nets)
}

/// Non-overlapping `(prefix, ports)` elements covering exactly the union of `elems`.
fn disjoint(elems: &[(IpNet, PortRange)]) -> Vec<(IpNet, PortRange)> {
    if let [(net, ports)] = elems {
        return vec![(net.trunc(), *ports)];
    }
    // Cut the port line at every range boundary; within a segment every element either
    // covers it whole or not at all.
    let mut cuts: Vec<u32> = elems
        .iter()
        .flat_map(|(_, r)| [u32::from(r.first), u32::from(r.last) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segments: Vec<(PortRange, Vec<IpNet>)> = Vec::new();
    for w in cuts.windows(2) {
        let (first, last) = (w[0] as u16, (w[1] - 1) as u16);
        let nets: Vec<IpNet> = elems
            .iter()
            .filter(|(_, r)| r.first <= first && last <= r.last)
            .map(|(n, _)| *n)
            .collect();
        if nets.is_empty() {
            continue;
        }
        let nets = aggregate(nets);
        // Merge with the previous segment when adjacent with the same addresses.
        match segments.last_mut() {
            Some((prev, prev_nets))
                if u32::from(prev.last) + 1 == u32::from(first) && *prev_nets == nets =>
            {
                prev.last = last;
            }
            _ => segments.push((PortRange { first, last }, nets)),
        }
    }
    let mut out: Vec<(IpNet, PortRange)> = segments
        .into_iter()
        .flat_map(|(range, nets)| nets.into_iter().map(move |n| (n, range)))
        .collect();
    out.sort();
    out
}

impl CanonicalDirection {
    /// The verdict for a packet whose far side is `addr`; `fqdn` as in [`rule_matches`].
    pub fn decide(
        &self,
        addr: IpAddr,
        proto: PacketProto,
        port: u16,
        fqdn: &dyn Fn(&DomainPattern, IpAddr) -> bool,
    ) -> Action {
        let family = match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        };
        for block in &self.blocks {
            let action = block.action.unwrap_or(self.default);
            if block
                .any
                .get(&family)
                .is_some_and(|nets| nets.iter().any(|n| n.contains(&addr)))
            {
                return action;
            }
            let l4 = match proto {
                PacketProto::Tcp => Some(L4::Tcp),
                PacketProto::Udp => Some(L4::Udp),
                PacketProto::Other => None,
            };
            if let Some(elems) = l4.and_then(|l4| block.ported.get(&(family, l4))) {
                if elems
                    .iter()
                    .any(|(n, r)| n.contains(&addr) && r.contains(port))
                {
                    return action;
                }
            }
            if block
                .fqdn
                .iter()
                .any(|f| fqdn(&f.pattern, addr) && proto_matches(f.protocol, f.ports, proto, port))
            {
                return action;
            }
        }
        self.default
    }
}

/// The reference semantics: first matching rule, else the default.
pub fn decide_by_rules(
    policy: &DirectionPolicy,
    addr: IpAddr,
    proto: PacketProto,
    port: u16,
    fqdn: &dyn Fn(&DomainPattern, IpAddr) -> bool,
) -> (Action, Option<usize>) {
    match policy
        .rules
        .iter()
        .position(|r| rule_matches(r, addr, proto, port, fqdn))
    {
        Some(i) => (policy.rules[i].action, Some(i)),
        None => (policy.default, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(action: Action, net: &str, protocol: Protocol, ports: Ports) -> Rule {
        Rule {
            action,
            target: Target::Cidr(net.parse().unwrap()),
            protocol,
            ports,
            description: String::new(),
        }
    }

    fn no_fqdn(_: &DomainPattern, _: IpAddr) -> bool {
        false
    }

    #[test]
    fn merges_same_action_runs_and_drops_dead_rules() {
        use Action::*;
        let policy = DirectionPolicy {
            default: Deny,
            rules: vec![
                rule(Allow, "2001:db8::/32", Protocol::Tcp, Ports::single(443)),
                rule(Allow, "2001:db8:1::/48", Protocol::Tcp, Ports::single(443)), // covered by 0
                rule(
                    Allow,
                    "2001:db8::/32",
                    Protocol::Tcp,
                    Ports::Range {
                        first: 440,
                        last: 450,
                    },
                ),
                rule(Deny, "10.0.0.0/8", Protocol::Any, Ports::Any),
                rule(Allow, "10.1.0.0/16", Protocol::Udp, Ports::single(53)), // covered by 3
                rule(Allow, "198.51.100.0/24", Protocol::Udp, Ports::single(53)),
                rule(Deny, "::/0", Protocol::Any, Ports::Any), // trailing, same as default
            ],
        };
        let c = canonicalize(&policy);
        assert_eq!(c.blocks.len(), 3);
        assert_eq!(c.blocks[0].rules, [0, 2]);
        assert_eq!(
            c.blocks[0].ported[&(Family::V6, L4::Tcp)],
            [(
                "2001:db8::/32".parse().unwrap(),
                PortRange {
                    first: 440,
                    last: 450
                }
            )],
            "443 is inside 440-450: one element"
        );
        assert_eq!(c.blocks[1].rules, [3]);
        assert_eq!(c.blocks[2].rules, [5]);
    }

    #[test]
    fn overlapping_ranges_become_disjoint_elements() {
        let a: IpNet = "10.0.0.0/8".parse().unwrap();
        let b: IpNet = "10.1.0.0/16".parse().unwrap();
        let out = disjoint(&[
            (
                a,
                PortRange {
                    first: 80,
                    last: 90,
                },
            ),
            (
                b,
                PortRange {
                    first: 85,
                    last: 100,
                },
            ),
        ]);
        assert_eq!(
            out,
            [
                (
                    a,
                    PortRange {
                        first: 80,
                        last: 90
                    }
                ),
                (
                    b,
                    PortRange {
                        first: 91,
                        last: 100
                    }
                ),
            ]
        );
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        let net = prop_oneof![
            (0u8..4, 0u8..=2).prop_map(|(a, len)| format!("10.{a}.0.0/{}", 8 + len * 8)),
            (0u16..4, 0u8..=2).prop_map(|(a, len)| format!("2001:db8:{a:x}::/{}", 32 + len * 16)),
            Just("0.0.0.0/0".to_string()),
            Just("::/0".to_string()),
        ];
        let proto = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Any)
        ];
        let ports = prop_oneof![
            Just(Ports::Any),
            (1u16..20).prop_map(|p| Ports::single(p * 10)),
            (1u16..20, 0u16..50).prop_map(|(a, w)| Ports::Range {
                first: a * 10,
                last: a * 10 + w
            }),
        ];
        let action = prop_oneof![Just(Action::Allow), Just(Action::Deny)];
        (action, net, proto, ports).prop_map(|(action, net, protocol, ports)| {
            let ports = if protocol == Protocol::Any {
                Ports::Any
            } else {
                ports
            };
            rule(action, &net, protocol, ports)
        })
    }

    fn arb_packet() -> impl Strategy<Value = (IpAddr, PacketProto, u16)> {
        let addr = prop_oneof![
            (0u8..5, 0u8..3, any::<u8>()).prop_map(|(a, b, c)| IpAddr::from([10, a, b, c])),
            (0u16..5, 0u16..3, any::<u16>())
                .prop_map(|(a, b, c)| IpAddr::from([0x2001, 0xdb8, a, b, 0, 0, 0, c])),
            // In the test prefix and in no generated rule but 0.0.0.0/0.
            Just(IpAddr::from([198, 19, 0, 1])),
        ];
        let proto = prop_oneof![
            Just(PacketProto::Tcp),
            Just(PacketProto::Udp),
            Just(PacketProto::Other)
        ];
        (addr, proto, 0u16..260)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn canonical_form_decides_like_the_rules(
            rules in proptest::collection::vec(arb_rule(), 0..12),
            deny_default in any::<bool>(),
            packets in proptest::collection::vec(arb_packet(), 40),
        ) {
            let policy = DirectionPolicy { default: if deny_default { Action::Deny } else { Action::Allow }, rules };
            let c = canonicalize(&policy);
            for (addr, proto, port) in packets {
                let (want, _) = decide_by_rules(&policy, addr, proto, port, &no_fqdn);
                prop_assert_eq!(c.decide(addr, proto, port, &no_fqdn), want, "{} {:?} {}", addr, proto, port);
            }
            // Set elements never overlap (nftables would refuse them).
            for block in &c.blocks {
                for elems in block.ported.values() {
                    for (i, (a, ra)) in elems.iter().enumerate() {
                        for (b, rb) in &elems[i + 1..] {
                            let nets_overlap = a.contains(b) || b.contains(a);
                            let ports_overlap = ra.first <= rb.last && rb.first <= ra.last;
                            prop_assert!(!(nets_overlap && ports_overlap), "{} {:?} / {} {:?}", a, ra, b, rb);
                        }
                    }
                }
            }
        }
    }
}
