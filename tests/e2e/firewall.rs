//! The firewall with real packets: a worker namespace routes between VM namespaces and
//! an "internet" host (the lab's last VM namespace, in no state, so no policy applies to
//! it). Each case is also put to `explain`, which must agree with the kernel.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde_json::{json, Value};
use vmedge_firewall::canonical::PacketProto;
use vmedge_firewall::{
    compile, explain, CompileOptions, Direction, FirewallBackend, FirewallError, NftBackend, Packet,
};
use vmedge_model::{Action, State, Vm};
use vmedge_tests::peers::{echo_round_trip, tcp_open, tcp_passes, udp_passes, EchoServers};
use vmedge_tests::{Lab, Netns, VmHost};

const A: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
const B: &str = "3b8f6a10-1111-4000-8000-0000000000bb";
const C: &str = "c4d2e1f0-3333-4000-8000-0000000000cc";

/// VM A: a tap and IPv4; ingress deny with rules; egress deny with cidr allows.
/// VM B: found by address; egress allow with block_bypass. VM C: the seed 002 shape.
fn state(lab: &Lab, a_egress_80: bool) -> Value {
    let (a, b, c, net) = (&lab.vms[0], &lab.vms[1], &lab.vms[2], &lab.vms[3]);
    let mut a_egress = vec![
        json!({"action": "allow", "kind": "cidr", "value": format!("{}/128", net.ipv6), "protocol": "udp", "ports": "7000"}),
        json!({"action": "allow", "kind": "fqdn", "value": "*.example.test", "protocol": "tcp", "ports": "443"}),
    ];
    if a_egress_80 {
        a_egress.push(json!({"action": "allow", "kind": "cidr", "value": format!("{}/32", net.ipv4), "protocol": "tcp", "ports": "80"}));
        a_egress.push(json!({"action": "allow", "kind": "cidr", "value": format!("{}/128", net.ipv6), "protocol": "tcp", "ports": "80"}));
    }
    json!({"vms": [
        {"id": A, "org_id": "o", "worker": "w", "public_ipv6": a.ipv6.to_string(),
         "interface": a.interface, "ipv4": a.ipv4.to_string(), "status": "running",
         "services": [{"name": "web", "port": 8080}],
         "firewall": {
            "ingress": {"default": "deny", "rules": [
                {"action": "allow", "kind": "cidr", "value": format!("{}/128", net.ipv6), "protocol": "tcp", "ports": "2222"},
                {"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "udp", "ports": "5000-5010"},
                {"action": "allow", "kind": "cidr", "value": format!("{}/32", net.ipv4), "protocol": "tcp", "ports": "any"}]},
            "egress": {"default": "deny", "rules": a_egress}}},
        {"id": B, "org_id": "o", "worker": "w", "public_ipv6": b.ipv6.to_string(), "status": "running",
         "services": [{"name": "api", "port": 9000}],
         "firewall": {"dns": {"mode": "deny", "domains": [], "block_bypass": true}}},
        {"id": C, "org_id": "o", "worker": "w", "public_ipv6": c.ipv6.to_string(), "interface": c.interface, "status": "running",
         "firewall": {"mode": "restricted", "ingress": [
            {"protocol": "tcp", "port_start": 6000, "port_end": 6010, "source_cidrs": [format!("{}/128", net.ipv6)]}]}}
    ]})
}

fn parse(doc: &Value) -> State {
    vmedge_model::state_from_value(doc)
        .unwrap_or_else(|e| panic!("{e}"))
        .value
}

struct Setup {
    lab: Lab,
    backend: NftBackend,
    options: CompileOptions,
    doh_addr: Ipv6Addr,
    _servers: Vec<EchoServers>,
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::new(4);
        let net = &lab.vms[3];
        // A second "internet" address that plays a public DoH resolver.
        let doh_addr = Ipv6Addr::from(u128::from(net.ipv6) + 0x97);
        // Deprecated (preferred_lft 0): reachable, but never picked as a source address.
        net.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{doh_addr}/64"),
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        ]);
        // A spoofing test needs an address on A's link that is not A's.
        let spoof = Ipv6Addr::from(u128::from(lab.vms[0].ipv6) + 0x64);
        lab.vms[0].ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{spoof}/64"),
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        ]);
        let servers = vec![
            EchoServers::start(&net.ns, &[53, 80, 81, 443, 853], &[53, 7000, 7001]),
            EchoServers::start(&lab.vms[0].ns, &[2222, 5005, 8080, 8081], &[5005]),
            EchoServers::start(&lab.vms[1].ns, &[2222, 9000, 9001], &[]),
            EchoServers::start(&lab.vms[2].ns, &[6005, 6011], &[]),
            // On the gate address itself, so UDP replies come from the address asked.
            EchoServers::start_on(&lab.worker, IpAddr::V6(lab.worker_ipv6), &[53], &[53]),
        ];
        let options = CompileOptions {
            dns_gates: vec![IpAddr::V6(lab.worker_ipv6)],
            doh: vec![IpAddr::V6(doh_addr).into()],
        };
        let backend = NftBackend::in_netns(lab.worker.name());
        backend
            .check_version()
            .expect("nftables is installed and new enough");
        Setup {
            lab,
            backend,
            options,
            doh_addr,
            _servers: servers,
        }
    }

    fn apply(&self, state: &State) {
        let ruleset = compile("w", state.vms.iter(), &self.options);
        self.backend
            .apply(&ruleset)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[derive(Clone, Copy, Debug)]
enum Probe {
    Tcp,
    Udp,
}

/// One packet flow: from a host to an address and port, and what each VM's policy says.
struct Case<'a> {
    what: &'a str,
    from: &'a VmHost,
    source: Option<IpAddr>,
    to: SocketAddr,
    probe: Probe,
    expect: bool,
}

/// Every VM policy the flow crosses, as `explain` sees it.
fn explained(state: &State, setup: &Setup, case: &Case) -> Vec<(String, Action)> {
    let proto = match case.probe {
        Probe::Tcp => PacketProto::Tcp,
        Probe::Udp => PacketProto::Udp,
    };
    let vm_of =
        |host: &VmHost| -> Option<&Vm> { state.vms.iter().find(|v| v.public_ipv6 == host.ipv6) };
    let to_host = setup
        .lab
        .vms
        .iter()
        .find(|h| IpAddr::V6(h.ipv6) == case.to.ip() || IpAddr::V4(h.ipv4) == case.to.ip());
    let from_ip = case.source.unwrap_or(match case.to.ip() {
        IpAddr::V4(_) => IpAddr::V4(case.from.ipv4),
        IpAddr::V6(_) => IpAddr::V6(case.from.ipv6),
    });
    let mut verdicts = Vec::new();
    if let Some(vm) = vm_of(case.from) {
        let p = Packet {
            direction: Direction::Egress,
            remote: case.to.ip(),
            proto,
            port: case.to.port(),
        };
        let e = explain(vm, &setup.options, &p, &|_, _| false);
        verdicts.push((format!("egress of {}: {e}", vm.id), e.action));
    }
    if let Some(vm) = to_host.and_then(vm_of) {
        let p = Packet {
            direction: Direction::Ingress,
            remote: from_ip,
            proto,
            port: case.to.port(),
        };
        let e = explain(vm, &setup.options, &p, &|_, _| false);
        verdicts.push((format!("ingress of {}: {e}", vm.id), e.action));
    }
    verdicts
}

fn run_cases(setup: &Setup, state: &State, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let passed = match case.probe {
            Probe::Tcp => tcp_passes(&case.from.ns, case.source, case.to),
            Probe::Udp => udp_passes(&case.from.ns, case.source, case.to),
        };
        let verdicts = explained(state, setup, case);
        // The worker's own gate is not behind the forward hook: explain speaks for VMs only.
        let by_explain = verdicts.iter().all(|(_, a)| *a == Action::Allow);
        if passed != case.expect || (case.source.is_none() && by_explain != passed) {
            failures.push(format!(
                "{}: {:?} to {} got through = {passed}, expected {}; explain: {verdicts:?}",
                case.what, case.probe, case.to, case.expect
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn policies_are_enforced_on_real_packets_and_explain_agrees() {
    let setup = Setup::new();
    let state = parse(&state(&setup.lab, true));
    setup.apply(&state);
    let (a, b, c, net) = (
        &setup.lab.vms[0],
        &setup.lab.vms[1],
        &setup.lab.vms[2],
        &setup.lab.vms[3],
    );
    let spoof = IpAddr::V6(Ipv6Addr::from(u128::from(a.ipv6) + 0x64));
    use Probe::*;
    let cases = [
        // Ingress: default deny, the service's auto-rule lets only its port in.
        Case {
            what: "service port of A",
            from: net,
            source: None,
            to: at(a.ipv6, 8080),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "another port of A",
            from: net,
            source: None,
            to: at(a.ipv6, 8081),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "service port of B (by address)",
            from: net,
            source: None,
            to: at(b.ipv6, 9000),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "another port of B",
            from: net,
            source: None,
            to: at(b.ipv6, 9001),
            probe: Tcp,
            expect: false,
        },
        // cidr rules: single port from one address, a range for udp, tcp any from IPv4.
        Case {
            what: "ssh to A from the allowed address",
            from: net,
            source: None,
            to: at(a.ipv6, 2222),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "ssh to A from B (not in the cidr)",
            from: b,
            source: None,
            to: at(a.ipv6, 2222),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "udp in A's range",
            from: net,
            source: None,
            to: at(a.ipv6, 5005),
            probe: Udp,
            expect: true,
        },
        Case {
            what: "tcp on A's udp range",
            from: net,
            source: None,
            to: at(a.ipv6, 5005),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "any tcp port to A over IPv4 from the allowed address",
            from: net,
            source: None,
            to: at(a.ipv4, 8081),
            probe: Tcp,
            expect: true,
        },
        // Egress: default deny with cidr allows, IPv4 and IPv6; replies come back.
        Case {
            what: "A to port 80 over IPv4",
            from: a,
            source: None,
            to: at(net.ipv4, 80),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "A to port 80 over IPv6",
            from: a,
            source: None,
            to: at(net.ipv6, 80),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "A to port 81",
            from: a,
            source: None,
            to: at(net.ipv6, 81),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "A udp 7000 over IPv6",
            from: a,
            source: None,
            to: at(net.ipv6, 7000),
            probe: Udp,
            expect: true,
        },
        Case {
            what: "A udp 7001",
            from: a,
            source: None,
            to: at(net.ipv6, 7001),
            probe: Udp,
            expect: false,
        },
        // Anti-spoof: the same flow from an address that is not A's.
        Case {
            what: "A to port 80 from a spoofed source",
            from: a,
            source: Some(spoof),
            to: at(net.ipv6, 80),
            probe: Tcp,
            expect: false,
        },
        // DNS only to the gate, even for a VM whose egress allows everything.
        Case {
            what: "B dns (udp) to the internet",
            from: b,
            source: None,
            to: at(net.ipv6, 53),
            probe: Udp,
            expect: false,
        },
        Case {
            what: "B dns (tcp) to the internet",
            from: b,
            source: None,
            to: at(net.ipv6, 53),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "B dns (udp) to the gate",
            from: b,
            source: None,
            to: at(setup.lab.worker_ipv6, 53),
            probe: Udp,
            expect: true,
        },
        Case {
            what: "B dns (tcp) to the gate",
            from: b,
            source: None,
            to: at(setup.lab.worker_ipv6, 53),
            probe: Tcp,
            expect: true,
        },
        // block_bypass: DoT and a listed DoH address dropped; other HTTPS passes.
        Case {
            what: "B DoT",
            from: b,
            source: None,
            to: at(net.ipv6, 853),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "B to a DoH resolver",
            from: b,
            source: None,
            to: at(setup.doh_addr, 443),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "B to other HTTPS",
            from: b,
            source: None,
            to: at(net.ipv6, 443),
            probe: Tcp,
            expect: true,
        },
        // The seed 002 shape: restricted, tcp 6000-6010 from one address.
        Case {
            what: "legacy C in range",
            from: net,
            source: None,
            to: at(c.ipv6, 6005),
            probe: Tcp,
            expect: true,
        },
        Case {
            what: "legacy C out of range",
            from: net,
            source: None,
            to: at(c.ipv6, 6011),
            probe: Tcp,
            expect: false,
        },
        Case {
            what: "legacy C from B",
            from: b,
            source: None,
            to: at(c.ipv6, 6005),
            probe: Tcp,
            expect: false,
        },
    ];
    run_cases(&setup, &state, &cases);
}

#[test]
fn open_connections_survive_policy_changes_and_new_ones_follow_the_new_policy() {
    let setup = Setup::new();
    let (a, net) = (&setup.lab.vms[0], &setup.lab.vms[3]);
    let before = parse(&state(&setup.lab, true));
    setup.apply(&before);
    let mut open = tcp_open(&a.ns, None, at(net.ipv6, 80)).expect("allowed before the change");
    assert!(echo_round_trip(&mut open));

    // An unrelated change (B's policy), then A's own allow removed: both re-applied.
    let mut unrelated = state(&setup.lab, true);
    unrelated["vms"][1]["firewall"]["egress"] = json!({"default": "deny", "rules": []});
    setup.apply(&parse(&unrelated));
    assert!(
        echo_round_trip(&mut open),
        "the open connection survives an unrelated change"
    );
    let after = parse(&state(&setup.lab, false));
    setup.apply(&after);
    assert!(
        echo_round_trip(&mut open),
        "established flows are not cut by a re-apply"
    );
    assert!(
        !tcp_passes(&a.ns, None, at(net.ipv6, 80)),
        "a new connection follows the new policy"
    );
}

#[test]
fn the_legacy_shape_compiles_to_the_same_rules_as_its_converted_form() {
    let lab = Lab::new(4);
    let doc = state(&lab, true);
    let legacy = parse(&doc);
    let mut converted = doc.clone();
    let policy = serde_json::to_value(&legacy.vms[2].firewall).unwrap();
    converted["vms"][2]["firewall"] = policy;
    let options = CompileOptions::new(vec![IpAddr::V6(lab.worker_ipv6)]);
    assert_eq!(
        compile("w", legacy.vms.iter(), &options),
        compile("w", parse(&converted).vms.iter(), &options)
    );
}

#[test]
fn a_refused_transaction_changes_nothing_and_names_the_line() {
    let setup = Setup::new();
    let state = parse(&state(&setup.lab, true));
    setup.apply(&state);
    let (a, net) = (&setup.lab.vms[0], &setup.lab.vms[3]);
    let listing = |ns: &Netns| {
        String::from_utf8_lossy(&ns.sh(&["nft", "list", "table", "inet", "vmedge"]).stdout)
            .into_owned()
    };
    let before = listing(&setup.lab.worker);

    let mut ruleset = compile("w", state.vms.iter().take(1), &setup.options);
    ruleset
        .text
        .push_str("add rule inet vmedge forward ip6 saddr @no_such_set drop\n");
    let line_no = ruleset.text.lines().count();
    match setup.backend.apply(&ruleset) {
        Err(FirewallError::Refused { message, line }) => {
            assert!(!message.is_empty());
            assert_eq!(
                line,
                Some((
                    line_no,
                    "add rule inet vmedge forward ip6 saddr @no_such_set drop".to_string()
                ))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        listing(&setup.lab.worker),
        before,
        "the previous ruleset is still in force"
    );
    assert!(tcp_passes(&a.ns, None, at(net.ipv6, 80)));
}

#[test]
fn vms_that_leave_lose_their_objects() {
    let setup = Setup::new();
    let state = parse(&state(&setup.lab, true));
    setup.apply(&state);
    // A VM's objects are its entries in the shared maps and sets, keyed by its address.
    let c = setup.lab.vms[2].ipv6.to_string();
    let a = setup.lab.vms[0].ipv6.to_string();
    let listing = setup.backend.list_table().unwrap();
    assert!(listing.contains(&c), "{listing}");
    let maps_before = setup.backend.live_objects().unwrap();
    let fewer = State {
        users: vec![],
        vms: state
            .vms
            .iter()
            .filter(|v| v.id.to_string() != C)
            .cloned()
            .collect(),
    };
    setup.apply(&fewer);
    let listing = setup.backend.list_table().unwrap();
    assert!(!listing.contains(&c), "{listing}");
    assert!(listing.contains(&a), "{listing}");
    // What is left is what the remaining VMs need, nothing more: C's sets went with it.
    let c_shard = vmedge_firewall::names::shard_of(IpAddr::V6(setup.lab.vms[2].ipv6));
    let prefix = format!("in_s{c_shard}_b");
    assert!(
        maps_before.iter().any(|n| n.starts_with(&prefix)),
        "{maps_before:?}"
    );
    let sections = vmedge_firewall::compile_sections(&fewer.vms);
    let expected = vmedge_firewall::compile::table_shape(&sections, &setup.options).objects;
    assert_eq!(setup.backend.live_objects().unwrap(), expected);
    // C is now in no policy at all: traffic to it is not filtered.
    assert!(tcp_passes(
        &setup.lab.vms[3].ns,
        None,
        at(setup.lab.vms[2].ipv6, 6011)
    ));
}

#[test]
fn diff_is_empty_after_an_apply_and_shows_a_change() {
    let setup = Setup::new();
    let doc = state(&setup.lab, true);
    let applied = parse(&doc);
    setup.apply(&applied);
    let scratch_listing = |state: &State| {
        let scratch = Lab::new(0);
        let nft = NftBackend::in_netns(scratch.worker.name());
        nft.run(&compile("w", state.vms.iter(), &setup.options).text)
            .unwrap();
        nft.list_table().unwrap()
    };
    let live = setup.backend.list_table().unwrap();
    assert_eq!(
        vmedge_firewall::diff::diff_listings(&live, &scratch_listing(&applied)),
        ""
    );

    let mut changed = doc.clone();
    changed["vms"][0]["services"][0]["port"] = json!(8088);
    let diff = vmedge_firewall::diff::diff_listings(&live, &scratch_listing(&parse(&changed)));
    assert!(
        diff.contains("-") && diff.contains(". 8080") && diff.contains(". 8088"),
        "{diff}"
    );
}

/// A worker upgraded in place takes over the table an older version wrote (per-VM
/// chains, dispatch maps that jump to them, block sets): one full sync replaces it. An
/// fqdn set under the name this version gives it keeps what the DNS gate put there; one
/// under an older version's name (the VM id in hex) is deleted.
#[test]
fn a_table_of_the_per_vm_chain_layout_is_taken_over() {
    let setup = Setup::new();
    let (a, net) = (&setup.lab.vms[0], &setup.lab.vms[3]);
    let applied = parse(&state(&setup.lab, true));
    let vm = &applied.vms[0];
    let hex = vm.id.hex();
    let pattern = vmedge_model::DomainPattern::parse("*.example.test").unwrap();
    let fq = vmedge_firewall::fqdn_sets(vm, &pattern).v6;
    let tap = a.interface.clone();
    let old = format!(
        "add table inet vmedge
add chain inet vmedge forward {{ type filter hook forward priority filter; policy accept; }}
add map inet vmedge egress_by_if {{ type ifname : verdict; }}
add map inet vmedge ingress_by_if {{ type ifname : verdict; }}
add set inet vmedge in_b0_tcp6_s1 {{ type ipv6_addr . ipv6_addr . inet_service; flags interval; }}
add set inet vmedge {fq} {{ type ipv6_addr; flags timeout; }}
add element inet vmedge {fq} {{ {} timeout 1h }}
add set inet vmedge fq_{hex}_63a47daa1aeccd41_4 {{ type ipv4_addr; flags timeout; }}
add chain inet vmedge in_{hex}
add rule inet vmedge in_{hex} ip6 daddr . ip6 saddr . tcp dport @in_b0_tcp6_s1 return
add rule inet vmedge in_{hex} counter drop
add chain inet vmedge out_{hex}
add rule inet vmedge out_{hex} ip6 daddr @{fq} return
add element inet vmedge egress_by_if {{ \"{tap}\" : jump out_{hex} }}
add element inet vmedge ingress_by_if {{ \"{tap}\" : jump in_{hex} }}
add rule inet vmedge forward iifname vmap @egress_by_if
add rule inet vmedge forward oifname vmap @ingress_by_if
",
        net.ipv6
    );
    setup.backend.run(&old).unwrap_or_else(|e| panic!("{e}"));
    setup.apply(&applied);
    let sections = vmedge_firewall::compile_sections(&applied.vms);
    let expected = vmedge_firewall::compile::table_shape(&sections, &setup.options).objects;
    assert_eq!(setup.backend.live_objects().unwrap(), expected);
    let listing = setup.backend.list_table().unwrap();
    assert!(!listing.contains("egress_by_if"), "{listing}");
    assert!(
        tcp_passes(&a.ns, None, at(net.ipv6, 443)),
        "the fqdn set kept the DNS gate's address"
    );
}

#[test]
fn a_re_apply_never_empties_the_dns_gates_fqdn_sets() {
    let setup = Setup::new();
    let (a, net) = (&setup.lab.vms[0], &setup.lab.vms[3]);
    let applied = parse(&state(&setup.lab, true));
    setup.apply(&applied);
    let vm = &applied.vms[0];
    let pattern = vmedge_model::DomainPattern::parse("*.example.test").unwrap();
    let sets = vmedge_firewall::fqdn_sets(vm, &pattern);
    // What the DNS gate does: the resolved address, with a timeout.
    setup.lab.worker.sh(&[
        "nft",
        "add",
        "element",
        "inet",
        "vmedge",
        &sets.v6,
        &format!("{{ {} timeout 1h }}", net.ipv6),
    ]);
    assert!(
        tcp_passes(&a.ns, None, at(net.ipv6, 443)),
        "the fqdn rule lets A reach the resolved address"
    );

    let holds = || {
        let out = setup
            .lab
            .worker
            .sh(&["nft", "list", "set", "inet", "vmedge", &sets.v6]);
        String::from_utf8_lossy(&out.stdout).contains(&net.ipv6.to_string())
    };
    // A full re-apply, and an incremental one that rewrites A's chain.
    setup.apply(&applied);
    assert!(holds(), "a full re-apply kept the element");
    let mut registry = prometheus_client::registry::Registry::default();
    let mut reconciler = vmedge_worker::Reconciler::new(
        "w",
        NftBackend::in_netns(setup.lab.worker.name()),
        setup.options.clone(),
        vmedge_worker::Metrics::register(&mut registry),
    );
    let memory = vmedge_registry::MemoryRegistry::new("test", applied.clone());
    use vmedge_registry::Registry;
    reconciler.sync(&memory.load()).unwrap();
    memory.publish(parse(&state(&setup.lab, false)));
    assert_eq!(
        reconciler.sync(&memory.load()).unwrap(),
        vmedge_worker::Synced::Incremental
    );
    assert!(
        holds(),
        "an incremental sync of the same VM kept the element"
    );
    assert!(tcp_passes(&a.ns, None, at(net.ipv6, 443)));
}

/// An incremental update sent over netlink leaves the same table as the same update
/// through `nft -f`: the two spellings of one change agree, rule by rule and element by
/// element (every rule form, both families, taps and addresses, VMs coming and going).
#[test]
fn a_netlink_update_leaves_the_same_table_as_nft_text() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/state.json"
    ))
    .unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    for vm in doc["vms"].as_array_mut().unwrap() {
        vm["worker"] = json!("w");
    }
    let before = parse(&doc);
    let mut changed = doc.clone();
    {
        let vms = changed["vms"].as_array_mut().unwrap();
        // A policy from another VM, a VM gone, a VM that loses its tap, a new VM.
        vms[0]["firewall"] = vms[1]["firewall"].clone();
        vms[0]["services"] = json!([{"name": "web", "port": 8001}, {"name": "api", "port": 9443}]);
        let mut new_vm = vms[1].clone();
        new_vm["id"] = json!("6f1c2d3e-0000-4000-8000-0000000000ff");
        new_vm["public_ipv6"] = json!("fd5e:ed00:ff::ff");
        new_vm["interface"] = json!("vmtap-ff");
        new_vm["ipv4"] = json!("198.18.255.255");
        vms[1].as_object_mut().unwrap().remove("interface");
        vms[1].as_object_mut().unwrap().remove("ipv4");
        vms.remove(2);
        vms.push(new_vm);
    }
    let after = parse(&changed);
    let options = CompileOptions::new(vec![IpAddr::V6("fd5e:ed00:ff::53".parse().unwrap())]);
    let sections = |state: &State| -> std::collections::BTreeMap<_, _> {
        state
            .vms
            .iter()
            .map(|vm| (vm.id, vmedge_firewall::compile_vm(vm)))
            .collect()
    };
    let (s_before, s_after) = (sections(&before), sections(&after));

    let by_netlink = Lab::new(0);
    let by_text = Lab::new(0);
    let netlink = NftBackend::in_netns(by_netlink.worker.name());
    let text_only = NftBackend::in_netns(by_text.worker.name()).without_netlink();
    for nft in [&netlink, &text_only] {
        nft.apply(&compile("w", before.vms.iter(), &options))
            .unwrap();
    }
    let mut forms = std::collections::BTreeSet::new();
    for (from, to) in [(&s_before, &s_after), (&s_after, &s_before)] {
        let update = vmedge_firewall::update(from, to, &options).unwrap();
        for op in &update.ops {
            // Each kind of step, by name: `AddBlockSet`, `Chain`, ...
            let form = format!("{op:?}");
            let name = form.find(['(', ' ']).unwrap_or(form.len());
            forms.insert(form[..name].to_string());
        }
        netlink.apply_update(&update).unwrap();
        text_only.apply_update(&update).unwrap();
        let (a, b) = (
            netlink.list_table().unwrap(),
            text_only.list_table().unwrap(),
        );
        assert_eq!(
            vmedge_firewall::diff::diff_listings(&a, &b),
            "",
            "netlink and nft -f disagree"
        );
        assert!(a.contains("fqdn "), "the states exercise fqdn rules: {a}");
    }
    for form in [
        "AddBlockSet",
        "DeleteBlockSet",
        "Chain",
        "AddElements",
        "DeleteElements",
        "AddMember",
        "DeleteMember",
        "AddFqdnSet",
    ] {
        assert!(
            forms.contains(form),
            "the change exercises {form}: {forms:?}"
        );
    }
    assert_eq!(netlink.netlink_updates(), 2, "both went over netlink");
    assert_eq!(text_only.netlink_updates(), 0);
}
