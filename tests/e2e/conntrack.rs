//! Traffic towards devices: replies of allowed flows pass (device to device, device to
//! uplink), `accept` rules open flows from outside, and nothing else gets to a device.

use std::fs;

use std::net::IpAddr;

use crate::lab::{Lab, Outcome, Probe, UdpServer, DROP_TIMEOUT, PASS_TIMEOUT, UPLINK};

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
    let policy = lab.dir().join("policy");
    fs::create_dir_all(&policy).unwrap();
    fs::write(policy.join("policy.yaml"), POLICY).unwrap();
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
    let mut args = vec![
        "run".to_string(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    for iface in lab.device_ifaces() {
        args.extend(["--device-iface".into(), iface]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = lab.start_segward(&args);

    let cases: &[(&str, &str, Probe, bool, Option<&UdpServer>)] = &[
        (
            "device to device TCP, replies pass",
            "temp-001",
            Probe::tcp("10.20.9.1:8883"),
            true,
            None,
        ),
        (
            "device to device ICMP echo, replies pass",
            "temp-001",
            Probe::icmp("10.20.9.1"),
            true,
            None,
        ),
        (
            "device to uplink UDP, replies pass",
            "temp-001",
            Probe::udp("198.51.100.10:123"),
            true,
            None,
        ),
        (
            "the other direction was never allowed",
            "broker",
            Probe::tcp("10.20.1.11:8883"),
            false,
            None,
        ),
        (
            "accept from a zone, replies pass",
            UPLINK,
            Probe::tcp("10.20.3.7:22").from("192.0.2.5"),
            true,
            None,
        ),
        (
            "accept names another port",
            UPLINK,
            Probe::tcp("10.20.3.7:23").from("192.0.2.5"),
            false,
            None,
        ),
        (
            "accept source outside the zone",
            UPLINK,
            Probe::tcp("10.20.3.7:22").from("198.51.100.10"),
            false,
            None,
        ),
        (
            "accept does not open the way out",
            "plc-7",
            Probe::tcp("192.0.2.5:22"),
            false,
            None,
        ),
        (
            "accept UDP from a zone",
            UPLINK,
            Probe::udp("10.20.3.7:161").from("192.0.2.5"),
            true,
            None,
        ),
        (
            "accept UDP, another port",
            UPLINK,
            Probe::udp("10.20.3.7:162").from("192.0.2.5"),
            false,
            Some(&plc_trap),
        ),
        (
            "accept UDP, source outside the zone",
            UPLINK,
            Probe::udp("10.20.3.7:161").from("198.51.100.10"),
            false,
            Some(&plc_snmp),
        ),
        (
            "a 'reply' to a flow never opened",
            UPLINK,
            Probe::udp("10.20.1.11:5555").from("198.51.100.10"),
            false,
            Some(&sensor_udp),
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, host, probe, passes, receiver)| {
            let timeout = if *passes { PASS_TIMEOUT } else { DROP_TIMEOUT };
            let outcome = lab.probe(host, probe, timeout);
            let ok = if *passes {
                outcome.passed()
            } else {
                outcome == Outcome::TimedOut
            };
            let sender: Option<IpAddr> = probe.src;
            let reached =
                receiver.is_some_and(|r| r.peers().iter().any(|p| Some(p.ip()) == sender));
            if reached {
                return Some(format!(
                    "{name}: {probe} from {host} reached the device's socket"
                ));
            }
            (!ok).then(|| {
                let want = if *passes { "pass" } else { "be dropped" };
                format!("{name}: {probe} from {host} should {want}, but it {outcome}")
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} flows judged wrongly:\n  {}\n--- daemon output ---\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n  "),
        daemon.output_so_far()
    );
}
