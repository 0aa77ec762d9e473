//! Messages about a policy that point at the YAML: `file:line:col: error: message`.
//!
//! The loader reports errors with these; lints reuse them for warnings.

use std::fmt;

use super::model::Location;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    pub fn error(location: Location, message: impl Into<String>) -> Self {
        Diagnostic {
            location,
            severity: Severity::Error,
            message: message.into(),
        }
    }

    pub fn warning(location: Location, message: impl Into<String>) -> Self {
        Diagnostic {
            location,
            severity: Severity::Warning,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.location, self.severity, self.message)
    }
}

/// An ordered collection of diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    pub fn error(&mut self, location: Location, message: impl Into<String>) {
        self.push(Diagnostic::error(location, message));
    }

    pub fn warning(&mut self, location: Location, message: impl Into<String>) {
        self.push(Diagnostic::warning(location, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.0.len() - self.error_count()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// Sorts by file, line and column so that output reads top to bottom; diagnostics at the
    /// same place keep the order in which they were found.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| a.location.cmp(&b.location));
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.0
    }
}

impl fmt::Display for Diagnostics {
    /// One diagnostic per line, without a trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_lines(&self.0, f)
    }
}

/// Displays `diagnostics` one per line (no trailing newline), e.g. for an error's message.
pub fn display_lines(diagnostics: &[Diagnostic]) -> impl fmt::Display + '_ {
    Lines(diagnostics)
}

struct Lines<'a>(&'a [Diagnostic]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_lines(self.0, f)
    }
}

fn fmt_lines(diagnostics: &[Diagnostic], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, d) in diagnostics.iter().enumerate() {
        if i > 0 {
            f.write_str("\n")?;
        }
        write!(f, "{d}")?;
    }
    Ok(())
}

impl From<Vec<Diagnostic>> for Diagnostics {
    fn from(v: Vec<Diagnostic>) -> Self {
        Diagnostics(v)
    }
}

impl From<Diagnostics> for Vec<Diagnostic> {
    fn from(d: Diagnostics) -> Self {
        d.0
    }
}

impl Extend<Diagnostic> for Diagnostics {
    fn extend<I: IntoIterator<Item = Diagnostic>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl FromIterator<Diagnostic> for Diagnostics {
    fn from_iter<I: IntoIterator<Item = Diagnostic>>(iter: I) -> Self {
        Diagnostics(iter.into_iter().collect())
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use super::*;

    fn loc(file: &str, line: usize, column: usize) -> Location {
        Location {
            file: Arc::new(PathBuf::from(file)),
            line,
            column,
        }
    }

    #[test]
    fn display_error_and_warning() {
        let e = Diagnostic::error(loc("segments/sensors.yaml", 14, 9), "unknown target \"x\"");
        assert_eq!(
            e.to_string(),
            "segments/sensors.yaml:14:9: error: unknown target \"x\""
        );
        let w = Diagnostic::warning(loc("a.yaml", 1, 1), "segment has no devices");
        assert_eq!(w.to_string(), "a.yaml:1:1: warning: segment has no devices");
    }

    #[test]
    fn collection_sorts_counts_and_prints_one_per_line() {
        let mut d = Diagnostics::new();
        d.warning(loc("b.yaml", 1, 1), "w");
        d.error(loc("a.yaml", 3, 2), "second");
        d.error(loc("a.yaml", 3, 2), "third");
        d.error(loc("a.yaml", 2, 7), "first");
        assert!(d.has_errors());
        assert_eq!((d.len(), d.error_count(), d.warning_count()), (4, 3, 1));
        d.sort();
        assert_eq!(
            d.to_string(),
            "a.yaml:2:7: error: first\n\
             a.yaml:3:2: error: second\n\
             a.yaml:3:2: error: third\n\
             b.yaml:1:1: warning: w"
        );
        let only_warnings: Diagnostics = d.into_iter().filter(|x| !x.is_error()).collect();
        assert!(!only_warnings.has_errors());
    }
}
