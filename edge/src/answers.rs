//! The edge's own answers: what a client sees when its request does not reach a VM.
//!
//! Each is one short line that says what happened and the request id, as plain text,
//! or, to a gRPC client (`content-type: application/grpc...`), as a trailers-only gRPC
//! response whose `grpc-status` follows the HTTP-to-gRPC table of the gRPC spec
//! (doc/http-grpc-status-mapping.md) and whose `grpc-message` is the same line.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use vmedge_model::VmStatus;

use crate::ids;

/// Why the edge answered itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request itself is wrong (the reason says how).
    BadRequest(&'static str),
    /// 404: unknown service or VM, or a malformed service host: one answer for all.
    Unknown,
    /// 408: the client stopped sending its request's body.
    ClientTimeout,
    /// 421: the host is not under `proxy.<domain>`.
    NotOurs,
    /// 431: the request's header is larger than the edge accepts.
    HeadersTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// 429: the VM's request rate limit is spent.
    RateLimited,
    /// 502: nothing accepted the connection on that port of the VM.
    NothingListening {
        /// The service port.
        port: u16,
    },
    /// 502: the VM's address is outside the prefixes this edge may dial.
    OutsidePrefixes,
    /// 503: the VM will not serve (stopped, deleting, error).
    Unavailable {
        /// Its status.
        status: VmStatus,
    },
    /// 503: the VM is paused and no wake hook is configured.
    CannotWake {
        /// Its status.
        status: VmStatus,
    },
    /// 504: the VM did not come up within `wake_timeout`.
    WakeTimeout,
    /// 504: the VM did not answer within the upstream timeout.
    UpstreamTimeout,
    /// 502: the VM closed the connection or reset the stream before its answer was
    /// complete, or answered with what is not HTTP/1.1 (or h2, to an h2c service).
    BadUpstreamAnswer,
}

impl Refusal {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Unknown => 404,
            Refusal::ClientTimeout => 408,
            Refusal::NotOurs => 421,
            Refusal::HeadersTooLarge { .. } => 431,
            Refusal::RateLimited => 429,
            Refusal::NothingListening { .. }
            | Refusal::OutsidePrefixes
            | Refusal::BadUpstreamAnswer => 502,
            Refusal::Unavailable { .. } | Refusal::CannotWake { .. } => 503,
            Refusal::WakeTimeout | Refusal::UpstreamTimeout => 504,
        }
    }

    /// The gRPC status code for a gRPC client (the spec's HTTP mapping; 400 is INTERNAL,
    /// 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, others UNKNOWN).
    pub fn grpc_status(&self) -> u8 {
        match self.status() {
            400 => 13,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        }
    }

    /// The one line that says what happened.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadRequest(why) => format!("bad request: {why}"),
            Refusal::Unknown => "no such service or VM".to_string(),
            Refusal::ClientTimeout => "the client stopped sending its body".to_string(),
            Refusal::NotOurs => "this host is not served here".to_string(),
            Refusal::HeadersTooLarge { limit } => {
                format!("the request header is larger than {limit} bytes")
            }
            Refusal::RateLimited => "too many requests for this VM; slow down".to_string(),
            Refusal::NothingListening { port } => {
                format!("nothing is listening on port {port} of the VM")
            }
            Refusal::OutsidePrefixes => {
                "the VM's address is outside the prefixes this edge may reach".to_string()
            }
            Refusal::Unavailable { status } => format!("the VM is {status}"),
            Refusal::CannotWake { status } => {
                format!("the VM is {status} and this edge has no wake hook")
            }
            Refusal::WakeTimeout => "the VM did not wake up in time".to_string(),
            Refusal::UpstreamTimeout => "the VM did not answer in time".to_string(),
            Refusal::BadUpstreamAnswer => "the VM's answer was cut off or malformed".to_string(),
        }
    }

    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Unknown => "unknown",
            Refusal::ClientTimeout => "client_timeout",
            Refusal::NotOurs => "not_ours",
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::RateLimited => "rate_limited",
            Refusal::NothingListening { .. } => "nothing_listening",
            Refusal::OutsidePrefixes => "outside_prefixes",
            Refusal::Unavailable { .. } => "unavailable",
            Refusal::CannotWake { .. } => "cannot_wake",
            Refusal::WakeTimeout => "wake_timeout",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::BadUpstreamAnswer => "bad_upstream_answer",
        }
    }
}

/// Is this a gRPC request (its answers must be gRPC statuses)?
pub fn is_grpc(session: &Session) -> bool {
    is_grpc_request(session.req_header())
}

/// Is `req` a gRPC request?
pub fn is_grpc_request(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Writes the answer for `refusal`. The connection is not kept after a 400 (the
/// request's framing cannot be trusted) or when the request body was not read.
pub async fn respond(
    session: &mut Session,
    refusal: &Refusal,
    request_id: &str,
    grpc: bool,
) -> pingora::Result<()> {
    if grpc {
        let header = grpc_answer(refusal, request_id)?;
        // Trailers-only: one HEADERS frame with END_STREAM, as gRPC clients expect it.
        if let ServerSession::H2(h2) = session.as_downstream_mut() {
            h2.write_response_header(Box::new(header), true)?;
            return Ok(());
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), true)
            .await?;
        session.as_downstream_mut().finish_body().await?;
        return Ok(());
    }
    let (header, body) = text_answer(refusal, request_id)?;
    if refusal.status() == 400 || !session.is_body_empty() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The gRPC answer for `refusal`: a header that is all there is (trailers-only), its
/// `grpc-status` and `grpc-message` saying what happened.
pub fn grpc_answer(refusal: &Refusal, request_id: &str) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(200, Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    header.insert_header("grpc-status", refusal.grpc_status().to_string())?;
    header.insert_header("grpc-message", percent_encode(&refusal.message()))?;
    if let Some(id) = ids::field_value(request_id) {
        header.insert_header(ids::FIELD, id)?;
    }
    Ok(header)
}

/// The text answer for `refusal`: its header and its body.
pub fn text_answer(
    refusal: &Refusal,
    request_id: &str,
) -> pingora::Result<(ResponseHeader, Bytes)> {
    let body = Bytes::from(text_page(refusal, request_id));
    let mut header = ResponseHeader::build(refusal.status(), Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(id) = ids::field_value(request_id) {
        header.insert_header(ids::FIELD, id)?;
    }
    Ok((header, body))
}

/// The text answer's body: the status, the line and the request id.
pub fn text_page(refusal: &Refusal, request_id: &str) -> String {
    let status = refusal.status();
    format!(
        "{status} {}: {}\nrequest id: {request_id}\n",
        reason_phrase(status),
        refusal.message()
    )
}

/// The status line's reason phrase for `status`.
pub fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec): printable ASCII but `%` as is.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_grpc_codes() {
        let cases = [
            (Refusal::BadRequest("x"), 400, 13),
            (Refusal::Unknown, 404, 12),
            (Refusal::NotOurs, 421, 2),
            (Refusal::RateLimited, 429, 14),
            (Refusal::NothingListening { port: 80 }, 502, 14),
            (
                Refusal::Unavailable {
                    status: VmStatus::Stopped,
                },
                503,
                14,
            ),
            (Refusal::WakeTimeout, 504, 14),
        ];
        for (refusal, status, grpc) in cases {
            assert_eq!(refusal.status(), status, "{refusal:?}");
            assert_eq!(refusal.grpc_status(), grpc, "{refusal:?}");
        }
        assert_eq!(
            Refusal::NothingListening { port: 8080 }.message(),
            "nothing is listening on port 8080 of the VM"
        );
        assert_eq!(
            Refusal::Unavailable {
                status: VmStatus::Deleting
            }
            .message(),
            "the VM is deleting"
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%c\né"), "a b%25c%0A%C3%A9");
    }
}
