//! `vmedge edge`: the HTTP(S) edge alone. `vmedge up` starts it through [`start_edge`] too.
//!
//! pingora runs its own runtimes on a thread of its own; this process's tokio runtime
//! keeps the registry, the admin endpoint and the signals. SIGTERM stops gracefully (open
//! requests get `[edge] grace_period`), SIGINT at once, and SIGQUIT hands the listening
//! sockets to a new `vmedge edge --upgrade` started beforehand (zero-downtime upgrade).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use vmedge_edge::{
    Activity, CertSource, EdgeServer, EdgeSettings, Metrics, RateLimit, Stop, StopSender,
};
use vmedge_registry::Registry;

use crate::admin::{self, Admin, Page};
use crate::config::Config;

/// The edge's settings from the config.
pub fn edge_settings(config: &Config, upgrade: bool) -> EdgeSettings {
    let mut s = EdgeSettings::new(config.domain.as_str(), config.state_dir.clone());
    s.vm_prefixes = config.vm_prefixes.clone();
    s.http = config.edge.http.clone();
    s.https = config.edge.https.clone();
    if let (Some(cert), Some(key)) = (&config.edge.tls_cert, &config.edge.tls_key) {
        s.cert = CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
    }
    s.wake_url = config.wake_url.clone();
    s.wake_timeout = config.edge.wake_timeout;
    s.connect_timeout = config.edge.connect_timeout;
    s.upstream_timeout = config.edge.upstream_timeout;
    s.idle_timeout = config.edge.idle_timeout;
    s.client_timeout = config.edge.client_timeout;
    s.header_timeout = config.edge.header_timeout;
    s.rate_limit = RateLimit::per_second_burst_twice(config.edge.rate_limit);
    s.threads = config.edge.threads;
    s.max_header_bytes = config.edge.max_header_bytes;
    s.h2_streams_per_connection = config.edge.h2_streams_per_connection;
    s.grace_period = config.edge.grace_period;
    s.upgrade = upgrade;
    s
}

/// A running edge.
pub struct RunningEdge {
    /// Tells it to stop.
    pub stop: StopSender,
    /// Per-VM activity, for `/activity`.
    pub activity: Arc<Activity>,
    /// The wake hook caller (shared with the SSH gateway in `vmedge up`).
    pub waker: Arc<vmedge_edge::Waker>,
    thread: std::thread::JoinHandle<()>,
}

impl RunningEdge {
    /// Stops it and waits until its runtimes are gone.
    pub fn stop_and_join(self, how: Stop) {
        self.stop.stop(how);
        let _ = self.thread.join();
    }
}

/// Checks that every listener can bind (pingora itself cannot report it to us), builds
/// the edge and starts it on its own thread. Call outside the tokio runtime.
pub fn start_edge(
    settings: EdgeSettings,
    registry: Arc<dyn Registry>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<RunningEdge> {
    if !settings.upgrade {
        check_bind(&settings.http, "[edge] http")?;
        check_bind(&settings.https, "[edge] https")?;
    }
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("state_dir {}: cannot create", settings.state_dir.display()))?;
    let served = metrics.clone();
    crate::memory::trim_after_work(move || served.work_done())
        .context("cannot start the heap trim thread")?;
    let (server, stop) = EdgeServer::build(settings, registry, metrics)?;
    let activity = server.activity.clone();
    let waker = server.waker.clone();
    let thread = std::thread::Builder::new()
        .name("edge".into())
        .spawn(move || server.run())
        .context("cannot start the edge thread")?;
    Ok(RunningEdge {
        stop,
        activity,
        waker,
        thread,
    })
}

fn check_bind(addrs: &[SocketAddr], key: &str) -> anyhow::Result<()> {
    for addr in addrs {
        let socket = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("{key} {addr}: cannot listen: {e}"))?;
        drop(socket);
    }
    Ok(())
}

/// `/activity`: last network activity per VM, as JSON.
pub fn activity_page(activity: Arc<Activity>) -> Page {
    Page {
        path: "/activity",
        content_type: "application/json",
        render: Box::new(move || activity.to_json()),
    }
}

/// Binds the admin endpoint; during an upgrade the old edge still holds the port for a
/// moment, so it is retried for up to 30 s.
async fn listen_admin(
    metrics: prometheus_client::registry::Registry,
    registry: Arc<dyn Registry>,
    config: &Config,
    pages: Vec<Page>,
    upgrade: bool,
) -> anyhow::Result<(Arc<Admin>, tokio::net::TcpListener)> {
    if upgrade {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpListener::bind(config.edge.admin)
            .await
            .is_err()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Admin::listen(metrics, registry, config.edge.admin, "[edge] admin", pages).await
}

/// Runs until a signal (see the module doc).
pub fn run(config_path: Option<&Path>, upgrade: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(config_path)?;
    let Some(registry) = super::open_registry(&config)? else {
        return Ok(ExitCode::FAILURE);
    };
    let mut metrics = prometheus_client::registry::Registry::default();
    let edge_metrics = Metrics::register(&mut metrics);
    let shared: Arc<dyn Registry> = registry.registry();
    let edge = start_edge(
        edge_settings(&config, upgrade),
        shared.clone(),
        edge_metrics,
    )?;
    let pages = vec![activity_page(edge.activity.clone())];
    let how = super::runtime()?.block_on(async {
        let signal = stop_signal()?;
        let _watch = registry.watch()?;
        let (admin, listener) = listen_admin(metrics, shared, &config, pages, upgrade).await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(listener, admin, super::stopped(stopped)));
        tracing::info!(
            http = ?config.edge.http,
            https = ?config.edge.https,
            admin = %config.edge.admin,
            upgrade,
            "edge serving"
        );
        let how = signal.await;
        tracing::info!(?how, "edge stopping");
        let _ = stop.send(true);
        let _ = admin_task.await;
        anyhow::Ok(how)
    })?;
    edge.stop_and_join(how);
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM: graceful; SIGINT: now; SIGQUIT: hand the sockets over. Registered at once.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = Stop>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot handle SIGQUIT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Stop::Graceful,
            _ = int.recv() => Stop::Fast,
            _ = quit.recv() => Stop::Upgrade,
        }
    })
}
