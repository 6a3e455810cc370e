//! `vmedge up`: everything in one process on loopback, with `examples/` by default.
//!
//! This build runs the registry (loaded, watched, hot-reloaded), the edge on `[edge] http`
//! and `https` (the demo VM is `::1`: a backend on `[::1]:8000` is its `web` service), and
//! the DNS gate on `[dns] listen`, answering the VMs of `[worker] name` by source address
//! (`dig @::1 -p 5353` from this host is the demo VM asking). There is no firewall table
//! on a laptop, so fqdn answers are not enforced here. The SSH gateway listens on `[ssh]
//! listen` (`ssh -p 2222 <vmid>@localhost` reaches a VM whose sshd trusts the gateway CA)
//! and shares the edge's wake hook caller.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use vmedge_model::public_host;
use vmedge_registry::Registry;

use crate::admin::{self, Admin};
use crate::config::Config;

const EXAMPLE_CONFIG: &str = "examples/vmedge.toml";

/// Runs until SIGINT or SIGTERM.
pub fn run(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, origin) = match config_path {
        Some(p) => (Config::load(p)?, p.display().to_string()),
        None if Path::new(EXAMPLE_CONFIG).exists() => (
            Config::load(Path::new(EXAMPLE_CONFIG))?,
            EXAMPLE_CONFIG.to_string(),
        ),
        None => (Config::default(), "built-in defaults".to_string()),
    };

    let Some(registry) = super::open_registry(&config)? else {
        return Ok(ExitCode::FAILURE);
    };

    let shared: Arc<dyn Registry> = registry.registry();
    let mut edge_metrics = prometheus_client::registry::Registry::default();
    let edge = super::edge::start_edge(
        super::edge::edge_settings(&config, false),
        shared.clone(),
        vmedge_edge::Metrics::register(&mut edge_metrics),
    )?;
    let edge_pages = vec![super::edge::activity_page(edge.activity.clone())];

    super::runtime()?.block_on(async {
        // Before anything is printed or served: see shutdown_signal.
        let shutdown = super::shutdown_signal()?;
        let _watch = registry.watch()?;
        let mut metrics = prometheus_client::registry::Registry::default();
        let dns_metrics = vmedge_dns::Metrics::register(&mut metrics);
        let (admin, admin_listener) = Admin::listen(
            metrics,
            shared.clone(),
            config.dns.admin,
            "[dns] admin",
            Vec::new(),
        )
        .await?;
        let (edge_admin, edge_admin_listener) = Admin::listen(
            edge_metrics,
            shared.clone(),
            config.edge.admin,
            "[edge] admin",
            edge_pages,
        )
        .await?;
        let mut ssh_registry = prometheus_client::registry::Registry::default();
        let ssh_metrics = vmedge_ssh_gateway::Metrics::register(&mut ssh_registry);
        let (ssh_admin, ssh_admin_listener) = Admin::listen(
            ssh_registry,
            shared.clone(),
            config.ssh.admin,
            "[ssh] admin",
            Vec::new(),
        )
        .await?;
        let (ssh_stop, ssh_stopped) =
            tokio::sync::watch::channel(vmedge_ssh_gateway::Stop::Running);
        let gateway = super::ssh::start_gateway(
            &super::ssh::ssh_settings(&config),
            shared.clone(),
            ssh_metrics,
            Arc::new(super::ssh::EdgeWake(edge.waker.clone())),
            ssh_stopped,
        )?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let gate = super::dns::start_gate(
            super::dns::gate_config(&config, &config.worker.name),
            &config.dns.listen,
            "[dns] listen",
            Arc::new(vmedge_dns::NoFirewall),
            dns_metrics,
            shared,
            stopped.clone(),
        )?;
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin,
            super::stopped(stopped.clone()),
        ));
        let edge_admin_task = tokio::spawn(admin::serve(
            edge_admin_listener,
            edge_admin,
            super::stopped(stopped.clone()),
        ));
        let ssh_admin_task = tokio::spawn(admin::serve(
            ssh_admin_listener,
            ssh_admin,
            super::stopped(stopped),
        ));
        print_plan(&config, &origin, registry.registry().as_ref());
        shutdown.await;
        tracing::info!("shutting down");
        let _ = ssh_stop.send(vmedge_ssh_gateway::Stop::Now);
        let _ = stop.send(true);
        let _ = gate.await;
        let _ = gateway.await;
        let _ = admin_task.await;
        let _ = edge_admin_task.await;
        let _ = ssh_admin_task.await;
        anyhow::Ok(())
    })?;
    edge.stop_and_join(vmedge_edge::Stop::Fast);
    Ok(ExitCode::SUCCESS)
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_plan(config: &Config, origin: &str, registry: &dyn Registry) {
    let snapshot = registry.load();
    let domain = config.domain.as_str();
    println!("vmedge {} up: config {origin}", env!("CARGO_PKG_VERSION"));
    println!(
        "  state   {} (generation {}: {} VMs, {} users), watched for changes",
        registry.status().source,
        snapshot.generation(),
        snapshot.vms().len(),
        snapshot.users().len()
    );
    println!(
        "  domain  {domain}: services at <service>--<vmid>.proxy.{domain}, SSH at ssh.{domain}"
    );
    let prefixes: Vec<String> = config.vm_prefixes.iter().map(|p| p.to_string()).collect();
    println!("  dials   only {}", prefixes.join(" "));
    println!(
        "  dns     {}  admin {}  (answers the VMs of {} by source address; no firewall here)",
        list(&config.dns.listen),
        config.dns.admin,
        config.worker.name
    );
    println!(
        "  edge    http {}  https {}  admin {} (/metrics /activity /healthz)",
        list(&config.edge.http),
        list(&config.edge.https),
        config.edge.admin
    );
    let demo = snapshot
        .vms()
        .iter()
        .find(|vm| vm.status.is_running() && !vm.services.is_empty());
    if let (Some(vm), Some(http)) = (demo, config.edge.http.first()) {
        let host = public_host(&vm.services[0].name, vm.id, domain);
        println!(
            "  a service of {} ({}): http://{host}:{}/ -> [{}]:{}",
            vm.id,
            vm.status,
            http.port(),
            vm.public_ipv6,
            vm.services[0].port
        );
        println!("    try: curl -H 'Host: {host}' http://{http}/");
    }
    println!(
        "  ssh     {}  admin {}  (ssh -p PORT <vmid>@localhost; `vmedge ssh-gateway ca` for VM images)",
        list(&config.ssh.listen),
        config.ssh.admin
    );
    println!("Ctrl-C stops.");
}
