//! A fleet on etcd: a three-member cluster on the worker namespace's loopback, an edge and
//! a worker agent following it, changes made with `etcdctl` (a real peer) and
//! `vmedge state push`; the leader killed, then every member, then all brought back.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};
use vmedge_tests::edge::{backend, curl, edge, http_get, start_vmedge, wrk_requests};
use vmedge_tests::etcd::EtcdCluster;
use vmedge_tests::eventually;
use vmedge_tests::gate::metric;
use vmedge_tests::peers::tcp_open;
use vmedge_tests::{Lab, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_vmedge");
const VM: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
const HTTP: &str = "127.0.0.1:8080";
const EDGE_ADMIN: &str = "127.0.0.1:9180";
const WORKER_ADMIN: &str = "127.0.0.1:9183";

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(30);

/// The VM object with these services (name, port).
fn vm(lab: &Lab, services: &[(&str, u16)]) -> Value {
    let a = &lab.vms[0];
    let services: Vec<Value> = services
        .iter()
        .map(|(name, port)| json!({"name": name, "port": port}))
        .collect();
    json!({"id": VM, "org_id": "o", "worker": "w", "public_ipv6": a.ipv6.to_string(),
           "interface": a.interface, "status": "running", "services": services,
           "placement": {"rack": "r1"}})
}

/// The HTTP status the edge answers for `service` of the VM (the backends serve /hello).
fn status_of(ns: &Netns, service: &str) -> String {
    let host = format!("Host: {service}--{}.proxy.fleet.test", VM.replace('-', ""));
    let out = curl(
        ns,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &host,
            &format!("http://{HTTP}/hello"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn admin(ns: &Netns, addr: &str, path: &str) -> String {
    http_get(ns, addr.parse().unwrap(), "admin", path)
}

fn gauge(ns: &Netns, addr: &str, name: &str) -> f64 {
    metric(&admin(ns, addr, "/metrics"), name).unwrap_or(-1.0)
}

#[test]
fn a_fleet_follows_etcd_through_a_leader_kill_and_a_full_outage() {
    let lab = Lab::new(2);
    let (a, client) = (&lab.vms[0], &lab.vms[1]);
    let _web = backend(&a.ns, "http", 8000);
    let _api = backend(&a.ns, "http", 8081);
    let mut etcd = EtcdCluster::start(&lab.worker);
    let dir = tempfile::tempdir().unwrap();
    let n = lab.id();
    let config = dir.path().join("vmedge.toml");
    std::fs::write(
        &config,
        format!(
            "domain = \"fleet.test\"\nregistry = \"{}\"\nstate_dir = \"state\"\n\
             vm_prefixes = [\"fd5e:ed00:{n:x}::/48\"]\n\
             [edge]\nhttp = [\"{HTTP}\"]\nhttps = [\"127.0.0.1:8443\"]\nadmin = \"{EDGE_ADMIN}\"\n\
             [worker]\ndns_gate = \"{}\"\nadmin = \"{WORKER_ADMIN}\"\n",
            etcd.registry(),
            lab.worker_ipv6
        ),
    )
    .unwrap();

    // The first state goes in with `vmedge state push`, validated, in one transaction.
    let state = dir.path().join("state.json");
    std::fs::write(
        &state,
        json!({"vms": [vm(&lab, &[("web", 8000)])]}).to_string(),
    )
    .unwrap();
    let push = |path: &std::path::Path| {
        lab.worker
            .command(BIN)
            .args(["state", "push"])
            .arg(path)
            .args(["--etcd", &etcd.endpoints().join(",")])
            .output()
            .unwrap()
    };
    let out = push(&state);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.contains("1 written, 0 deleted, 0 unchanged"),
        "{said}"
    );
    let out = push(&state);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("0 written, 0 deleted, 1 unchanged"),
        "a second push changes nothing: {said}"
    );
    // An invalid file is refused before anything is written, naming the path.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, json!({"vms": [{"id": VM}]}).to_string()).unwrap();
    let out = push(&bad);
    let why = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && why.contains("vms[0].org_id"),
        "{why}"
    );

    let mut edge = edge(BIN, &lab.worker, &config, EDGE_ADMIN.parse().unwrap(), &[]);
    let config_arg = config.to_str().unwrap();
    let mut worker = start_vmedge(
        BIN,
        &lab.worker,
        &[
            "--log-level",
            "warn",
            "worker",
            "--name",
            "w",
            "--config",
            config_arg,
        ],
        WORKER_ADMIN.parse().unwrap(),
        "vmedge worker",
    );
    let to = |port| SocketAddr::new(IpAddr::V6(a.ipv6), port);
    // Does the firewall let the client VM connect to 8000 and (`open`) to 8081?
    let connects = |port| tcp_open(&client.ns, None, to(port)).is_some();
    let firewall = |open: bool| connects(8000) && connects(8081) == open;
    eventually("the worker's first sync from etcd", WAIT, || {
        firewall(false)
    });
    assert_eq!(status_of(&lab.worker, "web"), "200");
    assert_eq!(status_of(&lab.worker, "api"), "404");

    // A change made in etcd reaches both.
    let key = format!("/vmedge/vms/{VM}");
    etcd.put(&key, &vm(&lab, &[("web", 8000), ("api", 8081)]).to_string());
    eventually("the edge routes the new service", WAIT, || {
        status_of(&lab.worker, "api") == "200"
    });
    eventually("the worker lets the new service's port in", WAIT, || {
        firewall(true)
    });

    // An invalid value is refused for its key: the last good object keeps serving.
    let mut invalid = vm(&lab, &[("web", 8000)]);
    invalid["services"][0]["port"] = json!(70000);
    etcd.put(&key, &invalid.to_string());
    eventually("the edge quarantines the refused key", WAIT, || {
        gauge(&lab.worker, EDGE_ADMIN, "vmedge_registry_quarantined_vms") == 1.0
    });
    assert_eq!(status_of(&lab.worker, "api"), "200");
    assert!(firewall(true));

    // Under load (wrk on a service that stays): changes in etcd, then the leader killed,
    // and it is the member both follow (they start with the first): they move on to
    // another, resync, and changes still reach them. Not one request fails meanwhile.
    let web = format!("Host: web--{}.proxy.fleet.test", VM.replace('-', ""));
    let url = format!("http://{HTTP}/hello");
    let mut wrk = lab.worker.command("wrk");
    wrk.args(["-t1", "-c8", "-d5s", "-H", &web, &url]);
    let load = std::thread::scope(|scope| {
        let load = scope.spawn(|| wrk.output());
        for i in 0..4 {
            std::thread::sleep(Duration::from_millis(300));
            let services: &[(&str, u16)] = if i % 2 == 0 {
                &[("web", 8000)]
            } else {
                &[("web", 8000), ("api", 8081)]
            };
            etcd.put(&key, &vm(&lab, services).to_string());
        }
        etcd.make_leader(0);
        etcd.kill_member(0);
        etcd.wait_leader();
        etcd.put(&key, &vm(&lab, &[("web", 8000)]).to_string());
        load.join().unwrap().unwrap()
    });
    let report = String::from_utf8_lossy(&load.stdout);
    assert!(load.status.success(), "{report}");
    assert!(
        !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "{report}"
    );
    assert!(wrk_requests(&report) > 100, "{report}");
    eventually("the edge drops the removed service", WAIT, || {
        status_of(&lab.worker, "api") == "404"
    });
    eventually("the worker closes the removed service's port", WAIT, || {
        firewall(false)
    });
    assert_eq!(
        gauge(&lab.worker, EDGE_ADMIN, "vmedge_registry_quarantined_vms"),
        0.0
    );

    // Every member stopped: the edge still routes and the worker keeps its rules.
    for i in 0..3 {
        etcd.kill_member(i);
    }
    for (name, addr) in [("edge", EDGE_ADMIN), ("worker", WORKER_ADMIN)] {
        eventually(&format!("the {name} says etcd is down"), WAIT, || {
            gauge(&lab.worker, addr, "vmedge_registry_source_up") == 0.0
        });
    }
    let health = admin(&lab.worker, EDGE_ADMIN, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("source down"),
        "{health}"
    );
    assert_eq!(status_of(&lab.worker, "web"), "200");
    assert_eq!(status_of(&lab.worker, "api"), "404");
    assert!(firewall(false));
    edge.assert_running();
    worker.assert_running();

    // Members back: both resync without a restart, and follow again.
    for i in 0..3 {
        etcd.start_member(i);
    }
    etcd.wait_leader();
    etcd.put(&key, &vm(&lab, &[("web", 8000), ("api", 8081)]).to_string());
    eventually("the edge follows etcd again", WAIT, || {
        status_of(&lab.worker, "api") == "200"
    });
    eventually("the worker follows etcd again", WAIT, || firewall(true));
    for addr in [EDGE_ADMIN, WORKER_ADMIN] {
        let metrics = admin(&lab.worker, addr, "/metrics");
        assert_eq!(
            metric(&metrics, "vmedge_registry_source_up"),
            Some(1.0),
            "{metrics}"
        );
        assert!(
            metric(&metrics, "vmedge_registry_resyncs").unwrap_or(0.0) >= 1.0,
            "{metrics}"
        );
    }

    // `state pull` gives the state back, fields the edge does not read included.
    let out = lab
        .worker
        .command(BIN)
        .args(["state", "pull", "--etcd", &etcd.endpoints().join(",")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pulled: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pulled["vms"][0]["services"][1]["name"], "api");
    assert_eq!(pulled["vms"][0]["placement"]["rack"], "r1");
    assert_eq!(pulled["users"], json!([]));

    edge.signal("TERM");
    worker.signal("TERM");
    assert!(
        edge.wait_exit(Duration::from_secs(10)),
        "the edge did not stop on SIGTERM"
    );
    assert!(
        worker.wait_exit(Duration::from_secs(10)),
        "the worker did not stop on SIGTERM"
    );
}
