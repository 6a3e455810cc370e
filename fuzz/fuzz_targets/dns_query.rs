//! The DNS gate's request handling: any bytes, from a VM of the worker or from anyone
//! else, over UDP or TCP. No upstream is configured, so nothing leaves the process: a
//! query that would be forwarded gets SERVFAIL.
#![no_main]

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vmedge_dns::{Gate, GateConfig, Metrics, NoFirewall, Transport};
use vmedge_model::parse_state;
use vmedge_registry::Snapshot;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    gate: Gate,
    sources: Vec<IpAddr>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let state = parse_state(include_str!("../../examples/state.json")).expect("example state");
        let mut sources: Vec<IpAddr> = state
            .value
            .vms
            .iter()
            .filter(|vm| vm.worker == "worker-1")
            .map(|vm| IpAddr::V6(vm.public_ipv6))
            .collect();
        sources.push("fd5e:ed00:ff::9".parse().expect("address")); // no VM: REFUSED
        let config = GateConfig {
            rate_limit: None, // every input gets the whole path
            ..GateConfig::default()
        };
        let gate = Gate::new(config, Arc::new(NoFirewall), Metrics::unregistered());
        gate.update(Arc::new(Snapshot::build(state.value, 1)));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        Fixture {
            runtime,
            gate,
            sources,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, query)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let source = f.sources[usize::from(selector >> 1) % f.sources.len()];
    let transport = if selector & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let answer = f.runtime.block_on(f.gate.handle(source, query, transport));
    if let Some(answer) = answer {
        // An answer is a DNS message: at least the header, with the query's id.
        assert!(answer.len() >= 12);
        if query.len() >= 2 {
            assert_eq!(answer[..2], query[..2], "the answer carries the query's id");
        }
        if transport == Transport::Udp {
            assert!(answer.len() <= usize::from(vmedge_dns::gate::MAX_UDP_ANSWER));
        }
    }
});
