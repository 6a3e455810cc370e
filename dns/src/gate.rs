//! One query, start to finish: who asks, may they, what upstream says, what the VM's
//! policy lets through, and the fqdn sets filled before the answer goes out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{HINFO, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use vmedge_model::{RateLimit, VmId};
use vmedge_registry::Snapshot;

use crate::cache::{Answer, Cache, CacheConfig, Lookup};
use crate::confirmed::Confirmed;
use crate::metrics::{Metrics, Outcome};
use crate::names::normalize;
use crate::policy::{set_timeout, Verdict, VmView};
use crate::sets::SetWriter;
use crate::upstream::{Upstream, UpstreamConfig};

/// The largest answer sent over UDP (DNS flag day 2020); larger ones go out truncated.
pub const MAX_UDP_ANSWER: u16 = 1232;

/// Everything the gate is told at start.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// This worker's name: only its VMs are answered.
    pub worker: String,
    /// The resolvers to forward to.
    pub upstream: UpstreamConfig,
    /// Cache limits and the stale window.
    pub cache: CacheConfig,
    /// An address stays in an fqdn set at least this long, whatever its TTL.
    pub fqdn_floor: Duration,
    /// Added to every fqdn set timeout, so a connection opened at the TTL's end still gets out.
    pub fqdn_grace: Duration,
    /// Addresses of one answer put in the sets at most (the rest are dropped from it).
    pub max_addrs_per_name: usize,
    /// How long an answer waits for the kernel to confirm its set insert; then SERVFAIL.
    pub insert_timeout: Duration,
    /// Each VM's query budget; `None` for no limit.
    pub rate_limit: Option<RateLimit>,
    /// The TTL of the gate's own NXDOMAIN / NODATA answers (and their SOA).
    pub blocked_ttl: u32,
    /// Private addresses that may still appear in answers (everything else private or
    /// loopback is dropped from answers: DNS rebinding).
    pub rebind_allow: Vec<IpNet>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            worker: "worker-1".into(),
            upstream: UpstreamConfig::default(),
            cache: CacheConfig::default(),
            fqdn_floor: Duration::from_secs(60),
            fqdn_grace: Duration::from_secs(30),
            max_addrs_per_name: 32,
            insert_timeout: Duration::from_millis(100),
            rate_limit: Some(RateLimit {
                per_second: 500.0,
                burst: 1000.0,
            }),
            blocked_ttl: 30,
            rebind_allow: Vec::new(),
        }
    }
}

/// How a query arrived: it decides how large an answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// At most the client's EDNS size (512 without EDNS), never above [`MAX_UDP_ANSWER`].
    Udp,
    /// Up to 64 KiB.
    Tcp,
}

struct Views {
    snapshot: Arc<Snapshot>,
    vms: HashMap<VmId, Arc<VmView>>,
}

/// What goes back to the VM, before it is encoded.
struct Reply {
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

impl Reply {
    fn code(rcode: ResponseCode) -> Reply {
        Reply {
            rcode,
            answers: Vec::new(),
            authorities: Vec::new(),
        }
    }
}

/// The DNS gate of one worker.
pub struct Gate {
    config: GateConfig,
    views: ArcSwap<Views>,
    cache: Cache,
    upstream: Upstream,
    sets: Arc<dyn SetWriter>,
    confirmed: Confirmed,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("worker", &self.config.worker)
            .field("vms", &self.views.load().vms.len())
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Gate {
    /// A gate that answers no one until [`Gate::update`] gives it a state.
    pub fn new(config: GateConfig, sets: Arc<dyn SetWriter>, metrics: Arc<Metrics>) -> Gate {
        Gate {
            views: ArcSwap::from_pointee(Views {
                snapshot: Arc::new(Snapshot::empty()),
                vms: HashMap::new(),
            }),
            cache: Cache::new(config.cache),
            upstream: Upstream::new(config.upstream.clone()),
            sets,
            confirmed: Confirmed::new(config.fqdn_grace),
            metrics,
            config,
        }
    }

    /// Puts a new state in force. Views of VMs that did not change are kept (with their
    /// rate budgets); the others are rebuilt.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        let old = self.views.load();
        let mut vms = HashMap::new();
        for vm in snapshot.worker_vms(&self.config.worker) {
            let view = match old.vms.get(&vm.id) {
                Some(view) if view.vm == *vm => view.clone(),
                _ => Arc::new(VmView::new(vm, self.config.rate_limit)),
            };
            vms.insert(vm.id, view);
        }
        self.views.store(Arc::new(Views { snapshot, vms }));
        // A changed state may have remade a VM's sets empty.
        self.confirmed.clear();
    }

    /// Drops cache entries past their stale window.
    pub fn sweep_cache(&self) {
        self.cache.sweep(Instant::now());
    }

    /// The answer to one query from `src`, encoded; `None` when nothing should be sent
    /// (the datagram was a response, or too short to carry an id).
    pub async fn handle(&self, src: IpAddr, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(_) => {
                self.metrics.count(Outcome::FormErr);
                return formerr_from_header(query);
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let (reply, outcome) = self.respond(src, &request).await;
        self.metrics.count(outcome);
        self.encode(&request, reply, transport)
    }

    async fn respond(&self, src: IpAddr, request: &Message) -> (Reply, Outcome) {
        if request.metadata.op_code != OpCode::Query {
            return (Reply::code(ResponseCode::NotImp), Outcome::Refused);
        }
        let [query] = request.queries.as_slice() else {
            return (Reply::code(ResponseCode::FormErr), Outcome::FormErr);
        };
        let view = {
            let views = self.views.load();
            let found = views
                .snapshot
                .vm_by_source(&self.config.worker, src)
                .and_then(|vm| views.vms.get(&vm.id));
            match found {
                Some(view) => view.clone(),
                // Never an open resolver: only this worker's VMs are answered.
                None => return (Reply::code(ResponseCode::Refused), Outcome::Refused),
            }
        };
        if !view.allow_query() {
            return (Reply::code(ResponseCode::Refused), Outcome::RateLimited);
        }
        let name = normalize(query.name());
        match view.verdict(&name) {
            Verdict::Resolve => {}
            Verdict::Blocked => {
                tracing::info!(vm = %view.id(), name, qtype = %query.query_type(), "blocked by the VM's dns policy");
                return (
                    self.negative(query, ResponseCode::NXDomain),
                    Outcome::Blocked,
                );
            }
            Verdict::NoData => {
                return (
                    self.negative(query, ResponseCode::NoError),
                    Outcome::Synthesized,
                )
            }
        }
        if query.query_class() != DNSClass::IN {
            return (Reply::code(ResponseCode::Refused), Outcome::Refused);
        }
        match query.query_type() {
            RecordType::ANY => return (rfc8482(query), Outcome::Synthesized),
            RecordType::AXFR | RecordType::IXFR => {
                return (Reply::code(ResponseCode::Refused), Outcome::Refused)
            }
            _ => {}
        }
        let (mut answer, outcome) = match self.lookup(query, name.as_str()).await {
            Ok(found) => found,
            Err(()) => return (Reply::code(ResponseCode::ServFail), Outcome::ServFail),
        };
        let chain = keep_chain(query.name(), &mut answer.answers);
        if let Some(target) = chain.iter().find(|t| view.verdict(t) == Verdict::Blocked) {
            tracing::info!(vm = %view.id(), name, target, "CNAME target blocked by the VM's dns policy");
            return (
                self.negative(query, ResponseCode::NXDomain),
                Outcome::Blocked,
            );
        }
        answer.answers.retain(|r| !self.rebinding(r));
        if view.has_fqdn_rules() {
            let mut hit = Vec::new();
            view.fqdn_matches(&name, &mut hit);
            for target in &chain {
                view.fqdn_matches(target, &mut hit);
            }
            if !hit.is_empty() {
                strip_address_hints(&mut answer.answers);
                if let Err(why) = self.fill_sets(&view, &hit, &mut answer.answers).await {
                    tracing::warn!(vm = %view.id(), name, "SERVFAIL: the fqdn sets could not be filled: {why}");
                    return (Reply::code(ResponseCode::ServFail), Outcome::ServFail);
                }
            }
        }
        // Owner names as the VM asked them (upstream saw our 0x20 spelling).
        for record in &mut answer.answers {
            if record.name == *query.name() {
                record.name = query.name().clone();
            }
        }
        let reply = Reply {
            rcode: answer.rcode,
            answers: answer.answers,
            authorities: answer.authorities,
        };
        (reply, outcome)
    }

    /// The cache, else upstream, else a stale cached answer.
    async fn lookup(&self, query: &Query, name: &str) -> Result<(Answer, Outcome), ()> {
        let key = (
            name.into(),
            u16::from(query.query_type()),
            u16::from(query.query_class()),
        );
        let stale = match self.cache.get(&key, Instant::now()) {
            Lookup::Fresh(answer) => {
                self.metrics.cache_hits.inc();
                return Ok((answer, Outcome::Answered));
            }
            Lookup::Stale(answer) => Some(answer),
            Lookup::Miss => None,
        };
        self.metrics.cache_misses.inc();
        let started = Instant::now();
        let fresh = self
            .upstream
            .query(query.name(), query.query_type(), query.query_class())
            .await;
        match fresh {
            Ok(message)
                if matches!(
                    message.metadata.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ) =>
            {
                self.metrics
                    .upstream_seconds
                    .observe(started.elapsed().as_secs_f64());
                let answer = Answer {
                    rcode: message.metadata.response_code,
                    answers: message.answers,
                    authorities: message.authorities,
                };
                self.cache.put(key, &answer, Instant::now());
                Ok((answer, Outcome::Answered))
            }
            other => {
                self.metrics.upstream_failures.inc();
                match &other {
                    Ok(m) => {
                        tracing::debug!(name, rcode = %m.metadata.response_code, "upstream failed")
                    }
                    Err(e) => tracing::warn!(name, "upstream failed: {e}"),
                }
                match stale {
                    Some(answer) => Ok((answer, Outcome::Stale)),
                    None => Err(()),
                }
            }
        }
    }

    /// Puts the answer's addresses in every hit set and waits for the kernel to confirm.
    async fn fill_sets(
        &self,
        view: &VmView,
        hit: &[u16],
        answers: &mut Vec<Record>,
    ) -> Result<(), String> {
        let mut kept = 0usize;
        let max = self.config.max_addrs_per_name;
        // The cap: addresses past it leave the answer too, so the VM never sees one the
        // firewall will not let it reach.
        answers.retain(|r| match r.data {
            RData::A(_) | RData::AAAA(_) => {
                kept += 1;
                kept <= max
            }
            _ => true,
        });
        let mut elements = Vec::new();
        for record in answers.iter() {
            let addr = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            let timeout = set_timeout(record.ttl, self.config.fqdn_floor, self.config.fqdn_grace);
            view.set_elements(hit, addr, timeout, &mut elements);
        }
        if elements.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        if self.confirmed.covers(started, &elements) {
            self.metrics.set_insert_skips.inc();
            return Ok(());
        }
        let result = tokio::time::timeout(
            self.config.insert_timeout,
            self.sets.insert(elements.clone()),
        )
        .await;
        match result {
            Ok(Ok(())) => {
                self.confirmed.record(started, &elements);
                self.metrics.set_inserts.inc();
                self.metrics
                    .set_insert_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Ok(Err(e)) => {
                self.metrics.set_insert_failures.inc();
                Err(e.to_string())
            }
            Err(_) => {
                self.metrics.set_insert_failures.inc();
                Err(format!(
                    "not confirmed within {:?}",
                    self.config.insert_timeout
                ))
            }
        }
    }

    /// True for an address record the VM must not see: private or loopback, unless allowed.
    fn rebinding(&self, record: &Record) -> bool {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => return false,
        };
        is_private(addr) && !self.config.rebind_allow.iter().any(|n| n.contains(&addr))
    }

    /// NXDOMAIN (blocked) or NODATA, with an SOA so the VM caches it for `blocked_ttl`.
    fn negative(&self, query: &Query, rcode: ResponseCode) -> Reply {
        let ttl = self.config.blocked_ttl;
        let soa = SOA::new(
            gate_name("gate"),
            gate_name("hostmaster"),
            1,
            3600,
            600,
            86400,
            ttl,
        );
        Reply {
            rcode,
            answers: Vec::new(),
            authorities: vec![Record::from_rdata(
                query.name().clone(),
                ttl,
                RData::SOA(soa),
            )],
        }
    }

    fn encode(&self, request: &Message, reply: Reply, transport: Transport) -> Option<Vec<u8>> {
        let mut message = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        message.metadata = Metadata::response_from_request(&request.metadata);
        message.metadata.recursion_available = true;
        message.metadata.response_code = reply.rcode;
        // The question is repeated back, except to a malformed request (say 19 questions
        // where one is allowed), which would have its bulk echoed.
        if reply.rcode != ResponseCode::FormErr {
            message.add_queries(request.queries.iter().cloned());
        }
        message.insert_answers(reply.answers);
        message.insert_authorities(reply.authorities);
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_ANSWER);
            message.set_edns(edns);
        }
        let limit = match transport {
            Transport::Udp => request
                .edns
                .as_ref()
                .map_or(512, |e| e.max_payload().max(512))
                .min(MAX_UDP_ANSWER),
            Transport::Tcp => u16::MAX,
        };
        let bytes = message.to_vec().ok()?;
        if bytes.len() <= usize::from(limit) {
            return Some(bytes);
        }
        self.metrics.truncated.inc();
        let truncated = message.truncate();
        let bytes = truncated.to_vec().ok()?;
        if bytes.len() <= usize::from(limit) {
            return Some(bytes);
        }
        // Even the question does not fit: the header alone, TC set (found by fuzz/dns_query).
        let mut header = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        header.metadata = truncated.metadata;
        header.to_vec().ok()
    }
}

/// `<label>.vmedge.invalid.`: names in the gate's own SOA.
fn gate_name(label: &str) -> Name {
    Name::from_ascii(format!("{label}.vmedge.invalid.")).unwrap_or_else(|_| Name::root())
}

/// RFC 8482: ANY is answered with one synthesized HINFO, not every record.
fn rfc8482(query: &Query) -> Reply {
    let hinfo = HINFO::new("RFC8482".into(), String::new());
    Reply {
        rcode: ResponseCode::NoError,
        answers: vec![Record::from_rdata(
            query.name().clone(),
            3600,
            RData::HINFO(hinfo),
        )],
        authorities: Vec::new(),
    }
}

/// FORMERR for a query we cannot parse, when its header at least is there.
fn formerr_from_header(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None; // a response: never answer one (no reflection loops)
    }
    let mut answer = vec![0u8; 12];
    answer[..2].copy_from_slice(&header[..2]);
    answer[2] = 0x80 | (header[2] & 0x78); // QR, the query's opcode
    answer[3] = 0x80 | 1; // RA, FORMERR
    Some(answer)
}

/// Keeps only the answer records on the CNAME chain from `qname` (anything else an
/// upstream slipped in is dropped) and returns the chain's targets, normalized.
fn keep_chain(qname: &Name, answers: &mut Vec<Record>) -> Vec<String> {
    let mut owners: Vec<Name> = vec![qname.clone()];
    let mut targets = Vec::new();
    // A chain is short; follow it in as many passes as it has links.
    loop {
        let mut grew = false;
        for record in answers.iter() {
            if let RData::CNAME(target) = &record.data {
                if owners.contains(&record.name) && !owners.contains(&target.0) {
                    owners.push(target.0.clone());
                    targets.push(normalize(&target.0));
                    grew = true;
                }
            }
        }
        if !grew || owners.len() > 16 {
            break;
        }
    }
    answers.retain(|r| owners.contains(&r.name));
    targets
}

/// HTTPS/SVCB records lose their address hints: a client could connect to a hinted
/// address the fqdn sets never got.
fn strip_address_hints(answers: &mut [Record]) {
    use hickory_proto::rr::rdata::svcb::SvcParamKey;
    for record in answers {
        let params = match &mut record.data {
            RData::HTTPS(https) => &mut https.0.svc_params,
            RData::SVCB(svcb) => &mut svcb.svc_params,
            _ => continue,
        };
        params.retain(|(key, _)| !matches!(key, SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint));
    }
}

/// Loopback, private, link-local, shared, benchmark and unspecified addresses: what a
/// public name must not point a VM at (DNS rebinding).
pub fn is_private(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let [b0, b1, ..] = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || b0 == 0
                || (b0 == 100 && (b1 & 0xc0) == 64) // 100.64.0.0/10
                || (b0 == 198 && (b1 & 0xfe) == 18) // 198.18.0.0/15
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let first = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // fc00::/7
                || (first & 0xffc0) == 0xfe80 // fe80::/10
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::op::Query;

    use super::*;
    use crate::sets::NoFirewall;

    /// A gate for the example state's worker-1, and the address of one of its VMs.
    fn gate() -> (Gate, IpAddr) {
        let state = vmedge_model::parse_state(include_str!("../../examples/state.json"))
            .unwrap_or_else(|e| panic!("{e}"))
            .value;
        let vm = state
            .vms
            .iter()
            .find(|vm| vm.worker == "worker-1")
            .map(|vm| vm.public_ipv6);
        let gate = Gate::new(
            GateConfig::default(),
            Arc::new(NoFirewall),
            Metrics::unregistered(),
        );
        gate.update(Arc::new(Snapshot::build(state, 1)));
        (
            gate,
            IpAddr::V6(vm.unwrap_or_else(|| panic!("no VM on worker-1"))),
        )
    }

    #[tokio::test]
    async fn an_answer_never_outgrows_udp_whatever_the_request_holds() {
        let (gate, vm) = gate();
        // 19 questions of 60-odd bytes: one question is allowed, so FORMERR, and the
        // request's bulk must not come back (fuzz/dns_query found a 1.3 kB answer).
        let mut request = Message::new(0x1234, MessageType::Query, OpCode::Query);
        for i in 0..19 {
            let name = format!("{i}{}.x{i}.test.", "a".repeat(55));
            request.add_query(Query::query(
                Name::from_str(&name).unwrap_or_else(|e| panic!("{e}")),
                RecordType::A,
            ));
        }
        let bytes = request.to_vec().unwrap_or_else(|e| panic!("{e}"));
        assert!(bytes.len() > 1232);
        let answer = gate.handle(vm, &bytes, Transport::Udp).await;
        let answer = answer.unwrap_or_else(|| panic!("no answer"));
        assert!(answer.len() <= 512, "{} bytes", answer.len());
        let answer = Message::from_vec(&answer).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.metadata.id, 0x1234);
        assert_eq!(answer.metadata.response_code, ResponseCode::FormErr);
        assert!(answer.queries.is_empty());

        // Not a query (NOTIMP keeps the question): when even the question does not fit,
        // the header alone goes back, truncated.
        request.metadata.op_code = OpCode::Status;
        let bytes = request.to_vec().unwrap_or_else(|e| panic!("{e}"));
        let answer = gate.handle(vm, &bytes, Transport::Udp).await;
        let answer = answer.unwrap_or_else(|| panic!("no answer"));
        assert!(answer.len() <= 512, "{} bytes", answer.len());
        let answer = Message::from_vec(&answer).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.metadata.response_code, ResponseCode::NotImp);
        assert!(answer.metadata.truncation && answer.queries.is_empty());
    }
}
