//! Plain client connections the edge holds itself, once pingora has accepted them.
//!
//! pingora's stream keeps a read buffer (the edge's `client_read_buffer`) and a 1.5 kB
//! write buffer for a connection's whole life. A [`PlainConn`] is the same socket with
//! buffers only while they hold something: a wait for the next request reads what
//! arrived ahead (one `recv` for a request's header, as with pingora's buffer; the
//! parser then reads from it, and it is freed once read), and writes are gathered until
//! the next flush (a response's header and body leave in one `send`). An idle keep-alive
//! connection then costs the socket, this struct and the task waiting on it; once parked
//! ([`crate::park`]), the socket and a [`ParkedConn`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::metrics::OpenConnection;

/// The most a wait for data reads ahead at once: a request's header, usually.
const READ_AHEAD: usize = 4096;

/// Writes gathered before a send: pingora's own write buffer size (one segment).
const GATHER: usize = 1460;

/// The HTTP/2 connection preface, which pingora peeks for on a plain connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a peek waits for the rest of an HTTP/2 preface that began to arrive.
const PREFACE_WAIT: Duration = Duration::from_secs(2);

/// How long a lingering close reads what the client still sends, at most, and how long it
/// waits for more (nginx's `lingering_time` and `lingering_timeout`).
const LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// A plain TCP client connection: see the module.
#[derive(Debug)]
pub struct PlainConn {
    tcp: TcpStream,
    /// Read from the socket by a wait for data, not yet by pingora (from `ahead_read`
    /// on); empty (no allocation) between requests.
    ahead: Vec<u8>,
    ahead_read: usize,
    /// Written since the last flush; empty (no allocation) between responses, but on
    /// an h2 connection (`h2`).
    gathered: Vec<u8>,
    /// The client began with the HTTP/2 preface. h2 writes its buffered frames at every
    /// flush, many times a second on a busy connection: the gather buffer is kept for
    /// them instead of allocated and freed at each flush (h2 keeps 16 kB of its own).
    h2: bool,
    /// The client's address, as pingora's accept had it (no `getpeername`). pingora's
    /// socket digest (~400 bytes) is made only when a request goes to pingora.
    peer: Option<std::net::SocketAddr>,
    established: SystemTime,
    /// Counted among the open connections while it lives.
    counted: Option<OpenConnection>,
}

impl PlainConn {
    /// The connection under a stream pingora accepted, which is dropped: `Err` gives the
    /// stream back when it is not a plain TCP stream or the socket cannot be taken.
    /// Only for a stream nothing has been read from yet (pingora's buffers are dropped
    /// with it).
    pub fn take(stream: Stream) -> Result<PlainConn, Stream> {
        let Some(l4) = stream.as_any().downcast_ref::<L4Stream>() else {
            return Err(stream);
        };
        let fd = l4.as_raw_fd();
        // SAFETY: `fd` is the socket of `l4`, which owns it and lives (in `stream`) until
        // after this borrow ends: the borrow is only used to duplicate the descriptor.
        #[allow(unsafe_code)]
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let Ok(owned) = borrowed.try_clone_to_owned() else {
            return Err(stream);
        };
        let std = std::net::TcpStream::from(owned);
        let Ok(tcp) = std
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(std))
        else {
            return Err(stream);
        };
        let established = stream
            .get_timing_digest()
            .first()
            .and_then(|t| t.as_ref().map(|t| t.established_ts))
            .unwrap_or_else(SystemTime::now);
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        drop(stream);
        Ok(PlainConn::with_nothing_buffered(
            tcp,
            peer,
            established,
            None,
        ))
    }

    /// The connection on `tcp`, nothing read ahead or gathered yet.
    fn with_nothing_buffered(
        tcp: TcpStream,
        peer: Option<std::net::SocketAddr>,
        established: SystemTime,
        counted: Option<OpenConnection>,
    ) -> PlainConn {
        PlainConn {
            tcp,
            ahead: Vec::new(),
            ahead_read: 0,
            gathered: Vec::new(),
            h2: false,
            peer,
            established,
            counted,
        }
    }

    /// The connection, counted in the open connections for as long as it lives.
    pub fn counted(mut self, open: OpenConnection) -> PlainConn {
        self.counted = Some(open);
        self
    }

    /// Waits until the client has sent something, read ahead; `Err` when it closed.
    pub async fn wait_for_data(&mut self) -> io::Result<()> {
        while self.ahead_read == self.ahead.len() {
            self.readable().await?;
            // Readiness can be stale (the last read took all there was without hearing
            // "would block"): then nothing is read, and the wait goes on.
            self.read_ahead()?;
        }
        Ok(())
    }

    /// Whether nothing read ahead waits to be taken and nothing gathered waits to be
    /// sent: the connection can be [parked](PlainConn::park).
    pub(crate) fn is_quiet(&self) -> bool {
        self.ahead_read == self.ahead.len() && self.gathered.is_empty()
    }

    /// The connection taken off tokio (its socket's registration freed), to wait in the
    /// edge's own epoll set ([`crate::park`]); only for a [quiet](PlainConn::is_quiet)
    /// one. `Err`: the socket could not be taken off, and is closed.
    pub(crate) fn park(self) -> io::Result<ParkedConn> {
        debug_assert!(self.is_quiet());
        Ok(ParkedConn {
            tcp: self.tcp.into_std()?,
            established: self.established,
            counted: self.counted,
        })
    }

    /// Ends the connection after an answer that left part of the request unread, as
    /// nginx's lingering close does. Closing a socket with bytes unread resets the
    /// connection, and a reset can discard the answer before the client has read it; so
    /// the answer's end is sent (`FIN`), and what the client still sends is read and
    /// dropped until it stops, is quiet for [`LINGER_QUIET`], or [`LINGER_TIME`] is up.
    pub(crate) async fn linger(&mut self) {
        if AsyncWriteExt::shutdown(self).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut sink = vec![0u8; READ_AHEAD];
        loop {
            let read = tokio::time::timeout(LINGER_QUIET, self.tcp.read(&mut sink));
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(Ok(n))) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Waits until the socket is readable. Through the socket's one reader slot (only this
    /// connection's task waits on it): a few bytes of future, where `readable()`'s waiter
    /// is ~350, held by every idle connection.
    async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.tcp.poll_read_ready(cx)).await
    }

    /// The socket's two halves, to read a request's body while its answer is written.
    /// What was read ahead and what was gathered must be taken and sent first (they are,
    /// once a request's header and the body's first bytes are taken, and before any of
    /// the answer is written): the halves bypass both.
    pub(crate) fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        debug_assert!(self.ahead_read == self.ahead.len() && self.gathered.is_empty());
        self.tcp.split()
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// What was read ahead and not yet taken: the start of a request, usually.
    pub(crate) fn ahead(&self) -> &[u8] {
        &self.ahead[self.ahead_read..]
    }

    /// Takes the first `n` bytes of what was read ahead (freed once all is taken).
    pub(crate) fn consume(&mut self, n: usize) {
        self.ahead_read = (self.ahead_read + n).min(self.ahead.len());
        if self.ahead_read == self.ahead.len() {
            self.ahead = Vec::new();
            self.ahead_read = 0;
        }
    }

    /// Waits until more than what was read ahead has arrived, and reads it ahead too;
    /// `Err` when the client closed.
    pub(crate) async fn read_more(&mut self) -> io::Result<()> {
        let had = self.ahead.len();
        while self.ahead.len() == had {
            self.readable().await?;
            self.read_ahead()?;
        }
        Ok(())
    }

    /// What is there to read now (perhaps nothing), added to what was read ahead; `Err`
    /// when the client closed.
    ///
    /// A read that takes less than it asked for has drained the socket, so the readiness
    /// tokio keeps is cleared (as its own reads do): the next wait then needs no `recv`
    /// to learn there is nothing (one syscall less per request, as in nginx). The clear
    /// is of the readiness seen before the read: data arriving after it raises it again.
    fn read_ahead(&mut self) -> io::Result<()> {
        let mut buf = [0u8; READ_AHEAD];
        let mut got = 0;
        let read = self.tcp.try_io(Interest::READABLE, || {
            got = self.tcp.try_read(&mut buf)?;
            if 0 < got && got < buf.len() {
                // Not an error: asks try_io to clear the readiness.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match read {
            Ok(()) if got == 0 => Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => {
                self.ahead.extend_from_slice(&buf[..got]);
                Ok(())
            }
        }
    }

    /// Sends what was gathered, then frees the buffer (but an h2 connection's).
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent = 0;
        while sent < self.gathered.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.gathered[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.gathered.drain(..sent);
                    return Poll::Pending;
                }
            }
        }
        if self.h2 {
            self.gathered.clear();
        } else {
            self.gathered = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// A quiet [`PlainConn`] off tokio: the socket and what a request needs to know of the
/// connection, no more (32 bytes). The client's address is not kept: a connection that
/// comes back asks its socket (`getpeername`), which saves 32 bytes on every one of
/// thousands that wait.
#[derive(Debug)]
pub(crate) struct ParkedConn {
    tcp: std::net::TcpStream,
    established: SystemTime,
    counted: Option<OpenConnection>,
}

impl ParkedConn {
    /// The connection back on tokio (inside a runtime); `Err`: it could not be registered,
    /// and is closed.
    pub(crate) fn resume(self) -> io::Result<PlainConn> {
        let peer = self.tcp.peer_addr().ok();
        Ok(PlainConn::with_nothing_buffered(
            TcpStream::from_std(self.tcp)?,
            peer,
            self.established,
            self.counted,
        ))
    }

    /// The socket, to register it.
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsyncRead for PlainConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ahead_read < this.ahead.len() {
            let ahead = this.ahead();
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(&ahead[..n]);
            this.consume(n);
            return Poll::Ready(Ok(()));
        }
        // tokio's own read clears the readiness when it took less than there was room for.
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.gathered.len() + buf.len() > GATHER {
            ready!(self.poll_send_gathered(cx))?;
        }
        if buf.len() >= GATHER {
            return Pin::new(&mut self.tcp).poll_write(cx, buf);
        }
        self.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_gathered(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_gathered(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[async_trait]
impl Peek for PlainConn {
    /// Waits for data (read ahead) and copies it into `buf`, leaving it to be read.
    /// Returns once `buf` is full, or once the bytes differ from the HTTP/2 preface (what
    /// pingora peeks 24 bytes for: anything else is told by its first bytes), or
    /// [`PREFACE_WAIT`] after a preface began. `Err` when the client closed.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.wait_for_data().await?;
        let deadline = tokio::time::Instant::now() + PREFACE_WAIT;
        loop {
            let ahead = &self.ahead[self.ahead_read..];
            let n = ahead.len().min(buf.len());
            buf[..n].copy_from_slice(&ahead[..n]);
            let preface_so_far = n < buf.len() && H2_PREFACE.starts_with(&buf[..n]);
            if !preface_so_far {
                self.h2 = n >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE);
                return Ok(true);
            }
            match tokio::time::timeout_at(deadline, self.tcp.readable()).await {
                Ok(readable) => readable?,
                Err(_) => return Ok(true),
            }
            self.read_ahead()?;
        }
    }
}

#[async_trait]
impl Shutdown for PlainConn {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!(error = %e, "shutting down a client connection");
        }
    }
}

impl UniqueID for PlainConn {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_fd().as_raw_fd()
    }
}

impl Ssl for PlainConn {}

impl GetTimingDigest for PlainConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            ..TimingDigest::default()
        })]
    }
}

impl GetProxyDigest for PlainConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for PlainConn {
    /// Made when asked, from this connection's own descriptor (the accepted one's number
    /// may be reused once it is closed): pingora asks once per request it serves.
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        let digest = SocketDigest::from_raw_fd(self.tcp.as_fd().as_raw_fd());
        if let Some(peer) = self.peer {
            let _ = digest.peer_addr.set(Some(peer.into()));
        }
        Some(Arc::new(digest))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connection taken over from a pingora stream, as the edge's first app takes it,
    /// and its client's end.
    pub(crate) async fn pair() -> (PlainConn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stream: Stream = Box::new(L4Stream::from(server));
        (PlainConn::take(stream).unwrap(), client)
    }

    #[tokio::test]
    async fn it_is_the_same_socket_with_the_peer_named() {
        let (mut conn, mut client) = pair().await;
        let peer = conn
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned());
        assert_eq!(
            peer.and_then(|p| p.as_inet().copied()),
            Some(client.local_addr().unwrap())
        );
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        conn.write_all(b"pong").await.unwrap();
        conn.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        // Closing it closes the connection (pingora's descriptor is long gone).
        drop(conn);
        assert_eq!(client.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_parked_connection_comes_back_with_its_peer_named() {
        let (conn, mut client) = pair().await;
        let back = conn.park().unwrap().resume().unwrap();
        let peer = back
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        assert_eq!(peer, Some(client.local_addr().unwrap()));
        // Still the connection: closing it closes the client's.
        drop(back);
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_lingering_close_delivers_the_whole_answer_to_a_client_still_sending() {
        let (mut conn, mut client) = pair().await;
        // A body the server never reads: closing with it unread would reset the
        // connection, and the answer's tail, still in the server's send queue, with it.
        client.write_all(&[b'x'; 16 * 1024]).await.unwrap();
        let answer = vec![b'a'; 8 << 20];
        let server = tokio::spawn(async move {
            conn.write_all(&answer).await.unwrap();
            conn.flush().await.unwrap();
            conn.linger().await;
        });
        // The client reads late, and keeps sending meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(&[b'y'; 16 * 1024]).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 8 << 20, "the answer was cut off");
        drop(client);
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("the linger outlived the client")
            .unwrap();
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_and_keep_their_order() {
        let (mut conn, mut client) = pair().await;
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        conn.write_all(b"body").await.unwrap();
        let mut got = [0u8; 64];
        // Nothing sent yet: on loopback a sent byte is in the peer's queue at once.
        assert!(
            matches!(client.try_read(&mut got), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        );
        conn.flush().await.unwrap();
        let mut want = b"HTTP/1.1 200 OK\r\n\r\nbody".to_vec();
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        assert_eq!(conn.gathered.capacity(), 0, "the buffer outlived the flush");

        // A large write after a small one: both, in order, the large one unbuffered.
        let large = vec![b'x'; 64 * 1024];
        conn.write_all(b"head").await.unwrap();
        let writer = tokio::spawn(async move {
            conn.write_all(&large).await.unwrap();
            conn.flush().await.unwrap();
            conn
        });
        want = b"head".to_vec();
        want.extend(std::iter::repeat_n(b'x', 64 * 1024));
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == want, "bytes out of order or lost");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_h2_connection_keeps_its_gather_buffer_between_flushes() {
        let (mut conn, mut client) = pair().await;
        client.write_all(H2_PREFACE).await.unwrap();
        let mut buf = [0u8; 24];
        assert!(conn.try_peek(&mut buf).await.unwrap());
        for frame in [&b"frames"[..], b"more frames"] {
            conn.write_all(frame).await.unwrap();
            conn.flush().await.unwrap();
            let mut got = vec![0u8; frame.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, frame);
            assert!(conn.gathered.is_empty(), "sent bytes were kept");
            assert!(conn.gathered.capacity() > 0, "the buffer was freed");
        }
    }

    #[tokio::test]
    async fn a_wait_reads_ahead_and_waits_again_after_a_request_was_read() {
        let (mut conn, mut client) = pair().await;
        client.write_all(b"first").await.unwrap();
        conn.wait_for_data().await.unwrap();
        // More after what was read ahead: both, in order.
        client.write_all(b" second").await.unwrap();
        let mut got = [0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first second");
        assert_eq!(
            conn.ahead.capacity(),
            0,
            "the read-ahead outlived its bytes"
        );

        // All was read without a "would block": the next wait must still wait for data.
        let mut waiting = tokio::spawn(async move {
            conn.wait_for_data().await.unwrap();
            conn
        });
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "the wait ended with nothing sent");
        client.write_all(b"third").await.unwrap();
        let mut conn = waiting.await.unwrap();
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"third");
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_and_tells_http1_at_once() {
        let (mut conn, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // pingora peeks 24 bytes for the HTTP/2 preface; 16 that are not one are enough.
        let mut buf = [0u8; 24];
        assert!(conn.try_peek(&mut buf).await.unwrap());
        assert!(buf.starts_with(b"GET / HTTP/1.1\r\n"));
        let mut got = [0u8; 16];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");

        // An HTTP/2 preface in two parts is waited for.
        let (mut conn, mut client) = pair().await;
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(&H2_PREFACE[10..]).await.unwrap();
            client
        });
        let mut buf = [0u8; 24];
        assert!(conn.try_peek(&mut buf).await.unwrap());
        assert_eq!(&buf[..], H2_PREFACE);
        let mut client = rest.await.unwrap();

        // A closed connection is an error, not a peek.
        client.shutdown().await.unwrap();
        let mut all = vec![0u8; 24];
        conn.read_exact(&mut all).await.unwrap();
        assert!(conn.try_peek(&mut buf).await.is_err());
    }
}
