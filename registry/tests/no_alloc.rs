//! Lookups on the request path allocate nothing: counted with a global allocator.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::net::IpAddr;

use vmedge_model::{parse_state, Fingerprint};
use vmedge_registry::{MemoryRegistry, Registry};
use vmedge_tests::alloc::{allocations, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn request_path_lookups_allocate_nothing() {
    let text = include_str!("../../examples/state.json");
    let registry = MemoryRegistry::new("test", parse_state(text).unwrap().value);
    let fingerprint: Fingerprint = registry.load().users()[0].ssh_keys[0].fingerprint;
    let source: IpAddr = "198.18.1.2".parse().unwrap();
    let hosts = [
        "APP--6f1c2d3e0000400080000000000000aa.proxy.example.dev:8443",
        "nope--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
        "app.proxy.example.dev",
        "elsewhere.example.org",
    ];
    // Warm up anything lazily initialised (arc-swap's thread-local debt slots).
    drop(registry.load());

    let before = allocations();
    let mut found = 0;
    for _ in 0..1000 {
        let snapshot = registry.load();
        for host in hosts {
            if let Ok(route) = snapshot.route_host(host, "example.dev") {
                found += route.target().port() as usize;
            }
        }
        found += snapshot.user_by_fingerprint(&fingerprint).is_some() as usize;
        found += snapshot.vm_by_source("worker-1", source).is_some() as usize;
        found += snapshot.worker_vms("worker-1").count();
    }
    let made = allocations() - before;
    assert_eq!(
        found,
        1000 * (3000 + 1 + 1 + 6),
        "the lookups found what they should"
    );
    assert_eq!(made, 0, "request-path lookups allocated");
}
