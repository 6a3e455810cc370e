//! Errors of the model: every one names the JSON path of the field it is about.

use std::fmt;

/// One problem with one field of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `vms[3].firewall.egress.rules[2].ports`; empty for the document itself.
    pub path: String,
    /// What is wrong with it, e.g. `"80-" is not a port or a range`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error of one document, in document order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// The errors, in document order.
    pub fn iter(&self) -> std::slice::Iter<'_, FieldError> {
        self.0.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    /// The text is not JSON at all.
    #[error("line {line}, column {column}: not valid JSON: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the JSON parser said.
        message: String,
    },
    /// The JSON is well formed but breaks the platform's rules: every error, each with its path.
    #[error("{} error{}:\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0)]
    Invalid(FieldErrors),
}

impl ModelError {
    pub(crate) fn syntax(e: &serde_json::Error) -> Self {
        // serde_json's own message ends with " at line L column C"; we carry those apart.
        let text = e.to_string();
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        ModelError::Syntax {
            line: e.line(),
            column: e.column().max(1), // serde_json says 0 at end of input
            message,
        }
    }

    /// The field errors, if this is a validation failure.
    pub fn field_errors(&self) -> Option<&FieldErrors> {
        match self {
            ModelError::Invalid(errors) => Some(errors),
            ModelError::Syntax { .. } => None,
        }
    }
}
