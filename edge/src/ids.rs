//! Request ids: `X-Request-Id` is kept when a client (or a load balancer in front) sent a
//! sane one, else made here. Made ids are a per-process random prefix and a counter: unique
//! without a random draw per request.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

/// The longest client id kept.
const MAX_LEN: usize = 128;

/// Makes request ids.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    /// A maker with a fresh random prefix.
    pub fn new() -> RequestIds {
        // std's RandomState is seeded from the OS: enough to tell processes apart.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        RequestIds {
            prefix: h.finish(),
            next: AtomicU64::new(1),
        }
    }

    /// The request's id: its own `X-Request-Id` if sane, else a new one.
    pub fn take(&self, req: &RequestHeader) -> String {
        self.keep_or_make(req.headers.get("x-request-id").map(|v| v.as_bytes()))
    }

    /// The id a request sent (the value of its `X-Request-Id`) if sane, else a new one.
    pub fn keep_or_make(&self, sent: Option<&[u8]>) -> String {
        if let Some(b) = sent {
            if !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic()) {
                if let Ok(s) = std::str::from_utf8(b) {
                    return s.to_string();
                }
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // As `format!("{:016x}{n:08x}")`, without the formatter: one allocation, its size
        // known (an id is made for most requests).
        let mut id = String::with_capacity(32);
        push_hex(&mut id, self.prefix, 16);
        push_hex(&mut id, n, 8);
        id
    }
}

/// The request id's field.
pub(crate) const FIELD: HeaderName = HeaderName::from_static("x-request-id");

/// `id` as the value of an `X-Request-Id` field, marked never to be indexed. Each id is
/// new, so HPACK indexing it (h2's encoder indexes every field it may) fills the
/// connection's dynamic table with ids never sent again, pushing out fields that do
/// repeat, and each later id compares itself with every one of them (h2's `Table::index`
/// and `value_eq`: 2.2% of the edge's samples under h2c load, 0.9% after). Sent as a
/// literal instead, as nginx sends every field. An HTTP/1.1 writer ignores the mark.
pub(crate) fn field_value(id: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `value` in lower-case hex onto `out`, at least `width` digits (zeros in front).
fn push_hex(out: &mut String, value: u64, width: usize) {
    let digits = (64 - value.leading_zeros() as usize).div_ceil(4).max(width);
    for i in (0..digits).rev() {
        let nibble = (value >> (4 * i)) & 0xf;
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_makes_unique_ones() {
        let ids = RequestIds::new();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let (a, b) = (ids.take(&req), ids.take(&req));
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        req.insert_header("x-request-id", "abc-123").unwrap();
        assert_eq!(ids.take(&req), "abc-123");
        req.insert_header("x-request-id", "has space").unwrap();
        assert_ne!(ids.take(&req), "has space");
    }

    #[test]
    fn made_ids_are_the_prefix_and_the_count_in_hex() {
        let ids = RequestIds::new();
        let made = ids.keep_or_make(None);
        assert_eq!(made, format!("{:016x}{:08x}", ids.prefix, 1));
        ids.next.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(
            ids.keep_or_make(None),
            format!("{:016x}{:08x}", ids.prefix, u64::MAX)
        );
        for (value, width) in [(0, 8), (0xabc, 2), (1 << 32, 8), (u64::MAX, 16)] {
            let mut out = String::new();
            push_hex(&mut out, value, width);
            assert_eq!(out, format!("{value:0width$x}"));
        }
    }
}
