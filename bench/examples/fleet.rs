//! bench/fleet: a three-member etcd cluster on a namespace's loopback, and a real
//! `vmedge edge` following it.
//!
//! 1. Propagation: with N VMs loaded (production-shaped, `synthetic_state`), one VM at a
//!    time gets a new service through etcd; the time from the put to the edge routing the
//!    new host (a keep-alive HTTP client asks the edge every millisecond: 404 until the
//!    route exists) is one sample. Goal: p99 < 100 ms at 10k VMs.
//! 2. Memory: the edge's resident set holding 100k VMs (and 10k users) from etcd, beside
//!    the same state from a file. Goal: < 200 MB.
//!
//! `VMEDGE_BIN=target/release/vmedge cargo run --release -p vmedge-bench --example fleet [-- --quick]`
//! (root; bench/load/fleet.sh). --quick: 1k VMs, 10 changes, 2k VMs for memory.
#![allow(clippy::unwrap_used)] // a benchmark may panic on what it did not expect

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use serde_json::Value;
use vmedge_registry::keyed::{user_key, vm_key};
use vmedge_tests::edge::{start_vmedge, Process};
use vmedge_tests::etcd::EtcdCluster;
use vmedge_tests::gate::metric;
use vmedge_tests::{rss_kb, Lab, Netns};

const HTTP: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9180";
const DOMAIN: &str = "fleet.bench";
/// Keys per transaction when loading (etcd's request size limit is 1.5 MiB by default).
const CHUNK: usize = 500;

struct Plan {
    vms: u32,
    changes: usize,
    memory_vms: u32,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan {
            vms: 1_000,
            changes: 10,
            memory_vms: 2_000,
        }
    } else {
        Plan {
            vms: 10_000,
            changes: 200,
            memory_vms: 100_000,
        }
    };
    let bin = std::env::var("VMEDGE_BIN").expect("VMEDGE_BIN: the vmedge binary to measure");
    let lab = Lab::new(1);
    let etcd = EtcdCluster::start(&lab.worker);
    // The etcd client below opens its connections from this thread: into the cluster's namespace.
    vmedge_tests::enter_netns(lab.worker.name());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = etcd.endpoints()[0].clone();
    let client = runtime
        .block_on(vmedge_registry::etcd::connect(&endpoint))
        .unwrap();

    let doc = vmedge_bench::synthetic_state(plan.memory_vms);
    let vms = doc["vms"].as_array().unwrap();
    let users = doc["users"].as_array().unwrap();
    let load = |range: std::ops::Range<usize>, with_users: bool| {
        let mut ops: Vec<TxnOp> = vms[range]
            .iter()
            .map(|vm| {
                let id = vmedge_model::VmId::parse(vm["id"].as_str().unwrap()).unwrap();
                TxnOp::put(vm_key(&id), vm.to_string(), None)
            })
            .collect();
        if with_users {
            ops.extend(
                users
                    .iter()
                    .map(|u| TxnOp::put(user_key(u["id"].as_str().unwrap()), u.to_string(), None)),
            );
        }
        let started = Instant::now();
        let mut kv = client.kv_client();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(CHUNK));
            let txn = Txn::new().and_then(std::mem::replace(&mut ops, rest));
            runtime.block_on(kv.txn(txn)).unwrap();
        }
        started.elapsed()
    };
    let took = load(0..plan.vms as usize, false);
    println!(
        "loaded {} VMs into etcd in {:.1} s",
        plan.vms,
        took.as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let config = |registry: &str| {
        format!(
            "domain = \"{DOMAIN}\"\nregistry = \"{registry}\"\nstate_dir = \"state\"\n\
             vm_prefixes = [\"fd5e:ed00::/32\"]\n\
             [edge]\nhttp = [\"{HTTP}\"]\nhttps = [\"127.0.0.1:8443\"]\nadmin = \"{ADMIN}\"\n"
        )
    };
    let etcd_config = dir.path().join("etcd.toml");
    std::fs::write(&etcd_config, config(&etcd.registry())).unwrap();
    let edge = start_edge(&bin, &lab.worker, &etcd_config);
    wait_vms(&lab.worker, plan.vms);

    // 1. Propagation.
    let mut http = Keepalive::connect(&lab.worker);
    let mut samples = Vec::with_capacity(plan.changes);
    for k in 0..plan.changes {
        // A running VM (every tenth is paused: a request would wake it).
        let i = (k * 7919 % plan.vms as usize) | 1;
        let mut vm: Value = vms[i].clone();
        let name = format!("probe{k}");
        vm["services"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": name, "port": 9000}));
        let id = vmedge_model::VmId::parse(vm["id"].as_str().unwrap()).unwrap();
        let host = format!("{name}--{}.proxy.{DOMAIN}", id.hex());
        assert_eq!(http.status(&host), 404, "{host} routed before the change");
        let started = Instant::now();
        let mut kv = client.kv_client();
        runtime
            .block_on(kv.put(vm_key(&id), vm.to_string(), None))
            .unwrap();
        loop {
            if http.status(&host) != 404 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{host} never routed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(started.elapsed());
    }
    if http.reconnects > 0 {
        println!(
            "  (the edge closed the polling connection {} times)",
            http.reconnects
        );
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "propagation etcd -> edge routing, {} VMs loaded, {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 < 100 ms)",
        plan.vms,
        samples.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0))
    );

    // 2. Memory at the full count, from etcd and from a file.
    let took = load(plan.vms as usize..plan.memory_vms as usize, true);
    println!(
        "loaded {} more VMs and {} users into etcd in {:.1} s",
        plan.memory_vms - plan.vms,
        users.len(),
        took.as_secs_f64()
    );
    wait_vms(&lab.worker, plan.memory_vms);
    let etcd_kb = settled_rss(edge.id());
    drop(edge);
    let file_state = dir.path().join("state.json");
    std::fs::write(&file_state, doc.to_string()).unwrap();
    let file_config = dir.path().join("file.toml");
    std::fs::write(
        &file_config,
        config(&format!("file:{}", file_state.display())),
    )
    .unwrap();
    let edge = start_edge(&bin, &lab.worker, &file_config);
    wait_vms(&lab.worker, plan.memory_vms);
    let file_kb = settled_rss(edge.id());
    println!(
        "edge memory holding {} VMs and {} users: {:.0} MB from etcd, {:.0} MB from a file (goal < 200 MB)",
        plan.memory_vms,
        users.len(),
        etcd_kb as f64 / 1024.0,
        file_kb as f64 / 1024.0
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn start_edge(bin: &str, ns: &Netns, config: &Path) -> Process {
    start_vmedge(
        bin,
        ns,
        &[
            "--log-level",
            "warn",
            "edge",
            "--config",
            config.to_str().unwrap(),
        ],
        ADMIN.parse().unwrap(),
        "vmedge edge",
    )
}

/// Waits until the edge's registry holds `n` VMs.
fn wait_vms(ns: &Netns, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let metrics = vmedge_tests::edge::http_get(ns, ADMIN.parse().unwrap(), "admin", "/metrics");
        if metric(&metrics, "vmedge_registry_vms") == Some(f64::from(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "the edge never held {n} VMs");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The resident set once it stops moving (allocator settling after the load; the edge
/// trims its heap 2 s after a change).
fn settled_rss(pid: u32) -> u64 {
    std::thread::sleep(Duration::from_secs(3));
    let mut last = rss_kb(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kb(pid);
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}

/// One keep-alive HTTP/1.1 connection to the edge (a new one when an answer says close).
struct Keepalive<'ns> {
    ns: &'ns Netns,
    conn: TcpStream,
    reconnects: usize,
}

impl<'ns> Keepalive<'ns> {
    fn connect(ns: &'ns Netns) -> Keepalive<'ns> {
        let conn = Keepalive::open(ns);
        Keepalive {
            ns,
            conn,
            reconnects: 0,
        }
    }

    fn open(ns: &Netns) -> TcpStream {
        let addr: SocketAddr = HTTP.parse().unwrap();
        let conn = ns.enter(|| TcpStream::connect(addr)).unwrap();
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn
    }

    /// The status the edge answers for `GET /` on `host` (the body is read and dropped).
    fn status(&mut self, host: &str) -> u16 {
        match self.ask(host) {
            Ok(status) => status,
            Err(e) => {
                self.reconnects += 1;
                assert!(self.reconnects < 100, "the edge keeps closing: {e}");
                self.conn = Keepalive::open(self.ns);
                self.ask(host).unwrap()
            }
        }
    }

    fn ask(&mut self, host: &str) -> std::io::Result<u16> {
        write!(self.conn, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.conn.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let status: u16 = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        self.conn.read_exact(&mut body)?;
        if head.contains("\r\nconnection: close") {
            self.conn = Keepalive::open(self.ns);
        }
        Ok(status)
    }
}
