//! Real peers inside namespaces: TCP and UDP echo servers, and probes that say whether a
//! connection or a datagram got through (optionally from a chosen source address).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::Netns;

/// How long a probe waits: a dropped packet is only ever seen as silence. Allowed traffic
/// on a veth answers in well under a millisecond; this bounds the wait for a drop.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1200);

/// TCP and UDP echo servers on `[::]` (IPv4 too) in one namespace, until dropped.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServers {
    /// Listens on every TCP and UDP port given, on all addresses.
    pub fn start(ns: &Netns, tcp: &[u16], udp: &[u16]) -> EchoServers {
        EchoServers::start_on(ns, IpAddr::from([0u16; 8]), tcp, udp)
    }

    /// Listens on one address. A UDP server on a host with several addresses should: a
    /// wildcard socket replies from whatever address routing picks, and a connected
    /// client drops replies from an address it did not send to.
    pub fn start_on(ns: &Netns, addr: IpAddr, tcp: &[u16], udp: &[u16]) -> EchoServers {
        let (listeners, sockets) = ns.enter(|| {
            let listeners: Vec<TcpListener> = tcp
                .iter()
                .map(|p| {
                    TcpListener::bind((addr, *p)).unwrap_or_else(|e| panic!("tcp {addr} {p}: {e}"))
                })
                .collect();
            let sockets: Vec<UdpSocket> = udp
                .iter()
                .map(|p| {
                    UdpSocket::bind((addr, *p)).unwrap_or_else(|e| panic!("udp {addr} {p}: {e}"))
                })
                .collect();
            (listeners, sockets)
        });
        for l in &listeners {
            l.set_nonblocking(true).expect("nonblocking");
        }
        for s in &sockets {
            s.set_nonblocking(true).expect("nonblocking");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                for l in &listeners {
                    if let Ok((conn, _)) = l.accept() {
                        std::thread::spawn(move || echo(conn));
                    }
                }
                for s in &sockets {
                    while let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        EchoServers {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 4096];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn socket_for(
    to: &SocketAddr,
    kind: Type,
    protocol: Protocol,
    from: Option<IpAddr>,
) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(*to), kind, Some(protocol))?;
    if let Some(from) = from {
        // Sending from an address the host does not hold needs IP_FREEBIND; spoof tests
        // add the address to the interface instead, so a plain bind works.
        socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
    }
    Ok(socket)
}

/// A TCP connection from namespace `ns` (from `from` if given) to `to`, if it is let through.
pub fn tcp_open(ns: &Netns, from: Option<IpAddr>, to: SocketAddr) -> Option<TcpStream> {
    let socket = ns
        .enter(|| socket_for(&to, Type::STREAM, Protocol::TCP, from))
        .ok()?;
    socket
        .connect_timeout(&SockAddr::from(to), PROBE_TIMEOUT)
        .ok()?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    Some(stream)
}

/// Does a TCP connection get through, and does the echo come back?
pub fn tcp_passes(ns: &Netns, from: Option<IpAddr>, to: SocketAddr) -> bool {
    tcp_open(ns, from, to).is_some_and(|mut s| echo_round_trip(&mut s))
}

/// Sends a line on an open connection and reads it back.
pub fn echo_round_trip(stream: &mut TcpStream) -> bool {
    let msg = b"vmedge-probe\n";
    let mut back = [0u8; 13];
    stream.write_all(msg).is_ok() && stream.read_exact(&mut back).is_ok() && back == *msg
}

/// Does a UDP datagram get through, and does the echo come back?
pub fn udp_passes(ns: &Netns, from: Option<IpAddr>, to: SocketAddr) -> bool {
    let Ok(socket) = ns.enter(|| socket_for(&to, Type::DGRAM, Protocol::UDP, from)) else {
        return false;
    };
    let socket: UdpSocket = socket.into();
    if socket.connect(to).is_err() || socket.set_read_timeout(Some(PROBE_TIMEOUT)).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match socket.send(b"vmedge-probe") {
        Ok(_) => matches!(socket.recv(&mut buf), Ok(12)),
        Err(e) => {
            assert!(e.kind() != ErrorKind::InvalidInput, "{e}");
            false
        }
    }
}

/// NSD, a real authoritative server from Debian, serving one zone on `127.0.0.1:port`
/// inside a namespace (the DNS gate's upstream in tests), until dropped.
pub struct Nsd {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    ns: String,
}

impl Nsd {
    /// Starts NSD in `ns` with `zone_text` as zone `origin`, and waits until it answers.
    pub fn start(ns: &Netns, origin: &str, zone_text: &str, port: u16) -> Nsd {
        let dir = std::env::temp_dir().join(format!("vmedge-nsd-{}-{port}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("nsd dir");
        std::fs::write(dir.join("zone"), zone_text).expect("zone file");
        let d = dir.display();
        let conf = format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  username: \"\"\n  chroot: \"\"\n  \
             zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  \
             xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  \
             logfile: \"{d}/nsd.log\"\n  server-count: 1\n  do-ip6: no\n\
             remote-control:\n  control-enable: yes\n  control-interface: \"{d}/nsd.ctl\"\n\
             zone:\n  name: {origin}\n  zonefile: zone\n"
        );
        std::fs::write(dir.join("nsd.conf"), conf).expect("nsd.conf");
        let child = ns
            .command("nsd")
            .args(["-d", "-c"])
            .arg(dir.join("nsd.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nsd (apt install nsd)");
        let nsd = Nsd {
            child: Some(child),
            dir,
            ns: ns.name().to_string(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while nsd.control("status").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "nsd did not start: {}",
                std::fs::read_to_string(nsd.dir.join("nsd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nsd
    }

    fn control(&self, command: &str) -> Option<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "nsd-control", "-c"])
            .arg(self.dir.join("nsd.conf"))
            .arg(command)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Queries NSD has received since it started.
    pub fn queries(&self) -> u64 {
        self.stat("num.queries")
    }

    /// One of NSD's counters (`nsd-control stats_noreset`), e.g. `num.tcp`.
    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.control("stats_noreset").unwrap_or_default();
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops NSD (upstream down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: nsd stops its server and xfrd children too (SIGKILL would orphan them).
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
