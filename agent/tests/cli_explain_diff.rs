//! `segward explain` and `segward diff` as users run them: the real binary on the example
//! policy in segments/ (a smart factory), or on edited copies of it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The workspace root: commands run there so that `segments` prints as users see it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).expect("stdout is one JSON value")
    }
}

fn segward(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_segward"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("segward runs");
    Run {
        code: output.status.code().expect("an exit code"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

fn explain(from: &str, to: &str, port: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "explain", "segments", "--from", from, "--to", to, "--port", port,
    ];
    args.extend(extra);
    segward(&args)
}

/// A copy of segments/ in a temporary directory, as `old` and `new`, `edit` applied to `new`.
struct Copies {
    dir: tempfile::TempDir,
}

impl Copies {
    fn new(edit: impl FnOnce(&Path)) -> Copies {
        let dir = tempfile::TempDir::new().expect("a temporary directory");
        for side in ["old", "new"] {
            fs::create_dir(dir.path().join(side)).expect("a policy directory");
            for entry in fs::read_dir(root().join("segments")).expect("segments/ is readable") {
                let path = entry.expect("a directory entry").path();
                let name = path.file_name().expect("a file name");
                fs::copy(&path, dir.path().join(side).join(name)).expect("copied");
            }
        }
        edit(&dir.path().join("new"));
        Copies { dir }
    }

    fn old(&self) -> String {
        self.dir.path().join("old").display().to_string()
    }

    fn new_dir(&self) -> String {
        self.dir.path().join("new").display().to_string()
    }
}

fn replace(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = fs::read_to_string(&path).expect("readable");
    assert!(text.contains(from), "{from:?} is not in {file}");
    fs::write(&path, text.replacen(from, to, 1)).expect("writable");
}

#[test]
fn explain_allow_names_the_rule_and_exits_0() {
    let run = explain("temp-001", "broker-1", "8883/tcp", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines(),
        [
            "allow",
            "segments/sensors.yaml:15: to: mqtt-broker ports: [8883/tcp]",
            "rule: first matching allow rule of segment \"sensors\", port entry 8883/tcp",
            "flow: temp-001 (segment sensors) → broker-1 (segment mqtt-broker), 8883/tcp",
        ]
    );
    // Addresses work as well as ids; a zone's outside address is named with its zone.
    let run = explain("10.20.3.7", "198.51.100.123", "123/udp", &[]);
    assert_eq!(run.code, 0);
    assert_eq!(
        run.lines()[..2],
        ["allow", "segments/plcs.yaml:16: to: ntp ports: [123/udp]"]
    );
    assert_eq!(
        run.lines()[3],
        "flow: 10.20.3.7 (plc-7, segment plcs) → 198.51.100.123 (no device; zone ntp), 123/udp"
    );
}

#[test]
fn explain_deny_gives_the_reason_and_exits_1() {
    let run = explain("10.20.1.11", "10.20.2.21", "8884/tcp", &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(
        run.lines(),
        [
            "deny",
            "default deny: no allow rule of segment \"sensors\" matches 10.20.2.21 (cam-01, \
             segment cameras), 8884/tcp",
            "flow: 10.20.1.11 (temp-001, segment sensors) → 10.20.2.21 (cam-01, segment \
             cameras), 8884/tcp",
        ]
    );
    // Devices of the same segment need a rule too.
    let run = explain("plc-7", "plc-8", "502/tcp", &[]);
    assert_eq!((run.code, run.lines()[0]), (1, "deny"));
    // icmp is a protocol of its own.
    let run = explain("temp-001", "broker-1", "icmp", &[]);
    assert_eq!((run.code, run.lines()[0]), (1, "deny"));
}

#[test]
fn explain_accept_rules_for_outside_sources() {
    let run = explain("192.0.2.7", "plc-7", "22/tcp", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines()[..3],
        [
            "allow",
            "segments/plcs.yaml:19: from: ops-vpn ports: [22/tcp]",
            "rule: first matching accept rule of segment \"plcs\", port entry 22/tcp",
        ]
    );
    let run = explain("2001:db8:9::1", "10.20.3.8", "23/tcp", &[]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.lines()[1],
        "default deny: no accept rule of segment \"plcs\" matches 2001:db8:9::1 (no device; zone \
         ops-vpn), 23/tcp"
    );
    // An unbound address that does not go to a device is an unknown device.
    let run = explain("10.20.1.99", "gateway", "53/udp", &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.lines()[1].starts_with("unknown device: 10.20.1.99 is bound to no device"),
        "{}",
        run.stdout
    );
}

#[test]
fn explain_quarantined_sources() {
    let run = explain("cam-01", "203.0.113.4", "443/tcp", &["--quarantined"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines()[1],
        "segments/quarantine.yaml:4: to: remediation ports: [443/tcp]"
    );
    let run = explain("10.20.2.21", "broker-1", "8883/tcp", &["--quarantined"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.lines()[1],
        "quarantined: cam-01 is quarantined and no allow rule of the Quarantine matches broker-1 \
         (segment mqtt-broker), 8883/tcp"
    );
    let run = explain("10.20.1.99", "broker-1", "8883/tcp", &["--quarantined"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("only devices are quarantined"),
        "{}",
        run.stderr
    );
}

#[test]
fn explain_gateway_and_audit_mode() {
    let copies = Copies::new(|dir| {
        replace(
            dir,
            "sensors.yaml",
            "allow:",
            "mode: audit\nallow:\n  - to: gateway\n    ports: [\"53/udp\"]",
        );
    });
    let new = copies.new_dir();
    let args = |port: &'static str| {
        [
            "explain", &new, "--from", "vib-001", "--to", "gateway", "--port", port,
        ]
    };
    let run = segward(&args("53/udp"));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.lines()[1].split_once(": ").map(|(_, text)| text),
        Some("to: gateway ports: [53/udp]")
    );
    let run = segward(&args("54/udp"));
    assert_eq!(run.code, 1);
    assert_eq!(
        run.lines()[2],
        "audit: segment \"sensors\" is in audit mode, so the packet passes and is reported as \
         audit_deny"
    );
}

#[test]
fn explain_json() {
    let run = explain("temp-001", "broker-1", "8883/tcp", &["--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    assert_eq!(json["verdict"], "allow");
    assert_eq!(json["rule"]["location"], "segments/sensors.yaml:15");
    assert_eq!(json["rule"]["line"], 15);
    assert_eq!(json["rule"]["segment"], "sensors");
    assert_eq!(json["rule"]["text"], "to: mqtt-broker ports: [8883/tcp]");
    assert_eq!(json["from"]["segment"], "sensors");
    assert_eq!(json["to"]["device"], "broker-1");

    let run = explain("temp-001", "198.51.100.5", "443/tcp", &["--json"]);
    assert_eq!(run.code, 1);
    let json = run.json();
    assert_eq!(json["verdict"], "deny");
    assert_eq!(json["reason"], "default_deny");
    assert_eq!(json["passes"], false);
    assert_eq!(json["rule"], Value::Null);
    assert_eq!(json["to"]["zones"][0], "cloud-telemetry");
}

#[test]
fn explain_bad_usage_exits_2() {
    for (from, to, port, message) in [
        (
            "temp-001",
            "broker-1",
            "8883",
            "--port: invalid port \"8883\"",
        ),
        ("temp-001", "broker-1", "tcp", "--port: invalid port"),
        ("temp-001", "broker-1", "0/tcp", "--port: invalid port"),
        ("temp-001", "broker-1", "any", "--port: invalid port"),
        (
            "temp-01",
            "broker-1",
            "8883/tcp",
            "no device \"temp-01\" in the policy",
        ),
        (
            "temp-001",
            "broker",
            "8883/tcp",
            "no device \"broker\" in the policy",
        ),
        ("gateway", "broker-1", "8883/tcp", "--from gateway"),
    ] {
        let run = explain(from, to, port, &[]);
        assert_eq!(run.code, 2, "{from} {to} {port}: {}", run.stdout);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert!(
            run.stderr.contains(message),
            "{message:?} not in {:?}",
            run.stderr
        );
    }
}

#[test]
fn explain_and_diff_on_an_unreadable_or_invalid_policy_exit_2() {
    let copies = Copies::new(|dir| {
        replace(dir, "sensors.yaml", "to: mqtt-broker", "to: mqtt-brokr");
    });
    let new = copies.new_dir();
    let run = segward(&[
        "explain", &new, "--from", "temp-001", "--to", "broker-1", "--port", "8883/tcp",
    ]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("sensors.yaml:15:9: error: unknown target \"mqtt-brokr\""),
        "{}",
        run.stderr
    );
    let run = segward(&["diff", &copies.old(), &new]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("unknown target \"mqtt-brokr\""),
        "{}",
        run.stderr
    );

    let missing = copies.dir.path().join("missing").display().to_string();
    let run = segward(&[
        "explain", &missing, "--from", "a", "--to", "b", "--port", "1/tcp",
    ]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("cannot read"), "{}", run.stderr);
    let run = segward(&["diff", "segments", &missing]);
    assert_eq!(run.code, 2);
}

#[test]
fn diff_lists_reachability_changes_and_exits_0() {
    let copies = Copies::new(|dir| {
        replace(
            dir,
            "sensors.yaml",
            "[\"8883/tcp\"]",
            "[\"8883/tcp\", \"1883/tcp\"]",
        );
        replace(dir, "cameras.yaml", "[\"8883/tcp\"]", "[\"8884/tcp\"]");
        replace(dir, "cameras.yaml", "devices:", "mode: audit\ndevices:");
        replace(dir, "zones.yaml", "[192.0.2.0/24,", "[192.0.2.0/25,");
    });
    let (old, new) = (copies.old(), copies.new_dir());
    let run = segward(&["diff", &old, &new]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let header =
        format!("reachability changes from {old} to {new}: 2 gained, 2 lost, 1 mode change");
    assert_eq!(
        run.lines(),
        [
            header.as_str(),
            "- 192.0.2.128/25 (zone ops-vpn) → plcs: 22/tcp",
            "+ cameras → mqtt-broker: 8884/tcp",
            "- cameras → mqtt-broker: 8883/tcp",
            "+ sensors → mqtt-broker: 1883/tcp",
            "~ segment cameras: mode enforce → audit: its would-be drops now pass and are \
             reported as audit_deny",
        ]
    );

    let run = segward(&["diff", &old, &new, "--json"]);
    assert_eq!(run.code, 0);
    let json = run.json();
    let reach = json["reach"].as_array().expect("a list of changes");
    assert_eq!(reach.len(), 4);
    assert_eq!(reach[0]["change"], "lost");
    assert_eq!(reach[0]["from"]["kind"], "addresses");
    assert_eq!(reach[0]["from"]["cidr"], "192.0.2.128/25");
    assert_eq!(reach[0]["to"]["kind"], "segment");
    assert_eq!(reach[0]["to"]["segment"], "plcs");
    assert_eq!(reach[0]["ports"][0], "22/tcp");
    assert_eq!(reach[1]["change"], "gained");
    assert_eq!(reach[1]["ports"][0], "8884/tcp");
    assert_eq!(json["modes"][0]["segment"], "cameras");
    assert_eq!(json["modes"][0]["new"], "audit");

    let run = segward(&["diff", "segments", "segments"]);
    assert_eq!(run.code, 0);
    assert_eq!(
        run.lines(),
        ["no reachability changes from segments to segments"]
    );
    let run = segward(&["diff", "segments", "segments", "--json"]);
    assert_eq!(run.json(), serde_json::json!({"reach": [], "modes": []}));
}

#[test]
fn help_texts_give_the_exit_codes() {
    let run = segward(&["diff", "--help"]);
    assert_eq!(run.code, 0);
    assert!(run
        .stdout
        .contains("Exit status: 0 whether or not anything changed"));
    let run = segward(&["explain", "--help"]);
    assert!(run
        .stdout
        .contains("Exit status: 0 allow, 1 deny, 2 bad usage"));
}
