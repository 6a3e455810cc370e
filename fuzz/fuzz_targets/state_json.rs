//! The state document, one VM or user object (etcd's values), and what is built from a
//! valid state: the index every server reads, and each worker's firewall ruleset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmedge_firewall::{compile, CompileOptions};
use vmedge_model::{parse_state, parse_state_isolating, parse_user, parse_vm_checked};
use vmedge_registry::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_vm_checked(text);
    let _ = parse_user(text);
    if let Ok(partial) = parse_state_isolating(text) {
        let _ = partial.resolve(|_| None);
    }
    let Ok(parsed) = parse_state(text) else {
        return;
    };
    let state = parsed.value;
    let options = CompileOptions::new(vec!["fd5e:ed00::53".parse().expect("address")]);
    let mut workers: Vec<&str> = state.vms.iter().map(|vm| vm.worker.as_str()).collect();
    workers.sort_unstable();
    workers.dedup();
    for worker in workers {
        let vms = state.vms.iter().filter(|vm| vm.worker == worker);
        let ruleset = compile(worker, vms, &options);
        assert!(ruleset.text.contains("table inet vmedge"));
    }
    let snapshot = Snapshot::build(state, 1);
    assert_eq!(snapshot.generation(), 1);
});
