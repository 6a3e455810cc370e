//! bench/dns: cached answers per second, the DNS gate against dnsmasq and unbound, all
//! forwarding to the same NSD, measured with dnsperf from a VM namespace in one run; and
//! the latency the fqdn set insert adds before an answer is released.
//!
//! `cargo run --release -p vmedge-bench --example dns_load [-- --quick]` (root).
#![allow(clippy::unwrap_used)] // a benchmark may panic on what it did not expect

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmedge_dns::{GateConfig, UpstreamConfig};
use vmedge_registry::{MemoryRegistry, Registry};
use vmedge_tests::gate::GateInNetns;
use vmedge_tests::peers::Nsd;
use vmedge_tests::Lab;

const ZONE: &str = "bench.test";
const NAMES: usize = 200;
const NSD_PORT: u16 = 5300;
const DNSMASQ_PORT: u16 = 5301;
const UNBOUND_PORT: u16 = 5302;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn zone() -> String {
    let mut z = format!(
        "$ORIGIN {ZONE}.\n$TTL 3600\n@ IN SOA ns hostmaster 1 3600 600 86400 300\n@ IN NS ns\nns IN A 198.18.0.1\n"
    );
    for i in 0..NAMES {
        z.push_str(&format!("h{i} IN A 198.18.1.{}\n", i % 250 + 1));
    }
    z
}

fn state(lab: &Lab, fqdn: bool) -> vmedge_model::State {
    let rules = if fqdn {
        json!([{"action": "allow", "kind": "fqdn", "value": format!("*.{ZONE}"), "protocol": "tcp", "ports": "443"}])
    } else {
        json!([])
    };
    let vm = json!({"id": "6f1c2d3e-0000-4000-8000-0000000000aa", "org_id": "o", "worker": "w",
        "public_ipv6": lab.vms[0].ipv6.to_string(), "interface": lab.vms[0].interface,
        // The queries are for A records: only a VM with an IPv4 address has sets for them.
        "ipv4": lab.vms[0].ipv4.to_string(),
        "status": "running", "services": [],
        "firewall": {"ingress": {"default": "deny", "rules": []},
                     "egress": {"default": "deny", "rules": rules},
                     "dns": {"mode": "deny", "domains": [], "block_bypass": false}}});
    vmedge_model::state_from_value(&json!({"vms": [vm]}))
        .unwrap()
        .value
}

/// dnsperf from the VM at `server`; queries per second and mean latency (ms).
fn dnsperf(
    lab: &Lab,
    queries: &std::path::Path,
    server: SocketAddr,
    seconds: u32,
    rate: Option<u32>,
) -> (f64, f64) {
    let limit: Vec<String> = rate
        .map(|r| vec!["-Q".into(), r.to_string()])
        .unwrap_or_default();
    let out = lab.vms[0]
        .ns
        .command("dnsperf")
        .args(&limit)
        .args([
            "-s",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &seconds.to_string(),
            "-c",
            "4",
            "-q",
            "200",
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |label: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("dnsperf printed no {label:?}:\n{text}"))
    };
    let lost = number("Queries lost:");
    assert!(
        lost < 0.01 * number("Queries sent:") + 10.0,
        "too many lost:\n{text}"
    );
    (
        number("Queries per second:"),
        1000.0 * number("Average Latency (s):"),
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let seconds = if quick { 2 } else { 10 };
    let lab = Lab::new(1);
    let _nsd = Nsd::start(&lab.worker, ZONE, &zone(), NSD_PORT);
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("queries.txt");
    let lines: String = (0..NAMES).map(|i| format!("h{i}.{ZONE} A\n")).collect();
    std::fs::write(&queries, lines).unwrap();
    let gate_ip = IpAddr::V6(lab.worker_ipv6);

    // The peers, with equivalent configs: forward everything to NSD, cache it.
    let _dnsmasq = Killed(
        lab.worker
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={gate_ip}"))
            .arg(format!("--port={DNSMASQ_PORT}"))
            .arg(format!("--server=127.0.0.1#{NSD_PORT}"))
            .args([
                "--cache-size=10000",
                "--dns-forward-max=1000",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let unbound_conf = dir.path().join("unbound.conf");
    std::fs::write(
        &unbound_conf,
        format!(
            "server:\n  interface: {gate_ip}@{UNBOUND_PORT}\n  port: {UNBOUND_PORT}\n  \
             access-control: fd5e::/16 allow\n  num-threads: 2\n  username: \"\"\n  \
             chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  \
             do-not-query-localhost: no\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  \
             module-config: \"iterator\"\n  \
             trust-anchor-signaling: no\n  root-key-sentinel: no\n\
             forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{NSD_PORT}\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let _unbound = Killed(
        lab.worker
            .command("unbound")
            .args(["-d", "-c"])
            .arg(&unbound_conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let registry = Arc::new(MemoryRegistry::new("bench", state(&lab, false)));
    let mut reconciler = vmedge_worker::Reconciler::new(
        "w",
        vmedge_firewall::NftBackend::in_netns(lab.worker.name()),
        vmedge_firewall::CompileOptions::new(vec![gate_ip]),
        vmedge_worker::Metrics::register(&mut prometheus_client::registry::Registry::default()),
    );
    let config = GateConfig {
        worker: "w".into(),
        upstream: UpstreamConfig {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], NSD_PORT))],
            ..UpstreamConfig::default()
        },
        rate_limit: None,
        rebind_allow: vec!["198.18.0.0/15".parse().unwrap()],
        ..GateConfig::default()
    };
    let gate = GateInNetns::start(
        lab.worker.name(),
        SocketAddr::new(gate_ip, 53),
        config,
        registry.clone() as Arc<dyn Registry>,
    );
    std::thread::sleep(Duration::from_millis(500)); // the peers bind

    println!("bench/dns: {NAMES} names, cached, dnsperf -c 4 -q 200 for {seconds}s each, from a VM namespace");
    let mut results = Vec::new();
    for (label, port) in [
        ("vmedge gate", 53),
        ("dnsmasq", DNSMASQ_PORT),
        ("unbound", UNBOUND_PORT),
    ] {
        let server = SocketAddr::new(gate_ip, port);
        dnsperf(&lab, &queries, server, 1, None); // warm the cache
        let (qps, ms) = dnsperf(&lab, &queries, server, seconds, None);
        println!("  {label:<12} {qps:>10.0} q/s  mean {ms:.3} ms");
        results.push(qps);
    }
    println!(
        "  ratio gate/dnsmasq {:.2}  gate/unbound {:.2}",
        results[0] / results[1],
        results[0] / results[2]
    );

    // Every answer now fills the VM's fqdn sets before release: the insert's cost, at a
    // steady 5k q/s (below saturation, where queueing would be measured instead).
    let server = SocketAddr::new(gate_ip, 53);
    let (_, plain_ms) = dnsperf(&lab, &queries, server, seconds, Some(5000));
    registry.publish(state(&lab, true));
    reconciler.sync(&registry.load()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (qps, ms) = dnsperf(&lab, &queries, server, seconds, Some(5000));
    println!("  at 5000 q/s: mean {plain_ms:.3} ms without fqdn rules, {ms:.3} ms with");
    let text = gate.metrics();
    let count =
        vmedge_tests::gate::metric(&text, "vmedge_dns_set_insert_seconds_count").unwrap_or(0.0);
    let failures =
        vmedge_tests::gate::metric(&text, "vmedge_dns_set_insert_failures_total").unwrap_or(0.0);
    let p99 = histogram_quantile(&text, "vmedge_dns_set_insert_seconds", 0.99);
    let (saturated, _) = dnsperf(&lab, &queries, server, seconds, None);
    println!(
        "  fqdn inserts: {count:.0}, {failures:.0} failed, insert p99 <= {:.3} ms at 5000 q/s; saturated {saturated:.0} q/s (5000-q/s run: {qps:.0})",
        p99 * 1000.0
    );
    assert!(count > 0.0 && failures == 0.0, "{text}");
}

/// The upper bound of the bucket holding quantile `q` of a histogram.
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |b| b.0)
}
