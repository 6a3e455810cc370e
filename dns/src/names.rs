//! Names against lists of patterns, at a cost that does not grow with the list.
//!
//! A name is matched by hashing it whole (exact patterns) and then each of its proper
//! suffixes (`*.` patterns, which match one or more labels below their base, never the
//! base itself): one hash lookup per label, whatever the number of listed names.

use std::collections::HashMap;

use hickory_proto::rr::Name;
use vmedge_model::DomainPattern;

type Map<T> = HashMap<Box<str>, Vec<T>, foldhash::fast::RandomState>;

/// A name as the gate compares it: lowercase ASCII, no trailing dot (`example.com`).
pub fn normalize(name: &Name) -> String {
    let mut text = name.to_ascii();
    if text.len() > 1 && text.ends_with('.') {
        text.pop();
    }
    text.make_ascii_lowercase();
    text
}

/// Patterns, each with a value; a name finds the values of every pattern that matches it.
#[derive(Debug, Clone)]
pub struct PatternIndex<T> {
    exact: Map<T>,
    below: Map<T>,
}

impl<T> Default for PatternIndex<T> {
    fn default() -> Self {
        PatternIndex {
            exact: Map::default(),
            below: Map::default(),
        }
    }
}

impl<T: Copy> PatternIndex<T> {
    /// An index over `(pattern, value)` pairs.
    pub fn new<'a>(patterns: impl IntoIterator<Item = (&'a DomainPattern, T)>) -> Self {
        let mut index = PatternIndex::default();
        for (pattern, value) in patterns {
            let map = if pattern.is_wildcard() {
                &mut index.below
            } else {
                &mut index.exact
            };
            map.entry(pattern.base().into()).or_default().push(value);
        }
        index
    }

    /// True when no pattern is listed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.below.is_empty()
    }

    /// Calls `found` with the value of each pattern that matches `name` (normalized).
    pub fn each_match(&self, name: &str, mut found: impl FnMut(T)) {
        if let Some(values) = self.exact.get(name) {
            values.iter().copied().for_each(&mut found);
        }
        if self.below.is_empty() {
            return;
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(values) = self.below.get(rest) {
                values.iter().copied().for_each(&mut found);
            }
        }
    }

    /// Does any pattern match `name` (normalized)?
    pub fn matches(&self, name: &str) -> bool {
        if self.exact.contains_key(name) {
            return true;
        }
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if self.below.contains_key(rest) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index(patterns: &[&str]) -> PatternIndex<usize> {
        let parsed: Vec<DomainPattern> = patterns
            .iter()
            .map(|p| DomainPattern::parse(p).unwrap())
            .collect();
        PatternIndex::new(parsed.iter().enumerate().map(|(i, p)| (p, i)))
    }

    fn matches(index: &PatternIndex<usize>, name: &str) -> Vec<usize> {
        let mut found = Vec::new();
        index.each_match(name, |i| found.push(i));
        found.sort_unstable();
        found
    }

    #[test]
    fn a_wildcard_matches_one_or_more_labels_below_never_the_base() {
        let idx = index(&["*.example.com"]);
        assert!(idx.matches("a.example.com"));
        assert!(idx.matches("a.b.example.com"));
        assert!(!idx.matches("example.com"));
        assert!(!idx.matches("badexample.com"));
        assert!(!idx.matches("example.com.evil"));
    }

    #[test]
    fn exact_and_wildcard_patterns_are_found_together() {
        let idx = index(&["api.example.com", "*.example.com", "*.com", "other.org"]);
        assert_eq!(matches(&idx, "api.example.com"), vec![0, 1, 2]);
        assert_eq!(matches(&idx, "example.com"), vec![2]);
        assert_eq!(matches(&idx, "other.org"), vec![3]);
        assert!(matches(&idx, "a.other.org").is_empty());
    }

    #[test]
    fn names_are_compared_lowercase_without_the_root_dot() {
        let name = Name::from_ascii("WwW.Example.COM.").unwrap();
        assert_eq!(normalize(&name), "www.example.com");
        assert_eq!(normalize(&Name::root()), ".");
        let idx = index(&["www.EXAMPLE.com"]);
        assert!(idx.matches(&normalize(&name)));
    }

    #[test]
    fn agrees_with_the_model_for_every_pattern_and_name() {
        let patterns = ["a.b.c", "*.b.c", "*.c", "b.c", "x.y"];
        let names = ["a.b.c", "b.c", "c", "z.a.b.c", "x.y", "y", "q.x.y", "bb.c"];
        for p in patterns {
            let idx = index(&[p]);
            let model = DomainPattern::parse(p).unwrap();
            for n in names {
                assert_eq!(idx.matches(n), model.matches(n), "{p} vs {n}");
            }
        }
    }
}
