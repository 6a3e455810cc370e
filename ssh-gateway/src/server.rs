//! Listeners, connections and their limits, and shutdown.
//!
//! Each accepted TCP connection is one russh server session ([`UserConnection`]) in a task
//! of its own, watched for: the login grace (authenticate within it), the idle timeout
//! (no channel data either way), and shutdown. A graceful stop stops accepting, lets
//! sessions finish until the grace period ends, then disconnects the rest.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PublicKey;
use russh::server::{self, run_stream};
use russh::{Disconnect, MethodKind, MethodSet, Preferred, SshId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;
use vmedge_model::{RateLimit, TokenBucket, Vm, VmId, VmStatus};
use vmedge_registry::Registry;

use crate::keys::{self, KeyError, UserCa, USER_KEY_ALGORITHMS};
use crate::metrics::Metrics;
use crate::session::{unavailable_line, ConnectionState, Link, UserConnection};
use crate::upstream::{Login, UpstreamConfig};
use crate::SshSettings;

/// Host key file in the state directory.
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// User CA key file in the state directory.
pub const USER_CA_FILE: &str = "ssh_user_ca_key";

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A key file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A configured host CA is not an OpenSSH public key.
    #[error("[ssh] host_ca[{index}]: not an OpenSSH public key: {reason}")]
    HostCa {
        /// Position in the list.
        index: usize,
        /// What was wrong.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("[ssh] listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How a VM's wait for `running` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeOutcome {
    /// It runs.
    Running,
    /// Not running in time.
    Timeout,
    /// It turned stopped, deleting or error.
    Unavailable(VmStatus),
    /// It left the state.
    Gone,
}

/// Wakes paused VMs: the same wake hook, and the same one-call-per-VM rule, as the edge.
pub trait Wake: Send + Sync + 'static {
    /// Asks for `vm` to run (one hook call per VM however many wait) and waits until it
    /// does, up to `deadline`.
    fn wake_and_wait(
        &self,
        vm: VmId,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = WakeOutcome> + Send + '_>>;
}

/// Open sessions per user, capped.
pub(crate) struct SessionCounts {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl SessionCounts {
    /// Counts a session for `user` unless they are at the cap.
    pub(crate) fn try_add(&self, user: &str) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        let n = open.entry(user.to_string()).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, user: &str) {
        if let Ok(mut open) = self.open.lock() {
            if let Some(n) = open.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(user);
                }
            }
        }
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) upstream: UpstreamConfig,
    pub(crate) sessions: SessionCounts,
    waker: Arc<dyn Wake>,
    wake_timeout: Duration,
    failures_per_source: Option<RateLimit>,
    failures: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl Shared {
    /// Counts an authentication failure against the source address.
    pub(crate) fn auth_failed(&self, source: IpAddr) {
        let Some(limit) = self.failures_per_source else {
            return;
        };
        if let Ok(mut failures) = self.failures.lock() {
            if failures.len() > 10_000 {
                failures.retain(|_, bucket| !bucket.is_full());
            }
            failures
                .entry(source)
                .or_insert_with(|| TokenBucket::new(limit))
                .take();
        }
    }

    /// Whether the source address has used up its authentication failures.
    fn source_blocked(&self, source: IpAddr) -> bool {
        self.failures
            .lock()
            .map(|f| f.get(&source).is_some_and(|b| !b.has_token()))
            .unwrap_or(false)
    }

    /// The VM once it runs; else the line that tells the user why not.
    pub(crate) async fn wait_running(&self, id: &VmId) -> Result<Vm, String> {
        let vm = self.registry.load().vm(id).cloned();
        let vm = match vm {
            None => return Err(format!("vmedge: VM {id} no longer exists")),
            Some(vm) if vm.status.is_running() => return Ok(vm),
            Some(vm) if vm.status.is_unavailable() => return Err(unavailable_line(id, &vm.status)),
            Some(vm) => vm,
        };
        tracing::info!(status = %vm.status, "waiting for the VM to run");
        let deadline = Instant::now() + self.wake_timeout;
        match self.waker.wake_and_wait(*id, deadline).await {
            WakeOutcome::Running => self
                .registry
                .load()
                .vm(id)
                .cloned()
                .ok_or_else(|| format!("vmedge: VM {id} no longer exists")),
            WakeOutcome::Timeout => Err(format!(
                "vmedge: VM {id} did not start within {}s",
                self.wake_timeout.as_secs()
            )),
            WakeOutcome::Unavailable(status) => Err(unavailable_line(id, &status)),
            WakeOutcome::Gone => Err(format!("vmedge: VM {id} no longer exists")),
        }
    }
}

/// How the gateway is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Serving.
    Running,
    /// Stop accepting; sessions may finish within the grace period.
    Graceful,
    /// Disconnect everyone now.
    Now,
}

/// The SSH gateway, bound and ready to serve.
pub struct SshGateway {
    shared: Arc<Shared>,
    config: Arc<server::Config>,
    listeners: Vec<TcpListener>,
    login_grace: Duration,
    idle_timeout: Option<Duration>,
    grace_period: Duration,
    user_ca: Arc<UserCa>,
}

impl SshGateway {
    /// Loads (or makes) the host key and user CA in the state directory, and binds the
    /// listeners. Must run inside a tokio runtime.
    pub fn build(
        settings: &SshSettings,
        registry: Arc<dyn Registry>,
        metrics: Arc<Metrics>,
        waker: Arc<dyn Wake>,
    ) -> Result<SshGateway, GatewayError> {
        let host_key = keys::load_or_create(&settings.state_dir.join(HOST_KEY_FILE))?;
        let user_ca = Arc::new(UserCa::new(keys::load_or_create(
            &settings.state_dir.join(USER_CA_FILE),
        )?));
        let login = match &settings.static_key {
            Some(path) => Login::StaticKey(Arc::new(keys::load(path)?)),
            None => Login::Certificate(user_ca.clone()),
        };
        let host_cas = settings
            .host_cas
            .iter()
            .enumerate()
            .map(|(index, text)| {
                PublicKey::from_openssh(text).map_err(|e| GatewayError::HostCa {
                    index,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut client = russh::client::Config {
            client_id: SshId::Standard(Cow::Borrowed("SSH-2.0-vmedge")),
            keepalive_interval: Some(settings.keepalive_interval),
            keepalive_max: 3,
            channel_buffer_size: CHANNEL_QUEUE,
            window_size: crate::bridge::VM_WINDOW,
            nodelay: true,
            ..Default::default()
        };
        if !host_cas.is_empty() {
            // Ask for host certificates first; a VM with only a plain key still answers.
            client.preferred.host_key_certificates = Preferred::DEFAULT.key.clone();
        }
        let upstream = UpstreamConfig {
            login_user: settings.login_user.clone(),
            login,
            host_cas,
            vm_prefixes: settings.vm_prefixes.clone(),
            connect_timeout: settings.connect_timeout,
            cert_lifetime: settings.cert_lifetime,
            port: settings.vm_port,
            client: Arc::new(client),
        };

        let config = server::Config {
            server_id: SshId::Standard(Cow::Borrowed("SSH-2.0-vmedge")),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: settings.auth_rejection_time,
            // OpenSSH clients start with a "none" probe; refusing it at once tells nothing.
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            max_auth_attempts: settings.max_auth_attempts,
            preferred: Preferred {
                key: Cow::Borrowed(USER_KEY_ALGORITHMS),
                ..Preferred::DEFAULT
            },
            channel_buffer_size: CHANNEL_QUEUE,
            window_size: crate::bridge::USER_WINDOW,
            // The idle timeout is kept here, on channel data: keepalives do not count.
            inactivity_timeout: None,
            keepalive_interval: Some(settings.keepalive_interval),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };

        let listeners = settings
            .listen
            .iter()
            .map(|addr| {
                bind(*addr).map_err(|source| GatewayError::Bind {
                    addr: *addr,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let shared = Arc::new(Shared {
            registry,
            metrics,
            upstream,
            sessions: SessionCounts {
                max: settings.max_sessions_per_user.max(1),
                open: Mutex::new(HashMap::new()),
            },
            waker,
            wake_timeout: settings.wake_timeout,
            failures_per_source: (settings.auth_failures_per_minute > 0).then(|| RateLimit {
                per_second: f64::from(settings.auth_failures_per_minute) / 60.0,
                burst: f64::from(settings.auth_failures_per_minute),
            }),
            failures: Mutex::new(HashMap::new()),
        });
        Ok(SshGateway {
            shared,
            config: Arc::new(config),
            listeners,
            login_grace: settings.login_grace,
            idle_timeout: (!settings.idle_timeout.is_zero()).then_some(settings.idle_timeout),
            grace_period: settings.grace_period,
            user_ca,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The user CA VM images trust.
    pub fn user_ca(&self) -> &UserCa {
        &self.user_ca
    }

    /// Serves until `stop` says otherwise.
    pub async fn run(self, mut stop: watch::Receiver<Stop>) {
        let tracker = Arc::new(Tracker::default());
        let (now_tx, now_rx) = watch::channel(false);
        let ids = Arc::new(AtomicU64::new(1));
        let prefix: u32 = rand::random();
        let mut accepting = Vec::new();
        for listener in self.listeners {
            let (shared, config, tracker, now_rx, ids) = (
                self.shared.clone(),
                self.config.clone(),
                tracker.clone(),
                now_rx.clone(),
                ids.clone(),
            );
            let limits = ConnectionLimits {
                login_grace: self.login_grace,
                idle_timeout: self.idle_timeout,
            };
            accepting.push(tokio::spawn(async move {
                loop {
                    let (tcp, peer) = match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // EMFILE and the like: back off rather than spin.
                            tracing::warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    shared.metrics.connection();
                    if shared.source_blocked(peer.ip()) {
                        shared.metrics.refused("auth_failures");
                        tracing::info!(%peer, "refused: too many authentication failures from this address");
                        continue;
                    }
                    let id = format!("{prefix:08x}{:06x}", ids.fetch_add(1, Ordering::Relaxed));
                    let span = tracing::info_span!("ssh", session = %id, %peer);
                    let guard = tracker.enter();
                    tokio::spawn(
                        serve(shared.clone(), config.clone(), tcp, peer, id, limits, now_rx.clone(), guard)
                            .instrument(span),
                    );
                }
            }));
        }

        loop {
            if stop.changed().await.is_err() || *stop.borrow() != Stop::Running {
                break;
            }
        }
        for task in &accepting {
            task.abort();
        }
        if *stop.borrow() != Stop::Now {
            let open = tracker.open();
            if open > 0 {
                tracing::info!(open, grace = ?self.grace_period, "stopped accepting; waiting for sessions to finish");
            }
            let deadline = Instant::now() + self.grace_period;
            let now_requested =
                async { while stop.changed().await.is_ok() && *stop.borrow() != Stop::Now {} };
            tokio::select! {
                _ = tracker.idle() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = now_requested => {}
            }
        }
        let _ = now_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.idle()).await;
    }
}

/// Messages russh queues per channel and direction before the bridge's spool takes them.
const CHANNEL_QUEUE: usize = 32;

#[derive(Clone, Copy)]
struct ConnectionLimits {
    login_grace: Duration,
    idle_timeout: Option<Duration>,
}

/// One user connection, start to end.
#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: Arc<Shared>,
    config: Arc<server::Config>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: String,
    limits: ConnectionLimits,
    mut now: watch::Receiver<bool>,
    _open: TrackerGuard,
) {
    let state = Arc::new(ConnectionState::default());
    let handler = UserConnection::new(shared.clone(), peer, id, state.clone());
    let started = Instant::now();
    let session =
        match tokio::time::timeout(limits.login_grace, run_stream(config, tcp, handler)).await {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => return tracing::debug!("handshake failed: {e}"),
            Err(_) => return tracing::debug!("no SSH version line within the login grace"),
        };
    let handle = session.handle();
    tokio::pin!(session);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let authenticated =
        |state: &ConnectionState| state.grant.lock().map(|g| g.is_some()).unwrap_or(false);
    let mut reason: Option<&str> = None;
    loop {
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    tracing::debug!("session ended: {e}");
                }
                break;
            }
            _ = now.changed() => reason = Some("the gateway is shutting down"),
            _ = tick.tick() => {
                if !authenticated(&state) && started.elapsed() > limits.login_grace {
                    reason = Some("authentication took too long");
                } else if let Some(idle) = limits.idle_timeout {
                    if authenticated(&state) && state.activity.idle() > idle {
                        reason = Some("idle timeout");
                    }
                }
            }
        }
        if let Some(why) = reason.take() {
            tracing::info!("disconnecting: {why}");
            let _ = handle
                .disconnect(
                    Disconnect::ByApplication,
                    format!("vmedge: {why}"),
                    "en".into(),
                )
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
            break;
        }
    }
    let grant = state.grant.lock().ok().and_then(|g| g.clone());
    if let Some(grant) = grant {
        shared.sessions.remove(&grant.user_id);
        shared.metrics.session_closed();
        tracing::info!(vm = %grant.vm, user_id = %grant.user_id, "session closed");
    }
    let link = state
        .link
        .lock()
        .ok()
        .and_then(|l| l.as_ref().map(|l| l.borrow().clone()));
    if let Some(Link::Ready(vm)) = link {
        let _ = vm.disconnect(Disconnect::ByApplication, "", "en").await;
    }
}

/// Binds one listener; `[::]` listens on IPv6 only, so an IPv4 wildcard can sit beside it.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Counts open connections; `idle()` completes when there are none.
#[derive(Default)]
struct Tracker {
    open: AtomicUsize,
    zero: Notify,
}

struct TrackerGuard(Arc<Tracker>);

impl Tracker {
    fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        TrackerGuard(self.clone())
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    async fn idle(&self) {
        loop {
            let notified = self.zero.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}
