//! Domain names and patterns of firewall policies: `example.com` or `*.example.com`.
//!
//! `*.example.com` matches one or more labels below example.com, never example.com
//! itself (seed 001, DNS wildcard semantics). Names compare case-insensitively and an
//! absolute name's trailing dot is ignored.

use std::fmt;
use std::net::IpAddr;

use serde::{Serialize, Serializer};

/// A domain name, or a `*.` wildcard over the names below one. Stored lowercase, without a trailing dot.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    wildcard: bool,
    base: Box<str>,
}

/// Why a text is not a domain pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Nothing there.
    #[error("is empty")]
    Empty,
    /// `*` alone.
    #[error("a bare wildcard is not allowed; write *.example.com")]
    BareWildcard,
    /// A `*` anywhere but as the whole leftmost label.
    #[error("a wildcard is allowed only as the whole leftmost label (*.example.com)")]
    MisplacedWildcard,
    /// An IP address where a name was expected.
    #[error("is an IP address, not a domain name")]
    Address,
    /// Over 253 characters.
    #[error("is longer than 253 characters")]
    TooLong,
    /// A label that breaks the hostname rules.
    #[error("label {label:?} {why}")]
    Label {
        /// The label, as written.
        label: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// True when `name` is strictly below `base` (`a.b.example.com` below `example.com`).
fn is_below(name: &str, base: &str) -> bool {
    name.len() > base.len() + 1
        && name.ends_with(base)
        && name.as_bytes()[name.len() - base.len() - 1] == b'.'
}

impl DomainPattern {
    /// Parses `example.com` or `*.example.com`.
    pub fn parse(text: &str) -> Result<Self, DomainError> {
        let name = text.strip_suffix('.').unwrap_or(text);
        if name.is_empty() {
            return Err(DomainError::Empty);
        }
        if name == "*" {
            return Err(DomainError::BareWildcard);
        }
        let (wildcard, base) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if base.contains('*') {
            return Err(DomainError::MisplacedWildcard);
        }
        if base.parse::<IpAddr>().is_ok() {
            return Err(DomainError::Address);
        }
        if base.len() > 253 {
            return Err(DomainError::TooLong);
        }
        for label in base.split('.') {
            let why = if label.is_empty() {
                Some("is empty")
            } else if label.len() > 63 {
                Some("is longer than 63 characters")
            } else if !label
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                Some("may contain only letters, digits, '-' and '_'")
            } else if label.starts_with('-') || label.ends_with('-') {
                Some("must not start or end with '-'")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(DomainError::Label {
                    label: label.to_string(),
                    why,
                });
            }
        }
        Ok(DomainPattern {
            wildcard,
            base: base.to_ascii_lowercase().into_boxed_str(),
        })
    }

    /// True for `*.example.com`.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The name without the `*.`: `example.com`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Does this pattern match the name (any case, trailing dot allowed)?
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        let base = &*self.base;
        if self.wildcard {
            name.len() > base.len() + 1
                && name.as_bytes()[name.len() - base.len() - 1] == b'.'
                && name[name.len() - base.len()..].eq_ignore_ascii_case(base)
        } else {
            name.eq_ignore_ascii_case(base)
        }
    }

    /// True when every name `other` matches is matched by `self` too.
    pub fn covers(&self, other: &DomainPattern) -> bool {
        match (self.wildcard, other.wildcard) {
            (false, false) => self.base == other.base,
            (false, true) => false,
            (true, false) => is_below(&other.base, &self.base),
            (true, true) => other.base == self.base || is_below(&other.base, &self.base),
        }
    }

    /// True when some name is matched by both patterns.
    pub fn overlaps(&self, other: &DomainPattern) -> bool {
        match (self.wildcard, other.wildcard) {
            (false, false) => self.base == other.base,
            (false, true) => is_below(&self.base, &other.base),
            (true, false) => is_below(&other.base, &self.base),
            (true, true) => {
                self.base == other.base
                    || is_below(&self.base, &other.base)
                    || is_below(&other.base, &self.base)
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

impl fmt::Debug for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for DomainPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    #[test]
    fn wildcard_matches_one_or_more_labels_below_never_the_apex() {
        let w = p("*.example.com");
        assert!(w.matches("api.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(w.matches("API.Example.COM."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches("example.com.evil"));
        let e = p("Example.com.");
        assert!(e.matches("example.com"));
        assert!(e.matches("EXAMPLE.COM."));
        assert!(!e.matches("www.example.com"));
    }

    #[test]
    fn rejected_texts() {
        use DomainError::*;
        assert_eq!(DomainPattern::parse(""), Err(Empty));
        assert_eq!(DomainPattern::parse("."), Err(Empty));
        assert_eq!(DomainPattern::parse("*"), Err(BareWildcard));
        assert_eq!(DomainPattern::parse("*."), Err(BareWildcard));
        assert_eq!(DomainPattern::parse("a.*.com"), Err(MisplacedWildcard));
        assert_eq!(DomainPattern::parse("*.*.com"), Err(MisplacedWildcard));
        assert_eq!(DomainPattern::parse("*example.com"), Err(MisplacedWildcard));
        assert_eq!(DomainPattern::parse("1.2.3.4"), Err(Address));
        assert_eq!(DomainPattern::parse("::1"), Err(Address));
        assert!(matches!(DomainPattern::parse("a..com"), Err(Label { .. })));
        assert!(matches!(DomainPattern::parse("-a.com"), Err(Label { .. })));
        assert!(matches!(DomainPattern::parse("a b.com"), Err(Label { .. })));
        assert!(matches!(
            DomainPattern::parse(&format!("{}.com", "a".repeat(64))),
            Err(Label { .. })
        ));
        assert_eq!(
            DomainPattern::parse(&format!("{}a", "a.".repeat(127))),
            Err(TooLong)
        );
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(p("*.com").covers(&p("*.example.com")));
        assert!(p("*.example.com").covers(&p("*.example.com")));
        assert!(p("*.example.com").covers(&p("a.example.com")));
        assert!(!p("*.example.com").covers(&p("example.com")));
        assert!(!p("a.example.com").covers(&p("*.example.com")));
        assert!(!p("*.a.example.com").covers(&p("*.example.com")));

        assert!(p("a.example.com").overlaps(&p("*.example.com")));
        assert!(p("*.a.example.com").overlaps(&p("*.example.com")));
        assert!(p("*.example.com").overlaps(&p("*.a.example.com")));
        assert!(!p("example.com").overlaps(&p("*.example.com")));
        assert!(!p("*.other.com").overlaps(&p("*.example.com")));
    }
}
