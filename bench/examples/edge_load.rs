//! bench/edge: the edge against nginx and haproxy in one run, all in front of the same
//! backend (nginx answering a small body from a VM namespace) with upstream keep-alive,
//! each proxy on one worker thread:
//! - HTTP/1.1 small responses, keep-alive: wrk requests/s and p99 (and the backend direct);
//! - h2c (prior knowledge, h2load) to an HTTP/1.1 upstream: GETs, and POSTs of 1 KiB;
//! - memory of N idle keep-alive client connections (resident set growth);
//! - gRPC unary (h2load) to an h2c gRPC backend: the edge against nginx `grpc_pass`;
//! - TLS handshakes per second, ECDSA P-256 (the same certificate for both), wrk with
//!   `Connection: close`.
//!
//! The throughput comparisons run each server five times, in turn, and report medians:
//! requests per second, and the server's CPU time per request (all its threads and child
//! processes), which a slow spell of this shared machine moves less. The vmedge/nginx
//! ratios are medians of each round's ratio.
//!
//! `VMEDGE_BIN=target/dist/vmedge cargo run --release -p vmedge-bench --example edge_load [-- --quick | --memory | --http1 | --h2]`
//! (root; bench/load/edge.sh does both, the edge built with `--profile dist`).
#![allow(clippy::unwrap_used)] // a benchmark may panic on what it did not expect

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use vmedge_tests::edge::{wait_listening, Process};
use vmedge_tests::{cpu_ns, rss_kb, Lab, Netns};

const DOMAIN: &str = "bench.test";
const VM: &str = "6f1c2d3e-0000-4000-8000-0000000000aa";
const BACKEND: u16 = 8000;
const GRPC: u16 = 50051;

/// How long each comparison runs: each server `rounds` times, in turn.
struct Bench {
    rounds: usize,
    /// wrk's duration per run.
    seconds: u32,
    /// h2load's requests per run.
    h2_requests: u32,
}

struct Proxy {
    name: &'static str,
    pid: u32,
    http: SocketAddr,
    h2c: Option<SocketAddr>,
    tls: Option<SocketAddr>,
}

fn host() -> String {
    format!("web--{}.proxy.{DOMAIN}", VM.replace('-', ""))
}

fn spawn(ns: &Netns, argv: &[&str], what: &str) -> Process {
    // One shell so the file limit holds for the server (10k connections).
    let script = format!("ulimit -n \"$(ulimit -Hn)\"; exec {}", argv.join(" "));
    // `ip netns exec` and `exec` keep the pid: it is the server's.
    let child = ns
        .command("sh")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Process::new(child, what)
}

fn nginx_conf(dir: &Path, body: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx-{n}.pid;\nerror_log {d}/nginx-{n}.log warn;\n\
         worker_rlimit_nofile 20000;\nevents {{ worker_connections 15000; }}\n\
         http {{\n access_log off;\n keepalive_requests 1000000;\n keepalive_timeout 120s;\n\
         client_body_temp_path {d}/nb; proxy_temp_path {d}/np; fastcgi_temp_path {d}/nf; uwsgi_temp_path {d}/nu; scgi_temp_path {d}/ns;\n{body}\n}}\n",
        n = body.len()
    )
}

/// Runs wrk (one thread) with the service's Host header; its report, once no response
/// was non-2xx.
fn run_wrk(ns: &Netns, args: &[&str], url: &str) -> String {
    let out = ns
        .command("wrk")
        .arg("-t1")
        .args(args)
        .arg("-H")
        .arg(format!("Host: {}", host()))
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("Non-2xx"), "{url}: {text}");
    text
}

/// The `Requests/sec:` line of a wrk report.
fn requests_per_second(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .unwrap_or_else(|| panic!("{report}"))
        .trim()
        .parse()
        .unwrap()
}

/// Keep-alive requests per second, p99 (ms) and the number of requests.
fn wrk(ns: &Netns, url: &str, seconds: u32) -> Run {
    let report = run_wrk(ns, &["-c50", &format!("-d{seconds}s"), "--latency"], url);
    let p99_ms = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| millis(v.trim()))
        .unwrap();
    Run {
        rate: requests_per_second(&report),
        requests: requests_in(&report),
        p99_ms,
    }
}

/// The request count of a wrk report ("  123456 requests in 10.00s, ...").
fn requests_in(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"))
}

fn millis(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap());
    let n: f64 = n.parse().unwrap();
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => panic!("unit {unit}"),
    }
}

/// Runs h2load (one thread, 10 clients, 10 streams each) for `requests` to `url` with
/// `authority`; requests per second, once every request succeeded.
fn run_h2load(ns: &Netns, args: &[&str], authority: &str, url: &str, requests: u32) -> f64 {
    let out = ns
        .command("h2load")
        .args(["-c10", "-m10", "-t1", &format!("-n{requests}")])
        .args(args)
        .arg("-H")
        .arg(format!(":authority: {authority}"))
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{requests} succeeded")),
        "{url}: {text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap()
}

/// New TLS connections per second: wrk with `Connection: close`, so every request is a
/// full handshake (no resumption) and one small response.
fn handshakes(ns: &Netns, addr: SocketAddr, seconds: u32) -> Run {
    let report = run_wrk(
        ns,
        &["-c20", &format!("-d{seconds}s"), "-H", "Connection: close"],
        &format!("https://{addr}/"),
    );
    Run {
        rate: requests_per_second(&report),
        requests: requests_in(&report),
        p99_ms: f64::NAN,
    }
}

/// Opens `n` keep-alive connections, each after one request; resident kB of the server
/// (with its children) before, just after, and once they have been idle for a while (the
/// edge parks a connection silent for a second, and trims its heap every 5 s after
/// requests were served or connections parked).
fn idle_memory(ns: &Netns, addr: SocketAddr, pid: u32, n: usize) -> [u64; 3] {
    let before = rss_kb(pid);
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host());
    let conns: Vec<TcpStream> = ns.enter(|| {
        (0..n)
            .map(|_| {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(request.as_bytes()).unwrap();
                c
            })
            .collect()
    });
    let mut buf = [0u8; 1024];
    for mut c in &conns {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = c.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let opened = rss_kb(pid);
    std::thread::sleep(IDLE_FOR);
    let idle = rss_kb(pid);
    drop(conns);
    [before, opened, idle]
}

/// How long the connections stay idle before the second reading.
const IDLE_FOR: Duration = Duration::from_secs(12);

/// A minimal gRPC unary server (h2c): echoes each request message with status OK in
/// trailers; fast enough not to be what a proxy comparison measures.
fn grpc_backend(ns_name: String, port: u16) {
    use http_body_util::{BodyExt, Full};
    std::thread::spawn(move || {
        vmedge_tests::enter_netns(&ns_name);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("::", port)).await.unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let message = req.into_body().collect().await?.to_bytes();
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert(
                                "grpc-status",
                                hyper::header::HeaderValue::from_static("0"),
                            );
                            let body =
                                Full::new(message).with_trailers(async move { Some(Ok(trailers)) });
                            let mut response = hyper::Response::new(body);
                            response.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/grpc"),
                            );
                            Ok::<_, hyper::Error>(response)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
    });
}

/// h2load as a gRPC unary client: POSTs of one 5-byte-framed message.
fn grpc_h2load(ns: &Netns, addr: SocketAddr, message: &Path, requests: u32) -> f64 {
    let message = message.to_str().unwrap();
    let args = [
        "-d",
        message,
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ];
    let url = format!("http://{addr}/bench.Echo/Unary");
    run_h2load(ns, &args, &grpc_host(), &url, requests)
}

fn grpc_host() -> String {
    format!("grpc--{}.proxy.{DOMAIN}", VM.replace('-', ""))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // --memory: the idle-connection memory alone, on a fresh edge.
    let memory_only = std::env::args().any(|a| a == "--memory");
    // --http1: the HTTP/1.1 keep-alive comparison alone; --h2: h2c and gRPC alone.
    let http1_only = std::env::args().any(|a| a == "--http1");
    let h2_only = std::env::args().any(|a| a == "--h2");
    let bin = std::env::var("VMEDGE_BIN").expect("VMEDGE_BIN: the vmedge binary to measure");
    let (bench, idle) = if quick {
        (
            Bench {
                rounds: 1,
                seconds: 2,
                h2_requests: 20_000,
            },
            500,
        )
    } else {
        (
            Bench {
                rounds: 5,
                seconds: 4,
                h2_requests: 60_000,
            },
            10_000,
        )
    };
    let seconds = bench.seconds;
    let lab = Lab::new(1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = &lab.worker;
    let vm = &lab.vms[0];

    // The backend: nginx in the VM answering a small body.
    std::fs::write(
        d.join("backend.conf"),
        nginx_conf(d, &format!("server {{ listen [::]:{BACKEND} reuseport; location / {{ return 200 \"hello from the vm\\n\"; }} }}")),
    )
    .unwrap();
    let backend_nginx = spawn(
        &vm.ns,
        &["nginx", "-c", d.join("backend.conf").to_str().unwrap()],
        "backend nginx",
    );
    let backend = SocketAddr::from((vm.ipv6, BACKEND));
    wait_listening(w, backend, "backend");
    grpc_backend(vm.ns.name().to_string(), GRPC);
    wait_listening(w, SocketAddr::from((vm.ipv6, GRPC)), "gRPC backend");
    let message = d.join("grpc-message.bin");
    let mut framed = vec![0u8, 0, 0, 0, 16];
    framed.extend_from_slice(b"0123456789abcdef");
    std::fs::write(&message, framed).unwrap();
    // The body of the h2c POSTs: 1 KiB, as an API call's JSON might be.
    let post = d.join("post-1k.bin");
    std::fs::write(&post, [b'x'; 1024]).unwrap();

    // The edge: one thread, the self-signed P-256 certificate.
    std::fs::write(
        d.join("state.json"),
        serde_json::json!({"vms": [{"id": VM, "org_id": "o", "worker": "w", "public_ipv6": vm.ipv6.to_string(),
            "status": "running", "services": [{"name": "web", "port": BACKEND}, {"name": "grpc", "port": GRPC, "h2c": true}]}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("vmedge.toml"),
        format!(
            "domain = \"{DOMAIN}\"\nregistry = \"file:state.json\"\nstate_dir = \"state\"\nvm_prefixes = [\"fd5e:ed00::/32\"]\n\
             [edge]\nhttp = [\"127.0.0.1:8080\"]\nhttps = [\"127.0.0.1:8443\"]\nadmin = \"127.0.0.1:9180\"\nthreads = 1\ngrace_period = \"0s\"\n"
        ),
    )
    .unwrap();
    let edge = spawn(
        w,
        &[
            &bin,
            "--log-level",
            "warn",
            "edge",
            "--config",
            d.join("vmedge.toml").to_str().unwrap(),
        ],
        "vmedge edge",
    );
    wait_listening(w, "127.0.0.1:9180".parse().unwrap(), "edge admin");
    let (cert, key) = (d.join("state/edge-cert.pem"), d.join("state/edge-key.pem"));

    // nginx and haproxy in front of the same backend, upstream keep-alive.
    let upstream = format!("[{}]:{BACKEND}", vm.ipv6);
    std::fs::write(
        d.join("front.conf"),
        nginx_conf(
            d,
            &format!(
                "upstream vm {{ server {upstream}; keepalive 128; keepalive_requests 1000000; }}\n\
                 upstream grpcvm {{ server [{}]:{GRPC}; keepalive 128; keepalive_requests 1000000; }}\n\
                 server {{ listen 127.0.0.1:8182 http2; location / {{ grpc_pass grpc://grpcvm; }} }}\n\
                 server {{ listen 127.0.0.1:8180 reuseport; listen 127.0.0.1:8181 http2; listen 127.0.0.1:8543 ssl;\n\
                 ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate {}; ssl_certificate_key {};\n\
                 location / {{ proxy_pass http://vm; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                 proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header Host $host; }} }}",
                vm.ipv6,
                cert.display(),
                key.display()
            ),
        ),
    )
    .unwrap();
    let nginx = spawn(
        w,
        &["nginx", "-c", d.join("front.conf").to_str().unwrap()],
        "front nginx",
    );
    std::fs::write(
        d.join("haproxy.cfg"),
        format!(
            "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n  http-reuse always\n  option forwardfor\n\
             frontend f\n  bind 127.0.0.1:8280\n  default_backend b\nbackend b\n  server vm ipv6@{}:{BACKEND}\n",
            vm.ipv6
        ),
    )
    .unwrap();
    let haproxy = spawn(
        w,
        &[
            "haproxy",
            "-db",
            "-f",
            d.join("haproxy.cfg").to_str().unwrap(),
        ],
        "haproxy",
    );
    let proxies = [
        Proxy {
            name: "vmedge",
            pid: edge.id(),
            http: "127.0.0.1:8080".parse().unwrap(),
            h2c: Some("127.0.0.1:8080".parse().unwrap()),
            tls: Some("127.0.0.1:8443".parse().unwrap()),
        },
        Proxy {
            name: "nginx",
            pid: nginx.id(),
            http: "127.0.0.1:8180".parse().unwrap(),
            h2c: Some("127.0.0.1:8181".parse().unwrap()),
            tls: Some("127.0.0.1:8543".parse().unwrap()),
        },
        Proxy {
            name: "haproxy",
            pid: haproxy.id(),
            http: "127.0.0.1:8280".parse().unwrap(),
            h2c: None,
            tls: None,
        },
    ];
    for p in &proxies {
        wait_listening(w, p.http, p.name);
    }

    println!(
        "bench/edge{}: one worker thread per proxy, same backend, upstream keep-alive",
        if quick {
            " --quick (debug build, short runs: numbers not meaningful)"
        } else {
            ""
        }
    );
    if memory_only {
        idle_memory_section(w, &proxies, idle);
        return;
    }
    if !h2_only {
        http1_section(w, &proxies, (backend, backend_nginx.id()), &bench);
    }
    if http1_only {
        return;
    }
    let grpc_nginx = "127.0.0.1:8182".parse().unwrap();
    h2_sections(w, &proxies, grpc_nginx, &message, &post, &bench);
    if h2_only {
        return;
    }
    println!(
        "\nTLS handshakes, ECDSA P-256, a new connection per request (wrk -c20 Connection: close, {seconds}s, {} rounds):",
        bench.rounds
    );
    let tls: Vec<&Proxy> = proxies.iter().filter(|p| p.tls.is_some()).collect();
    let servers: Vec<Server> = tls.iter().map(|p| p.server()).collect();
    let samples = alternate(bench.rounds, &servers, |i| {
        handshakes(w, tls[i].tls.unwrap(), seconds)
    });
    report(&servers, &samples, 0, 1);

    idle_memory_section(w, &proxies, idle);
}

/// Resident memory of the edge and nginx with `idle` idle keep-alive connections open.
fn idle_memory_section(w: &Netns, proxies: &[Proxy], idle: usize) {
    println!("\nmemory with {idle} idle keep-alive client connections open (resident, server and children):");
    let edge_kb = idle_memory(w, proxies[0].http, proxies[0].pid, idle);
    let nginx_kb = idle_memory(w, proxies[1].http, proxies[1].pid, idle);
    let per_connection =
        |after: u64, before: u64| after.saturating_sub(before) as f64 / idle as f64;
    for (name, [before, opened, idle_kb]) in [("vmedge", edge_kb), ("nginx", nginx_kb)] {
        println!(
            "  {name:<8} {opened:>8} kB just after, {idle_kb:>8} kB idle {}s ({before} kB before: \
             {:.1} and {:.1} kB per connection)",
            IDLE_FOR.as_secs(),
            per_connection(opened, before),
            per_connection(idle_kb, before),
        );
    }
    println!(
        "  vmedge/nginx: {:.2}x just after, {:.2}x idle (the whole process); \
         {:.2}x idle per connection (what the connections added)",
        edge_kb[1] as f64 / nginx_kb[1].max(1) as f64,
        edge_kb[2] as f64 / nginx_kb[2].max(1) as f64,
        edge_kb[2].saturating_sub(edge_kb[0]) as f64
            / nginx_kb[2].saturating_sub(nginx_kb[0]).max(1) as f64
    );
}

/// What a client reported for one run.
struct Run {
    rate: f64,
    requests: f64,
    /// NaN where the client reports none (h2load).
    p99_ms: f64,
}

/// One run of one server, with the CPU time it spent on it.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    p99_ms: f64,
    /// The server's CPU time per request, all its threads and child processes, µs.
    cpu_us: f64,
}

/// A server measured in turn with the others: its name and process.
struct Server<'a> {
    name: &'a str,
    pid: u32,
}

impl Proxy {
    fn server(&self) -> Server<'static> {
        Server {
            name: self.name,
            pid: self.pid,
        }
    }
}

/// Runs every server `rounds` times, in turn, each round starting one server later: this
/// machine's speed swings by half within minutes (other tenants), and one long run each
/// put a slow spell on one server only. The samples, by server.
fn alternate(
    rounds: usize,
    servers: &[Server],
    mut run: impl FnMut(usize) -> Run,
) -> Vec<Vec<Sample>> {
    let mut samples = vec![Vec::new(); servers.len()];
    for round in 0..rounds {
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            let cpu = cpu_ns(servers[i].pid);
            let r = run(i);
            let spent = cpu_ns(servers[i].pid).saturating_sub(cpu);
            samples[i].push(Sample {
                rate: r.rate,
                p99_ms: r.p99_ms,
                cpu_us: spent as f64 / 1000.0 / r.requests.max(1.0),
            });
        }
    }
    samples
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `text(v)`, or nothing for a value the client did not report (NaN).
fn unless_nan(v: f64, text: impl FnOnce(f64) -> String) -> String {
    if v.is_nan() {
        String::new()
    } else {
        text(v)
    }
}

/// Prints each server's median rate (and range), CPU per request and p99; then the
/// vmedge/nginx ratios, as the median of the rounds' ratios (runs of one round ran
/// minutes apart at most). `servers[vmedge]` and `servers[nginx]` are compared.
fn report(servers: &[Server], samples: &[Vec<Sample>], vmedge: usize, nginx: usize) {
    for (s, runs) in servers.iter().zip(samples) {
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let (lo, hi) = rates
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let p99 = unless_nan(median(runs.iter().map(|r| r.p99_ms).collect()), |v| {
            format!("  p99 {v:>6.2} ms")
        });
        println!(
            "  {:<8} {:>8.0} req/s ({lo:.0}-{hi:.0}){p99}  {:>6.1} us cpu/request",
            s.name,
            median(rates),
            median(runs.iter().map(|r| r.cpu_us).collect()),
        );
    }
    let per_round = |f: &dyn Fn(&Sample, &Sample) -> f64| {
        median(
            samples[vmedge]
                .iter()
                .zip(&samples[nginx])
                .map(|(e, n)| f(e, n))
                .collect(),
        )
    };
    let p99 = unless_nan(per_round(&|e, n| e.p99_ms / n.p99_ms), |v| {
        format!(", p99 {v:.2}x")
    });
    println!(
        "  vmedge/nginx: {:.2}x req/s, {:.2}x requests per cpu-second{p99} (medians of {} rounds)",
        per_round(&|e, n| e.rate / n.rate),
        per_round(&|e, n| n.cpu_us / e.cpu_us),
        samples[vmedge].len(),
    );
}

/// HTTP/1.1 keep-alive, small body: the backend direct and each proxy, in turn (wrk).
fn http1_section(w: &Netns, proxies: &[Proxy], backend: (SocketAddr, u32), bench: &Bench) {
    println!(
        "\nHTTP/1.1 keep-alive, small body (wrk -t1 -c50 -d{}s, {} rounds):",
        bench.seconds, bench.rounds
    );
    let mut servers = vec![Server {
        name: "direct",
        pid: backend.1,
    }];
    servers.extend(proxies.iter().map(Proxy::server));
    let samples = alternate(bench.rounds, &servers, |i| {
        let addr = if i == 0 {
            backend.0
        } else {
            proxies[i - 1].http
        };
        wrk(w, &format!("http://{addr}/"), bench.seconds)
    });
    report(&servers, &samples, 1, 2);
}

/// h2c to an HTTP/1.1 upstream (GETs, then POSTs of `post`), and gRPC unary to an h2c
/// upstream (h2load), the edge and nginx in turn.
fn h2_sections(
    w: &Netns,
    proxies: &[Proxy],
    grpc_nginx: SocketAddr,
    message: &Path,
    post: &Path,
    bench: &Bench,
) {
    let post = post.to_str().unwrap();
    let requests = bench.h2_requests;
    let servers: Vec<Server> = proxies
        .iter()
        .filter(|p| p.h2c.is_some())
        .map(Proxy::server)
        .collect();
    let h2c: Vec<SocketAddr> = proxies.iter().filter_map(|p| p.h2c).collect();
    for (what, args) in [("", &[][..]), (", POSTs of 1 KiB", &["-d", post][..])] {
        println!(
            "\nh2c prior knowledge to an HTTP/1.1 upstream{what} (h2load -c10 -m10 -n{requests}, {} rounds):",
            bench.rounds
        );
        let samples = alternate(bench.rounds, &servers, |i| Run {
            rate: run_h2load(w, args, &host(), &format!("http://{}/", h2c[i]), requests),
            requests: f64::from(requests),
            p99_ms: f64::NAN,
        });
        report(&servers, &samples, 0, 1);
    }

    println!(
        "\ngRPC unary over h2c, h2c to the VM (h2load -c10 -m10 -n{requests}, {} rounds; nginx: grpc_pass):",
        bench.rounds
    );
    let grpc = [proxies[0].http, grpc_nginx];
    let samples = alternate(bench.rounds, &servers, |i| Run {
        rate: grpc_h2load(w, grpc[i], message, requests),
        requests: f64::from(requests),
        p99_ms: f64::NAN,
    });
    report(&servers, &samples, 0, 1);
}
