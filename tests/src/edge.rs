//! Peers for the edge: the Python backends and clients of `tests/peers/edge_peers.py`
//! (HTTP/1.1, WebSocket, gRPC), a `vmedge edge` process inside a namespace, and curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
            .stderr(Stdio::null()) // "no such process" when it is gone already
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
    let mut args = vec!["--log-level", "warn", "edge", "--config", path_arg(config)];
    args.extend_from_slice(extra);
    start_vmedge(bin, ns, &args, admin, "vmedge edge")
}

pub(crate) fn path_arg(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

/// Starts `BIN ARGS` inside `ns` and waits until something accepts TCP at `ready`
/// (panicking, naming `what`, if it exits or takes over 20 s).
pub fn start_vmedge(
    bin: &str,
    ns: &Netns,
    args: &[&str],
    ready: SocketAddr,
    what: &str,
) -> Process {
    let child = ns
        .command(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let mut process = Process::new(child, what);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns.enter(|| TcpStream::connect_timeout(&ready, Duration::from_millis(200)).is_ok()) {
        process.assert_running();
        assert!(
            Instant::now() < deadline,
            "{what} never listened on {ready}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

/// Writes `dir/state.json` atomically (the registry must never read half a file).
pub fn write_state(dir: &Path, text: &str) {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    std::fs::rename(&tmp, dir.join("state.json")).unwrap_or_else(|e| panic!("state.json: {e}"));
}

/// A control plane's wake hook on `addr` inside `ns`: each call must be `POST /wake` for
/// `vm_id`; it is counted, answered 202, and `settle` later `woken` is written as the
/// state in `dir`, as the real control plane would once the VM is resumed.
pub fn wake_hook(
    ns: &Netns,
    addr: &str,
    vm_id: String,
    dir: PathBuf,
    woken: String,
    settle: Duration,
) -> Arc<AtomicUsize> {
    let listener = ns
        .enter(|| std::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("wake hook {addr}: {e}"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            // Header and body may come in separate segments: read up to the JSON's end.
            let text = read_until(&mut conn, b"}");
            assert!(text.starts_with("POST /wake HTTP/1.1"), "{text}");
            assert!(
                text.contains(&format!(r#"{{"vm_id":"{vm_id}"}}"#)),
                "{text}"
            );
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
            std::thread::sleep(settle);
            write_state(&dir, &woken);
        }
    });
    calls
}

/// The number of requests a wrk report counts (`N requests in 4.00s, ...`).
pub fn wrk_requests(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in the wrk report:\n{report}"))
}

/// What `conn` gives up to and including `end` (a message whose header and body may
/// come in separate segments); what it gave when it closed or failed first.
pub fn read_until(conn: &mut TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end) {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
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
