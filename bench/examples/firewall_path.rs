//! bench/firewall, the packet path: iperf3 from one VM namespace to another across the
//! worker, with vmedge's table empty (no VMs: the base chain, so conntrack, and nothing
//! else), then with N VMs × R rules (the sender is one of them, its allowing rules the last
//! of its egress rules), alternating, median of the runs. Goal: the loaded table keeps
//! ≥ 95% of the empty table's throughput. Also shown: no table at all (no conntrack).
//!
//! `cargo run --release -p vmedge-bench --example firewall_path [-- --quick]` (root;
//! bench/load/firewall.sh).
#![allow(clippy::unwrap_used)] // a benchmark may panic on what it did not expect

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use serde_json::{json, Value};
use vmedge_firewall::{compile, CompileOptions, FirewallBackend, NftBackend};
use vmedge_tests::edge::{wait_listening, Process};
use vmedge_tests::{Lab, Netns};

const PORT: u16 = 5201;

/// The state: `n - 1` synthetic VMs (cidr rules only: their fqdn sets would only slow the
/// load, not the path measured) and the sender, with `rules` rules of the same shapes
/// whose last egress rules allow the receiver on [`PORT`].
fn state(lab: &Lab, n: u32, rules: u32) -> Value {
    let (sender, receiver) = (&lab.vms[0], &lab.vms[1]);
    let mut doc = vmedge_bench::firewall_state(n - 1, rules, 0);
    let cidr_only = |rules: &mut Value| {
        let list = rules.as_array_mut().unwrap();
        list.retain(|r| r["kind"] == "cidr");
    };
    for (i, vm) in doc["vms"].as_array_mut().unwrap().iter_mut().enumerate() {
        cidr_only(&mut vm["firewall"]["egress"]["rules"]);
        // Taps that do not exist and IPv4 addresses no lab uses (198.19/16), apart from
        // the lab's own.
        vm["interface"] = json!(format!("bench{i}"));
        vm["ipv4"] = json!(format!("198.19.{}.{}", i >> 8, i & 0xff));
    }
    let mut firewall = vmedge_bench::firewall_state(1, rules, 1)["vms"][0]["firewall"].clone();
    let egress = firewall["egress"]["rules"].as_array_mut().unwrap();
    egress.truncate(egress.len().saturating_sub(2));
    for addr in [
        format!("{}/128", receiver.ipv6),
        format!("{}/32", receiver.ipv4),
    ] {
        egress.push(json!({"action": "allow", "kind": "cidr", "value": addr,
                           "protocol": "tcp", "ports": PORT.to_string()}));
    }
    doc["vms"].as_array_mut().unwrap().push(json!({
        "id": "6f1c2d3e-0000-4000-8000-00000000f00d", "org_id": "org", "worker": "w",
        "public_ipv6": sender.ipv6.to_string(), "interface": sender.interface,
        "ipv4": sender.ipv4.to_string(), "status": "running", "firewall": firewall,
    }));
    doc
}

/// Bits per second received in one iperf3 run of `secs` seconds to `addr`.
fn iperf(ns: &Netns, addr: IpAddr, secs: u32) -> f64 {
    let out = ns
        .command("iperf3")
        .args(["-c", &addr.to_string(), "-p", &PORT.to_string()])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 reported no throughput: {report}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, rules, secs, mut runs) = if quick {
        (50, 100, 2, 1)
    } else {
        (1000, 100, 10, 3)
    };
    // VMEDGE_PATH_RUNS=N: more rounds, where this machine's noise needs them.
    if let Some(n) = std::env::var("VMEDGE_PATH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        runs = n;
    }
    let lab = Lab::new(2);
    let (sender, receiver) = (&lab.vms[0], &lab.vms[1]);
    let nft = NftBackend::in_netns(lab.worker.name());
    let options = CompileOptions::new(vec![IpAddr::from(lab.worker_ipv6)]);
    let doc = state(&lab, n, rules);
    let state = vmedge_model::state_from_value(&doc).unwrap().value;
    let ruleset = compile("w", state.vms.iter(), &options);
    let empty_ruleset = compile("w", std::iter::empty(), &options);
    let rule_lines = ruleset
        .text
        .lines()
        .filter(|l| l.starts_with("add rule"))
        .count();

    let server = receiver
        .ns
        .command("iperf3")
        .args(["-s", "-p", &PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _server = Process::new(server, "iperf3 server");
    // (The probe costs the server one aborted test; it serves on.)
    wait_listening(
        &receiver.ns,
        SocketAddr::from((receiver.ipv6, PORT)),
        "iperf3 server",
    );

    println!(
        "packet path: iperf3 VM -> VM across the worker, {secs} s per run, median of {runs} \
         (table: {n} VMs x {rules} rules, {rule_lines} rules in chains)"
    );
    let mut apply_seconds = Vec::new();
    let settle = std::time::Duration::from_secs(if quick { 0 } else { 5 });
    for (family, to) in [
        ("IPv6", IpAddr::from(receiver.ipv6)),
        ("IPv4", IpAddr::from(receiver.ipv4)),
    ] {
        let (mut none, mut empty, mut loaded) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            drop_table(&lab.worker);
            none.push(iperf(&sender.ns, to, secs));
            nft.apply(&empty_ruleset).unwrap();
            std::thread::sleep(settle);
            empty.push(iperf(&sender.ns, to, secs));
            let started = Instant::now();
            nft.apply(&ruleset).unwrap();
            apply_seconds.push(started.elapsed().as_secs_f64());
            // The kernel frees the replaced table's objects after the commit, on these
            // same two cores: measured before that is done, the loaded run paid for it.
            std::thread::sleep(settle);
            loaded.push(iperf(&sender.ns, to, secs));
        }
        let (none, empty, loaded) = (median(none), median(empty), median(loaded));
        println!(
            "  {family}: empty table {:>6.2} Gbit/s, loaded {:>6.2} Gbit/s: {:.3}x (goal >= 0.95); \
             no table {:>6.2} Gbit/s",
            empty / 1e9,
            loaded / 1e9,
            loaded / empty,
            none / 1e9,
        );
    }
    println!(
        "  (full apply of the table with nft -f: {:.1} s median)",
        median(apply_seconds)
    );
    drop_table(&lab.worker);
}

/// No vmedge table in the worker (there may be none yet).
fn drop_table(worker: &Netns) {
    let _ = worker
        .command("nft")
        .args(["delete", "table", "inet", "vmedge"])
        .stderr(std::process::Stdio::null())
        .status();
}
