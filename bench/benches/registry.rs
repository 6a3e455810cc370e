//! The registry's hot paths with 100k VMs loaded.
//!
//! - `route/*`: a Host header to a route (parse + lookup), hits and misses. The goal is
//!   < 200 ns per lookup and no allocation; allocations are counted around a separate
//!   run of the same lookups and printed (and the run fails if there are any).
//! - `load/100k`: reading, validating and indexing a 100k-VM state file. Goal: < 1 s.
#![allow(clippy::unwrap_used)] // a benchmark may panic on a broken set-up

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmedge_bench::{synthetic_state, vm_id};
use vmedge_model::{public_host, ServiceName};
use vmedge_registry::{FileRegistry, MemoryRegistry, Registry};
use vmedge_tests::alloc::{allocations, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const VMS: u32 = 100_000;
const DOMAIN: &str = "proxy-bench.example.dev";

fn hosts(count: u32, service: &str) -> Vec<String> {
    let service = ServiceName::parse(service).unwrap();
    // Spread over the whole table so the lookups are not all cache-hot.
    (0..count)
        .map(|i| public_host(&service, vm_id((i * 7919) % VMS), DOMAIN).to_ascii_uppercase())
        .collect()
}

fn route(c: &mut Criterion) {
    let state = vmedge_model::state_from_value(&synthetic_state(VMS))
        .unwrap()
        .value;
    let registry = MemoryRegistry::new("bench", state);
    let hits = hosts(1024, "web");
    let misses = hosts(1024, "nope");

    // Allocation count over the same lookups the timings below make.
    drop(registry.load());
    let before = allocations();
    let mut found = 0usize;
    for host in hits.iter().chain(&misses) {
        let snapshot = registry.load();
        found += snapshot.route_host(host, DOMAIN).is_ok() as usize;
    }
    let made = allocations() - before;
    println!(
        "route: {} lookups ({found} hits) made {made} allocations",
        hits.len() + misses.len()
    );
    assert_eq!(found, hits.len());
    assert_eq!(made, 0, "the request path allocated");

    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    for (name, set) in [("hit", &hits), ("miss_unknown_service", &misses)] {
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let snapshot = registry.load();
                black_box(
                    snapshot
                        .route_host(black_box(&set[i]), DOMAIN)
                        .map(|r| r.target())
                        .ok(),
                )
            })
        });
    }
    // The two halves of a hit, apart.
    let mut i = 0usize;
    group.bench_function("parse_only", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(vmedge_model::parse_public_host(black_box(&hits[i]), DOMAIN).ok())
        })
    });
    let parsed: Vec<_> = hits
        .iter()
        .map(|h| vmedge_model::parse_public_host(h, DOMAIN).unwrap())
        .collect();
    let mut i = 0usize;
    group.bench_function("lookup_only", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let snapshot = registry.load();
            black_box(snapshot.route(black_box(&parsed[i])).map(|r| r.target()))
        })
    });
    group.finish();
}

fn load(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let text = synthetic_state(VMS).to_string();
    std::fs::write(&path, &text).unwrap();
    println!(
        "load: state file of {VMS} VMs, {:.1} MB",
        text.len() as f64 / 1e6
    );
    drop(text);
    let mut group = c.benchmark_group("load");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    // The registry is dropped outside the timing: freeing the old state is not loading.
    group.bench_function("100k_vms", |b| {
        b.iter_with_large_drop(|| FileRegistry::open(&path).unwrap())
    });
    group.finish();
}

criterion_group!(benches, route, load);
criterion_main!(benches);
