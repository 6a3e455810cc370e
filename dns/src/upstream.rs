//! Asking the configured resolvers: plain DNS over UDP, TCP when the answer is truncated.
//!
//! Spoofing defences: every query goes out on a fresh connected socket (a random source
//! port; the kernel drops datagrams from any other address), with a random id and the
//! name's letters in random case (0x20); an answer counts only when its id, name (case
//! and all), type and class are the query's. Anything else is ignored while we wait.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Query};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No resolver is configured.
    #[error("no upstream resolver is configured")]
    NoneConfigured,
    /// A resolver did not answer in time.
    #[error("{0} did not answer in time")]
    Timeout(SocketAddr),
    /// A socket error talking to a resolver.
    #[error("{server}: {source}")]
    Io {
        /// The resolver.
        server: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// A resolver's TCP answer could not be read as DNS, or did not match the query.
    #[error("{0} sent an answer that is not one to our query")]
    Mismatch(SocketAddr),
    /// Too many queries are already in flight.
    #[error("too many upstream queries in flight")]
    Saturated,
}

/// Upstream settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Resolvers, asked in order (each query starts at the next one, round robin).
    pub servers: Vec<SocketAddr>,
    /// How long one resolver gets to answer.
    pub timeout: Duration,
    /// Queries in flight at most, over all resolvers.
    pub max_in_flight: usize,
    /// The EDNS payload size we advertise (DNS flag day 2020: 1232).
    pub edns_payload: u16,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            servers: Vec::new(),
            timeout: Duration::from_millis(1500),
            max_in_flight: 1024,
            edns_payload: 1232,
        }
    }
}

/// The resolvers the gate forwards to.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    in_flight: Semaphore,
    next: AtomicUsize,
}

impl Upstream {
    /// Resolvers from `config`.
    pub fn new(config: UpstreamConfig) -> Upstream {
        Upstream {
            in_flight: Semaphore::new(config.max_in_flight),
            next: AtomicUsize::new(0),
            config,
        }
    }

    /// Asks for `name`/`qtype`/`qclass`, trying each resolver once, and returns the first
    /// answer that matches the query (any rcode).
    pub async fn query(
        &self,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Result<Message, UpstreamError> {
        let servers = &self.config.servers;
        if servers.is_empty() {
            return Err(UpstreamError::NoneConfigured);
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| UpstreamError::Saturated)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = UpstreamError::NoneConfigured;
        for i in 0..servers.len() {
            let server = servers[(start + i) % servers.len()];
            match self.ask(server, name, qtype, qclass).await {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    tracing::debug!(%server, %name, "upstream failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Result<Message, UpstreamError> {
        let mut asked = name.clone();
        asked.randomize_label_case();
        let mut query = Query::query(asked, qtype);
        query.set_query_class(qclass);
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(query);
        let mut edns = Edns::new();
        edns.set_max_payload(self.config.edns_payload);
        message.set_edns(edns);
        let bytes = message
            .to_vec()
            .map_err(|_| UpstreamError::Mismatch(server))?;
        let timeout = self.config.timeout;
        let answer = tokio::time::timeout(timeout, udp_exchange(server, &bytes, &message))
            .await
            .map_err(|_| UpstreamError::Timeout(server))??;
        let mut answer = if answer.metadata.truncation {
            tokio::time::timeout(timeout, tcp_exchange(server, &bytes, &message))
                .await
                .map_err(|_| UpstreamError::Timeout(server))??
        } else {
            answer
        };
        lowercase_names(&mut answer);
        Ok(answer)
    }
}

/// Lowercases the names of an answer: a server that compresses names against the
/// question would otherwise hand our random 0x20 spelling on to the VM (in an MX
/// exchange, say). DNS names compare case-insensitively, so nothing else changes.
fn lowercase_names(answer: &mut Message) {
    for record in answer.answers.iter_mut().chain(&mut answer.authorities) {
        record.name = record.name.to_lowercase();
        match &mut record.data {
            RData::CNAME(n) => n.0 = n.0.to_lowercase(),
            RData::NS(n) => n.0 = n.0.to_lowercase(),
            RData::PTR(n) => n.0 = n.0.to_lowercase(),
            RData::MX(mx) => mx.exchange = mx.exchange.to_lowercase(),
            RData::SRV(srv) => srv.target = srv.target.to_lowercase(),
            RData::SOA(soa) => {
                soa.mname = soa.mname.to_lowercase();
                soa.rname = soa.rname.to_lowercase();
            }
            RData::HTTPS(h) => h.0.target_name = h.0.target_name.to_lowercase(),
            RData::SVCB(s) => s.target_name = s.target_name.to_lowercase(),
            _ => {}
        }
    }
}

/// True when `answer` answers `query`: same id, a response, the same question exactly.
fn answers(answer: &Message, query: &Message) -> bool {
    answer.metadata.id == query.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries.len() == 1
        && query.queries.first().is_some_and(|q| {
            let a = &answer.queries[0];
            a.name().eq_case(q.name())
                && a.query_type() == q.query_type()
                && a.query_class() == q.query_class()
        })
}

async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
) -> Result<Message, UpstreamError> {
    let io = |source| UpstreamError::Io { server, source };
    let local: SocketAddr = if server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        match Message::from_vec(&buf[..n]) {
            Ok(answer) if answers(&answer, query) => return Ok(answer),
            _ => tracing::debug!(%server, "ignored a datagram that does not answer our query"),
        }
    }
}

async fn tcp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    query: &Message,
) -> Result<Message, UpstreamError> {
    let io = |source| UpstreamError::Io { server, source };
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(bytes.len()).map_err(|_| UpstreamError::Mismatch(server))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io)?;
    match Message::from_vec(&buf) {
        Ok(answer) if answers(&answer, query) => Ok(answer),
        _ => Err(UpstreamError::Mismatch(server)),
    }
}
