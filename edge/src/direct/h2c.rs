//! h2 requests to a VM's h2c service (gRPC among them), multiplexed on the direct path's
//! own h2c connections.
//!
//! pingora's proxy took these through its h2 client: its per-stream task and phases on
//! the client's side, its connection pool and a channel between the two halves of each
//! exchange. Here a stream taken by [`Direct::serve_h2`] goes to the VM on one h2c
//! connection per VM service ([`H2cPool`], the h2 crate's client, multiplexed as far as
//! the VM's `SETTINGS_MAX_CONCURRENT_STREAMS` allows), and both bodies stream at once,
//! each way under flow control: unary calls, client, server and bidirectional streaming,
//! trailers (`grpc-status`), and a client's reset (a deadline, a cancelled call) passed on
//! to the VM as a reset of its stream.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::v2::server::HttpSession as H2Stream;
use pingora::protocols::http::v2::write_body;
use tokio::net::TcpStream;

use super::h2::{send, H2Target};
use super::message;
use super::{Direct, Done, Failure};
use crate::answers::Refusal;

/// One h2c connection per VM service address, shared by every stream to it.
#[derive(Default)]
pub(super) struct H2cPool {
    conns: Mutex<HashMap<SocketAddr, Shared>>,
}

/// A connection's request handle, and when it was last taken.
struct Shared {
    sender: SendRequest<Bytes>,
    used: Instant,
}

impl H2cPool {
    /// Forgets connections unused for `idle` (each closes once its last stream ends).
    pub(super) fn sweep(&self, idle: std::time::Duration) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, shared| shared.used.elapsed() < idle);
    }

    fn kept(&self, target: SocketAddr) -> Option<SendRequest<Bytes>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let shared = conns.get_mut(&target)?;
        shared.used = Instant::now();
        Some(shared.sender.clone())
    }

    fn keep(&self, target: SocketAddr, sender: &SendRequest<Bytes>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let shared = Shared {
            sender: sender.clone(),
            used: Instant::now(),
        };
        conns.insert(target, shared);
    }

    fn forget(&self, target: SocketAddr) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&target);
    }
}

impl Direct {
    /// A handle ready to open a stream to `target`: on its kept connection, or on a new
    /// one when there is none or it closed (the VM sent GOAWAY, or went away).
    async fn h2c_sender(&self, target: SocketAddr) -> Result<SendRequest<Bytes>, Failure> {
        let limit = self.settings.upstream_timeout;
        if let Some(sender) = self.h2c.kept(target) {
            // Waits while the connection is at the VM's stream limit.
            match tokio::time::timeout(limit, sender.ready()).await {
                Ok(Ok(sender)) => return Ok(sender),
                Ok(Err(_)) => self.h2c.forget(target),
                Err(_) => return Err(Failure::Refuse(Refusal::UpstreamTimeout)),
            }
        }
        let tcp = self.connect(target).await?;
        let handshake = h2::client::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .handshake::<TcpStream, Bytes>(tcp);
        let (sender, connection) = match tokio::time::timeout(limit, handshake).await {
            Ok(Ok(both)) => both,
            Ok(Err(_)) => return Err(Failure::Refuse(Refusal::BadUpstreamAnswer)),
            Err(_) => return Err(Failure::Refuse(Refusal::UpstreamTimeout)),
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%target, error = %e, "h2c connection to a VM ended");
            }
        });
        self.h2c.keep(target, &sender);
        match tokio::time::timeout(limit, sender.ready()).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(_)) => Err(Failure::Refuse(Refusal::BadUpstreamAnswer)),
            Err(_) => Err(Failure::Refuse(Refusal::UpstreamTimeout)),
        }
    }

    /// The request to the VM's h2c service and its answer back on the stream, both
    /// bodies streaming at once.
    pub(super) async fn exchange_h2c(
        &self,
        stream: &mut H2Stream,
        to: &H2Target<'_>,
        done: &mut Done,
    ) -> Result<(), Failure> {
        let client = stream.client_addr().and_then(|a| a.as_inet()).copied();
        let tls = stream.digest().is_some_and(|d| d.ssl_digest.is_some());
        let proto = if tls { "https" } else { "http" };
        let request = message::h2c_request(stream.req_header(), to.host, client, proto, to.id)
            .ok_or(Failure::Refuse(Refusal::BadRequest(
                "the host or path is not a URI",
            )))?;
        let no_body = stream.is_body_empty();
        let mut sender = self.h2c_sender(to.target).await?;
        let (answer, body_out) = sender
            .send_request(request, no_body)
            .map_err(|_| Failure::Refuse(Refusal::BadUpstreamAnswer))?;
        let sent = Instant::now();
        let mut up = Upload {
            out: (!no_body).then_some(body_out),
        };

        // The client's body goes on while the VM's answer header is awaited: a
        // client-streaming call is answered only once its requests are all in.
        tokio::pin!(answer);
        let answer = loop {
            let limit = self.settings.upstream_timeout;
            tokio::select! {
                answer = &mut answer => break answer,
                from = poll_fn(|cx| up.poll_client(stream, cx)) => {
                    // Nothing went to the client yet: a VM that stops taking the body gets
                    // it a 502, not a reset.
                    up.forward(from, to, limit).await.map_err(|failure| match failure {
                        Failure::Cut(_) => Failure::Refuse(Refusal::BadUpstreamAnswer),
                        other => other,
                    })?;
                }
                _ = tokio::time::sleep(limit), if !up.open() => {
                    return Err(Failure::Refuse(Refusal::UpstreamTimeout));
                }
            }
        };
        let answer = answer.map_err(|_| Failure::Refuse(Refusal::BadUpstreamAnswer))?;
        self.metrics.responded(sent.elapsed().as_secs_f64());
        let (parts, mut body_in) = answer.into_parts();
        let mut header = ResponseHeader::from(parts);
        if !header.headers.contains_key("x-request-id") {
            let _ = header.insert_header("x-request-id", to.id);
        }
        done.status = header.status.as_u16();
        let end = body_in.is_end_stream();
        stream
            .write_response_header(Box::new(header), end)
            .map_err(|_| Failure::Client("the client went away"))?;
        if end {
            return Ok(());
        }

        // Both bodies at once; the VM's answer ends with its trailers or its last data.
        loop {
            let limit = self.settings.upstream_timeout;
            tokio::select! {
                data = tokio::time::timeout(limit, body_in.data()) => match data {
                    Err(_) => return Err(Failure::Cut("the VM stopped answering mid-body")),
                    Ok(Some(Err(_))) => return Err(Failure::Cut("the VM reset the stream")),
                    Ok(Some(Ok(data))) => {
                        let n = data.len();
                        let _ = body_in.flow_control().release_capacity(n);
                        to.activity.outbound(n);
                        send(stream, data, false).await?;
                    }
                    Ok(None) => return finish(stream, &mut body_in, limit).await,
                },
                from = poll_fn(|cx| up.poll_client(stream, cx)) => up.forward(from, to, limit).await?,
            }
        }
    }
}

/// The initial flow-control window of the edge's h2c connections to VMs, per stream and
/// for the connection: what a VM may send before the edge has passed it on.
const WINDOW: u32 = 1 << 20;

/// What the client's side of a stream gave.
enum FromClient {
    /// A piece of its body, or (`None`) its end.
    Body(Option<Result<Bytes, h2::Error>>),
    /// It reset the stream.
    Reset,
}

/// The client's body on its way to the VM; `None` once all of it went.
struct Upload {
    out: Option<SendStream<Bytes>>,
}

impl Upload {
    fn open(&self) -> bool {
        self.out.is_some()
    }

    /// The next piece of the client's body while it sends one; once it is all in, whether
    /// the client resets its stream (a deadline, a cancelled call).
    fn poll_client(&self, stream: &mut H2Stream, cx: &mut Context<'_>) -> Poll<FromClient> {
        if self.open() {
            return stream.poll_read_body_bytes(cx).map(FromClient::Body);
        }
        Pin::new(&mut stream.idle())
            .poll(cx)
            .map(|_| FromClient::Reset)
    }

    /// What came from the client, to the VM (under its flow control, and the upstream
    /// timeout): a piece of the body, or its end. A reset ends the exchange: dropping the
    /// VM's stream resets it too.
    async fn forward(
        &mut self,
        from: FromClient,
        to: &H2Target<'_>,
        limit: std::time::Duration,
    ) -> Result<(), Failure> {
        let (data, end) = match from {
            FromClient::Body(Some(Ok(data))) => (data, false),
            FromClient::Body(None) => (Bytes::new(), true),
            FromClient::Body(Some(Err(_))) | FromClient::Reset => {
                return Err(Failure::Client("the client reset the stream"))
            }
        };
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        to.activity.inbound(data.len());
        write_body(out, data, end, Some(limit))
            .await
            .map_err(|_| Failure::Cut("the VM stopped taking the request body"))?;
        if end {
            self.out = None;
        }
        Ok(())
    }
}

/// The end of the VM's answer on the client's stream: its trailers (gRPC's status), or
/// an empty last piece when it has none.
async fn finish(
    stream: &mut H2Stream,
    body_in: &mut RecvStream,
    limit: std::time::Duration,
) -> Result<(), Failure> {
    match tokio::time::timeout(limit, body_in.trailers()).await {
        Ok(Ok(Some(trailers))) => stream
            .write_trailers(trailers)
            .map_err(|_| Failure::Client("the client went away")),
        Ok(Ok(None)) => send(stream, Bytes::new(), true).await,
        Ok(Err(_)) => Err(Failure::Cut("the VM reset the stream")),
        Err(_) => Err(Failure::Cut("the VM stopped answering mid-body")),
    }
}
