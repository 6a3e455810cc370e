//! `vmedge edge` as an operator runs it, inside a lab's worker namespace, in front of real
//! backends in VM namespaces on IPv6: curl (HTTP/1.1, HTTPS h2, h2c), a WebSocket client,
//! gRPC (Python grpcio) and wrk.
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmedge_tests::edge::{
    backend, curl, edge, http_get, peers_script, raw_http, read_until, wake_hook, wrk_requests,
    Process,
};
use vmedge_tests::gate::metric;
use vmedge_tests::{eventually, Lab, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_vmedge");
const DOMAIN: &str = "edge.test";
const HTTP: &str = "127.0.0.1:8080";
const HTTPS: &str = "127.0.0.1:8443";
const ADMIN: &str = "127.0.0.1:9180";
const HOOK: &str = "127.0.0.1:9000";

fn vm_id(i: usize) -> String {
    format!("6f1c2d3e-0000-4000-8000-0000000000{i:02x}")
}

/// `<service>--<vmid hex>.proxy.edge.test`.
fn host(service: &str, i: usize) -> String {
    format!("{service}--{}.proxy.{DOMAIN}", vm_id(i).replace('-', ""))
}

fn vm(i: usize, ipv6: &str, status: &str) -> Value {
    json!({"id": vm_id(i), "org_id": "o", "worker": "w", "public_ipv6": ipv6, "status": status,
           "services": [{"name": "web", "port": 8000}, {"name": "ws", "port": 9001},
                        {"name": "grpc", "port": 50051, "h2c": true}, {"name": "dead", "port": 8999},
                        {"name": "early", "port": 50052, "h2c": true}]})
}

/// VM 0 (running) and VM 1 (status `vm1`) are lab VMs; 10..13 have no namespace: stopped,
/// deleting, error, provisioning; 20 has an address outside vm_prefixes.
fn state(lab: &Lab, vm1: &str) -> Value {
    // Addresses on VM 1's link that nothing answers: never dialled in these states.
    let spare = |i: u16| {
        let [a, b, c, d, ..] = lab.vms[1].ipv6.segments();
        std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0x10 + i).to_string()
    };
    json!({"vms": [
        vm(0, &lab.vms[0].ipv6.to_string(), "running"),
        vm(1, &lab.vms[1].ipv6.to_string(), vm1),
        vm(0x10, &spare(0), "stopped"),
        vm(0x11, &spare(1), "deleting"),
        vm(0x12, &spare(2), "error"),
        vm(0x13, &spare(3), "provisioning"),
        vm(0x20, &lab.unused_ipv6().to_string(), "running"),
    ]})
}

/// A lab, its backends and a running edge.
struct EdgeLab {
    lab: Lab,
    dir: tempfile::TempDir,
    edge: Process,
    _backends: Vec<Process>,
}

impl EdgeLab {
    fn start(vm1: &str) -> EdgeLab {
        EdgeLab::start_with(vm1, "")
    }

    /// With more `[edge]` config lines.
    fn start_with(vm1: &str, edge_config: &str) -> EdgeLab {
        let lab = Lab::new(2);
        let mut backends = Vec::new();
        for v in &lab.vms {
            backends.push(backend(&v.ns, "http", 8000));
        }
        backends.push(backend(&lab.vms[0].ns, "ws", 9001));
        backends.push(backend(&lab.vms[0].ns, "grpc", 50051));
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &state(&lab, vm1));
        let n = lab.id();
        std::fs::write(
            dir.path().join("vmedge.toml"),
            format!(
                "domain = \"{DOMAIN}\"\nregistry = \"file:state.json\"\nstate_dir = \"state\"\n\
                 vm_prefixes = [\"fd5e:ed00:{n:x}:1::/64\", \"fd5e:ed00:{n:x}:2::/64\"]\n\
                 wake_url = \"http://{HOOK}/wake\"\n\
                 [edge]\nhttp = [\"{HTTP}\", \"[::1]:8080\"]\nhttps = [\"{HTTPS}\"]\nadmin = \"{ADMIN}\"\n\
                 wake_timeout = \"3s\"\nupstream_timeout = \"2s\"\ngrace_period = \"1s\"\n{edge_config}"
            ),
        )
        .unwrap();
        let edge = start_edge(&lab.worker, dir.path(), &[]);
        EdgeLab {
            lab,
            dir,
            edge,
            _backends: backends,
        }
    }

    fn ns(&self) -> &Netns {
        &self.lab.worker
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = curl(self.ns(), args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `curl -H Host: HOST http://HTTP/PATH`, with the status code appended as ` CODE`.
    fn get(&self, host: &str, path: &str, extra: &[&str]) -> String {
        let url = format!("http://{HTTP}{path}");
        let h = format!("Host: {host}");
        let mut args = vec!["-H", &h, "-w", " %{http_code}", &url];
        args.extend_from_slice(extra);
        self.curl(&args)
    }

    /// `GET http://HTTP/PATH` with `Host: HOST`, the body saved to `file`; the header.
    fn download(&self, host: &str, path: &str, file: &Path) -> String {
        self.download_with(host, path, file, &[])
    }

    /// [`EdgeLab::download`] with more curl arguments.
    fn download_with(&self, host: &str, path: &str, file: &Path, extra: &[&str]) -> String {
        let (host, url) = (format!("Host: {host}"), format!("http://{HTTP}{path}"));
        let mut args = vec!["-D", "-", "-o", file.to_str().unwrap(), "-H", &host];
        args.extend_from_slice(extra);
        args.push(&url);
        self.curl(&args)
    }

    fn metrics(&self) -> String {
        http_get(self.ns(), ADMIN.parse().unwrap(), "admin", "/metrics")
    }

    /// A client of `tests/peers/edge_peers.py` (`args`: its command and arguments), run
    /// where the edge listens; what it saw, the JSON it printed.
    fn peer(&self, args: &[&str]) -> Value {
        let out = self
            .ns()
            .command("python3")
            .arg(peers_script())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{}: {e}: {}", args[0], String::from_utf8_lossy(&out.stdout))
        })
    }

    fn grpc(&self, authority: &str) -> Value {
        self.peer(&["grpc-client", HTTP, authority])
    }
}

fn start_edge(ns: &Netns, dir: &Path, extra: &[&str]) -> Process {
    edge(
        BIN,
        ns,
        &dir.join("vmedge.toml"),
        ADMIN.parse().unwrap(),
        extra,
    )
}

/// Writes the state file atomically (the registry must never read half a file).
fn write_state(dir: &Path, state: &Value) {
    vmedge_tests::edge::write_state(dir, &state.to_string());
}

fn sha256_of(ns: &Netns, path: &Path) -> String {
    let out = ns.sh(&["sha256sum", path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn proxies_http1_https_h2_h2c_websocket_sse_and_grpc() {
    let t = EdgeLab::start("running");
    let web = host("web", 0);

    // HTTP/1.1, and the headers the VM sees.
    let hello = t.get(&web, "/hello", &[]);
    assert_eq!(hello, "hello from 8000\n 200");
    let seen: Value = serde_json::from_str(
        t.get(
            &web.to_uppercase(),
            "/headers",
            &[
                "-H",
                "X-Request-Id: my-id-1",
                "-H",
                "X-Forwarded-For: 203.0.113.9",
                "-H",
                "Connection: keep-alive, X-Secret",
                "-H",
                "X-Secret: s",
            ],
        )
        .trim_end_matches(" 200"),
    )
    .unwrap();
    assert_eq!(seen["host"], web.to_uppercase(), "the public Host is kept");
    assert_eq!(seen["x-forwarded-host"], web.to_uppercase());
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "a client's XFF is not trusted"
    );
    assert_eq!(
        seen["x-request-id"], "my-id-1",
        "a client's request id is kept"
    );
    assert!(
        seen.get("x-secret").is_none(),
        "connection-nominated headers are stripped: {seen}"
    );

    // HTTPS: SNI and ALPN h2, verified against the self-signed certificate made at start.
    let cert = t.dir.path().join("state/edge-cert.pem");
    let resolve = format!("{web}:8443:127.0.0.1");
    let https = |extra: &[&str], path: &str| {
        let url = format!("https://{web}:8443{path}");
        let mut args = vec!["--cacert", cert.to_str().unwrap(), "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        t.curl(&args)
    };
    let tls = https(&["-w", " %{http_version}"], "/hello");
    assert_eq!(tls, "hello from 8000\n 2");
    let tls11 = https(&["--http1.1", "-w", " %{http_version}"], "/hello");
    assert_eq!(tls11, "hello from 8000\n 1.1");
    let https_seen = https(&[], "/headers");
    assert!(
        https_seen.contains(r#""x-forwarded-proto": "https""#),
        "{https_seen}"
    );

    // h2c prior knowledge on the plain port; IPv6 listener too.
    let h2c = t.get(
        &web,
        "/hello",
        &["--http2-prior-knowledge", "-w", " %{http_version}"],
    );
    assert_eq!(h2c, "hello from 8000\n 2");
    let v6 = t.curl(&["-H", &format!("Host: {web}"), "http://[::1]:8080/hello"]);
    assert_eq!(v6, "hello from 8000\n");

    // A large download and upload, streamed, checked end to end.
    let file = t.dir.path().join("down.bin");
    let headers = t.download(&web, "/download?n=50000000", &file);
    let want = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-sha256: "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 50_000_000);
    assert_eq!(sha256_of(t.ns(), &file), want, "download intact");
    let sent_hash = sha256_of(t.ns(), &file);
    for (framing, flag) in [("length", "--data-binary"), ("chunked", "--data-binary")] {
        let mut args = vec!["-H".to_string(), format!("Host: {web}")];
        if framing == "chunked" {
            args.extend(["-H".into(), "Transfer-Encoding: chunked".into()]);
        }
        args.extend([
            flag.to_string(),
            format!("@{}", file.display()),
            format!("http://{HTTP}/upload"),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply: Value = serde_json::from_str(&t.curl(&args)).unwrap();
        assert_eq!(reply["bytes"], 50_000_000, "{framing}");
        assert_eq!(
            reply["sha256"],
            sent_hash.as_str(),
            "{framing} upload intact"
        );
    }

    // SSE: the first event arrives while the backend still holds the stream open (it sends
    // the second only after /release), so nothing is buffered on the way.
    let mut sse = t.ns().enter(|| std::net::TcpStream::connect(HTTP)).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        sse,
        "GET /sse HTTP/1.1\r\nHost: {web}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: one") {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("data: two"));
    assert_eq!(t.get(&web, "/release", &[]), "released\n 200");
    while !String::from_utf8_lossy(&got).contains("data: two") {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before the second event");
        got.extend_from_slice(&buf[..n]);
    }
    drop(sse);

    // WebSocket echo: text, 4 MiB binary, a message in ten frames, ping.
    let ws = t.peer(&[
        "ws-client",
        &format!("ws://{}:8080/", host("ws", 0)),
        "127.0.0.1",
        "8080",
    ]);
    assert_eq!(
        ws,
        json!({"text": true, "large": true, "fragmented": true, "ping": true})
    );

    // gRPC over h2c to an h2c service: unary with trailers, the three streaming kinds,
    // a non-OK status with its trailers, a deadline and a cancel (the VM's call ended by
    // each), 3 MB each way. All these calls on the edge's own h2 path.
    let direct = || metric(&t.metrics(), "vmedge_edge_direct_requests_total").unwrap_or(0.0);
    let before = direct();
    let g = t.grpc(&host("grpc", 0));
    // Nine cases; the check for the VM's cancels may ask more than once.
    let taken = direct() - before;
    assert!(
        (9.0..=38.0).contains(&taken),
        "{taken} gRPC calls on the direct path"
    );
    assert_eq!(
        g["unary"],
        json!({"reply": "ping", "trailers": {"x-served-by": "backend"}})
    );
    assert_eq!(g["server_stream"], json!(["n0", "n1", "n2", "n3", "n4"]));
    assert_eq!(g["client_stream"], "a|b|c");
    assert_eq!(g["bidi"], json!(["X", "Y"]));
    assert_eq!(g["fail"]["code"], "FAILED_PRECONDITION");
    assert_eq!(g["fail"]["details"], "not today");
    assert_eq!(g["fail"]["trailers"]["x-detail"], "why-not");
    assert_eq!(g["deadline"]["code"], "DEADLINE_EXCEEDED");
    assert_eq!(g["cancel"], "cancelled");
    // The deadline and the cancel both ended the VM's call (the cancel by the reset the
    // edge passed on: there is no deadline for the VM to see).
    assert_eq!(
        g["cancelled_on_the_vm"], 2,
        "a call the client ended ran on at the VM"
    );
    assert_eq!(g["large"], json!({"bytes": 3_000_000, "intact": true}));
    // Calls made together go on one h2c connection to the VM, as streams of it.
    let together = t.peer(&["grpc-together", HTTP, &host("grpc", 0), "4"]);
    assert_eq!(
        together["vm_connections"].as_array().map(Vec::len),
        Some(1),
        "{together}"
    );

    // Activity for the idle-suspend controller; metrics.
    let activity = http_get(t.ns(), ADMIN.parse().unwrap(), "admin", "/activity");
    let body = activity.split("\r\n\r\n").nth(1).unwrap();
    let activity: Value = serde_json::from_str(body).unwrap();
    let row = &activity["vms"][0];
    assert_eq!(row["vm_id"], vm_id(0));
    assert!(row["bytes_in"].as_u64().unwrap() >= 100_000_000, "{row}");
    assert!(row["bytes_out"].as_u64().unwrap() >= 50_000_000, "{row}");
    let m = t.metrics();
    assert!(
        metric(
            &m,
            r#"vmedge_edge_requests_total{code="200",service="web"}"#
        )
        .unwrap()
            >= 10.0,
        "{m}"
    );
    assert!(
        metric(&m, "vmedge_edge_upstream_connect_seconds_count").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "vmedge_edge_upstream_response_seconds_count").unwrap() >= 10.0,
        "{m}"
    );
    assert_eq!(metric(&m, "vmedge_edge_open_requests"), Some(0.0), "{m}");
    let bytes_out = format!(
        r#"vmedge_edge_bytes_total{{vm="{}",direction="out"}}"#,
        vm_id(0)
    );
    assert!(metric(&m, &bytes_out).unwrap() >= 50_000_000.0, "{m}");

    // Open client connections: a keep-alive one idle after a request is counted until
    // it closes.
    let open = |t: &EdgeLab| metric(&t.metrics(), "vmedge_edge_open_connections");
    let before = open(&t).unwrap();
    let mut conn = t.ns().enter(|| std::net::TcpStream::connect(HTTP)).unwrap();
    let request = format!("GET /hello HTTP/1.1\r\nHost: {}\r\n\r\n", host("web", 0));
    conn.write_all(request.as_bytes()).unwrap();
    let answer = read_hello(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(open(&t), Some(before + 1.0));
    // Silent for longer than a second, it is parked off the runtime (its task freed),
    // still open, and its next request is served as if nothing happened.
    let parked = |t: &EdgeLab| metric(&t.metrics(), "vmedge_edge_parked_connections");
    eventually(
        "the idle connection parked",
        Duration::from_secs(10),
        || parked(&t) == Some(1.0),
    );
    assert_eq!(open(&t), Some(before + 1.0));
    conn.write_all(request.as_bytes()).unwrap();
    let answer = read_hello(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(parked(&t), Some(0.0), "{}", t.metrics());
    drop(conn);
    eventually(
        "the closed connection uncounted",
        Duration::from_secs(10),
        || open(&t) == Some(before),
    );
}

#[test]
fn opens_another_h2c_connection_to_a_vm_when_each_carries_its_limit() {
    let t = EdgeLab::start_with("running", "h2_streams_per_connection = 1\n");
    // Four calls at once, each held by the VM for half a second: at one stream per
    // connection, each goes on a connection of its own, and all four are answered.
    let together = t.peer(&["grpc-together", HTTP, &host("grpc", 0), "4"]);
    assert_eq!(
        together["vm_connections"].as_array().map(Vec::len),
        Some(4),
        "{together}"
    );
    // Those connections are kept: four more calls at once open none.
    let again = t.peer(&["grpc-together", HTTP, &host("grpc", 0), "4"]);
    assert_eq!(
        again["vm_connections"], together["vm_connections"],
        "{again}"
    );
}

#[test]
fn passes_on_an_h2c_answer_given_before_the_whole_request() {
    let t = EdgeLab::start("running");
    let _early = backend(&t.lab.vms[0].ns, "h2-early", 50052);
    // A 1 MB h2c upload of `path`; what the client saw.
    let upload = |path: &str| {
        let early = host("early", 0);
        t.peer(&["upload", "127.0.0.1", "8080", &early, path, "1048576"])
    };
    // The VM takes the first 64 kB, answers and resets its stream with NO_ERROR while
    // the edge waits to send it more: the client gets the answer, whole, and the edge's
    // connection to the VM carries the next request.
    for _ in 0..2 {
        let got = upload("/");
        assert_eq!(got["status"], 200, "{got}");
        assert_eq!(got["body"], "answered early\n", "{got}");
        assert_eq!(got["ended"], "complete", "{got}");
    }
    // One the VM stops taking and never answers: its upload stops at the upstream
    // timeout, and the client is told the VM did not answer in time.
    let got = upload("/silent");
    assert_eq!(got["status"], 504, "{got}");
    assert!(
        got["body"]
            .as_str()
            .is_some_and(|b| b.contains("did not answer in time")),
        "{got}"
    );
    // An HTTP/1.1 client's upload, on pingora's path to h2c services.
    let body = t.dir.path().join("upload");
    std::fs::write(&body, vec![b'x'; 1 << 20]).unwrap();
    let data = format!("@{}", body.display());
    let got = t.get(&host("early", 0), "/", &["--data-binary", &data]);
    assert_eq!(got, "answered early\n 200");
}

#[test]
fn answers_its_own_errors_as_text_and_as_grpc_status() {
    let t = EdgeLab::start("running");
    let id_of = |page: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix("request id: "))
            .map(str::to_string)
    };

    // A request shorter than the HTTP/2 preface is answered at once (pingora alone waits
    // for 24 bytes before it tells HTTP/1 from h2c).
    let short = raw_http(t.ns(), HTTP.parse().unwrap(), b"GET / HTTP/1.0\r\n\r\n");
    assert!(short.starts_with("HTTP/1.1 4"), "{short:?}");

    // 404 is one answer for an unknown VM, an unknown service and a malformed host.
    let unknown_vm = t.get(&host("web", 0x99), "/", &[]);
    let unknown_service = t.get(&host("nope", 0), "/", &[]);
    let malformed = t.get(&format!("web.proxy.{DOMAIN}"), "/", &[]);
    for page in [&unknown_vm, &unknown_service, &malformed] {
        assert!(
            page.starts_with("404 Not Found: no such service or VM\nrequest id: "),
            "{page}"
        );
        assert!(page.ends_with(" 404"), "{page}");
    }
    let strip = |p: &str| p.replace(&id_of(p).unwrap(), "");
    assert_eq!(
        strip(&unknown_vm),
        strip(&unknown_service),
        "no enumeration"
    );

    let not_ours = t.get("example.com", "/", &[]);
    assert!(
        not_ours.starts_with("421 Misdirected Request: this host is not served here"),
        "{not_ours}"
    );
    let dead = t.get(&host("dead", 0), "/", &[]);
    assert!(
        dead.contains("nothing is listening on port 8999 of the VM") && dead.ends_with(" 502"),
        "{dead}"
    );
    // The connection stays open after an answer of the edge's own (curl sends the next
    // request on it: 0 new connections); after a failed upstream attempt pingora closes
    // it, and the answer says so rather than leaving it to be reset under the next one.
    let twice = |host: &str| {
        t.curl(&[
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}:%{num_connects} ",
            "-H",
            &format!("Host: {host}"),
            &format!("http://{HTTP}/"),
            &format!("http://{HTTP}/"),
        ])
    };
    assert_eq!(twice(&host("nope", 0)), "404:1 404:0 ");
    assert_eq!(twice(&host("web", 0x10)), "503:1 503:0 ");
    let head = t.curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        &format!("Host: {}", host("dead", 0)),
        &format!("http://{HTTP}/"),
    ]);
    assert!(
        head.starts_with("HTTP/1.1 502") && head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    for (i, status) in [(0x10, "stopped"), (0x11, "deleting"), (0x12, "error")] {
        let page = t.get(&host("web", i), "/", &[]);
        assert!(
            page.starts_with(&format!("503 Service Unavailable: the VM is {status}")),
            "{page}"
        );
    }
    let outside = t.get(&host("web", 0x20), "/", &[]);
    assert!(
        outside.contains("outside the prefixes") && outside.ends_with(" 502"),
        "{outside}"
    );
    let slow = t.get(&host("web", 0), "/slow", &[]);
    assert!(
        slow.starts_with("504 Gateway Timeout: the VM did not answer in time"),
        "{slow}"
    );
    let provisioning = t.get(&host("web", 0x13), "/", &[]);
    assert!(
        provisioning.starts_with("504 Gateway Timeout: the VM did not wake up in time"),
        "{provisioning}"
    );
    let sent_id = t.get(&host("nope", 0), "/", &["-H", "X-Request-Id: trace-77"]);
    assert_eq!(id_of(&sent_id).as_deref(), Some("trace-77"));

    // Request smuggling shapes are refused with 400 before anything is forwarded.
    let web = host("web", 0);
    let both = raw_http(
        t.ns(),
        HTTP.parse().unwrap(),
        format!("POST /upload HTTP/1.1\r\nHost: {web}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").as_bytes(),
    );
    assert!(both.starts_with("HTTP/1.1 400"), "{both}");
    let two_hosts = raw_http(
        t.ns(),
        HTTP.parse().unwrap(),
        format!(
            "GET /hello HTTP/1.1\r\nHost: {web}\r\nHost: {}\r\n\r\n",
            host("web", 1)
        )
        .as_bytes(),
    );
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");

    // To a gRPC client the same answers are grpc-status and grpc-message.
    let unknown = t.grpc(&host("grpc", 0x99));
    assert_eq!(unknown["unary"]["code"], "UNIMPLEMENTED");
    assert_eq!(unknown["unary"]["details"], "no such service or VM");
    let stopped = t.grpc(&host("grpc", 0x10));
    assert_eq!(stopped["unary"]["code"], "UNAVAILABLE");
    assert_eq!(stopped["unary"]["details"], "the VM is stopped");
    let dead = t.grpc(&host("dead", 0));
    assert_eq!(dead["unary"]["code"], "UNAVAILABLE");

    let m = t.metrics();
    for (reason, at_least) in [
        ("unknown", 4.0),
        ("not_ours", 1.0),
        ("nothing_listening", 2.0),
        ("unavailable", 4.0),
        ("outside_prefixes", 1.0),
        ("upstream_timeout", 1.0),
        ("wake_timeout", 1.0),
        ("bad_request", 1.0),
    ] {
        let key = format!(r#"vmedge_edge_refusals_total{{reason="{reason}"}}"#);
        assert!(metric(&m, &key).unwrap_or(0.0) >= at_least, "{key}\n{m}");
    }
    assert!(
        metric(&m, r#"vmedge_edge_requests_total{code="404",service=""}"#).unwrap() >= 4.0,
        "{m}"
    );
}

#[test]
fn wakes_a_paused_vm_once_however_many_requests_wait() {
    let t = EdgeLab::start("paused");
    // After each call the hook flips VM 1 to running, as the control plane would.
    let calls = wake_hook(
        t.ns(),
        HOOK,
        vm_id(1),
        t.dir.path().to_path_buf(),
        state(&t.lab, "running").to_string(),
        Duration::from_millis(500),
    );
    let web = host("web", 1);
    let started = Instant::now();
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let args = [
                "-H".to_string(),
                format!("Host: {web}"),
                "-w".into(),
                " %{http_code}".into(),
                format!("http://{HTTP}/hello"),
            ];
            t.ns().command("curl").arg("-sS").args(args).spawn_output()
        })
        .collect();
    for w in waiting {
        let out = w.join().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from 8000\n 200"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one hook call for eight waiting requests"
    );
    let m = t.metrics();
    assert_eq!(
        metric(&m, r#"vmedge_edge_wake_calls_total{result="ok"}"#),
        Some(1.0),
        "{m}"
    );
}

/// `Command::output` on a thread, so several run at once.
trait SpawnOutput {
    fn spawn_output(self) -> std::thread::JoinHandle<std::process::Output>;
}

impl SpawnOutput for &mut std::process::Command {
    fn spawn_output(self) -> std::thread::JoinHandle<std::process::Output> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::spawn(move || child.wait_with_output().unwrap())
    }
}

#[test]
fn reloads_state_and_certificate_under_load_without_failing_a_request() {
    let mut t = EdgeLab::start("running");
    let web = host("web", 0);
    let load = t
        .ns()
        .command("wrk")
        .args([
            "-t2",
            "-c20",
            "-d4s",
            "-H",
            &format!("Host: {web}"),
            &format!("http://{HTTP}/hello"),
        ])
        .spawn_output();
    // Meanwhile: five state changes (another VM flips status), and a new certificate.
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(400));
        let status = if i % 2 == 0 { "stopped" } else { "running" };
        write_state(t.dir.path(), &state(&t.lab, status));
    }
    let state_dir = t.dir.path().join("state");
    let new_cert = state_dir.join("new-cert.pem");
    t.ns().sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        state_dir.join("new-key.pem").to_str().unwrap(),
        "-out",
        new_cert.to_str().unwrap(),
        "-days",
        "2",
        "-subj",
        "/CN=reloaded",
        "-addext",
        &format!("subjectAltName=DNS:*.proxy.{DOMAIN}"),
    ]);
    std::fs::rename(
        state_dir.join("new-key.pem"),
        state_dir.join("edge-key.pem"),
    )
    .unwrap();
    std::fs::copy(&new_cert, state_dir.join("edge-cert.pem.tmp")).unwrap();
    std::fs::rename(
        state_dir.join("edge-cert.pem.tmp"),
        state_dir.join("edge-cert.pem"),
    )
    .unwrap();

    let out = load.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        !report.contains("Non-2xx"),
        "failed requests during reloads:\n{report}"
    );
    assert!(
        !report.contains("Socket errors"),
        "connection errors during reloads:\n{report}"
    );
    assert!(wrk_requests(&report) > 100, "{report}");
    let m = t.metrics();
    assert!(
        metric(&m, "vmedge_registry_generation").unwrap() >= 6.0,
        "{m}"
    );

    // The new certificate is served (the poll runs every 2 s).
    let resolve = format!("{web}:8443:127.0.0.1");
    let url = format!("https://{web}:8443/hello");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = curl(
            t.ns(),
            &[
                "--cacert",
                new_cert.to_str().unwrap(),
                "--resolve",
                &resolve,
                &url,
            ],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t
        .metrics()
        .contains(r#"vmedge_edge_tls_reloads_total{result="ok"} 1"#));
    t.edge.assert_running();
}

#[test]
fn hands_its_listening_sockets_to_an_upgraded_edge() {
    let mut t = EdgeLab::start("running");
    let web = host("web", 0);
    let load = t
        .ns()
        .command("wrk")
        .args([
            "-t1",
            "-c4",
            "-d6s",
            "-H",
            &format!("Host: {web}"),
            &format!("http://{HTTP}/hello"),
        ])
        .spawn_output();
    std::thread::sleep(Duration::from_secs(1));
    // The new binary waits for the sockets; the old one sends them on SIGQUIT and leaves.
    let child = t
        .ns()
        .command(BIN)
        .args(["--log-level", "warn", "edge", "--upgrade", "--config"])
        .arg(t.dir.path().join("vmedge.toml"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut new = Process::new(child, "the upgraded edge");
    std::thread::sleep(Duration::from_millis(500));
    t.edge.signal("QUIT");
    assert!(
        t.edge.wait_exit(Duration::from_secs(30)),
        "the old edge did not leave"
    );
    let out = load.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!report.contains("Non-2xx"), "{report}");
    // Keep-alive connections of the old edge are closed after their request (wrk may count
    // that as a read error); a refused connect would be a gap in listening.
    let connect_errors = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors: connect "))
        .map_or(0, |rest| {
            rest.split(',')
                .next()
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        });
    assert_eq!(
        connect_errors, 0,
        "refused connections across the upgrade:\n{report}"
    );
    assert_eq!(t.get(&web, "/hello", &[]), "hello from 8000\n 200");
    new.assert_running();
    new.signal("TERM");
    assert!(
        new.wait_exit(Duration::from_secs(20)),
        "SIGTERM stops the edge"
    );
}

/// Plain HTTP/1.1 requests go on the edge's own path (edge/src/direct.rs): every way an
/// answer's body can end, interim answers, pipelined requests, and kept-alive
/// connections the VM closes under the edge.
#[test]
fn proxies_plain_http1_answers_of_every_framing_on_its_own_path() {
    let t = EdgeLab::start("running");
    let web = host("web", 0);
    let direct = |t: &EdgeLab| metric(&t.metrics(), "vmedge_edge_direct_requests_total");
    let before = direct(&t).unwrap_or(0.0);
    assert_eq!(t.get(&web, "/hello", &[]), "hello from 8000\n 200");
    assert_eq!(
        direct(&t),
        Some(before + 1.0),
        "a plain GET did not take the direct path"
    );
    let raw = |request: String| raw_http(t.ns(), HTTP.parse().unwrap(), request.as_bytes());

    // A chunked answer is passed on as it came: extension, chunks and trailer.
    let chunked = raw(format!(
        "GET /chunked HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    ));
    assert!(chunked.starts_with("HTTP/1.1 200 OK\r\n"), "{chunked}");
    assert!(chunked.contains("\r\nconnection: close\r\n"), "{chunked}");
    assert!(chunked.contains("\r\nx-request-id: "), "{chunked}");
    assert!(
        chunked.ends_with(
            "\r\n\r\n6;name=value\r\nfirst \r\n7\r\nsecond \r\n5\r\nthird\r\n0\r\nx-end: yes\r\n\r\n"
        ),
        "{chunked}"
    );
    assert_eq!(t.get(&web, "/chunked", &[]), "first second third 200");

    // Pipelined requests on one connection, answered in order: a HEAD (a length, no
    // body), a 204, hints before an answer, and a chunked answer.
    let pipelined = raw(format!(
        "HEAD /hello HTTP/1.1\r\nHost: {web}\r\n\r\nGET /empty HTTP/1.1\r\nHost: {web}\r\n\r\n\
         GET /early HTTP/1.1\r\nHost: {web}\r\n\r\n\
         GET /chunked HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    ));
    let starts: Vec<&str> = pipelined
        .lines()
        .filter(|l| l.starts_with("HTTP/1."))
        .collect();
    assert_eq!(
        starts,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 204 No Content",
            "HTTP/1.1 103 Early Hints",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ],
        "{pipelined}"
    );
    assert!(pipelined.contains("Content-Length: 16\r\n"), "{pipelined}");
    assert!(
        !pipelined.contains("hello from"),
        "a HEAD got a body: {pipelined}"
    );
    assert!(pipelined.contains("Link: </style.css>"), "{pipelined}");
    assert!(pipelined.contains("after the hints\n"), "{pipelined}");
    assert!(
        pipelined.ends_with("0\r\nx-end: yes\r\n\r\n"),
        "{pipelined}"
    );

    // An HTTP/1.0 answer that ends when the VM closes: whole, and the client is told
    // its connection closes too.
    let file = t.dir.path().join("until-close.bin");
    let headers = t.download(&web, "/until-close", &file);
    assert!(headers.starts_with("HTTP/1.1 200 OK"), "{headers}");
    assert!(headers.contains("connection: close"), "{headers}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 100_000);

    // The VM closes a kept-alive connection after an answer without saying so, or
    // reads the next request on it and closes without answering: the edge does not hand
    // out the closed one, and sends a GET again on a new connection.
    assert_eq!(t.get(&web, "/close-after", &[]), "closing\n 200");
    assert_eq!(t.get(&web, "/hello", &[]), "hello from 8000\n 200");
    assert_eq!(t.get(&web, "/drop-next", &[]), "armed\n 200");
    assert_eq!(t.get(&web, "/hello", &[]), "hello from 8000\n 200");
    // A POST is not sent twice: the client is told the VM's answer was cut off.
    assert_eq!(t.get(&web, "/drop-next", &[]), "armed\n 200");
    let post = t.get(&web, "/upload", &["--data-binary", "once"]);
    assert!(
        post.starts_with("502 Bad Gateway: the VM's answer was cut off"),
        "{post}"
    );
    assert!(post.ends_with(" 502"), "{post}");
    let m = t.metrics();
    assert!(
        m.contains(r#"vmedge_edge_refusals_total{reason="bad_upstream_answer"} 1"#),
        "{m}"
    );
    assert!(direct(&t).unwrap() >= before + 12.0, "{m}");

    // A VM that refuses an upload before reading it, and closes: the client gets the
    // VM's answer, not a 502 for the body the edge could not pass on (32 MB: more than
    // the sockets on the way hold).
    let refused = refused_upload(&t, &web, "/reject", 32 << 20);
    assert!(refused.starts_with("HTTP/1.1 413 "), "{refused}");
    assert!(refused.contains("\r\nconnection: close\r\n"), "{refused}");
    assert!(refused.ends_with("\r\n\r\ntoo large\n"), "{refused}");
    // The same, the VM's connection left open with the body unread: the answer comes
    // while the body still waits to be sent (it used to wait for the upstream timeout).
    let refused = refused_upload(&t, &web, "/reject?open=60", 32 << 20);
    assert!(refused.starts_with("HTTP/1.1 413 "), "{refused}");
    assert!(refused.ends_with("\r\n\r\ntoo large\n"), "{refused}");

    // A VM that answers with the body as it reads it: 50 MB through, both ways at once.
    let file = t.dir.path().join("echo-in.bin");
    t.download(&web, "/download?n=50000000", &file);
    let echoed = t.dir.path().join("echo-out.bin");
    let upload = format!("@{}", file.display());
    let status = t.get(
        &web,
        "/echo",
        &[
            "-H",
            "Expect:",
            "--data-binary",
            &upload,
            "-o",
            echoed.to_str().unwrap(),
        ],
    );
    assert_eq!(status, " 200");
    assert_eq!(std::fs::metadata(&echoed).unwrap().len(), 50_000_000);
    assert_eq!(
        sha256_of(t.ns(), &echoed),
        sha256_of(t.ns(), &file),
        "echo intact"
    );
    let m = t.metrics();
    assert!(
        m.contains(r#"vmedge_edge_refusals_total{reason="bad_upstream_answer"} 1"#),
        "the early answer was taken for a broken one: {m}"
    );
}

#[test]
fn proxies_h2_requests_to_http1_services_on_its_own_path() {
    let t = EdgeLab::start("running");
    let web = host("web", 0);
    let direct = |t: &EdgeLab| metric(&t.metrics(), "vmedge_edge_direct_requests_total");
    let h2 = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "--http2-prior-knowledge",
            "-w",
            " %{http_version} %{http_code}",
        ];
        args.extend_from_slice(extra);
        t.get(&web, path, &args)
    };
    let before = direct(&t).unwrap_or(0.0);
    assert_eq!(h2("/hello", &[]), "hello from 8000\n 2 200");
    assert_eq!(
        direct(&t),
        Some(before + 1.0),
        "an h2 GET did not take the direct path"
    );

    // Answers of every framing, decoded: chunked, until the VM closes, none (a 204, a
    // HEAD), and a final answer after hints.
    assert_eq!(h2("/chunked", &[]), "first second third 2 200");
    let prior_knowledge = ["--http2-prior-knowledge"];
    let file = t.dir.path().join("h2-until-close.bin");
    let headers = t.download_with(&web, "/until-close", &file, &prior_knowledge);
    assert!(headers.starts_with("HTTP/2 200"), "{headers}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 100_000);
    assert_eq!(h2("/empty", &[]), " 2 204");
    let head = h2("/hello", &["-I"]);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("content-length: 16\r\n"), "{head}");
    assert!(head.contains("x-request-id: "), "{head}");
    assert_eq!(h2("/early", &[]), "after the hints\n 2 200");

    // 50 MB down, streamed and intact.
    let file = t.dir.path().join("h2-down.bin");
    let headers = t.download_with(&web, "/download?n=50000000", &file, &prior_knowledge);
    let want = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-sha256: "))
        .unwrap_or_else(|| panic!("{headers}"))
        .trim();
    assert_eq!(sha256_of(t.ns(), &file), want, "download intact");

    // What the VM sees: the public host, the edge's fields, the cookies in one field.
    let seen = h2(
        "/headers?x",
        &[
            "-H",
            "cookie: a=1",
            "-H",
            "cookie: b=2",
            "-H",
            "x-forwarded-for: 203.0.113.9",
        ],
    );
    let seen: Value = serde_json::from_str(seen.trim_end_matches(" 2 200")).unwrap();
    assert_eq!(seen["host"], web);
    assert_eq!(seen["x-forwarded-host"], web);
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["cookie"], "a=1; b=2", "{seen}");
    assert!(seen["x-request-id"].is_string(), "{seen}");

    // A VM that closes kept connections after an answer, or reads the next request and
    // closes without answering: the GET goes again on a new connection.
    assert_eq!(h2("/close-after", &[]), "closing\n 2 200");
    assert_eq!(h2("/hello", &[]), "hello from 8000\n 2 200");
    assert_eq!(h2("/drop-next", &[]), "armed\n 2 200");
    assert_eq!(h2("/hello", &[]), "hello from 8000\n 2 200");

    // Bodies: one that fits in what the path reads whole first, and one larger (pingora's
    // path): both arrive intact. An echo comes back decoded.
    for (size, name) in [(5_000, "small"), (200_000, "large")] {
        let file = t.dir.path().join(format!("h2-up-{name}.bin"));
        std::fs::write(
            &file,
            (0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        let up = h2(
            "/upload",
            &["--data-binary", &format!("@{}", file.display())],
        );
        let seen: Value = serde_json::from_str(up.trim_end_matches(" 2 200")).unwrap();
        assert_eq!(seen["bytes"], size, "{name}: {seen}");
        assert_eq!(seen["sha256"], sha256_of(t.ns(), &file), "{name}: {seen}");
    }
    assert_eq!(h2("/echo", &["--data-binary", "ping"]), "ping 2 200");

    // The edge's own answer when nothing listens, over h2.
    let dead = t.get(&host("dead", 0), "/", &["--http2-prior-knowledge"]);
    assert!(
        dead.contains("nothing is listening on port 8999 of the VM") && dead.ends_with(" 502"),
        "{dead}"
    );
    assert_eq!(direct(&t), Some(before + 15.0), "{}", t.metrics());
}

/// A POST of `len` bytes to the VM's `path`, its body sent by another thread while
/// the answer is read: the answer, to the end of the connection.
fn refused_upload(t: &EdgeLab, host: &str, path: &str, len: usize) -> String {
    t.ns().enter(|| {
        let mut client = std::net::TcpStream::connect(HTTP).unwrap();
        let header =
            format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\r\n");
        client.write_all(header.as_bytes()).unwrap();
        let mut sender = client.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..len / chunk.len() {
                // The edge may close first: the rest is not wanted.
                if sender.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer);
        sending.join().unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    })
}

#[test]
fn limits_each_vms_request_rate_and_the_header_size() {
    let t = EdgeLab::start_with("running", "rate_limit = 5\nmax_header_bytes = 4096\n");
    let web = host("web", 0);
    // 30 requests on one connection, back to back: the burst (10) passes, most others not.
    let url = format!("http://{HTTP}/hello");
    let mut args = vec![
        "-H".to_string(),
        format!("Host: {web}"),
        "-w".into(),
        "%{http_code}\\n".into(),
        "-o".into(),
        "/dev/null".into(),
    ];
    for _ in 0..30 {
        args.push(url.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let codes = t.curl(&args);
    let ok = codes.lines().filter(|c| *c == "200").count();
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert_eq!(ok + limited, 30, "{codes}");
    assert!((10..30).contains(&ok) && limited > 0, "{codes}");
    // Another VM's budget is its own.
    let other = t.get(&host("web", 1), "/hello", &[]);
    assert_eq!(other, "hello from 8000\n 200");
    // h2 streams on one connection (h2load: 30, one at a time) are held to it too, on the
    // edge's own h2 path.
    let direct = || metric(&t.metrics(), "vmedge_edge_direct_requests_total").unwrap_or(0.0);
    let before = direct();
    let authority = format!(":authority: {}", host("web", 1));
    let out = t
        .ns()
        .command("h2load")
        .args(["-n30", "-c1", "-m1", "-H", &authority])
        .arg(format!("http://{HTTP}/hello"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let count = |class: &str| -> usize {
        let line = report.lines().find(|l| l.starts_with("status codes:"));
        let field = line.and_then(|l| l.split(',').find(|f| f.trim_end().ends_with(class)));
        let n = field.and_then(|f| f.split_whitespace().rev().nth(1));
        n.and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {class} count: {report}"))
    };
    let (ok, limited) = (count("2xx"), count("4xx"));
    assert_eq!(ok + limited, 30, "{report}");
    assert!(ok > 0 && limited > 0, "{report}");
    assert_eq!(
        direct(),
        before + 30.0,
        "h2 requests not on the direct path"
    );

    let big = format!("X-Big: {}", "a".repeat(5000));
    let page = t.get(&host("web", 1), "/hello", &["-H", &big]);
    assert!(
        page.starts_with(
            "431 Request Header Fields Too Large: the request header is larger than 4096 bytes"
        ),
        "{page}"
    );
    let h2 = t.get(
        &host("web", 1),
        "/hello",
        &["--http2-prior-knowledge", "-H", &big],
    );
    assert!(h2.starts_with("431 "), "{h2}");
    let m = t.metrics();
    assert!(
        metric(&m, r#"vmedge_edge_refusals_total{reason="rate_limited"}"#).unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"vmedge_edge_refusals_total{reason="headers_too_large"}"#
        ),
        Some(2.0),
        "{m}"
    );
}

/// Whether the edge closes `conn` (end of stream) within `within`.
fn closed_within(conn: &mut std::net::TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn closes_idle_keep_alive_connections_and_stalled_requests() {
    let t = EdgeLab::start_with(
        "running",
        "idle_timeout = \"1s\"\nclient_timeout = \"1s\"\nheader_timeout = \"1s\"\n",
    );
    let connect = || t.ns().enter(|| std::net::TcpStream::connect(HTTP)).unwrap();
    let request = format!("GET /hello HTTP/1.1\r\nHost: {}\r\n\r\n", host("web", 0));

    // A keep-alive connection after its request (pingora alone keeps it for ever), and
    // one that never sends anything.
    let mut idle = connect();
    idle.write_all(request.as_bytes()).unwrap();
    let answer = read_hello(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut silent = connect();
    // A slowloris client: half a header, then nothing.
    let mut stalled = connect();
    stalled.write_all(&request.as_bytes()[..20]).unwrap();
    for (what, conn) in [
        ("idle keep-alive", &mut idle),
        ("silent", &mut silent),
        ("stalled mid-header", &mut stalled),
    ] {
        assert!(
            closed_within(conn, Duration::from_secs(20)),
            "{what} connection still open"
        );
    }

    // A header trickling in, each byte in time for the read timeout: cut off at the
    // header timeout.
    let mut trickle = connect();
    let cut = request.bytes().any(|byte| {
        std::thread::sleep(Duration::from_millis(300));
        trickle.write_all(&[byte]).is_err()
    });
    assert!(
        cut || closed_within(&mut trickle, Duration::from_secs(1)),
        "a header trickling in for {} s was taken",
        request.len() * 3 / 10
    );
    // A request whose header is in may take longer than that: the VM's silence ends it
    // (upstream_timeout, 2 s: 504), not the header timeout.
    let slow = t.get(&host("web", 0), "/slow", &[]);
    assert!(slow.ends_with(" 504"), "{slow}");

    // A connection that keeps asking stays open across the idle timeout.
    let mut busy = connect();
    for _ in 0..4 {
        busy.write_all(request.as_bytes()).unwrap();
        let answer = read_hello(&mut busy);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        std::thread::sleep(Duration::from_millis(600));
    }
}

#[test]
fn cuts_off_clients_that_stop_reading() {
    let t = EdgeLab::start_with("running", "client_timeout = \"1s\"\n");
    let web = host("web", 0);
    // Far more than the kernel can hold between the edge and a client: four times the
    // ceiling of a socket's send buffer where the edge runs (the client's receive buffer
    // is 8 KiB), and at least 32 MiB.
    let wmem = t
        .ns()
        .command("cat")
        .arg("/proc/sys/net/ipv4/tcp_wmem")
        .output()
        .unwrap();
    let wmem_max: u64 = String::from_utf8_lossy(&wmem.stdout)
        .split_whitespace()
        .last()
        .and_then(|max| max.parse().ok())
        .unwrap_or_else(|| panic!("tcp_wmem: {}", String::from_utf8_lossy(&wmem.stdout)));
    let n: u64 = (4 * wmem_max).max(32 << 20);
    let path = format!("/download?n={n}");
    // The edge's own paths (HTTP/1.1; h2 to an HTTP/1.1 service) and pingora's (TLS; an h2
    // request whose body has no content-length).
    let cases = [
        ("h1", "GET", "8080"),
        ("h1-tls", "GET", "8443"),
        ("h2c", "GET", "8080"),
        ("h2c", "POST", "8080"),
    ];
    let stalled = |mode: &str, method: &str, port: &str, wait: &str| {
        t.peer(&[
            "stalled-client",
            mode,
            method,
            "127.0.0.1",
            port,
            &web,
            &path,
            wait,
        ])
    };
    for (mode, method, port) in cases {
        // A client that reads right away gets the whole answer: the cut below is the
        // edge's doing, not the client's.
        let reading = stalled(mode, method, port, "0");
        assert_eq!(
            (
                &reading["status"],
                &reading["ended"],
                reading["bytes"].as_u64()
            ),
            (&json!(200), &json!("complete"), Some(n)),
            "{mode} {method}: {reading}"
        );
        // One that stops reading for 4 s (the client timeout is 1 s) is cut off before the
        // answer is all sent: stream reset or connection closed.
        let stopped = stalled(mode, method, port, "4");
        assert_eq!(stopped["status"], 200, "{mode} {method}: {stopped}");
        assert!(
            matches!(stopped["ended"].as_str(), Some("closed" | "reset")),
            "{mode} {method}: a client that stopped reading was not cut off: {stopped}"
        );
        assert!(
            stopped["bytes"].as_u64().is_some_and(|b| b < n),
            "{mode} {method}: {stopped}"
        );
    }

    // An h2 upload that stops halfway is the client's doing: 408 at the client timeout,
    // not the VM's 504 at the upstream timeout (2 s).
    let seen = t.peer(&["stalled-upload", "127.0.0.1", "8080", &web, "/upload"]);
    assert_eq!(seen["status"], 408, "{seen}");
}

/// The answer to `GET /hello` on `conn`, read to its body's end (the VM may send its
/// header and body apart, and the edge passes each on as it comes); what was read when
/// the connection closed or went quiet for 10 s otherwise.
fn read_hello(conn: &mut std::net::TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    read_until(conn, b"hello from 8000\n")
}
