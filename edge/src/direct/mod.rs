//! Plain HTTP/1.1 requests the edge proxies itself, without pingora's request machinery.
//!
//! pingora's HTTP/1 proxy path spends about as much user time on a small request as nginx
//! spends in all (its per-request futures and header maps, the channel between its two
//! halves: bench/RESULTS.md). Most requests need nothing of it beyond parsing and
//! framing: a running VM's HTTP/1.1 service, a body whose length the header gives, no
//! upgrade. Those are proxied here. The header is parsed in place (httparse, the parser
//! pingora uses) and rewritten into one buffer. It goes to the VM on a kept-alive
//! connection ([`UpstreamPool`]), and the answer comes back as it arrives, its header and
//! first body bytes in one send. A request's body goes on to the VM while its answer
//! comes back: a VM may answer first (a 413), or answer as it reads (an echo).
//!
//! Everything else is declined before anything is taken from the connection or counted,
//! and pingora serves it from the same bytes: `Expect`, `Upgrade` and chunked requests, a
//! VM that is not running (wake, 503), an h2c service, a host that does not route, a
//! header that is malformed or too large. TLS and h2c connections never come here; their
//! h2 streams are offered to `h2` once pingora's h2 server has read their header, before
//! pingora's proxy sees them.
//!
//! This module moves the bytes and keeps the books (timeouts, retries, metrics, the
//! access log); `message` decides what the bytes become: which request fields the VM
//! gets, which answer fields the client gets, and where an answer's body ends.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pingora::protocols::http::date;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use vmedge_model::{ServiceName, VmId};
use vmedge_registry::Registry;

use crate::activity::{Activity, VmActivity};
use crate::answers::{self, Refusal};
use crate::conn::PlainConn;
use crate::idle::ClientTimeouts;
use crate::ids::RequestIds;
use crate::metrics::Metrics;
use crate::upstream::{UpstreamPool, IDLE_TIMEOUT};
use crate::EdgeSettings;

mod h2;
mod h2c;
mod message;

pub use h2::H2Offered;

use message::{
    clamp, parse_answer, parse_request, Answer, Body, Declined, Framing, Malformed, Request,
};

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
    /// Connections to h2c services.
    h2c: h2c::H2cPool,
}

/// A malformed answer, found before any of it went to the client.
impl From<Malformed> for Failure {
    fn from(_: Malformed) -> Failure {
        Failure::Refuse(Refusal::BadUpstreamAnswer)
    }
}

/// A chunked body that broke its framing after part of it went to the client.
fn malformed_body(_: Malformed) -> Failure {
    Failure::Cut("the VM's chunked body is malformed")
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
}

/// What the access log line says of a request besides what it came to.
struct Logged<'a> {
    id: &'a str,
    client: Option<SocketAddr>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
}

/// Whether the two connections of an exchange may carry another request.
struct Kept {
    /// The client's: what its answer told it.
    client: bool,
    /// The VM's: its answer ended where its framing said, and it took the whole request.
    reusable: bool,
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
        let pool = UpstreamPool::new(IDLE_TIMEOUT);
        Direct {
            settings,
            registry,
            activity,
            metrics,
            ids,
            timeouts,
            pool,
            h2c: h2c::H2cPool::default(),
        }
    }

    /// Closes kept connections to VMs that are no longer usable.
    pub fn sweep(&self) {
        self.pool.sweep();
        self.h2c.sweep(IDLE_TIMEOUT);
    }

    /// Serves the request whose first bytes `conn` has read ahead, if it is one for this
    /// path. `stopping`: the edge is shutting down, so the connection is not kept.
    pub async fn serve(&self, conn: &mut PlainConn, stopping: bool) -> Outcome {
        let started = Instant::now();
        let header_deadline = tokio::time::Instant::now() + self.timeouts.header;
        let client = conn.peer();
        let mut req = loop {
            let limit = self.settings.max_header_bytes;
            match parse_request(conn.ahead(), limit, client, &self.ids) {
                Ok(Some(req)) => break req,
                Ok(None) => {}
                Err(Declined) => return Outcome::Declined,
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
        let result = if activity.admit() {
            self.exchange(conn, &mut req, target, &activity, &mut done, stopping)
                .await
        } else {
            Err(Failure::Refuse(Refusal::RateLimited))
        };
        let (keep_alive, answered) = match result {
            Ok(keep_alive) => (keep_alive, true),
            Err(Failure::Refuse(refusal)) => {
                // An unread body leaves the connection's framing unknown.
                let keep = done.bytes_in == req.body_len
                    && !req.close
                    && !stopping
                    && refusal == Refusal::RateLimited;
                self.metrics.refused(refusal.reason());
                done.status = refusal.status();
                let answered = self.answer(conn, &refusal, &req.id, keep).await;
                if let Err(e) = answered {
                    done.error = e;
                }
                done.refusal = Some(refusal);
                (keep, answered.is_ok())
            }
            Err(Failure::Client(e) | Failure::Cut(e)) => {
                done.error = e;
                (false, false)
            }
        };
        let line = Logged {
            id: &req.id,
            client,
            method: req.text(&req.method),
            host: req.text(&req.host),
            path: req.text(&req.path),
        };
        self.finish(&line, vm, service, &done, started);
        if keep_alive {
            return Outcome::KeepAlive;
        }
        if answered && done.bytes_in < req.body_len {
            // The client may still be sending the body: closing now would reset the
            // connection, and could take the answer with it.
            conn.linger().await;
        }
        Outcome::Close
    }

    /// The running VM service the request's host names, if this path may take it there
    /// (refusals, waits and h2c are pingora's).
    fn route(&self, req: &Request) -> Option<(VmId, ServiceName, SocketAddr)> {
        let snapshot = self.registry.load();
        let route = snapshot
            .route_host(req.text(&req.host), &self.settings.domain)
            .ok()?;
        let target = route.target();
        let dialable = self.settings.may_dial(target.ip());
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
        let body_left = req.body_len - done.bytes_in;

        let retryable = req.can_retry(body_left);
        loop {
            let (mut tcp, reused) = self.send_header(target, &req.upstream, retryable).await?;
            let retry = reused && retryable;
            let sent = Instant::now();
            let kept = if body_left > 0 {
                self.duplex(conn, &mut tcp, req, sent, activity, done, stopping)
                    .await?
            } else {
                let mut buf = Vec::with_capacity(4096);
                let Some(answer) = self.read_answer(&mut tcp, conn, req, &mut buf).await? else {
                    if retry {
                        continue;
                    }
                    return Err(Failure::Refuse(Refusal::BadUpstreamAnswer));
                };
                let keep = !req.close && !stopping;
                self.relay(conn, &mut tcp, answer, &buf, sent, keep, activity, done)
                    .await?
            };
            if kept.reusable {
                self.pool.put(target, tcp);
            }
            return Ok(kept.client);
        }
    }

    /// The rest of a request's body to the VM while its answer comes back, as pingora
    /// does: a VM may answer before it has read the whole body (a 413, a 401: the client
    /// gets that answer, as from nginx), or stream its answer while it reads (an echo).
    /// A client connection whose body was not all read by the time the answer began is
    /// closed after it (the body's end is where the next request would begin).
    #[allow(clippy::too_many_arguments)]
    async fn duplex(
        &self,
        conn: &mut PlainConn,
        tcp: &mut TcpStream,
        req: &Request,
        sent: Instant,
        activity: &VmActivity,
        done: &mut Done,
        stopping: bool,
    ) -> Result<Kept, Failure> {
        let body_read = AtomicU64::new(done.bytes_in);
        let body_whole = AtomicBool::new(false);
        let body_sent = Notify::new();
        let kept = {
            let (mut client_in, mut client_out) = conn.halves();
            let (mut vm_in, mut vm_out) = tcp.split();
            let pump = self.send_body(
                &mut client_in,
                &mut vm_out,
                req.body_len,
                &body_read,
                activity,
            );
            let answered = async {
                // No limit on the VM's answer while the body is still going (a slow upload
                // is not a slow VM); the upstream timeout from then on, as nginx's
                // proxy_read_timeout.
                tokio::select! {
                    _ = vm_in.readable() => {}
                    _ = body_sent.notified() => {}
                }
                let mut buf = Vec::with_capacity(4096);
                let answer = self.read_answer(&mut vm_in, &mut client_out, req, &mut buf);
                let answer = answer
                    .await?
                    .ok_or(Failure::Refuse(Refusal::BadUpstreamAnswer))?;
                let keep = body_whole.load(Ordering::Acquire) && !req.close && !stopping;
                self.relay(
                    &mut client_out,
                    &mut vm_in,
                    answer,
                    &buf,
                    sent,
                    keep,
                    activity,
                    done,
                )
                .await
            };
            tokio::pin!(pump, answered);
            let mut pumping = true;
            loop {
                tokio::select! {
                    biased;
                    pumped = &mut pump, if pumping => match pumped {
                        Ok(whole) => {
                            pumping = false;
                            body_whole.store(whole, Ordering::Release);
                            body_sent.notify_one();
                        }
                        Err(failure) => break Err(failure),
                    },
                    kept = &mut answered => break kept,
                }
            }
        };
        done.bytes_in = body_read.load(Ordering::Relaxed);
        let mut kept = kept?;
        // A body the VM did not take whole leaves its connection mid-request.
        kept.reusable &= body_whole.load(Ordering::Acquire);
        Ok(kept)
    }

    /// An answer's header and body to the client, once its header is in: see
    /// [`Direct::stream_answer`]. `keep`: the client's connection may be kept, as far as
    /// the request goes.
    #[allow(clippy::too_many_arguments)]
    async fn relay<C, V>(
        &self,
        client: &mut C,
        vm: &mut V,
        answer: Answer,
        rest: &[u8],
        sent: Instant,
        keep: bool,
        activity: &VmActivity,
        done: &mut Done,
    ) -> Result<Kept, Failure>
    where
        C: AsyncWrite + Unpin,
        V: AsyncRead + Unpin,
    {
        self.metrics.responded(sent.elapsed().as_secs_f64());
        done.status = answer.status;
        // An answer that ends only when the VM closes ends the client's connection too.
        let client_keep = keep && answer.framing != Framing::UntilClose;
        let reusable = self
            .stream_answer(client, vm, answer, rest, client_keep, activity, done)
            .await?;
        Ok(Kept {
            client: client_keep,
            reusable,
        })
    }

    /// A connection to `target` with `header` written on it, and whether it was a kept
    /// one. A kept connection may turn out closed: a `retryable` request then goes on
    /// the next one, or a new one.
    async fn send_header(
        &self,
        target: SocketAddr,
        header: &[u8],
        retryable: bool,
    ) -> Result<(TcpStream, bool), Failure> {
        loop {
            let (mut tcp, reused) = match self.pool.take(target) {
                Some(tcp) => (tcp, true),
                None => (self.connect(target).await?, false),
            };
            match upstream_io(self.settings.upstream_timeout, tcp.write_all(header)).await {
                Ok(()) => return Ok((tcp, reused)),
                Err(_) if reused && retryable => continue,
                Err(refusal) => return Err(Failure::Refuse(refusal)),
            }
        }
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

    /// The rest of the request's body (what did not come with its header), client to VM;
    /// `false` when the VM stopped taking it (it closed, or stopped reading: its answer
    /// may still come). `read` counts the body's bytes read from the client.
    async fn send_body<C, V>(
        &self,
        client: &mut C,
        vm: &mut V,
        body_len: u64,
        read: &AtomicU64,
        activity: &VmActivity,
    ) -> Result<bool, Failure>
    where
        C: AsyncRead + Unpin,
        V: AsyncWrite + Unpin,
    {
        let mut left = body_len - read.load(Ordering::Relaxed);
        let mut chunk = vec![0u8; clamp(left).min(CHUNK)];
        while left > 0 {
            let want = clamp(left).min(chunk.len());
            let n = match tokio::time::timeout(self.timeouts.read, client.read(&mut chunk[..want]))
                .await
            {
                Ok(Ok(0) | Err(_)) => return Err(Failure::Client("the client closed mid-body")),
                Err(_) => return Err(Failure::Client("the client stopped sending its body")),
                Ok(Ok(n)) => n,
            };
            activity.inbound(n);
            read.fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
            let write = vm.write_all(&chunk[..n]);
            if !matches!(
                tokio::time::timeout(self.settings.upstream_timeout, write).await,
                Ok(Ok(()))
            ) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The VM's answer header, parsed; interim answers (1xx) are passed on to the client
    /// as they come. What was read past the header is left in `buf`. `None` when the
    /// connection closed before any answer: the request may go again on a new one.
    async fn read_answer<V, C>(
        &self,
        tcp: &mut V,
        conn: &mut C,
        req: &Request,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Answer>, Failure>
    where
        V: AsyncRead + Unpin,
        C: AsyncWrite + Unpin,
    {
        let mut interim = false;
        loop {
            if !buf.is_empty() {
                match parse_answer::<Vec<u8>>(buf, req.is_head(), &req.id)? {
                    Some((answer, len)) if answer.status < 200 => {
                        // 100 Continue, 103 Early Hints: passed on as they came.
                        client_io(self.timeouts.read, conn, &buf[..len]).await?;
                        buf.drain(..len);
                        interim = true;
                        continue;
                    }
                    Some((answer, len)) => {
                        buf.drain(..len);
                        return Ok(Some(answer));
                    }
                    None => {}
                }
            }
            if !self.read_answer_bytes(tcp, buf, interim).await? {
                return Ok(None);
            }
        }
    }

    /// Reads more of an answer's header into `buf`, under the upstream timeout; `false`
    /// when the connection closed before any answer began (`interim`: one did).
    async fn read_answer_bytes<V: AsyncRead + Unpin>(
        &self,
        tcp: &mut V,
        buf: &mut Vec<u8>,
        interim: bool,
    ) -> Result<bool, Failure> {
        if buf.len() > MAX_ANSWER_HEADER {
            return Err(Failure::Refuse(Refusal::BadUpstreamAnswer));
        }
        buf.reserve(4096);
        match tokio::time::timeout(self.settings.upstream_timeout, tcp.read_buf(buf)).await {
            Err(_) => Err(Failure::Refuse(Refusal::UpstreamTimeout)),
            Ok(Ok(0) | Err(_)) if buf.is_empty() && !interim => Ok(false),
            Ok(Ok(0) | Err(_)) => Err(Failure::Refuse(Refusal::BadUpstreamAnswer)),
            Ok(Ok(_)) => Ok(true),
        }
    }

    /// The answer's header (with the connection field `keep` calls for) and body to the
    /// client, as the body arrives; whether the VM's connection may carry another request.
    #[allow(clippy::too_many_arguments)]
    async fn stream_answer<C, V>(
        &self,
        conn: &mut C,
        tcp: &mut V,
        answer: Answer,
        rest: &[u8],
        keep: bool,
        activity: &VmActivity,
        done: &mut Done,
    ) -> Result<bool, Failure>
    where
        C: AsyncWrite + Unpin,
        V: AsyncRead + Unpin,
    {
        let mut reusable = answer.reusable;
        let mut body = Body::new(answer.framing);
        let mut out = answer.header;
        out.extend_from_slice(header_end(keep));
        // The body's first bytes go in the header's send.
        let (take, mut end) = body.feed(rest)?;
        reusable &= take == rest.len();
        out.extend_from_slice(&rest[..take]);
        client_io(self.timeouts.read, conn, &out).await?;
        activity.outbound(take);
        done.bytes_out = take as u64;
        let mut buf = BytesMut::new();
        let until_close = answer.framing == Framing::UntilClose;
        while !end {
            buf.clear();
            let n = self.read_body_bytes(tcp, &mut buf, until_close).await?;
            if n == 0 {
                break;
            }
            let (take, fin) = body.feed(&buf).map_err(malformed_body)?;
            reusable &= take == n;
            end = fin;
            // Each piece is sent as it comes: an event stream's events are not held back.
            client_io(self.timeouts.read, conn, &buf[..take]).await?;
            activity.outbound(take);
            done.bytes_out += take as u64;
        }
        Ok(reusable)
    }

    /// Reads more of an answer's body into `buf`, under the upstream timeout; how much
    /// (0: the VM closed, which ends a body framed by the close, `until_close`).
    async fn read_body_bytes<V: AsyncRead + Unpin>(
        &self,
        tcp: &mut V,
        buf: &mut BytesMut,
        until_close: bool,
    ) -> Result<usize, Failure> {
        buf.reserve(CHUNK);
        match tokio::time::timeout(self.settings.upstream_timeout, tcp.read_buf(buf)).await {
            Err(_) => Err(Failure::Cut("the VM stopped answering mid-body")),
            Ok(Ok(0)) if until_close => Ok(0),
            Ok(Ok(0) | Err(_)) => Err(Failure::Cut("the VM closed mid-body")),
            Ok(Ok(n)) => Ok(n),
        }
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
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(header_end(keep));
        out.extend_from_slice(body.as_bytes());
        client_io(self.timeouts.read, conn, &out)
            .await
            .map_err(|_| "the client went away before the answer")
    }

    /// The request's metrics and access log line.
    fn finish(
        &self,
        line: &Logged<'_>,
        vm: VmId,
        service: ServiceName,
        done: &Done,
        started: Instant,
    ) {
        self.metrics.closed();
        self.metrics.direct_request();
        self.metrics.request_done(done.status, Some(service));
        self.metrics.vm_bytes(&vm, done.bytes_in, done.bytes_out);
        tracing::info!(
            target: "vmedge::access",
            request_id = %line.id,
            client = %line.client.map(|a| a.to_string()).unwrap_or_default(),
            method = line.method,
            host = line.host,
            path = line.path,
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

/// The connection field that says whether the client's connection is kept, and the
/// header's end.
fn header_end(keep: bool) -> &'static [u8] {
    if keep {
        b"connection: keep-alive\r\n\r\n"
    } else {
        b"connection: close\r\n\r\n"
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
async fn client_io<C: AsyncWrite + Unpin>(
    limit: Duration,
    conn: &mut C,
    bytes: &[u8],
) -> Result<(), Failure> {
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
