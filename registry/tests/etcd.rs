//! The etcd registry against a real three-member cluster (Debian's etcd-server) on a
//! namespace's loopback: the paths the fleet e2e test cannot force.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmedge_model::VmId;
use vmedge_registry::{EtcdRegistry, Registry, RegistryError};
use vmedge_tests::etcd::EtcdCluster;
use vmedge_tests::eventually;
use vmedge_tests::{enter_netns, Lab};

const A: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
const B: &str = "6f1c2d3e-0000-4000-8000-0000000000bb";

fn vm(id: &str, addr: &str, port: u16) -> String {
    json!({"id": id, "org_id": "o", "worker": "w", "public_ipv6": addr, "status": "running",
           "services": [{"name": "web", "port": port}]})
    .to_string()
}

/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_watch_that_starts_behind_a_compaction_resyncs_in_full() {
    let lab = Lab::new(0);
    let etcd = EtcdCluster::start(&lab.worker);
    // This thread and the watch thread it starts talk to etcd inside the namespace.
    enter_netns(lab.worker.name());
    etcd.put(&format!("/vmedge/vms/{A}"), &vm(A, "fd5e:ed00::a", 8080));
    let registry = Arc::new(EtcdRegistry::open(etcd.endpoints()).unwrap());
    assert_eq!(registry.load().vms().len(), 1);

    // While nobody watches: A changes, B arrives, and the history is compacted away, so
    // the watch from the revision the registry loaded cannot be served.
    etcd.put(&format!("/vmedge/vms/{A}"), &vm(A, "fd5e:ed00::a", 9090));
    etcd.put(&format!("/vmedge/vms/{B}"), &vm(B, "fd5e:ed00::b", 8080));
    let status = etcd.ctl(&["endpoint", "status", "-w", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let revision = status[0]["Status"]["header"]["revision"].as_u64().unwrap();
    etcd.ctl(&["compact", &revision.to_string()]);

    let _watch = registry.watch().unwrap();
    let a = VmId::parse(A).unwrap();
    eventually("the registry reads everything again", WAIT, || {
        let snapshot = registry.load();
        snapshot.vms().len() == 2
            && snapshot
                .vm(&a)
                .is_some_and(|vm| vm.services[0].port == 9090)
    });
    let status = registry.status();
    assert_eq!(status.resyncs, 1, "{status:?}");
    assert!(status.source_up(), "{status:?}");
    assert_eq!(registry.revision(), revision as i64);
}

#[test]
fn no_member_answering_at_start_is_an_error_naming_each() {
    let lab = Lab::new(0);
    enter_netns(lab.worker.name());
    // Nothing listens on these ports in a fresh namespace: refused at once.
    let endpoints = vec![
        "http://127.0.0.1:23791".to_string(),
        "http://127.0.0.1:23792".to_string(),
    ];
    let error = match EtcdRegistry::open(endpoints) {
        Err(e @ RegistryError::Etcd { .. }) => e.to_string(),
        Err(e) => panic!("not an etcd error: {e}"),
        Ok(_) => panic!("opened with no etcd"),
    };
    assert!(
        error.starts_with("etcd http://127.0.0.1:23791,http://127.0.0.1:23792: ")
            && error.contains("http://127.0.0.1:23791: ")
            && error.contains("; http://127.0.0.1:23792: "),
        "{error}"
    );
}
