//! IPv6 end to end: the same verdicts as IPv4 with real traffic. Allowed TCP, UDP and
//! ICMPv6 round trips work both ways (replies pass, neighbour discovery keeps working),
//! `accept` rules open flows from the uplink, and everything else is dropped, including a
//! device sending from an address it does not own.

use crate::lab::{Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: ["fd00:20::11"]
allow:
  - to: brokers
    ports: ["8883/tcp", "icmpv6"]
  - to: "2001:db8:100::10"
    ports: ["123/udp"]
---
kind: Segment
name: brokers
devices:
  - id: broker
    addresses: ["fd00:20::91"]
---
kind: Segment
name: plcs
devices:
  - id: plc-7
    addresses: ["fd00:20::37"]
accept:
  - from: ops-vpn
    ports: ["22/tcp"]
---
kind: Zone
name: ops-vpn
cidrs: ["2001:db8:9::/48"]
"#;

#[test]
fn ipv6_flows_follow_the_policy_both_ways() {
    let lab = Lab::builder()
        .device("temp-001", &["fd00:20::11"])
        .device("broker", &["fd00:20::91"])
        .device("plc-7", &["fd00:20::37"])
        .uplink_host("2001:db8:100::10")
        .uplink_host("2001:db8:9::5")
        .build();
    assert!(lab.has_ipv6());
    lab.write_policy(POLICY);
    let _servers = (
        lab.tcp_listen("broker", "[fd00:20::91]:8883"),
        lab.tcp_listen("temp-001", "[fd00:20::11]:8883"),
        lab.tcp_listen("plc-7", "[fd00:20::37]:22"),
        lab.tcp_listen("plc-7", "[fd00:20::37]:23"),
        lab.tcp_listen(UPLINK, "[2001:db8:100::10]:8883"),
        lab.udp_echo_server(UPLINK, "[2001:db8:100::10]:123"),
        lab.udp_echo_server(UPLINK, "[2001:db8:100::10]:124"),
    );
    let mut daemon = lab.start_enforcing(&[]);

    let cases = [
        (
            "device to device TCP, replies pass",
            "temp-001",
            Probe::tcp("[fd00:20::91]:8883"),
            true,
        ),
        (
            "device to device ICMPv6 echo, replies pass",
            "temp-001",
            Probe::icmp("fd00:20::91"),
            true,
        ),
        (
            "device to uplink UDP, replies pass",
            "temp-001",
            Probe::udp("[2001:db8:100::10]:123"),
            true,
        ),
        (
            "device to uplink UDP, another port",
            "temp-001",
            Probe::udp("[2001:db8:100::10]:124"),
            false,
        ),
        (
            "device to uplink TCP, no rule",
            "temp-001",
            Probe::tcp("[2001:db8:100::10]:8883"),
            false,
        ),
        (
            "the other direction was never allowed",
            "broker",
            Probe::tcp("[fd00:20::11]:8883"),
            false,
        ),
        (
            "accept from a zone, replies pass",
            UPLINK,
            Probe::tcp("[fd00:20::37]:22").from("2001:db8:9::5"),
            true,
        ),
        (
            "accept names another port",
            UPLINK,
            Probe::tcp("[fd00:20::37]:23").from("2001:db8:9::5"),
            false,
        ),
        (
            "accept source outside the zone",
            UPLINK,
            Probe::tcp("[fd00:20::37]:22").from("2001:db8:100::10"),
            false,
        ),
        (
            "accept does not open the way out",
            "plc-7",
            Probe::tcp("[2001:db8:100::10]:8883"),
            false,
        ),
        (
            "an unbound source address",
            "temp-001",
            Probe::tcp("[fd00:20::91]:8883").from("fd00:20::99"),
            false,
        ),
    ];
    // Twice: the second round runs on neighbour entries learned under enforcement.
    for round in 1..=2 {
        let failures = lab.judge_flows(&cases);
        assert!(
            failures.is_empty(),
            "round {round}: {} flows judged wrongly:\n  {}\n--- daemon output ---\n{}",
            failures.len(),
            failures.join("\n  "),
            daemon.output_so_far()
        );
    }
    daemon.stop();
    let counted = |reason| daemon.logged_counter(Some(reason), "packets").unwrap_or(0);
    // Each dropped case sent at least one packet per round, each passing one a reply.
    assert!(
        counted("default_deny") >= 2 * 6,
        "{}",
        daemon.output_so_far()
    );
    assert!(counted("unknown_device") >= 2, "{}", daemon.output_so_far());
    assert!(counted("reply") >= 2 * 4, "{}", daemon.output_so_far());
}
