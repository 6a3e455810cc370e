//! How nft's time grows with the table: a full apply of N VMs, then one VM changed (its
//! ports; one rule more; one VM more), each change applied and undone
//! `VMEDGE_SCALE_FLIPS` times. `VMEDGE_SCALE_ONLY=ports|rule|vm` times one kind alone (to
//! profile it); the others print as zero. `VMEDGE_SCALE_IPV6_ONLY=1`: VMs without an IPv4
//! address (so without IPv4 fqdn sets).
//! `cargo run --release -p vmedge-bench --example firewall_scale -- 100 500 1000` (root)
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use vmedge_firewall::{compile, CompileOptions, FirewallBackend, NftBackend};

/// The bench's state, its VMs without IPv4 addresses under `VMEDGE_SCALE_IPV6_ONLY=1`.
fn firewall_state(n: u32, rules: u32, variant: u32) -> serde_json::Value {
    let mut doc = vmedge_bench::firewall_state(n, rules, variant);
    if std::env::var_os("VMEDGE_SCALE_IPV6_ONLY").is_some_and(|v| v == "1") {
        for vm in doc["vms"].as_array_mut().into_iter().flatten() {
            if let Some(vm) = vm.as_object_mut() {
                vm.remove("ipv4");
            }
        }
    }
    doc
}

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let options = CompileOptions::new(vec!["fd5e:ed00:ff::53".parse().unwrap()]);
    // VMEDGE_SCALE_FLIPS=N: each change applied and undone N times (default 5).
    let flips: usize = std::env::var("VMEDGE_SCALE_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("VMEDGE_SCALE_ONLY").ok();
    for n in sizes {
        let lab = vmedge_tests::Lab::new(0);
        let nft = NftBackend::in_netns(lab.worker.name());
        let state = vmedge_model::state_from_value(&firewall_state(n, 20, 0))
            .unwrap()
            .value;
        let t = Instant::now();
        let ruleset = compile("w", state.vms.iter(), &options);
        let compiled = t.elapsed();
        let sets = ruleset
            .text
            .lines()
            .filter(|l| l.starts_with("add set"))
            .count();
        let t = Instant::now();
        nft.apply(&ruleset).unwrap();
        let applied = t.elapsed();
        // One VM's change, three kinds: its port ranges (set elements only), one rule
        // more (a rule in its shard's chain too), and a VM more (arriving and leaving).
        // Each flipped back and forth; the median.
        let before: std::collections::BTreeMap<_, _> = state
            .vms
            .iter()
            .map(|v| (v.id, vmedge_firewall::compile_vm(v)))
            .collect();
        let vm_of = |doc: serde_json::Value, i: usize| {
            vmedge_model::state_from_value(&doc).unwrap().value.vms[i].clone()
        };
        let mut one_vm = Vec::new();
        for (kind, vm) in [
            ("ports", vm_of(firewall_state(1, 20, 1), 0)),
            ("rule", vm_of(firewall_state(1, 21, 0), 0)),
            ("vm", vm_of(firewall_state(n + 1, 20, 0), n as usize)),
        ] {
            if only.as_ref().is_some_and(|only| only != kind) {
                one_vm.push(std::time::Duration::ZERO);
                continue;
            }
            let mut changed = before.clone();
            changed.insert(vm.id, vmedge_firewall::compile_vm(&vm));
            let there = vmedge_firewall::update(&before, &changed, &options).unwrap();
            let back = vmedge_firewall::update(&changed, &before, &options).unwrap();
            // One flip first, untimed: the first use of a socket, a set or a chain costs
            // more than the ones after it.
            for update in [&there, &back] {
                nft.apply_update(update).unwrap();
            }
            let mut times = Vec::new();
            for _ in 0..flips {
                for update in [&there, &back] {
                    let t = Instant::now();
                    nft.apply_update(update).unwrap();
                    times.push(t.elapsed());
                }
            }
            times.sort();
            one_vm.push(times[times.len() / 2]);
        }
        println!(
            "{n} VMs, {sets} sets, {} lines: compile {compiled:?}, full apply {applied:?}, \
             one VM changed (median of {}): ports {:?}, a rule more {:?}, a VM more {:?}",
            ruleset.text.lines().count(),
            2 * flips,
            one_vm[0],
            one_vm[1],
            one_vm[2]
        );
    }
}
