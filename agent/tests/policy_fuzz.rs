//! Bounded fuzzing of the policy loader, cheap enough for every CI run (a few seconds in a
//! debug build): random bytes, YAML-ish token soups and mutations of the example policy in
//! segments/. Whatever the input, loading must not panic, and a rejection must be
//! `LoadError::Invalid` with diagnostics that point inside the files that were loaded. What
//! loads is also linted and compiled, which must not panic either.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use proptest::{prelude::*, sample::Index};
use segward::policy::{
    compile::compile,
    lint::lint,
    load::{load_sources, policy_files, LoadError},
};

/// Cases per strategy; each costs well under a millisecond in a debug build.
const CASES: u32 = 2000;

/// Bits of YAML syntax and of the policy vocabulary, valid and invalid.
const TOKENS: &[&str] = &[
    // keys
    "kind",
    "name",
    "description",
    "mode",
    "devices",
    "id",
    "mac",
    "addresses",
    "allow",
    "to",
    "ports",
    "accept",
    "from",
    "cidrs",
    "triggers",
    "denied_flows",
    "fanout",
    "count",
    "destinations",
    "window",
    "exempt",
    // values
    "Segment",
    "Zone",
    "Quarantine",
    "enforce",
    "audit",
    "gateway",
    "sensors",
    "mqtt-broker",
    "plc-7",
    "ops-vpn",
    "10.0.0.0/8",
    "10.0.0.1/8",
    "2001:db8::/32",
    "10.20.1.11",
    "::ffff:10.20.1.11",
    "0.0.0.0",
    "02:00:00:00:10:01",
    "01:00:5e:00:00:01",
    "8883/tcp",
    "1-65535/udp",
    "0/tcp",
    "65536/tcp",
    "9-1/tcp",
    "icmp",
    "any",
    "10s",
    "0s",
    "99999999999999999999h",
    "-1",
    "4294967296",
    "1e9",
    "0x1F",
    "~",
    "null",
    "true",
    "''",
    "\"\"",
    "\"\\u0000\"",
    // syntax
    ":",
    ": ",
    "- ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    " ",
    "\n",
    "  ",
    "    ",
    "\t",
    "\r",
    "\r\n",
    "---",
    "...",
    "#",
    "&a ",
    "*a",
    "!!str ",
    "!!int ",
    "!x ",
    "|",
    ">",
    "? ",
    "%YAML 1.2\n",
    "\u{feff}",
    "é",
    "\"",
    "'",
];

/// `PROPTEST_CASES=100000` runs a deeper fuzz locally; CI keeps the bound.
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = match std::env::var_os("PROPTEST_CASES") {
        Some(_) => default.cases,
        None => CASES,
    };
    ProptestConfig { cases, ..default }
}

/// The example policy: (path, text) per file.
fn example() -> &'static [(PathBuf, String)] {
    static FILES: OnceLock<Vec<(PathBuf, String)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        policy_files(&dir)
            .expect("segments/ is readable")
            .into_iter()
            .map(|path| {
                let text = std::fs::read_to_string(&path).expect("example files are UTF-8");
                (path, text)
            })
            .collect()
    })
}

/// The lines of `text` as the YAML parser counts them (`\r\n`, `\n` and a lone `\r` each end
/// a line). A position just after the last character of a line, or on the line after the
/// last newline, is still inside the file.
fn lines(text: &str) -> Vec<String> {
    text.replace("\r\n", "\n")
        .split(['\n', '\r'])
        .map(str::to_owned)
        .collect()
}

/// Loads `files`, and checks the outcome as the module doc says.
fn check(files: &[(PathBuf, String)]) -> Result<(), TestCaseError> {
    let sources = files.iter().map(|(p, t)| (p.as_path(), t.as_str()));
    let diagnostics = match load_sources(sources) {
        Ok(policy) => {
            lint(&policy);
            let _ = compile(&policy, &[]);
            return Ok(());
        }
        Err(LoadError::Invalid(diagnostics)) => diagnostics,
        Err(e @ LoadError::Io { .. }) => {
            return Err(TestCaseError::fail(format!(
                "I/O error for in-memory input: {e}"
            )))
        }
    };
    prop_assert!(!diagnostics.is_empty(), "rejected without a diagnostic");
    for d in &diagnostics {
        // The loader turns a panic in its parser thread into a diagnostic: still a bug.
        prop_assert!(!d.message.contains("crashed"), "{d}");
        let Some((_, text)) = files.iter().find(|(p, _)| p == d.location.file.as_path()) else {
            return Err(TestCaseError::fail(format!("names a file not loaded: {d}")));
        };
        let lines = lines(text);
        let (line, column) = (d.location.line, d.location.column);
        // At the end of a file without a final line break, the parser reports the start of
        // the line after the last one: still the end of the file.
        if !text.ends_with(['\n', '\r']) && (line, column) == (lines.len() + 1, 1) {
            continue;
        }
        prop_assert!(
            (1..=lines.len()).contains(&line),
            "line out of the file: {d}"
        );
        let width = lines[line - 1].chars().count();
        prop_assert!(
            (1..=width + 1).contains(&column),
            "column out of the line: {d}"
        );
    }
    Ok(())
}

fn single(text: String) -> Vec<(PathBuf, String)> {
    vec![(PathBuf::from("segments/fuzz.yaml"), text)]
}

fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(TOKENS)
}

#[derive(Clone, Debug)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    /// Swaps a character with the next one.
    SwapChars(Index),
    /// Adds (positive) or removes (negative) leading spaces.
    Indent(Index, i8),
    /// Replaces the key (before the first `:`) or the value (after it) of a line.
    Replace {
        line: Index,
        value: bool,
        with: &'static str,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::DeleteLine),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        any::<Index>().prop_map(Mutation::SwapChars),
        (any::<Index>(), -4i8..=4).prop_map(|(i, d)| Mutation::Indent(i, d)),
        (any::<Index>(), any::<bool>(), token())
            .prop_map(|(line, value, with)| { Mutation::Replace { line, value, with } }),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let count = lines.len();
    if count == 0 {
        return text.to_owned();
    }
    match mutation {
        Mutation::DeleteLine(i) => {
            lines.remove(i.index(count));
        }
        Mutation::DuplicateLine(i) => {
            let at = i.index(count);
            lines.insert(at, lines[at].clone());
        }
        Mutation::SwapChars(i) => {
            let mut chars: Vec<char> = text.chars().collect();
            if chars.len() >= 2 {
                let at = i.index(chars.len() - 1);
                chars.swap(at, at + 1);
            }
            return chars.into_iter().collect();
        }
        Mutation::Indent(i, delta) => {
            let line = &mut lines[i.index(count)];
            let by = usize::from(delta.unsigned_abs());
            if *delta < 0 {
                let spaces = line.len() - line.trim_start_matches(' ').len();
                line.drain(..by.min(spaces));
            } else {
                line.insert_str(0, &" ".repeat(by));
            }
        }
        Mutation::Replace { line, value, with } => {
            let line = &mut lines[line.index(count)];
            let indent = line.len() - line.trim_start_matches([' ', '-']).len();
            *line = match line.split_once(':') {
                Some((key, _)) if *value => format!("{key}: {with}"),
                Some((_, rest)) => format!("{}{with}:{rest}", &line[..indent]),
                None => format!("{}{with}", &line[..indent]),
            };
        }
    }
    lines.join("\n") + "\n"
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&single(String::from_utf8_lossy(&bytes).into_owned()))?;
    }

    #[test]
    fn token_soup(tokens in prop::collection::vec(token(), 0..120)) {
        check(&single(tokens.concat()))?;
    }

    #[test]
    fn mutated_example(
        file in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut files = example().to_vec();
        let (_, text) = &mut files[file.index(example().len())];
        for m in &mutations {
            *text = apply(text, m);
        }
        check(&files)?;
    }
}

#[test]
fn the_example_loads_unmutated() {
    check(example()).unwrap();
    assert!(load_sources(example().iter().map(|(p, t)| (p.as_path(), t.as_str()))).is_ok());
}
