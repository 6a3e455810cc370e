//! FirewallPolicy: ingress, egress and DNS, as seed 001 defines them, and the older
//! seed 002 shape (`mode` open / restricted with `port_start` / `port_end` /
//! `source_cidrs` rules), which is accepted and converted.

use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv6Net};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::domain::DomainPattern;
use crate::json::Node;
use crate::service::Service;
use crate::validate::{
    array, boolean, deny_unknown, object, optional, required, string, Fields, Path, Report,
};

/// Allow or deny: a direction's default posture and each rule's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the packet through.
    Allow,
    /// Drop the packet.
    Deny,
}

/// The L4 protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Any protocol (then ports must be `any`).
    Any,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        })
    }
}

/// A rule's ports: `any`, one port, or an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    /// Every port.
    Any,
    /// `first..=last`; a single port has `first == last`.
    Range {
        /// First port of the range.
        first: u16,
        /// Last port of the range (inclusive).
        last: u16,
    },
}

impl Ports {
    /// Parses `"443"`, `"8080-8090"` or `"any"`.
    pub fn parse(s: &str) -> Result<Ports, String> {
        let bad = || format!("{s:?} is not a port or a range");
        if s == "any" {
            return Ok(Ports::Any);
        }
        let port = |p: &str| -> Result<u16, String> {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            match p.parse::<u32>() {
                Ok(n @ 1..=65535) => Ok(n as u16),
                _ => Err(format!("{s:?}: ports are 1-65535")),
            }
        };
        match s.split_once('-') {
            None => {
                let p = port(s)?;
                Ok(Ports::Range { first: p, last: p })
            }
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!("{s:?}: the range starts after it ends"));
                }
                Ok(Ports::Range { first, last })
            }
        }
    }

    /// A single port.
    pub fn single(port: u16) -> Ports {
        Ports::Range {
            first: port,
            last: port,
        }
    }

    /// Does the port fall within?
    pub fn contains(&self, port: u16) -> bool {
        match *self {
            Ports::Any => true,
            Ports::Range { first, last } => (first..=last).contains(&port),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Ports::Any => f.write_str("any"),
            Ports::Range { first, last } if first == last => write!(f, "{first}"),
            Ports::Range { first, last } => write!(f, "{first}-{last}"),
        }
    }
}

/// What a rule matches on the far side: addresses, or the addresses a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `kind: cidr`: an IPv4 or IPv6 prefix (host bits cleared).
    Cidr(IpNet),
    /// `kind: fqdn` (egress only): a name or `*.` wildcard, filled in by the DNS gate.
    Fqdn(DomainPattern),
}

/// One rule of a direction. Within a direction the first matching rule decides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The verdict when the rule matches.
    pub action: Action,
    /// The far side's addresses.
    pub target: Target,
    /// L4 protocol.
    pub protocol: Protocol,
    /// L4 ports (the VM's port for ingress, the destination's for egress).
    pub ports: Ports,
    /// Free text, kept for people and logs.
    pub description: String,
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r = s.serialize_struct("Rule", 6)?;
        r.serialize_field("action", &self.action)?;
        match &self.target {
            Target::Cidr(net) => {
                r.serialize_field("kind", "cidr")?;
                r.serialize_field("value", &net.to_string())?;
            }
            Target::Fqdn(name) => {
                r.serialize_field("kind", "fqdn")?;
                r.serialize_field("value", &name.to_string())?;
            }
        }
        r.serialize_field("protocol", &self.protocol)?;
        r.serialize_field("ports", &self.ports.to_string())?;
        r.serialize_field("description", &self.description)?;
        r.end()
    }
}

/// One direction (ingress or egress): rules in order, then the default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DirectionPolicy {
    /// The verdict when no rule matches.
    pub default: Action,
    /// First match wins.
    pub rules: Vec<Rule>,
}

/// How `dns.domains` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Only the listed names resolve.
    Allow,
    /// The listed names are blocked; everything else resolves.
    Deny,
}

impl fmt::Display for DnsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsMode::Allow => "allow",
            DnsMode::Deny => "deny",
        })
    }
}

/// DNS-layer filtering at the worker's DNS gate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DnsPolicy {
    /// Allowlist or blocklist.
    pub mode: DnsMode,
    /// The names the mode is about.
    pub domains: Vec<DomainPattern>,
    /// Drop DoT (853) and known DoH resolvers so the gate cannot be sidestepped.
    pub block_bypass: bool,
}

impl DnsPolicy {
    /// Would the gate resolve this name? (Reference semantics; the gate uses an index.)
    pub fn resolves(&self, name: &str) -> bool {
        let listed = self.domains.iter().any(|d| d.matches(name));
        match self.mode {
            DnsMode::Allow => listed,
            DnsMode::Deny => !listed,
        }
    }

    /// True when the gate blocks every name the pattern matches: an fqdn rule on it is dead.
    pub fn blocks_all(&self, pattern: &DomainPattern) -> bool {
        match self.mode {
            DnsMode::Deny => self.domains.iter().any(|d| d.covers(pattern)),
            DnsMode::Allow => !self.domains.iter().any(|d| d.overlaps(pattern)),
        }
    }
}

impl Default for DnsPolicy {
    /// Deny mode with no domains: everything resolves.
    fn default() -> Self {
        DnsPolicy {
            mode: DnsMode::Deny,
            domains: Vec::new(),
            block_bypass: false,
        }
    }
}

/// A VM's firewall: three independent axes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct FirewallPolicy {
    /// Traffic to the VM.
    pub ingress: DirectionPolicy,
    /// Traffic from the VM.
    pub egress: DirectionPolicy,
    /// Names the VM may resolve.
    pub dns: DnsPolicy,
}

impl Default for FirewallPolicy {
    /// The platform's safe default: ingress deny, egress allow, DNS deny with no domains.
    fn default() -> Self {
        FirewallPolicy {
            ingress: DirectionPolicy {
                default: Action::Deny,
                rules: Vec::new(),
            },
            egress: DirectionPolicy {
                default: Action::Allow,
                rules: Vec::new(),
            },
            dns: DnsPolicy::default(),
        }
    }
}

impl FirewallPolicy {
    /// Nothing in, nothing out, no name resolves: what a VM gets while its own policy is
    /// invalid and there is no last good one (the service auto-rules still apply, as they
    /// do to every policy, so this is the least any policy could allow).
    pub fn closed() -> Self {
        FirewallPolicy {
            ingress: DirectionPolicy {
                default: Action::Deny,
                rules: Vec::new(),
            },
            egress: DirectionPolicy {
                default: Action::Deny,
                rules: Vec::new(),
            },
            dns: DnsPolicy {
                mode: DnsMode::Allow,
                domains: Vec::new(),
                block_bypass: true,
            },
        }
    }
}

/// Which shape a policy document had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyShape {
    /// Seed 001: `ingress` / `egress` / `dns`.
    Current,
    /// Seed 002: `mode` open / restricted with an `ingress` list; converted.
    Legacy,
}

/// Description of the auto-rule the platform adds per service.
pub fn auto_rule_description(service: &Service) -> String {
    format!("auto: proxy service {}", service.name)
}

/// The policy the worker enforces: the VM's own policy plus one ingress allow per service.
///
/// The auto-rules come first: seed 001 calls the effective policy the *union* of the
/// user's policy and the service rules, so a user rule must not shadow the proxy's path.
pub fn effective_policy(policy: &FirewallPolicy, services: &[Service]) -> FirewallPolicy {
    let mut effective = policy.clone();
    let auto = services.iter().map(|s| Rule {
        action: Action::Allow,
        target: Target::Cidr(IpNet::V6(Ipv6Net::default())), // ::/0
        protocol: Protocol::Tcp,
        ports: Ports::single(s.port),
        description: auto_rule_description(s),
    });
    effective.ingress.rules.splice(0..0, auto);
    effective
}

// ---- decoding ----------------------------------------------------------------------

const POLICY_KEYS: &[&str] = &["ingress", "egress", "dns"];
const DIRECTION_KEYS: &[&str] = &["default", "rules"];
const RULE_KEYS: &[&str] = &[
    "action",
    "kind",
    "value",
    "protocol",
    "ports",
    "description",
];
const DNS_KEYS: &[&str] = &["mode", "domains", "block_bypass", "blockBypass"];
const LEGACY_KEYS: &[&str] = &["mode", "ingress"];
const LEGACY_RULE_KEYS: &[&str] = &[
    "protocol",
    "port_start",
    "port_end",
    "source_cidrs",
    "description",
];

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Ingress,
    Egress,
}

/// Decodes a policy in either shape; `None` when errors were reported.
pub(crate) fn decode_policy(
    v: &Node<'_>,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<(FirewallPolicy, PolicyShape)> {
    let map = object(v, path, report)?;
    if map.iter().any(|(k, _)| k == "mode") {
        return decode_legacy(map, path, report).map(|p| (p, PolicyShape::Legacy));
    }
    deny_unknown(map, POLICY_KEYS, path, report);
    let defaults = FirewallPolicy::default();
    let errors_before = report.errors.len();
    let ingress = match optional(map, "ingress") {
        Some(v) => decode_direction(v, Direction::Ingress, &path.field("ingress"), report),
        None => Some(defaults.ingress),
    };
    let egress = match optional(map, "egress") {
        Some(v) => decode_direction(v, Direction::Egress, &path.field("egress"), report),
        None => Some(defaults.egress),
    };
    let dns = match optional(map, "dns") {
        Some(v) => decode_dns(v, &path.field("dns"), report),
        None => Some(defaults.dns),
    };
    let (Some(ingress), Some(egress), Some(dns)) = (ingress, egress, dns) else {
        return None;
    };
    let rules = path.field("egress");
    let rules = rules.field("rules");
    for (i, rule) in egress.rules.iter().enumerate() {
        if let Target::Fqdn(name) = &rule.target {
            if dns.blocks_all(name) {
                let why = match dns.mode {
                    DnsMode::Allow => "no name it matches is in the dns allow list",
                    DnsMode::Deny => "the dns deny list blocks every name it matches",
                };
                report.error(
                    &rules.index(i).field("value"),
                    format!("{name:?} is a dead rule: {why}, so it can never match"),
                );
            }
        }
    }
    (report.errors.len() == errors_before).then_some((
        FirewallPolicy {
            ingress,
            egress,
            dns,
        },
        PolicyShape::Current,
    ))
}

fn decode_action(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<Action> {
    match string(v, path, report)? {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        other => {
            report.error(
                path,
                format!("expected \"allow\" or \"deny\", found {other:?}"),
            );
            None
        }
    }
}

fn decode_direction(
    v: &Node<'_>,
    direction: Direction,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<DirectionPolicy> {
    let map = object(v, path, report)?;
    deny_unknown(map, DIRECTION_KEYS, path, report);
    let errors_before = report.errors.len();
    let default = match optional(map, "default") {
        Some(v) => decode_action(v, &path.field("default"), report),
        None if direction == Direction::Ingress => Some(Action::Deny),
        None => Some(Action::Allow),
    };
    let mut rules = Vec::new();
    if let Some(v) = optional(map, "rules") {
        let rules_path = path.field("rules");
        if let Some(items) = array(v, &rules_path, report) {
            rules.reserve(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(rule) = decode_rule(item, direction, &rules_path.index(i), report) {
                    rules.push(rule);
                }
            }
        }
    }
    let default = default?;
    (report.errors.len() == errors_before).then_some(DirectionPolicy { default, rules })
}

fn decode_rule(
    v: &Node<'_>,
    direction: Direction,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<Rule> {
    let map = object(v, path, report)?;
    deny_unknown(map, RULE_KEYS, path, report);
    let action = required(map, "action", path, report)
        .and_then(|v| decode_action(v, &path.field("action"), report));
    let kind_path = path.field("kind");
    let kind = match required(map, "kind", path, report) {
        Some(v) => match string(v, &kind_path, report) {
            Some("cidr") => Some("cidr"),
            Some("fqdn") if direction == Direction::Egress => Some("fqdn"),
            Some("fqdn") => {
                report.error(
                    &kind_path,
                    "fqdn rules are egress only: inbound packets carry no domain name",
                );
                None
            }
            Some(other) => {
                let expected = match direction {
                    Direction::Ingress => "expected \"cidr\"",
                    Direction::Egress => "expected \"cidr\" or \"fqdn\"",
                };
                report.error(&kind_path, format!("{expected}, found {other:?}"));
                None
            }
            None => None,
        },
        None => None,
    };
    let value_path = path.field("value");
    let value = required(map, "value", path, report).and_then(|v| string(v, &value_path, report));
    let target = match (kind, value) {
        (Some("cidr"), Some(text)) => decode_cidr(text, &value_path, report).map(Target::Cidr),
        (Some(_), Some(text)) => match DomainPattern::parse(text) {
            Ok(name) => Some(Target::Fqdn(name)),
            Err(e) => {
                report.error(&value_path, format!("{text:?} {e}"));
                None
            }
        },
        _ => None,
    };
    let protocol = match optional(map, "protocol") {
        None => Some(Protocol::Any),
        Some(v) => {
            let p = path.field("protocol");
            match string(v, &p, report) {
                Some("tcp") => Some(Protocol::Tcp),
                Some("udp") => Some(Protocol::Udp),
                Some("any") => Some(Protocol::Any),
                Some(other) => {
                    report.error(
                        &p,
                        format!("expected \"tcp\", \"udp\" or \"any\", found {other:?}"),
                    );
                    None
                }
                None => None,
            }
        }
    };
    let ports_path = path.field("ports");
    let ports = match optional(map, "ports") {
        None => Some(Ports::Any),
        Some(n @ (Node::U64(_) | Node::I64(_) | Node::F64(_))) => {
            match Ports::parse(&n.to_string()) {
                Ok(p) => Some(p),
                Err(e) => {
                    report.error(&ports_path, e);
                    None
                }
            }
        }
        Some(v) => match string(v, &ports_path, report).map(Ports::parse) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                report.error(&ports_path, e);
                None
            }
            None => None,
        },
    };
    if let (Some(Protocol::Any), Some(p @ Ports::Range { .. })) = (protocol, ports) {
        report.error(
            &ports_path,
            format!("\"{p}\" needs protocol tcp or udp: with protocol any, ports must be \"any\""),
        );
        return None;
    }
    let description = match optional(map, "description") {
        None => Some(String::new()),
        Some(v) => string(v, &path.field("description"), report).map(str::to_string),
    };
    Some(Rule {
        action: action?,
        target: target?,
        protocol: protocol?,
        ports: ports?,
        description: description?,
    })
}

/// An IPv4 or IPv6 prefix; a bare address is a host prefix; host bits are cleared with a warning.
pub(crate) fn decode_cidr(text: &str, path: &Path<'_>, report: &mut Report) -> Option<IpNet> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                report.error(path, format!("{text:?} is not an IPv4 or IPv6 CIDR"));
                return None;
            }
        },
    };
    let trunc = net.trunc();
    if trunc != net {
        report.warn(
            path,
            format!("{text:?} has host bits set; it is enforced as {trunc}"),
        );
    }
    Some(trunc)
}

fn decode_dns(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<DnsPolicy> {
    let map = object(v, path, report)?;
    deny_unknown(map, DNS_KEYS, path, report);
    let errors_before = report.errors.len();
    let mut policy = DnsPolicy::default();
    if let Some(v) = optional(map, "mode") {
        let p = path.field("mode");
        match string(v, &p, report) {
            Some("allow") => policy.mode = DnsMode::Allow,
            Some("deny") => policy.mode = DnsMode::Deny,
            Some(other) => report.error(
                &p,
                format!("expected \"allow\" or \"deny\", found {other:?}"),
            ),
            None => {}
        }
    }
    if let Some(v) = optional(map, "domains") {
        let p = path.field("domains");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            let ip = p.index(i);
            if let Some(text) = string(item, &ip, report) {
                match DomainPattern::parse(text) {
                    Ok(d) => policy.domains.push(d),
                    Err(e) => report.error(&ip, format!("{text:?} {e}")),
                }
            }
        }
    }
    for key in ["block_bypass", "blockBypass"] {
        if let Some(v) = optional(map, key) {
            if let Some(b) = boolean(v, &path.field(key), report) {
                policy.block_bypass = b;
            }
        }
    }
    (report.errors.len() == errors_before).then_some(policy)
}

/// Seed 002: `{"mode": "open" | "restricted", "ingress": [{protocol, port_start, port_end, source_cidrs}]}`.
///
/// `open` allows all inbound traffic; `restricted` denies by default and allows the
/// rules. Each rule becomes one allow per source CIDR (`::/0` when none are given).
/// Egress and DNS take the current defaults, which is what that API revision did.
fn decode_legacy(map: &Fields<'_>, path: &Path<'_>, report: &mut Report) -> Option<FirewallPolicy> {
    deny_unknown(map, LEGACY_KEYS, path, report);
    let errors_before = report.errors.len();
    let mut policy = FirewallPolicy::default();
    let mode_path = path.field("mode");
    match optional(map, "mode").map(|v| string(v, &mode_path, report)) {
        Some(Some("open")) => policy.ingress.default = Action::Allow,
        Some(Some("restricted")) => policy.ingress.default = Action::Deny,
        Some(Some(other)) => report.error(
            &mode_path,
            format!("expected \"open\" or \"restricted\", found {other:?}"),
        ),
        Some(None) => {}
        None => report.error(&mode_path, "is required"),
    }
    if let Some(v) = optional(map, "ingress") {
        let p = path.field("ingress");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            decode_legacy_rule(item, &p.index(i), report, &mut policy.ingress.rules);
        }
    }
    (report.errors.len() == errors_before).then_some(policy)
}

fn decode_legacy_rule(v: &Node<'_>, path: &Path<'_>, report: &mut Report, out: &mut Vec<Rule>) {
    let Some(map) = object(v, path, report) else {
        return;
    };
    deny_unknown(map, LEGACY_RULE_KEYS, path, report);
    let protocol_path = path.field("protocol");
    let protocol = match required(map, "protocol", path, report)
        .and_then(|v| string(v, &protocol_path, report))
    {
        Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(other) => {
            report.error(
                &protocol_path,
                format!("expected \"tcp\" or \"udp\", found {other:?}"),
            );
            None
        }
        None => None,
    };
    let port = |key: &'static str, report: &mut Report| -> Option<u16> {
        let v = optional(map, key)?;
        match v.as_u64() {
            Some(n @ 1..=65535) => Some(n as u16),
            _ => {
                report.error(
                    &path.field(key),
                    format!("expected a port 1-65535, found {v}"),
                );
                None
            }
        }
    };
    let first = port("port_start", report);
    if optional(map, "port_start").is_none() {
        report.error(&path.field("port_start"), "is required");
    }
    let last = port("port_end", report).or(first);
    if let (Some(a), Some(b)) = (first, last) {
        if b < a {
            report.error(
                &path.field("port_end"),
                format!("{b} is below port_start {a}"),
            );
            return;
        }
    }
    let mut sources = Vec::new();
    if let Some(v) = optional(map, "source_cidrs") {
        let p = path.field("source_cidrs");
        for (i, item) in array(v, &p, report).unwrap_or_default().iter().enumerate() {
            let ip = p.index(i);
            let Some(text) = string(item, &ip, report) else {
                continue;
            };
            match decode_cidr(text, &ip, report) {
                Some(net @ IpNet::V6(_)) => sources.push(net),
                Some(IpNet::V4(_)) => report.error(
                    &ip,
                    format!("{text:?}: the seed-002 shape takes IPv6 CIDRs only"),
                ),
                None => {}
            }
        }
    }
    if sources.is_empty() {
        sources.push(IpNet::V6(Ipv6Net::default()));
    }
    let description = optional(map, "description")
        .and_then(|v| string(v, &path.field("description"), report))
        .unwrap_or_default();
    let (Some(protocol), Some(first), Some(last)) = (protocol, first, last) else {
        return;
    };
    out.extend(sources.into_iter().map(|net| Rule {
        action: Action::Allow,
        target: Target::Cidr(net),
        protocol,
        ports: Ports::Range { first, last },
        description: description.to_string(),
    }));
}
