//! The edge as one pingora `Server`: the proxy service on every listener, a maintenance
//! task (certificate reload, activity pruning), and stop / upgrade driven by the caller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::sync::watch;
use vmedge_registry::Registry;

use crate::activity::Activity;
use crate::direct::Direct;
use crate::idle::{ClientTimeouts, FirstBytes, IdleFirst};
use crate::ids::RequestIds;
use crate::metrics::Metrics;
use crate::proxy::EdgeProxy;
use crate::tls::{CertStore, TlsError};
use crate::wake::{WakeHook, WakeUrlError, Waker};
use crate::EdgeSettings;

/// How often the certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(2);

/// How the edge should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop accepting; let open requests finish within the grace period.
    Graceful,
    /// Stop now.
    Fast,
    /// Hand the listening sockets to a new edge started with `upgrade`, then stop
    /// gracefully.
    Upgrade,
}

/// Tells a running edge to stop.
#[derive(Debug, Clone)]
pub struct StopSender(Arc<watch::Sender<Option<Stop>>>);

impl StopSender {
    /// Asks the edge to stop; the first request wins.
    pub fn stop(&self, how: Stop) {
        self.0.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(how);
                true
            } else {
                false
            }
        });
    }
}

struct StopWatch(watch::Receiver<Option<Stop>>);

#[async_trait]
impl ShutdownSignalWatch for StopWatch {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        let how = rx.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        match how {
            Some(Stop::Graceful) => ShutdownSignal::GracefulTerminate,
            Some(Stop::Upgrade) => ShutdownSignal::GracefulUpgrade,
            Some(Stop::Fast) | None => ShutdownSignal::FastShutdown,
        }
    }
}

/// Why the edge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The wake hook URL.
    #[error(transparent)]
    WakeUrl(#[from] WakeUrlError),
    /// pingora refused a setting.
    #[error("{what}: {error}")]
    Pingora {
        /// What was being set up.
        what: String,
        /// pingora's error.
        error: Box<pingora::Error>,
    },
}

/// A built edge, ready to [`run`](EdgeServer::run).
pub struct EdgeServer {
    server: Server,
    stop: watch::Receiver<Option<Stop>>,
    /// Per-VM activity, for `/activity`.
    pub activity: Arc<Activity>,
    /// The wake hook caller; the SSH gateway of the same process shares it, so a VM gets
    /// one hook call however many requests and sessions wait for it.
    pub waker: Arc<Waker>,
    /// The certificate in force (TLS listeners only).
    pub certs: Option<Arc<CertStore>>,
}

impl EdgeServer {
    /// Builds the edge; nothing listens until [`run`](EdgeServer::run). With
    /// `settings.upgrade`, this takes the listening sockets of the running edge (which
    /// must then be told [`Stop::Upgrade`]).
    pub fn build(
        settings: EdgeSettings,
        registry: Arc<dyn Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<(EdgeServer, StopSender), EdgeError> {
        let hook = settings
            .wake_url
            .as_deref()
            .map(WakeHook::parse)
            .transpose()?;
        let certs = if settings.https.is_empty() {
            None
        } else {
            Some(CertStore::open(settings.cert.clone())?)
        };
        let conf = server_conf(&settings);
        let opt = Opt {
            upgrade: settings.upgrade,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();
        let conf = server.configuration.clone();

        let activity = Arc::new(Activity::default());
        let waker = Arc::new(Waker::new(
            hook,
            registry.clone(),
            settings.wake_timeout,
            metrics.clone(),
        ));
        let settings = Arc::new(settings);
        let ids = Arc::new(RequestIds::new());
        let timeouts = ClientTimeouts {
            idle: settings.idle_timeout,
            read: settings.client_timeout,
            header: settings.header_timeout,
        };
        let direct = Arc::new(Direct::new(
            settings.clone(),
            registry.clone(),
            activity.clone(),
            metrics.clone(),
            ids.clone(),
            timeouts,
        ));
        let proxy = EdgeProxy::new(
            settings.clone(),
            registry.clone(),
            waker.clone(),
            activity.clone(),
            metrics.clone(),
            ids,
        );
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        let mut proxy = pingora::proxy::http_proxy(&conf, proxy);
        proxy.server_options = Some(options);
        let mut service = Service::new(
            "vmedge edge".to_string(),
            FirstBytes::new(
                IdleFirst::new(proxy, timeouts)
                    .with_direct(direct.clone())
                    .with_parking(metrics.clone()),
                timeouts.idle,
                metrics.clone(),
            ),
        );
        for addr in &settings.http {
            service.add_listener(
                ListenerConfig::tcp(addr.to_string())
                    .tcp_socket_options(socket_options(addr))
                    .l4_buffer(l4_buffer(&settings)),
            );
        }
        if let Some(certs) = &certs {
            for addr in &settings.https {
                let mut tls =
                    TlsSettings::intermediate("", "").map_err(|error| EdgeError::Pingora {
                        what: format!("TLS listener {addr}"),
                        error,
                    })?;
                tls.set_cert_resolver(certs.clone());
                tls.enable_h2();
                service.add_listener(
                    ListenerConfig::tcp(addr.to_string())
                        .tcp_socket_options(socket_options(addr))
                        .tls(tls)
                        .l4_buffer(l4_buffer(&settings)),
                );
            }
        }
        server.add_service(service);
        server.add_service(background_service(
            "edge maintenance",
            Maintenance {
                certs: certs.clone(),
                activity: activity.clone(),
                direct,
                registry,
                metrics,
            },
        ));
        let (tx, rx) = watch::channel(None);
        Ok((
            EdgeServer {
                server,
                stop: rx,
                activity,
                waker,
                certs,
            },
            StopSender(Arc::new(tx)),
        ))
    }

    /// Serves until stopped through the [`StopSender`]; blocks the calling thread (pingora
    /// runs its own runtimes).
    pub fn run(self) {
        self.server.run(RunArgs {
            shutdown_signal: Box::new(StopWatch(self.stop)),
        });
    }
}

fn server_conf(settings: &EdgeSettings) -> ServerConf {
    let threads = if settings.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        settings.threads
    };
    let dir = &settings.state_dir;
    ServerConf {
        threads,
        pid_file: dir.join("edge.pid").to_string_lossy().into_owned(),
        upgrade_sock: dir.join("edge-upgrade.sock").to_string_lossy().into_owned(),
        grace_period_seconds: Some(settings.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    }
}

/// `[::]:port` listens on IPv6 only, so `0.0.0.0:port` can listen beside it.
fn socket_options(addr: &SocketAddr) -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    if addr.is_ipv6() {
        options.ipv6_only = Some(true);
    }
    options
}

/// Each client connection's read buffer (see [`EdgeSettings::client_read_buffer`]).
fn l4_buffer(settings: &EdgeSettings) -> L4BufferSettings {
    L4BufferSettings {
        read: Some(settings.client_read_buffer),
        write: None,
    }
}

/// Certificate reloads, forgetting the activity of VMs that left, and closing kept
/// connections to VMs that are no longer usable.
struct Maintenance {
    certs: Option<Arc<CertStore>>,
    activity: Arc<Activity>,
    direct: Arc<Direct>,
    registry: Arc<dyn Registry>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.registry.subscribe();
        let mut poll = tokio::time::interval(CERT_POLL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = changes.borrow_and_update().clone();
                    self.activity.retain(|id| snapshot.vm(id).is_some());
                }
                _ = poll.tick() => {
                    self.direct.sweep();
                    let Some(certs) = &self.certs else { continue };
                    match certs.reload_if_changed() {
                        Ok(false) => {}
                        Ok(true) => {
                            tracing::info!("edge certificate reloaded");
                            self.metrics.tls_reload("ok");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "edge certificate not reloaded; the last good one keeps serving");
                            self.metrics.tls_reload("refused");
                        }
                    }
                }
            }
        }
    }
}
