//! One request through the edge: [`EdgeProxy`] is pingora's `ProxyHttp`.
//!
//! `request_filter` does everything that can refuse a request (host, route, VM status,
//! wake, rate, prefix) and leaves a [`Routed`] in the context; `upstream_peer` only turns
//! it into a peer. Failures after that (connect refused, timeouts) become the edge's own
//! answers in `fail_to_proxy`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::ALPN;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use vmedge_model::{ServiceName, VmId};
use vmedge_registry::{Registry, RouteError};

use crate::activity::{Activity, VmActivity};
use crate::answers::{self, Refusal};
use crate::idle::HeaderRead;
use crate::ids::{self, RequestIds};
use crate::metrics::Metrics;
use crate::upstream;
use crate::wake::{WakeError, Waker};
use crate::EdgeSettings;

/// What the proxy shares across requests.
pub struct EdgeProxy {
    settings: Arc<EdgeSettings>,
    registry: Arc<dyn Registry>,
    waker: Arc<Waker>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    ids: Arc<RequestIds>,
}

/// Where a request goes, decided in `request_filter`.
pub struct Routed {
    vm: VmId,
    service: ServiceName,
    target: SocketAddr,
    h2c: bool,
    activity: Arc<VmActivity>,
}

/// Per-request state.
pub struct RequestCtx {
    id: String,
    started: Instant,
    grpc: bool,
    host: String,
    routed: Option<Routed>,
    refusal: Option<Refusal>,
    peer_chosen: Option<Instant>,
    sent: Option<Instant>,
    open: bool,
}

impl EdgeProxy {
    /// The proxy over `registry`.
    pub fn new(
        settings: Arc<EdgeSettings>,
        registry: Arc<dyn Registry>,
        waker: Arc<Waker>,
        activity: Arc<Activity>,
        metrics: Arc<Metrics>,
        ids: Arc<RequestIds>,
    ) -> EdgeProxy {
        EdgeProxy {
            settings,
            registry,
            waker,
            activity,
            metrics,
            ids,
        }
    }

    /// Decides where the request goes, or why it does not.
    async fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Routed, Refusal> {
        let req = session.req_header();
        let limit = self.settings.max_header_bytes;
        if let Some(h1) = session.as_downstream().as_http1() {
            let raw = h1.get_headers_raw_bytes();
            if raw.len() > limit {
                return Err(Refusal::HeadersTooLarge { limit });
            }
            framing_check(req, &raw)?;
        } else {
            if header_size(req) > limit {
                return Err(Refusal::HeadersTooLarge { limit });
            }
        }
        let host = request_host(req).ok_or(Refusal::BadRequest("no Host header"))?;
        ctx.host = host.to_string();
        let domain = self.settings.domain.as_str();
        let wait = {
            let snapshot = self.registry.load();
            let route = snapshot.route_host(host, domain).map_err(|e| match e {
                RouteError::NotOurs => Refusal::NotOurs,
                RouteError::Unknown => Refusal::Unknown,
            })?;
            let vm = route.vm();
            if vm.status.is_running() {
                return self.admit(
                    route.vm().id,
                    route.service().name,
                    route.target(),
                    route.h2c(),
                );
            }
            if vm.status.is_unavailable() {
                return Err(Refusal::Unavailable {
                    status: vm.status.clone(),
                });
            }
            let call = vm.status.wakes_on_request();
            if call && !self.waker.can_wake() && vm.status == vmedge_model::VmStatus::Paused {
                return Err(Refusal::CannotWake {
                    status: vm.status.clone(),
                });
            }
            (vm.id, call)
        };
        // Paused, pausing, resuming (wake and wait) or provisioning (wait).
        let (vm, call) = wait;
        let deadline = tokio::time::Instant::now() + self.settings.wake_timeout;
        match self.waker.wait_running(vm, call, deadline).await {
            Ok(()) => {}
            Err(WakeError::Timeout) => return Err(Refusal::WakeTimeout),
            Err(WakeError::Unavailable(status)) => return Err(Refusal::Unavailable { status }),
            Err(WakeError::Gone) => return Err(Refusal::Unknown),
        }
        // The VM may have come back elsewhere: route again on the state in force now.
        let snapshot = self.registry.load();
        let route = snapshot
            .route_host(host, domain)
            .map_err(|_| Refusal::Unknown)?;
        self.admit(
            route.vm().id,
            route.service().name,
            route.target(),
            route.h2c(),
        )
    }

    /// Rate and prefix checks for a running VM's service.
    fn admit(
        &self,
        vm: VmId,
        service: ServiceName,
        target: SocketAddr,
        h2c: bool,
    ) -> Result<Routed, Refusal> {
        let activity = self.activity.vm(vm, self.settings.rate_limit);
        activity.request();
        if !activity.admit() {
            return Err(Refusal::RateLimited);
        }
        if !self.settings.may_dial(target.ip()) {
            tracing::warn!(%vm, %target, "refused to dial an address outside vm_prefixes");
            return Err(Refusal::OutsidePrefixes);
        }
        Ok(Routed {
            vm,
            service,
            target,
            h2c,
            activity,
        })
    }
}

/// The size of a request's header fields, as the limit on headers counts it for h2 (an
/// HTTP/1.1 request's raw header is measured as it came).
pub(crate) fn header_size(req: &RequestHeader) -> usize {
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Host header (HTTP/1.1) or `:authority` (h2).
pub(crate) fn request_host(req: &RequestHeader) -> Option<&str> {
    if let Some(authority) = req.uri.authority() {
        return Some(authority.as_str());
    }
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// Request smuggling defences for HTTP/1.x: a request with both Content-Length and
/// Transfer-Encoding, or with a Transfer-Encoding that does not end in chunked, or with
/// several Host headers, is refused (RFC 9112 sections 6.1 and 3.2). pingora drops the
/// Content-Length of such a request before we see it, so the raw header is looked at.
fn framing_check(req: &RequestHeader, raw: &[u8]) -> Result<(), Refusal> {
    let te = req.headers.get_all(http::header::TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let has_cl = || {
        req.headers.contains_key(http::header::CONTENT_LENGTH)
            || raw
                .split(|&b| b == b'\n')
                .any(|line| line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:"))
    };
    if has_te && has_cl() {
        return Err(Refusal::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if has_te {
        let last = te
            .iter()
            .next_back()
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let last_coding = last.rsplit(|&b| b == b',').next().unwrap_or_default();
        if !last_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::BadRequest(
                "Transfer-Encoding does not end in chunked",
            ));
        }
    }
    if req.headers.get_all(http::header::HOST).iter().count() > 1 {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    Ok(())
}

/// An error of the proxy phase as the edge's own answer, if it is one.
fn refusal_for(e: &Error, routed: Option<&Routed>) -> Option<Refusal> {
    let port = routed.map_or(0, |r| r.target.port());
    match e.etype() {
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            Some(Refusal::NothingListening { port })
        }
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            Some(Refusal::UpstreamTimeout)
        }
        ErrorType::ConnectTimedout => Some(Refusal::UpstreamTimeout),
        _ => None,
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            id: String::new(),
            started: Instant::now(),
            grpc: false,
            host: String::new(),
            routed: None,
            refusal: None,
            peer_chosen: None,
            sent: None,
            open: false,
        }
    }

    /// pingora calls this right after reading a request's header, when the session
    /// carries a connection context: the edge's is the header timeout's signal.
    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        prev_ctx: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(read) = prev_ctx.downcast::<HeaderRead>() {
            read.done();
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        self.metrics.open();
        ctx.open = true;
        // A client that stops reading (its window or socket buffer full) is cut off, as
        // nginx's send_timeout does: pingora has no write timeout of its own, and such a
        // client would hold its stream and the VM connection behind it for ever.
        session.set_write_timeout(Some(self.settings.client_timeout));
        ctx.id = self.ids.take(session.req_header());
        ctx.grpc = answers::is_grpc(session);
        match self.route(session, ctx).await {
            Ok(routed) => {
                ctx.routed = Some(routed);
                Ok(false)
            }
            Err(refusal) => {
                self.metrics.refused(refusal.reason());
                answers::respond(session, &refusal, &ctx.id, ctx.grpc).await?;
                ctx.refusal = Some(refusal);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(routed) = ctx.routed.as_ref() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no route decided before upstream_peer",
            ));
        };
        let mut peer = HttpPeer::new(routed.target, false, String::new());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.settings.connect_timeout);
        options.read_timeout = Some(self.settings.upstream_timeout);
        options.write_timeout = Some(self.settings.upstream_timeout);
        options.idle_timeout = Some(upstream::IDLE_TIMEOUT);
        if routed.h2c {
            options.alpn = ALPN::H2;
            options.max_h2_streams = self.settings.h2_streams_per_connection;
        }
        ctx.peer_chosen = Some(Instant::now());
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let (false, Some(t)) = (reused, ctx.peer_chosen) {
            self.metrics.connected(t.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // The edge is the first hop: what a client says about earlier hops is not kept.
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical().to_string())
            .unwrap_or_default();
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream.insert_header("x-forwarded-for", client)?;
        upstream.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
        upstream.insert_header("x-forwarded-host", ctx.host.as_str())?;
        if let Some(id) = ids::field_value(&ctx.id) {
            upstream.insert_header(ids::FIELD, id)?;
        }
        ctx.sent = Some(Instant::now());
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let (Some(routed), Some(body)) = (&ctx.routed, body) {
            routed.activity.inbound(body.len());
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(sent) = ctx.sent.take() {
            if !upstream.status.is_informational() {
                self.metrics.responded(sent.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if !response.headers.contains_key(ids::FIELD) {
            if let Some(id) = ids::field_value(&ctx.id) {
                response.insert_header(ids::FIELD, id)?;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<Duration>> {
        if let (Some(routed), Some(body)) = (&ctx.routed, body) {
            routed.activity.outbound(body.len());
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let refusal = refusal_for(e, ctx.routed.as_ref());
        let written = session.response_written().is_some();
        if e.esource() == &ErrorSource::Upstream {
            // pingora (0.9) does not keep the client's connection after a failed proxy
            // attempt, whatever this returns: say so in the answer, so that the client
            // opens a new one rather than finding this one reset under its next request.
            session.set_keepalive(None);
        }
        let code = match (&refusal, written) {
            (_, true) => 0,
            (Some(refusal), false) => {
                self.metrics.refused(refusal.reason());
                if let Err(e) = answers::respond(session, refusal, &ctx.id, ctx.grpc).await {
                    tracing::debug!(request_id = %ctx.id, error = %e, "cannot send the error answer");
                }
                refusal.status()
            }
            (None, false) => {
                let code = match e.etype() {
                    ErrorType::HTTPStatus(code) => *code,
                    _ if e.esource() == &ErrorSource::Downstream => match e.etype() {
                        ErrorType::WriteError
                        | ErrorType::ReadError
                        | ErrorType::ConnectionClosed => 0,
                        _ => 400,
                    },
                    _ => 502,
                };
                if code > 0 {
                    let _ = session.respond_error(code).await;
                }
                code
            }
        };
        ctx.refusal = refusal;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client that went away (a cancelled gRPC call, a closed tab) is no error of ours,
    /// and a VM that refused or timed out got its own answer; the access log line records
    /// both, with the refusal's reason.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        error.esource() == &ErrorSource::Downstream
            || refusal_for(error, ctx.routed.as_ref()).is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.open {
            self.metrics.closed();
        }
        // A gRPC client's refusal is an HTTP 200 carrying grpc-status: count what it means.
        let status = match &ctx.refusal {
            Some(refusal) => refusal.status(),
            None => session.response_written().map_or(0, |r| r.status.as_u16()),
        };
        let service = ctx.routed.as_ref().map(|r| r.service);
        self.metrics.request_done(status, service);
        let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
        if let Some(routed) = &ctx.routed {
            self.metrics
                .vm_bytes(&routed.vm, bytes_in as u64, bytes_out as u64);
        }
        let req = session.req_header();
        tracing::info!(
            target: "vmedge::access",
            request_id = %ctx.id,
            client = %session.client_addr().map(|a| a.to_string()).unwrap_or_default(),
            method = %req.method,
            host = %ctx.host,
            path = %req.uri.path(),
            status,
            vm = %ctx.routed.as_ref().map(|r| r.vm.to_string()).unwrap_or_default(),
            service = service.as_ref().map_or("", |s| s.as_str()),
            refusal = ctx.refusal.as_ref().map_or("", |r| r.reason()),
            error = %e.map(|e| e.to_string()).unwrap_or_default(),
            bytes_in,
            bytes_out,
            ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn framing_conflicts_are_refused() {
        let check = |req: &RequestHeader| framing_check(req, b"");
        assert!(check(&request(&[("host", "a"), ("content-length", "3")])).is_ok());
        assert!(check(&request(&[("transfer-encoding", "gzip, chunked")])).is_ok());
        let te = request(&[("transfer-encoding", "chunked")]);
        assert!(framing_check(&te, b"POST / HTTP/1.1\r\nContent-Length: 3\r\n").is_err());
        let both = request(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        assert_eq!(
            check(&both),
            Err(Refusal::BadRequest(
                "both Content-Length and Transfer-Encoding"
            ))
        );
        assert!(check(&request(&[("transfer-encoding", "chunked, gzip")])).is_err());
        assert!(check(&request(&[("host", "a"), ("host", "b")])).is_err());
    }

    #[test]
    fn host_from_authority_or_header() {
        let mut req = request(&[("host", "web--x.proxy.localhost:8080")]);
        assert_eq!(request_host(&req), Some("web--x.proxy.localhost:8080"));
        req.set_uri("http://api--y.proxy.localhost/x".parse().unwrap());
        assert_eq!(request_host(&req), Some("api--y.proxy.localhost"));
        assert_eq!(request_host(&request(&[])), None);
    }
}
