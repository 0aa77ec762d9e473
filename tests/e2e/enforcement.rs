//! The first enforcing packet path: device-originated flows against a segment's allowlist.

use crate::lab::{Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10/32
    ports: ["8883/tcp", "123/udp"]
  - to: cloud
    ports: ["443/tcp"]
---
kind: Zone
name: cloud
cidrs: [198.51.100.32/27]
"#;

/// Each flow in the table is tried against the real daemon and real kernel; "dropped"
/// means nothing came back at all (no RST, no ICMP error), and a server listens on every
/// destination that must be dropped, so a drop cannot be confused with a closed port.
#[test]
fn device_flows_follow_the_allowlist() {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["10.20.1.11"])
        .device("intruder", &["10.20.1.99"])
        .uplink_host("198.51.100.10")
        .uplink_host("198.51.100.20")
        .uplink_host("198.51.100.40")
        .build();
    lab.write_policy(POLICY);

    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:8884"),
        lab.tcp_listen(UPLINK, "198.51.100.20:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.40:443"),
        lab.tcp_listen(UPLINK, "198.51.100.40:8883"),
        lab.udp_echo_server(UPLINK, "198.51.100.10:123"),
        lab.udp_echo_server(UPLINK, "198.51.100.10:124"),
    );
    let daemon = lab.start_enforcing(&[]);

    let cases: &[(&str, &str, Probe, bool)] = &[
        (
            "allowed TCP to a CIDR",
            "temp-001",
            Probe::tcp("198.51.100.10:8883"),
            true,
        ),
        (
            "allowed UDP to a CIDR",
            "temp-001",
            Probe::udp("198.51.100.10:123"),
            true,
        ),
        (
            "allowed TCP into a zone",
            "temp-001",
            Probe::tcp("198.51.100.40:443"),
            true,
        ),
        (
            "unlisted destination",
            "temp-001",
            Probe::tcp("198.51.100.20:8883"),
            false,
        ),
        (
            "listed destination, other TCP port",
            "temp-001",
            Probe::tcp("198.51.100.10:8884"),
            false,
        ),
        (
            "listed destination, other UDP port",
            "temp-001",
            Probe::udp("198.51.100.10:124"),
            false,
        ),
        (
            "zone destination, port of another rule",
            "temp-001",
            Probe::tcp("198.51.100.40:8883"),
            false,
        ),
        (
            "ICMP was never allowed",
            "temp-001",
            Probe::icmp("198.51.100.10"),
            false,
        ),
        (
            "source no device owns",
            "intruder",
            Probe::tcp("198.51.100.10:8883"),
            false,
        ),
    ];
    let failures = lab.judge_flows(cases);
    assert!(
        failures.is_empty(),
        "{} of {} flows judged wrongly:\n  {}\n--- daemon output ---\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n  "),
        daemon.output_so_far()
    );
}
