//! h2 requests to a running VM's services, on the direct path's own upstream connections,
//! without pingora's request machinery.
//!
//! pingora's h2 server reads each stream's request and spawns a task for it; that task
//! came through pingora's proxy (a ~14 kB future per stream, its session and its phases)
//! before the edge's `request_filter` saw the request, and h2c held at 0.5-0.6x nginx
//! (bench/RESULTS.md). Here [`crate::idle::IdleFirst`] offers each stream to
//! [`Direct::serve_h2`] first, and it takes a request routed to a running VM inside the
//! prefixes:
//! - to an HTTP/1.1 service, when it is not gRPC and has no body, or a small one of known
//!   length: its header is written as HTTP/1.1 for the VM ([`message::h1_request`]), its
//!   body read whole under the client timeout and sent with it, on a kept connection of
//!   the [`UpstreamPool`]; the answer goes back on the stream, its body decoded from its
//!   framing as it comes. Interim answers (1xx) are not passed on, and neither are a
//!   chunked answer's trailer fields;
//! - to an h2c service (gRPC among them), whatever its body: see `h2c`.
//!
//! Everything else is declined untouched, and pingora's proxy serves it: larger bodies (or
//! ones of unknown length) to HTTP/1.1 services, VMs that are not running (wake, 503),
//! hosts that do not route, headers over the limit.
//!
//! [`UpstreamPool`]: crate::upstream::UpstreamPool

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::RequestHeader;
use pingora::protocols::http::v2::server::HttpSession as H2Stream;
use pingora::ErrorType;
use smallvec::SmallVec;
use tokio::net::TcpStream;
use vmedge_model::{ServiceName, VmId};

use super::message::{self, parse_answer, Answer, Body, Framing, H2Header, Malformed};
use super::{malformed_body, Direct, Done, Failure, Logged};
use crate::activity::VmActivity;
use crate::answers::{self, Refusal};
use crate::proxy::{header_size, request_host};

/// The largest request body an h2 request taken here may have: it is read whole before the
/// request goes to the VM (as nginx buffers a body), so an answer the VM gives before
/// reading all of it, or while reading it, cannot stall the exchange.
const MAX_BODY: usize = 64 * 1024;

/// What became of an h2 stream offered to the direct path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Offered {
    /// Taken, and answered (or cut off) here.
    Served,
    /// Not one for this path: nothing was read from it and nothing counted.
    Declined,
}

/// Where a taken request goes.
struct H2Route {
    vm: VmId,
    service: ServiceName,
    target: SocketAddr,
    /// The service speaks h2c: the request goes on as h2 ([`Direct::exchange_h2c`]).
    h2c: bool,
}

impl Direct {
    /// Serves the request of `stream` if it is one for this path (see the module's
    /// comment). The stream is borrowed, not moved in and handed back: each move of
    /// pingora's 536-byte session was a copy, and the future held it twice (an async
    /// fn's argument and its local), 1 kB more to copy into every stream's task.
    pub async fn serve_h2(&self, stream: &mut H2Stream) -> H2Offered {
        let started = Instant::now();
        let Some(route) = self.route_h2(stream) else {
            return H2Offered::Declined;
        };

        // Taken: from here on the request is counted, and answered here.
        self.metrics.open();
        // A client that stops reading (its window full) is cut off, as nginx's
        // send_timeout does.
        stream.set_write_timeout(Some(self.settings.client_timeout));
        let client = stream.client_addr().and_then(|a| a.as_inet()).copied();
        let tls = stream.digest().is_some_and(|d| d.ssl_digest.is_some());
        let req = stream.req_header();
        let id = self.ids.take(req);
        let host = request_host(req).unwrap_or_default().to_string();
        let activity = self.activity.vm(route.vm, self.settings.rate_limit);
        activity.request();
        let mut done = Done::default();
        let grpc = answers::is_grpc_request(req);
        let result = if activity.admit() {
            let to = H2Target {
                target: route.target,
                host: &host,
                id: &id,
                client,
                proto: if tls { "https" } else { "http" },
                activity: &activity,
            };
            if route.h2c {
                self.exchange_h2c(stream, &to, &mut done).await
            } else {
                self.exchange_h2(stream, &to, &mut done).await
            }
        } else {
            Err(Failure::Refuse(Refusal::RateLimited))
        };
        match result {
            Ok(()) => {}
            Err(Failure::Refuse(refusal)) => {
                self.metrics.refused(refusal.reason());
                done.status = refusal.status();
                if answer(stream, &refusal, &id, grpc).await.is_err() {
                    done.error = "the client went away before the answer";
                }
                done.refusal = Some(refusal);
            }
            Err(Failure::Client(why) | Failure::Cut(why)) => done.error = why,
        }
        done.bytes_in = stream.body_bytes_read() as u64;
        done.bytes_out = stream.body_bytes_sent() as u64;
        let req = stream.req_header();
        let line = Logged {
            id: &id,
            client,
            method: req.method.as_str(),
            host: &host,
            path: req.uri.path(),
        };
        self.finish(&line, route.vm, route.service, &done, started);
        H2Offered::Served
    }

    /// The running VM service the stream's request is for, if this path may take it: not
    /// CONNECT, a header within the limit, a host that routes to a running VM inside the
    /// prefixes, and either an h2c service, or an HTTP/1.1 one and a request that is not
    /// gRPC with a body of known length at most [`MAX_BODY`] (or none). Refusals and
    /// waits are pingora's.
    fn route_h2(&self, stream: &H2Stream) -> Option<H2Route> {
        let req = stream.req_header();
        if req.method == Method::CONNECT || header_size(req) > self.settings.max_header_bytes {
            return None;
        }
        let snapshot = self.registry.load();
        let route = snapshot
            .route_host(request_host(req)?, &self.settings.domain)
            .ok()?;
        let target = route.target();
        let h2c = route.h2c();
        // To an HTTP/1.1 service: no gRPC, and a body read whole first.
        let as_h1 =
            !answers::is_grpc_request(req) && (stream.is_body_empty() || body_len(req).is_some());
        let takes =
            route.vm().status.is_running() && (h2c || as_h1) && self.settings.may_dial(target.ip());
        takes.then(|| H2Route {
            vm: route.vm().id,
            service: route.service().name,
            target,
            h2c,
        })
    }

    /// The request to the VM and its answer back on the stream.
    async fn exchange_h2(
        &self,
        stream: &mut H2Stream,
        to: &H2Target<'_>,
        done: &mut Done,
    ) -> Result<(), Failure> {
        let req = stream.req_header();
        let head = req.method == Method::HEAD;
        // No side effects (RFC 9110 9.2.2): sent again when a kept connection turns out
        // closed before any answer.
        let retryable = matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let len = (!stream.is_body_empty()).then(|| body_len(req).unwrap_or(0));
        let room = len.unwrap_or(0);
        let mut upstream = message::h1_request(req, to.host, to.client, to.proto, to.id, room);
        if let Some(len) = len {
            // Header and body go to the VM in one write.
            self.read_body(stream, len, &mut upstream).await?;
            to.activity.inbound(len);
        }

        let (mut tcp, (answer, rest), sent) = loop {
            let (mut tcp, reused) = self.send_header(to.target, &upstream, retryable).await?;
            let retry = reused && retryable;
            let sent = Instant::now();
            match self.read_final_answer(&mut tcp, head, to.id).await? {
                Some(answer) => break (tcp, answer, sent),
                None if retry => continue,
                None => return Err(Failure::Refuse(Refusal::BadUpstreamAnswer)),
            }
        };
        self.metrics.responded(sent.elapsed().as_secs_f64());
        done.status = answer.status;
        let reusable = self
            .relay_h2(stream, &mut tcp, answer, rest, to.activity)
            .await?;
        if reusable {
            self.pool.put(to.target, tcp);
        }
        Ok(())
    }

    /// The request's body, `len` bytes by its `content-length`, read whole onto `out`;
    /// each read under the client timeout (then 408, as nginx's `client_body_timeout`).
    async fn read_body(
        &self,
        stream: &mut H2Stream,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Failure> {
        let start = out.len();
        out.reserve(len);
        loop {
            let read = tokio::time::timeout(self.timeouts.read, stream.read_body_bytes());
            let chunk = match read.await {
                Err(_) => return Err(Failure::Refuse(Refusal::ClientTimeout)),
                Ok(Err(_)) => return Err(Failure::Client("the client went away")),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            if out.len() - start + chunk.len() > len {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        // h2 holds a stream's data to its content-length; checked again all the same.
        if out.len() - start != len {
            return Err(Failure::Client("the body is not its content-length"));
        }
        Ok(())
    }

    /// The VM's final answer header, parsed for the stream (interim answers are skipped),
    /// and what was read past it. `None` when the connection closed before any answer.
    async fn read_final_answer(
        &self,
        tcp: &mut TcpStream,
        head: bool,
        id: &str,
    ) -> Result<Option<(Answer<H2Header>, Bytes)>, Failure> {
        let mut buf = Vec::with_capacity(4096);
        let mut interim = false;
        loop {
            if !buf.is_empty() {
                // Shared, so that the answer's fields can be slices of it.
                let read = Bytes::from(std::mem::take(&mut buf));
                match parse_answer::<H2Header>(&read, head, id)? {
                    Some((answer, len)) if answer.status >= 200 => {
                        let rest = read.slice(len..);
                        if answer.framing.ends_within(rest.len()) {
                            return Ok(Some((answer, rest)));
                        }
                        // A body still to come may keep the stream open for long (an
                        // event stream), and pingora keeps the header as long: it gets
                        // bytes of its own, not slices that hold the whole read buffer.
                        drop(answer);
                        let own = Bytes::copy_from_slice(&read[..len]);
                        let parsed = parse_answer::<H2Header>(&own, head, id)?;
                        let (answer, _) = parsed.ok_or(Malformed)?;
                        return Ok(Some((answer, rest)));
                    }
                    Some((_, len)) => {
                        interim = true;
                        buf = read[len..].to_vec();
                        continue;
                    }
                    // Not whole yet: the same buffer back, not a copy.
                    None => buf = Vec::from(read),
                }
            }
            if !self.read_answer_bytes(tcp, &mut buf, interim).await? {
                return Ok(None);
            }
        }
    }

    /// The answer's header, then its body as it arrives, decoded from its framing, to the
    /// client; whether the VM's connection may carry another request.
    async fn relay_h2(
        &self,
        stream: &mut H2Stream,
        tcp: &mut TcpStream,
        answer: Answer<H2Header>,
        rest: Bytes,
        activity: &VmActivity,
    ) -> Result<bool, Failure> {
        let mut body = Body::new(answer.framing);
        // An answer with no body ends with its header.
        let empty = answer.framing == Framing::Empty;
        stream
            .write_response_header(Box::new(answer.header.into_response()), empty)
            .map_err(|_| Failure::Client("the client went away"))?;
        if empty {
            return Ok(answer.reusable && rest.is_empty());
        }
        let mut reusable = answer.reusable;
        let until_close = answer.framing == Framing::UntilClose;
        let mut piece = rest;
        let mut buf = BytesMut::new();
        loop {
            // One span for most pieces (a length-framed body's), kept inline.
            let mut spans = SmallVec::<[Range<usize>; 4]>::new();
            let (take, end) = body
                .decode(&piece, &mut |span| spans.push(span))
                .map_err(malformed_body)?;
            reusable &= take == piece.len();
            let last = spans.len();
            for (i, span) in spans.into_iter().enumerate() {
                let data = piece.slice(span);
                activity.outbound(data.len());
                let fin = end && i + 1 == last;
                send(stream, data, fin).await?;
            }
            if end {
                if last == 0 {
                    send(stream, Bytes::new(), true).await?;
                }
                return Ok(reusable);
            }
            if self.read_body_bytes(tcp, &mut buf, until_close).await? == 0 {
                send(stream, Bytes::new(), true).await?;
                return Ok(false);
            }
            piece = buf.split().freeze();
        }
    }
}

/// Where a taken request goes, for [`Direct::exchange_h2`] and [`Direct::exchange_h2c`].
pub(super) struct H2Target<'a> {
    pub(super) target: SocketAddr,
    /// The public host the client asked for.
    pub(super) host: &'a str,
    /// The request id.
    pub(super) id: &'a str,
    /// The client's address, for `x-forwarded-for`.
    pub(super) client: Option<SocketAddr>,
    /// `https` or `http`, for `x-forwarded-proto`.
    pub(super) proto: &'static str,
    pub(super) activity: &'a VmActivity,
}

/// A piece of the answer's body (`end`: the last) to the client, under the stream's write
/// timeout: a client that stops reading (its flow-control window full) is cut off.
pub(super) async fn send(stream: &mut H2Stream, data: Bytes, end: bool) -> Result<(), Failure> {
    stream
        .write_body(data, end)
        .await
        .map_err(|e| match e.etype() {
            ErrorType::WriteTimedout => Failure::Client("the client stopped reading"),
            _ => Failure::Client("the client went away"),
        })
}

/// The edge's own answer for `refusal` on the stream: to a gRPC client its status alone
/// (trailers-only), to others as text.
async fn answer(
    stream: &mut H2Stream,
    refusal: &Refusal,
    id: &str,
    grpc: bool,
) -> pingora::Result<()> {
    if grpc {
        return stream.write_response_header(Box::new(answers::grpc_answer(refusal, id)?), true);
    }
    let (header, body) = answers::text_answer(refusal, id)?;
    stream.write_response_header(Box::new(header), false)?;
    stream.write_body(body, true).await
}

/// The length a request's `content-length` gives its body, if it is one for this path: at
/// most [`MAX_BODY`], and no `expect`.
fn body_len(req: &RequestHeader) -> Option<usize> {
    if req.headers.contains_key(http::header::EXPECT) {
        return None;
    }
    let len = req.headers.get(http::header::CONTENT_LENGTH)?;
    let len: usize = len.to_str().ok()?.parse().ok()?;
    (len <= MAX_BODY).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_small_body_of_known_length_is_read_here() {
        let req = |fields: &[(&str, &str)]| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for (name, value) in fields {
                req.append_header(name.to_string(), *value).unwrap();
            }
            req
        };
        let max = MAX_BODY.to_string();
        let over = (MAX_BODY + 1).to_string();
        assert_eq!(body_len(&req(&[("content-length", "5")])), Some(5));
        assert_eq!(body_len(&req(&[("content-length", &max)])), Some(MAX_BODY));
        for fields in [
            &[][..],
            &[("content-length", over.as_str())],
            &[("content-length", "5"), ("expect", "100-continue")],
            &[("content-length", "-1")],
            &[("content-length", "5, 5")],
        ] {
            assert_eq!(body_len(&req(fields)), None, "{fields:?}");
        }
    }
}
