//! `vmedge ssh-gateway`: the SSH gateway alone, and `vmedge ssh-gateway ca`. `vmedge up`
//! starts it through [`start_gateway`] too.
//!
//! SIGTERM stops accepting and lets open sessions finish within `[ssh] grace_period`;
//! SIGINT disconnects everyone at once.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::time::Instant;
use vmedge_edge::wake::WakeError;
use vmedge_edge::{WakeHook, Waker};
use vmedge_model::VmId;
use vmedge_registry::Registry;
use vmedge_ssh_gateway::{Metrics, SshGateway, SshSettings, Stop, Wake, WakeOutcome};

use crate::admin::{self, Admin};
use crate::config::Config;

/// The gateway's settings from the config.
pub fn ssh_settings(config: &Config) -> SshSettings {
    let c = &config.ssh;
    let mut s = SshSettings::new(config.state_dir.clone());
    s.listen = c.listen.clone();
    s.login_user = c.login_user.clone();
    s.static_key = c.static_key.clone();
    s.host_cas = c.host_ca.clone();
    s.vm_prefixes = config.vm_prefixes.clone();
    s.vm_port = c.vm_port;
    s.connect_timeout = c.connect_timeout;
    s.wake_timeout = c.wake_timeout;
    s.idle_timeout = c.idle_timeout;
    s.keepalive_interval = c.keepalive_interval;
    s.max_auth_attempts = c.max_auth_attempts;
    s.auth_failures_per_minute = c.auth_failures_per_minute;
    s.max_sessions_per_user = c.max_sessions_per_user;
    s.grace_period = c.grace_period;
    s
}

/// The edge's waker as the gateway's [`Wake`]: one hook call per VM for both.
pub struct EdgeWake(pub Arc<Waker>);

impl Wake for EdgeWake {
    fn wake_and_wait(
        &self,
        vm: VmId,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = WakeOutcome> + Send + '_>> {
        Box::pin(async move {
            match self.0.wait_running(vm, self.0.can_wake(), deadline).await {
                Ok(()) => WakeOutcome::Running,
                Err(WakeError::Timeout) => WakeOutcome::Timeout,
                Err(WakeError::Unavailable(status)) => WakeOutcome::Unavailable(status),
                Err(WakeError::Gone) => WakeOutcome::Gone,
            }
        })
    }
}

/// A waker of the gateway's own (when no edge runs in this process); its hook calls are
/// counted as `vmedge_edge_wake_calls` on the gateway's admin port.
pub fn own_waker(
    config: &Config,
    registry: Arc<dyn Registry>,
    metrics: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Arc<Waker>> {
    let hook = config
        .wake_url
        .as_deref()
        .map(WakeHook::parse)
        .transpose()?;
    Ok(Arc::new(Waker::new(
        hook,
        registry,
        config.ssh.wake_timeout,
        vmedge_edge::Metrics::register(metrics),
    )))
}

/// Builds the gateway (keys loaded or made, listeners bound) and serves it until `stop`
/// says otherwise. Call inside the runtime.
pub fn start_gateway(
    settings: &SshSettings,
    registry: Arc<dyn Registry>,
    metrics: Arc<Metrics>,
    waker: Arc<dyn Wake>,
    stop: watch::Receiver<Stop>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("state_dir {}: cannot create", settings.state_dir.display()))?;
    let gateway = SshGateway::build(settings, registry, metrics, waker)?;
    tracing::info!(listen = ?gateway.local_addrs(), "ssh gateway serving");
    Ok(tokio::spawn(gateway.run(stop)))
}

/// Runs until SIGTERM (graceful) or SIGINT (now).
pub fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(config_path)?;
    let Some(registry) = super::open_registry(&config)? else {
        return Ok(ExitCode::FAILURE);
    };
    super::runtime()?.block_on(async {
        let signal = stop_signal()?;
        let _watch = registry.watch()?;
        let shared: Arc<dyn Registry> = registry.registry();
        let mut metrics = prometheus_client::registry::Registry::default();
        let ssh_metrics = Metrics::register(&mut metrics);
        let waker = own_waker(&config, shared.clone(), &mut metrics)?;
        let (admin, listener) = Admin::listen(
            metrics,
            shared.clone(),
            config.ssh.admin,
            "[ssh] admin",
            Vec::new(),
        )
        .await?;
        let (stop, stopped) = watch::channel(Stop::Running);
        let gateway = start_gateway(
            &ssh_settings(&config),
            shared,
            ssh_metrics,
            Arc::new(EdgeWake(waker)),
            stopped,
        )?;
        let (admin_stop, admin_stopped) = watch::channel(false);
        let admin_task = tokio::spawn(admin::serve(listener, admin, super::stopped(admin_stopped)));
        let how = signal.await;
        tracing::info!(?how, "ssh gateway stopping");
        let _ = stop.send(how);
        let _ = gateway.await;
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `vmedge ssh-gateway ca`: the user CA's public key and the lines a VM image needs.
pub fn ca(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(config_path)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir {}: cannot create", config.state_dir.display()))?;
    let key = vmedge_ssh_gateway::keys::load_or_create(
        &config
            .state_dir
            .join(vmedge_ssh_gateway::server::USER_CA_FILE),
    )?;
    let ca = vmedge_ssh_gateway::keys::UserCa::new(key);
    print!("{}", ca.image_instructions()?);
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM: graceful; SIGINT: now. Registered at once.
fn stop_signal() -> anyhow::Result<impl Future<Output = Stop>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Stop::Graceful,
            _ = int.recv() => Stop::Now,
        }
    })
}
