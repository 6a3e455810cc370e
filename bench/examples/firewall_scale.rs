//! How nft's time grows with the table: a full apply of N VMs, then one VM changed.
//! `cargo run --release -p vmedge-bench --example firewall_scale -- 100 500 1000` (root)
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use vmedge_firewall::{compile, CompileOptions, FirewallBackend, NftBackend};

fn main() {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let options = CompileOptions::new(vec!["fd5e:ed00:ff::53".parse().unwrap()]);
    for n in sizes {
        let lab = vmedge_tests::Lab::new(0);
        let nft = NftBackend::in_netns(lab.worker.name());
        let state = vmedge_model::state_from_value(&vmedge_bench::firewall_state(n, 20, 0))
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
        let mut changed = state.clone();
        changed.vms[0] = vmedge_model::state_from_value(&vmedge_bench::firewall_state(1, 20, 1))
            .unwrap()
            .value
            .vms[0]
            .clone();
        let before: std::collections::BTreeMap<_, _> = state
            .vms
            .iter()
            .map(|v| (v.id, vmedge_firewall::compile_vm(v, &options)))
            .collect();
        let after: std::collections::BTreeMap<_, _> = changed
            .vms
            .iter()
            .map(|v| (v.id, vmedge_firewall::compile_vm(v, &options)))
            .collect();
        let update = vmedge_firewall::update(&before, &after).unwrap();
        let t = Instant::now();
        nft.apply_update(&update).unwrap();
        let one = t.elapsed();
        // VMEDGE_SCALE_REPEAT=N: flip the VM back and forth N more times (for perf).
        let repeat: u32 = std::env::var("VMEDGE_SCALE_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let back = vmedge_firewall::update(&after, &before).unwrap();
        for _ in 0..repeat {
            nft.apply_update(&back).unwrap();
            nft.apply_update(&update).unwrap();
        }
        println!("{n} VMs, {sets} sets, {} lines: compile {compiled:?}, full apply {applied:?}, one VM changed {one:?}", ruleset.text.lines().count());
    }
}
