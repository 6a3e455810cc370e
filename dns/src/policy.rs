//! What the gate does for one VM: which names resolve, which fqdn sets an answer fills,
//! how fast it may ask. Built from the VM's policy once per change, not per query.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use vmedge_firewall::FqdnSets;
use vmedge_model::{DnsMode, DomainPattern, RateLimit, TokenBucket, Vm, VmId};

use crate::names::PatternIndex;
use crate::sets::FqdnElement;

/// The canary Firefox asks before it turns DoH on: NXDOMAIN keeps it off.
pub const DOH_CANARY: &str = "use-application-dns.net";
/// Discovery of Designated Resolvers (RFC 9462): NODATA, the gate offers no encrypted DNS.
pub const DDR_NAME: &str = "_dns.resolver.arpa";

/// The curated list of DoH/DoT service names (`data/doh-hostnames.txt`).
pub const DOH_HOSTNAMES: &str = include_str!("../data/doh-hostnames.txt");

static BYPASS: LazyLock<PatternIndex<()>> = LazyLock::new(|| {
    let patterns: Vec<DomainPattern> = doh_patterns()
        .chain(std::iter::once(DOH_CANARY))
        .filter_map(|line| DomainPattern::parse(line).ok())
        .collect();
    PatternIndex::new(patterns.iter().map(|p| (p, ())))
});

/// The lines of the DoH list that name something (comments and blanks dropped).
pub fn doh_patterns() -> impl Iterator<Item = &'static str> {
    DOH_HOSTNAMES
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

/// What the gate does with a name for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Ask upstream (or the cache).
    Resolve,
    /// NXDOMAIN, with an SOA so it is cached negatively.
    Blocked,
    /// NOERROR with no records.
    NoData,
}

/// One VM as the gate sees it.
#[derive(Debug)]
pub struct VmView {
    /// The VM as the state had it when this view was built (to tell when to rebuild).
    pub vm: Vm,
    mode: DnsMode,
    listed: PatternIndex<()>,
    block_bypass: bool,
    /// The VM's fqdn sets, by the index `fqdn_index` gives.
    pub fqdn_sets: Vec<FqdnSets>,
    fqdn_index: PatternIndex<u16>,
    budget: Option<TokenBucket>,
}

impl VmView {
    /// The view of `vm`: its dns policy and the fqdn sets its compiled rules keep.
    pub fn new(vm: &Vm, limit: Option<RateLimit>) -> VmView {
        let policy = &vm.firewall.dns;
        let targets = vmedge_firewall::fqdn_targets(vm);
        let fqdn_index = PatternIndex::new(
            targets
                .iter()
                .enumerate()
                .map(|(i, (pattern, _))| (pattern, u16::try_from(i).unwrap_or(u16::MAX))),
        );
        VmView {
            vm: vm.clone(),
            mode: policy.mode,
            listed: PatternIndex::new(policy.domains.iter().map(|d| (d, ()))),
            block_bypass: policy.block_bypass,
            fqdn_sets: targets.into_iter().map(|(_, sets)| sets).collect(),
            fqdn_index,
            budget: limit.map(TokenBucket::new),
        }
    }

    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.vm.id
    }

    /// What to do with `name` (normalized). The policy applies to the queried name and
    /// to every CNAME target of its answer.
    pub fn verdict(&self, name: &str) -> Verdict {
        if name == DDR_NAME {
            return Verdict::NoData;
        }
        if self.block_bypass && BYPASS.matches(name) {
            return Verdict::Blocked;
        }
        let listed = self.listed.matches(name);
        match (self.mode, listed) {
            (DnsMode::Allow, true) | (DnsMode::Deny, false) => Verdict::Resolve,
            (DnsMode::Allow, false) | (DnsMode::Deny, true) => Verdict::Blocked,
        }
    }

    /// True when the VM has fqdn rules at all.
    pub fn has_fqdn_rules(&self) -> bool {
        !self.fqdn_index.is_empty()
    }

    /// Marks in `hit` the fqdn sets whose pattern matches `name` (normalized).
    pub fn fqdn_matches(&self, name: &str, hit: &mut Vec<u16>) {
        self.fqdn_index.each_match(name, |i| {
            if !hit.contains(&i) {
                hit.push(i);
            }
        });
    }

    /// Onto `out`, the elements an answered address makes: one in each hit set of its
    /// family. A VM without an IPv4 address has no IPv4 sets: no IPv4 packet is its, so
    /// an IPv4 address opens nothing.
    pub fn set_elements(
        &self,
        hit: &[u16],
        addr: IpAddr,
        timeout: Duration,
        out: &mut Vec<FqdnElement>,
    ) {
        for &i in hit {
            let Some(sets) = self.fqdn_sets.get(usize::from(i)) else {
                continue;
            };
            let set = match addr {
                IpAddr::V4(_) => match &sets.v4 {
                    Some(v4) => v4,
                    None => continue,
                },
                IpAddr::V6(_) => &sets.v6,
            };
            out.push(FqdnElement {
                set: set.clone(),
                addr,
                timeout,
            });
        }
    }

    /// Takes one query from the VM's budget; false when it is spent.
    pub fn allow_query(&self) -> bool {
        self.budget.as_ref().is_none_or(TokenBucket::take)
    }
}

/// How long an address from an answer stays in an fqdn set: the TTL, never less than
/// `floor` (a short TTL must not close a connection the VM just opened), plus `grace`.
pub fn set_timeout(ttl: u32, floor: Duration, grace: Duration) -> Duration {
    Duration::from_secs(u64::from(ttl)).max(floor) + grace
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn vm(firewall: serde_json::Value) -> Vm {
        let state = vmedge_model::state_from_value(&json!({"vms": [{
            "id": "6f1c2d3e-0000-4000-8000-0000000000aa", "org_id": "o", "worker": "w",
            "public_ipv6": "fd5e:ed00:1::2", "status": "running", "services": [],
            "firewall": firewall}]}))
        .unwrap()
        .value;
        state.vms.into_iter().next().unwrap()
    }

    fn dns(mode: &str, domains: &[&str], block_bypass: bool) -> VmView {
        VmView::new(
            &vm(json!({"ingress": {"default": "deny", "rules": []},
                       "egress": {"default": "allow", "rules": []},
                       "dns": {"mode": mode, "domains": domains, "block_bypass": block_bypass}})),
            None,
        )
    }

    #[test]
    fn allow_mode_resolves_only_listed_names() {
        let v = dns("allow", &["example.com", "*.example.org"], false);
        assert_eq!(v.verdict("example.com"), Verdict::Resolve);
        assert_eq!(v.verdict("a.example.org"), Verdict::Resolve);
        assert_eq!(v.verdict("example.org"), Verdict::Blocked);
        assert_eq!(v.verdict("www.example.com"), Verdict::Blocked);
    }

    #[test]
    fn deny_mode_blocks_listed_names_and_empty_deny_resolves_all() {
        let v = dns("deny", &["*.ads.example"], false);
        assert_eq!(v.verdict("x.ads.example"), Verdict::Blocked);
        assert_eq!(v.verdict("ads.example"), Verdict::Resolve);
        let open = dns("deny", &[], false);
        assert_eq!(open.verdict("anything.test"), Verdict::Resolve);
    }

    #[test]
    fn block_bypass_blocks_the_canary_and_doh_names_ddr_is_nodata() {
        let v = dns("deny", &[], true);
        assert_eq!(v.verdict(DOH_CANARY), Verdict::Blocked);
        assert_eq!(v.verdict("dns.google"), Verdict::Blocked);
        assert_eq!(v.verdict("abc123.dns.nextdns.io"), Verdict::Blocked);
        assert_eq!(v.verdict("google.com"), Verdict::Resolve);
        assert_eq!(v.verdict(DDR_NAME), Verdict::NoData);
        let off = dns("deny", &[], false);
        assert_eq!(off.verdict("dns.google"), Verdict::Resolve);
        assert_eq!(off.verdict(DDR_NAME), Verdict::NoData);
    }

    #[test]
    fn every_line_of_the_doh_list_is_a_pattern() {
        for line in doh_patterns() {
            assert!(DomainPattern::parse(line).is_ok(), "{line}");
        }
        assert!(doh_patterns().count() > 20);
    }

    #[test]
    fn fqdn_sets_are_the_compiler_s_and_found_by_pattern() {
        let v = VmView::new(
            &vm(json!({"ingress": {"default": "deny", "rules": []},
                       "egress": {"default": "deny", "rules": [
                           {"action": "allow", "kind": "fqdn", "value": "*.example.com", "protocol": "tcp", "ports": "443"},
                           {"action": "allow", "kind": "fqdn", "value": "api.example.com", "protocol": "tcp", "ports": "8443"},
                           {"action": "allow", "kind": "fqdn", "value": "*.example.com", "protocol": "udp", "ports": "53"}]},
                       "dns": {"mode": "deny", "domains": [], "block_bypass": false}})),
            None,
        );
        assert_eq!(
            v.fqdn_sets.len(),
            2,
            "one pair of sets per distinct pattern"
        );
        let mut hit = Vec::new();
        v.fqdn_matches("api.example.com", &mut hit);
        v.fqdn_matches("cdn.example.com", &mut hit);
        hit.sort_unstable();
        assert_eq!(hit, vec![0, 1]);
        assert_eq!(
            v.fqdn_sets[1],
            vmedge_firewall::fqdn_sets(&v.vm, &DomainPattern::parse("api.example.com").unwrap())
        );
        // The VM has no IPv4 address: no IPv4 sets to fill.
        assert!(v.fqdn_sets.iter().all(|sets| sets.v4.is_none()));
    }

    #[test]
    fn an_answered_address_goes_to_the_hit_sets_of_its_family_only() {
        let egress = json!({"default": "deny", "rules": [
            {"action": "allow", "kind": "fqdn", "value": "*.example.com", "protocol": "tcp", "ports": "443"},
            {"action": "allow", "kind": "fqdn", "value": "api.example.com", "protocol": "tcp", "ports": "8443"}]});
        let firewall = json!({"ingress": {"default": "deny", "rules": []}, "egress": egress,
                              "dns": {"mode": "deny", "domains": [], "block_bypass": false}});
        let (v4, v6): (IpAddr, IpAddr) = (
            "198.18.5.5".parse().unwrap(),
            "fd5e:ed00:5::5".parse().unwrap(),
        );
        let ttl = Duration::from_secs(60);
        let hit = [0u16, 1];
        let elements = |view: &VmView, addr| {
            let mut out = Vec::new();
            view.set_elements(&hit, addr, ttl, &mut out);
            out.into_iter()
                .map(|e| (e.set, e.addr, e.timeout))
                .collect::<Vec<_>>()
        };

        // No IPv4 address: its AAAA answers fill both IPv6 sets, its A answers nothing.
        let v6_only = VmView::new(&vm(firewall.clone()), None);
        let sets = &v6_only.fqdn_sets;
        assert_eq!(
            elements(&v6_only, v6),
            [(sets[0].v6.clone(), v6, ttl), (sets[1].v6.clone(), v6, ttl)]
        );
        assert_eq!(elements(&v6_only, v4), []);

        // With one: A answers fill the IPv4 sets.
        let mut dual = vm(firewall);
        dual.interface = Some("vmtap0".into());
        dual.ipv4 = Some("198.18.0.2".parse().unwrap());
        let dual = VmView::new(&dual, None);
        let v4_sets: Vec<String> = dual.fqdn_sets.iter().filter_map(|s| s.v4.clone()).collect();
        assert_eq!(v4_sets.len(), 2);
        assert_eq!(
            elements(&dual, v4),
            [(v4_sets[0].clone(), v4, ttl), (v4_sets[1].clone(), v4, ttl)]
        );
    }

    #[test]
    fn the_rate_limit_spends_a_burst_then_refuses() {
        let mut v = dns("deny", &[], false);
        v.budget = Some(TokenBucket::new(RateLimit {
            per_second: 0.001,
            burst: 3.0,
        }));
        assert!((0..3).all(|_| v.allow_query()));
        assert!(!v.allow_query());
    }

    #[test]
    fn set_timeouts_have_a_floor_and_grace() {
        let s = Duration::from_secs;
        assert_eq!(set_timeout(1, s(30), s(10)), s(40));
        assert_eq!(set_timeout(300, s(30), s(10)), s(310));
    }
}
