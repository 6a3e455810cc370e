//! The DNS gate with real peers: `dig` in VM namespaces, NSD as the upstream, the worker's
//! real nftables table for fqdn rules.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmedge_dns::{GateConfig, UpstreamConfig};
use vmedge_firewall::netlink::{encode_fqdn_elements, Batch, FqdnElement, NetlinkSocket};
use vmedge_firewall::{CompileOptions, NftBackend};
use vmedge_model::DomainPattern;
use vmedge_registry::{MemoryRegistry, Registry};
use vmedge_tests::gate::GateInNetns;
use vmedge_tests::peers::{tcp_passes, EchoServers, Nsd};
use vmedge_tests::{Lab, Netns};
use vmedge_worker::{Metrics as WorkerMetrics, Reconciler};

const ZONE: &str = "vmedge.test";
const UPSTREAM_PORT: u16 = 5300;

/// The test zone: `api` points at VM 1 (TTL 2 s), `other` at VM 2, `alias` is a CNAME to
/// `api`, `evil` a CNAME to a name VM 0 blocks, `big` too large for one datagram.
fn zone(lab: &Lab) -> String {
    let (vm1, vm2) = (lab.vms[1].ipv6, lab.vms[2].ipv6);
    let big: String = (0..8)
        .map(|i| format!("big IN TXT \"{}\"\n", format!("{i}").repeat(200)))
        .collect();
    let many: String = (1..=6)
        .map(|i| format!("many IN A 198.18.2.{i}\n"))
        .collect();
    format!(
        "$ORIGIN {ZONE}.\n$TTL 300\n\
         @ IN SOA ns hostmaster 1 3600 600 86400 5\n@ IN NS ns\nns IN A 198.18.0.1\n\
         www IN A 198.18.0.5\nwww IN AAAA {vm2}\nwww IN MX 10 mail\nwww IN TXT \"hello\"\n\
         api 2 IN AAAA {vm1}\napi IN HTTPS 1 . alpn=h2 ipv6hint={vm1}\n\
         other IN AAAA {vm2}\nalias IN CNAME api\nevil IN CNAME blocked\n\
         blocked IN AAAA {vm2}\nsub IN A 198.18.0.6\na.sub IN A 198.18.0.7\n\
         short 1 IN A 198.18.0.8\nprivate IN A 10.1.2.3\nprivate IN A 198.18.0.9\n{many}{big}"
    )
}

fn vm(lab: &Lab, i: usize, ports: &[u16], firewall: Value) -> Value {
    let host = &lab.vms[i];
    let services: Vec<Value> = ports
        .iter()
        .enumerate()
        .map(|(n, p)| json!({"name": format!("s{n}"), "port": p}))
        .collect();
    json!({"id": format!("6f1c2d3e-0000-4000-8000-0000000000{i:02x}"), "org_id": "o", "worker": "w",
           "public_ipv6": host.ipv6.to_string(), "interface": host.interface, "status": "running",
           "services": services, "firewall": firewall})
}

fn firewall(egress: Value, dns: Value) -> Value {
    json!({"ingress": {"default": "deny", "rules": []}, "egress": egress, "dns": dns})
}

/// VM 0: deny mode, egress only to `api` by fqdn, IPv4 and IPv6. VM 1: allow mode. VM 2:
/// block_bypass, an fqdn deny rule, no IPv4 address (so no IPv4 sets).
fn state(lab: &Lab) -> vmedge_model::State {
    let mut vms = vec![
        vm(
            lab,
            0,
            &[],
            firewall(
                json!({"default": "deny", "rules": [
                    {"action": "allow", "kind": "fqdn", "value": format!("api.{ZONE}"), "protocol": "tcp", "ports": "7000"},
                    {"action": "allow", "kind": "fqdn", "value": format!("many.{ZONE}"), "protocol": "tcp", "ports": "7001"}]}),
                json!({"mode": "deny", "domains": [format!("blocked.{ZONE}"), format!("*.ads.{ZONE}")], "block_bypass": false}),
            ),
        ),
        vm(
            lab,
            1,
            &[7000],
            firewall(
                json!({"default": "allow", "rules": []}),
                json!({"mode": "allow", "domains": [format!("www.{ZONE}"), format!("*.sub.{ZONE}")], "block_bypass": false}),
            ),
        ),
        vm(
            lab,
            2,
            &[7000],
            firewall(
                json!({"default": "allow", "rules": [
                    {"action": "deny", "kind": "fqdn", "value": format!("many.{ZONE}"), "protocol": "tcp", "ports": "7001"}]}),
                json!({"mode": "deny", "domains": [], "block_bypass": true}),
            ),
        ),
    ];
    vms[0]["ipv4"] = json!(lab.vms[0].ipv4.to_string());
    vmedge_model::state_from_value(&json!({"vms": vms}))
        .unwrap()
        .value
}

/// A lab with NSD upstream, the firewall synced, and the gate serving at the worker's address.
struct DnsLab {
    lab: Lab,
    nsd: Nsd,
    registry: Arc<MemoryRegistry>,
    gate: GateInNetns,
}

impl DnsLab {
    fn start() -> DnsLab {
        let lab = Lab::new(3);
        let nsd = Nsd::start(&lab.worker, ZONE, &zone(&lab), UPSTREAM_PORT);
        let registry = Arc::new(MemoryRegistry::new("test", state(&lab)));
        let mut reconciler = Reconciler::new(
            "w",
            NftBackend::in_netns(lab.worker.name()),
            CompileOptions::new(vec![IpAddr::V6(lab.worker_ipv6)]),
            WorkerMetrics::register(&mut prometheus_client::registry::Registry::default()),
        );
        reconciler.sync(&registry.load()).unwrap();

        let config = GateConfig {
            worker: "w".into(),
            upstream: UpstreamConfig {
                servers: vec![SocketAddr::from(([127, 0, 0, 1], UPSTREAM_PORT))],
                timeout: Duration::from_millis(500),
                ..UpstreamConfig::default()
            },
            fqdn_floor: Duration::from_secs(1),
            max_addrs_per_name: 4,
            fqdn_grace: Duration::from_secs(1),
            rebind_allow: vec![
                "fd5e::/16".parse().unwrap(),
                "198.18.0.0/15".parse().unwrap(),
            ],
            cache: vmedge_dns::CacheConfig {
                stale_window: Duration::from_secs(60),
                ..vmedge_dns::CacheConfig::default()
            },
            ..GateConfig::default()
        };
        let listen = SocketAddr::new(IpAddr::V6(lab.worker_ipv6), 53);
        let gate = GateInNetns::start(
            lab.worker.name(),
            listen,
            config,
            registry.clone() as Arc<dyn Registry>,
        );
        DnsLab {
            lab,
            nsd,
            registry,
            gate,
        }
    }

    /// `dig` from VM `i` (or any namespace) at the gate; the whole output.
    fn dig_from(&self, ns: &Netns, args: &[&str]) -> String {
        let server = format!("@{}", self.lab.worker_ipv6);
        let out = ns
            .command("dig")
            .args([server.as_str(), "+tries=1", "+time=3", "+nocookie"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dig(&self, i: usize, args: &[&str]) -> String {
        self.dig_from(&self.lab.vms[i].ns, args)
    }

    fn status(&self, i: usize, name: &str, qtype: &str) -> String {
        status(&self.dig(i, &[name, qtype]))
    }

    fn short(&self, i: usize, name: &str, qtype: &str) -> Vec<String> {
        self.dig(i, &["+short", name, qtype])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The elements of a set in the worker's table, as nft lists them.
    fn set_listing(&self, set: &str) -> String {
        let out = self
            .lab
            .worker
            .sh(&["nft", "list", "set", "inet", "vmedge", set]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `status: NXDOMAIN` and the like, from dig's header line.
fn status(out: &str) -> String {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string()
}

fn metric(text: &str, name: &str) -> f64 {
    vmedge_tests::gate::metric(text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn name(label: &str) -> String {
    format!("{label}.{ZONE}")
}

#[test]
fn policy_modes_wildcards_and_refused_strangers() {
    let t = DnsLab::start();
    // A source that is no VM of this worker: REFUSED, never an answer.
    assert_eq!(
        status(&t.dig_from(&t.lab.worker, &[&name("www"), "A"])),
        "REFUSED"
    );

    // VM 0, deny mode: the listed name is NXDOMAIN for every type, with an SOA.
    for qtype in ["A", "AAAA", "TXT", "MX", "HTTPS", "SOA"] {
        assert_eq!(t.status(0, &name("blocked"), qtype), "NXDOMAIN", "{qtype}");
    }
    let blocked = t.dig(0, &[&name("blocked"), "AAAA"]);
    assert!(blocked.contains("AUTHORITY: 1"), "{blocked}");
    assert!(blocked.contains("IN\tSOA"), "{blocked}");
    assert_eq!(t.status(0, &format!("x.ads.{ZONE}"), "A"), "NXDOMAIN");
    assert_eq!(t.short(0, &name("www"), "A"), vec!["198.18.0.5"]);
    assert_eq!(
        t.short(0, &name("www"), "MX"),
        vec![format!("10 mail.{ZONE}.")]
    );

    // VM 1, allow mode: only the listed names; `*.sub` matches below sub, never sub itself.
    assert_eq!(t.short(1, &name("www"), "A"), vec!["198.18.0.5"]);
    assert_eq!(
        t.short(1, &format!("a.sub.{ZONE}"), "A"),
        vec!["198.18.0.7"]
    );
    assert_eq!(t.status(1, &name("sub"), "A"), "NXDOMAIN");
    assert_eq!(t.status(1, &name("other"), "AAAA"), "NXDOMAIN");

    // VM 2, deny with no names and block_bypass: everything resolves but the bypasses.
    assert_eq!(
        t.short(2, &name("other"), "AAAA"),
        vec![t.lab.vms[2].ipv6.to_string()]
    );
    assert_eq!(t.status(2, "use-application-dns.net", "A"), "NXDOMAIN");
    assert_eq!(t.status(2, "dns.google", "AAAA"), "NXDOMAIN");
    let ddr = t.dig(2, &["_dns.resolver.arpa", "SVCB"]);
    assert_eq!(status(&ddr), "NOERROR");
    assert!(ddr.contains("ANSWER: 0"), "{ddr}");

    // A CNAME whose target the VM may not resolve is NXDOMAIN; a chain to an allowed
    // name comes back whole.
    assert_eq!(t.status(0, &name("evil"), "AAAA"), "NXDOMAIN");
    let chain = t.short(0, &name("alias"), "AAAA");
    assert_eq!(
        chain,
        vec![format!("api.{ZONE}."), t.lab.vms[1].ipv6.to_string()]
    );

    // ANY gets the RFC 8482 answer, private addresses are dropped (rebinding).
    let any = t.dig(2, &[&name("www"), "ANY"]);
    assert!(any.contains("RFC8482"), "{any}");
    assert_eq!(t.short(2, &name("private"), "A"), vec!["198.18.0.9"]);

    let metrics = t.gate.metrics();
    assert!(
        metrics.contains("vmedge_dns_queries_total{result=\"blocked\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmedge_dns_queries_total{result=\"refused\"} 1"),
        "{metrics}"
    );
}

#[test]
fn the_cache_answers_within_the_ttl_and_tcp_carries_what_udp_cannot() {
    let t = DnsLab::start();
    let before = t.nsd.queries();
    for _ in 0..3 {
        assert_eq!(t.short(2, &name("www"), "TXT"), vec!["\"hello\""]);
    }
    assert_eq!(
        t.nsd.queries() - before,
        1,
        "upstream saw one query for three"
    );
    // TTLs count down from the cached answer.
    let ttl = |out: String| -> u32 {
        let line = out
            .lines()
            .find(|l| l.contains("IN\tTXT"))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let first = ttl(t.dig(2, &["+noall", "+answer", &name("www"), "TXT"]));
    std::thread::sleep(Duration::from_millis(2100));
    let later = ttl(t.dig(2, &["+noall", "+answer", &name("www"), "TXT"]));
    assert!(later < first && first <= 300, "{first} then {later}");

    // Too big for 1232 bytes: truncated over UDP, whole over TCP.
    let udp = t.dig(2, &["+ignore", "+bufsize=1232", &name("big"), "TXT"]);
    assert!(udp.contains(" tc"), "{udp}");
    let tcp = t.dig(2, &["+tcp", "+short", &name("big"), "TXT"]);
    assert_eq!(tcp.lines().count(), 8, "{tcp}");
    // The gate got it whole because its own UDP query came back truncated and it asked
    // again over TCP.
    assert!(t.nsd.stat("num.tcp") >= 1, "upstream saw no TCP query");
}

#[test]
fn fqdn_rules_open_only_answered_addresses_until_the_ttl_runs_out() {
    let t = DnsLab::start();
    let (client, api, other) = (&t.lab.vms[0], &t.lab.vms[1], &t.lab.vms[2]);
    let _servers = [
        EchoServers::start(&api.ns, &[7000], &[]),
        EchoServers::start(&other.ns, &[7000], &[]),
    ];
    let to = |host: &vmedge_tests::VmHost| SocketAddr::new(IpAddr::V6(host.ipv6), 7000);
    assert!(
        !tcp_passes(&client.ns, None, to(api)),
        "closed before any answer"
    );

    assert_eq!(t.short(0, &name("api"), "AAAA"), vec![api.ipv6.to_string()]);
    assert!(
        tcp_passes(&client.ns, None, to(api)),
        "the answered address opens"
    );
    // Asked again at once (a cache hit): the kernel confirmed this element within the last
    // second (the grace here), so no second commit; the skip is counted. Two digs may be
    // more than a second apart on a loaded machine: up to three tries.
    let skipped = (0..3).any(|_| {
        assert_eq!(t.short(0, &name("api"), "AAAA"), vec![api.ipv6.to_string()]);
        let before = t.gate.metrics();
        assert_eq!(t.short(0, &name("api"), "AAAA"), vec![api.ipv6.to_string()]);
        let after = t.gate.metrics();
        metric(&after, "vmedge_dns_set_insert_skips_total")
            > metric(&before, "vmedge_dns_set_insert_skips_total")
            && metric(&after, "vmedge_dns_set_inserts_total")
                == metric(&before, "vmedge_dns_set_inserts_total")
    });
    assert!(
        skipped,
        "a repeated answer was committed again:\n{}",
        t.gate.metrics()
    );
    assert!(
        !tcp_passes(&client.ns, None, to(other)),
        "an address never answered stays closed"
    );
    let pattern = DomainPattern::parse(&name("api")).unwrap();
    let vm = t.registry.load().vms()[0].clone();
    let sets = vmedge_firewall::fqdn_sets(&vm, &pattern);
    assert!(t.set_listing(&sets.v6).contains(&api.ipv6.to_string()));

    // The HTTPS record of a name with an fqdn rule loses its address hints; a VM
    // without such a rule gets them.
    let https = t.short(0, &name("api"), "HTTPS").join(" ");
    assert!(
        https.contains("alpn=\"h2\"") && !https.contains("hint"),
        "{https}"
    );
    let https = t.short(2, &name("api"), "HTTPS").join(" ");
    assert!(https.contains("ipv6hint"), "{https}");

    // TTL 2 s, floor 1 s, grace 1 s: gone from the set about 3 s after the answer.
    let deadline = Instant::now() + Duration::from_secs(15);
    while t.set_listing(&sets.v6).contains(&api.ipv6.to_string()) {
        assert!(Instant::now() < deadline, "the address never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !tcp_passes(&client.ns, None, to(api)),
        "closed again after the TTL"
    );

    // The cap on addresses per answer: 4 of 6 reach the VM, and exactly those are in the set.
    let many = t.short(0, &name("many"), "A");
    assert_eq!(many.len(), 4, "{many:?}");
    let many_sets = vmedge_firewall::fqdn_sets(&vm, &DomainPattern::parse(&name("many")).unwrap());
    let listing = t.set_listing(many_sets.v4.as_deref().expect("VM 0 has an IPv4 address"));
    for addr in &many {
        assert!(listing.contains(addr.as_str()), "{addr} not in {listing}");
    }
    assert_eq!(listing.matches("198.18.2.").count(), 4, "{listing}");
    // A VM without an IPv4 address gets the same A answer, and has no IPv4 set to fill:
    // its IPv6 set of the same rule is the only one.
    assert_eq!(t.short(2, &name("many"), "A").len(), 4);
    let v6_only = t.registry.load().vms()[2].clone();
    let sets = vmedge_firewall::fqdn_sets(&v6_only, &DomainPattern::parse(&name("many")).unwrap());
    assert_eq!(sets.v4, None);
    let listed = t.lab.worker.sh(&["nft", "list", "sets", "inet"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let stem = format!("set {}", sets.v6.trim_end_matches('6'));
    assert_eq!(listed.matches(&stem).count(), 1, "{listed}");
    assert!(listed.contains(&format!("set {} ", sets.v6)), "{listed}");

    // A CNAME chain counts for the queried name's rule: `alias` -> `api`.
    assert_eq!(t.short(0, &name("alias"), "AAAA").len(), 2);
    assert!(tcp_passes(&client.ns, None, to(api)));

    let metrics = t.gate.metrics();
    let inserts = metric(&metrics, "vmedge_dns_set_inserts_total");
    assert!(inserts >= 2.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "vmedge_dns_set_insert_failures_total"),
        0.0
    );
}

#[test]
fn a_missing_set_means_servfail_never_an_answer_the_firewall_would_drop() {
    let t = DnsLab::start();
    // Someone flushes the table: the sets are gone, so the insert fails.
    t.lab
        .worker
        .sh(&["nft", "delete", "table", "inet", "vmedge"]);
    assert_eq!(t.status(0, &name("api"), "AAAA"), "SERVFAIL");
    // Names without fqdn rules still resolve.
    assert_eq!(t.short(0, &name("www"), "A"), vec!["198.18.0.5"]);
}

#[test]
fn upstream_down_serves_stale_or_servfail_never_hangs() {
    let mut t = DnsLab::start();
    assert_eq!(t.short(2, &name("short"), "A"), vec!["198.18.0.8"]);
    t.nsd.stop();
    std::thread::sleep(Duration::from_millis(1500)); // past the 1 s TTL
    let started = Instant::now();
    let stale = t.dig(2, &["+noall", "+answer", &name("short"), "A"]);
    assert!(stale.contains("198.18.0.8"), "stale answer: {stale}");
    assert_eq!(t.status(2, &name("never-asked"), "A"), "SERVFAIL");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answers came without a hang"
    );
    let metrics = t.gate.metrics();
    assert!(
        metrics.contains("vmedge_dns_queries_total{result=\"stale\"} 1"),
        "{metrics}"
    );
}

#[test]
fn an_insert_refreshes_the_timeout_of_an_address_already_there() {
    let t = DnsLab::start();
    let pattern = DomainPattern::parse(&name("api")).unwrap();
    let vm = t.registry.load().vms()[0].clone();
    let set = vmedge_firewall::fqdn_sets(&vm, &pattern)
        .v4
        .expect("VM 0 has an IPv4 address");
    let mut socket = NetlinkSocket::open_in_netns(t.lab.worker.name()).unwrap();
    let insert = |socket: &mut NetlinkSocket, secs| {
        let mut batch = Batch::new(socket.next_seq());
        let element = FqdnElement {
            set: set.clone(),
            addr: "198.18.0.8".parse().unwrap(),
            timeout: Duration::from_secs(secs),
        };
        encode_fqdn_elements(&mut batch, &[element]);
        socket.commit(batch).unwrap();
    };
    let expires = || -> f64 {
        let listing = t.set_listing(&set);
        let after = listing
            .split("expires ")
            .nth(1)
            .unwrap_or_else(|| panic!("{listing}"));
        nft_seconds(after.split([' ', ',', '}']).next().unwrap())
    };
    insert(&mut socket, 100);
    std::thread::sleep(Duration::from_millis(2500));
    let aged = expires();
    assert!(aged < 98.5, "expiry counts down: {aged}");
    insert(&mut socket, 100);
    let refreshed = expires();
    assert!(
        refreshed > 99.0,
        "the same address again restarts its timeout: {refreshed}"
    );
}

/// nft's spelling of a duration (`1m37s992ms`) in seconds.
fn nft_seconds(text: &str) -> f64 {
    let mut total = 0.0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().unwrap_or(0.0);
        number.clear();
        total += value
            * match c {
                'd' => 86400.0,
                'h' => 3600.0,
                'm' if chars.peek() == Some(&'s') => {
                    chars.next();
                    0.001
                }
                'm' => 60.0,
                _ => 1.0,
            };
    }
    total
}

#[test]
fn nft_durations_read_as_seconds() {
    assert_eq!(nft_seconds("1m37s992ms"), 97.992);
    assert_eq!(nft_seconds("59s"), 59.0);
}
