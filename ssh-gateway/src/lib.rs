//! The SSH gateway on russh: `ssh <vmid>@ssh.<domain>` into any VM with the user's own
//! key (DESIGN.md, "SSH gateway").
//!
//! # Layout
//! - [`access`]: key fingerprint -> user -> org -> VM; every refusal looks the same.
//! - [`keys`]: the gateway's host key and user CA (made once, kept in the state
//!   directory), login certificates, the key algorithms users may use.
//! - [`upstream`]: the SSH connection to a VM: host key checked, logged in by certificate.
//! - [`session`]: russh's server handler for one user connection.
//! - [`bridge`]: one user channel to one VM channel, both ways, with flow control.
//! - [`server`]: listeners, per-connection limits, graceful shutdown.
//! - [`metrics`](mod@metrics): `vmedge_ssh_*`.
//!
//! # Flow control
//! Each direction of a channel takes russh's per-channel queue off as it arrives into a
//! spool, and writes with the window-respecting channel writer, so russh's session loops
//! never block (two blocked loops in a bridge would deadlock on each other's window
//! adjusts). Window credit follows consumption, per channel: russh is patched for it
//! (`vendor/README.md`), and a channel whose spool is over a limit gets no new window until
//! its pump has written it down (bridge.rs). A slow reader slows its own channel's writer
//! and nothing else; memory per channel is bounded.

pub mod access;
pub mod bridge;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod session;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

pub use metrics::Metrics;
pub use server::{GatewayError, SshGateway, Stop, Wake, WakeOutcome};

/// Everything the gateway is told.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Listeners.
    pub listen: Vec<SocketAddr>,
    /// Where the host key and user CA are kept.
    pub state_dir: PathBuf,
    /// The user logged in as on VMs.
    pub login_user: String,
    /// A static key to log in to VMs with instead of certificates.
    pub static_key: Option<PathBuf>,
    /// Host CAs (OpenSSH public key lines) whose host certificates for a VM id are trusted.
    pub host_cas: Vec<String>,
    /// The only addresses ever dialled.
    pub vm_prefixes: Vec<IpNet>,
    /// sshd's port in VMs.
    pub vm_port: u16,
    /// TCP connect, handshake and login to a VM.
    pub connect_timeout: Duration,
    /// How long a session waits for a paused VM to run.
    pub wake_timeout: Duration,
    /// Lifetime of a login certificate.
    pub cert_lifetime: Duration,
    /// Authentication must succeed within this long after connecting.
    pub login_grace: Duration,
    /// A session with no channel data either way for this long is closed (0: never).
    pub idle_timeout: Duration,
    /// Keepalive interval on both sides (three missed: the connection is dropped).
    pub keepalive_interval: Duration,
    /// Authentication attempts per connection.
    pub max_auth_attempts: usize,
    /// Authentication failures per source address per minute before it is refused (0: no
    /// limit).
    pub auth_failures_per_minute: u32,
    /// Concurrent sessions per user.
    pub max_sessions_per_user: usize,
    /// Every refusal takes this long, whatever was refused.
    pub auth_rejection_time: Duration,
    /// How long sessions may run on after a graceful stop.
    pub grace_period: Duration,
}

impl SshSettings {
    /// Defaults for `state_dir`, with no listeners and no VM prefixes.
    pub fn new(state_dir: PathBuf) -> SshSettings {
        SshSettings {
            listen: Vec::new(),
            state_dir,
            login_user: "root".into(),
            static_key: None,
            host_cas: Vec::new(),
            vm_prefixes: Vec::new(),
            vm_port: 22,
            connect_timeout: Duration::from_secs(10),
            wake_timeout: Duration::from_secs(30),
            cert_lifetime: Duration::from_secs(300),
            login_grace: Duration::from_secs(60),
            idle_timeout: Duration::ZERO,
            keepalive_interval: Duration::from_secs(30),
            max_auth_attempts: 6,
            auth_failures_per_minute: 30,
            max_sessions_per_user: 100,
            auth_rejection_time: Duration::from_millis(200),
            grace_period: Duration::from_secs(30),
        }
    }
}
