//! Public hosts of services: `<service>--<vmid>.proxy.<domain>`.
//!
//! vmid is the VM UUID as 32 hex digits. Parsing is case-insensitive, ignores a
//! `:port` suffix and an absolute name's trailing dot, and allocates nothing: the edge
//! runs it on every request.

use crate::service::ServiceName;
use crate::vm::VmId;

/// The label between the service host and the stack domain.
pub const PROXY_LABEL: &str = "proxy";

/// A parsed public host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicHost {
    /// The service name, lowercase.
    pub service: ServiceName,
    /// The VM.
    pub vm: VmId,
}

/// Why a host is not a service host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Not under `proxy.<domain>`: not ours to answer (HTTP 421).
    #[error("host is not under proxy.<domain>")]
    NotUnderDomain,
    /// Under `proxy.<domain>` but not `<service>--<32 hex>` (HTTP 404, like an unknown VM).
    #[error("host is not <service>--<vmid>.proxy.<domain>")]
    Malformed,
}

/// The public host of a service: `<service>--<vmid hex>.proxy.<domain>`.
pub fn public_host(service: &ServiceName, vm: VmId, domain: &str) -> String {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    format!("{service}--{}.{PROXY_LABEL}.{domain}", vm.hex())
}

/// Parses a Host header, `:authority` or SNI value against the stack domain.
pub fn parse_public_host(host: &str, domain: &str) -> Result<PublicHost, HostError> {
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    let domain = domain.strip_suffix('.').unwrap_or(domain);

    // host = <label> "." "proxy" "." <domain>
    let suffix_len = PROXY_LABEL.len() + 1 + domain.len();
    if host.len() < suffix_len + 2 || !host.is_char_boundary(host.len() - suffix_len) {
        return Err(HostError::NotUnderDomain);
    }
    let (head, suffix) = host.split_at(host.len() - suffix_len);
    // A multibyte character may straddle the end of "proxy" (found by fuzz/host).
    let (proxy, dom) = suffix
        .split_at_checked(PROXY_LABEL.len())
        .ok_or(HostError::NotUnderDomain)?;
    if !proxy.eq_ignore_ascii_case(PROXY_LABEL)
        || !dom.starts_with('.')
        || !dom[1..].eq_ignore_ascii_case(domain)
    {
        return Err(HostError::NotUnderDomain);
    }
    let label = head.strip_suffix('.').ok_or(HostError::NotUnderDomain)?;
    // label = <service> "--" <32 hex>: the separator's place is fixed, no search needed.
    // A second "--" inside the service part is refused by ServiceName (double hyphen).
    let split = label.len().checked_sub(34).ok_or(HostError::Malformed)?;
    if !label.is_char_boundary(split) || &label.as_bytes()[split..split + 2] != b"--" {
        return Err(HostError::Malformed);
    }
    let (service, vm) = (&label[..split], &label[split + 2..]);
    let vm = VmId::parse_hex32(vm).ok_or(HostError::Malformed)?;
    let service = ServiceName::parse_ignore_case(service).map_err(|_| HostError::Malformed)?;
    Ok(PublicHost { service, vm })
}

/// `host:8443` -> `host`. Bracketed IPv6 literals are left alone: they are never ours.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host.starts_with('[') => {
            let port = &host[i + 1..];
            if !port.is_empty() && port.len() <= 5 && port.bytes().all(|c| c.is_ascii_digit()) {
                &host[..i]
            } else {
                host
            }
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";

    fn vm() -> VmId {
        VmId::parse(VM).unwrap()
    }

    #[test]
    fn builds_the_seed_form() {
        let web = ServiceName::parse("web").unwrap();
        assert_eq!(
            public_host(&web, vm(), "example.dev"),
            "web--6f1c2d3e0000400080000000000000aa.proxy.example.dev"
        );
    }

    #[test]
    fn parses_case_insensitively_with_port_and_dot() {
        let want = PublicHost {
            service: ServiceName::parse("web").unwrap(),
            vm: vm(),
        };
        for host in [
            "web--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
            "WEB--6F1C2D3E0000400080000000000000AA.PROXY.Example.Dev",
            "web--6f1c2d3e0000400080000000000000aa.proxy.example.dev:8443",
            "web--6f1c2d3e0000400080000000000000aa.proxy.example.dev.",
            "web--6f1c2d3e0000400080000000000000aa.proxy.example.dev.:443",
        ] {
            assert_eq!(parse_public_host(host, "example.dev"), Ok(want), "{host}");
        }
    }

    #[test]
    fn tells_foreign_hosts_from_malformed_ones() {
        use HostError::*;
        let cases = [
            ("example.dev", NotUnderDomain),
            ("proxy.example.dev", NotUnderDomain),
            ("ssh.example.dev", NotUnderDomain),
            (
                "web--6f1c2d3e0000400080000000000000aa.example.dev",
                NotUnderDomain,
            ),
            (
                "web--6f1c2d3e0000400080000000000000aa.proxy.example.com",
                NotUnderDomain,
            ),
            (
                "web--6f1c2d3e0000400080000000000000aa.proxyexample.dev",
                NotUnderDomain,
            ),
            ("xproxy.example.dev", NotUnderDomain),
            ("[::1]:8080", NotUnderDomain),
            ("", NotUnderDomain),
            ("web.proxy.example.dev", Malformed),
            (
                "a.web--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                Malformed,
            ),
            (
                "web--6f1c2d3e-0000-4000-8000-0000000000aa.proxy.example.dev",
                Malformed,
            ),
            (
                "web--6f1c2d3e0000400080000000000000a.proxy.example.dev",
                Malformed,
            ),
            (
                "web--6f1c2d3e0000400080000000000000aaa.proxy.example.dev",
                Malformed,
            ),
            (
                "web--6f1c2d3e0000400080000000000000ag.proxy.example.dev",
                Malformed,
            ),
            (
                "we--b--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                Malformed,
            ),
            (
                "--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                Malformed,
            ),
            (
                "web---6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                Malformed,
            ),
            (
                "we_b--6f1c2d3e0000400080000000000000aa.proxy.example.dev",
                Malformed,
            ),
        ];
        for (host, want) in cases {
            assert_eq!(parse_public_host(host, "example.dev"), Err(want), "{host}");
        }
    }

    #[test]
    fn multibyte_text_is_refused_not_panicked_on() {
        assert!(parse_public_host("é.proxy.example.dev", "example.dev").is_err());
        assert!(parse_public_host("ééééééééééééééééé", "example.dev").is_err());
        assert!(parse_public_host(
            "web--6f1c2d3e0000400080000000000000aa.proxy.exampleé.dev",
            "example.dev"
        )
        .is_err());
        // A character across the end of "proxy" (fuzz/host's first find).
        assert!(parse_public_host(":PϹRPPPPPPϹRPPPPP2\x10RPP", "example.dev").is_err());
    }

    fn service_name() -> impl Strategy<Value = ServiceName> {
        "[a-z0-9]{1,5}(-[a-z0-9]{1,5}){0,3}"
            .prop_filter_map("valid", |s| ServiceName::parse(&s).ok())
    }

    fn domain() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}"
    }

    proptest! {
        #[test]
        fn round_trips(service in service_name(), id in any::<u128>(), domain in domain(), upper in any::<bool>()) {
            let vm = VmId::from_uuid(uuid::Uuid::from_u128(id));
            let mut host = public_host(&service, vm, &domain);
            if upper {
                host = host.to_ascii_uppercase();
            }
            prop_assert_eq!(parse_public_host(&host, &domain), Ok(PublicHost { service, vm }));
        }

        #[test]
        fn accepts_nothing_else(host in "[a-zA-Z0-9.:_-]{0,80}|[a-z0-9-]{1,30}--[0-9a-fA-F]{30,34}\\.proxy\\.ex\\.dev(:[0-9]{1,6})?\\.?") {
            // Whatever parses must be exactly what public_host builds (modulo case, port, dot).
            if let Ok(p) = parse_public_host(&host, "ex.dev") {
                let canonical = public_host(&p.service, p.vm, "ex.dev");
                let given = strip_port(&host).trim_end_matches('.').to_ascii_lowercase();
                prop_assert_eq!(canonical, given);
            }
        }
    }
}
