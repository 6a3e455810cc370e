//! `vmedge worker --name W`: the worker agent, keeping this host's nftables in step, and
//! the DNS gate at `[worker] dns_gate` port 53 that fills its fqdn sets.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use vmedge_firewall::{CompileOptions, NftBackend};
use vmedge_registry::Registry;
use vmedge_worker::{Metrics, Reconciler};

use crate::admin::{self, Admin, RegistryGauges};
use crate::config::Config;

/// Runs until SIGINT or SIGTERM; the rules stay in the kernel after it stops.
pub fn run(config_path: Option<&Path>, name: Option<String>) -> anyhow::Result<ExitCode> {
    let mut config = match config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
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
        let gauges = RegistryGauges::register(&mut metrics);
        let registry: Arc<dyn Registry> = registry;
        let admin = Arc::new(Admin { metrics, gauges, registry: registry.clone() });
        let listener = tokio::net::TcpListener::bind(config.worker.admin)
            .await
            .with_context(|| format!("[worker] admin {}: cannot listen", config.worker.admin))?;
        tracing::info!(worker = %config.worker.name, %version, admin = %config.worker.admin, "worker agent starting");
        let options = CompileOptions::new(vec![config.worker.dns_gate]);
        let reconciler = Reconciler::new(config.worker.name.clone(), nft, options, worker_metrics);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let sets = vmedge_dns::NetlinkSets::start(None)
            .context("cannot open nf_tables netlink for the fqdn sets (root or CAP_NET_ADMIN?)")?;
        let gate = super::dns::start_gate(
            super::dns::gate_config(&config, &config.worker.name),
            &[SocketAddr::new(config.worker.dns_gate, 53)],
            "[worker] dns_gate",
            Arc::new(sets),
            dns_metrics,
            registry.clone(),
            stopped.clone(),
        )?;
        let admin_task = tokio::spawn(admin::serve(listener, admin, wait(stopped.clone())));
        let agent = tokio::spawn(vmedge_worker::run(reconciler, registry, config.worker.drift_interval, wait(stopped)));
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
