//! `segward check DIR [--strict] [--json]`: validate and lint a policy directory.
//!
//! Prints one `file:line:col: error|warning: message` line per problem, sorted by location,
//! then a summary on stderr. Exit codes (SPEC §3): 0 no errors (and, with `--strict`, no
//! warnings), 1 problems found, 2 unreadable input or bad usage, so that it serves as a CI
//! gate in a GitOps repo.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde::Serialize;

use crate::policy::{
    diagnostic::{Diagnostic, Diagnostics},
    lint::lint,
    load::{load_dir, policy_files, LoadError},
};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy directory (searched recursively for *.yaml / *.yml).
    pub dir: PathBuf,
    /// Make warnings fail.
    #[arg(long)]
    pub strict: bool,
    /// Print the diagnostics and their counts as one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let diagnostics = match check(&args.dir) {
        Ok(diagnostics) => diagnostics,
        Err(message) => {
            eprintln!("segward: {message}");
            return ExitCode::from(2);
        }
    };
    let report = if args.json {
        json_report(&diagnostics)
    } else {
        text_report(&diagnostics)
    };
    if let Err(e) = io::stdout().lock().write_all(report.as_bytes()) {
        eprintln!("segward: cannot write the report: {e}");
        return ExitCode::from(2);
    }
    let fails = diagnostics.has_errors() || (args.strict && !diagnostics.is_empty());
    let strict_note = if args.strict && !diagnostics.has_errors() && fails {
        " (--strict: warnings fail)"
    } else {
        ""
    };
    eprintln!("{}{strict_note}", summary(&diagnostics));
    if fails {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The loader's errors or, for a policy that loads, the lints' findings; sorted by location.
/// Lints need a loaded policy, so they only run once the loader is satisfied.
fn check(dir: &Path) -> Result<Diagnostics, String> {
    // An empty directory is almost always a wrong path in a CI job, not an empty policy.
    if policy_files(dir).map_err(|e| e.to_string())?.is_empty() {
        return Err(format!(
            "no segment files (*.yaml, *.yml) under {}",
            dir.display()
        ));
    }
    let mut diagnostics = match load_dir(dir) {
        Ok(policy) => lint(&policy),
        Err(LoadError::Invalid(diagnostics)) => Diagnostics::from(diagnostics),
        Err(e @ LoadError::Io { .. }) => return Err(e.to_string()),
    };
    diagnostics.sort();
    Ok(diagnostics)
}

fn text_report(diagnostics: &Diagnostics) -> String {
    diagnostics.iter().map(|d| format!("{d}\n")).collect()
}

#[derive(Serialize)]
struct JsonReport<'a> {
    diagnostics: Vec<JsonDiagnostic<'a>>,
    errors: usize,
    warnings: usize,
}

#[derive(Serialize)]
struct JsonDiagnostic<'a> {
    file: String,
    line: usize,
    column: usize,
    severity: String,
    message: &'a str,
}

impl<'a> From<&'a Diagnostic> for JsonDiagnostic<'a> {
    fn from(d: &'a Diagnostic) -> Self {
        JsonDiagnostic {
            file: d.location.file.display().to_string(),
            line: d.location.line,
            column: d.location.column,
            severity: d.severity.to_string(),
            message: &d.message,
        }
    }
}

fn json_report(diagnostics: &Diagnostics) -> String {
    let report = JsonReport {
        diagnostics: diagnostics.iter().map(JsonDiagnostic::from).collect(),
        errors: diagnostics.error_count(),
        warnings: diagnostics.warning_count(),
    };
    // Plain structs of strings and numbers always serialize.
    let mut text = serde_json::to_string_pretty(&report).expect("report serializes");
    text.push('\n');
    text
}

/// `2 errors, 1 warning`.
fn summary(diagnostics: &Diagnostics) -> String {
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}, {}",
        count(diagnostics.error_count(), "error"),
        count(diagnostics.warning_count(), "warning")
    )
}
