//! Addresses and numbers written straight into the ruleset text.
//!
//! A 10k-VM ruleset is ~60 MB, most of it set elements; going through `fmt` for every
//! address was a third of its rendering. These write the same characters as the
//! standard library's `Display` (RFC 5952 for IPv6, IPv4-mapped addresses dotted), which
//! the tests below check against it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// A port or port range as nft writes it: `443`, `8000-8080`.
pub(crate) fn push_ports(out: &mut String, first: u16, last: u16) {
    push_u32(out, u32::from(first));
    if first != last {
        out.push('-');
        push_u32(out, u32::from(last));
    }
}

/// A decimal number.
pub(crate) fn push_u32(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// Lowercase hex without leading zeros, as `{:x}` writes a `u16`.
fn push_hex16(out: &mut String, n: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12, 8, 4, 0] {
        let nibble = usize::from((n >> shift) & 0xf);
        if nibble != 0 || started || shift == 0 {
            started = true;
            out.push(char::from(HEX[nibble]));
        }
    }
}

/// `a.b.c.d`.
pub(crate) fn push_ipv4(out: &mut String, a: Ipv4Addr) {
    for (i, octet) in a.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_u32(out, u32::from(octet));
    }
}

/// RFC 5952, as `Ipv6Addr`'s `Display`: the first longest run of two or more zero groups
/// becomes `::`; IPv4-mapped addresses are written `::ffff:a.b.c.d`.
pub(crate) fn push_ipv6(out: &mut String, a: Ipv6Addr) {
    if let Some(v4) = a.to_ipv4_mapped() {
        out.push_str("::ffff:");
        push_ipv4(out, v4);
        return;
    }
    let segments = a.segments();
    let (mut best_start, mut best_len) = (0, 0);
    let (mut start, mut len) = (0, 0);
    for (i, &segment) in segments.iter().enumerate() {
        if segment == 0 {
            if len == 0 {
                start = i;
            }
            len += 1;
            if len > best_len {
                (best_start, best_len) = (start, len);
            }
        } else {
            len = 0;
        }
    }
    let groups = |out: &mut String, part: &[u16]| {
        for (i, &segment) in part.iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            push_hex16(out, segment);
        }
    };
    if best_len > 1 {
        groups(out, &segments[..best_start]);
        out.push_str("::");
        groups(out, &segments[best_start + best_len..]);
    } else {
        groups(out, &segments);
    }
}

/// An address of either family.
pub(crate) fn push_ip(out: &mut String, a: IpAddr) {
    match a {
        IpAddr::V4(a) => push_ipv4(out, a),
        IpAddr::V6(a) => push_ipv6(out, a),
    }
}

/// `address/prefix`, as `IpNet`'s `Display`.
pub(crate) fn push_net(out: &mut String, net: IpNet) {
    push_ip(out, net.addr());
    out.push('/');
    push_u32(out, u32::from(net.prefix_len()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn written(f: impl FnOnce(&mut String)) -> String {
        let mut out = String::new();
        f(&mut out);
        out
    }

    #[test]
    fn edge_cases_match_std() {
        for text in [
            "::",
            "::1",
            "1::",
            "1:0:0:1::",
            "0:0:1::",
            "1:0:1:0:1:0:1:0",
            "1:0:0:1:0:0:0:1",
            "::ffff:1.2.3.4",
            "::1.2.3.4",
            "fd5e:ed00:ff:1::2",
            "2001:db8::/32",
        ] {
            let Ok(a) = text.trim_end_matches("/32").parse::<Ipv6Addr>() else {
                continue;
            };
            assert_eq!(written(|o| push_ipv6(o, a)), a.to_string());
        }
        assert_eq!(written(|o| push_u32(o, 0)), "0");
        assert_eq!(written(|o| push_u32(o, u32::MAX)), u32::MAX.to_string());
    }

    proptest! {
        #[test]
        fn addresses_and_nets_are_written_as_std_writes_them(
            segments in prop::array::uniform8(prop_oneof![Just(0u16), Just(0xffff), any::<u16>()]),
            v4 in any::<u32>(),
            len6 in 0u8..=128,
            len4 in 0u8..=32,
        ) {
            let a6 = Ipv6Addr::from(segments);
            let a4 = Ipv4Addr::from(v4);
            prop_assert_eq!(written(|o| push_ipv6(o, a6)), a6.to_string());
            prop_assert_eq!(written(|o| push_ipv4(o, a4)), a4.to_string());
            let n6 = IpNet::new(IpAddr::V6(a6), len6).unwrap();
            let n4 = IpNet::new(IpAddr::V4(a4), len4).unwrap();
            prop_assert_eq!(written(|o| push_net(o, n6)), n6.to_string());
            prop_assert_eq!(written(|o| push_net(o, n4)), n4.to_string());
            let mapped = a4.to_ipv6_mapped();
            prop_assert_eq!(written(|o| push_ipv6(o, mapped)), mapped.to_string());
        }
    }
}
