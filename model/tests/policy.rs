//! Table tests of every FirewallPolicy rule seed 001 and seed 002 state.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use vmedge_model::{
    parse_policy, Action, DnsMode, FirewallPolicy, ModelError, PolicyShape, Ports, Protocol, Target,
};

fn ok(json: &str) -> (FirewallPolicy, PolicyShape) {
    match parse_policy(json) {
        Ok(p) => p.value,
        Err(e) => panic!("{json}\nrefused:\n{e}"),
    }
}

fn errors(json: &str) -> Vec<String> {
    match parse_policy(json) {
        Ok(p) => panic!("{json}\naccepted: {:?}", p.value),
        Err(ModelError::Invalid(errors)) => errors.iter().map(|e| e.to_string()).collect(),
        Err(e) => panic!("{json}\nnot a validation error: {e}"),
    }
}

fn ingress_rule(fields: &str) -> String {
    format!(
        r#"{{"ingress": {{"default": "deny", "rules": [{{"action": "allow", "kind": "cidr", "value": "::/0", {fields}}}]}}}}"#
    )
}

fn egress_rule(rule: &str, dns: &str) -> String {
    format!(r#"{{"egress": {{"default": "deny", "rules": [{rule}]}}, "dns": {dns}}}"#)
}

#[test]
fn missing_blocks_take_the_safe_defaults() {
    let (p, shape) = ok("{}");
    assert_eq!(shape, PolicyShape::Current);
    assert_eq!(p, FirewallPolicy::default());
    assert_eq!(p.ingress.default, Action::Deny);
    assert_eq!(p.egress.default, Action::Allow);
    assert_eq!(p.dns.mode, DnsMode::Deny);
    assert!(p.dns.domains.is_empty() && !p.dns.block_bypass);
    // A present block without "default" takes that direction's default too.
    let (p, _) = ok(r#"{"ingress": {"rules": []}, "egress": {}, "dns": {}}"#);
    assert_eq!(p, FirewallPolicy::default());
}

#[test]
fn ports_single_range_any() {
    let cases = [
        (r#""protocol": "tcp", "ports": "443""#, Ports::single(443)),
        (
            r#""protocol": "udp", "ports": "8080-8090""#,
            Ports::Range {
                first: 8080,
                last: 8090,
            },
        ),
        (
            r#""protocol": "tcp", "ports": "1-65535""#,
            Ports::Range {
                first: 1,
                last: 65535,
            },
        ),
        (r#""protocol": "tcp", "ports": "any""#, Ports::Any),
        (r#""protocol": "any", "ports": "any""#, Ports::Any),
        (r#""protocol": "tcp""#, Ports::Any),
    ];
    for (fields, want) in cases {
        let (p, _) = ok(&ingress_rule(fields));
        assert_eq!(p.ingress.rules[0].ports, want, "{fields}");
    }
}

#[test]
fn bad_ports_name_the_field_and_the_reason() {
    let cases = [
        (
            r#""protocol": "tcp", "ports": "80-""#,
            r#"ingress.rules[0].ports: "80-" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": "-80""#,
            r#"ingress.rules[0].ports: "-80" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": "0""#,
            r#"ingress.rules[0].ports: "0": ports are 1-65535"#,
        ),
        (
            r#""protocol": "tcp", "ports": "65536""#,
            r#"ingress.rules[0].ports: "65536": ports are 1-65535"#,
        ),
        (
            r#""protocol": "tcp", "ports": "90-80""#,
            r#"ingress.rules[0].ports: "90-80": the range starts after it ends"#,
        ),
        (
            r#""protocol": "tcp", "ports": "http""#,
            r#"ingress.rules[0].ports: "http" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": " 80""#,
            r#"ingress.rules[0].ports: " 80" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": "ANY""#,
            r#"ingress.rules[0].ports: "ANY" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": """#,
            r#"ingress.rules[0].ports: "" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": "1-2-3""#,
            r#"ingress.rules[0].ports: "1-2-3" is not a port or a range"#,
        ),
        (
            r#""protocol": "tcp", "ports": true"#,
            r#"ingress.rules[0].ports: expected a string, found a boolean"#,
        ),
    ];
    for (fields, want) in cases {
        assert_eq!(errors(&ingress_rule(fields)), [want], "{fields}");
    }
}

#[test]
fn protocol_any_forces_ports_any() {
    assert_eq!(
        errors(&ingress_rule(r#""protocol": "any", "ports": "443""#)),
        [
            r#"ingress.rules[0].ports: "443" needs protocol tcp or udp: with protocol any, ports must be "any""#
        ]
    );
    assert_eq!(
        errors(&ingress_rule(r#""ports": "443""#)),
        [
            r#"ingress.rules[0].ports: "443" needs protocol tcp or udp: with protocol any, ports must be "any""#
        ],
        "protocol defaults to any"
    );
    assert_eq!(
        errors(&ingress_rule(r#""protocol": "icmp""#)),
        [r#"ingress.rules[0].protocol: expected "tcp", "udp" or "any", found "icmp""#]
    );
}

#[test]
fn cidrs_of_both_families() {
    for (value, want) in [
        ("::/0", "::/0"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("198.18.0.1", "198.18.0.1/32"),
        ("fd5e:ed00::1", "fd5e:ed00::1/128"),
    ] {
        let json = format!(
            r#"{{"ingress": {{"rules": [{{"action": "allow", "kind": "cidr", "value": "{value}"}}]}}}}"#
        );
        let (p, _) = ok(&json);
        assert_eq!(
            p.ingress.rules[0].target,
            Target::Cidr(want.parse().unwrap())
        );
    }
    // Host bits are cleared, with a warning that says what is enforced.
    let parsed = parse_policy(
        r#"{"ingress": {"rules": [{"action": "allow", "kind": "cidr", "value": "10.1.2.3/8"}]}}"#,
    )
    .unwrap();
    assert_eq!(
        parsed.value.0.ingress.rules[0].target,
        Target::Cidr("10.0.0.0/8".parse().unwrap())
    );
    assert_eq!(
        parsed.warnings[0].to_string(),
        r#"ingress.rules[0].value: "10.1.2.3/8" has host bits set; it is enforced as 10.0.0.0/8"#
    );

    for bad in [
        "10.0.0.0/33",
        "::/129",
        "example.com",
        "10.0.0",
        "",
        "fd5e::/64/1",
    ] {
        let json = format!(
            r#"{{"ingress": {{"rules": [{{"action": "allow", "kind": "cidr", "value": "{bad}"}}]}}}}"#
        );
        assert_eq!(
            errors(&json),
            [format!(
                r#"ingress.rules[0].value: "{bad}" is not an IPv4 or IPv6 CIDR"#
            )]
        );
    }
}

#[test]
fn fqdn_is_egress_only() {
    let json =
        r#"{"ingress": {"rules": [{"action": "allow", "kind": "fqdn", "value": "example.com"}]}}"#;
    assert_eq!(
        errors(json),
        ["ingress.rules[0].kind: fqdn rules are egress only: inbound packets carry no domain name"]
    );
    let json =
        r#"{"egress": {"rules": [{"action": "allow", "kind": "domain", "value": "example.com"}]}}"#;
    assert_eq!(
        errors(json),
        [r#"egress.rules[0].kind: expected "cidr" or "fqdn", found "domain""#]
    );
}

#[test]
fn fqdn_values_with_an_optional_leading_wildcard() {
    for good in [
        "example.com",
        "*.example.com",
        "API.Example.com.",
        "a-b.c_d.example",
    ] {
        let json = egress_rule(
            &format!(
                r#"{{"action": "allow", "kind": "fqdn", "value": "{good}", "protocol": "tcp", "ports": "443"}}"#
            ),
            "{}",
        );
        let (p, _) = ok(&json);
        assert!(matches!(p.egress.rules[0].target, Target::Fqdn(_)));
        assert_eq!(p.egress.rules[0].protocol, Protocol::Tcp);
    }
    let cases = [
        ("*", "a bare wildcard is not allowed"),
        ("*.", "a bare wildcard is not allowed"),
        (
            "a.*.example.com",
            "a wildcard is allowed only as the whole leftmost label",
        ),
        (
            "*example.com",
            "a wildcard is allowed only as the whole leftmost label",
        ),
        (
            "example.*",
            "a wildcard is allowed only as the whole leftmost label",
        ),
        ("1.2.3.4", "is an IP address, not a domain name"),
        ("exa mple.com", "may contain only letters"),
        ("-x.example.com", "must not start or end with '-'"),
    ];
    for (bad, why) in cases {
        let json = egress_rule(
            &format!(r#"{{"action": "allow", "kind": "fqdn", "value": "{bad}"}}"#),
            "{}",
        );
        let errs = errors(&json);
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(errs[0].starts_with("egress.rules[0].value: "), "{errs:?}");
        assert!(errs[0].contains(why), "{bad}: {errs:?}");
    }
}

#[test]
fn an_fqdn_rule_the_dns_policy_blocks_is_dead() {
    let rule = |v: &str| {
        format!(
            r#"{{"action": "allow", "kind": "fqdn", "value": "{v}", "protocol": "tcp", "ports": "443"}}"#
        )
    };
    let dead = [
        (
            "api.example.com",
            r#"{"mode": "deny", "domains": ["api.example.com"]}"#,
        ),
        (
            "api.example.com",
            r#"{"mode": "deny", "domains": ["*.example.com"]}"#,
        ),
        (
            "*.api.example.com",
            r#"{"mode": "deny", "domains": ["*.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "deny", "domains": ["*.example.com"]}"#,
        ),
        (
            "api.example.com",
            r#"{"mode": "allow", "domains": ["*.other.com"]}"#,
        ),
        (
            "example.com",
            r#"{"mode": "allow", "domains": ["*.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "allow", "domains": ["example.com"]}"#,
        ),
        ("api.example.com", r#"{"mode": "allow", "domains": []}"#),
    ];
    for (value, dns) in dead {
        let errs = errors(&egress_rule(&rule(value), dns));
        assert_eq!(errs.len(), 1, "{value} {dns}: {errs:?}");
        assert!(
            errs[0].starts_with(&format!(
                "egress.rules[0].value: \"{value}\" is a dead rule"
            )),
            "{errs:?}"
        );
    }
    let alive = [
        (
            "example.com",
            r#"{"mode": "deny", "domains": ["*.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "deny", "domains": ["api.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "deny", "domains": ["*.api.example.com"]}"#,
        ),
        (
            "api.example.com",
            r#"{"mode": "allow", "domains": ["*.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "allow", "domains": ["api.example.com"]}"#,
        ),
        (
            "*.example.com",
            r#"{"mode": "allow", "domains": ["*.com"]}"#,
        ),
        ("api.example.com", r#"{"mode": "deny", "domains": []}"#),
        ("api.example.com", "{}"),
    ];
    for (value, dns) in alive {
        ok(&egress_rule(&rule(value), dns));
    }
}

#[test]
fn dns_policy_fields() {
    let (p, _) = ok(
        r#"{"dns": {"mode": "allow", "domains": ["*.pypi.org", "github.com"], "block_bypass": true}}"#,
    );
    assert_eq!(p.dns.mode, DnsMode::Allow);
    assert_eq!(p.dns.domains.len(), 2);
    assert!(p.dns.block_bypass);
    assert!(p.dns.resolves("files.pypi.org") && p.dns.resolves("GitHub.com."));
    assert!(!p.dns.resolves("pypi.org") && !p.dns.resolves("evil.com"));
    let (p, _) = ok(r#"{"dns": {"blockBypass": true}}"#);
    assert!(
        p.dns.block_bypass,
        "the server's camelCase name is accepted too"
    );
    assert_eq!(
        errors(r#"{"dns": {"mode": "block", "domains": ["*"], "block_bypass": "yes"}}"#),
        [
            r#"dns.mode: expected "allow" or "deny", found "block""#,
            r#"dns.domains[0]: "*" a bare wildcard is not allowed; write *.example.com"#,
            "dns.block_bypass: expected true or false, found a string",
        ]
    );
}

#[test]
fn actions_defaults_and_unknown_fields() {
    assert_eq!(
        errors(r#"{"ingress": {"default": "block", "rules": [{"action": "permit", "kind": "cidr", "value": "::/0", "port": 22}]}, "extra": 1}"#),
        [
            "extra: unknown field; expected one of: ingress, egress, dns",
            r#"ingress.default: expected "allow" or "deny", found "block""#,
            "ingress.rules[0].port: unknown field; expected one of: action, kind, value, protocol, ports, description",
            r#"ingress.rules[0].action: expected "allow" or "deny", found "permit""#,
        ]
    );
    assert_eq!(
        errors(r#"{"egress": {"rules": [{}]}}"#),
        [
            "egress.rules[0].action: is required",
            "egress.rules[0].kind: is required",
            "egress.rules[0].value: is required",
        ]
    );
    assert_eq!(
        errors(r#"{"ingress": []}"#),
        ["ingress: expected an object, found an array"]
    );
    assert_eq!(errors("[]"), ["expected an object, found an array"]);
}

#[test]
fn every_error_of_a_document_is_reported() {
    let json = r#"{
        "ingress": {"rules": [
            {"action": "allow", "kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "80-"},
            {"action": "allow", "kind": "cidr", "value": "300.0.0.0/8", "protocol": "tcp", "ports": "22"}
        ]},
        "egress": {"rules": [
            {"action": "deny", "kind": "fqdn", "value": "a.*.b", "protocol": "udp", "ports": "53"}
        ]},
        "dns": {"mode": "maybe"}
    }"#;
    assert_eq!(errors(json).len(), 4);
}

#[test]
fn seed_002_shape_is_converted() {
    let (p, shape) = ok(r#"{"mode": "restricted", "ingress": [
        {"protocol": "tcp", "port_start": 8080, "port_end": 8090, "source_cidrs": ["2001:db8::/32", "fd5e:ed00::/32"], "description": "app"},
        {"protocol": "udp", "port_start": 51820}
    ]}"#);
    assert_eq!(shape, PolicyShape::Legacy);
    assert_eq!(p.ingress.default, Action::Deny);
    assert_eq!(p.ingress.rules.len(), 3, "one rule per source cidr");
    assert_eq!(
        p.ingress.rules[0].target,
        Target::Cidr("2001:db8::/32".parse().unwrap())
    );
    assert_eq!(
        p.ingress.rules[0].ports,
        Ports::Range {
            first: 8080,
            last: 8090
        }
    );
    assert_eq!(p.ingress.rules[0].description, "app");
    assert_eq!(
        p.ingress.rules[2].target,
        Target::Cidr("::/0".parse().unwrap()),
        "no sources: any"
    );
    assert_eq!(p.ingress.rules[2].ports, Ports::single(51820));
    assert_eq!(p.ingress.rules[2].protocol, Protocol::Udp);
    assert_eq!(p.egress, FirewallPolicy::default().egress);
    assert_eq!(p.dns, FirewallPolicy::default().dns);

    let (p, _) = ok(r#"{"mode": "open"}"#);
    assert_eq!(p.ingress.default, Action::Allow);

    assert_eq!(
        errors(
            r#"{"mode": "closed", "ingress": [
            {"protocol": "icmp", "port_start": 0},
            {"protocol": "tcp", "port_start": 90, "port_end": 80},
            {"protocol": "tcp", "port_start": 22, "source_cidrs": ["10.0.0.0/8"]},
            {"protocol": "tcp"}
        ], "egress": {}}"#
        ),
        [
            "egress: unknown field; expected one of: mode, ingress",
            r#"mode: expected "open" or "restricted", found "closed""#,
            r#"ingress[0].protocol: expected "tcp" or "udp", found "icmp""#,
            "ingress[0].port_start: expected a port 1-65535, found 0",
            "ingress[1].port_end: 80 is below port_start 90",
            r#"ingress[2].source_cidrs[0]: "10.0.0.0/8": the seed-002 shape takes IPv6 CIDRs only"#,
            "ingress[3].port_start: is required",
        ]
    );
}

#[test]
fn syntax_errors_give_line_and_column() {
    match parse_policy("{\n  \"ingress\": {,\n}") {
        Err(ModelError::Syntax { line, column, .. }) => assert_eq!((line, column), (2, 15)),
        other => panic!("{other:?}"),
    }
}
