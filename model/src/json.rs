//! A borrowed JSON tree: what the validator walks.
//!
//! `serde_json::Value` makes a `String` for every key and string and a `BTreeMap` for
//! every object; on a 100k-VM state that allocation alone took most of the load time.
//! Here strings borrow from the input text (unless they hold escapes) and an object is
//! one `Vec` of pairs in document order. serde_json still does the parsing (with its
//! nesting limit), so syntax errors keep its line and column.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value, borrowing from the text it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// Parses JSON text.
    pub(crate) fn parse(text: &'a str) -> Result<Node<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let node = Node::deserialize(&mut de)?;
        de.end()?;
        Ok(node)
    }

    /// The value as a non-negative integer, if it is one.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match *self {
            Node::U64(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Node<'_> {
    /// Scalars as JSON would write them; containers by kind (for messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Null => f.write_str("null"),
            Node::Bool(b) => write!(f, "{b}"),
            Node::U64(n) => write!(f, "{n}"),
            Node::I64(n) => write!(f, "{n}"),
            Node::F64(n) => write!(f, "{n}"),
            Node::Str(s) => write!(f, "{s:?}"),
            Node::Array(_) => f.write_str("an array"),
            Node::Object(_) => f.write_str("an object"),
        }
    }
}

/// A string that borrows from the input when it can.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Node::Bool(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Node::U64(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(if v >= 0 {
                    Node::U64(v as u64)
                } else {
                    Node::I64(v)
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Node::F64(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Node::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(key)) = map.next_key()? {
                    fields.push((key, map.next_value()?));
                }
                Ok(Node::Object(fields))
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_plain_strings_and_keeps_order() {
        let text = r#"{"b": "plain", "a": "esc\"aped", "n": [1, -2, 1.5, true, null]}"#;
        let Node::Object(fields) = Node::parse(text).unwrap() else {
            panic!()
        };
        let keys: Vec<&str> = fields.iter().map(|(k, _)| &**k).collect();
        assert_eq!(keys, ["b", "a", "n"]);
        assert!(matches!(&fields[0].1, Node::Str(Cow::Borrowed("plain"))));
        assert!(matches!(&fields[1].1, Node::Str(Cow::Owned(s)) if s == "esc\"aped"));
        assert_eq!(
            fields[2].1,
            Node::Array(vec![
                Node::U64(1),
                Node::I64(-2),
                Node::F64(1.5),
                Node::Bool(true),
                Node::Null
            ])
        );
    }

    #[test]
    fn trailing_text_and_deep_nesting_are_errors() {
        assert!(Node::parse("{} x").is_err());
        let deep = "[".repeat(10_000);
        assert!(
            Node::parse(&deep).is_err(),
            "serde_json's nesting limit holds"
        );
    }
}
