//! Golden tests: each `tests/golden/<case>.json` state, compiled for worker-1, must equal
//! `<case>.nft`. After an intended change: `UPDATE_GOLDEN=1 cargo test -p vmedge-firewall`
//! and read the diff.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::path::Path;

use vmedge_firewall::{compile, CompileOptions};

fn options() -> CompileOptions {
    CompileOptions {
        dns_gates: vec!["fd5e:ed00:1::53".parse().unwrap()],
        doh: vmedge_firewall::compile::parse_address_list("1.1.1.1\n2606:4700:4700::1111\n"),
    }
}

fn check(case: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let state = vmedge_model::parse_state(
        &std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap(),
    )
    .unwrap_or_else(|e| panic!("{case}.json: {e}"))
    .value;
    let vms = state.vms.iter().filter(|v| v.worker == "worker-1");
    let text = compile("worker-1", vms, &options()).text;
    let golden = dir.join(format!("{case}.nft"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", golden.display()));
    assert!(
        text == want,
        "{case}: compiled text differs from {}:\n{text}",
        golden.display()
    );
}

#[test]
fn basic() {
    check("basic");
}

#[test]
fn legacy_shape() {
    check("legacy");
}

#[test]
fn output_does_not_depend_on_vm_order() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/basic.json"
    ))
    .unwrap();
    let state = vmedge_model::parse_state(&text).unwrap().value;
    let forward = compile("worker-1", state.vms.iter(), &options());
    let backward = compile("worker-1", state.vms.iter().rev(), &options());
    assert_eq!(forward, backward);
}
