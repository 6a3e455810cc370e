//! The DNS gate run the way `vmedge worker` runs it, but in this process: a runtime whose
//! threads all live in the worker's namespace, so its listeners, upstream sockets and
//! netlink socket are the worker's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::registry::Registry as Prometheus;
use vmedge_dns::{follow_registry, serve, Gate, GateConfig, Listeners, Metrics, NetlinkSets};
use vmedge_registry::Registry;

type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// A gate serving in a namespace until dropped.
pub struct GateInNetns {
    metrics_text: MetricsText,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GateInNetns {
    /// Starts the gate in namespace `ns` on `listen`, following `registry`, filling the
    /// namespace's fqdn sets over netlink.
    pub fn start(
        ns: &str,
        listen: SocketAddr,
        config: GateConfig,
        registry: Arc<dyn Registry>,
    ) -> GateInNetns {
        let ns = ns.to_string();
        let (ready, ready_rx) = std::sync::mpsc::channel::<MetricsText>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            crate::enter_netns(&ns);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut prometheus = Prometheus::default();
                let metrics = Metrics::register(&mut prometheus);
                let sets = NetlinkSets::start(None).expect("netlink");
                let gate = Arc::new(Gate::new(config, Arc::new(sets), metrics.clone()));
                let listeners = Listeners::bind(&[listen]).expect("gate listen");
                let prometheus = Arc::new(prometheus);
                let _ = ready.send(Arc::new(move || {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &prometheus);
                    out
                }));
                let (stop_all, _) = tokio::sync::broadcast::channel::<()>(1);
                let wait = |mut rx: tokio::sync::broadcast::Receiver<()>| async move {
                    let _ = rx.recv().await;
                };
                let follow = tokio::spawn(follow_registry(
                    gate.clone(),
                    registry,
                    wait(stop_all.subscribe()),
                ));
                let server = tokio::spawn(serve(
                    gate,
                    metrics,
                    listeners,
                    vmedge_dns::ServerConfig::default(),
                    wait(stop_all.subscribe()),
                ));
                let _ = stopped.await;
                let _ = stop_all.send(());
                let _ = follow.await;
                let _ = server.await;
            });
        });
        let metrics_text = ready_rx.recv().expect("the gate did not start");
        GateInNetns {
            metrics_text,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The gate's metrics, in Prometheus text.
    pub fn metrics(&self) -> String {
        (self.metrics_text)()
    }
}

impl Drop for GateInNetns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The value of an unlabelled metric (or a full `name{labels}`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
