//! The gate's sockets: UDP and TCP on each listen address, a bounded number of queries
//! in flight (a datagram over the bound is dropped and counted, never queued without
//! end), TCP connections with an idle timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::gate::{Gate, Transport};
use crate::metrics::Metrics;

/// Limits of the listeners.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Queries handled at once, over all listeners.
    pub max_in_flight: usize,
    /// TCP connections open at once.
    pub max_tcp_connections: usize,
    /// A TCP connection with no query for this long is closed.
    pub tcp_idle: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 4096,
            max_tcp_connections: 512,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Bound sockets, not yet serving (bind where you are: a test binds inside a namespace).
#[derive(Debug)]
pub struct Listeners {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Binds UDP and TCP on every address (an IPv6 address is IPv6 only).
    pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Listeners> {
        let mut listeners = Listeners {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for addr in addrs {
            let with = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{addr}: {e}"));
            let domain = Domain::for_address(*addr);
            let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(with)?;
            if addr.is_ipv6() {
                udp.set_only_v6(true).map_err(with)?;
            }
            udp.set_nonblocking(true).map_err(with)?;
            let _ = udp.set_recv_buffer_size(4 << 20);
            udp.bind(&(*addr).into()).map_err(with)?;
            let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(with)?;
            if addr.is_ipv6() {
                tcp.set_only_v6(true).map_err(with)?;
            }
            tcp.set_reuse_address(true).map_err(with)?;
            tcp.set_nonblocking(true).map_err(with)?;
            // The UDP socket's port: an address given with port 0 gets the same port on both.
            let bound = udp.local_addr().map_err(with)?;
            tcp.bind(&bound).map_err(with)?;
            tcp.listen(1024).map_err(with)?;
            listeners.udp.push(udp.into());
            listeners.tcp.push(tcp.into());
        }
        Ok(listeners)
    }

    /// The UDP addresses bound (TCP has the same).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// Serves until `shutdown` completes; queries in flight then finish on their own.
pub async fn serve(
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    listeners: Listeners,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let connections = Arc::new(Semaphore::new(config.max_tcp_connections));
    let mut tasks = Vec::new();
    for socket in listeners.udp {
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        tasks.push(tokio::spawn(udp_loop(
            gate.clone(),
            metrics.clone(),
            socket,
            in_flight.clone(),
            stopped.clone(),
        )));
    }
    for listener in listeners.tcp {
        let listener = TcpListener::from_std(listener)?;
        tasks.push(tokio::spawn(tcp_loop(
            gate.clone(),
            listener,
            connections.clone(),
            config.tcp_idle,
            stopped.clone(),
        )));
    }
    shutdown.await;
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

async fn stopping(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

async fn udp_loop(
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    socket: Arc<UdpSocket>,
    in_flight: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 4096];
    let stop = stopping(stopped);
    tokio::pin!(stop);
    loop {
        let (n, src) = tokio::select! {
            () = &mut stop => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!("udp receive: {e}");
                    continue;
                }
            },
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            metrics.dropped.inc();
            continue;
        };
        let query = buf[..n].to_vec();
        let (gate, socket, metrics) = (gate.clone(), socket.clone(), metrics.clone());
        tokio::spawn(async move {
            metrics.in_flight.inc();
            if let Some(answer) = gate.handle(src.ip(), &query, Transport::Udp).await {
                let _ = socket.send_to(&answer, src).await;
            }
            metrics.in_flight.dec();
            drop(permit);
        });
    }
}

async fn tcp_loop(
    gate: Arc<Gate>,
    listener: TcpListener,
    connections: Arc<Semaphore>,
    idle: Duration,
    stopped: watch::Receiver<bool>,
) {
    let stop = stopping(stopped.clone());
    tokio::pin!(stop);
    loop {
        let (stream, src) = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!("tcp accept: {e}");
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // dropping the stream closes it
        };
        let gate = gate.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let _ = tcp_connection(&gate, stream, src, idle, stopped).await;
            drop(permit);
        });
    }
}

/// Queries in order on one connection, each answered before the next is read.
async fn tcp_connection(
    gate: &Gate,
    mut stream: TcpStream,
    src: SocketAddr,
    idle: Duration,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        if *stopped.borrow() {
            return Ok(());
        }
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(idle, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(answer) = gate.handle(src.ip(), &query, Transport::Tcp).await else {
            continue;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        stream.write_all(&framed).await?;
    }
}
