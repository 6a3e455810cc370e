//! Host header, `:authority` and SNI parsing, and the route lookup the edge makes with it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmedge_model::{parse_public_host, parse_state, public_host, DomainPattern, VmId};
use vmedge_registry::Snapshot;

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let state = parse_state(include_str!("../../examples/state.json")).expect("example state");
        Snapshot::build(state.value, 1)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is the host, the rest (if any) the domain; a domain is what the
    // config accepts (a valid name, not a wildcard, as `Domain` in cli/src/config.rs).
    let (host, domain) = text.split_once('\n').unwrap_or((text, "example.dev"));
    let domain = match DomainPattern::parse(domain) {
        Ok(pattern) if !pattern.is_wildcard() => pattern.base().to_string(),
        _ => return,
    };
    let domain = domain.as_str();
    if let Ok(parsed) = parse_public_host(host, domain) {
        // What parses prints back to a host that parses to the same.
        let again = public_host(&parsed.service, parsed.vm, domain);
        assert_eq!(parse_public_host(&again, domain), Ok(parsed), "{again}");
    }
    let _ = snapshot().route_host(host, domain);
    let _ = VmId::parse(host);
    let _ = VmId::parse_hex32(host);
});
