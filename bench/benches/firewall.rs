//! The firewall: compile time, and syncs against the real kernel (nft in a lab namespace;
//! needs root, like the end-to-end tests).
//!
//! - `compile/10k_vms_20_rules`: `compile()` of a worker with 10k VMs. Goal < 100 ms.
//! - `sync/full/N`: a full sync (compile + `nft -f`) of N VMs.
//! - `sync/one_vm_changed/N`: one VM's policy changes with N VMs in the table: the goal
//!   is < 20 ms and flat in N (bench/RESULTS.md says how far it is). N is 100 and 400 by
//!   default, to keep CI short; `VMEDGE_BENCH_SIZES=100,1000,5000` asks for more.
#![allow(clippy::unwrap_used)] // a benchmark may panic on a broken set-up

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use vmedge_bench::firewall_state;
use vmedge_firewall::{compile, CompileOptions, NftBackend};
use vmedge_registry::{MemoryRegistry, Registry};
use vmedge_worker::{Metrics, Reconciler, Synced};

fn state(n: u32, variant: u32) -> vmedge_model::State {
    vmedge_model::state_from_value(&firewall_state(n, 20, variant))
        .unwrap()
        .value
}

fn options() -> CompileOptions {
    CompileOptions::new(vec!["fd5e:ed00:ff::53".parse().unwrap()])
}

fn compile_bench(c: &mut Criterion) {
    let state = state(10_000, 0);
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("10k_vms_20_rules", |b| {
        b.iter(|| black_box(compile("w", state.vms.iter(), &options())))
    });
    group.finish();
}

fn reconciler(lab: &vmedge_tests::Lab) -> Reconciler<NftBackend> {
    let mut registry = prometheus_client::registry::Registry::default();
    Reconciler::new(
        "w",
        NftBackend::in_netns(lab.worker.name()),
        options(),
        Metrics::register(&mut registry),
    )
}

fn sizes() -> Vec<u32> {
    std::env::var("VMEDGE_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 400])
}

fn sync_bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sync");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for n in sizes() {
        let lab = vmedge_tests::Lab::new(0);
        let memory = MemoryRegistry::new("bench", state(n, 0));
        group.bench_with_input(BenchmarkId::new("full", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut r = reconciler(&lab); // a fresh agent always starts with a full sync
                    let t = Instant::now();
                    assert!(matches!(
                        r.sync(&memory.load()).unwrap(),
                        Synced::Full { .. }
                    ));
                    total += t.elapsed();
                }
                total
            })
        });
    }
    for n in sizes() {
        let lab = vmedge_tests::Lab::new(0);
        let base = state(n, 0);
        let memory = MemoryRegistry::new("bench", base.clone());
        let mut r = reconciler(&lab);
        r.sync(&memory.load()).unwrap();
        // Two states that differ in VM 0's policy only; each iteration flips between them.
        let mut other = base.clone();
        other.vms[0] = state(1, 1).vms[0].clone();
        let states = [other, base];
        let mut flip = 0usize;
        group.bench_with_input(BenchmarkId::new("one_vm_changed", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    memory.publish(states[flip % 2].clone());
                    flip += 1;
                    let snapshot = memory.load();
                    let t = Instant::now();
                    assert_eq!(r.sync(&snapshot).unwrap(), Synced::Incremental);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, compile_bench, sync_bench);
criterion_main!(benches);
