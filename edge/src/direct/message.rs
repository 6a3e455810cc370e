//! HTTP/1.1 messages on the direct path: a client's request header rewritten for the
//! VM, the VM's answer header rewritten for the client, and where an answer's body ends.
//! httparse parses; what is kept, dropped, added or refused is decided here.

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::date;

use crate::ids::{self, RequestIds};
use crate::proxy::header_size;

/// A request that is not one for the direct path: pingora takes it, from the same bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Declined;

/// An answer, or a chunked body, that is not HTTP/1.1 the edge can pass on.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed;

/// The most header fields a request or an answer may have here (a request with more is
/// declined, an answer with more is a bad answer).
pub(super) const MAX_FIELDS: usize = 64;

/// A request taken, parsed from the client's bytes.
pub(super) struct Request {
    /// The header as the VM gets it: the client's request line and fields, less
    /// hop-by-hop and forwarding fields, plus the edge's own; then the body's first bytes.
    pub(super) upstream: Vec<u8>,
    /// Where the method, the path and the host are in `upstream`.
    pub(super) method: Range<usize>,
    pub(super) path: Range<usize>,
    pub(super) host: Range<usize>,
    /// The length of the client's header.
    pub(super) header_len: usize,
    /// The body's length (Content-Length; none is 0).
    pub(super) body_len: u64,
    /// The client asked for the connection to be closed after this request.
    pub(super) close: bool,
    pub(super) id: String,
}

impl Request {
    pub(super) fn text(&self, range: &Range<usize>) -> &str {
        std::str::from_utf8(&self.upstream[range.clone()]).unwrap_or_default()
    }

    pub(super) fn is_head(&self) -> bool {
        &self.upstream[self.method.clone()] == b"HEAD"
    }

    /// A request that can be sent again on a new connection when a kept-alive one
    /// turns out closed before any answer: no side effects (RFC 9110 9.2.2), body all sent.
    pub(super) fn can_retry(&self, body_unsent: u64) -> bool {
        body_unsent == 0
            && matches!(
                &self.upstream[self.method.clone()],
                b"GET" | b"HEAD" | b"OPTIONS"
            )
    }
}

/// How the end of an answer's body is found (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    /// The body is known to end within the `read` bytes that came with the header.
    pub(super) fn ends_within(self, read: usize) -> bool {
        match self {
            Framing::Empty => true,
            Framing::Length(n) => n <= read as u64,
            Framing::Chunked | Framing::UntilClose => false,
        }
    }
}

/// An answer's header, read from the VM.
pub(super) struct Answer<H = Vec<u8>> {
    /// The header as the client gets it: the bytes for an HTTP/1.1 client (without the
    /// connection field), pingora's header for an h2 one.
    pub(super) header: H,
    pub(super) status: u16,
    pub(super) framing: Framing,
    /// The VM keeps the connection open after this answer.
    pub(super) reusable: bool,
}

/// The request in `buf` if it is complete and one for the direct path (its header at
/// most `limit` bytes); `Ok(None)` while it is incomplete; `Err` when it is declined.
pub(super) fn parse_request(
    buf: &[u8],
    limit: usize,
    client: Option<SocketAddr>,
    ids: &RequestIds,
) -> Result<Option<Request>, Declined> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut fields);
    let header_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= limit => n,
        Ok(httparse::Status::Partial) if buf.len() <= limit => return Ok(None),
        _ => return Err(Declined),
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(Declined);
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Err(Declined);
    }
    let mut upstream = Vec::with_capacity(header_len + 192);
    upstream.extend_from_slice(method.as_bytes());
    let method_range = 0..upstream.len();
    upstream.push(b' ');
    let path_start = upstream.len();
    upstream.extend_from_slice(path.as_bytes());
    let path_range = path_start..upstream.len();
    upstream.extend_from_slice(b" HTTP/1.1\r\n");

    let (mut host, mut hosts, mut body_len, mut close, mut sent_id) = (None, 0, None, false, None);
    for field in parsed.headers.iter() {
        let (name, value) = (field.name, field.value);
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("host") {
            hosts += 1;
            host = std::str::from_utf8(value).ok();
        } else if is("content-length") {
            if body_len.is_some() {
                return Err(Declined);
            }
            body_len = Some(content_length(value).ok_or(Declined)?);
        } else if is("connection") {
            close |= connection_close(value).ok_or(Declined)?;
            continue;
        } else if is("transfer-encoding")
            || is("upgrade")
            || is("expect")
            || is("te")
            || (is("content-type") && value.starts_with(b"application/grpc"))
        {
            // Chunked bodies, upgrades, 100-continue and gRPC are pingora's.
            return Err(Declined);
        } else if is("x-request-id") {
            sent_id = Some(value);
            continue;
        }
        if replaced_on_the_way(name) {
            continue;
        }
        upstream.extend_from_slice(name.as_bytes());
        upstream.extend_from_slice(b": ");
        upstream.extend_from_slice(value);
        upstream.extend_from_slice(b"\r\n");
    }
    let (Some(host), 1) = (host, hosts) else {
        return Err(Declined);
    };
    let id = ids.keep_or_make(sent_id);
    let host_range = edge_fields(&mut upstream, client, "http", host, &id);
    Ok(Some(Request {
        upstream,
        method: method_range,
        path: path_range,
        host: host_range,
        header_len,
        body_len: body_len.unwrap_or(0),
        close,
        id,
    }))
}

/// An answer's header as the client gets it, written field by field as the VM's is read.
pub(super) trait AnswerHeader: Sized {
    /// What the VM's header is parsed from.
    type Source: AsRef<[u8]> + ?Sized;
    /// The status line; the VM's header is the first `len` bytes of `source`, with
    /// `fields` fields.
    fn start(
        source: &Self::Source,
        status: u16,
        reason: &str,
        len: usize,
        fields: usize,
    ) -> Result<Self, Malformed>;
    /// A field of the VM's passed on (`value` lies within the source).
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), Malformed>;
    /// The request's id (the VM's answer had none).
    fn request_id(&mut self, id: &str) -> Result<(), Malformed>;
    /// The date field, now (the answer had none).
    fn date(&mut self);
}

/// For an HTTP/1.1 client: the bytes, fields as the VM wrote them.
impl AnswerHeader for Vec<u8> {
    type Source = [u8];

    fn start(_: &[u8], status: u16, reason: &str, len: usize, _: usize) -> Result<Self, Malformed> {
        let mut header = Vec::with_capacity(len + 96);
        let _ = write!(header, "HTTP/1.1 {status} {reason}\r\n");
        Ok(header)
    }

    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), Malformed> {
        self.extend_from_slice(name.as_bytes());
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
        Ok(())
    }

    fn request_id(&mut self, id: &str) -> Result<(), Malformed> {
        self.field("x-request-id", id.as_bytes())
    }

    fn date(&mut self) {
        let _ = self.field("date", date::get_cached_date().as_bytes());
    }
}

/// For an h2 client: an `http` header, which becomes pingora's once whole. Fields only the
/// connection they came on needs are not passed on (RFC 9113 8.2.2); the body comes
/// decoded. Each value is a slice of the bytes it is parsed from, not a copy: pingora
/// clones the header as it sends it, and a slice's clone is a count. Copies and their
/// clones were 13 of an h2 request's 28 allocations (bench/RESULTS.md).
pub(super) struct H2Header {
    parts: http::response::Parts,
    source: Bytes,
}

impl H2Header {
    /// The header for pingora's h2 session.
    pub(super) fn into_response(self) -> ResponseHeader {
        ResponseHeader::from(self.parts)
    }

    #[cfg(test)]
    fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }
}

impl AnswerHeader for H2Header {
    type Source = Bytes;

    fn start(
        source: &Bytes,
        status: u16,
        _reason: &str,
        _len: usize,
        fields: usize,
    ) -> Result<Self, Malformed> {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = http::StatusCode::from_u16(status).map_err(|_| Malformed)?;
        // Room for the edge's fields too.
        parts.headers = http::HeaderMap::with_capacity(fields + 2);
        Ok(H2Header {
            parts,
            source: source.clone(),
        })
    }

    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), Malformed> {
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("upgrade") {
            return Ok(());
        }
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| Malformed)?;
        let mut value =
            HeaderValue::from_maybe_shared(self.source.slice_ref(value)).map_err(|_| Malformed)?;
        if name == ids::FIELD {
            // A VM that echoes the request id: see `ids::field_value`.
            value.set_sensitive(true);
        }
        self.parts.headers.append(name, value);
        Ok(())
    }

    fn request_id(&mut self, id: &str) -> Result<(), Malformed> {
        let value = ids::field_value(id).ok_or(Malformed)?;
        self.parts.headers.append(ids::FIELD, value);
        Ok(())
    }

    fn date(&mut self) {
        self.parts
            .headers
            .append(http::header::DATE, date::get_cached_date());
    }
}

/// Fields a request loses on its way to the VM, whatever its version: hop-by-hop ones
/// no `Connection` field names (RFC 9110 7.6.1), and the forwarding fields the edge
/// writes itself ([`edge_fields`]).
fn replaced_on_the_way(name: &str) -> bool {
    [
        "keep-alive",
        "proxy-connection",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// The edge's own fields and the header's end, after the client's fields; where the host
/// is in `upstream`. The edge is the first hop: what a client says about earlier hops
/// was not kept.
fn edge_fields(
    upstream: &mut Vec<u8>,
    client: Option<SocketAddr>,
    proto: &str,
    host: &str,
    id: &str,
) -> Range<usize> {
    upstream.extend_from_slice(b"x-forwarded-for: ");
    if let Some(client) = client {
        let _ = write!(upstream, "{}", client.ip().to_canonical());
    }
    let _ = write!(
        upstream,
        "\r\nx-forwarded-proto: {proto}\r\nx-forwarded-host: "
    );
    let host_start = upstream.len();
    upstream.extend_from_slice(host.as_bytes());
    let host_range = host_start..upstream.len();
    upstream.extend_from_slice(b"\r\nx-request-id: ");
    upstream.extend_from_slice(id.as_bytes());
    upstream.extend_from_slice(b"\r\n\r\n");
    host_range
}

/// An h2 request with no body, as the HTTP/1.1 request header the VM gets (RFC 9113
/// 8.3.1): its method and path, `host` from its authority, its fields less those only
/// its connection needed, its cookies in one field (8.2.3), and the edge's own fields.
pub(super) fn h1_request(
    req: &RequestHeader,
    host: &str,
    client: Option<SocketAddr>,
    proto: &str,
    id: &str,
    body: usize,
) -> Vec<u8> {
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    // Room for the request line, the client's fields, the edge's (an IPv6 address among
    // them: 192 bytes cover their names and separators) and the body: one allocation.
    let size = req.method.as_str().len() + path.len() + 2 * host.len() + id.len();
    let mut upstream = Vec::with_capacity(size + header_size(req) + 192 + body);
    let _ = write!(
        upstream,
        "{} {path} HTTP/1.1\r\nhost: {host}\r\n",
        req.method
    );
    let mut cookies = 0;
    for (name, value) in &req.headers {
        let name = name.as_str();
        // Written here (host, cookie, the id), or fields of a connection h2 has none of.
        let written_here = matches!(name, "host" | "cookie" | "x-request-id");
        let connection_field =
            matches!(name, "connection" | "transfer-encoding" | "upgrade" | "te");
        if written_here || connection_field || replaced_on_the_way(name) {
            continue;
        }
        let _ = upstream.field(name, value.as_bytes());
    }
    for cookie in req.headers.get_all(http::header::COOKIE) {
        upstream.extend_from_slice(if cookies == 0 { b"cookie: " } else { b"; " });
        upstream.extend_from_slice(cookie.as_bytes());
        cookies += 1;
    }
    if cookies > 0 {
        upstream.extend_from_slice(b"\r\n");
    }
    edge_fields(&mut upstream, client, proto, host, id);
    upstream
}

/// An h2 request as the request the VM's h2c service gets: its method and path, the
/// public host as its authority, its fields less those of its connection (`te` only as
/// `trailers`, which gRPC needs: RFC 9113 8.2.2) and the forwarding fields, and the
/// edge's own fields. `None` when the host or path do not make a URI.
pub(super) fn h2c_request(
    req: &RequestHeader,
    host: &str,
    client: Option<SocketAddr>,
    proto: &'static str,
    id: &str,
) -> Option<http::Request<()>> {
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(path)
        .build()
        .ok()?;
    let mut upstream = http::Request::builder()
        .method(req.method.clone())
        .uri(uri)
        .body(())
        .ok()?;
    let fields = upstream.headers_mut();
    fields.reserve(req.headers.len() + 4);
    for (name, value) in &req.headers {
        let n = name.as_str();
        let connection_field = matches!(n, "connection" | "transfer-encoding" | "upgrade")
            || (n == "te" && value.as_bytes() != b"trailers");
        let written_here = matches!(n, "host" | "x-request-id");
        if connection_field || written_here || replaced_on_the_way(n) {
            continue;
        }
        fields.append(name.clone(), value.clone());
    }
    // Names and the scheme from static text, the address written on the stack: one
    // allocation for each value that is the request's own, none for the rest.
    let mut forwarded_for = [0u8; 64];
    let mut room = &mut forwarded_for[..];
    if let Some(client) = client {
        let _ = write!(room, "{}", client.ip().to_canonical());
    }
    let written = 64 - room.len();
    let edge = [
        (
            "x-forwarded-for",
            HeaderValue::from_bytes(&forwarded_for[..written]).ok()?,
        ),
        ("x-forwarded-proto", HeaderValue::from_static(proto)),
        ("x-forwarded-host", HeaderValue::from_str(host).ok()?),
        ("x-request-id", ids::field_value(id)?),
    ];
    for (name, value) in edge {
        fields.insert(HeaderName::from_static(name), value);
    }
    Some(upstream)
}

/// The answer header at the start of `buf`, rewritten for the client, and its length;
/// `None` while it is incomplete.
pub(super) fn parse_answer<H: AnswerHeader>(
    source: &H::Source,
    head: bool,
    id: &str,
) -> Result<Option<(Answer<H>, usize)>, Malformed> {
    let buf = source.as_ref();
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Malformed),
    };
    let (Some(status), Some(version)) = (parsed.code, parsed.version) else {
        return Err(Malformed);
    };
    // No upgrade was asked for, so none may be answered.
    if status == 101 || !(100..600).contains(&status) {
        return Err(Malformed);
    }
    if status < 200 {
        let answer = Answer {
            header: H::start(source, status, parsed.reason.unwrap_or_default(), len, 0)?,
            status,
            framing: Framing::Empty,
            reusable: true,
        };
        return Ok(Some((answer, len)));
    }
    let fields = &*parsed.headers;
    let is = |name: &str, n: &str| name.eq_ignore_ascii_case(n);
    let coded = fields.iter().any(|f| is(f.name, "transfer-encoding"));
    let (mut length, mut chunked, mut close) = (None, false, version == 0);
    let (mut has_id, mut has_date) = (false, false);
    let reason = parsed.reason.unwrap_or_default();
    let mut header = H::start(source, status, reason, len, fields.len())?;
    for field in fields {
        let (name, value) = (field.name, field.value);
        if is(name, "connection") {
            close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        }
        if is(name, "keep-alive") || is(name, "proxy-connection") {
            continue;
        }
        if is(name, "transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if is(name, "content-length") {
            let n = content_length(value).ok_or(Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed);
            }
            length = Some(n);
            if coded {
                // Transfer-Encoding wins (RFC 9112 6.3); the length is not passed on.
                continue;
            }
        } else if is(name, "x-request-id") {
            has_id = true;
        } else if is(name, "date") {
            has_date = true;
        }
        header.field(name, value)?;
    }
    if !has_id {
        header.request_id(id)?;
    }
    if !has_date {
        // A proxy adds the date an answer lacks (RFC 9110 6.6.1).
        header.date();
    }
    let framing = match (head || status == 204 || status == 304, coded, length) {
        (true, _, _) => Framing::Empty,
        (false, true, _) if chunked => Framing::Chunked,
        (false, true, _) => Framing::UntilClose,
        (false, false, Some(n)) => Framing::Length(n),
        (false, false, None) => Framing::UntilClose,
    };
    // A message with both framings may be a smuggling attempt: its connection is not kept.
    let both = coded && length.is_some();
    let reusable = !close && !both && framing != Framing::UntilClose;
    let answer = Answer {
        header,
        status,
        framing,
        reusable,
    };
    Ok(Some((answer, len)))
}

/// Where an answer's body ends, fed its bytes as they come.
pub(super) enum Body {
    Empty,
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

impl Body {
    pub(super) fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty => Body::Empty,
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(ChunkedEnd::default()),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    /// How many of `bytes` belong to the body, and whether it is complete with them.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), Malformed> {
        self.decode(bytes, &mut |_| {})
    }

    /// [`Body::feed`], with where the body's content is in `bytes` (its chunks' data,
    /// without their framing) given to `data`, in order.
    pub(super) fn decode(
        &mut self,
        bytes: &[u8],
        data: &mut impl FnMut(Range<usize>),
    ) -> Result<(usize, bool), Malformed> {
        let (take, end) = match self {
            Body::Empty => (0, true),
            Body::Length(left) => {
                let take = clamp(*left).min(bytes.len());
                *left -= take as u64;
                (take, *left == 0)
            }
            Body::Chunked(chunks) => {
                return Ok(match chunks.feed(bytes, data)? {
                    Some(end) => (end, true),
                    None => (bytes.len(), false),
                })
            }
            Body::UntilClose => (bytes.len(), false),
        };
        if take > 0 {
            data(0..take);
        }
        Ok((take, end))
    }
}

/// Finds the end of a chunked body (RFC 9112 section 7.1): chunk sizes in hex, each
/// chunk's data and CRLF, a zero-size chunk, trailer fields and an empty line. Only
/// the framing is read: the bytes are passed on as they are, or (for an h2 client) the
/// chunks' data, where the reader says it is.
#[derive(Debug, Default)]
pub(super) struct ChunkedEnd {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The size's hex digits.
    #[default]
    Size,
    /// After the size: an extension, whitespace, up to the line's end.
    SizeRest,
    /// The line feed after the size line's carriage return.
    SizeLf,
    /// Data bytes still to come.
    Data(u64),
    /// The carriage return after a chunk's data.
    DataCr,
    /// The line feed after it.
    DataLf,
    /// The start of a trailer line, or of the final empty line.
    LineStart,
    /// Inside a trailer line.
    Line,
    /// The line feed that ends a trailer line.
    LineLf,
    /// The final line feed.
    EndLf,
}

impl ChunkedEnd {
    /// Reads `bytes`: `Some(n)` when the body ends after the first `n` of them, `None`
    /// when it goes on, `Err` when the framing is broken. Where chunks' data is in
    /// `bytes` goes to `data`.
    fn feed(
        &mut self,
        bytes: &[u8],
        data: &mut impl FnMut(Range<usize>),
    ) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // Sixteen hex digits fill a u64: more would overflow.
                        if self.digits == 15 {
                            return Err(Malformed);
                        }
                        self.digits += 1;
                        let digit = (b as char).to_digit(16).unwrap_or_default();
                        self.size = self.size * 16 + u64::from(digit);
                        Chunk::Size
                    }
                    _ if self.digits == 0 => return Err(Malformed),
                    b'\r' => Chunk::SizeLf,
                    b';' | b' ' | b'\t' => Chunk::SizeRest,
                    _ => return Err(Malformed),
                },
                Chunk::SizeRest => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(Malformed),
                    _ => Chunk::SizeRest,
                },
                Chunk::SizeLf if b == b'\n' => {
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    if size == 0 {
                        Chunk::LineStart
                    } else {
                        Chunk::Data(size)
                    }
                }
                Chunk::Data(left) => {
                    let take = clamp(left).min(bytes.len() - i);
                    data(i..i + take);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size,
                Chunk::LineStart if b == b'\r' => Chunk::EndLf,
                Chunk::LineStart | Chunk::Line if b != b'\n' && b != b'\r' => Chunk::Line,
                Chunk::Line if b == b'\r' => Chunk::LineLf,
                Chunk::LineLf if b == b'\n' => Chunk::LineStart,
                Chunk::EndLf if b == b'\n' => return Ok(Some(i + 1)),
                _ => return Err(Malformed),
            };
            i += 1;
        }
        Ok(None)
    }
}

/// `u64` as `usize`, saturating (a body longer than memory is never held anyway).
pub(super) fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A Content-Length value: digits only (RFC 9110 8.6), at most 18 of them.
fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Whether a Connection field asks to close; `None` when it names anything but
/// `keep-alive` and `close` (an upgrade, a hop-by-hop field: pingora's to handle).
fn connection_close(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
            return None;
        }
    }
    Some(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Request>, Declined> {
        let client = "[fd5e:ed00::9]:4000".parse().ok();
        parse_request(raw.as_bytes(), 32 * 1024, client, &RequestIds::new())
    }

    fn upstream(raw: &str) -> String {
        let req = parse(raw).unwrap().unwrap();
        String::from_utf8(req.upstream).unwrap()
    }

    #[test]
    fn a_plain_request_is_rewritten_for_the_vm() {
        let raw = "GET /a?b=c HTTP/1.1\r\nHost: web--x.proxy.test\r\nUser-Agent: wrk\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\
                   X-Request-Id: abc-1\r\n\r\nnext";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.header_len, raw.len() - 4);
        assert_eq!(req.text(&req.method), "GET");
        assert_eq!(req.text(&req.path), "/a?b=c");
        assert_eq!(req.text(&req.host), "web--x.proxy.test");
        assert_eq!(
            (req.body_len, req.close, req.id.as_str()),
            (0, false, "abc-1")
        );
        assert_eq!(
            String::from_utf8(req.upstream).unwrap(),
            "GET /a?b=c HTTP/1.1\r\nHost: web--x.proxy.test\r\nUser-Agent: wrk\r\n\
             x-forwarded-for: fd5e:ed00::9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: web--x.proxy.test\r\nx-request-id: abc-1\r\n\r\n"
        );
    }

    #[test]
    fn a_made_id_a_length_and_a_close_are_read() {
        let up = upstream("POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\n\r\n");
        assert!(up.contains("content-length: 12\r\n"), "{up}");
        let id = up.split("x-request-id: ").nth(1).unwrap();
        assert_eq!(id.len(), 24 + 4, "{id:?}");
        let req = parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(req.close);
        // Only a request without side effects, all of it sent, goes again.
        assert!(req.can_retry(0));
        assert!(!req.can_retry(1));
        let post = parse("POST / HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!post.can_retry(0));
    }

    #[test]
    fn an_incomplete_header_is_waited_for() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: h\r\n"), Ok(None)));
        assert!(matches!(parse("GE"), Ok(None)));
    }

    #[test]
    fn declines_what_pingora_must_serve() {
        for raw in [
            // framing and upgrades
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, TE\r\nTE: trailers\r\n\r\n",
            // hosts and targets
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            // versions, gRPC, garbage
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Type: application/grpc\r\n\r\n",
            "GET / HTTP/1.1\r\nHost h\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(parse(raw).is_err(), "taken: {raw:?}");
        }
        // Too large, complete or not.
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(40_000)
        );
        assert!(parse(&big).is_err());
        assert!(parse(&big[..35_000]).is_err());
    }

    fn answer(raw: &str, head: bool) -> (Answer, usize) {
        match parse_answer::<Vec<u8>>(raw.as_bytes(), head, "id-1") {
            Ok(Some(a)) => a,
            Ok(None) => panic!("incomplete: {raw:?}"),
            Err(e) => panic!("refused {raw:?}: {e:?}"),
        }
    }

    #[test]
    fn an_answer_is_framed_and_rewritten_for_the_client() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\
                   Keep-Alive: timeout=5\r\nDate: x\r\n\r\nhello";
        let (a, len) = answer(raw, false);
        assert_eq!(len, raw.len() - 5);
        assert_eq!(
            (a.status, a.framing, a.reusable),
            (200, Framing::Length(5), true)
        );
        assert_eq!(
            String::from_utf8(a.header).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\nx-request-id: id-1\r\n"
        );

        let framing = |raw: &str, head| {
            let (a, _) = answer(raw, head);
            (a.framing, a.reusable)
        };
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), (Framing::Chunked, true));
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(both, false), (Framing::Chunked, false));
        let (a, _) = answer(both, false);
        assert!(!String::from_utf8(a.header)
            .unwrap()
            .contains("Content-Length"));
        let coded = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(framing(coded, false), (Framing::UntilClose, false));
        let none = "HTTP/1.1 200 OK\r\nX-Request-Id: mine\r\n\r\n";
        assert_eq!(framing(none, false), (Framing::UntilClose, false));
        let (a, _) = answer(none, false);
        let header = String::from_utf8(a.header).unwrap();
        assert!(!header.contains("id-1"), "{header}");
        assert!(header.contains("\r\ndate: "), "no date added: {header}");
        let old = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old, false), (Framing::Length(0), false));
        let close = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(framing(close, false), (Framing::Length(0), false));
        for empty in [
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        ] {
            assert_eq!(framing(empty, false), (Framing::Empty, true), "{empty}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true),
            (Framing::Empty, true)
        );
        let (early, _) = answer("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false);
        assert_eq!(early.status, 103);
    }

    #[test]
    fn broken_answers_are_refused() {
        for raw in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 999 Nope\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_answer::<Vec<u8>>(raw.as_bytes(), false, "i"),
                    Err(Malformed)
                ),
                "taken: {raw:?}"
            );
        }
        assert!(matches!(
            parse_answer::<Vec<u8>>(b"HTTP/1.1 200 OK\r\n", false, "i"),
            Ok(None)
        ));
    }

    const CHUNKED: &[u8] =
        b"5\r\nhello\r\n1a;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: t\r\n\r\n";

    #[test]
    fn a_chunked_body_ends_where_its_framing_says_however_it_is_cut() {
        let mut whole = CHUNKED.to_vec();
        whole.extend_from_slice(b"HTTP/1.1 next");
        assert_eq!(
            ChunkedEnd::default().feed(&whole, &mut |_| {}),
            Ok(Some(CHUNKED.len()))
        );
        // Every split into two reads, and byte by byte.
        for cut in 0..CHUNKED.len() {
            let mut end = ChunkedEnd::default();
            assert_eq!(
                end.feed(&CHUNKED[..cut], &mut |_| {}),
                Ok(None),
                "cut at {cut}"
            );
            assert_eq!(
                end.feed(&whole[cut..], &mut |_| {}),
                Ok(Some(CHUNKED.len() - cut)),
                "cut at {cut}"
            );
        }
        let mut end = ChunkedEnd::default();
        let last = CHUNKED.len() - 1;
        for (i, b) in CHUNKED.iter().enumerate() {
            let want = if i == last { Some(1) } else { None };
            assert_eq!(
                end.feed(std::slice::from_ref(b), &mut |_| {}),
                Ok(want),
                "byte {i}"
            );
        }
        assert_eq!(
            ChunkedEnd::default().feed(b"0\r\n\r\n", &mut |_| {}),
            Ok(Some(5))
        );
    }

    #[test]
    fn a_chunked_body_decodes_to_its_chunks_data_however_it_is_cut() {
        let content = b"helloabcdefghijklmnopqrstuvwxyz";
        for cut in 0..CHUNKED.len() {
            let mut body = Body::new(Framing::Chunked);
            let mut got = Vec::new();
            for piece in [&CHUNKED[..cut], &CHUNKED[cut..]] {
                let mut spans = Vec::new();
                let taken = body.decode(piece, &mut |span| spans.push(span));
                assert_eq!(taken.map(|(n, _)| n), Ok(piece.len()), "cut at {cut}");
                spans
                    .into_iter()
                    .for_each(|span| got.extend_from_slice(&piece[span]));
            }
            assert_eq!(got, content, "cut at {cut}");
        }
        let mut spans = Vec::new();
        let length = Body::new(Framing::Length(3)).decode(b"abcdef", &mut |s| spans.push(s));
        assert_eq!(length, Ok((3, true)));
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0], 0..3);
    }

    /// An h2 request as pingora's h2 server hands it over: `uri` absolute, with `fields`.
    fn h2_request(method: &str, uri: &str, fields: &[(&'static str, &str)]) -> RequestHeader {
        let uri: http::Uri = uri.parse().unwrap();
        let path = uri.path_and_query().unwrap().as_str().as_bytes();
        let mut req = RequestHeader::build(method, path, None).unwrap();
        req.set_uri(uri);
        for (name, value) in fields {
            req.append_header(*name, *value).unwrap();
        }
        req
    }

    #[test]
    fn only_a_body_that_was_read_whole_is_known_to_end() {
        assert!(Framing::Empty.ends_within(0));
        assert!(Framing::Length(5).ends_within(5));
        assert!(!Framing::Length(6).ends_within(5));
        assert!(!Framing::Chunked.ends_within(4096));
        assert!(!Framing::UntilClose.ends_within(4096));
    }

    #[test]
    fn an_h2_request_becomes_an_http1_header_for_the_vm() {
        let fields = [
            ("accept", "*/*"),
            ("cookie", "a=1"),
            ("te", "trailers"),
            ("connection", "keep-alive"),
            ("x-forwarded-for", "203.0.113.9"),
            ("cookie", "b=2"),
            ("x-request-id", "theirs"),
        ];
        let req = h2_request("GET", "http://web--x.proxy.test/a/b?c=d", &fields);
        let client = "[fd5e:ed00::7]:4000".parse().ok();
        let out = h1_request(&req, "web--x.proxy.test", client, "https", "id-9", 0);
        assert!(out.len() <= out.capacity() && out.capacity() < 2 * out.len());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: web--x.proxy.test\r\naccept: */*\r\n\
             cookie: a=1; b=2\r\nx-forwarded-for: fd5e:ed00::7\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: web--x.proxy.test\r\nx-request-id: id-9\r\n\r\n"
        );
    }

    #[test]
    fn an_h2_request_to_an_h2c_service_gets_the_edge_fields() {
        let fields = [
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("connection", "keep-alive"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "theirs"),
        ];
        let req = h2_request("POST", "http://api--x.proxy.test/pkg.Svc/Call", &fields);
        let host = "api--x.proxy.test";
        // An IPv4 client on a dual-stack socket is named by its IPv4 address.
        for (client, named) in [
            ("[::ffff:198.18.0.7]:4000", "198.18.0.7"),
            ("[fd5e:ed00::7]:4000", "fd5e:ed00::7"),
        ] {
            let up = h2c_request(&req, host, client.parse().ok(), "https", "id-3").unwrap();
            assert_eq!(up.uri(), "http://api--x.proxy.test/pkg.Svc/Call");
            let fields: Vec<(&str, &[u8])> = up
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            assert_eq!(
                fields,
                [
                    ("content-type", &b"application/grpc"[..]),
                    ("te", b"trailers"),
                    ("x-forwarded-for", named.as_bytes()),
                    ("x-forwarded-proto", b"https"),
                    ("x-forwarded-host", host.as_bytes()),
                    ("x-request-id", b"id-3"),
                ]
            );
        }
        let up = h2c_request(&req, host, None, "http", "id-4").unwrap();
        assert_eq!(up.headers()["x-forwarded-for"], "");
        // Only the id is never indexed (see `ids::field_value`).
        let never: Vec<&str> = up
            .headers()
            .iter()
            .filter(|(_, v)| v.is_sensitive())
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(never, ["x-request-id"]);
    }

    #[test]
    fn an_answer_for_an_h2_client_keeps_no_field_of_its_connection() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\
                    Keep-Alive: timeout=5\r\nX-Thing: 1\r\n\r\n";
        let source = Bytes::from_static(raw);
        let Ok(Some((answer, len))) = parse_answer::<H2Header>(&source, false, "id-2") else {
            panic!("not parsed");
        };
        assert_eq!(
            (len, answer.status, answer.framing),
            (raw.len(), 200, Framing::Chunked)
        );
        let fields = answer.header.headers();
        let names: Vec<&str> = fields.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-thing", "x-request-id", "date"]);
        assert_eq!(fields["x-request-id"], "id-2");
        assert!(fields["x-request-id"].is_sensitive());
        assert!(!fields["x-thing"].is_sensitive() && !fields["date"].is_sensitive());
        // The VM's values are where they were read, not copies.
        let value = fields["x-thing"].as_bytes().as_ptr_range();
        assert!(raw.as_ptr_range().contains(&value.start), "a copy");
        assert_eq!(answer.header.into_response().status, 200);
    }

    #[test]
    fn a_request_id_the_vm_echoes_is_never_indexed_either() {
        let raw = b"HTTP/1.1 204 No Content\r\nX-Request-ID: theirs\r\nX-Thing: 1\r\n\r\n";
        let source = Bytes::from_static(raw);
        let Ok(Some((answer, _))) = parse_answer::<H2Header>(&source, false, "id-5") else {
            panic!("not parsed");
        };
        let fields = answer.header.headers();
        assert_eq!(fields.get_all("x-request-id").iter().count(), 1);
        assert_eq!(fields["x-request-id"], "theirs");
        assert!(fields["x-request-id"].is_sensitive());
        assert!(!fields["x-thing"].is_sensitive());
    }

    #[test]
    fn broken_chunk_framing_is_an_error() {
        for raw in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX\r\n",
            b"5\nhello\r\n",
            b"10000000000000000\r\n",
            b"0\r\nTrailer: t\n\r\n",
            b"0\r\n\n",
        ] {
            assert_eq!(
                ChunkedEnd::default().feed(raw, &mut |_| {}),
                Err(Malformed),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn a_body_takes_its_bytes_and_no_more() {
        let mut body = Body::new(Framing::Length(4));
        assert_eq!(body.feed(b"ab"), Ok((2, false)));
        assert_eq!(body.feed(b"cdEXTRA"), Ok((2, true)));
        assert_eq!(Body::new(Framing::Empty).feed(b"x"), Ok((0, true)));
        assert_eq!(Body::new(Framing::UntilClose).feed(b"xyz"), Ok((3, false)));
    }

    #[test]
    fn field_values() {
        assert_eq!(content_length(b" 42 "), Some(42));
        assert_eq!(content_length(b"0"), Some(0));
        for bad in [&b""[..], b"4 2", b"0x1", b"1234567890123456789", b"+1"] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        assert_eq!(connection_close(b"keep-alive"), Some(false));
        assert_eq!(connection_close(b"Keep-Alive, close"), Some(true));
        assert_eq!(connection_close(b"upgrade"), None);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A chunked body: chunks of the given sizes (a last zero chunk added), each size
        /// line with or without an extension, and trailer fields.
        fn chunked(sizes: &[usize], ext: bool, trailers: usize) -> Vec<u8> {
            let mut body = Vec::new();
            for &n in sizes.iter().filter(|&&n| n > 0).chain([&0]) {
                body.extend_from_slice(format!("{n:x}").as_bytes());
                if ext {
                    body.extend_from_slice(b";a=\"b\"");
                }
                body.extend_from_slice(b"\r\n");
                if n > 0 {
                    body.extend(std::iter::repeat_n(b'\r', n));
                    body.extend_from_slice(b"\r\n");
                }
            }
            for i in 0..trailers {
                body.extend_from_slice(format!("t{i}: v\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body
        }

        /// Field names that matter to framing and forwarding, and any other.
        fn field_name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("Content-Length".to_string()),
                Just("Transfer-Encoding".to_string()),
                Just("Connection".to_string()),
                Just("Keep-Alive".to_string()),
                Just("X-Forwarded-For".to_string()),
                Just("X-Request-Id".to_string()),
                Just("Upgrade".to_string()),
                "[A-Za-z-]{1,10}",
            ]
        }

        proptest! {
            #[test]
            fn a_chunked_body_ends_exactly_at_its_end(
                sizes in proptest::collection::vec(0usize..600, 0..8),
                ext: bool,
                trailers in 0usize..3,
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
            ) {
                let body = chunked(&sizes, ext, trailers);
                let mut bytes = body.clone();
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(body.len())).collect();
                cuts.sort_unstable();
                let mut end = ChunkedEnd::default();
                let mut at = 0;
                for cut in cuts {
                    prop_assert_eq!(end.feed(&bytes[at..cut], &mut |_| {}), Ok(None));
                    at = cut;
                }
                prop_assert_eq!(end.feed(&bytes[at..], &mut |_| {}), Ok(Some(body.len() - at)));
            }

            #[test]
            fn what_a_request_becomes_is_one_request_for_the_same_host(
                fields in proptest::collection::vec((field_name(), "[ -~]{0,12}"), 0..6),
                host in "[a-z0-9.-]{1,20}",
            ) {
                let mut bytes = format!("GET /p HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
                for (name, value) in &fields {
                    bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                bytes.extend_from_slice(b"\r\n");
                let Ok(Some(req)) = parse_request(&bytes, 32 * 1024, None, &RequestIds::new()) else {
                    return Ok(());
                };
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 8];
                let mut again = httparse::Request::new(&mut fields);
                let parsed = again.parse(&req.upstream);
                prop_assert_eq!(parsed, Ok(httparse::Status::Complete(req.upstream.len())));
                let named = |n: &str| again.headers.iter().filter(|f| f.name.eq_ignore_ascii_case(n)).map(|f| f.value).collect::<Vec<_>>();
                prop_assert_eq!(named("host"), vec![host.as_bytes()]);
                prop_assert_eq!(named("x-forwarded-for").len(), 1);
                prop_assert_eq!(named("x-request-id"), vec![req.id.as_bytes()]);
                for hop in ["transfer-encoding", "connection", "keep-alive", "upgrade"] {
                    prop_assert!(named(hop).is_empty(), "{} passed on", hop);
                }
            }

            #[test]
            fn an_answer_is_refused_or_rewritten_into_one_answer(
                fields in proptest::collection::vec((field_name(), "[ -~]{0,12}"), 0..6),
                status in 200u16..600,
            ) {
                let mut bytes = format!("HTTP/1.1 {status} X\r\n").into_bytes();
                for (name, value) in &fields {
                    bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                bytes.extend_from_slice(b"\r\nbody");
                let Ok(Some((answer, len))) = parse_answer::<Vec<u8>>(&bytes, false, "id") else {
                    return Ok(());
                };
                prop_assert_eq!(len, bytes.len() - 4);
                let mut header = answer.header.clone();
                header.extend_from_slice(b"connection: close\r\n\r\n");
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 8];
                let mut again = httparse::Response::new(&mut fields);
                prop_assert_eq!(again.parse(&header), Ok(httparse::Status::Complete(header.len())));
                prop_assert_eq!(again.code, Some(status));
                let named = |n: &str| again.headers.iter().filter(|f| f.name.eq_ignore_ascii_case(n)).count();
                prop_assert_eq!(named("connection"), 1);
                prop_assert_eq!(named("keep-alive"), 0);
                prop_assert!(named("transfer-encoding") == 0 || named("content-length") == 0);
            }
        }
    }
}
