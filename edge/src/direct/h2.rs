//! h2 requests to a VM's HTTP/1.1 service, exchanged on the direct path's own upstream
//! connections.
//!
//! pingora reads an h2 stream's request, and the edge's proxy routes it; from there,
//! pingora's HTTP/1.1 client held h2c at 0.6-0.7x nginx (its pool's watcher task for
//! every connection put back, a `getpeername` for every one taken, its per-request
//! machinery: bench/RESULTS.md), where the edge's own answers over h2 run at twice
//! nginx's proxied rate. A request without a body, or with a small one of known length,
//! is sent here instead, from `request_filter`: its header is written as HTTP/1.1 for the
//! VM ([`message::h1_request`]), its body read whole under the client timeout and sent
//! with it, on a kept connection of the [`UpstreamPool`], and the answer goes back through
//! pingora's h2 session, its body decoded from its framing as it comes. Larger bodies (or
//! ones of unknown length), gRPC and h2c services stay pingora's. Interim answers (1xx)
//! are not passed on, and neither are a chunked answer's trailer fields.
//!
//! [`UpstreamPool`]: crate::upstream::UpstreamPool

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};
use tokio::net::TcpStream;

use super::message::{self, parse_answer, Answer, Body, Framing};
use super::{malformed_body, Direct, Failure};
use crate::activity::VmActivity;
use crate::answers::Refusal;

/// The largest request body an h2 request taken here may have: it is read whole before the
/// request goes to the VM (as nginx buffers a body), so an answer the VM gives before
/// reading all of it, or while reading it, cannot stall the exchange.
const MAX_BODY: usize = 64 * 1024;

/// What an h2 request taken here came to, when not the VM's whole answer.
#[derive(Debug)]
pub enum H2Failure {
    /// Nothing was sent to the client yet: it gets this answer.
    Refused(Refusal),
    /// The answer broke off (the VM's side or the client's, as the error says).
    Broken(Box<Error>),
}

impl From<Failure> for H2Failure {
    fn from(failure: Failure) -> H2Failure {
        match failure {
            Failure::Refuse(refusal) => H2Failure::Refused(refusal),
            Failure::Client(why) => H2Failure::Broken(broken(ErrorSource::Downstream, why)),
            Failure::Cut(why) => H2Failure::Broken(broken(ErrorSource::Upstream, why)),
        }
    }
}

fn broken(source: ErrorSource, why: &'static str) -> Box<Error> {
    let etype = match source {
        ErrorSource::Downstream => ErrorType::WriteError,
        _ => ErrorType::ReadError,
    };
    Error::create(etype, source, Some(why.into()), None)
}

/// Where a request routed to a running VM's HTTP/1.1 service goes, for [`Direct::serve_h2`].
pub struct H2Target<'a> {
    pub target: SocketAddr,
    pub host: &'a str,
    pub id: &'a str,
    pub activity: &'a VmActivity,
}

impl Direct {
    /// Whether a routed request is one for [`Direct::serve_h2`]: h2 from the client, not
    /// gRPC, to a service that is not h2c, with no body or one whose `content-length`
    /// says it is at most [`MAX_BODY`] (and no `expect`: the client would wait for a
    /// 100 before sending it).
    pub fn takes_h2(session: &mut Session, h2c: bool, grpc: bool) -> bool {
        session.is_http2()
            && !h2c
            && !grpc
            && session.req_header().method != Method::CONNECT
            && (session.is_body_empty() || body_len(session.req_header()).is_some())
    }

    /// The request to the VM and its answer back through `session`.
    pub async fn serve_h2(
        &self,
        session: &mut Session,
        to: &H2Target<'_>,
    ) -> Result<(), H2Failure> {
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let req = session.req_header();
        let head = req.method == Method::HEAD;
        // No side effects (RFC 9110 9.2.2): sent again when a kept connection turns out
        // closed before any answer.
        let retryable = matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let proto = if tls { "https" } else { "http" };
        let mut upstream = message::h1_request(req, to.host, client, proto, to.id);
        if !session.is_body_empty() {
            // Header and body go to the VM in one write.
            let len = body_len(session.req_header()).unwrap_or(0);
            self.read_body(session, len, &mut upstream).await?;
        }

        let mut buf = Vec::with_capacity(4096);
        let (mut tcp, answer, sent) = loop {
            let (mut tcp, reused) = self.send_header(to.target, &upstream, retryable).await?;
            let retry = reused && retryable;
            let sent = Instant::now();
            match self
                .read_final_answer(&mut tcp, head, to.id, &mut buf)
                .await?
            {
                Some(answer) => break (tcp, answer, sent),
                None if retry => continue,
                None => return Err(H2Failure::Refused(Refusal::BadUpstreamAnswer)),
            }
        };
        self.metrics.responded(sent.elapsed().as_secs_f64());
        let reusable = self
            .relay_h2(session, &mut tcp, answer, Bytes::from(buf), to.activity)
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
        session: &mut Session,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), H2Failure> {
        let start = out.len();
        out.reserve(len);
        loop {
            let read = tokio::time::timeout(self.timeouts.read, session.read_request_body());
            let chunk = match read.await {
                Err(_) => {
                    let why = "the client stopped sending its body";
                    let e = Error::create(
                        ErrorType::HTTPStatus(408),
                        ErrorSource::Downstream,
                        Some(why.into()),
                        None,
                    );
                    return Err(H2Failure::Broken(e));
                }
                Ok(Err(_)) => {
                    let e = broken(ErrorSource::Downstream, "the client went away");
                    return Err(H2Failure::Broken(e));
                }
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
            let e = broken(
                ErrorSource::Downstream,
                "the body is not its content-length",
            );
            return Err(H2Failure::Broken(e));
        }
        Ok(())
    }

    /// The VM's final answer header, parsed for pingora (interim answers are skipped);
    /// what was read past it is left in `buf`. `None` when the connection closed before
    /// any answer.
    async fn read_final_answer(
        &self,
        tcp: &mut TcpStream,
        head: bool,
        id: &str,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Answer<ResponseHeader>>, Failure> {
        let mut interim = false;
        loop {
            if let Some((answer, len)) = parse_answer::<ResponseHeader>(buf, head, id)? {
                buf.drain(..len);
                if answer.status >= 200 {
                    return Ok(Some(answer));
                }
                interim = true;
                continue;
            }
            if !self.read_answer_bytes(tcp, buf, interim).await? {
                return Ok(None);
            }
        }
    }

    /// A piece of the answer's body (`end`: the last) to the client. A client that stops
    /// reading (its flow-control window full) is cut off by the session's write timeout:
    /// the proxy sets it to the client timeout for every request, before this path is
    /// tried.
    async fn send(
        &self,
        session: &mut Session,
        data: Option<Bytes>,
        end: bool,
    ) -> Result<(), Failure> {
        session
            .write_response_body(data, end)
            .await
            .map_err(|e| match e.etype() {
                ErrorType::WriteTimedout => Failure::Client("the client stopped reading"),
                _ => Failure::Client("the client went away"),
            })
    }

    /// The answer's header, then its body as it arrives, decoded from its framing, to the
    /// client; whether the VM's connection may carry another request.
    async fn relay_h2(
        &self,
        session: &mut Session,
        tcp: &mut TcpStream,
        answer: Answer<ResponseHeader>,
        rest: Bytes,
        activity: &VmActivity,
    ) -> Result<bool, H2Failure> {
        let mut body = Body::new(answer.framing);
        session
            .write_response_header(Box::new(answer.header), false)
            .await
            .map_err(|_| Failure::Client("the client went away"))?;
        let mut reusable = answer.reusable;
        let until_close = answer.framing == Framing::UntilClose;
        let mut piece = rest;
        let mut buf = BytesMut::new();
        loop {
            let mut spans = Vec::new();
            let (take, end) = body
                .decode(&piece, &mut |span| spans.push(span))
                .map_err(malformed_body)?;
            reusable &= take == piece.len();
            let last = spans.len();
            for (i, span) in spans.into_iter().enumerate() {
                let data = piece.slice(span);
                activity.outbound(data.len());
                let fin = end && i + 1 == last;
                self.send(session, Some(data), fin).await?;
            }
            if end {
                if last == 0 {
                    self.send(session, None, true).await?;
                }
                return Ok(reusable);
            }
            if self.read_body_bytes(tcp, &mut buf, until_close).await? == 0 {
                self.send(session, None, true).await?;
                return Ok(false);
            }
            piece = buf.split().freeze();
        }
    }
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
