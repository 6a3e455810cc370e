//! The admin endpoint every server gets: `/metrics` (Prometheus text) and `/healthz`, plus
//! pages of a server's own (the edge's `/activity`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as Metrics;
use tokio::net::TcpListener;
use vmedge_registry::Registry;

/// The registry's own gauges, refreshed at every scrape.
pub struct RegistryGauges {
    generation: Gauge,
    vms: Gauge,
    users: Gauge,
    refusals: Gauge,
    quarantined: Gauge,
    source_up: Gauge,
    resyncs: Gauge,
}

impl RegistryGauges {
    /// Registers `vmedge_registry_*`.
    pub fn register(metrics: &mut Metrics) -> RegistryGauges {
        let g = RegistryGauges {
            generation: Gauge::default(),
            vms: Gauge::default(),
            users: Gauge::default(),
            refusals: Gauge::default(),
            quarantined: Gauge::default(),
            source_up: Gauge::default(),
            resyncs: Gauge::default(),
        };
        let sub = metrics.sub_registry_with_prefix("vmedge_registry");
        sub.register(
            "generation",
            "Generation of the state in force",
            g.generation.clone(),
        );
        sub.register("vms", "VMs in the state in force", g.vms.clone());
        sub.register("users", "Users in the state in force", g.users.clone());
        sub.register(
            "refused_states",
            "States refused since start (the last good one kept serving)",
            g.refusals.clone(),
        );
        sub.register(
            "quarantined_vms",
            "VMs whose object in the state in force is invalid (served as last good, fenced or not at all)",
            g.quarantined.clone(),
        );
        sub.register(
            "source_up",
            "1 while the state source answers (etcd: a member is followed); 0 while the last good state serves without it",
            g.source_up.clone(),
        );
        sub.register(
            "resyncs",
            "Full re-reads of the source after a lost watch",
            g.resyncs.clone(),
        );
        g
    }

    fn refresh(&self, registry: &dyn Registry) {
        let status = registry.status();
        self.generation.set(status.generation as i64);
        self.vms.set(status.vms as i64);
        self.users.set(status.users as i64);
        self.refusals.set(status.refusals as i64);
        self.quarantined.set(status.quarantined.len() as i64);
        self.source_up.set(i64::from(status.source_up()));
        self.resyncs.set(status.resyncs as i64);
    }
}

/// A page of a server's own: `GET path` answers `render()` as `content_type`.
pub struct Page {
    /// The path, e.g. `/activity`.
    pub path: &'static str,
    /// Its content type.
    pub content_type: &'static str,
    /// Makes the body, at each request.
    pub render: Box<dyn Fn() -> String + Send + Sync>,
}

/// What the endpoint serves.
pub struct Admin {
    /// Pages beyond /metrics and /healthz.
    pub pages: Vec<Page>,
    /// Every metric of the process.
    pub metrics: Metrics,
    /// Refreshed before each scrape.
    pub gauges: RegistryGauges,
    /// The state source.
    pub registry: Arc<dyn Registry>,
}

impl Admin {
    /// Registers the registry's gauges beside `metrics` and binds the admin port; an error
    /// names the config key (`[worker] admin`) and the address.
    pub async fn listen(
        mut metrics: Metrics,
        registry: Arc<dyn Registry>,
        addr: std::net::SocketAddr,
        key: &str,
        pages: Vec<Page>,
    ) -> anyhow::Result<(Arc<Admin>, TcpListener)> {
        let gauges = RegistryGauges::register(&mut metrics);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{key} {addr}: cannot listen: {e}"))?;
        let admin = Admin {
            pages,
            metrics,
            gauges,
            registry,
        };
        Ok((Arc::new(admin), listener))
    }
}

/// Serves until `shutdown` completes; each connection on its own task.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(admin.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    admin: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        Ok(response)
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            admin.gauges.refresh(admin.registry.as_ref());
            let mut text = String::new();
            if prometheus_client::encoding::text::encode(&mut text, &admin.metrics).is_err() {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode metrics\n".into(),
                );
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            let status = admin.registry.status();
            let mut body = format!(
                "ok: state generation {} from {}\n",
                status.generation, status.source
            );
            if let Some(error) = &status.source_error {
                // Still serving: a source outage is not the server's failure.
                body.push_str(&format!(
                    "source down, serving the last good state: {error}\n"
                ));
            }
            reply(StatusCode::OK, "text/plain", body)
        }
        path => match admin.pages.iter().find(|p| p.path == path) {
            Some(page) => reply(StatusCode::OK, page.content_type, (page.render)()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics or /healthz\n".into(),
            ),
        },
    }
}
