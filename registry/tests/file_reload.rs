//! Hot reload of the state file through the real file watcher (inotify).
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmedge_registry::{FileRegistry, Registry, RegistryError, Reload};
use vmedge_tests::eventually;

const WEB: &str = "web--6f1c2d3e000040008000000000000001.proxy.example.dev";
const API: &str = "api--6f1c2d3e000040008000000000000002.proxy.example.dev";

fn vm(n: u8, service: &str) -> Value {
    json!({
        "id": format!("6f1c2d3e-0000-4000-8000-0000000000{n:02x}"),
        "org_id": "org-1", "worker": "worker-1",
        "public_ipv6": format!("fd5e:ed00:1::{n:x}"), "status": "running",
        "services": [{"name": service, "port": 8080}],
    })
}

/// Writes the way deploy tools do: a temporary file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits for the watcher thread to act; the bound only keeps a broken build from hanging.
/// How long a change may take to show.
const WAIT: Duration = Duration::from_secs(20);

fn setup() -> (tempfile::TempDir, std::path::PathBuf, Arc<FileRegistry>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, json!({"vms": [vm(1, "web")]}).to_string()).unwrap();
    let registry = Arc::new(FileRegistry::open(&path).unwrap());
    (dir, path, registry)
}

#[tokio::test]
async fn a_change_is_seen_by_lookups_and_subscribers() {
    let (_dir, path, registry) = setup();
    let _watch = registry.watch().unwrap();
    let mut changes = registry.subscribe();
    assert!(registry.load().route_host(WEB, "example.dev").is_ok());
    assert!(registry.load().route_host(API, "example.dev").is_err());

    replace(
        &path,
        &json!({"vms": [vm(1, "web"), vm(2, "api")]}).to_string(),
    );
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changes.borrow_and_update().generation(), 2);
    assert!(registry.load().route_host(API, "example.dev").is_ok());

    // Written in place (truncate and write), as an editor without atomic save does.
    std::fs::write(&path, json!({"vms": [vm(2, "api")]}).to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(registry.load().route_host(WEB, "example.dev").is_err());
    assert_eq!(registry.status().refusals, 0);
}

#[test]
fn a_broken_file_is_refused_and_the_old_snapshot_keeps_serving() {
    let (_dir, path, registry) = setup();
    let _watch = registry.watch().unwrap();

    replace(&path, "{\"vms\": [\n  {\"id\": \n");
    eventually("syntax error refused", WAIT, || {
        registry.status().refusals == 1
    });
    let status = registry.status();
    assert_eq!(status.generation, 1);
    let why = status.last_refusal.unwrap();
    assert!(why.contains("state.json:3:1: not valid JSON"), "{why}");
    assert!(
        registry.load().route_host(WEB, "example.dev").is_ok(),
        "still serving"
    );

    let mut bad = vm(2, "api");
    bad["services"][0]["port"] = json!(80);
    let mut worse = vm(3, "Bad_Name");
    worse["public_ipv6"] = json!("not-an-address");
    // An error outside the VM objects (here an unknown field) refuses the whole document.
    replace(
        &path,
        &json!({"vms": [vm(1, "web"), bad, worse], "vm": []}).to_string(),
    );
    eventually("invalid state refused", WAIT, || {
        registry.status().refusals == 2
    });
    let why = registry.status().last_refusal.unwrap();
    assert!(why.contains("4 errors"), "every error is kept: {why}");
    assert!(why.contains("vm: unknown field"), "{why}");
    assert!(
        why.contains("vms[1].services[0].port: 80 is not allowed"),
        "{why}"
    );
    assert!(why.contains("vms[2].public_ipv6"), "{why}");
    assert!(why.contains("vms[2].services[0].name"), "{why}");
    assert_eq!(registry.load().generation(), 1);
    assert!(registry.load().route_host(WEB, "example.dev").is_ok());

    // Fixed: the next good state goes in force.
    replace(
        &path,
        &json!({"vms": [vm(1, "web"), vm(2, "api")]}).to_string(),
    );
    eventually("fixed state loaded", WAIT, || {
        registry.load().generation() == 2
    });
    assert!(registry.load().route_host(API, "example.dev").is_ok());
}

#[test]
fn a_deleted_file_keeps_the_snapshot_and_its_return_is_loaded() {
    let (_dir, path, registry) = setup();
    let _watch = registry.watch().unwrap();

    std::fs::remove_file(&path).unwrap();
    eventually("deletion noticed", WAIT, || registry.status().refusals == 1);
    assert!(registry
        .status()
        .last_refusal
        .unwrap()
        .contains("cannot read the state file"));
    assert!(registry.load().route_host(WEB, "example.dev").is_ok());

    std::fs::write(&path, json!({"vms": [vm(2, "api")]}).to_string()).unwrap();
    eventually("restored file loaded", WAIT, || {
        registry.load().generation() == 2
    });
    assert!(registry.load().route_host(API, "example.dev").is_ok());
    assert!(registry.load().route_host(WEB, "example.dev").is_err());
}

#[test]
fn a_touch_is_not_a_change() {
    let (_dir, path, registry) = setup();
    let text = std::fs::read_to_string(&path).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    replace(&path, &text);
    assert_eq!(registry.reload().unwrap(), Reload::Unchanged);
    assert_eq!(registry.load().generation(), 1);
}

#[test]
fn an_invalid_file_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, r#"{"vms": [{"id": "x"}]}"#).unwrap();
    match FileRegistry::open(&path) {
        Err(RegistryError::Invalid { errors, .. }) => assert_eq!(errors.len(), 5, "{errors}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened"),
    }
    assert!(matches!(
        FileRegistry::open(dir.path().join("missing.json")),
        Err(RegistryError::Read { .. })
    ));
}

#[test]
fn one_vms_invalid_object_keeps_its_last_good_version_while_the_others_update() {
    let (_dir, path, registry) = setup();
    let _watch = registry.watch().unwrap();
    let id = vmedge_model::VmId::parse("6f1c2d3e-0000-4000-8000-000000000001").unwrap();

    // VM 1's service port becomes invalid while VM 2 is added.
    let mut bad = vm(1, "web");
    bad["services"][0]["port"] = json!(80);
    replace(&path, &json!({"vms": [bad, vm(2, "api")]}).to_string());
    eventually("the valid part published", WAIT, || {
        registry.load().generation() == 2
    });
    let status = registry.status();
    assert_eq!(status.refusals, 0, "not a refusal of the document");
    assert_eq!(status.quarantined, [id]);
    let snapshot = registry.load();
    assert!(
        snapshot.route_host(API, "example.dev").is_ok(),
        "VM 2 added"
    );
    let web = snapshot.route_host(WEB, "example.dev").unwrap();
    assert_eq!(web.target().port(), 8080, "VM 1 as it last was");

    // Fixed: nothing is quarantined any more.
    replace(
        &path,
        &json!({"vms": [vm(1, "web"), vm(2, "api")]}).to_string(),
    );
    eventually("fixed state loaded", WAIT, || {
        registry.load().generation() == 3
    });
    assert!(registry.status().quarantined.is_empty());
}
