//! Compiles a synthetic worker over and over, for `perf record`: the sections (policy to
//! typed rules and elements) and the text of a full transaction, timed apart; then
//! `compile` as a whole (both, and the sections freed).
//! `cargo run --release -p vmedge-bench --example profile_compile [VMS] [ROUNDS] [distinct]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u32>().ok());
    let (vms, rounds) = (args.next().unwrap_or(10_000), args.next().unwrap_or(5));
    // `distinct`: no two VMs share a policy (one rule's ports differ), so no canonical
    // form is reused; by default every VM has the same policy, as a template would give.
    let distinct = std::env::args().any(|a| a == "distinct");
    let mut doc = vmedge_bench::firewall_state(vms, 20, 0);
    if distinct {
        for (i, vm) in doc["vms"].as_array_mut().unwrap().iter_mut().enumerate() {
            for direction in ["ingress", "egress"] {
                vm["firewall"][direction]["rules"][0]["ports"] =
                    serde_json::json!(format!("1000-{}", 1005 + i));
            }
        }
    }
    let state = vmedge_model::state_from_value(&doc).unwrap().value;
    let options = vmedge_firewall::CompileOptions::new(vec!["fd5e:ed00:ff::53".parse().unwrap()]);
    for _ in 0..rounds {
        let t = Instant::now();
        let sections = vmedge_firewall::compile_sections(&state.vms);
        let compiled = t.elapsed();
        let t = Instant::now();
        let refs: Vec<_> = sections.iter().collect();
        let ruleset = vmedge_firewall::assemble("w", &refs, &options);
        let text = t.elapsed();
        drop((ruleset, sections));
        // The whole of `compile`: both parts, and freeing the sections.
        let t = Instant::now();
        let ruleset = vmedge_firewall::compile("w", &state.vms, &options);
        let whole = t.elapsed();
        println!(
            "{vms} VMs: sections {compiled:?}, text {text:?} ({} bytes, capacity {}); \
             compile {whole:?}",
            ruleset.text.len(),
            ruleset.text.capacity()
        );
    }
}
