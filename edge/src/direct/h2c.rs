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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
use crate::ids;

/// h2c connections by VM service address, each carrying up to `h2_streams_per_connection`
/// streams at once; another is opened when all of a service's are full (as pingora's
/// pool does).
#[derive(Default)]
pub(super) struct H2cPool {
    conns: Mutex<HashMap<SocketAddr, Vec<Shared>>>,
}

/// A connection's request handle, its streams under way, and when it was last taken.
struct Shared {
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    used: Instant,
}

/// A stream's place on a connection, given back when dropped.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl H2cPool {
    /// Forgets connections with no stream under way and unused for `idle` (each closes
    /// once nothing holds it).
    pub(super) fn sweep(&self, idle: Duration) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, list| {
            list.retain(|c| c.streams.load(Ordering::Relaxed) > 0 || c.used.elapsed() < idle);
            !list.is_empty()
        });
    }

    /// A place for one more stream on a kept connection to `target` with fewer than
    /// `per_connection` under way.
    fn take(
        &self,
        target: SocketAddr,
        per_connection: usize,
    ) -> Option<(SendRequest<Bytes>, Slot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(&target)?;
        let shared = list
            .iter_mut()
            .find(|c| c.streams.load(Ordering::Relaxed) < per_connection)?;
        shared.streams.fetch_add(1, Ordering::Relaxed);
        shared.used = Instant::now();
        Some((shared.sender.clone(), Slot(shared.streams.clone())))
    }

    /// Keeps a new connection to `target`, with the first stream's place on it.
    fn keep(&self, target: SocketAddr, sender: &SendRequest<Bytes>) -> Slot {
        let streams = Arc::new(AtomicUsize::new(1));
        let shared = Shared {
            sender: sender.clone(),
            streams: streams.clone(),
            used: Instant::now(),
        };
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.entry(target).or_default().push(shared);
        Slot(streams)
    }

    /// Forgets the connection `slot` is on (it closed).
    fn forget(&self, target: SocketAddr, slot: &Slot) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(&target) {
            list.retain(|c| !Arc::ptr_eq(&c.streams, &slot.0));
            if list.is_empty() {
                conns.remove(&target);
            }
        }
    }

    /// Connections kept to `target`.
    #[cfg(test)]
    fn len(&self, target: SocketAddr) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.get(&target).map_or(0, Vec::len)
    }
}

impl Direct {
    /// A handle ready to open a stream to `target`, and the stream's place on its
    /// connection: on a kept connection with room, or on a new one when there is none,
    /// or the one found closed (the VM sent GOAWAY, or went away).
    async fn h2c_sender(&self, to: &H2Target<'_>) -> Result<(SendRequest<Bytes>, Slot), Failure> {
        let target = to.target;
        let limit = self.settings.upstream_timeout;
        let per_connection = self.settings.h2_streams_per_connection.max(1);
        if let Some((sender, slot)) = self.h2c.take(target, per_connection) {
            // Waits while the connection is at the VM's own stream limit.
            match tokio::time::timeout(limit, sender.ready()).await {
                Ok(Ok(sender)) => return Ok((sender, slot)),
                Ok(Err(_)) => self.h2c.forget(target, &slot),
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
            Ok(Err(e)) => return Err(broken(to, "the h2c handshake with the VM failed", &e)),
            Err(_) => return Err(Failure::Refuse(Refusal::UpstreamTimeout)),
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%target, error = %e, "h2c connection to a VM ended");
            }
        });
        let slot = self.h2c.keep(target, &sender);
        match tokio::time::timeout(limit, sender.ready()).await {
            Ok(Ok(sender)) => Ok((sender, slot)),
            Ok(Err(e)) => Err(broken(to, "a new h2c connection to the VM closed", &e)),
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
        let req = stream.req_header();
        let request = message::h2c_request(req, to.host, to.client, to.proto, to.id).ok_or(
            Failure::Refuse(Refusal::BadRequest("the host or path is not a URI")),
        )?;
        let no_body = stream.is_body_empty();
        // Each wait on the VM, and each write to it.
        let limit = self.settings.upstream_timeout;
        // The place is held until the exchange ends, bodies and all.
        let (mut sender, _slot) = self.h2c_sender(to).await?;
        let (answer, body_out) = sender
            .send_request(request, no_body)
            .map_err(|e| broken(to, "the VM's h2c connection took no new stream", &e))?;
        let sent = Instant::now();
        let mut up = Upload {
            out: (!no_body).then_some(body_out),
        };

        // The client's body goes on while the VM's answer header is awaited: a
        // client-streaming call is answered only once its requests are all in.
        tokio::pin!(answer);
        let answer = loop {
            tokio::select! {
                answer = &mut answer => break answer,
                from = poll_fn(|cx| up.poll_client(stream, cx)) => up.forward(from, to, limit).await?,
                _ = tokio::time::sleep(limit), if !up.open() => {
                    return Err(Failure::Refuse(Refusal::UpstreamTimeout));
                }
            }
        };
        let answer =
            answer.map_err(|e| broken(to, "the VM's h2c stream ended before its answer", &e))?;
        self.metrics.responded(sent.elapsed().as_secs_f64());
        let (mut parts, mut body_in) = answer.into_parts();
        // Into the map itself: pingora's `insert_header` copies the name twice on the way.
        // Never indexed, the VM's own (an echo) too: see `ids::field_value`.
        match parts.headers.get_mut(ids::FIELD) {
            Some(value) => value.set_sensitive(true),
            None => {
                if let Some(value) = ids::field_value(to.id) {
                    parts.headers.insert(ids::FIELD, value);
                }
            }
        }
        let header = ResponseHeader::from(parts);
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

/// A failure of the VM's connection or stream before its answer's header: the client
/// gets a 502, and the log says what h2 saw (a reset's reason, a GOAWAY, a broken
/// connection), which the answer does not.
fn broken(to: &H2Target<'_>, what: &str, error: &h2::Error) -> Failure {
    tracing::warn!(request_id = to.id, target = %to.target, %error, "{what}");
    Failure::Refuse(Refusal::BadUpstreamAnswer)
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
    /// timeout): a piece of the body, or its end; nothing more once the VM takes no more.
    /// A reset ends the exchange: dropping the VM's stream resets it too.
    async fn forward(
        &mut self,
        from: FromClient,
        to: &H2Target<'_>,
        limit: Duration,
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
        if let Err(error) = write_body(out, data, end, Some(limit)).await {
            // The VM takes no more: its stream is closed, or it stopped reading for the
            // upstream timeout. A server may answer in full before it has the whole
            // request, then end the stream with a NO_ERROR reset (RFC 9113 8.1), as
            // grpc-core does; one that stopped reading may still answer, as on the
            // HTTP/1.1 path. So the answer says how the exchange ends: a reset for an
            // error, or no answer in time, fails it.
            tracing::debug!(request_id = to.id, %error, "the VM took no more of the request body");
            self.out = None;
            return Ok(());
        }
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
    limit: Duration,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request handle on a connection nothing answers (the pool only counts).
    async fn sender() -> SendRequest<Bytes> {
        let (ours, _theirs) = tokio::io::duplex(1 << 16);
        let (sender, connection) = h2::client::handshake(ours).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    #[tokio::test]
    async fn a_connection_carries_its_share_of_streams_then_another_is_opened() {
        let pool = H2cPool::default();
        let target: SocketAddr = "[fd5e:ed00::1]:50051".parse().unwrap();
        assert!(pool.take(target, 2).is_none(), "nothing kept yet");
        let first = pool.keep(target, &sender().await);
        let (_, second) = pool.take(target, 2).expect("room for a second stream");
        assert!(pool.take(target, 2).is_none(), "two streams fill it");
        drop(second);
        let (_, again) = pool.take(target, 2).expect("a stream ended: room again");

        // Full again: a second connection takes the next streams.
        let other = pool.keep(target, &sender().await);
        assert_eq!(pool.len(target), 2);
        let (_, on_other) = pool.take(target, 2).expect("room on the second");
        assert!(pool.take(target, 2).is_none());

        // Swept: only connections with nothing under way and idle long enough.
        drop((again, on_other, other));
        pool.sweep(Duration::ZERO);
        assert_eq!(pool.len(target), 1, "the first still has a stream");
        pool.forget(target, &first);
        assert_eq!(pool.len(target), 0, "a closed connection is forgotten");
    }
}
