//! The path-tracking decoder every document goes through.
//!
//! serde's derive stops at the first error and knows no JSON paths, so documents are
//! parsed to a borrowed [`Node`] tree once and then walked here: each step carries its
//! [`Path`] (built on the stack, turned into text only when there is something to
//! report) and pushes every problem into one [`Report`] instead of returning early.

use std::fmt;

use std::borrow::Cow;

use crate::errors::FieldError;
use crate::json::Node;

/// The fields of a JSON object, in document order.
pub(crate) type Fields<'a> = [(Cow<'a, str>, Node<'a>)];

/// A JSON path, built on the stack as the decoder descends.
#[derive(Clone, Copy)]
pub(crate) enum Path<'a> {
    Root,
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    pub(crate) fn field(&'a self, name: &'a str) -> Path<'a> {
        Path::Field(self, name)
    }

    pub(crate) fn index(&'a self, i: usize) -> Path<'a> {
        Path::Index(self, i)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Field(Path::Root, name) => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Everything found wrong (errors) or worth a word (warnings) in one document.
#[derive(Debug, Default)]
pub struct Report {
    /// Problems that refuse the document.
    pub errors: Vec<FieldError>,
    /// Things accepted but probably not meant (an unknown VM status, host bits in a CIDR).
    pub warnings: Vec<FieldError>,
}

impl Report {
    pub(crate) fn error(&mut self, path: &Path<'_>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub(crate) fn warn(&mut self, path: &Path<'_>, message: impl Into<String>) {
        self.warnings.push(FieldError {
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// "a string", "an object", ...: what a value is, for messages.
pub(crate) fn kind_of(v: &Node<'_>) -> &'static str {
    match v {
        Node::Null => "null",
        Node::Bool(_) => "a boolean",
        Node::U64(_) | Node::I64(_) | Node::F64(_) => "a number",
        Node::Str(_) => "a string",
        Node::Array(_) => "an array",
        Node::Object(_) => "an object",
    }
}

/// The value as an object, or an error. A key given twice is an error too: JSON
/// readers disagree on which one wins.
pub(crate) fn object<'v, 'a>(
    v: &'v Node<'a>,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<&'v Fields<'a>> {
    match v {
        Node::Object(fields) => {
            for (i, (key, _)) in fields.iter().enumerate() {
                if fields[..i].iter().any(|(k, _)| k == key) {
                    report.error(&path.field(key), "is given twice");
                }
            }
            Some(fields)
        }
        other => {
            report.error(
                path,
                format!("expected an object, found {}", kind_of(other)),
            );
            None
        }
    }
}

/// The value as an array, or an error.
pub(crate) fn array<'v, 'a>(
    v: &'v Node<'a>,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<&'v [Node<'a>]> {
    match v {
        Node::Array(a) => Some(a),
        other => {
            report.error(path, format!("expected an array, found {}", kind_of(other)));
            None
        }
    }
}

/// The value as a string, or an error.
pub(crate) fn string<'v>(v: &'v Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<&'v str> {
    match v {
        Node::Str(s) => Some(s),
        other => {
            report.error(path, format!("expected a string, found {}", kind_of(other)));
            None
        }
    }
}

/// The value as a boolean, or an error.
pub(crate) fn boolean(v: &Node<'_>, path: &Path<'_>, report: &mut Report) -> Option<bool> {
    match v {
        Node::Bool(b) => Some(*b),
        other => {
            report.error(
                path,
                format!("expected true or false, found {}", kind_of(other)),
            );
            None
        }
    }
}

/// A field that may be absent; `null` counts as absent (the control plane writes nulls).
pub(crate) fn optional<'v, 'a>(fields: &'v Fields<'a>, key: &str) -> Option<&'v Node<'a>> {
    match fields.iter().find(|(k, _)| k == key) {
        None | Some((_, Node::Null)) => None,
        Some((_, v)) => Some(v),
    }
}

/// A field that must be present and not null.
pub(crate) fn required<'v, 'a>(
    fields: &'v Fields<'a>,
    key: &'static str,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<&'v Node<'a>> {
    let v = optional(fields, key);
    if v.is_none() {
        report.error(&path.field(key), "is required");
    }
    v
}

/// A required, non-empty string field.
pub(crate) fn required_string<'v>(
    fields: &'v Fields<'_>,
    key: &'static str,
    path: &Path<'_>,
    report: &mut Report,
) -> Option<&'v str> {
    let v = required(fields, key, path, report)?;
    let s = string(v, &path.field(key), report)?;
    if s.trim().is_empty() {
        report.error(&path.field(key), "must not be empty");
        return None;
    }
    Some(s)
}

/// Reports every key not in `known`, naming the keys that are allowed.
pub(crate) fn deny_unknown(
    fields: &Fields<'_>,
    known: &[&str],
    path: &Path<'_>,
    report: &mut Report,
) {
    for (key, _) in fields {
        if !known.contains(&&**key) {
            report.error(
                &path.field(key),
                format!("unknown field; expected one of: {}", known.join(", ")),
            );
        }
    }
}
