//! Plain HTTP/1.1 requests the edge proxies itself, without pingora's request machinery.
//!
//! pingora's HTTP/1 proxy path spends about as much user time on a small request as nginx
//! spends in all (its per-request futures and header maps, the channel between its two
//! halves: bench/RESULTS.md). Most requests need nothing of it beyond parsing and
//! framing: a running VM's HTTP/1.1 service, a body whose length the header gives, no
//! upgrade. Those are proxied here. The header is parsed in place (httparse, the parser
//! pingora uses) and rewritten into one buffer. It goes to the VM on a kept-alive
//! connection ([`UpstreamPool`]), and the answer comes back as it arrives, its header and
//! first body bytes in one send.
//!
//! Everything else is declined before anything is taken from the connection or counted,
//! and pingora serves it from the same bytes: `Expect`, `Upgrade` and chunked requests, a
//! VM that is not running (wake, 503), an h2c service, a host that does not route, a
//! header that is malformed or too large. TLS and h2c connections never come here.

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::http::date;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmedge_model::{ServiceName, VmId};
use vmedge_registry::Registry;

use crate::activity::{Activity, VmActivity};
use crate::answers::{self, Refusal};
use crate::conn::PlainConn;
use crate::idle::ClientTimeouts;
use crate::ids::RequestIds;
use crate::metrics::Metrics;
use crate::upstream::UpstreamPool;
use crate::EdgeSettings;

/// The most header fields a request or an answer may have here (a request with more is
/// declined, an answer with more is a bad answer).
const MAX_FIELDS: usize = 64;

/// The largest answer header read from a VM.
const MAX_ANSWER_HEADER: usize = 64 * 1024;

/// Bytes read at once from either side while a body streams.
const CHUNK: usize = 16 * 1024;

/// What became of a request offered to the direct path.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not one for this path: nothing was taken from the connection and nothing counted.
    Declined,
    /// Served; the connection may carry the next request.
    KeepAlive,
    /// Served or failed; the connection is to be closed.
    Close,
}

/// The direct path's shared state: what the proxy has, and the upstream pool.
pub struct Direct {
    settings: Arc<EdgeSettings>,
    registry: Arc<dyn Registry>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    ids: Arc<RequestIds>,
    timeouts: ClientTimeouts,
    pool: UpstreamPool,
}

/// A request taken, parsed from the client's bytes.
struct Request {
    /// The header as the VM gets it: the client's request line and fields, less
    /// hop-by-hop and forwarding fields, plus the edge's own; then the body's first bytes.
    upstream: Vec<u8>,
    /// Where the method, the path and the host are in `upstream`.
    method: Range<usize>,
    path: Range<usize>,
    host: Range<usize>,
    /// The length of the client's header.
    header_len: usize,
    /// The body's length (Content-Length; none is 0).
    body_len: u64,
    /// The client asked for the connection to be closed after this request.
    close: bool,
    id: String,
}

impl Request {
    fn text(&self, range: &Range<usize>) -> &str {
        std::str::from_utf8(&self.upstream[range.clone()]).unwrap_or_default()
    }

    fn is_head(&self) -> bool {
        &self.upstream[self.method.clone()] == b"HEAD"
    }

    /// A request that can be sent again on a new connection when a kept-alive one
    /// turns out closed before any answer: no side effects (RFC 9110 9.2.2), body all sent.
    fn can_retry(&self, body_unsent: u64) -> bool {
        body_unsent == 0
            && matches!(
                &self.upstream[self.method.clone()],
                b"GET" | b"HEAD" | b"OPTIONS"
            )
    }
}

/// Why a request taken did not end with the VM's whole answer.
#[derive(Debug)]
enum Failure {
    /// Nothing was written to the client yet: it gets this answer.
    Refuse(Refusal),
    /// The client went away or stopped reading.
    Client(&'static str),
    /// The VM's answer broke off after part of it went to the client.
    Cut(&'static str),
    /// A kept-alive connection turned out closed before any answer: the request may
    /// go again on a new one.
    UpstreamClosed,
}

/// What a request came to, for the metrics and the access log.
#[derive(Default)]
struct Done {
    status: u16,
    refusal: Option<Refusal>,
    bytes_in: u64,
    bytes_out: u64,
    error: &'static str,
}

/// How the end of an answer's body is found (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// An answer's header, read from the VM.
struct Answer {
    /// The header as the client gets it, without the connection field.
    header: Vec<u8>,
    status: u16,
    framing: Framing,
    /// The VM keeps the connection open after this answer.
    reusable: bool,
}

impl Direct {
    /// The direct path over the proxy's state.
    pub fn new(
        settings: Arc<EdgeSettings>,
        registry: Arc<dyn Registry>,
        activity: Arc<Activity>,
        metrics: Arc<Metrics>,
        ids: Arc<RequestIds>,
        timeouts: ClientTimeouts,
    ) -> Direct {
        let pool = UpstreamPool::new(Duration::from_secs(60));
        Direct {
            settings,
            registry,
            activity,
            metrics,
            ids,
            timeouts,
            pool,
        }
    }

    /// Closes kept connections to VMs that are no longer usable.
    pub fn sweep(&self) {
        self.pool.sweep();
    }

    /// Serves the request whose first bytes `conn` has read ahead, if it is one for this
    /// path. `stopping`: the edge is shutting down, so the connection is not kept.
    pub async fn serve(&self, conn: &mut PlainConn, stopping: bool) -> Outcome {
        let started = Instant::now();
        let header_deadline = tokio::time::Instant::now() + self.timeouts.header;
        let client = conn.peer();
        let req = loop {
            let limit = self.settings.max_header_bytes;
            match parse_request(conn.ahead(), limit, client, &self.ids) {
                Ok(Some(req)) => break req,
                Ok(None) => {}
                Err(()) => return Outcome::Declined,
            }
            let read = tokio::time::timeout(self.timeouts.read, conn.read_more());
            match tokio::time::timeout_at(header_deadline, read).await {
                Ok(Ok(Ok(()))) => {}
                // The client went away, or was too slow (nginx: client_header_timeout).
                _ => return Outcome::Close,
            }
        };
        let Some((vm, service, target)) = self.route(&req) else {
            return Outcome::Declined;
        };

        // Taken: from here on the request is counted, and answered here.
        conn.consume(req.header_len);
        self.metrics.open();
        let activity = self.activity.vm(vm, self.settings.rate_limit);
        activity.request();
        let mut done = Done::default();
        let mut req = req;
        let result = if activity.admit() {
            self.exchange(conn, &mut req, target, &activity, &mut done, stopping)
                .await
        } else {
            Err(Failure::Refuse(Refusal::RateLimited))
        };
        let keep_alive = match result {
            Ok(keep_alive) => keep_alive,
            Err(Failure::Refuse(refusal)) => {
                // An unread body leaves the connection's framing unknown.
                let keep = done.bytes_in == req.body_len
                    && !req.close
                    && !stopping
                    && refusal == Refusal::RateLimited;
                self.metrics.refused(refusal.reason());
                done.status = refusal.status();
                if let Err(e) = self.answer(conn, &refusal, &req.id, keep).await {
                    done.error = e;
                }
                done.refusal = Some(refusal);
                keep
            }
            Err(Failure::UpstreamClosed) => {
                done.error = "the VM closed the connection";
                false
            }
            Err(Failure::Client(e) | Failure::Cut(e)) => {
                done.error = e;
                false
            }
        };
        self.finish(&req, client, vm, service, &done, started);
        if keep_alive {
            Outcome::KeepAlive
        } else {
            Outcome::Close
        }
    }
}

/// The request in `buf` if it is complete and one for the direct path (its header at
/// most `limit` bytes); `Ok(None)` while it is incomplete; `Err` when it is declined.
fn parse_request(
    buf: &[u8],
    limit: usize,
    client: Option<SocketAddr>,
    ids: &RequestIds,
) -> Result<Option<Request>, ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut fields);
    let header_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= limit => n,
        Ok(httparse::Status::Partial) if buf.len() <= limit => return Ok(None),
        _ => return Err(()),
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(());
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Err(());
    }
    let mut upstream = Vec::with_capacity(header_len + 192);
    upstream.extend_from_slice(method.as_bytes());
    let method_range = 0..upstream.len();
    upstream.push(b' ');
    let path_start = upstream.len();
    upstream.extend_from_slice(path.as_bytes());
    let path_range = path_start..upstream.len();
    upstream.extend_from_slice(b" HTTP/1.1\r\n");

    let (mut host, mut hosts, mut body_len, mut close, mut sent_id) = (None, 0, None, false, None);
    for field in parsed.headers.iter() {
        let (name, value) = (field.name, field.value);
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("host") {
            hosts += 1;
            host = std::str::from_utf8(value).ok();
        } else if is("content-length") {
            if body_len.is_some() {
                return Err(());
            }
            body_len = Some(content_length(value).ok_or(())?);
        } else if is("connection") {
            close |= connection_close(value).ok_or(())?;
            continue;
        } else if is("transfer-encoding")
            || is("upgrade")
            || is("expect")
            || is("te")
            || (is("content-type") && value.starts_with(b"application/grpc"))
        {
            // Chunked bodies, upgrades, 100-continue and gRPC are pingora's.
            return Err(());
        } else if is("x-request-id") {
            sent_id = Some(value);
            continue;
        }
        if is("keep-alive")
            || is("proxy-connection")
            || is("x-forwarded-for")
            || is("x-forwarded-proto")
            || is("x-forwarded-host")
        {
            continue;
        }
        upstream.extend_from_slice(name.as_bytes());
        upstream.extend_from_slice(b": ");
        upstream.extend_from_slice(value);
        upstream.extend_from_slice(b"\r\n");
    }
    let (Some(host), 1) = (host, hosts) else {
        return Err(());
    };
    // The edge is the first hop: what a client says about earlier hops is not kept.
    upstream.extend_from_slice(b"x-forwarded-for: ");
    if let Some(client) = client {
        let _ = write!(upstream, "{}", client.ip().to_canonical());
    }
    upstream.extend_from_slice(b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ");
    let host_start = upstream.len();
    upstream.extend_from_slice(host.as_bytes());
    let host_range = host_start..upstream.len();
    let id = ids.keep_or_make(sent_id);
    upstream.extend_from_slice(b"\r\nx-request-id: ");
    upstream.extend_from_slice(id.as_bytes());
    upstream.extend_from_slice(b"\r\n\r\n");
    Ok(Some(Request {
        upstream,
        method: method_range,
        path: path_range,
        host: host_range,
        header_len,
        body_len: body_len.unwrap_or(0),
        close,
        id,
    }))
}

impl Direct {
    /// The running VM service the request's host names, if this path may take it there
    /// (refusals, waits and h2c are pingora's).
    fn route(&self, req: &Request) -> Option<(VmId, ServiceName, SocketAddr)> {
        let snapshot = self.registry.load();
        let route = snapshot
            .route_host(req.text(&req.host), &self.settings.domain)
            .ok()?;
        let target = route.target();
        let dialable = self
            .settings
            .vm_prefixes
            .iter()
            .any(|p| p.contains(&target.ip()));
        (route.vm().status.is_running() && !route.h2c() && dialable)
            .then(|| (route.vm().id, route.service().name, target))
    }

    /// The request to the VM and its answer back; whether the client's connection is
    /// kept for another request (as its answer told the client).
    async fn exchange(
        &self,
        conn: &mut PlainConn,
        req: &mut Request,
        target: SocketAddr,
        activity: &VmActivity,
        done: &mut Done,
        stopping: bool,
    ) -> Result<bool, Failure> {
        // The body's first bytes, read with the header, go with it.
        let first = conn.ahead().len().min(clamp(req.body_len));
        req.upstream.extend_from_slice(&conn.ahead()[..first]);
        conn.consume(first);
        done.bytes_in = first as u64;
        activity.inbound(first);

        let mut buf = Vec::with_capacity(4096);
        let (mut tcp, answer, sent) = loop {
            let (mut tcp, reused) = match self.pool.take(target) {
                Some(tcp) => (tcp, true),
                None => (self.connect(target).await?, false),
            };
            let retry = reused && req.can_retry(req.body_len - done.bytes_in);
            let written =
                upstream_io(self.settings.upstream_timeout, tcp.write_all(&req.upstream)).await;
            if written.is_err() && retry {
                continue;
            }
            written.map_err(Failure::Refuse)?;
            self.send_body(conn, &mut tcp, req.body_len, activity, done)
                .await?;
            let sent = Instant::now();
            match self.read_answer(&mut tcp, conn, req, &mut buf).await {
                Err(Failure::UpstreamClosed) if retry => continue,
                Err(Failure::UpstreamClosed) => {
                    return Err(Failure::Refuse(Refusal::BadUpstreamAnswer))
                }
                answer => break (tcp, answer?, sent),
            }
        };
        self.metrics.responded(sent.elapsed().as_secs_f64());
        done.status = answer.status;
        // An answer that ends only when the VM closes ends the client's connection too.
        let keep = !req.close && !stopping && answer.framing != Framing::UntilClose;
        let reusable = self
            .stream_answer(conn, &mut tcp, answer, &buf, keep, activity, done)
            .await?;
        if reusable {
            self.pool.put(target, tcp);
        }
        Ok(keep)
    }

    /// A new connection to `target`.
    async fn connect(&self, target: SocketAddr) -> Result<TcpStream, Failure> {
        let started = Instant::now();
        match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(target)).await
        {
            Err(_) => Err(Failure::Refuse(Refusal::UpstreamTimeout)),
            Ok(Err(_)) => Err(Failure::Refuse(Refusal::NothingListening {
                port: target.port(),
            })),
            Ok(Ok(tcp)) => {
                // Requests and answers are written whole: no reason to wait for an ack.
                let _ = tcp.set_nodelay(true);
                self.metrics.connected(started.elapsed().as_secs_f64());
                Ok(tcp)
            }
        }
    }

    /// The rest of the request's body (what did not come with its header), client to VM.
    async fn send_body(
        &self,
        conn: &mut PlainConn,
        tcp: &mut TcpStream,
        body_len: u64,
        activity: &VmActivity,
        done: &mut Done,
    ) -> Result<(), Failure> {
        let mut left = body_len - done.bytes_in;
        if left == 0 {
            return Ok(());
        }
        let mut chunk = vec![0u8; clamp(left).min(CHUNK)];
        while left > 0 {
            let want = clamp(left).min(chunk.len());
            let n = match tokio::time::timeout(self.timeouts.read, conn.read(&mut chunk[..want]))
                .await
            {
                Ok(Ok(0) | Err(_)) => return Err(Failure::Client("the client closed mid-body")),
                Err(_) => return Err(Failure::Client("the client stopped sending its body")),
                Ok(Ok(n)) => n,
            };
            upstream_io(self.settings.upstream_timeout, tcp.write_all(&chunk[..n]))
                .await
                .map_err(Failure::Refuse)?;
            activity.inbound(n);
            done.bytes_in += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// The VM's answer header, parsed; interim answers (1xx) are passed on to the client
    /// as they come. What was read past the header is left in `buf`.
    async fn read_answer(
        &self,
        tcp: &mut TcpStream,
        conn: &mut PlainConn,
        req: &Request,
        buf: &mut Vec<u8>,
    ) -> Result<Answer, Failure> {
        let mut interim = false;
        loop {
            if !buf.is_empty() {
                match parse_answer(buf, req.is_head(), &req.id)? {
                    Some((answer, len)) if answer.status < 200 => {
                        // 100 Continue, 103 Early Hints: passed on as they came.
                        client_io(self.timeouts.read, conn, &buf[..len]).await?;
                        buf.drain(..len);
                        interim = true;
                        continue;
                    }
                    Some((answer, len)) => {
                        buf.drain(..len);
                        return Ok(answer);
                    }
                    None if buf.len() > MAX_ANSWER_HEADER => {
                        return Err(Failure::Refuse(Refusal::BadUpstreamAnswer))
                    }
                    None => {}
                }
            }
            buf.reserve(4096);
            match tokio::time::timeout(self.settings.upstream_timeout, tcp.read_buf(buf)).await {
                Err(_) => return Err(Failure::Refuse(Refusal::UpstreamTimeout)),
                Ok(Ok(0) | Err(_)) if buf.is_empty() && !interim => {
                    return Err(Failure::UpstreamClosed)
                }
                Ok(Ok(0) | Err(_)) => return Err(Failure::Refuse(Refusal::BadUpstreamAnswer)),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The answer's header (with the connection field `keep` calls for) and body to the
    /// client, as the body arrives; whether the VM's connection may carry another request.
    #[allow(clippy::too_many_arguments)]
    async fn stream_answer(
        &self,
        conn: &mut PlainConn,
        tcp: &mut TcpStream,
        answer: Answer,
        rest: &[u8],
        keep: bool,
        activity: &VmActivity,
        done: &mut Done,
    ) -> Result<bool, Failure> {
        let mut reusable = answer.reusable;
        let mut body = Body::new(answer.framing);
        let mut out = answer.header;
        out.extend_from_slice(if keep {
            b"connection: keep-alive\r\n\r\n"
        } else {
            b"connection: close\r\n\r\n"
        });
        // The body's first bytes go in the header's send.
        let (take, mut end) = body
            .feed(rest)
            .map_err(|()| Failure::Refuse(Refusal::BadUpstreamAnswer))?;
        reusable &= take == rest.len();
        out.extend_from_slice(&rest[..take]);
        client_io(self.timeouts.read, conn, &out).await?;
        activity.outbound(take);
        done.bytes_out = take as u64;
        let mut buf = Vec::new();
        while !end {
            buf.clear();
            buf.reserve(CHUNK);
            let n =
                match tokio::time::timeout(self.settings.upstream_timeout, tcp.read_buf(&mut buf))
                    .await
                {
                    Err(_) => return Err(Failure::Cut("the VM stopped answering mid-body")),
                    Ok(Ok(0)) if answer.framing == Framing::UntilClose => break,
                    Ok(Ok(0) | Err(_)) => return Err(Failure::Cut("the VM closed mid-body")),
                    Ok(Ok(n)) => n,
                };
            let (take, fin) = body
                .feed(&buf)
                .map_err(|()| Failure::Cut("the VM's chunked body is malformed"))?;
            reusable &= take == n;
            end = fin;
            // Each piece is sent as it comes: an event stream's events are not held back.
            client_io(self.timeouts.read, conn, &buf[..take]).await?;
            activity.outbound(take);
            done.bytes_out += take as u64;
        }
        Ok(reusable)
    }

    /// The edge's own answer for `refusal`, as text (gRPC requests are pingora's).
    async fn answer(
        &self,
        conn: &mut PlainConn,
        refusal: &Refusal,
        id: &str,
        keep: bool,
    ) -> Result<(), &'static str> {
        let body = answers::text_page(refusal, id);
        let status = refusal.status();
        let mut out = Vec::with_capacity(body.len() + 256);
        let _ = write!(
            out,
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nx-request-id: {id}\r\ndate: ",
            answers::reason_phrase(status),
            body.len(),
        );
        out.extend_from_slice(date::get_cached_date().as_bytes());
        out.extend_from_slice(if keep {
            b"\r\nconnection: keep-alive\r\n\r\n"
        } else {
            b"\r\nconnection: close\r\n\r\n"
        });
        out.extend_from_slice(body.as_bytes());
        client_io(self.timeouts.read, conn, &out)
            .await
            .map_err(|_| "the client went away before the answer")
    }

    /// The request's metrics and access log line.
    fn finish(
        &self,
        req: &Request,
        client: Option<SocketAddr>,
        vm: VmId,
        service: ServiceName,
        done: &Done,
        started: Instant,
    ) {
        self.metrics.closed();
        self.metrics.direct_request();
        self.metrics.request_done(done.status, service.as_str());
        self.metrics.vm_bytes(&vm, done.bytes_in, done.bytes_out);
        tracing::info!(
            target: "vmedge::access",
            request_id = %req.id,
            client = %client.map(|a| a.to_string()).unwrap_or_default(),
            method = req.text(&req.method),
            host = req.text(&req.host),
            path = req.text(&req.path),
            status = done.status,
            vm = %vm,
            service = service.as_str(),
            refusal = done.refusal.as_ref().map_or("", |r| r.reason()),
            error = done.error,
            bytes_in = done.bytes_in,
            bytes_out = done.bytes_out,
            ms = started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

/// A read or write of the VM's connection under the upstream timeout.
async fn upstream_io<T>(
    limit: Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Refusal> {
    match tokio::time::timeout(limit, io).await {
        Err(_) => Err(Refusal::UpstreamTimeout),
        Ok(Err(_)) => Err(Refusal::BadUpstreamAnswer),
        Ok(Ok(t)) => Ok(t),
    }
}

/// `bytes` to the client, sent now, under the client timeout.
async fn client_io(limit: Duration, conn: &mut PlainConn, bytes: &[u8]) -> Result<(), Failure> {
    let write = async {
        conn.write_all(bytes).await?;
        conn.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Failure::Client("the client went away")),
        Err(_) => Err(Failure::Client("the client stopped reading")),
    }
}

/// The answer header at the start of `buf`, rewritten for the client, and its length;
/// `None` while it is incomplete.
fn parse_answer(buf: &[u8], head: bool, id: &str) -> Result<Option<(Answer, usize)>, Failure> {
    let bad = || Failure::Refuse(Refusal::BadUpstreamAnswer);
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad()),
    };
    let (Some(status), Some(version)) = (parsed.code, parsed.version) else {
        return Err(bad());
    };
    // No upgrade was asked for, so none may be answered.
    if status == 101 || !(100..600).contains(&status) {
        return Err(bad());
    }
    if status < 200 {
        let answer = Answer {
            header: Vec::new(),
            status,
            framing: Framing::Empty,
            reusable: true,
        };
        return Ok(Some((answer, len)));
    }
    let fields = &*parsed.headers;
    let is = |name: &str, n: &str| name.eq_ignore_ascii_case(n);
    let coded = fields.iter().any(|f| is(f.name, "transfer-encoding"));
    let (mut length, mut chunked, mut close) = (None, false, version == 0);
    let (mut has_id, mut has_date) = (false, false);
    let mut header = Vec::with_capacity(len + 96);
    let _ = write!(
        header,
        "HTTP/1.1 {status} {}\r\n",
        parsed.reason.unwrap_or_default()
    );
    for field in fields {
        let (name, value) = (field.name, field.value);
        if is(name, "connection") {
            close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        if is(name, "keep-alive") || is(name, "proxy-connection") {
            continue;
        }
        if is(name, "transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if is(name, "content-length") {
            let n = content_length(value).ok_or_else(bad)?;
            if length.is_some_and(|l| l != n) {
                return Err(bad());
            }
            length = Some(n);
            if coded {
                // Transfer-Encoding wins (RFC 9112 6.3); the length is not passed on.
                continue;
            }
        } else if is(name, "x-request-id") {
            has_id = true;
        } else if is(name, "date") {
            has_date = true;
        }
        header.extend_from_slice(name.as_bytes());
        header.extend_from_slice(b": ");
        header.extend_from_slice(value);
        header.extend_from_slice(b"\r\n");
    }
    if !has_id {
        header.extend_from_slice(b"x-request-id: ");
        header.extend_from_slice(id.as_bytes());
        header.extend_from_slice(b"\r\n");
    }
    if !has_date {
        // A proxy adds the date an answer lacks (RFC 9110 6.6.1).
        header.extend_from_slice(b"date: ");
        header.extend_from_slice(date::get_cached_date().as_bytes());
        header.extend_from_slice(b"\r\n");
    }
    let framing = match (head || status == 204 || status == 304, coded, length) {
        (true, _, _) => Framing::Empty,
        (false, true, _) if chunked => Framing::Chunked,
        (false, true, _) => Framing::UntilClose,
        (false, false, Some(n)) => Framing::Length(n),
        (false, false, None) => Framing::UntilClose,
    };
    // A message with both framings may be a smuggling attempt: its connection is not kept.
    let both = coded && length.is_some();
    let reusable = !close && !both && framing != Framing::UntilClose;
    let answer = Answer {
        header,
        status,
        framing,
        reusable,
    };
    Ok(Some((answer, len)))
}

/// Where an answer's body ends, fed its bytes as they come.
enum Body {
    Empty,
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

impl Body {
    fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty => Body::Empty,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedEnd::default()),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    /// How many of `bytes` belong to the body, and whether it is complete with them.
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), ()> {
        match self {
            Body::Empty => Ok((0, true)),
            Body::Length(left) => {
                let take = clamp(*left).min(bytes.len());
                *left -= take as u64;
                Ok((take, *left == 0))
            }
            Body::Chunked(chunks) => Ok(match chunks.feed(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            }),
            Body::UntilClose => Ok((bytes.len(), false)),
        }
    }
}

/// Finds the end of a chunked body (RFC 9112 section 7.1): chunk sizes in hex, each
/// chunk's data and CRLF, a zero-size chunk, trailer fields and an empty line. Only
/// the framing is read; the bytes are passed on as they are.
#[derive(Debug, Default)]
struct ChunkedEnd {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The size's hex digits.
    #[default]
    Size,
    /// After the size: an extension, whitespace, up to the line's end.
    SizeRest,
    /// The line feed after the size line's carriage return.
    SizeLf,
    /// Data bytes still to come.
    Data(u64),
    /// The carriage return after a chunk's data.
    DataCr,
    /// The line feed after it.
    DataLf,
    /// The start of a trailer line, or of the final empty line.
    LineStart,
    /// Inside a trailer line.
    Line,
    /// The line feed that ends a trailer line.
    LineLf,
    /// The final line feed.
    EndLf,
}

impl ChunkedEnd {
    /// Reads `bytes`: `Some(n)` when the body ends after the first `n` of them, `None`
    /// when it goes on, `Err` when the framing is broken.
    fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // Sixteen hex digits fill a u64: more would overflow.
                        if self.digits == 15 {
                            return Err(());
                        }
                        self.digits += 1;
                        let digit = (b as char).to_digit(16).unwrap_or_default();
                        self.size = self.size * 16 + u64::from(digit);
                        Chunk::Size
                    }
                    _ if self.digits == 0 => return Err(()),
                    b'\r' => Chunk::SizeLf,
                    b';' | b' ' | b'\t' => Chunk::SizeRest,
                    _ => return Err(()),
                },
                Chunk::SizeRest => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(()),
                    _ => Chunk::SizeRest,
                },
                Chunk::SizeLf if b == b'\n' => {
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    if size == 0 {
                        Chunk::LineStart
                    } else {
                        Chunk::Data(size)
                    }
                }
                Chunk::Data(left) => {
                    let take = clamp(left).min(bytes.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size,
                Chunk::LineStart if b == b'\r' => Chunk::EndLf,
                Chunk::LineStart | Chunk::Line if b != b'\n' && b != b'\r' => Chunk::Line,
                Chunk::Line if b == b'\r' => Chunk::LineLf,
                Chunk::LineLf if b == b'\n' => Chunk::LineStart,
                Chunk::EndLf if b == b'\n' => return Ok(Some(i + 1)),
                _ => return Err(()),
            };
            i += 1;
        }
        Ok(None)
    }
}

/// `u64` as `usize`, saturating (a body longer than memory is never held anyway).
fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A Content-Length value: digits only (RFC 9110 8.6), at most 18 of them.
fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Whether a Connection field asks to close; `None` when it names anything but
/// `keep-alive` and `close` (an upgrade, a hop-by-hop field: pingora's to handle).
fn connection_close(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
            return None;
        }
    }
    Some(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Request>, ()> {
        let client = "[fd5e:ed00::9]:4000".parse().ok();
        parse_request(raw.as_bytes(), 32 * 1024, client, &RequestIds::new())
    }

    fn upstream(raw: &str) -> String {
        let req = parse(raw).unwrap().unwrap();
        String::from_utf8(req.upstream).unwrap()
    }

    #[test]
    fn a_plain_request_is_rewritten_for_the_vm() {
        let raw = "GET /a?b=c HTTP/1.1\r\nHost: web--x.proxy.test\r\nUser-Agent: wrk\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\
                   X-Request-Id: abc-1\r\n\r\nnext";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.header_len, raw.len() - 4);
        assert_eq!(req.text(&req.method), "GET");
        assert_eq!(req.text(&req.path), "/a?b=c");
        assert_eq!(req.text(&req.host), "web--x.proxy.test");
        assert_eq!(
            (req.body_len, req.close, req.id.as_str()),
            (0, false, "abc-1")
        );
        assert_eq!(
            String::from_utf8(req.upstream).unwrap(),
            "GET /a?b=c HTTP/1.1\r\nHost: web--x.proxy.test\r\nUser-Agent: wrk\r\n\
             x-forwarded-for: fd5e:ed00::9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: web--x.proxy.test\r\nx-request-id: abc-1\r\n\r\n"
        );
    }

    #[test]
    fn a_made_id_a_length_and_a_close_are_read() {
        let up = upstream("POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\n\r\n");
        assert!(up.contains("content-length: 12\r\n"), "{up}");
        let id = up.split("x-request-id: ").nth(1).unwrap();
        assert_eq!(id.len(), 24 + 4, "{id:?}");
        let req = parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(req.close);
        // Only a request without side effects, all of it sent, goes again.
        assert!(req.can_retry(0));
        assert!(!req.can_retry(1));
        let post = parse("POST / HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!post.can_retry(0));
    }

    #[test]
    fn an_incomplete_header_is_waited_for() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: h\r\n"), Ok(None)));
        assert!(matches!(parse("GE"), Ok(None)));
    }

    #[test]
    fn declines_what_pingora_must_serve() {
        for raw in [
            // framing and upgrades
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, TE\r\nTE: trailers\r\n\r\n",
            // hosts and targets
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            // versions, gRPC, garbage
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Type: application/grpc\r\n\r\n",
            "GET / HTTP/1.1\r\nHost h\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(parse(raw).is_err(), "taken: {raw:?}");
        }
        // Too large, complete or not.
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        assert!(parse(&big).is_err());
        assert!(parse(&big[..35_000]).is_err());
    }

    fn answer(raw: &str, head: bool) -> (Answer, usize) {
        match parse_answer(raw.as_bytes(), head, "id-1") {
            Ok(Some(a)) => a,
            Ok(None) => panic!("incomplete: {raw:?}"),
            Err(e) => panic!("refused {raw:?}: {e:?}"),
        }
    }

    #[test]
    fn an_answer_is_framed_and_rewritten_for_the_client() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\
                   Keep-Alive: timeout=5\r\nDate: x\r\n\r\nhello";
        let (a, len) = answer(raw, false);
        assert_eq!(len, raw.len() - 5);
        assert_eq!(
            (a.status, a.framing, a.reusable),
            (200, Framing::Length(5), true)
        );
        assert_eq!(
            String::from_utf8(a.header).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\nx-request-id: id-1\r\n"
        );

        let framing = |raw: &str, head| {
            let (a, _) = answer(raw, head);
            (a.framing, a.reusable)
        };
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), (Framing::Chunked, true));
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(both, false), (Framing::Chunked, false));
        let (a, _) = answer(both, false);
        assert!(!String::from_utf8(a.header)
            .unwrap()
            .contains("Content-Length"));
        let coded = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(framing(coded, false), (Framing::UntilClose, false));
        let none = "HTTP/1.1 200 OK\r\nX-Request-Id: mine\r\n\r\n";
        assert_eq!(framing(none, false), (Framing::UntilClose, false));
        let (a, _) = answer(none, false);
        let header = String::from_utf8(a.header).unwrap();
        assert!(!header.contains("id-1"), "{header}");
        assert!(header.contains("\r\ndate: "), "no date added: {header}");
        let old = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old, false), (Framing::Length(0), false));
        let close = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(framing(close, false), (Framing::Length(0), false));
        for empty in [
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ] {
            assert_eq!(framing(empty, false), (Framing::Empty, true), "{empty}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true),
            (Framing::Empty, true)
        );
        let (early, _) = answer("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false);
        assert_eq!(early.status, 103);
    }

    #[test]
    fn broken_answers_are_refused() {
        for raw in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 999 Nope\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_answer(raw.as_bytes(), false, "i"),
                    Err(Failure::Refuse(Refusal::BadUpstreamAnswer))
                ),
                "taken: {raw:?}"
            );
        }
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\n", false, "i"),
            Ok(None)
        ));
    }

    const CHUNKED: &[u8] =
        b"5\r\nhello\r\n1a;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: t\r\n\r\n";

    #[test]
    fn a_chunked_body_ends_where_its_framing_says_however_it_is_cut() {
        let mut whole = CHUNKED.to_vec();
        whole.extend_from_slice(b"HTTP/1.1 next");
        assert_eq!(ChunkedEnd::default().feed(&whole), Ok(Some(CHUNKED.len())));
        // Every split into two reads, and byte by byte.
        for cut in 0..CHUNKED.len() {
            let mut end = ChunkedEnd::default();
            assert_eq!(end.feed(&CHUNKED[..cut]), Ok(None), "cut at {cut}");
            assert_eq!(
                end.feed(&whole[cut..]),
                Ok(Some(CHUNKED.len() - cut)),
                "cut at {cut}"
            );
        }
        let mut end = ChunkedEnd::default();
        let last = CHUNKED.len() - 1;
        for (i, b) in CHUNKED.iter().enumerate() {
            let want = if i == last { Some(1) } else { None };
            assert_eq!(end.feed(std::slice::from_ref(b)), Ok(want), "byte {i}");
        }
        assert_eq!(ChunkedEnd::default().feed(b"0\r\n\r\n"), Ok(Some(5)));
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for raw in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX\r\n",
            b"5\nhello\r\n",
            b"10000000000000000\r\n",
            b"0\r\nTrailer: t\n\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(ChunkedEnd::default().feed(raw), Err(()), "{raw:?}");
        }
    }

    #[test]
    fn a_body_takes_its_bytes_and_no_more() {
        let mut body = Body::new(Framing::Length(4));
        assert_eq!(body.feed(b"ab"), Ok((2, false)));
        assert_eq!(body.feed(b"cdEXTRA"), Ok((2, true)));
        assert_eq!(Body::new(Framing::Empty).feed(b"x"), Ok((0, true)));
        assert_eq!(Body::new(Framing::UntilClose).feed(b"xyz"), Ok((3, false)));
    }

    #[test]
    fn field_values() {
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"0"), Some(0));
        for bad in [&b""[..], b"4 2", b"0x1", b"1234567890123456789", b"+1"] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        assert_eq!(connection_close(b"keep-alive"), Some(false));
        assert_eq!(connection_close(b"Keep-Alive, close"), Some(true));
        assert_eq!(connection_close(b"upgrade"), None);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A chunked body: chunks of the given sizes (a last zero chunk added), each size
        /// line with or without an extension, and trailer fields.
        fn chunked(sizes: &[usize], ext: bool, trailers: usize) -> Vec<u8> {
            let mut body = Vec::new();
            for &n in sizes.iter().filter(|&&n| n > 0).chain([&0]) {
                body.extend_from_slice(format!("{n:x}").as_bytes());
                if ext {
                    body.extend_from_slice(b";a=\"b\"");
                }
                body.extend_from_slice(b"\r\n");
                if n > 0 {
                    body.extend(std::iter::repeat_n(b'\r', n));
                    body.extend_from_slice(b"\r\n");
                }
            }
            for i in 0..trailers {
                body.extend_from_slice(format!("t{i}: v\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body
        }

        /// Field names that matter to framing and forwarding, and any other.
        fn field_name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("Content-Length".to_string()),
                Just("Transfer-Encoding".to_string()),
                Just("Connection".to_string()),
                Just("Keep-Alive".to_string()),
                Just("X-Forwarded-For".to_string()),
                Just("X-Request-Id".to_string()),
                Just("Upgrade".to_string()),
                "[A-Za-z-]{1,10}",
            ]
        }

        proptest! {
            #[test]
            fn a_chunked_body_ends_exactly_at_its_end(
                sizes in proptest::collection::vec(0usize..600, 0..8),
                ext: bool,
                trailers in 0usize..3,
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
            ) {
                let body = chunked(&sizes, ext, trailers);
                let mut bytes = body.clone();
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(body.len())).collect();
                cuts.sort_unstable();
                let mut end = ChunkedEnd::default();
                let mut at = 0;
                for cut in cuts {
                    prop_assert_eq!(end.feed(&bytes[at..cut]), Ok(None));
                    at = cut;
                }
                prop_assert_eq!(end.feed(&bytes[at..]), Ok(Some(body.len() - at)));
            }

            #[test]
            fn what_a_request_becomes_is_one_request_for_the_same_host(
                fields in proptest::collection::vec((field_name(), "[ -~]{0,12}"), 0..6),
                host in "[a-z0-9.-]{1,20}",
            ) {
                let mut bytes = format!("GET /p HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
                for (name, value) in &fields {
                    bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                bytes.extend_from_slice(b"\r\n");
                let Ok(Some(req)) = parse_request(&bytes, 32 * 1024, None, &RequestIds::new()) else {
                    return Ok(());
                };
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 8];
                let mut again = httparse::Request::new(&mut fields);
                let parsed = again.parse(&req.upstream);
                prop_assert_eq!(parsed, Ok(httparse::Status::Complete(req.upstream.len())));
                let named = |n: &str| again.headers.iter().filter(|f| f.name.eq_ignore_ascii_case(n)).map(|f| f.value).collect::<Vec<_>>();
                prop_assert_eq!(named("host"), vec![host.as_bytes()]);
                prop_assert_eq!(named("x-forwarded-for").len(), 1);
                prop_assert_eq!(named("x-request-id"), vec![req.id.as_bytes()]);
                for hop in ["transfer-encoding", "connection", "keep-alive", "upgrade"] {
                    prop_assert!(named(hop).is_empty(), "{} passed on", hop);
                }
            }

            #[test]
            fn an_answer_is_refused_or_rewritten_into_one_answer(
                fields in proptest::collection::vec((field_name(), "[ -~]{0,12}"), 0..6),
                status in 200u16..600,
            ) {
                let mut bytes = format!("HTTP/1.1 {status} X\r\n").into_bytes();
                for (name, value) in &fields {
                    bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                bytes.extend_from_slice(b"\r\nbody");
                let Ok(Some((answer, len))) = parse_answer(&bytes, false, "id") else {
                    return Ok(());
                };
                prop_assert_eq!(len, bytes.len() - 4);
                let mut header = answer.header.clone();
                header.extend_from_slice(b"connection: close\r\n\r\n");
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 8];
                let mut again = httparse::Response::new(&mut fields);
                prop_assert_eq!(again.parse(&header), Ok(httparse::Status::Complete(header.len())));
                prop_assert_eq!(again.code, Some(status));
                let named = |n: &str| again.headers.iter().filter(|f| f.name.eq_ignore_ascii_case(n)).count();
                prop_assert_eq!(named("connection"), 1);
                prop_assert_eq!(named("keep-alive"), 0);
                prop_assert!(named("transfer-encoding") == 0 || named("content-length") == 0);
            }
        }
    }
}
