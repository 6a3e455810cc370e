//! `vmedge worker` as an operator runs it, inside a lab's worker namespace.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmedge_tests::eventually;
use vmedge_tests::peers::{tcp_passes, EchoServers};
use vmedge_tests::{Lab, Netns};

fn http_get(ns: &Netns, path: &str) -> String {
    let mut conn = ns.enter(|| TcpStream::connect("127.0.0.1:9183")).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text
}

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn the_worker_agent_enforces_the_state_and_reports_metrics() {
    let lab = Lab::new(2);
    let (a, net) = (&lab.vms[0], &lab.vms[1]);
    let _servers = EchoServers::start(&a.ns, &[8080, 8081], &[]);
    let dir = tempfile::tempdir().unwrap();
    let state = serde_json::json!({"vms": [{
        "id": "6f1c2d3e-0000-4000-8000-0000000000aa", "org_id": "o", "worker": "w",
        "public_ipv6": a.ipv6.to_string(), "interface": a.interface, "status": "running",
        "services": [{"name": "web", "port": 8080}]}]});
    std::fs::write(dir.path().join("state.json"), state.to_string()).unwrap();
    std::fs::write(
        dir.path().join("vmedge.toml"),
        format!(
            "registry = \"file:state.json\"\n[worker]\ndns_gate = \"{}\"\nadmin = \"127.0.0.1:9183\"\ndrift_interval = \"300ms\"\n",
            lab.worker_ipv6
        ),
    )
    .unwrap();
    let agent = start_agent(&lab, dir.path());

    let to = |port| SocketAddr::new(IpAddr::V6(a.ipv6), port);
    eventually("the agent's first sync", WAIT, || {
        tcp_passes(&net.ns, None, to(8080)) && !tcp_passes(&net.ns, None, to(8081))
    });
    let metrics = http_get(&lab.worker, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(r#"vmedge_worker_syncs_total{kind="full"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("vmedge_worker_vms 1"), "{metrics}");
    assert!(
        metrics.contains("vmedge_registry_generation 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmedge_worker_sync_duration_seconds_bucket"),
        "{metrics}"
    );
    let health = http_get(&lab.worker, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("ok: state generation 1"),
        "{health}"
    );

    // A flushed table is restored within the drift interval, and counted.
    lab.worker.sh(&["nft", "flush", "table", "inet", "vmedge"]);
    eventually("drift repaired", WAIT, || {
        http_get(&lab.worker, "/metrics").contains("vmedge_worker_drift_repairs_total 1")
    });
    assert!(!tcp_passes(&net.ns, None, to(8081)));

    // The agent runs the DNS gate at dns_gate:53: its VMs are answered, anyone else refused.
    let dig = |ns: &Netns| {
        let out = ns
            .command("dig")
            .args([&format!("@{}", lab.worker_ipv6), "+tries=1", "+time=3"])
            .args(["_dns.resolver.arpa", "SVCB"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_vm = dig(&a.ns);
    assert!(from_vm.contains("status: NOERROR"), "{from_vm}");
    let from_host = dig(&lab.worker);
    assert!(from_host.contains("status: REFUSED"), "{from_host}");
    let metrics = http_get(&lab.worker, "/metrics");
    assert!(
        metrics.contains(r#"vmedge_dns_queries_total{result="refused"} 1"#),
        "{metrics}"
    );

    let logs = stop_agent(agent);
    assert!(
        logs.contains("firewall synced in full") && logs.contains("restored"),
        "{logs}"
    );
    assert!(
        !tcp_passes(&net.ns, None, to(8081)),
        "the rules stay in the kernel after the agent stops"
    );
}

/// Starts `vmedge worker --name w` in the lab's worker namespace with `dir/vmedge.toml`.
fn start_agent(lab: &Lab, dir: &std::path::Path) -> std::process::Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.worker.name(),
            env!("CARGO_BIN_EXE_vmedge"),
        ])
        .args(["--log-format", "json", "worker", "--name", "w", "--config"])
        .arg(dir.join("vmedge.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops the agent with SIGTERM, checks it exits 0, and returns its log.
fn stop_agent(agent: std::process::Child) -> String {
    // `ip netns exec` execs the program, so the pid is the agent's.
    let pid = agent.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = agent.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{logs}");
    logs
}

#[test]
fn a_killed_agent_leaves_its_rules_in_force_and_a_restarted_one_reconciles() {
    let lab = Lab::new(2);
    let (a, net) = (&lab.vms[0], &lab.vms[1]);
    let _servers = EchoServers::start(&a.ns, &[8080, 8081], &[]);
    let dir = tempfile::tempdir().unwrap();
    let state = |ports: &[u16]| {
        let services: Vec<serde_json::Value> = ports
            .iter()
            .map(|p| serde_json::json!({"name": format!("s{p}"), "port": p}))
            .collect();
        let vm = serde_json::json!({"id": "6f1c2d3e-0000-4000-8000-0000000000aa", "org_id": "o",
            "worker": "w", "public_ipv6": a.ipv6.to_string(), "interface": a.interface,
            "status": "running", "services": services});
        let tmp = dir.path().join("state.json.tmp");
        std::fs::write(&tmp, serde_json::json!({"vms": [vm]}).to_string()).unwrap();
        std::fs::rename(&tmp, dir.path().join("state.json")).unwrap();
    };
    state(&[8080]);
    std::fs::write(
        dir.path().join("vmedge.toml"),
        format!(
            "registry = \"file:state.json\"\n[worker]\ndns_gate = \"{}\"\nadmin = \"127.0.0.1:9183\"\n",
            lab.worker_ipv6
        ),
    )
    .unwrap();
    let to = |port| SocketAddr::new(IpAddr::V6(a.ipv6), port);
    let mut agent = start_agent(&lab, dir.path());
    eventually("the first sync", WAIT, || {
        tcp_passes(&net.ns, None, to(8080)) && !tcp_passes(&net.ns, None, to(8081))
    });
    let mut open = vmedge_tests::peers::tcp_open(&net.ns, None, to(8080)).unwrap();

    // SIGKILL: no chance to tidy up. The kernel keeps enforcing the last ruleset.
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(
        tcp_passes(&net.ns, None, to(8080)),
        "allowed traffic still flows"
    );
    assert!(
        !tcp_passes(&net.ns, None, to(8081)),
        "denied traffic is still dropped"
    );
    assert!(vmedge_tests::peers::echo_round_trip(&mut open));

    // The state changes while no agent runs; a new agent reconciles at start, and the
    // connection opened under the old agent lives on.
    state(&[8080, 8081]);
    let agent = start_agent(&lab, dir.path());
    eventually("the restarted agent applies the new state", WAIT, || {
        tcp_passes(&net.ns, None, to(8081))
    });
    assert!(
        vmedge_tests::peers::echo_round_trip(&mut open),
        "an open connection survives"
    );

    assert!(stop_agent(agent).contains("firewall synced in full"));
}
