//! The control socket and the daemon commands (SPEC §3): `status`, `devices`,
//! `devices --unknown`, their `--json`; bad input gets a clear error and changes nothing;
//! only root may use the socket; no daemon is exit code 3.

use std::{
    io::{BufRead, BufReader, Write},
    net::UdpSocket,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;

use crate::lab::{segward_bin, Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
  - id: temp-002
    mac: "02:00:00:00:10:02"
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
---
kind: Segment
name: cameras
devices:
  - id: cam-01
    addresses: [10.20.2.21]
allow:
  - to: 198.51.100.10
    ports: ["554/tcp"]
---
kind: Quarantine
allow:
  - to: 198.51.100.10
    ports: ["443/tcp"]
"#;

/// The request line limit of the protocol.
const LIMIT: usize = 64 * 1024;

fn lab() -> Lab {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .device_with_mac("temp-002", "02:00:00:00:10:02", &["10.20.1.50"])
        .device("cam-01", &["10.20.2.21"])
        .device("stranger", &["10.20.7.7"])
        .uplink_host("198.51.100.10")
        .build();
    lab.write_policy(POLICY);
    lab
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends raw bytes on one connection and reads `answers` response lines; the bytes are
/// written from another thread (the daemon may stop reading a too-long line).
fn exchange(socket: &Path, bytes: Vec<u8>, answers: usize) -> (Vec<Value>, UnixStream) {
    let stream = UnixStream::connect(socket).expect("connecting to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let writer = stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let writing = std::thread::spawn(move || {
        let _ = (&writer).write_all(&bytes);
    });
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut responses = Vec::new();
    for _ in 0..answers {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("no response from the daemon: {e}"));
        assert!(line.ends_with('\n'), "incomplete response line {line:?}");
        responses.push(serde_json::from_str(&line).expect("a JSON response"));
    }
    writing.join().unwrap();
    (responses, stream)
}

/// The error of a failed response.
#[track_caller]
fn error_of(response: &Value) -> &str {
    assert_eq!(response["ok"], false, "{response}");
    assert!(response.get("reply").is_none(), "{response}");
    response["error"].as_str().expect("an error message")
}

/// What the daemon holds that bad input must not change: the device list, the status
/// without its clocks and counters, the state file, the audit log.
fn snapshot(lab: &Lab) -> (Value, Value, Option<String>, Vec<Value>) {
    let mut status = lab.control_json(&["status"]);
    let status_map = status.as_object_mut().unwrap();
    status_map.remove("uptime_seconds");
    status_map.remove("packets");
    status_map.remove("unknown_sources");
    (
        lab.control_json(&["devices"]),
        status,
        std::fs::read_to_string(lab.dir().join("state/state.json")).ok(),
        lab.audit_events(),
    )
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let lab = lab();
    let _server = lab.tcp_listen(UPLINK, "198.51.100.10:8883");
    let log = lab.audit_log().display().to_string();
    let daemon = lab.start_enforcing(&["--audit-log", &log]);
    // Some state to keep: a bound address.
    let bound = lab.control(&["bind", "temp-002", "10.20.1.50"]);
    assert!(bound.status.success(), "bind: {bound:?}");
    let before = snapshot(&lab);
    let socket = lab.control_socket();

    let cases: &[(&[u8], &str)] = &[
        (b"hello", "bad request: not JSON"),
        (b"\xff\xfe{}", "bad request: not UTF-8"),
        (b"[1,2,3]", "expected a JSON object with a \"command\""),
        (
            br#"{"command":"frobnicate"}"#,
            "unknown command \"frobnicate\"",
        ),
        (
            br#"{"command":"status","verbose":true}"#,
            "unknown field `verbose`",
        ),
        (
            br#"{"command":"quarantine","device":"nope","reason":"x"}"#,
            "unknown device \"nope\"",
        ),
        (
            br#"{"command":"release","device":"nope"}"#,
            "unknown device \"nope\"",
        ),
        (
            br#"{"command":"bind","device":"nope","address":"10.20.1.99"}"#,
            "unknown device \"nope\"",
        ),
        (
            br#"{"command":"bind","device":"temp-002","address":"10.20.1.300"}"#,
            "invalid IP address syntax",
        ),
        (
            br#"{"command":"bind","device":"temp-002","address":"224.0.0.1"}"#,
            "224.0.0.1 cannot be a device's address",
        ),
        (
            br#"{"command":"bind","device":"temp-002","address":"10.20.2.21"}"#,
            "10.20.2.21 is a static address of cam-01",
        ),
        (
            br#"{"command":"unbind","device":"cam-01","address":"10.20.1.50"}"#,
            "cannot unbind 10.20.1.50 from cam-01: it is not bound to that device",
        ),
        (
            br#"{"command":"unbind","device":"temp-001","address":"10.20.1.11"}"#,
            "it is a static address in the policy",
        ),
        (
            br#"{"command":"quarantine","device":"cam-01","reason":"  "}"#,
            "a quarantine needs a reason",
        ),
        (
            br#"{"command":"release","device":"cam-01"}"#,
            "cam-01 is not quarantined",
        ),
    ];
    // One connection for all: an error does not end it, the next request is still served.
    let mut bytes = Vec::new();
    for (line, _) in cases {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"{\"command\":\"status\"}\n");
    let (responses, _) = exchange(&socket, bytes, cases.len() + 1);
    for ((line, expected), response) in cases.iter().zip(&responses) {
        let error = error_of(response);
        assert!(
            error.contains(expected),
            "{}: got {error:?}, expected it to contain {expected:?}",
            text(line)
        );
    }
    assert_eq!(
        responses[cases.len()]["ok"],
        true,
        "{}",
        responses[cases.len()]
    );

    // Huge messages: a line over the limit (a real command with a huge reason), and 16 MiB
    // without a newline. The daemon answers and hangs up without reading the rest.
    let huge_reason = format!(
        "{{\"command\":\"quarantine\",\"device\":\"cam-01\",\"reason\":\"{}\"}}\n",
        "x".repeat(LIMIT)
    );
    for bytes in [huge_reason.into_bytes(), vec![b'{'; 16 << 20]] {
        let len = bytes.len();
        let (responses, stream) = exchange(&socket, bytes, 1);
        assert_eq!(
            error_of(&responses[0]),
            format!("message too long (limit {LIMIT} bytes)"),
            "{len} bytes"
        );
        let mut rest = String::new();
        let eof = BufReader::new(stream).read_line(&mut rest);
        // Closed: an end of file, or a reset when the daemon hung up with our bytes
        // still unread in its buffer (which of the two depends on timing).
        let closed = matches!(&eof, Ok(0))
            || matches!(&eof, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        assert!(
            closed,
            "the connection stays open after a too-long message: {eof:?} {rest:?}"
        );
    }

    // The CLI checks what it can itself (exit 2) and passes the daemon's refusals on (exit 1).
    let cli: &[(&[&str], i32, &str)] = &[
        (
            &["bind", "temp-002", "10.20.1.300"],
            2,
            "invalid value '10.20.1.300'",
        ),
        (
            &["quarantine", "cam-01", "--reason", ""],
            2,
            "must not be empty",
        ),
        (&["quarantine", "cam-01"], 2, "--reason"),
        (
            &["quarantine", "nope", "--reason", "x"],
            1,
            "unknown device \"nope\"",
        ),
        (&["release", "cam-01"], 1, "cam-01 is not quarantined"),
        (
            &["bind", "temp-002", "ff02::1"],
            1,
            "ff02::1 cannot be a device's address",
        ),
    ];
    for (args, code, expected) in cli {
        let out = lab.control(args);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "segward {}: {stderr}",
            args.join(" ")
        );
        assert!(
            stderr.contains(expected),
            "segward {}: stderr {stderr:?} does not say {expected:?}",
            args.join(" ")
        );
    }

    assert!(
        lab.control(&["status"]).status.success(),
        "the daemon still answers:\n{}",
        daemon.output_so_far()
    );
    let after = snapshot(&lab);
    assert_eq!(after.0, before.0, "devices changed");
    assert_eq!(after.1, before.1, "status changed");
    assert_eq!(after.2, before.2, "the state file changed");
    assert_eq!(after.3, before.3, "the audit log got events");
    lab.assert_passes("temp-002", &Probe::tcp("198.51.100.10:8883"));
    lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
}

/// `segward ARGS... --socket <lab socket>` as uid/gid 65534 (nobody), no groups.
fn as_nobody(lab: &Lab, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(segward_bin())
        .args(args)
        .arg("--socket")
        .arg(lab.control_socket())
        .env_remove("SEGWARD_SOCKET")
        .output()
        .expect("running setpriv")
}

#[test]
fn a_user_other_than_root_cannot_use_the_socket() {
    let lab = lab();
    let mut daemon = lab.start_enforcing(&[]);
    let socket = lab.control_socket();
    let meta = std::fs::metadata(&socket).expect("the control socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    // Let nobody get as far as the socket: the lab directory is private otherwise.
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let whoami = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "id",
            "-u",
        ])
        .output()
        .expect("setpriv");
    assert_eq!(
        text(&whoami.stdout).trim(),
        "65534",
        "setpriv works: {whoami:?}"
    );

    // The socket's mode keeps it out.
    let out = as_nobody(&lab, &["status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(
        stderr.contains("the control socket is for root"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // And if the mode were wider, the daemon itself refuses a peer that is not root.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&lab, &["quarantine", "cam-01", "--reason", "by nobody"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("permission denied: the control socket is for root"),
        "{stderr}"
    );
    assert!(
        daemon.wait_for_output("refused a peer that is not root", Duration::from_secs(2)),
        "{}",
        daemon.output_so_far()
    );
    assert_eq!(lab.device_info("cam-01")["state"], "active");
}

#[test]
fn status_and_devices_in_text_and_json_and_exit_3_without_a_daemon() {
    let lab = lab();
    let mut daemon = lab.start_enforcing(&[]);
    let bound = lab.control(&["bind", "temp-002", "10.20.1.50"]);
    assert!(bound.status.success(), "bind: {bound:?}");

    // An unbound source sends traffic: it is dropped, and seen.
    const SENT: u64 = 3;
    lab.run_in("stranger", || {
        let socket = UdpSocket::bind("10.20.7.7:0").unwrap();
        for _ in 0..SENT {
            socket.send_to(b"who am I", "198.51.100.10:8883").unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));

    let status = lab.control_json(&["status"]);
    assert_eq!(status["result"], "status", "{status}");
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["mode"], "enforce", "{status}");
    assert_eq!(status["netns"], lab.gateway_netns(), "{status}");
    let ifaces: Vec<Value> = lab.device_ifaces().into_iter().map(Value::from).collect();
    assert_eq!(status["interfaces"], Value::from(ifaces), "{status}");
    assert_eq!(status["segments"], 2, "{status}");
    assert_eq!(status["devices"], 3, "{status}");
    assert_eq!(status["quarantined"], 0, "{status}");
    assert_eq!(status["bound_addresses"], 1, "{status}");
    assert_eq!(status["unknown_sources"], 1, "{status}");
    let unknown_drops = status["packets"]
        .as_array()
        .expect("packets")
        .iter()
        .find(|p| p["reason"] == "unknown_device")
        .unwrap_or_else(|| panic!("no unknown_device packets in {status}"));
    assert_eq!(unknown_drops["verdict"], "drop", "{status}");
    assert!(unknown_drops["packets"].as_u64() >= Some(SENT), "{status}");

    let out = lab.control(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let human = text(&out.stdout);
    for expected in [
        "generation:      1\n",
        "mode:            enforce\n",
        "devices:         3\n",
        "bound addresses: 1\n",
        "unknown sources: 1\n",
        &format!("netns:           {}\n", lab.gateway_netns()),
    ] {
        assert!(human.contains(expected), "no {expected:?} in:\n{human}");
    }
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("unknown_device") && l.contains("drop")),
        "{human}"
    );

    let devices = lab.control_json(&["devices"]);
    assert_eq!(devices["result"], "devices", "{devices}");
    let summary: Vec<(String, String, String, Vec<String>)> = devices["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_string(),
                d["segment"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
                lab.bound_addresses(d["id"].as_str().unwrap()),
            )
        })
        .collect();
    let row = |id: &str, seg: &str, addr: &str| {
        (
            id.to_string(),
            seg.to_string(),
            "active".to_string(),
            vec![addr.to_string()],
        )
    };
    assert_eq!(
        summary,
        [
            row("temp-001", "sensors", "10.20.1.11(static)"),
            row("temp-002", "sensors", "10.20.1.50(bind)"),
            row("cam-01", "cameras", "10.20.2.21(static)"),
        ]
    );
    assert_eq!(lab.device_info("temp-002")["mac"], "02:00:00:00:10:02");
    let out = lab.control(&["devices"]);
    let human = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let line = human
        .lines()
        .find(|l| l.starts_with("temp-002 "))
        .unwrap_or_else(|| panic!("no temp-002 line:\n{human}"));
    for field in ["sensors", "active", "10.20.1.50(bind)", "02:00:00:00:10:02"] {
        assert!(line.contains(field), "{field} not in {line:?}");
    }

    let unknown = lab.control_json(&["devices", "--unknown"]);
    assert_eq!(unknown["result"], "unknown", "{unknown}");
    let sources = unknown["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 1, "{unknown}");
    let source = &sources[0];
    assert_eq!(source["address"], "10.20.7.7", "{unknown}");
    assert_eq!(source["mac"], lab.device_mac("stranger"), "{unknown}");
    assert_eq!(source["packets"], SENT, "{unknown}");
    for key in ["first_seen", "last_seen"] {
        let at = source[key].as_str().unwrap_or_default();
        humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{key} {at:?}: {e}"));
    }
    let out = lab.control(&["devices", "--unknown"]);
    let human = text(&out.stdout);
    let line = human
        .lines()
        .find(|l| l.starts_with("10.20.7.7 "))
        .unwrap_or_else(|| panic!("no line for 10.20.7.7:\n{human}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields[..3],
        ["10.20.7.7", lab.device_mac("stranger"), &SENT.to_string()],
        "{human}"
    );

    // No daemon: exit 3 with a message that says so, for every daemon command.
    daemon.stop();
    for args in [
        &["status"][..],
        &["devices", "--unknown"],
        &["release", "cam-01"],
        &["status", "--json"],
    ] {
        let out = lab.control(args);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "segward {}: {stderr}",
            args.join(" ")
        );
        assert!(
            stderr.contains(&format!(
                "no segward daemon at {}",
                lab.control_socket().display()
            )) && stderr.contains("is `segward run` running?"),
            "segward {}: {stderr}",
            args.join(" ")
        );
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    }
    // The socket from the environment, as documented.
    let out = Command::new(segward_bin())
        .arg("status")
        .env("SEGWARD_SOCKET", lab.dir().join("nowhere.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stderr).contains("nowhere.sock"), "{out:?}");
}
