//! Traffic towards devices: replies of allowed flows pass (device to device, device to
//! uplink), `accept` rules open flows from outside, and nothing else gets to a device.

use std::net::IpAddr;

use crate::lab::{Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: brokers
    ports: ["8883/tcp", "icmp"]
  - to: 198.51.100.10
    ports: ["123/udp"]
---
kind: Segment
name: brokers
devices:
  - id: broker
    addresses: [10.20.9.1]
---
kind: Segment
name: plcs
devices:
  - id: plc-7
    addresses: [10.20.3.7]
accept:
  - from: ops-vpn
    ports: ["22/tcp", "161/udp"]
---
kind: Zone
name: ops-vpn
cidrs: [192.0.2.0/24]
"#;

#[test]
fn replies_and_accept_rules_reach_devices_and_nothing_else_does() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .device("broker", &["10.20.9.1"])
        .device("plc-7", &["10.20.3.7"])
        .uplink_host("198.51.100.10")
        .uplink_host("192.0.2.5")
        .build();
    lab.write_policy(POLICY);
    let _servers = (
        lab.tcp_listen("broker", "10.20.9.1:8883"),
        lab.tcp_listen("temp-001", "10.20.1.11:8883"),
        lab.tcp_listen("plc-7", "10.20.3.7:22"),
        lab.tcp_listen("plc-7", "10.20.3.7:23"),
        lab.tcp_listen(UPLINK, "192.0.2.5:22"),
        lab.udp_echo_server(UPLINK, "198.51.100.10:123"),
    );
    // A dropped packet towards a device must not reach it at all (its answer would be
    // dropped on the way back anyway, so only the device's own socket can tell).
    let sensor_udp = lab.udp_echo_server("temp-001", "10.20.1.11:5555");
    let plc_snmp = lab.udp_echo_server("plc-7", "10.20.3.7:161");
    let plc_trap = lab.udp_echo_server("plc-7", "10.20.3.7:162");
    let daemon = lab.start_enforcing(&[]);

    let accept_other_port = Probe::udp("10.20.3.7:162").from("192.0.2.5");
    let accept_outsider = Probe::udp("10.20.3.7:161").from("198.51.100.10");
    let unsolicited_reply = Probe::udp("10.20.1.11:5555").from("198.51.100.10");
    let cases = [
        (
            "device to device TCP, replies pass",
            "temp-001",
            Probe::tcp("10.20.9.1:8883"),
            true,
        ),
        (
            "device to device ICMP echo, replies pass",
            "temp-001",
            Probe::icmp("10.20.9.1"),
            true,
        ),
        (
            "device to uplink UDP, replies pass",
            "temp-001",
            Probe::udp("198.51.100.10:123"),
            true,
        ),
        (
            "the other direction was never allowed",
            "broker",
            Probe::tcp("10.20.1.11:8883"),
            false,
        ),
        (
            "accept from a zone, replies pass",
            UPLINK,
            Probe::tcp("10.20.3.7:22").from("192.0.2.5"),
            true,
        ),
        (
            "accept names another port",
            UPLINK,
            Probe::tcp("10.20.3.7:23").from("192.0.2.5"),
            false,
        ),
        (
            "accept source outside the zone",
            UPLINK,
            Probe::tcp("10.20.3.7:22").from("198.51.100.10"),
            false,
        ),
        (
            "accept does not open the way out",
            "plc-7",
            Probe::tcp("192.0.2.5:22"),
            false,
        ),
        (
            "accept UDP from a zone",
            UPLINK,
            Probe::udp("10.20.3.7:161").from("192.0.2.5"),
            true,
        ),
        (
            "accept UDP, another port",
            UPLINK,
            accept_other_port.clone(),
            false,
        ),
        (
            "accept UDP, source outside the zone",
            UPLINK,
            accept_outsider.clone(),
            false,
        ),
        (
            "a 'reply' to a flow never opened",
            UPLINK,
            unsolicited_reply.clone(),
            false,
        ),
    ];
    let mut failures = lab.judge_flows(&cases);
    for (probe, receiver) in [
        (&accept_other_port, &plc_trap),
        (&accept_outsider, &plc_snmp),
        (&unsolicited_reply, &sensor_udp),
    ] {
        let sender: Option<IpAddr> = probe.src;
        if receiver.peers().iter().any(|p| Some(p.ip()) == sender) {
            failures.push(format!("{probe} reached the device's socket"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} flows judged wrongly:\n  {}\n--- daemon output ---\n{}",
        failures.len(),
        failures.join("\n  "),
        daemon.output_so_far()
    );
}
