//! A FirewallPolicy (seed 001 or 002 shape), and a differential check: the canonical
//! blocks the compiler emits decide every probed packet as the rules do in order.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use vmedge_firewall::canonical::{canonicalize, decide_by_rules, PacketProto};
use vmedge_model::{parse_policy, DirectionPolicy, Ports, Target};

/// Addresses at and around the edges of every CIDR of the rules, and a few others.
fn probes(policy: &DirectionPolicy) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = vec!["0.0.0.0".parse().expect("v4"), "::".parse().expect("v6")];
    for rule in &policy.rules {
        if let Target::Cidr(net) = rule.target {
            for addr in [net.network(), net.broadcast()] {
                out.push(addr);
                match addr {
                    IpAddr::V4(a) => {
                        let n = u32::from(a);
                        out.push(IpAddr::V4(n.wrapping_add(1).into()));
                        out.push(IpAddr::V4(n.wrapping_sub(1).into()));
                    }
                    IpAddr::V6(a) => {
                        let n = u128::from(a);
                        out.push(IpAddr::V6(n.wrapping_add(1).into()));
                        out.push(IpAddr::V6(n.wrapping_sub(1).into()));
                    }
                }
            }
        }
    }
    out
}

fn ports(policy: &DirectionPolicy) -> Vec<u16> {
    let mut out = vec![0, 1, 53, 443, 65535];
    for rule in &policy.rules {
        if let Ports::Range { first, last } = rule.ports {
            out.extend([first, last, first.wrapping_sub(1), last.wrapping_add(1)]);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_policy(text) else {
        return;
    };
    let (policy, _shape) = parsed.value;
    // Names resolve to nothing here: fqdn rules never match, in both evaluations.
    let fqdn = |_: &vmedge_model::DomainPattern, _: IpAddr| false;
    for direction in [&policy.ingress, &policy.egress] {
        let canonical = canonicalize(direction);
        for addr in probes(direction) {
            for proto in [PacketProto::Tcp, PacketProto::Udp, PacketProto::Other] {
                for port in ports(direction) {
                    let by_rules = decide_by_rules(direction, addr, proto, port, &fqdn).0;
                    let by_blocks = canonical.decide(addr, proto, port, &fqdn);
                    assert_eq!(
                        by_blocks, by_rules,
                        "{addr} {proto:?} {port}: canonical blocks disagree with the rules"
                    );
                }
            }
        }
    }
});
