//! Peers for the edge: the Python backends and clients of `tests/peers/edge_peers.py`
//! (HTTP/1.1, WebSocket, gRPC), a `vmedge edge` process inside a namespace, and curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::Netns;

/// The peers script.
pub fn peers_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/edge_peers.py")
}

/// A child process stopped (and reaped) on drop: SIGTERM, then SIGKILL after 5 s (nginx's
/// workers outlive a killed master).
#[derive(Debug)]
pub struct Process {
    child: Child,
    what: String,
}

impl Process {
    /// Wraps a started child.
    pub fn new(child: Child, what: &str) -> Process {
        Process {
            child,
            what: what.to_string(),
        }
    }

    /// Sends a signal (`"TERM"`, `"QUIT"`, ...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to end, up to `limit`; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Panics (naming the process) if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited: {status}", self.what);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal("TERM");
        if !self.wait_exit(Duration::from_secs(5)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP at `addr` inside `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok());
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `edge_peers.py KIND PORT` in `ns` and waits until it listens on `[::1]:PORT`.
pub fn backend(ns: &Netns, kind: &str, port: u16) -> Process {
    let child = ns
        .command("python3")
        .arg(peers_script())
        .args([kind, &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {kind} backend: {e}"));
    let process = Process::new(child, &format!("{kind} backend"));
    wait_listening(
        ns,
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        kind,
    );
    process
}

/// Starts `BIN edge --config CONFIG` inside `ns` and waits until `admin` answers.
pub fn edge(bin: &str, ns: &Netns, config: &Path, admin: SocketAddr, extra: &[&str]) -> Process {
    let child = ns
        .command(bin)
        .args(["--log-level", "warn", "edge", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let mut process = Process::new(child, "vmedge edge");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns.enter(|| TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_ok()) {
        process.assert_running();
        assert!(
            Instant::now() < deadline,
            "the edge's admin {admin} never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

/// Runs curl in `ns`: `-sS` plus `args`.
pub fn curl(ns: &Netns, args: &[&str]) -> Output {
    ns.command("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"))
}

/// A plain HTTP/1.1 GET of `path` from `addr` (Connection: close); the whole response.
pub fn http_get(ns: &Netns, addr: SocketAddr, host: &str, path: &str) -> String {
    raw_http(
        ns,
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Sends `request` as is and reads the response until the server closes (or 10 s pass).
pub fn raw_http(ns: &Netns, addr: SocketAddr, request: &[u8]) -> String {
    let mut conn = ns
        .enter(|| TcpStream::connect(addr))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    conn.write_all(request)
        .unwrap_or_else(|e| panic!("write {addr}: {e}"));
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
