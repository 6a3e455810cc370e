//! Which rule decides a packet: the in-process evaluator over the effective policy.
//!
//! It follows the same order as the compiled chains (DNS and `block_bypass` guards
//! first on egress, then the rules, then the default), so unit tests use it as the fake
//! and end-to-end tests check that the kernel agrees with it.

use std::fmt;
use std::net::IpAddr;

use vmedge_model::{Action, DomainPattern, Vm};

use crate::canonical::{decide_by_rules, PacketProto};
use crate::compile::CompileOptions;
use crate::names::Direction;

/// A packet to or from a VM.
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    /// To the VM (ingress) or from it (egress).
    pub direction: Direction,
    /// The far side: the source for ingress, the destination for egress.
    pub remote: IpAddr,
    /// Transport protocol.
    pub proto: PacketProto,
    /// The VM's port for ingress, the destination port for egress.
    pub port: u16,
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// DNS to the worker's gate: always allowed.
    DnsGate,
    /// Port 53 anywhere but the gate.
    DnsOnlyGate,
    /// Port 853 under `block_bypass`.
    DoT,
    /// A listed DoH resolver under `block_bypass`.
    DoH,
    /// Rule `index` of the effective policy's direction (auto-rules first).
    Rule {
        /// Index in the effective policy's rules of that direction.
        index: usize,
        /// The rule's description.
        description: String,
    },
    /// No rule matched.
    Default,
}

/// The verdict and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Allow or deny.
    pub action: Action,
    /// What decided it.
    pub reason: Reason,
    /// The direction, for the message.
    pub direction: Direction,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        match &self.reason {
            Reason::DnsGate => write!(f, "{}: DNS to the worker's gate", self.action),
            Reason::DnsOnlyGate => write!(f, "{}: DNS goes only to the worker's gate", self.action),
            Reason::DoT => write!(f, "{}: block_bypass drops DNS over TLS (853)", self.action),
            Reason::DoH => write!(
                f,
                "{}: block_bypass drops public DoH resolvers",
                self.action
            ),
            Reason::Rule { index, description } if description.is_empty() => {
                write!(
                    f,
                    "{}: {dir}.rules[{index}] of the effective policy",
                    self.action
                )
            }
            Reason::Rule { index, description } => {
                write!(
                    f,
                    "{}: {dir}.rules[{index}] of the effective policy ({description})",
                    self.action
                )
            }
            Reason::Default => write!(f, "{}: the {dir} default", self.action),
        }
    }
}

/// Explains a packet of `vm`. `fqdn` says whether an address is in a pattern's set.
pub fn explain(
    vm: &Vm,
    options: &CompileOptions,
    packet: &Packet,
    fqdn: &dyn Fn(&DomainPattern, IpAddr) -> bool,
) -> Explanation {
    let policy = vm.effective_policy();
    let done = |action, reason| Explanation {
        action,
        reason,
        direction: packet.direction,
    };
    let ported = matches!(packet.proto, PacketProto::Tcp | PacketProto::Udp);
    if packet.direction == Direction::Egress {
        if ported && packet.port == 53 {
            return if options.dns_gates.contains(&packet.remote) {
                done(Action::Allow, Reason::DnsGate)
            } else {
                done(Action::Deny, Reason::DnsOnlyGate)
            };
        }
        if policy.dns.block_bypass {
            if ported && packet.port == 853 {
                return done(Action::Deny, Reason::DoT);
            }
            if options.doh.iter().any(|n| n.contains(&packet.remote)) {
                return done(Action::Deny, Reason::DoH);
            }
        }
    }
    let rules = match packet.direction {
        Direction::Ingress => &policy.ingress,
        Direction::Egress => &policy.egress,
    };
    match decide_by_rules(rules, packet.remote, packet.proto, packet.port, fqdn) {
        (action, Some(index)) => done(
            action,
            Reason::Rule {
                index,
                description: rules.rules[index].description.clone(),
            },
        ),
        (action, None) => done(action, Reason::Default),
    }
}
