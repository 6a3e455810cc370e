//! Request ids: `X-Request-Id` is kept when a client (or a load balancer in front) sent a
//! sane one, else made here. Made ids are a per-process random prefix and a counter: unique
//! without a random draw per request.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

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
        format!("{:016x}{n:08x}", self.prefix)
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
}
