//! One load of a synthetic 100k-VM state, timed by phase: run it under `perf record`
//! to see where loading goes. `cargo run --release -p vmedge-bench --example profile_load [VMS]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

fn main() {
    let vms: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let text = vmedge_bench::synthetic_state(vms).to_string();
    let t = Instant::now();
    let parsed = vmedge_model::parse_state(&text).unwrap();
    println!(
        "{vms} VMs, {:.1} MB: parse + validate {:?}",
        text.len() as f64 / 1e6,
        t.elapsed()
    );
    let t = Instant::now();
    let snapshot = vmedge_registry::Snapshot::build(parsed.value, 1);
    println!("index {:?}", t.elapsed());
    std::mem::forget(snapshot); // freeing is not loading
}
