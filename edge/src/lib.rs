//! The HTTP(S) edge on pingora: `<service>--<vmid>.proxy.<domain>` to
//! `[vm public_ipv6]:service.port` (DESIGN.md, "Edge").
//!
//! # Layout
//! - [`proxy`]: [`EdgeProxy`], pingora's `ProxyHttp`: route, refuse, wake, forward.
//! - [`answers`]: the edge's own answers (404, 421, 502, 503, 504, ...) as text or gRPC.
//! - [`wake`]: wake hook calls, one per VM at a time, and waiting for `running`.
//! - [`activity`]: last network activity per VM (`/activity`), per-VM rate buckets.
//! - [`tls`]: the `*.proxy.<domain>` certificate, self-signed when none is given, reloaded
//!   in place.
//! - [`idle`]: idle keep-alive connections held without the request machinery.
//! - [`conn`]: plain client connections without pingora's per-connection buffers.
//! - [`park`]: idle plain connections parked off the runtime, in an epoll set of the
//!   edge's own.
//! - [`direct`]: requests to HTTP/1.1 services exchanged without pingora's upstream
//!   machinery (plain HTTP/1.1 from the first byte, h2 from the proxy's
//!   `request_filter`), over [`upstream`]'s kept-alive connections; the rest goes to
//!   [`proxy`].
//! - [`server`]: listeners, threads, shutdown and upgrade: one pingora `Server`.
//! - [`metrics`], [`ids`]: `vmedge_edge_*` metrics; request ids.

pub mod activity;
pub mod answers;
pub mod conn;
pub mod direct;
pub mod idle;
pub mod ids;
pub mod metrics;
pub mod park;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod wake;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

pub use activity::Activity;
pub use answers::Refusal;
pub use metrics::Metrics;
pub use proxy::EdgeProxy;
pub use server::{EdgeError, EdgeServer, Stop, StopSender};
pub use tls::{CertSource, CertStore, TlsError};
pub use vmedge_model::RateLimit;
pub use wake::{WakeHook, Waker};

/// Everything the edge is told.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// Stack domain: services are `<svc>--<vmid>.proxy.<domain>`.
    pub domain: String,
    /// The only addresses ever dialled.
    pub vm_prefixes: Vec<IpNet>,
    /// Plain HTTP/1.1 and h2c (prior knowledge) listeners.
    pub http: Vec<SocketAddr>,
    /// TLS listeners, ALPN h2 and http/1.1.
    pub https: Vec<SocketAddr>,
    /// The certificate for the TLS listeners.
    pub cert: CertSource,
    /// The control plane's wake hook.
    pub wake_url: Option<String>,
    /// How long a request waits for a waking VM.
    pub wake_timeout: Duration,
    /// How long connecting to a VM may take.
    pub connect_timeout: Duration,
    /// How long a VM may stay silent mid-exchange (each read and write).
    pub upstream_timeout: Duration,
    /// How long a client connection may wait for its next request (then closed).
    pub idle_timeout: Duration,
    /// How long a client may stay silent in the middle of a request (each read of its
    /// header or body), or leave its answer unread (each write); then closed: the bound
    /// on slowloris clients, and on clients that stop reading.
    pub client_timeout: Duration,
    /// How long a request's whole header may take to arrive, from its first byte (then the
    /// connection is closed): the bound on clients that trickle a header in.
    pub header_timeout: Duration,
    /// The largest request header accepted (then 431), in bytes.
    pub max_header_bytes: usize,
    /// Requests per VM per second (burst twice that); none when `None`.
    pub rate_limit: Option<RateLimit>,
    /// Concurrent streams on one h2c connection to a VM.
    pub h2_streams_per_connection: usize,
    /// Worker threads; 0 for one per core.
    pub threads: usize,
    /// Bytes of read buffer per TLS client connection (0: reads go straight to the
    /// parser). pingora's default, 64 KiB, made an idle keep-alive connection cost
    /// ~100 kB; 4 KiB costs ~43 kB with the same throughput (bench/RESULTS.md). Plain
    /// connections have none ([`conn`]).
    pub client_read_buffer: usize,
    /// Where the edge keeps its pid file and upgrade socket.
    pub state_dir: PathBuf,
    /// Take the listening sockets over from a running edge (zero-downtime upgrade).
    pub upgrade: bool,
    /// How long open requests may run on after a graceful stop.
    pub grace_period: Duration,
}

impl EdgeSettings {
    /// Settings with the defaults `vmedge up` uses, for `domain`.
    pub fn new(domain: &str, state_dir: PathBuf) -> EdgeSettings {
        EdgeSettings {
            domain: domain.to_string(),
            vm_prefixes: Vec::new(),
            http: Vec::new(),
            https: Vec::new(),
            cert: CertSource::SelfSigned {
                dir: state_dir.clone(),
                domain: domain.to_string(),
            },
            wake_url: None,
            wake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            client_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            rate_limit: None,
            h2_streams_per_connection: 128,
            threads: 0,
            client_read_buffer: 4096,
            state_dir,
            upgrade: false,
            grace_period: Duration::from_secs(5),
        }
    }

    /// Whether `ip` is inside the VM prefixes: the only addresses the edge dials.
    pub fn may_dial(&self, ip: std::net::IpAddr) -> bool {
        self.vm_prefixes.iter().any(|p| p.contains(&ip))
    }
}
