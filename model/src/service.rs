//! Services: a named port of a VM that the edge exposes as `<name>--<vmid>.proxy.<domain>`.

use std::fmt;

use serde::{Serialize, Serializer};

/// Longest service name the platform accepts (seed 001: 1–29 chars).
pub const SERVICE_NAME_MAX: usize = 29;

/// A valid service name, stored inline: copying, hashing and comparing never allocate.
///
/// 1–29 characters of lowercase letters and digits with single internal hyphens.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    len: u8,
    // 31, not 29: the struct is 32 bytes and is built and copied in whole words.
    bytes: [u8; 31],
}

/// Why a text is not a service name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    /// Empty or longer than 29 characters.
    #[error("must be 1-29 characters")]
    Length,
    /// A character other than a-z, 0-9 or `-`.
    #[error("may contain only lowercase letters, digits and hyphens")]
    Character,
    /// Starts or ends with `-`.
    #[error("must not start or end with a hyphen")]
    EdgeHyphen,
    /// Contains `--` (which separates the service from the VM id in public hosts).
    #[error("must not contain two hyphens in a row")]
    DoubleHyphen,
}

impl ServiceName {
    /// Parses a service name exactly as the API accepts it (lowercase only).
    pub fn parse(s: &str) -> Result<Self, ServiceNameError> {
        Self::parse_bytes(s.as_bytes(), false)
    }

    /// Parses a service name from a host label, where case does not matter; the result is lowercase.
    pub fn parse_ignore_case(s: &str) -> Result<Self, ServiceNameError> {
        Self::parse_bytes(s.as_bytes(), true)
    }

    fn parse_bytes(s: &[u8], fold_case: bool) -> Result<Self, ServiceNameError> {
        if s.is_empty() || s.len() > SERVICE_NAME_MAX {
            return Err(ServiceNameError::Length);
        }
        // Copy and fold the whole array at once, then only read: byte-wise stores into
        // a struct that is then moved cost a store-forwarding stall on every request.
        let mut bytes = [0u8; 31];
        bytes[..s.len()].copy_from_slice(s);
        if fold_case {
            bytes.make_ascii_lowercase();
        }
        let name = &bytes[..s.len()];
        if !name
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err(ServiceNameError::Character);
        }
        if name[0] == b'-' || name[name.len() - 1] == b'-' {
            return Err(ServiceNameError::EdgeHyphen);
        }
        if name.windows(2).any(|w| w == b"--") {
            return Err(ServiceNameError::DoubleHyphen);
        }
        Ok(ServiceName {
            len: s.len() as u8,
            bytes,
        })
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored (checked in `parse_bytes`).
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for ServiceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Lowest service port: privileged ports are rejected by the platform.
pub const SERVICE_PORT_MIN: u16 = 1024;

/// One service registration of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Leftmost label of the public host.
    pub name: ServiceName,
    /// TCP port the service listens on inside the VM (1024–65535).
    pub port: u16,
    /// Speak HTTP/2 cleartext to the backend (gRPC) instead of HTTP/1.1.
    pub h2c: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_seed_accepts() {
        for ok in [
            "a",
            "web",
            "api-v2",
            "a1-b2-c3",
            "x".repeat(29).as_str(),
            "0",
        ] {
            assert_eq!(ServiceName::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn names_the_seed_rejects() {
        use ServiceNameError::*;
        let cases = [
            ("", Length),
            (&"x".repeat(30), Length),
            ("Web", Character),
            ("we_b", Character),
            ("we.b", Character),
            ("wéb", Character),
            ("-web", EdgeHyphen),
            ("web-", EdgeHyphen),
            ("-", EdgeHyphen),
            ("we--b", DoubleHyphen),
        ];
        for (bad, why) in cases {
            assert_eq!(ServiceName::parse(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn case_folding_only_when_asked() {
        assert_eq!(
            ServiceName::parse_ignore_case("WeB-1").unwrap().as_str(),
            "web-1"
        );
        assert!(ServiceName::parse("WeB-1").is_err());
    }
}
