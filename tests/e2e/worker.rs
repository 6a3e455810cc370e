//! The worker agent on a real table: incremental syncs, VMs leaving, drift repaired.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmedge_firewall::{names, CompileOptions, Direction, NftBackend};
use vmedge_registry::{FileRegistry, MemoryRegistry, Registry};
use vmedge_tests::eventually;
use vmedge_tests::peers::{tcp_passes, EchoServers};
use vmedge_tests::Lab;
use vmedge_worker::{Metrics, Reconciler, Synced};

fn vm(lab: &Lab, i: usize, ports: &[u16]) -> Value {
    let host = &lab.vms[i];
    let services: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(n, p)| json!({"name": format!("s{n}"), "port": p}))
        .collect();
    json!({"id": format!("6f1c2d3e-0000-4000-8000-0000000000{i:02x}"), "org_id": "o", "worker": "w",
           "public_ipv6": host.ipv6.to_string(), "interface": host.interface, "status": "running",
           "services": services})
}

fn state(vms: Vec<Value>) -> vmedge_model::State {
    vmedge_model::state_from_value(&json!({"vms": vms}))
        .unwrap()
        .value
}

fn reconciler(
    lab: &Lab,
) -> (
    Reconciler<NftBackend>,
    Arc<Metrics>,
    prometheus_client::registry::Registry,
) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let options = CompileOptions::new(vec![IpAddr::V6(lab.worker_ipv6)]);
    (
        Reconciler::new(
            "w",
            NftBackend::in_netns(lab.worker.name()),
            options,
            metrics.clone(),
        ),
        metrics,
        registry,
    )
}

/// Writes the state the way deploy tools do: a temporary file renamed over the old one.
fn write_state(path: &Path, vms: Vec<Value>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({"vms": vms}).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits for the agent to act; the bound only keeps a broken build from hanging.
/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(20);

/// The agent as `vmedge worker` runs it: a watched state file, syncs, drift checks.
struct Agent {
    registry: Arc<FileRegistry>,
    _watch: vmedge_registry::FileWatcher,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(lab: &Lab, path: &Path, drift_interval: Duration) -> Agent {
        let registry = Arc::new(FileRegistry::open(path).unwrap());
        let watch = registry.watch().unwrap();
        let (reconciler, _, _) = reconciler(lab);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(vmedge_worker::run(
            reconciler,
            registry.clone() as Arc<dyn Registry>,
            drift_interval,
            async move {
                let _ = stopped.await;
            },
        ));
        Agent {
            registry,
            _watch: watch,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
    }
}

fn metrics_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[test]
fn syncs_are_incremental_and_take_effect() {
    let lab = Lab::new(3);
    let (a, b, net) = (&lab.vms[0], &lab.vms[1], &lab.vms[2]);
    let _servers = [
        EchoServers::start(&a.ns, &[8080, 8081], &[]),
        EchoServers::start(&b.ns, &[9000], &[]),
    ];
    let (mut reconciler, _, registry) = reconciler(&lab);
    let memory = MemoryRegistry::new(
        "test",
        state(vec![vm(&lab, 0, &[8080]), vm(&lab, 1, &[9000])]),
    );

    assert_eq!(
        reconciler.sync(&memory.load()).unwrap(),
        Synced::Full { vms: 2 }
    );
    assert_eq!(reconciler.sync(&memory.load()).unwrap(), Synced::Unchanged);
    let to = |host: &vmedge_tests::VmHost, port| SocketAddr::new(IpAddr::V6(host.ipv6), port);
    assert!(tcp_passes(&net.ns, None, to(a, 8080)));
    assert!(!tcp_passes(&net.ns, None, to(a, 8081)));

    // A's services change: only A is rewritten, and the new port opens.
    memory.publish(state(vec![
        vm(&lab, 0, &[8080, 8081]),
        vm(&lab, 1, &[9000]),
    ]));
    assert_eq!(
        reconciler.sync(&memory.load()).unwrap(),
        Synced::Incremental
    );
    assert!(tcp_passes(&net.ns, None, to(a, 8081)));
    assert!(tcp_passes(&net.ns, None, to(b, 9000)));

    // B leaves: its objects go; with no policy left, its traffic is not filtered.
    memory.publish(state(vec![vm(&lab, 0, &[8080, 8081])]));
    assert_eq!(
        reconciler.sync(&memory.load()).unwrap(),
        Synced::Incremental
    );
    let listing = NftBackend::in_netns(lab.worker.name())
        .list_table()
        .unwrap();
    assert!(!listing.contains(&b.ipv6.to_string()), "{listing}");
    assert!(listing.contains(&a.ipv6.to_string()), "{listing}");

    let text = metrics_text(&registry);
    assert!(
        text.contains(r#"vmedge_worker_syncs_total{kind="full"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vmedge_worker_syncs_total{kind="incremental"} 2"#),
        "{text}"
    );
    assert!(text.contains("vmedge_worker_vms 1"), "{text}");
}

#[test]
fn a_table_changed_by_hand_is_restored() {
    let lab = Lab::new(2);
    let (a, net) = (&lab.vms[0], &lab.vms[1]);
    let _servers = EchoServers::start(&a.ns, &[8080, 8081], &[]);
    let (mut reconciler, _, registry) = reconciler(&lab);
    let memory = MemoryRegistry::new("test", state(vec![vm(&lab, 0, &[8080])]));
    reconciler.sync(&memory.load()).unwrap();
    let blocked = SocketAddr::new(IpAddr::V6(a.ipv6), 8081);
    assert!(!tcp_passes(&net.ns, None, blocked));
    assert_eq!(
        reconciler.check_drift(&memory.load()).unwrap(),
        None,
        "no drift right after a sync"
    );

    // The ingress chain of A's shard.
    let a_chain = names::shard_chain(Direction::Ingress, names::shard_of(IpAddr::V6(a.ipv6)));
    for (what, command) in [
        (
            "flushed table",
            vec!["nft", "flush", "table", "inet", "vmedge"],
        ),
        (
            "deleted table",
            vec!["nft", "delete", "table", "inet", "vmedge"],
        ),
        (
            "flushed chain",
            vec!["nft", "flush", "chain", "inet", "vmedge", a_chain.as_str()],
        ),
    ] {
        lab.worker.sh(&command);
        assert!(
            tcp_passes(&net.ns, None, blocked),
            "{what}: the hand edit opened the port"
        );
        let drift = reconciler.check_drift(&memory.load()).unwrap();
        assert!(drift.is_some(), "{what}: drift not seen");
        assert!(!tcp_passes(&net.ns, None, blocked), "{what}: not restored");
    }
    assert!(metrics_text(&registry).contains("vmedge_worker_drift_repairs_total 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_the_state_file_and_repairs_drift_on_its_own() {
    let lab = Lab::new(2);
    let (a, net) = (&lab.vms[0], &lab.vms[1]);
    let _servers = EchoServers::start(&a.ns, &[8080, 8081], &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let write = |ports: &[u16]| write_state(&path, vec![vm(&lab, 0, ports)]);
    write(&[8080]);
    let agent = Agent::start(&lab, &path, Duration::from_millis(200));
    let port = |p| SocketAddr::new(IpAddr::V6(a.ipv6), p);
    eventually("start sync", WAIT, || {
        tcp_passes(&net.ns, None, port(8080)) && !tcp_passes(&net.ns, None, port(8081))
    });
    write(&[8080, 8081]);
    eventually("the new service's port opens", WAIT, || {
        tcp_passes(&net.ns, None, port(8081))
    });
    write(&[8080]);
    eventually("and closes again", WAIT, || {
        !tcp_passes(&net.ns, None, port(8081))
    });
    // Someone flushes the table: the agent restores it on its next check.
    lab.worker.sh(&["nft", "flush", "table", "inet", "vmedge"]);
    eventually("drift repaired", WAIT, || {
        let listing = lab
            .worker
            .sh(&["nft", "list", "chain", "inet", "vmedge", "forward"]);
        String::from_utf8_lossy(&listing.stdout).contains("jump egress")
    });
    assert!(!tcp_passes(&net.ns, None, port(8081)));
    agent.stop().await;
    // Stopping the agent leaves the rules in the kernel.
    assert!(!tcp_passes(&net.ns, None, port(8081)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_holds_back_only_its_own_vm() {
    let lab = Lab::new(4);
    let (a, b, c, net) = (&lab.vms[0], &lab.vms[1], &lab.vms[2], &lab.vms[3]);
    let _servers = [
        EchoServers::start(&a.ns, &[8080, 8081], &[]),
        EchoServers::start(&b.ns, &[9000, 9001], &[]),
        EchoServers::start(&c.ns, &[7000, 7001], &[]),
        EchoServers::start(&net.ns, &[6000], &[]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let write = |vms: Vec<Value>| write_state(&path, vms);
    let broken = |mut vm: Value| {
        vm["firewall"] = json!({"ingress": {"rules": [
            {"action": "allow", "kind": "cidr", "value": "::/0", "ports": "80-"}
        ]}});
        vm
    };
    write(vec![vm(&lab, 0, &[8080]), vm(&lab, 1, &[9000])]);
    let agent = Agent::start(&lab, &path, Duration::from_secs(30));
    let to = |host: &vmedge_tests::VmHost, p| SocketAddr::new(IpAddr::V6(host.ipv6), p);
    eventually("start sync", WAIT, || {
        !tcp_passes(&net.ns, None, to(b, 9001))
    });
    assert!(
        tcp_passes(&net.ns, None, to(c, 7001)),
        "C is in no state yet: unfiltered"
    );

    // A's policy breaks while its services grow, B grows, and C arrives with a broken
    // policy: B is updated, A keeps its last good rules, C is fenced.
    write(vec![
        broken(vm(&lab, 0, &[8080, 8081])),
        vm(&lab, 1, &[9000, 9001]),
        broken(vm(&lab, 2, &[7000])),
    ]);
    eventually("B updated", WAIT, || tcp_passes(&net.ns, None, to(b, 9001)));
    assert_eq!(agent.registry.status().quarantined.len(), 2);
    assert!(
        tcp_passes(&net.ns, None, to(a, 8080)),
        "A's last good rules"
    );
    assert!(
        !tcp_passes(&net.ns, None, to(a, 8081)),
        "A's invalid object is not applied"
    );
    assert!(
        tcp_passes(&net.ns, None, to(c, 7000)),
        "C fenced: its service port only"
    );
    assert!(!tcp_passes(&net.ns, None, to(c, 7001)), "C fenced: ingress");
    assert!(!tcp_passes(&c.ns, None, to(net, 6000)), "C fenced: egress");

    // A's policy fixed: its new service opens.
    write(vec![
        vm(&lab, 0, &[8080, 8081]),
        vm(&lab, 1, &[9000, 9001]),
        vm(&lab, 2, &[7000]),
    ]);
    eventually("A updated", WAIT, || tcp_passes(&net.ns, None, to(a, 8081)));
    assert!(agent.registry.status().quarantined.is_empty());
    assert!(tcp_passes(&c.ns, None, to(net, 6000)), "C's own policy now");
    agent.stop().await;
}
