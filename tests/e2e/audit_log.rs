//! The audit log file (SPEC §5): one JSON object per line; every event type appears, with
//! `ts` (RFC 3339), `event` and the fields that apply to it.

use std::{net::UdpSocket, time::Duration};

use serde_json::{Map, Value};

use crate::lab::{Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
    addresses: [10.20.1.11]
  - id: temp-002
    mac: "02:00:00:00:10:02"
allow:
  - to: 198.51.100.10
    ports: ["123/udp"]
---
kind: Segment
name: cameras
mode: audit
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

/// The policy made invalid: the target on line 11, column 9 names nothing.
const BROKEN: (&str, &str) = (
    "  - to: 198.51.100.10\n    ports: [\"123/udp\"]",
    "  - to: mqtt-brokr\n    ports: [\"123/udp\"]",
);

/// Sends one UDP datagram from `host` (from `src`) to `dst`.
fn datagram(lab: &Lab, host: &str, src: &str, dst: &str) {
    let (src, dst) = (format!("{src}:0"), dst.to_string());
    lab.run_in(host, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        socket.set_ip_transparent_v4(true).unwrap();
        let src: std::net::SocketAddr = src.parse().unwrap();
        socket.bind(&src.into()).unwrap();
        let socket: UdpSocket = socket.into();
        socket.send_to(b"audit", dst).unwrap();
    });
}

#[track_caller]
fn run_ok(lab: &Lab, args: &[&str]) {
    let out = lab.control(args);
    assert!(out.status.success(), "segward {}: {out:?}", args.join(" "));
}

/// The first event of kind `event` that `pred` accepts, waiting up to 3 s for it.
#[track_caller]
fn find(lab: &Lab, event: &str, pred: impl Fn(&Map<String, Value>) -> bool) -> Map<String, Value> {
    lab.wait_for_audit(Duration::from_secs(3), |e| {
        e["event"] == event && pred(e.as_object().unwrap())
    })
    .unwrap_or_else(|| {
        panic!(
            "no matching {event:?} event in the audit log:\n{:#?}",
            lab.audit_events()
        )
    })
    .as_object()
    .unwrap()
    .clone()
}

/// Asserts the event has the expected fields with the expected values (`None`: any
/// non-empty value), `ts` being RFC 3339, and no field that is null or empty.
#[track_caller]
fn assert_fields(event: &Map<String, Value>, expected: &[(&str, Option<Value>)]) {
    let ts = event["ts"].as_str().unwrap_or_default();
    humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("ts {ts:?} is not RFC 3339: {e}"));
    for (key, value) in event {
        assert!(
            !value.is_null() && value != "",
            "{key} is empty in {event:?}"
        );
    }
    for (key, value) in expected {
        match value {
            Some(value) => assert_eq!(&event[*key], value, "{key} of {event:?}"),
            None => assert!(
                !event[*key].is_null() && event[*key] != "",
                "{key} of {event:?}"
            ),
        }
    }
}

fn v(s: impl Into<Value>) -> Option<Value> {
    Some(s.into())
}

#[test]
fn every_event_type_is_in_the_audit_log_with_its_fields() {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["10.20.1.11"])
        .device_with_mac("temp-002", "02:00:00:00:10:02", &["10.20.1.50"])
        .device("cam-01", &["10.20.2.21"])
        .device("stranger", &["10.20.7.7"])
        .device_with_mac("impostor", "02:00:00:00:66:66", &["10.20.1.66"])
        .uplink_host("198.51.100.10")
        .build();
    let policy_dir = lab.write_policy(POLICY);
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:22"),
        lab.udp_echo_server(UPLINK, "198.51.100.10:123"),
    );
    let log = lab.audit_log().display().to_string();
    let daemon = lab.start_enforcing(&["--audit-log", &log]);

    // policy_loaded
    let loaded = find(&lab, "policy_loaded", |_| true);
    assert_fields(&loaded, &[("generation", v(1))]);

    // deny: a device opens what its segment does not allow.
    datagram(&lab, "temp-001", "10.20.1.11", "198.51.100.10:9999");
    let deny = find(&lab, "deny", |e| e["device"] == "temp-001");
    assert_fields(
        &deny,
        &[
            ("device", v("temp-001")),
            ("segment", v("sensors")),
            ("src", v("10.20.1.11")),
            ("dst", v("198.51.100.10")),
            ("proto", v("udp")),
            ("dport", v(9999)),
            ("reason", v("default_deny")),
            ("mac", v("02:00:00:00:10:01")),
        ],
    );

    // audit_deny: the same in a `mode: audit` segment, which lets it pass.
    lab.assert_passes("cam-01", &Probe::tcp("198.51.100.10:22"));
    let audit_deny = find(&lab, "audit_deny", |e| e["device"] == "cam-01");
    assert_fields(
        &audit_deny,
        &[
            ("device", v("cam-01")),
            ("segment", v("cameras")),
            ("src", v("10.20.2.21")),
            ("dst", v("198.51.100.10")),
            ("proto", v("tcp")),
            ("dport", v(22)),
            ("reason", v("default_deny")),
            ("mac", v(lab.device_mac("cam-01"))),
        ],
    );

    // unknown_device: a source no device owns.
    datagram(&lab, "stranger", "10.20.7.7", "198.51.100.10:123");
    let unknown = find(&lab, "unknown_device", |e| e["src"] == "10.20.7.7");
    assert_fields(
        &unknown,
        &[
            ("src", v("10.20.7.7")),
            ("dst", v("198.51.100.10")),
            ("proto", v("udp")),
            ("dport", v(123)),
            ("reason", v("unknown_device")),
            ("mac", v(lab.device_mac("stranger"))),
        ],
    );

    // spoof: temp-001's address from another MAC.
    datagram(&lab, "impostor", "10.20.1.11", "198.51.100.10:123");
    let spoof = find(&lab, "spoof", |_| true);
    assert_fields(
        &spoof,
        &[
            ("device", v("temp-001")),
            ("segment", v("sensors")),
            ("src", v("10.20.1.11")),
            ("dst", v("198.51.100.10")),
            ("proto", v("udp")),
            ("dport", v(123)),
            ("reason", v("spoof")),
            ("mac", v("02:00:00:00:66:66")),
        ],
    );

    // quarantine and release
    run_ok(&lab, &["quarantine", "cam-01", "--reason", "ticket 4711"]);
    let quarantine = find(&lab, "quarantine", |_| true);
    assert_fields(
        &quarantine,
        &[
            ("device", v("cam-01")),
            ("segment", v("cameras")),
            ("reason", v("ticket 4711")),
            ("source", v("manual")),
        ],
    );
    run_ok(&lab, &["release", "cam-01"]);
    let release = find(&lab, "release", |_| true);
    assert_fields(
        &release,
        &[("device", v("cam-01")), ("segment", v("cameras"))],
    );

    // bind and unbind
    run_ok(&lab, &["bind", "temp-002", "10.20.1.50"]);
    let bind = find(&lab, "bind", |_| true);
    let identity = [
        ("device", v("temp-002")),
        ("segment", v("sensors")),
        ("address", v("10.20.1.50")),
        ("source", v("bind")),
    ];
    assert_fields(&bind, &identity);
    run_ok(&lab, &["unbind", "temp-002", "10.20.1.50"]);
    let unbind = find(&lab, "unbind", |_| true);
    assert_fields(&unbind, &identity);

    // policy_rejected: a broken policy; the old one keeps enforcing. Then a good one again.
    let file = policy_dir.join("policy.yaml");
    assert!(POLICY.contains(BROKEN.0));
    std::fs::write(&file, POLICY.replacen(BROKEN.0, BROKEN.1, 1)).unwrap();
    let out = lab.control(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "reload of a broken policy: {stderr}"
    );
    let location = format!("{}:11:9", file.display());
    assert!(stderr.contains(&location), "{stderr}");
    let rejected = find(&lab, "policy_rejected", |_| true);
    // SPEC §5 names no field for the why of a rejection; segward writes it as `error`.
    assert_fields(&rejected, &[("error", None)]);
    let error = rejected["error"].as_str().unwrap();
    assert!(
        error.contains(&location) && error.contains("mqtt-brokr"),
        "{error}"
    );
    lab.assert_passes(
        "temp-001",
        &Probe::udp("198.51.100.10:123").from("10.20.1.11"),
    );

    std::fs::write(&file, POLICY).unwrap();
    run_ok(&lab, &["reload"]);
    let reloaded = find(&lab, "policy_loaded", |e| e["generation"] == 2);
    assert_fields(&reloaded, &[("generation", v(2))]);

    // Every kind of SPEC §5 is there, every line is a JSON object with ts and event.
    let events = lab.audit_events();
    for kind in [
        "deny",
        "audit_deny",
        "unknown_device",
        "spoof",
        "quarantine",
        "release",
        "bind",
        "unbind",
        "policy_loaded",
        "policy_rejected",
    ] {
        assert!(
            events.iter().any(|e| e["event"] == kind),
            "no {kind} event:\n{events:#?}\n{}",
            daemon.output_so_far()
        );
    }
}
