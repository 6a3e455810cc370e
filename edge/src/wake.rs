//! Wake on request: a paused VM is woken through the control plane's wake hook, and the
//! request waits until the registry says `running`.
//!
//! However many requests wait for one VM, at most one hook call for it is in flight, and
//! after a call the hook accepted none is made for that VM for a quiet spell (the wake
//! timeout: the control plane is resuming it). Each waiter watches the registry itself, so
//! a VM resumed by someone else lets them through just the same.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use tokio::time::Instant;
use vmedge_model::{VmId, VmStatus};
use vmedge_registry::Registry;

use crate::metrics::Metrics;

/// How long one hook call may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// A wake hook URL, parsed once.
#[derive(Debug, Clone)]
pub struct WakeHook {
    host: String,
    port: u16,
    tls: bool,
    path: String,
}

/// Why a wake hook URL is refused.
#[derive(Debug, thiserror::Error)]
#[error("wake_url {url:?}: {reason}")]
pub struct WakeUrlError {
    url: String,
    reason: &'static str,
}

impl WakeHook {
    /// Parses `http://host:port/path` (or https).
    pub fn parse(url: &str) -> Result<WakeHook, WakeUrlError> {
        let err = |reason| WakeUrlError {
            url: url.to_string(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|_| err("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(err("the scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| err("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(WakeHook {
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
            host,
        })
    }
}

/// Why a request's VM did not come up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeError {
    /// Not `running` within the deadline.
    Timeout,
    /// The VM turned stopped, deleting or error while waiting.
    Unavailable(VmStatus),
    /// The VM left the state while waiting.
    Gone,
}

/// Calls the hook and waits for VMs.
pub struct Waker {
    hook: Option<WakeHook>,
    registry: Arc<dyn Registry>,
    connector: Connector,
    /// VMs not to call the hook for (a call in flight or just accepted), until when.
    quiet: Mutex<HashMap<VmId, Instant>>,
    quiet_spell: Duration,
    metrics: Arc<Metrics>,
}

impl Waker {
    /// A waker calling `hook` (none: waiting only); after an accepted call, the VM is not
    /// called for again for `quiet_spell`.
    pub fn new(
        hook: Option<WakeHook>,
        registry: Arc<dyn Registry>,
        quiet_spell: Duration,
        metrics: Arc<Metrics>,
    ) -> Waker {
        Waker {
            hook,
            registry,
            connector: Connector::new(None),
            quiet: Mutex::new(HashMap::new()),
            quiet_spell,
            metrics,
        }
    }

    /// Is there a hook to call?
    pub fn can_wake(&self) -> bool {
        self.hook.is_some()
    }

    /// Calls the hook for `vm` (unless a call is in flight already, when `call` is set)
    /// and waits until the VM is running, up to `deadline`.
    pub async fn wait_running(
        self: &Arc<Self>,
        vm: VmId,
        call: bool,
        deadline: Instant,
    ) -> Result<(), WakeError> {
        let mut changes = self.registry.subscribe();
        if call {
            self.call_once(vm);
        }
        loop {
            let status = changes
                .borrow_and_update()
                .vm(&vm)
                .map(|v| v.status.clone());
            match status {
                None => return Err(WakeError::Gone),
                Some(s) if s.is_running() => return Ok(()),
                Some(s) if s.is_unavailable() => return Err(WakeError::Unavailable(s)),
                Some(_) => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(WakeError::Timeout),
            }
        }
    }

    /// Starts one hook call for `vm` unless one is in flight or was just accepted.
    fn call_once(self: &Arc<Self>, vm: VmId) {
        let Some(hook) = self.hook.clone() else {
            return;
        };
        let now = Instant::now();
        let call = self
            .quiet
            .lock()
            .map(|mut quiet| {
                quiet.retain(|_, until| *until > now);
                if quiet.contains_key(&vm) {
                    return false;
                }
                // In flight: quiet until the call ends.
                quiet.insert(vm, now + HOOK_TIMEOUT + self.quiet_spell);
                true
            })
            .unwrap_or(false);
        if !call {
            return;
        }
        let waker = self.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(HOOK_TIMEOUT, waker.post(&hook, vm)).await;
            let outcome = match result {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    tracing::info!(%vm, status, "wake hook called");
                    "ok"
                }
                Ok(Ok(status)) => {
                    tracing::warn!(%vm, status, "wake hook refused the call");
                    "refused"
                }
                Ok(Err(e)) => {
                    tracing::warn!(%vm, error = %e, "wake hook call failed");
                    "failed"
                }
                Err(_) => {
                    tracing::warn!(%vm, "wake hook call timed out");
                    "timeout"
                }
            };
            waker.metrics.wake_call(outcome);
            if let Ok(mut quiet) = waker.quiet.lock() {
                if outcome == "ok" {
                    quiet.insert(vm, Instant::now() + waker.quiet_spell);
                } else {
                    // Not accepted: the next request may try again.
                    quiet.remove(&vm);
                }
            }
        });
    }

    async fn post(&self, hook: &WakeHook, vm: VmId) -> pingora::Result<u16> {
        use pingora::ErrorType::ConnectNoRoute;
        let addr: SocketAddr = tokio::net::lookup_host((hook.host.as_str(), hook.port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| {
                pingora::Error::explain(ConnectNoRoute, format!("cannot resolve {}", hook.host))
            })?;
        let peer = HttpPeer::new(addr, hook.tls, hook.host.clone());
        let (mut session, _) = self.connector.get_http_session(&peer).await?;
        let body = Bytes::from(format!("{{\"vm_id\":\"{vm}\"}}"));
        let mut request = RequestHeader::build("POST", hook.path.as_bytes(), None)?;
        let host = if hook.host.contains(':') {
            format!("[{}]:{}", hook.host, hook.port)
        } else {
            format!("{}:{}", hook.host, hook.port)
        };
        request.insert_header(http::header::HOST, host)?;
        request.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        request.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_request_header(Box::new(request)).await?;
        session.write_request_body(body, true).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        while session.read_response_body().await?.is_some() {}
        self.connector
            .release_http_session(session, &peer, Some(Duration::from_secs(30)))
            .await;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hook_urls() {
        let h = WakeHook::parse("http://127.0.0.1:9000/wake").unwrap();
        assert_eq!((h.host.as_str(), h.port, h.tls), ("127.0.0.1", 9000, false));
        assert_eq!(h.path, "/wake");
        let h = WakeHook::parse("https://[::1]/v1/wake?x=1").unwrap();
        assert_eq!((h.host.as_str(), h.port, h.tls), ("::1", 443, true));
        assert_eq!(h.path, "/v1/wake?x=1");
        let e = WakeHook::parse("ftp://x/").unwrap_err();
        assert!(e.to_string().contains("scheme"), "{e}");
    }
}
