//! `vmedge dns`: the DNS gate alone. `vmedge worker` and `vmedge up` start it through
//! [`start_gate`] too.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use vmedge_dns::{
    Gate, GateConfig, Listeners, Metrics, NetlinkSets, RateLimit, ServerConfig, SetWriter,
    UpstreamConfig,
};
use vmedge_registry::Registry;

use crate::admin::{self, Admin};
use crate::config::Config;

/// The gate's settings from the config, for `worker`'s VMs.
pub fn gate_config(config: &Config, worker: &str) -> GateConfig {
    GateConfig {
        worker: worker.to_string(),
        upstream: UpstreamConfig {
            servers: config.dns.upstreams.clone(),
            ..UpstreamConfig::default()
        },
        fqdn_floor: config.dns.fqdn_floor,
        fqdn_grace: config.dns.fqdn_grace,
        rate_limit: RateLimit::per_second_burst_twice(config.dns.rate_limit),
        rebind_allow: config.dns.rebind_allow.clone(),
        ..GateConfig::default()
    }
}

/// The fqdn set writer over this host's nf_tables netlink.
pub fn netlink_sets() -> anyhow::Result<NetlinkSets> {
    NetlinkSets::start(None)
        .context("cannot open nf_tables netlink for the fqdn sets (root or CAP_NET_ADMIN?)")
}

/// Binds the gate's listeners (an error names the config key `what`) and runs it on the
/// registry until `shutdown` completes. Returns the task that serves.
pub fn start_gate(
    gate_config: GateConfig,
    listen: &[SocketAddr],
    what: &str,
    sets: Arc<dyn SetWriter>,
    metrics: Arc<Metrics>,
    registry: Arc<dyn Registry>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listeners = Listeners::bind(listen).with_context(|| format!("{what}: cannot listen"))?;
    let addrs = listeners.local_addrs();
    let gate = Arc::new(Gate::new(gate_config, sets, metrics.clone()));
    let follow =
        vmedge_dns::follow_registry(gate.clone(), registry, super::stopped(stopped.clone()));
    let serve = vmedge_dns::serve(
        gate,
        metrics,
        listeners,
        ServerConfig::default(),
        super::stopped(stopped),
    );
    tracing::info!(listen = ?addrs, "dns gate serving");
    Ok(tokio::spawn(async move {
        let (_, served) = tokio::join!(follow, serve);
        if let Err(e) = served {
            tracing::error!("dns gate stopped: {e}");
        }
    }))
}

/// Runs until SIGINT or SIGTERM.
pub fn run(config_path: Option<&Path>, worker: Option<String>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load_or_default(config_path)?;
    if let Some(worker) = worker {
        config.worker.name = worker;
    }
    let Some(registry) = super::open_registry(&config)? else {
        return Ok(ExitCode::FAILURE);
    };
    super::runtime()?.block_on(async {
        let shutdown = super::shutdown_signal()?;
        let _watch = registry.watch()?;
        let mut metrics = prometheus_client::registry::Registry::default();
        let dns_metrics = Metrics::register(&mut metrics);
        let registry: Arc<dyn Registry> = registry.registry();
        let (admin, listener) = Admin::listen(
            metrics,
            registry.clone(),
            config.dns.admin,
            "[dns] admin",
            Vec::new(),
        )
        .await?;
        let sets = netlink_sets()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let gate = start_gate(
            gate_config(&config, &config.worker.name),
            &config.dns.listen,
            "[dns] listen",
            Arc::new(sets),
            dns_metrics,
            registry,
            stopped.clone(),
        )?;
        let admin_task = tokio::spawn(admin::serve(listener, admin, super::stopped(stopped)));
        tracing::info!(worker = %config.worker.name, admin = %config.dns.admin, "dns gate started");
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
        let _ = gate.await;
        let _ = admin_task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
