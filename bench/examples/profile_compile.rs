//! Compiles a synthetic worker over and over, for `perf record`: the sections (policy to
//! typed rules and elements) and the text of a full transaction, timed apart.
//! `cargo run --release -p vmedge-bench --example profile_compile [VMS] [ROUNDS]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u32>().ok());
    let (vms, rounds) = (args.next().unwrap_or(10_000), args.next().unwrap_or(5));
    let state = vmedge_model::state_from_value(&vmedge_bench::firewall_state(vms, 20, 0))
        .unwrap()
        .value;
    let options = vmedge_firewall::CompileOptions::new(vec!["fd5e:ed00:ff::53".parse().unwrap()]);
    for _ in 0..rounds {
        let t = Instant::now();
        let sections: Vec<_> = state
            .vms
            .iter()
            .map(|vm| vmedge_firewall::compile_vm(vm, &options))
            .collect();
        let compiled = t.elapsed();
        let t = Instant::now();
        let refs: Vec<_> = sections.iter().collect();
        let ruleset = vmedge_firewall::assemble("w", &refs, &options);
        println!(
            "{vms} VMs: sections {compiled:?}, text {:?} ({} bytes, capacity {})",
            t.elapsed(),
            ruleset.text.len(),
            ruleset.text.capacity()
        );
    }
}
