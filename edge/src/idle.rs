//! Idle client connections: bounded in time, and held at the cost of the connection alone.
//!
//! pingora (0.9) waits for a new plain connection's first 24 bytes (to tell h2c from
//! HTTP/1) with no time limit, keeps an HTTP/1.1 connection alive with no timeout after its
//! first request, and then reads the next request's header with no timeout either. It
//! also waits for the next request inside the future that then proxies it, as large as its
//! largest state (~14 kB for the edge) plus a 4 kB header buffer: an idle keep-alive
//! connection cost ~38 kB.
//!
//! - [`FirstBytes`] bounds the wait for a new connection's first bytes by the idle timeout.
//! - [`IdleFirst`] waits for the first byte of each next request with nothing but the
//!   connection, under the idle timeout, then hands the session to the proxy with each read
//!   of the request bounded by the read timeout and the whole header by the header timeout
//!   (a client trickling a header in, a byte at a time, is cut off, as nginx's
//!   `client_header_timeout` does); the request machinery is allocated only while a
//!   request is under way (nginx, likewise, frees its buffers between requests). Streams
//!   that cannot be peeked at (TLS) wait in the proxy, under the idle timeout; h2 sessions
//!   go straight to the proxy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v1::server::HttpSession as Http1Session;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::sync::{oneshot, Notify};

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

/// The length of the HTTP/2 connection preface pingora looks for on a plain connection.
const H2C_PREFACE_LEN: usize = 24;

/// An app whose new plain connections reach `A` only once their first bytes are there,
/// within the idle timeout.
pub struct FirstBytes<A> {
    app: Arc<A>,
    idle: Duration,
}

impl<A> FirstBytes<A> {
    /// `app` behind a bounded wait for each new connection's first bytes.
    pub fn new(app: A, idle: Duration) -> FirstBytes<A> {
        FirstBytes {
            app: Arc::new(app),
            idle,
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
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if stream.get_ssl_digest().is_none() {
            // What pingora then peeks at again (the bytes stay unread).
            let mut preface = [0u8; H2C_PREFACE_LEN];
            let mut stopping = shutdown.clone();
            tokio::select! {
                peeked = tokio::time::timeout(self.idle, stream.try_peek(&mut preface)) => {
                    peeked.ok()?.ok()?;
                }
                _ = stopping.wait_for(|stop| *stop) => return None,
            }
        }
        self.app.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// An HTTP app whose HTTP/1 sessions reach `A` only once a request has begun to arrive.
pub struct IdleFirst<A> {
    app: Arc<A>,
    timeouts: ClientTimeouts,
    stopping: AtomicBool,
    stop: Notify,
}

impl<A> IdleFirst<A> {
    /// `app` behind an idle wait.
    pub fn new(app: A, timeouts: ClientTimeouts) -> IdleFirst<A> {
        IdleFirst {
            app: Arc::new(app),
            timeouts,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }

    /// The session once its next request has begun to arrive, and whether that was seen
    /// (a TLS stream cannot be peeked at); `None` when the client closed, stayed silent
    /// past the idle timeout, or the server is stopping.
    ///
    /// pingora keeps an HTTP/1.1 connection alive with no timeout at all after its first
    /// request, and then reads the next request's header with none either; here the wait
    /// is bounded by the idle timeout and each read of the request by the read timeout.
    async fn next_request(&self, h1: Http1Session) -> Option<(ServerSession, bool)> {
        if h1.pipelining_enabled() {
            // The previous request may have left the next one in the session's buffer.
            return Some((ServerSession::H1(h1), true));
        }
        // What a new session would not know (pingora's own settings carried across reuse;
        // the connection context is the edge's, set per request).
        let reuses = h1.get_keepalive_reuses_remaining();
        let mut stream = h1.into_inner();
        let peeked = self.first_byte(&mut stream).await?;
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

    /// Waits until `stream` has a byte to read, left unread (`Some(false)`: a stream that
    /// cannot be peeked at, not waited for); `None` when closed, timed out or stopping.
    async fn first_byte(&self, stream: &mut Stream) -> Option<bool> {
        let stop = self.stop.notified();
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        let mut byte = [0u8; 1];
        let peek = tokio::time::timeout(self.timeouts.idle, stream.try_peek(&mut byte));
        tokio::select! {
            biased;
            peeked = peek => peeked.ok()?.ok(),
            _ = stop => None,
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
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let ServerSession::H1(h1) = session else {
            return self.app.process_new_http(session, shutdown).await;
        };
        let (mut session, seen) = self.next_request(h1).await?;
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

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
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

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    /// What the app behind saw of a session: the request's path and the reuses left, or
    /// the error reading it.
    type Seen = Result<(String, Option<u32>), String>;

    /// An app that reads each session's request, says so as the edge's proxy does, takes
    /// a while over a path starting `/busy` (longer than the header timeout), and reports
    /// what it saw.
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
            let _ = self.0.send(Ok((path, reuses)));
            None
        }
    }

    /// A connection being served by an [`IdleFirst`] (1 s idle and read timeouts, a 2 s
    /// header timeout) on a task; its session said 7 reuses were left.
    struct Served {
        app: Arc<IdleFirst<Recorder>>,
        /// What the app saw.
        seen: mpsc::UnboundedReceiver<Seen>,
        /// The client's end.
        client: TcpStream,
        /// Ends with whether the session ended without a reusable stream.
        serving: tokio::task::JoinHandle<bool>,
    }

    async fn served() -> Served {
        let (tx, seen) = mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let timeouts = ClientTimeouts {
            idle: Duration::from_secs(1),
            read: Duration::from_secs(1),
            header: Duration::from_secs(2),
        };
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let mut session = ServerSession::new_http1(stream);
        // pingora's own settings after an HTTP/1.1 request: keep-alive with no timeout.
        session.set_keepalive(Some(0));
        session.set_keepalive_reuses_remaining(Some(7));
        let app = Arc::new(IdleFirst::new(Recorder(tx), timeouts));
        let serving = {
            let app = app.clone();
            tokio::spawn(async move {
                let (_tx, shutdown) = tokio::sync::watch::channel(false);
                app.process_new_http(session, &shutdown).await.is_none()
            })
        };
        Served {
            app,
            seen,
            client,
            serving,
        }
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
        assert!(s.serving.await.unwrap());
    }

    #[tokio::test]
    async fn a_closed_or_silent_connection_never_reaches_the_app() {
        let mut closed = served().await;
        drop(closed.client);
        assert!(closed.serving.await.unwrap());
        assert!(closed.seen.try_recv().is_err());

        // pingora alone would wait for ever.
        let started = Instant::now();
        let mut silent = served().await;
        assert!(silent.serving.await.unwrap());
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
        assert!(s.serving.await.unwrap());
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
        assert!(trickle.serving.await.unwrap());
        assert!(trickle.seen.try_recv().is_err(), "the app saw a request");

        // A request whose header is in runs as long as it takes.
        let mut busy = served().await;
        busy.client
            .write_all(b"GET /busy HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(busy.serving.await.unwrap());
        let seen = busy.seen.recv().await;
        assert_eq!(seen, Some(Ok(("/busy".to_string(), Some(7)))));
    }

    #[tokio::test]
    async fn stopping_ends_the_wait() {
        let mut s = served().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.app.http_cleanup().await;
        assert!(s.serving.await.unwrap());
        assert!(s.seen.try_recv().is_err());
    }
}
