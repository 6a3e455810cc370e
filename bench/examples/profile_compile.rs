//! Compiles a synthetic worker over and over, for `perf record`.
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
        let ruleset = vmedge_firewall::compile("w", state.vms.iter(), &options);
        println!("{vms} VMs: {:?}, {} bytes", t.elapsed(), ruleset.text.len());
    }
}
