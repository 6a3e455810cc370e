//! Idle client connections: bounded in time, and held at the cost of the connection alone.
//!
//! pingora (0.9) waits for a new plain connection's first 24 bytes (to tell h2c from
//! HTTP/1) with no time limit, keeps an HTTP/1.1 connection alive with no timeout after its
//! first request, and then reads the next request's header with no timeout either. It
//! waits for all of these on the connection's accept task (~9 kB, its TLS handshake state
//! inline even on a plain listener), inside the future that then proxies the request
//! (~14 kB for the edge), with a 4 kB header buffer: an idle keep-alive connection cost
//! ~38 kB.
//!
//! - [`FirstBytes`] moves a new plain connection off pingora's accept task onto one of its
//!   own, and bounds the wait for its first bytes by the idle timeout.
//! - [`IdleFirst`] moves a plain HTTP/1 connection onto a task of its own too, which waits
//!   for the first byte of each next request with nothing but the connection, under the
//!   idle timeout, then hands the session to the proxy with each read of the request
//!   bounded by the read timeout and the whole header by the header timeout (a client
//!   trickling a header in, a byte at a time, is cut off, as nginx's
//!   `client_header_timeout` does); the request machinery is allocated only while a
//!   request is under way (nginx, likewise, frees its buffers between requests). TLS
//!   connections stay on pingora's task (it holds their TLS state) and wait in the proxy,
//!   under the idle timeout; h2 streams are offered to the edge's own h2 path
//!   ([`Direct::serve_h2`]) and go to the proxy when declined. Each plain request is
//!   offered to the edge's own HTTP/1.1 path ([`Direct`]) first, and reaches the proxy
//!   only when declined there. A plain connection still silent after [`PARK_AFTER`] is
//!   parked ([`crate::park`]): its task ends, and a new one takes it up when its next
//!   request begins.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v1::server::HttpSession as Http1Session;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::sync::{oneshot, Notify};

use crate::conn::PlainConn;
use crate::direct::{Direct, H2Offered, Outcome};
use crate::metrics::Metrics;
use crate::park::{Parking, PARK_AFTER};

/// How long a client connection may wait for its next request, and how long a client
/// may stay silent in the middle of one.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// Waiting for the next request (or the first one) on a connection.
    pub idle: Duration,
    /// Each read of a request's header or body.
    pub read: Duration,
    /// The whole header of a request, from its first byte.
    pub header: Duration,
}

/// Handed to the proxy with each HTTP/1 session (as its connection context), to be
/// [`done`](HeaderRead::done) once the request's header is in: until then, the session
/// runs under the header timeout. The edge's proxy does it in `on_connection_reuse`,
/// which pingora calls right after reading a header when a session carries a context.
pub struct HeaderRead(oneshot::Sender<()>);

impl HeaderRead {
    /// The header is in.
    pub fn done(self) {
        let _ = self.0.send(());
    }
}

/// An app whose new plain connections are taken off pingora's accept task (as
/// [`PlainConn`]s, on a task of their own) and reach `A` only once their first bytes are
/// there, within the idle timeout.
/// Every connection, plain or TLS, is counted in `vmedge_edge_open_connections`.
pub struct FirstBytes<A> {
    app: Arc<A>,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl<A> FirstBytes<A> {
    /// `app` behind a bounded wait for each new connection's first bytes.
    pub fn new(app: A, idle: Duration, metrics: Arc<Metrics>) -> FirstBytes<A> {
        FirstBytes {
            app: Arc::new(app),
            idle,
            metrics,
        }
    }
}

impl<A> FirstBytes<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    /// A new plain connection, on a task of its own: its first bytes (within the idle
    /// timeout), then `A`, as pingora's accept task would have run it.
    async fn serve_connection(self: Arc<Self>, mut conn: PlainConn, shutdown: ShutdownWatch) {
        let mut stopping = shutdown.clone();
        tokio::select! {
            data = tokio::time::timeout(self.idle, conn.wait_for_data()) => {
                if !matches!(data, Ok(Ok(()))) {
                    return;
                }
            }
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        let mut next = self.app.process_new(Box::new(conn), &shutdown).await;
        while let Some(stream) = next {
            next = self.app.process_new(stream, &shutdown).await;
        }
    }
}

#[async_trait]
impl<A> ServerApp for FirstBytes<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let open = self.metrics.connection_opened();
        if stream.get_ssl_digest().is_some() {
            // TLS: pingora's task holds the TLS state; the connection goes on there, to
            // its end.
            let next = self.app.process_new(stream, shutdown).await;
            drop(open);
            return next;
        }
        match PlainConn::take(stream) {
            // pingora's accept task (~9 kB) and its stream's buffers end here: the
            // connection waits for its first bytes holding only itself.
            Ok(conn) => {
                let conn = conn.counted(open);
                tokio::spawn(self.clone().serve_connection(conn, shutdown.clone()));
                None
            }
            Err(_) => {
                // Out of descriptors: as if the accept had failed.
                tracing::warn!("a new connection could not be taken over: closed");
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// An HTTP app whose HTTP/1 sessions reach `A` only once a request has begun to arrive.
pub struct IdleFirst<A> {
    app: Arc<A>,
    /// Takes the plain HTTP/1.1 requests it can before `app` sees them.
    direct: Option<Arc<Direct>>,
    /// Parks silent plain connections, when set.
    parking: Option<ParkingSlot>,
    timeouts: ClientTimeouts,
    stopping: AtomicBool,
    stop: Notify,
}

/// Where parked connections go: the set is made (and its task spawned) when the first
/// connection is parked, on the runtime the connections run on.
struct ParkingSlot {
    metrics: Arc<Metrics>,
    /// `None` inside: the set could not be made, and connections wait on their tasks.
    set: OnceLock<Option<Arc<Parking<Option<u32>>>>>,
}

/// How a wait for a request's first byte ended.
enum Waited {
    /// It is there (`false`: a stream that cannot be peeked at, not waited for).
    Arrived(bool),
    /// Nothing came within the time given.
    Silent,
    /// The client closed, or the server is stopping.
    Gone,
}

impl<A> IdleFirst<A> {
    /// `app` behind an idle wait.
    pub fn new(app: A, timeouts: ClientTimeouts) -> IdleFirst<A> {
        IdleFirst {
            app: Arc::new(app),
            direct: None,
            parking: None,
            timeouts,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }

    /// Plain HTTP/1.1 requests offered to `direct` first.
    pub fn with_direct(mut self, direct: Arc<Direct>) -> IdleFirst<A> {
        self.direct = Some(direct);
        self
    }

    /// Plain connections silent for [`PARK_AFTER`] parked until their next request (or
    /// their idle timeout), counted in `metrics`.
    pub fn with_parking(mut self, metrics: Arc<Metrics>) -> IdleFirst<A> {
        self.parking = Some(ParkingSlot {
            metrics,
            set: OnceLock::new(),
        });
        self
    }

    /// The session once its next request has begun to arrive, and whether that was seen
    /// (a TLS stream cannot be peeked at); `None` when the client closed, stayed silent
    /// past the idle timeout, or the server is stopping.
    ///
    /// pingora keeps an HTTP/1.1 connection alive with no timeout at all after its first
    /// request, and then reads the next request's header with none either; here the wait
    /// is bounded by the idle timeout and each read of the request by the read timeout.
    async fn next_request(&self, between: Between) -> Option<(ServerSession, bool)> {
        let (mut stream, reuses) = match between {
            Between::Pipelined(h1) => return Some((ServerSession::H1(*h1), true)),
            Between::Idle { stream, reuses } => (stream, reuses),
        };
        let mut byte = [0u8; 1];
        let Waited::Arrived(peeked) = self
            .first_byte(self.timeouts.idle, stream.try_peek(&mut byte))
            .await
        else {
            return None;
        };
        let mut session = ServerSession::new_http1(stream);
        // Keep-alive "off" until the request says otherwise (pingora decides it from the
        // request's header) makes the header reads use the read timeout. A stream that
        // cannot be peeked at (TLS) waits in the proxy, under the idle timeout.
        let keepalive = (!peeked).then(|| self.timeouts.idle.as_secs().max(1));
        session.set_keepalive(keepalive);
        session.set_read_timeout(Some(self.timeouts.read));
        session.set_keepalive_reuses_remaining(reuses);
        Some((session, peeked))
    }

    /// Waits for `arrived` (a stream has a byte to read, left unread; `false`: a stream
    /// that cannot be peeked at, not waited for) for `limit` at most.
    async fn first_byte(
        &self,
        limit: Duration,
        arrived: impl Future<Output = io::Result<bool>>,
    ) -> Waited {
        let stop = self.stop.notified();
        if self.stopping.load(Ordering::Acquire) {
            return Waited::Gone;
        }
        let peek = tokio::time::timeout(limit, arrived);
        tokio::select! {
            biased;
            peeked = peek => match peeked {
                Ok(Ok(seen)) => Waited::Arrived(seen),
                Ok(Err(_)) => Waited::Gone,
                Err(_) => Waited::Silent,
            },
            _ = stop => Waited::Gone,
        }
    }
}

impl<A> IdleFirst<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// The rest of a plain HTTP/1 connection, request after request, on a task of its
    /// own: between requests this task holds the connection, a timer and little else
    /// (each request's machinery is boxed, and freed when it is done), nothing of
    /// pingora's (the accept task that would otherwise wait with it is ~9 kB).
    async fn serve_connection(self: Arc<Self>, mut between: Between, shutdown: ShutdownWatch) {
        loop {
            between = match between {
                Between::Idle { stream, reuses } => {
                    match self.try_direct(stream, reuses, &shutdown).await {
                        Offered::Served(stream) => {
                            between = Between::Idle { stream, reuses };
                            continue;
                        }
                        Offered::Declined(stream) => Between::Idle { stream, reuses },
                        Offered::Closed => return,
                    }
                }
                pipelined => pipelined,
            };
            let Some((session, seen)) = self.next_request(between).await else {
                return;
            };
            let Some(reused) = Box::pin(self.proxy(session, seen, &shutdown)).await else {
                return;
            };
            // What pingora's own loop does between two requests of a connection.
            let (stream, settings) = reused.consume();
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            let ServerSession::H1(h1) = session else {
                return;
            };
            between = Between::of(h1);
        }
    }

    /// A plain connection's next request, waited for (see [`IdleFirst::wait_plain`]),
    /// then offered to the direct path once its first byte is in.
    async fn try_direct(
        self: &Arc<Self>,
        stream: Stream,
        reuses: Option<u32>,
        shutdown: &ShutdownWatch,
    ) -> Offered {
        if !stream.as_any().is::<PlainConn>() {
            return Offered::Declined(stream);
        }
        let Ok(conn) = stream.into_any().downcast::<PlainConn>() else {
            return Offered::Closed;
        };
        let Some(mut conn) = self.wait_plain(conn, reuses, shutdown).await else {
            return Offered::Closed;
        };
        let Some(direct) = &self.direct else {
            return Offered::Declined(conn);
        };
        let stopping = self.stopping.load(Ordering::Acquire);
        // Boxed, as pingora's request machinery is: the idle wait stays small.
        match Box::pin(direct.serve(&mut conn, stopping)).await {
            Outcome::Declined => Offered::Declined(conn),
            Outcome::KeepAlive => Offered::Served(conn),
            Outcome::Close => Offered::Closed,
        }
    }

    /// Waits for the first byte of a plain connection's next request: on this task for
    /// [`PARK_AFTER`], then (when the edge parks connections) parked for the rest of the
    /// idle timeout, and this task ends. Waited for in place: `Peek`'s boxed future would
    /// cost each idle connection an allocation of its own. `None` when the connection is
    /// done here: closed, silent past the idle timeout, parked, or the server stopping.
    async fn wait_plain(
        self: &Arc<Self>,
        mut conn: Box<PlainConn>,
        reuses: Option<u32>,
        shutdown: &ShutdownWatch,
    ) -> Option<Box<PlainConn>> {
        let idle = self.timeouts.idle;
        let here = match self.parking {
            Some(_) => idle.min(PARK_AFTER),
            None => idle,
        };
        let arrived = async { conn.wait_for_data().await.map(|()| true) };
        match self.first_byte(here, arrived).await {
            Waited::Arrived(_) => return Some(conn),
            Waited::Gone => return None,
            Waited::Silent if here == idle => return None,
            Waited::Silent => {}
        }
        if let (true, Some(parking)) = (conn.is_quiet(), self.parking_set(shutdown)) {
            match parking.park(conn, reuses, idle - here) {
                Ok(()) => return None,
                Err(back) => conn = back,
            }
        }
        // Not parked: the rest of the wait on this task.
        let arrived = async { conn.wait_for_data().await.map(|()| true) };
        match self.first_byte(idle - here, arrived).await {
            Waited::Arrived(_) => Some(conn),
            Waited::Silent | Waited::Gone => None,
        }
    }

    /// The parking set, made on first use; `None` when the edge does not park
    /// connections or the set could not be made.
    fn parking_set(self: &Arc<Self>, shutdown: &ShutdownWatch) -> Option<&Parking<Option<u32>>> {
        let slot = self.parking.as_ref()?;
        let set = slot.set.get_or_init(|| {
            // Weak: the set lives in the app.
            let app = Arc::downgrade(self);
            let shutdown = shutdown.clone();
            let resume = move |conn: PlainConn, reuses: Option<u32>| {
                if let Some(app) = app.upgrade() {
                    let stream: Stream = Box::new(conn);
                    let between = Between::Idle { stream, reuses };
                    tokio::spawn(app.serve_connection(between, shutdown.clone()));
                }
            };
            Parking::start(slot.metrics.clone(), resume)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "idle connections cannot be parked: they wait on their tasks");
                })
                .ok()
        });
        set.as_deref()
    }

    /// A request whose first byte is in (or, `seen` false, whose stream could not be
    /// peeked at), proxied under the header timeout; the stream back when the
    /// connection may carry another request.
    async fn proxy(
        self: &Arc<Self>,
        mut session: ServerSession,
        seen: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let (read, header) = oneshot::channel();
        session.set_connection_user_context(Some(Box::new(HeaderRead(read))));
        // From the first byte, or (when that could not be seen) after the idle wait.
        let limit = if seen {
            self.timeouts.header
        } else {
            self.timeouts.idle + self.timeouts.header
        };
        let mut proxied = self.app.process_new_http(session, shutdown);
        tokio::select! {
            biased;
            done = &mut proxied => return done,
            read = tokio::time::timeout(limit, header) => {
                if read.is_err() {
                    // Dropping the request closes the connection (nginx: client_header_timeout).
                    tracing::debug!(?limit, "request header not in within the header timeout: connection closed");
                    return None;
                }
            }
        }
        proxied.await
    }
}

/// A request offered to the direct path.
enum Offered {
    /// Served there; the connection goes on.
    Served(Stream),
    /// Not one for it: the request's bytes are still to be read.
    Declined(Stream),
    /// The connection is done here: closed, or parked.
    Closed,
}

/// An HTTP/1 connection between two requests.
enum Between {
    /// The previous request may have left the next one in the session's buffer.
    Pipelined(Box<Http1Session>),
    /// Only the stream, and what a new session would not know (pingora's own settings
    /// carried across reuse; the connection context is the edge's, set per request).
    Idle { stream: Stream, reuses: Option<u32> },
}

impl Between {
    fn of(h1: Http1Session) -> Between {
        if h1.pipelining_enabled() {
            return Between::Pipelined(Box::new(h1));
        }
        let reuses = h1.get_keepalive_reuses_remaining();
        Between::Idle {
            stream: h1.into_inner(),
            reuses,
        }
    }
}

#[async_trait]
impl<A> HttpServerApp for IdleFirst<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // An h2 stream is offered to the direct path first, in place: moving it out of
        // the session would copy it, and keep a third copy in this task's future.
        if let (ServerSession::H2(stream), Some(direct)) = (&mut session, &self.direct) {
            if direct.serve_h2(stream).await == H2Offered::Served {
                return None;
            }
        }
        let h1 = match session {
            ServerSession::H1(h1) => h1,
            // Declined h2 streams, and the rest: pingora's proxy serves them.
            other => return self.app.process_new_http(other, shutdown).await,
        };
        if h1.digest().ssl_digest.is_some() {
            // TLS: pingora's task holds the TLS state; the requests go on there.
            let (session, seen) = self.next_request(Between::of(h1)).await?;
            return self.proxy(session, seen, shutdown).await;
        }
        // pingora's task ends here, and the connection goes on on a task of its own.
        tokio::spawn(
            self.clone()
                .serve_connection(Between::of(h1), shutdown.clone()),
        );
        None
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
        let parked = self.parking.as_ref().and_then(|p| p.set.get());
        if let Some(Some(parked)) = parked {
            parked.close();
        }
        self.app.http_cleanup().await;
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.app
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use pingora::apps::HttpPersistentSettings;
    use pingora::http::ResponseHeader;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    /// What the app behind saw of a session: the request's path and the reuses left, or
    /// the error reading it.
    type Seen = Result<(String, Option<u32>), String>;

    /// An app that reads each session's request, says so as the edge's proxy does, takes
    /// a while over a path starting `/busy` (longer than the header timeout), reports what
    /// it saw, and answers a path starting `/again` with an empty 200, keeping the
    /// connection; any other request ends it.
    struct Recorder(mpsc::UnboundedSender<Seen>);

    #[async_trait]
    impl HttpServerApp for Recorder {
        async fn process_new_http(
            self: &Arc<Self>,
            mut session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            if let Err(e) = session.read_request().await {
                let _ = self.0.send(Err(e.to_string()));
                return None;
            }
            if let Some(read) = session.take_connection_user_context() {
                if let Ok(read) = read.downcast::<HeaderRead>() {
                    read.done();
                }
            }
            let path = session.req_header().uri.path().to_string();
            if path.starts_with("/busy") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            let reuses = session.get_keepalive_reuses_remaining();
            let _ = self.0.send(Ok((path.clone(), reuses)));
            if !path.starts_with("/again") {
                return None;
            }
            let mut answer = ResponseHeader::build(200, None).ok()?;
            answer.insert_header("content-length", "0").ok()?;
            session.write_response_header(Box::new(answer)).await.ok()?;
            let settings = HttpPersistentSettings::for_session(&session);
            let reusable = session.finish().await.ok()??;
            Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
        }
    }

    /// A connection handed to an [`IdleFirst`] (1 s idle and read timeouts, a 2 s header
    /// timeout, unless told otherwise) as pingora hands it one; its session said 7
    /// reuses were left.
    struct Served {
        app: Arc<IdleFirst<Recorder>>,
        /// Where its metrics are, when it parks connections.
        registry: prometheus_client::registry::Registry,
        /// What the app saw.
        seen: mpsc::UnboundedReceiver<Seen>,
        /// The client's end.
        client: TcpStream,
    }

    impl Served {
        /// Reads what the server sends until it closes the connection.
        async fn until_closed(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            let read = self.client.read_to_end(&mut got);
            match tokio::time::timeout(Duration::from_secs(30), read).await {
                Ok(_) => got,
                Err(_) => panic!("the connection was never closed"),
            }
        }
    }

    async fn served() -> Served {
        served_idle(Duration::from_secs(1)).await
    }

    /// [`served`] with another idle timeout.
    async fn served_idle(idle: Duration) -> Served {
        served_with(idle, false).await
    }

    /// [`served`] with another idle timeout, parking connections when `parking`.
    async fn served_with(idle: Duration, parking: bool) -> Served {
        let (tx, seen) = mpsc::unbounded_channel();
        let (conn, client) = crate::conn::tests::pair().await;
        let stream: Stream = Box::new(conn);
        let timeouts = ClientTimeouts {
            idle,
            read: Duration::from_secs(1),
            header: Duration::from_secs(2),
        };
        let mut session = ServerSession::new_http1(stream);
        // pingora's own settings after an HTTP/1.1 request: keep-alive with no timeout.
        session.set_keepalive(Some(0));
        session.set_keepalive_reuses_remaining(Some(7));
        let mut registry = prometheus_client::registry::Registry::default();
        let mut app = IdleFirst::new(Recorder(tx), timeouts);
        if parking {
            app = app.with_parking(Metrics::register(&mut registry));
        }
        let app = Arc::new(app);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        // pingora's task is done with a plain connection at once; it goes on elsewhere.
        let handed = tokio::time::timeout(
            Duration::from_millis(500),
            app.process_new_http(session, &shutdown),
        )
        .await;
        assert!(
            matches!(handed, Ok(None)),
            "pingora's task kept the connection"
        );
        Served {
            app,
            registry,
            seen,
            client,
        }
    }

    impl Served {
        /// Connections parked now, as the metrics say.
        fn parked(&self) -> u64 {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("vmedge_edge_parked_connections "));
            line.and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{text}"))
        }

        /// Sends a GET of `path`, which the app must see with `reuses` left.
        async fn ask(&mut self, path: &str, reuses: u32) {
            let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            self.client.write_all(request.as_bytes()).await.unwrap();
            let seen = self.seen.recv().await;
            assert_eq!(seen, Some(Ok((path.to_string(), Some(reuses)))));
        }

        /// Reads an empty 200 (its header whole).
        async fn answered(&mut self) {
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                self.client.read_exact(&mut byte).await.unwrap();
                answer.push(byte[0]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        }

        /// Waits up to 10 s for `parked` connections parked.
        async fn until_parked(&self, parked: u64) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.parked() != parked && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(self.parked(), parked);
        }
    }

    #[tokio::test]
    async fn a_silent_connection_is_parked_and_its_next_request_served_where_it_left_off() {
        let mut s = served_with(Duration::from_secs(30), true).await;
        s.ask("/again", 7).await;
        s.answered().await;
        // Not parked while requests come.
        assert_eq!(s.parked(), 0);
        s.until_parked(1).await;
        // Parked: its task ended, and a request makes a new one with what the
        // connection had (its reuses left).
        s.ask("/again", 6).await;
        s.answered().await;
        assert_eq!(s.parked(), 0);
        // And again: the same connection parks a second time.
        s.until_parked(1).await;
        s.ask("/last", 5).await;
        s.until_closed().await;
        assert_eq!(s.parked(), 0);
    }

    #[tokio::test]
    async fn a_parked_connection_closes_at_its_idle_timeout_or_when_its_client_does() {
        let started = Instant::now();
        let mut silent = served_with(Duration::from_secs(3), true).await;
        silent.until_parked(1).await;
        assert!(silent.until_closed().await.is_empty());
        assert!(started.elapsed() >= Duration::from_secs(3));
        assert_eq!(silent.parked(), 0);
        assert!(silent.seen.try_recv().is_err());

        let mut closing = served_with(Duration::from_secs(30), true).await;
        closing.until_parked(1).await;
        closing.client.shutdown().await.unwrap();
        closing.until_closed().await;
        closing.until_parked(0).await;
        assert!(closing.seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn stopping_closes_parked_connections() {
        let mut s = served_with(Duration::from_secs(120), true).await;
        s.until_parked(1).await;
        s.app.http_cleanup().await;
        s.until_closed().await;
        assert_eq!(s.parked(), 0);
        assert!(s.seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_request_arriving_later_reaches_the_app_whole_with_its_settings() {
        let mut s = served().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            s.seen.try_recv().is_err(),
            "the app ran before any byte came"
        );
        s.client
            .write_all(b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let seen = s.seen.recv().await;
        assert_eq!(seen, Some(Ok(("/later".to_string(), Some(7)))));
        s.until_closed().await;
    }

    #[tokio::test]
    async fn the_next_request_of_a_connection_is_served_with_the_settings_carried_over() {
        let mut s = served().await;
        s.client
            .write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            s.seen.recv().await,
            Some(Ok(("/again".to_string(), Some(7))))
        );
        let mut answer = [0u8; 64];
        let n = s.client.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{answer:?}");
        // Idle for a while between the two, but within the idle timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.client
            .write_all(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            s.seen.recv().await,
            Some(Ok(("/last".to_string(), Some(6))))
        );
        s.until_closed().await;
    }

    #[tokio::test]
    async fn a_closed_or_silent_connection_never_reaches_the_app() {
        let mut closed = served().await;
        closed.client.shutdown().await.unwrap();
        closed.until_closed().await;
        assert!(closed.seen.try_recv().is_err());

        // pingora alone would wait for ever.
        let started = Instant::now();
        let mut silent = served().await;
        assert!(silent.until_closed().await.is_empty());
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(silent.seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_request_stalling_mid_header_times_out() {
        let mut s = served().await;
        s.client
            .write_all(b"GET /slow HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(30), s.seen.recv())
            .await
            .expect("the header read never timed out");
        assert!(
            matches!(&seen, Some(Err(e)) if e.contains("timeout")),
            "{seen:?}"
        );
        s.until_closed().await;
    }

    #[tokio::test]
    async fn a_header_trickling_in_is_cut_off_and_a_long_request_is_not() {
        let mut trickle = served().await;
        // A byte every 300 ms: each read is in time, the whole header is not.
        let mut cut = false;
        for byte in b"GET /trickle HTTP/1.1\r\nHost: a\r\n\r\n" {
            if trickle.client.write_all(&[*byte]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(cut, "the whole header went in");
        assert!(trickle.seen.try_recv().is_err(), "the app saw a request");

        // A request whose header is in runs as long as it takes.
        let mut busy = served().await;
        busy.client
            .write_all(b"GET /busy HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let seen = busy.seen.recv().await;
        assert_eq!(seen, Some(Ok(("/busy".to_string(), Some(7)))));
        busy.until_closed().await;
    }

    #[tokio::test]
    async fn a_new_connection_waits_off_pingoras_task_within_the_idle_timeout() {
        let (tx, mut seen) = mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let app = Arc::new(FirstBytes::new(
            Recorder(tx),
            Duration::from_secs(1),
            metrics,
        ));
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let mut clients = Vec::new();
        for _ in 0..2 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
            let handed = tokio::time::timeout(
                Duration::from_millis(500),
                app.process_new(stream, &shutdown),
            )
            .await;
            assert!(
                matches!(handed, Ok(None)),
                "pingora's task kept the connection"
            );
            clients.push(client);
        }
        let (mut silent, mut talking) = (clients.remove(0), clients.remove(0));
        talking
            .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let first = seen.recv().await;
        assert!(
            matches!(&first, Some(Ok((path, _))) if path == "/first"),
            "{first:?}"
        );
        // pingora alone would wait for ever.
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut got));
        assert!(
            matches!(read.await, Ok(Ok(0))),
            "the silent connection stayed open"
        );
        assert!(seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_idle_connection_task_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let server = listener.accept().await.unwrap().0.into_std().unwrap();
        let stream = || -> Stream {
            Box::new(pingora::protocols::l4::stream::Stream::from(
                TcpStream::from_std(server.try_clone().unwrap()).unwrap(),
            ))
        };
        let timeouts = ClientTimeouts {
            idle: Duration::ZERO,
            read: Duration::ZERO,
            header: Duration::ZERO,
        };
        let recorder = || Recorder(mpsc::unbounded_channel().0);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        // What each idle plain connection's task holds, against an HTTP/1 session alone
        // (680 bytes) and pingora's accept task (~9 kB).
        let ServerSession::H1(h1) = ServerSession::new_http1(stream()) else {
            unreachable!("an HTTP/1 session");
        };
        let app = Arc::new(IdleFirst::new(recorder(), timeouts));
        let task = app.serve_connection(Between::of(h1), shutdown.clone());
        let size = std::mem::size_of_val(&task);
        assert!(size < 1024, "IdleFirst: {size} bytes");
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let app = Arc::new(FirstBytes::new(recorder(), Duration::ZERO, metrics));
        let task = app.serve_connection(PlainConn::take(stream()).unwrap(), shutdown);
        let size = std::mem::size_of_val(&task);
        assert!(size < 1024, "FirstBytes: {size} bytes");
    }

    #[tokio::test]
    async fn stopping_ends_the_wait() {
        // An idle timeout longer than `until_closed` waits.
        let mut s = served_idle(Duration::from_secs(120)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.app.http_cleanup().await;
        s.until_closed().await;
        assert!(s.seen.try_recv().is_err());
    }
}
