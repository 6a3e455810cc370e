//! Keep-alive connections to VM services for the edge's own HTTP/1.1 path ([`crate::direct`]).
//!
//! An idle connection is kept without a task watching it (pingora's pool spawns one per
//! connection): whether the VM closed it, or sent something it should not have, is read
//! from the socket's readiness when the connection is taken, which costs no syscall when
//! nothing happened. Connections idle longer than the idle timeout are dropped when taken
//! or swept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// How long a connection to a VM is kept unused, in this pool and in pingora's.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per VM service address: enough for the concurrency one
/// service sees from one edge, as nginx's `keepalive` directive bounds it.
const PER_TARGET: usize = 128;

/// Idle upstream connections by VM service address.
#[derive(Debug)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    tcp: TcpStream,
    since: Instant,
}

impl Idle {
    /// Still usable: not past the idle timeout, and nothing arrived on it since the last
    /// response was read to its end (an end of file, a reset, or bytes no request asked
    /// for all make it readable).
    fn usable(&self, idle_timeout: Duration) -> bool {
        if self.since.elapsed() >= idle_timeout {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.tcp.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        // Readiness can be stale (the last read took all there was, exactly filling its
        // buffer): a read says for sure, and clears it when there is nothing.
        let mut byte = [0u8; 1];
        matches!(self.tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl UpstreamPool {
    /// A pool whose connections are dropped after `idle_timeout` unused.
    pub fn new(idle_timeout: Duration) -> UpstreamPool {
        UpstreamPool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `target` that is still usable.
    pub fn take(&self, target: SocketAddr) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&target)?;
        while let Some(conn) = list.pop() {
            if conn.usable(self.idle_timeout) {
                return Some(conn.tcp);
            }
        }
        None
    }

    /// Keeps `tcp`, whose last response was read to its end, for the next request to
    /// `target` (or closes it when that target has enough idle connections).
    pub fn put(&self, target: SocketAddr, tcp: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(target).or_default();
        if list.len() < PER_TARGET {
            list.push(Idle {
                tcp,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections that are no longer usable, and forgets targets with none.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|conn| conn.usable(self.idle_timeout));
            !list.is_empty()
        });
    }

    /// Idle connections held.
    #[cfg(test)]
    fn len(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server, addr)
    }

    #[tokio::test]
    async fn gives_back_a_quiet_connection_and_drops_a_closed_one() {
        let pool = UpstreamPool::new(Duration::from_secs(60));
        let (mut client, mut server, addr) = pair().await;
        // A response read to its end, as the edge reads one.
        server.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 64];
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"answer");
        pool.put(addr, client);
        let mut client = pool.take(addr).expect("a quiet connection is usable");
        assert!(pool.take(addr).is_none(), "taken twice");

        // Read to its end by a read that filled its buffer: readiness is left set.
        server.write_all(b"full").await.unwrap();
        let mut exact = [0u8; 4];
        client.read_exact(&mut exact).await.unwrap();
        pool.put(addr, client);
        let client = pool
            .take(addr)
            .expect("a quiet connection with stale readiness");

        // Bytes nobody asked for: not handed out.
        server.write_all(b"unasked").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.put(addr, client);
        assert!(
            pool.take(addr).is_none(),
            "a connection with stray bytes was handed out"
        );
        let (client, server, addr) = pair().await;

        // The VM closes it while it is idle: not handed out again.
        pool.put(addr, client);
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            pool.take(addr).is_none(),
            "a closed connection was handed out"
        );
    }

    #[tokio::test]
    async fn drops_connections_past_the_idle_timeout_and_sweeps() {
        let pool = UpstreamPool::new(Duration::from_millis(30));
        let (client, _server, addr) = pair().await;
        pool.put(addr, client);
        assert_eq!(pool.len(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        pool.sweep();
        assert_eq!(pool.len(), 0, "an expired connection outlived the sweep");

        let (client, _server2, addr) = pair().await;
        pool.put(addr, client);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(pool.take(addr).is_none());
    }
}
