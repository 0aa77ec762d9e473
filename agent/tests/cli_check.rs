//! `segward check` as a CI job runs it: the real binary on the example policy in segments/
//! and on broken copies of it, checking output lines, the summary and the exit code.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::{json, Value};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments")
}

/// `segward check ARGS...` run in `cwd`.
fn check(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segward"))
        .arg("check")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run segward")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A copy of the example policy at `<tmp>/segments`, so that diagnostics read
/// `segments/<file>:line:col` when `check` runs in `<tmp>`.
fn copy_example() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("segments");
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(example_dir()).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    tmp
}

/// Replaces the one occurrence of `from` in `segments/<file>` under `tmp`.
fn edit(tmp: &Path, file: &str, from: &str, to: &str) {
    let path = tmp.join("segments").join(file);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches(from).count(), 1, "{from:?} in {file}");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_example_policy_passes_strict() {
    let output = check(&example_dir(), &[".", "--strict"]);
    assert_eq!(stdout(&output), "");
    assert_eq!(stderr(&output), "0 errors, 0 warnings\n");
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn a_typo_in_a_target_fails_at_its_place() {
    let tmp = copy_example();
    edit(
        tmp.path(),
        "sensors.yaml",
        "- to: mqtt-broker",
        "- to: mqtt-brokr",
    );
    let output = check(tmp.path(), &["segments/"]);
    assert_eq!(
        stdout(&output),
        "segments/sensors.yaml:15:9: error: unknown target \"mqtt-brokr\" (did you mean \"mqtt-broker\"?)\n"
    );
    assert_eq!(stderr(&output), "1 error, 0 warnings\n");
    assert_eq!(output.status.code(), Some(1));
}

/// Rules a reviewer should question: a device its segment's rule already covers, a CIDR the
/// same as a zone, and a CIDR that also takes in the plant's devices.
fn add_questionable_rules(tmp: &Path) {
    edit(
        tmp,
        "plcs.yaml",
        "    ports: [\"123/udp\"]\naccept:",
        "    ports: [\"123/udp\"]\n\
         \x20 - to: robot-1\n\
         \x20   ports: [\"502/tcp\"]\n\
         \x20 - to: 198.51.100.123/32\n\
         \x20   ports: [\"123/udp\"]\n\
         accept:",
    );
    let cameras = tmp.join("segments/cameras.yaml");
    let mut text = fs::read_to_string(&cameras).unwrap();
    text.push_str("  - to: 10.20.0.0/16\n    ports: [\"554/tcp\"]\n");
    fs::write(cameras, text).unwrap();
}

const QUESTIONABLE: [&str; 3] = [
    "segments/cameras.yaml:13:5: warning: \"to: 10.20.0.0/16\" also reaches devices broker-1 (segment mqtt-broker), cam-01 (segment cameras), plc-7, plc-8 (segment plcs), robot-1 (segment robots), temp-001 (segment sensors) and 2 more: 10.20.0.0/16 contains their addresses; if that is intended, name their segments or devices in \"to:\"",
    "segments/plcs.yaml:18:5: warning: allow rule \"to: robot-1 ports: [502/tcp]\" is shadowed by the broader rule at segments/plcs.yaml:14 (\"to: robots ports: [502/tcp]\"): it adds nothing; remove it, or narrow the broader rule",
    "segments/plcs.yaml:20:5: warning: allow rule \"to: 198.51.100.123/32 ports: [123/udp]\" matches exactly what the rule at segments/plcs.yaml:16 (\"to: ntp ports: [123/udp]\") matches; remove one of them",
];

#[test]
fn shadowed_and_overreaching_rules_warn_and_fail_strict() {
    let tmp = copy_example();
    add_questionable_rules(tmp.path());
    let expected: String = QUESTIONABLE.iter().map(|l| format!("{l}\n")).collect();

    let output = check(tmp.path(), &["segments"]);
    assert_eq!(stdout(&output), expected);
    assert_eq!(stderr(&output), "0 errors, 3 warnings\n");
    assert_eq!(output.status.code(), Some(0));

    let output = check(tmp.path(), &["--strict", "segments"]);
    assert_eq!(stdout(&output), expected);
    assert_eq!(
        stderr(&output),
        "0 errors, 3 warnings (--strict: warnings fail)\n"
    );
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn json_reports_every_diagnostic_and_the_counts() {
    let tmp = copy_example();
    add_questionable_rules(tmp.path());
    let output = check(tmp.path(), &["segments", "--json", "--strict"]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&output)).expect("one JSON document");
    let diagnostics: Vec<Value> = QUESTIONABLE
        .iter()
        .map(|line| {
            // `file:line:col: warning: message`
            let mut parts = line.splitn(5, ':');
            let mut next = || parts.next().unwrap();
            let (file, line, column) = (next(), next(), next());
            json!({
                "file": file,
                "line": line.parse::<u64>().unwrap(),
                "column": column.parse::<u64>().unwrap(),
                "severity": next().trim(),
                "message": next().trim_start(),
            })
        })
        .collect();
    assert_eq!(
        report,
        json!({"diagnostics": diagnostics, "errors": 0, "warnings": 3})
    );

    // Loader errors come the same way.
    edit(
        tmp.path(),
        "sensors.yaml",
        "- to: mqtt-broker",
        "- to: mqtt-brokr",
    );
    let output = check(tmp.path(), &["segments", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        report,
        json!({
            "diagnostics": [{
                "file": "segments/sensors.yaml",
                "line": 15,
                "column": 9,
                "severity": "error",
                "message": "unknown target \"mqtt-brokr\" (did you mean \"mqtt-broker\"?)",
            }],
            "errors": 1,
            "warnings": 0,
        })
    );
}

#[test]
fn unreadable_input_and_bad_usage_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let output = check(tmp.path(), &["missing"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with("segward: cannot read missing: "),
        "{}",
        stderr(&output)
    );

    let output = check(tmp.path(), &["."]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "segward: no segment files (*.yaml, *.yml) under .\n"
    );

    for args in [&[][..], &[".", "--stritc"]] {
        let output = check(tmp.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_eq!(stdout(&output), "");
    }
}
