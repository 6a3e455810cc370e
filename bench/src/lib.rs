//! Inputs for the benchmarks: synthetic states shaped like production ones.
//!
//! `synthetic_state(n)` makes `n` VMs over `n / 1000` workers (at least one), each with
//! two services (one h2c), a firewall with ingress, egress (cidr and fqdn) and DNS
//! rules, a tap and an IPv4 address; and `n / 10` users with one key each.

use serde_json::{json, Value};
use ssh_key::public::{Ed25519PublicKey, KeyData};
use ssh_key::PublicKey;
use vmedge_model::VmId;

/// The id of VM `i` in a synthetic state.
pub fn vm_id(i: u32) -> VmId {
    VmId::parse_hex32(&format!("{:08x}00004000800000000000{:04x}", i, i & 0xffff))
        .unwrap_or_else(|| unreachable!())
}

/// A synthetic state document with `n` VMs.
pub fn synthetic_state(n: u32) -> Value {
    let workers = (n / 1000).max(1);
    let vms: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": vm_id(i).to_string(),
                "org_id": format!("org-{}", i % 5000),
                "worker": format!("worker-{}", i % workers),
                "public_ipv6": format!("fd5e:ed00:{:x}:{:x}::2", i >> 16, i & 0xffff),
                "interface": format!("vmtap{}", i / workers),
                "ipv4": format!("198.18.{}.{}", (i / workers) >> 8 & 0xff, (i / workers) & 0xff),
                "status": if i % 10 == 0 { "paused" } else { "running" },
                "services": [
                    {"name": "web", "port": 8080},
                    {"name": "grpc-api", "port": 50051, "h2c": true}
                ],
                "firewall": {
                    "ingress": {"default": "deny", "rules": [
                        {"action": "allow", "kind": "cidr", "value": "2001:db8::/32", "protocol": "tcp", "ports": "22"}
                    ]},
                    "egress": {"default": "allow", "rules": [
                        {"action": "allow", "kind": "fqdn", "value": "*.pypi.org", "protocol": "tcp", "ports": "443"},
                        {"action": "deny", "kind": "cidr", "value": "10.0.0.0/8", "protocol": "any", "ports": "any"}
                    ]},
                    "dns": {"mode": "deny", "domains": ["*.doubleclick.net"], "block_bypass": true}
                }
            })
        })
        .collect();
    let users: Vec<Value> = (0..n / 10)
        .map(|u| {
            json!({
                "id": format!("u-{u}"),
                "org_ids": [format!("org-{}", u % 5000)],
                "ssh_keys": [{"name": "laptop", "public_key": ed25519_key(u)}]
            })
        })
        .collect();
    json!({"users": users, "vms": vms})
}

/// A state of `n` VMs on one worker, `rules` firewall rules each (half ingress, half
/// egress: cidr rules over tcp, udp and any, and every fifth egress rule an fqdn rule),
/// for the firewall benchmarks. VM `i` is at `fd5e:ed00:ff:i::2` behind `vmtap<i>`.
pub fn firewall_state(n: u32, rules: u32, variant: u32) -> Value {
    let rule = |i: u32, egress: bool| {
        let protocol = ["tcp", "udp", "any"][(i % 3) as usize];
        let ports = if protocol == "any" {
            "any".to_string()
        } else {
            format!("{}-{}", 1000 + i * 10, 1005 + i * 10 + variant)
        };
        if egress && i % 5 == 4 {
            return json!({"action": "allow", "kind": "fqdn", "value": format!("*.svc{i}.example.com"), "protocol": "tcp", "ports": "443"});
        }
        let action = if i % 4 == 3 { "deny" } else { "allow" };
        let value = if i.is_multiple_of(2) {
            format!("2001:db8:{i:x}::/48")
        } else {
            format!("198.51.{i}.0/24")
        };
        json!({"action": action, "kind": "cidr", "value": value, "protocol": protocol, "ports": ports})
    };
    let vms: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": vm_id(i).to_string(), "org_id": "org", "worker": "w",
                "public_ipv6": format!("fd5e:ed00:ff:{i:x}::2"),
                "interface": format!("vmtap{i}"), "ipv4": format!("198.18.{}.{}", i >> 8, i & 0xff),
                "status": "running",
                "services": [{"name": "web", "port": 8080}],
                "firewall": {
                    "ingress": {"default": "deny", "rules": (0..rules / 2).map(|r| rule(r, false)).collect::<Vec<_>>()},
                    "egress": {"default": "deny", "rules": (0..rules - rules / 2).map(|r| rule(r, true)).collect::<Vec<_>>()},
                }
            })
        })
        .collect();
    json!({"vms": vms})
}

/// A distinct, well-formed ed25519 public key per `seed`.
pub fn ed25519_key(seed: u32) -> String {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(2_654_435_761).rotate_left(i as u32) >> 7) as u8 ^ i as u8;
    }
    bytes[..4].copy_from_slice(&seed.to_be_bytes());
    let key = PublicKey::new(KeyData::Ed25519(Ed25519PublicKey(bytes)), "");
    key.to_openssh().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_firewall_state_is_valid() {
        let parsed = vmedge_model::state_from_value(&firewall_state(50, 20, 1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.value.vms[7].firewall.ingress.rules.len()
                + parsed.value.vms[7].firewall.egress.rules.len(),
            20
        );
    }

    #[test]
    fn the_synthetic_state_is_valid() {
        let doc = synthetic_state(2000);
        let parsed = vmedge_model::state_from_value(&doc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.value.vms.len(), 2000);
        assert_eq!(parsed.value.users.len(), 200);
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    }
}
