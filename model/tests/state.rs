//! Table tests of the state document: VMs, services, users, cross-object rules.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use serde_json::{json, Value};
use vmedge_model::{
    parse_state, parse_vm, state_from_value, Action, ModelError, Ports, Protocol, ServiceName,
    Target, VmId, VmStatus,
};

const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNNA7yX1kMFX/jhg4nDjjZIzMYhen+v3Kqzm5eEUl99";
const ED_FP: &str = "SHA256:wM1cNlDD+OgujtxVbwpi2uJfMSoS3fp2MEKjKpoh4qw";

fn vm(n: u8) -> Value {
    json!({
        "id": format!("6f1c2d3e-0000-4000-8000-0000000000{n:02x}"),
        "org_id": "org-1", "worker": "worker-1",
        "public_ipv6": format!("fd5e:ed00:1::{n:x}"), "status": "running",
        "services": [{"name": "web", "port": 8080}],
    })
}

fn state_errors(doc: Value) -> Vec<String> {
    match state_from_value(&doc) {
        Ok(p) => panic!("accepted: {:?}", p.value),
        Err(ModelError::Invalid(errors)) => errors.iter().map(|e| e.to_string()).collect(),
        Err(e) => panic!("{e}"),
    }
}

fn one_vm_errors(patch: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut v = vm(1);
    patch(&mut v);
    state_errors(json!({"vms": [v]}))
}

#[test]
fn the_example_state_is_valid_and_shows_every_feature() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/state.json"
    ))
    .unwrap();
    let parsed = parse_state(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    let state = parsed.value;
    for status in VmStatus::KNOWN {
        assert!(
            state.vms.iter().any(|v| v.status == status),
            "no VM is {status}"
        );
    }
    let demo = &state.vms[0];
    assert_eq!(
        demo.public_ipv6,
        std::net::Ipv6Addr::LOCALHOST,
        "the demo VM is at ::1"
    );
    assert!(state.vms.iter().any(|v| v.services.iter().any(|s| s.h2c)));
    assert!(state
        .vms
        .iter()
        .any(|v| v.interface.is_some() && v.ipv4.is_some()));
    assert!(state.vms.iter().any(|v| v.ssh_host_keys.is_some()));
    assert!(state.vms.iter().any(|v| v.firewall.dns.block_bypass));
    assert!(state.vms.iter().any(|v| v
        .firewall
        .egress
        .rules
        .iter()
        .any(|r| matches!(r.target, Target::Fqdn(_)))));
    assert!(state.vms.iter().any(|v| v
        .firewall
        .ingress
        .rules
        .iter()
        .any(|r| matches!(r.target, Target::Cidr(ipnet::IpNet::V4(_))))));
    assert!(state.users.iter().any(|u| u.org_ids.len() > 1));
}

#[test]
fn a_vm_with_every_field() {
    let mut v = vm(1);
    v["interface"] = json!("vmtap-1");
    v["ipv4"] = json!("198.18.0.2");
    v["ssh_host_keys"] = json!([ED]);
    v["services"] =
        json!([{"name": "web", "port": 8080}, {"name": "grpc", "port": 50051, "h2c": true}]);
    v["unknown_field_from_the_control_plane"] = json!({"anything": [1, 2]});
    v["effective_firewall"] = json!(null);
    let parsed = parse_vm(&v.to_string()).unwrap();
    let vm = parsed.value;
    assert_eq!(
        vm.id,
        VmId::parse_hex32("6f1c2d3e000040008000000000000001").unwrap()
    );
    assert_eq!(vm.interface.as_deref(), Some("vmtap-1"));
    assert_eq!(vm.ipv4, Some("198.18.0.2".parse().unwrap()));
    assert_eq!(
        vm.ssh_host_keys.as_ref().unwrap()[0]
            .fingerprint
            .to_string(),
        ED_FP
    );
    assert!(!vm.services[0].h2c, "h2c defaults to false");
    assert!(vm.services[1].h2c);
    assert_eq!(
        vm.firewall,
        Default::default(),
        "no firewall: the safe default"
    );
}

/// A change to a good VM, to make it bad in one way.
type Patch = Box<dyn FnOnce(&mut Value)>;

#[test]
fn vm_field_rules() {
    let cases: Vec<(Patch, &str)> = vec![
        (Box::new(|v| { v.as_object_mut().unwrap().remove("id"); }), "vms[0].id: is required"),
        (Box::new(|v| v["id"] = json!("vm-1")), r#"vms[0].id: "vm-1" is not a VM id (a UUID)"#),
        (Box::new(|v| v["org_id"] = json!("")), "vms[0].org_id: must not be empty"),
        (Box::new(|v| v["worker"] = json!(7)), "vms[0].worker: expected a string, found a number"),
        (Box::new(|v| v["public_ipv6"] = json!("198.18.0.1")), r#"vms[0].public_ipv6: "198.18.0.1" is not an IPv6 address"#),
        (Box::new(|v| v["public_ipv6"] = json!("::")), r#"vms[0].public_ipv6: "::" cannot be a VM's address"#),
        (Box::new(|v| v["public_ipv6"] = json!("ff02::1")), r#"vms[0].public_ipv6: "ff02::1" cannot be a VM's address"#),
        (Box::new(|v| { v.as_object_mut().unwrap().remove("status"); }), "vms[0].status: is required"),
        (Box::new(|v| v["services"] = json!({})), "vms[0].services: expected an array, found an object"),
        (Box::new(|v| v["services"][0]["name"] = json!("Web")), r#"vms[0].services[0].name: "Web" may contain only lowercase letters, digits and hyphens"#),
        (Box::new(|v| v["services"][0]["name"] = json!("a--b")), r#"vms[0].services[0].name: "a--b" must not contain two hyphens in a row"#),
        (Box::new(|v| v["services"][0]["name"] = json!("web-")), r#"vms[0].services[0].name: "web-" must not start or end with a hyphen"#),
        (Box::new(|v| v["services"][0]["name"] = json!("x".repeat(30))), r#"must be 1-29 characters"#),
        (Box::new(|v| v["services"][0]["port"] = json!(80)), "vms[0].services[0].port: 80 is not allowed: service ports are 1024-65535 (privileged ports are rejected)"),
        (Box::new(|v| v["services"][0]["port"] = json!(65536)), "vms[0].services[0].port: 65536 is not allowed"),
        (Box::new(|v| v["services"][0]["port"] = json!("8080")), r#"vms[0].services[0].port: expected a port number, found "8080""#),
        (Box::new(|v| v["services"][0]["h2c"] = json!("yes")), "vms[0].services[0].h2c: expected true or false, found a string"),
        (Box::new(|v| v["services"] = json!([{"name": "web", "port": 8080}, {"name": "web", "port": 8081}])), r#"vms[0].services[1].name: "web" is registered twice on this VM"#),
        (Box::new(|v| v["interface"] = json!("a/b")), r#"vms[0].interface: "a/b" is not an interface name"#),
        (Box::new(|v| v["interface"] = json!("x".repeat(16))), "is not an interface name"),
        (Box::new(|v| { v["interface"] = json!("tap0"); v["ipv4"] = json!("fd5e::1"); }), r#"vms[0].ipv4: "fd5e::1" is not an IPv4 address"#),
        (Box::new(|v| v["ipv4"] = json!("198.18.0.2")), r#"vms[0].ipv4: needs "interface": IPv4 traffic is attributed to a VM only through its tap"#),
        (Box::new(|v| v["ssh_host_keys"] = json!(["ssh-ed25519 AAAA"])), "vms[0].ssh_host_keys[0]: is not an OpenSSH public key"),
        (Box::new(|v| v["firewall"] = json!({"egress": {"rules": [{"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "80-"}]}})),
            r#"vms[0].firewall.egress.rules[0].ports: "80-" is not a port or a range"#),
    ];
    for (patch, want) in cases {
        let errs = one_vm_errors(patch);
        assert_eq!(errs.len(), 1, "{want}: {errs:?}");
        assert!(
            errs[0].starts_with(want) || errs[0].contains(want),
            "want {want:?}, got {errs:?}"
        );
    }
}

#[test]
fn unknown_statuses_are_kept_with_a_warning() {
    let mut v = vm(1);
    v["status"] = json!("hibernating");
    let parsed = state_from_value(&json!({"vms": [v]})).unwrap();
    assert_eq!(
        parsed.value.vms[0].status,
        VmStatus::Other("hibernating".into())
    );
    assert_eq!(
        parsed.warnings[0].to_string(),
        r#"vms[0].status: "hibernating" is not a status this build knows; treated as in transition"#
    );
}

#[test]
fn the_issue_example_path() {
    let mut vms: Vec<Value> = (1..=4).map(vm).collect();
    vms[3]["firewall"] = json!({"egress": {"rules": [
        {"action": "allow", "kind": "cidr", "value": "::/0"},
        {"action": "allow", "kind": "cidr", "value": "::/0"},
        {"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "80-"},
    ]}});
    assert_eq!(
        state_errors(json!({"vms": vms})),
        [r#"vms[3].firewall.egress.rules[2].ports: "80-" is not a port or a range"#]
    );
}

#[test]
fn every_error_in_the_document_is_reported() {
    let mut a = vm(1);
    a["public_ipv6"] = json!("nope");
    let mut b = vm(2);
    b["services"][0]["port"] = json!(22);
    b["firewall"] = json!({"dns": {"mode": "x"}});
    let user = json!({"id": "", "ssh_keys": [{"public_key": "junk"}]});
    let errs = state_errors(json!({"users": [user], "vms": [a, b], "version": 2}));
    assert_eq!(
        errs,
        [
            "users[0].id: must not be empty",
            "users[0].ssh_keys[0].public_key: is not an OpenSSH public key (<type> <base64> [comment]): length invalid",
            "version: unknown field; expected one of: users, vms",
            r#"vms[0].public_ipv6: "nope" is not an IPv6 address"#,
            "vms[1].services[0].port: 22 is not allowed: service ports are 1024-65535 (privileged ports are rejected)",
            r#"vms[1].firewall.dns.mode: expected "allow" or "deny", found "x""#,
        ]
    );
}

#[test]
fn ids_addresses_taps_and_keys_are_unique() {
    let mut twin = vm(2);
    twin["id"] = vm(1)["id"].clone();
    twin["public_ipv6"] = vm(1)["public_ipv6"].clone();
    let errs = state_errors(json!({"vms": [vm(1), twin]}));
    assert_eq!(
        errs,
        [
            "vms[1].id: 6f1c2d3e-0000-4000-8000-000000000001 is also the id of vms[0]",
            "vms[1].public_ipv6: fd5e:ed00:1::1 is also the address of vms[0]",
        ]
    );

    let mut a = vm(1);
    let mut b = vm(2);
    for v in [&mut a, &mut b] {
        v["interface"] = json!("tap0");
        v["ipv4"] = json!("198.18.0.2");
    }
    let mut c = vm(3);
    c["worker"] = json!("worker-2");
    c["interface"] = json!("tap0");
    c["ipv4"] = json!("198.18.0.2");
    assert_eq!(
        state_errors(json!({"vms": [a, b, c]})),
        [
            r#"vms[1].interface: "tap0" on worker "worker-1" is also the interface of vms[0]"#,
            r#"vms[1].ipv4: 198.18.0.2 on worker "worker-1" is also the address of vms[0]"#,
        ],
        "the same tap and IPv4 on another worker are fine"
    );

    let users = json!([
        {"id": "u-1", "org_ids": ["o"], "ssh_keys": [{"name": "a", "public_key": ED}]},
        {"id": "u-2", "org_ids": ["o"], "ssh_keys": [{"name": "b", "public_key": format!("{ED} copied")}]},
        {"id": "u-1"},
    ]);
    assert_eq!(
        state_errors(json!({"users": users})),
        [
            format!(
                r#"users[1].ssh_keys[0].public_key: the same key ({ED_FP}) is users[0].ssh_keys[0] (user "u-1"): a key identifies one user"#
            ),
            r#"users[2].id: "u-1" is also the id of users[0]"#.to_string(),
        ]
    );
}

#[test]
fn stated_fingerprints_must_match() {
    let good =
        json!({"users": [{"id": "u", "ssh_keys": [{"public_key": ED, "fingerprint": ED_FP}]}]});
    assert!(state_from_value(&good).is_ok());
    let bad = json!({"users": [{"id": "u", "ssh_keys": [{"public_key": ED, "fingerprint": "SHA256:AAAA"}]}]});
    assert_eq!(
        state_errors(bad),
        [format!(
            r#"users[0].ssh_keys[0].fingerprint: "SHA256:AAAA" is not the key's fingerprint; the key's is {ED_FP}"#
        )]
    );
}

#[test]
fn short_rsa_keys_are_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k");
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "1024", "-N", "", "-f"])
        .arg(&file)
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen refused a 1024-bit key");
    let key = std::fs::read_to_string(file.with_extension("pub")).unwrap();
    let parsed =
        state_from_value(&json!({"users": [{"id": "u", "ssh_keys": [{"public_key": key}]}]}))
            .unwrap();
    assert_eq!(
        parsed.warnings[0].to_string(),
        "users[0].ssh_keys[0].public_key: a 1024-bit RSA key: the SSH gateway refuses RSA keys under 2048 bits"
    );
}

#[test]
fn effective_policy_adds_one_ingress_allow_per_service_first() {
    let mut v = vm(1);
    v["services"] =
        json!([{"name": "web", "port": 8080}, {"name": "grpc", "port": 50051, "h2c": true}]);
    v["firewall"] = json!({"ingress": {"default": "deny", "rules": [
        {"action": "deny", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "1-65535"}]}});
    let vm = parse_vm(&v.to_string()).unwrap().value;
    let effective = vm.effective_policy();
    let rules = &effective.ingress.rules;
    assert_eq!(rules.len(), 3);
    for (rule, (name, port)) in rules.iter().zip([("web", 8080), ("grpc", 50051)]) {
        assert_eq!(rule.action, Action::Allow);
        assert_eq!(rule.protocol, Protocol::Tcp);
        assert_eq!(rule.ports, Ports::single(port));
        assert_eq!(rule.target, Target::Cidr("::/0".parse().unwrap()));
        assert_eq!(rule.description, format!("auto: proxy service {name}"));
    }
    assert_eq!(
        rules[2], vm.firewall.ingress.rules[0],
        "the user's rules follow, unchanged"
    );
    assert_eq!(effective.egress, vm.firewall.egress);
    assert!(
        vm.service(&ServiceName::parse("grpc").unwrap())
            .unwrap()
            .h2c
    );
    // It serializes in the seed's shape.
    let json = serde_json::to_value(&effective).unwrap();
    assert_eq!(
        json["ingress"]["rules"][0],
        json!({"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "8080", "description": "auto: proxy service web"})
    );
}

#[test]
fn keys_given_twice_are_errors() {
    let text = r#"{"vms": [], "vms": [], "users": [{"id": "a", "id": "b"}]}"#;
    match parse_state(text) {
        Err(ModelError::Invalid(errors)) => {
            let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            assert_eq!(
                errors,
                ["vms: is given twice", "users[0].id: is given twice"]
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_document_must_be_an_object_of_arrays() {
    for (text, want) in [
        ("[]", "expected an object, found an array"),
        ("7", "expected an object, found a number"),
        (r#"{"vms": {}}"#, "vms: expected an array, found an object"),
        (
            r#"{"users": "x"}"#,
            "users: expected an array, found a string",
        ),
    ] {
        match parse_state(text) {
            Err(ModelError::Invalid(errors)) => assert_eq!(errors.0[0].to_string(), want),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(parse_state(r#"{"vms": null, "users": null}"#).is_ok());
    assert!(parse_state("{}").is_ok());
}

#[test]
fn syntax_errors_name_line_and_column() {
    match parse_state("{\"vms\": [\n  {\"id\": }\n]}") {
        Err(ModelError::Syntax {
            line,
            column,
            message,
        }) => {
            assert_eq!((line, column), (2, 10));
            assert_eq!(message, "expected value");
        }
        other => panic!("{other:?}"),
    }
}

// ---- one VM's invalid object set aside, the rest served ----

fn with_policy(n: u8, egress_ports: &str) -> Value {
    let mut v = vm(n);
    v["firewall"] = json!({"egress": {"default": "deny", "rules": [
        {"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": egress_ports}
    ]}});
    v
}

#[test]
fn an_invalid_policy_sets_only_that_vm_aside_and_names_it() {
    let doc = json!({"vms": [with_policy(1, "443"), with_policy(2, "80-"), vm(3)]});
    let partial = vmedge_model::parse_state_isolating(&doc.to_string()).unwrap();
    let rejected = partial.rejected();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].index, 1);
    assert_eq!(
        rejected[0].id.to_string(),
        "6f1c2d3e-0000-4000-8000-000000000002"
    );
    let errors: Vec<String> = rejected[0].errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        [r#"vms[1].firewall.egress.rules[0].ports: "80-" is not a port or a range"#]
    );
    // Only the policy is wrong: with no last good version the VM is fenced, not dropped.
    let fenced = rejected[0].fenced.as_ref().unwrap();
    assert_eq!(fenced.firewall, vmedge_model::FirewallPolicy::closed());

    // The strict parse still refuses the document, with the same error.
    assert_eq!(state_errors(doc), errors);
}

#[test]
fn a_rejected_vm_stands_in_as_its_last_good_version_else_fenced_else_absent() {
    use vmedge_model::StandIn;
    let old = state_from_value(&json!({"vms": [with_policy(2, "443")]}))
        .unwrap()
        .value;
    let mut broken_addr = vm(4);
    broken_addr["public_ipv6"] = json!("not-an-address");
    let doc = json!({"vms": [with_policy(1, "22"), with_policy(2, "80-"), with_policy(3, "x"), broken_addr]});
    let resolved = vmedge_model::parse_state_isolating(&doc.to_string())
        .unwrap()
        .resolve(|id| old.vms.iter().find(|v| v.id == *id).cloned())
        .unwrap();
    let stand_ins: Vec<(usize, StandIn)> = resolved
        .quarantined
        .iter()
        .map(|q| (q.rejected.index, q.stand_in))
        .collect();
    assert_eq!(
        stand_ins,
        [
            (1, StandIn::LastGood),
            (2, StandIn::Fenced),
            (3, StandIn::Absent)
        ]
    );
    let vms = &resolved.state.vms;
    assert_eq!(vms.len(), 3, "vm 4 is new and broken: not served");
    assert_eq!(
        vms[0].firewall.egress.rules[0].ports,
        Ports::single(22),
        "updated"
    );
    assert_eq!(vms[1], old.vms[0], "vm 2 keeps its last good object whole");
    assert_eq!(vms[2].firewall, vmedge_model::FirewallPolicy::closed());
}

#[test]
fn errors_outside_one_vm_object_still_refuse_the_whole_document() {
    let isolating = |doc: Value| vmedge_model::parse_state_isolating(&doc.to_string());
    let mut no_id = with_policy(2, "80-");
    no_id["id"] = json!("vm-2");
    assert!(
        isolating(json!({"vms": [vm(1), no_id]})).is_err(),
        "unreadable id"
    );
    assert!(
        isolating(json!({"vms": [vm(1)], "extra": 1})).is_err(),
        "document shape"
    );
    let bad_user = json!({"id": "u1", "org_ids": "org-1", "ssh_keys": []});
    assert!(
        isolating(json!({"vms": [vm(1)], "users": [bad_user]})).is_err(),
        "a user"
    );

    // A stand-in that now collides with another VM refuses everything: VM 2's last good
    // address was ::2, which VM 1 has just taken.
    let old = state_from_value(&json!({"vms": [vm(2)]})).unwrap().value;
    let mut moved = vm(1);
    moved["public_ipv6"] = json!("fd5e:ed00:1::2");
    let err = isolating(json!({"vms": [moved, with_policy(2, "80-")]}))
        .unwrap()
        .resolve(|id| old.vms.iter().find(|v| v.id == *id).cloned())
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("vms[1].firewall.egress.rules[0].ports"),
        "{text}"
    );
    assert!(text.contains("is also the address of vms[0]"), "{text}");
}
