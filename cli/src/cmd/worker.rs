//! `vmedge worker --name W`: the worker agent, keeping this host's nftables in step, and
//! the DNS gate at `[worker] dns_gate` port 53 that fills its fqdn sets.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use vmedge_firewall::{CompileOptions, NftBackend};
use vmedge_registry::Registry;
use vmedge_worker::{Metrics, Reconciler};

use crate::admin::{self, Admin};
use crate::config::Config;

/// Runs until SIGINT or SIGTERM; the rules stay in the kernel after it stops.
pub fn run(config_path: Option<&Path>, name: Option<String>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load_or_default(config_path)?;
    if let Some(name) = name {
        config.worker.name = name;
    }
    let nft = NftBackend::new();
    let version = nft.check_version()?;
    let Some(registry) = super::open_registry(&config)? else {
        return Ok(ExitCode::FAILURE);
    };
    super::runtime()?.block_on(async {
        // Before anything is printed or served: see shutdown_signal.
        let shutdown = super::shutdown_signal()?;
        let _watch = registry.watch()?;
        let mut metrics = prometheus_client::registry::Registry::default();
        let worker_metrics = Metrics::register(&mut metrics);
        let dns_metrics = vmedge_dns::Metrics::register(&mut metrics);
        let registry: Arc<dyn Registry> = registry.registry();
        let (admin, listener) =
            Admin::listen(metrics, registry.clone(), config.worker.admin, "[worker] admin", Vec::new()).await?;
        tracing::info!(worker = %config.worker.name, %version, admin = %config.worker.admin, "worker agent starting");
        let options = CompileOptions::new(vec![config.worker.dns_gate]);
        let reconciler = Reconciler::new(config.worker.name.clone(), nft, options, worker_metrics);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let sets = super::dns::netlink_sets()?;
        let gate = super::dns::start_gate(
            super::dns::gate_config(&config, &config.worker.name),
            &[SocketAddr::new(config.worker.dns_gate, 53)],
            "[worker] dns_gate",
            Arc::new(sets),
            dns_metrics,
            registry.clone(),
            stopped.clone(),
        )?;
        let admin_task = tokio::spawn(admin::serve(listener, admin, super::stopped(stopped.clone())));
        let agent = tokio::spawn(vmedge_worker::run(reconciler, registry, config.worker.drift_interval, super::stopped(stopped)));
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
        let _ = agent.await;
        let _ = gate.await;
        let _ = admin_task.await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
