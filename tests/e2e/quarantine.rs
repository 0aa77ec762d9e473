//! Quarantine (SPEC §2 rule 3): a device that scans trips `denied_flows` and is quarantined
//! automatically; then it may open only the Quarantine `allow` flows, its open connections
//! are cut, and nothing reaches it, until `release`. A quarantine follows the device, not
//! its address. Quarantines and learned bindings survive `kill -9` of the daemon and a
//! restart.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::lab::{wait_until, Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: cameras
devices:
  - id: cam-01
    addresses: [10.20.2.21]
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp", "123/udp"]
accept:
  - from: ops-vpn
    ports: ["161/udp", "22/tcp"]
---
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: cameras
    ports: ["5683/udp"]
---
kind: Zone
name: ops-vpn
cidrs: [192.0.2.0/24]
---
kind: Quarantine
allow:
  - to: 198.51.100.20
    ports: ["443/tcp"]
triggers:
  denied_flows: {count: 5, window: 10s}
"#;

/// `denied_flows: {count: 5}` trips at the 6th distinct denied flow.
const TRIP_AT: u16 = 6;
/// The first port the scan tries; it goes on one port after the other.
const SCAN_FROM: u16 = 2000;

fn quarantine_lab() -> Lab {
    let lab = Lab::builder()
        .device("cam-01", &["10.20.2.21"])
        .device("temp-001", &["10.20.1.11"])
        .uplink_host("198.51.100.10")
        .uplink_host("198.51.100.20")
        .uplink_host("192.0.2.5")
        .build();
    lab.write_policy(POLICY);
    lab
}

/// What the scan measured, all on the test's clocks.
struct Scan {
    /// When the SYN that crossed the threshold was sent.
    trigger: Instant,
    trigger_wall: SystemTime,
    /// The last allowed new flow that still passed after it, and the first that did not.
    last_open: Instant,
    first_blocked: Instant,
    probes: usize,
}

/// One new UDP flow to 198.51.100.10:123 (a fresh socket, so a fresh source port): whether
/// its echo came back within `timeout`.
fn udp_flow_passes(timeout: Duration) -> bool {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
        .send_to(b"still allowed?", "198.51.100.10:123")
        .unwrap();
    let mut buf = [0u8; 64];
    matches!(socket.recv_from(&mut buf), Ok((14, _)))
}

/// One SYN to each of `ports` of 198.51.100.10 (all denied), from the calling thread's
/// namespace; the sockets are closed again without a retransmission.
fn scan(ports: std::ops::Range<u16>) {
    for port in ports {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.set_nonblocking(true).expect("nonblocking");
        // EINPROGRESS: the SYN is on its way.
        let _ = socket.connect(&SockAddr::from(SocketAddr::from((
            [198, 51, 100, 10],
            port,
        ))));
    }
}

/// In cam-01's namespace: the SYN of the scan that crosses the threshold, then new flows of
/// its allowed 123/udp back to back until two in a row get no echo within 200 ms: the first
/// of them met the quarantine in force.
fn cross_the_threshold_then_probe() -> Scan {
    let (trigger, trigger_wall) = (Instant::now(), SystemTime::now());
    scan(SCAN_FROM + TRIP_AT - 1..SCAN_FROM + TRIP_AT);
    let deadline = trigger + Duration::from_secs(5);
    let timeout = Duration::from_millis(200);
    let mut last_open = trigger;
    let mut probes = 0;
    loop {
        let start = Instant::now();
        assert!(
            start < deadline,
            "cam-01 could still open new 123/udp flows 5 s after its scan: no quarantine \
             ({probes} probes)"
        );
        probes += 1;
        if udp_flow_passes(timeout) {
            last_open = start;
        } else if !udp_flow_passes(timeout) {
            return Scan {
                trigger,
                trigger_wall,
                last_open,
                first_blocked: start,
                probes,
            };
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn a_scanning_device_is_quarantined_automatically_and_release_restores_it() {
    let lab = quarantine_lab();
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.20:443"),
        lab.udp_echo_server(UPLINK, "198.51.100.10:123"),
    );
    let _ssh = lab.tcp_listen("cam-01", "10.20.2.21:22");
    let coap = lab.udp_echo_server("cam-01", "10.20.2.21:5683");
    let snmp = lab.udp_echo_server("cam-01", "10.20.2.21:161");
    let log = lab.audit_log().display().to_string();
    let daemon = lab.start_enforcing(&["--audit-log", &log]);

    let reach_cam = [
        (
            "sensor to camera (allowed)",
            "temp-001",
            Probe::udp("10.20.2.21:5683"),
        ),
        (
            "ops-vpn to camera (accepted)",
            UPLINK,
            Probe::udp("10.20.2.21:161").from("192.0.2.5"),
        ),
    ];
    let normal: Vec<_> = [(
        "camera, its rule",
        "cam-01",
        Probe::tcp("198.51.100.10:8883"),
        true,
    )]
    .into_iter()
    .chain(reach_cam.iter().cloned().map(|(n, h, p)| (n, h, p, true)))
    .collect();
    lab.assert_flows("before the scan", &normal);

    // Open connections, one it opened and one opened to it.
    let mut conn = lab
        .tcp_connect("cam-01", "198.51.100.10:8883", Duration::from_secs(3))
        .expect("cam-01 opens its allowed connection");
    let mut inbound = lab
        .tcp_connect_from(UPLINK, "192.0.2.5", "10.20.2.21:22", Duration::from_secs(3))
        .expect("ops-vpn opens its accepted connection to cam-01");
    assert!(
        conn.echoes(Duration::from_secs(2)) && inbound.echoes(Duration::from_secs(2)),
        "the open connections carry data"
    );

    // The scan up to the threshold: `count` denied flows are not more than `count`.
    lab.run_in("cam-01", || scan(SCAN_FROM..SCAN_FROM + TRIP_AT - 1));
    let denied = |lab: &Lab| {
        lab.audit_events()
            .iter()
            .filter(|e| e["event"] == "deny" && e["device"] == "cam-01")
            .count()
    };
    let seen = wait_until(Duration::from_secs(2), || {
        (denied(&lab) == usize::from(TRIP_AT - 1)).then_some(())
    });
    assert!(seen.is_some(), "{} deny events for cam-01", denied(&lab));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        lab.device_info("cam-01")["state"],
        "active",
        "quarantined too early"
    );
    assert!(
        lab.udp_roundtrip("cam-01", "198.51.100.10:123", Duration::from_secs(1)),
        "cam-01 is still allowed its flows after {} denied ones",
        TRIP_AT - 1
    );

    // One more: quarantined.
    let scan = lab.run_in("cam-01", cross_the_threshold_then_probe);
    let quarantined = lab
        .wait_for_audit(Duration::from_secs(2), |e| {
            e["event"] == "quarantine" && e["device"] == "cam-01"
        })
        .unwrap_or_else(|| {
            panic!(
                "no quarantine event for cam-01 in the audit log:\n{}",
                daemon.output_so_far()
            )
        });
    let event_ts =
        humantime::parse_rfc3339(quarantined["ts"].as_str().expect("ts")).expect("ts is RFC 3339");
    let by_event = event_ts
        .duration_since(scan.trigger_wall)
        .unwrap_or_default();
    let upper = scan.first_blocked - scan.trigger;
    let lower = scan.last_open.saturating_duration_since(scan.trigger);
    println!(
        "quarantine latency, from the threshold-crossing SYN (the scan's #{TRIP_AT}): \
         in force after {:.1}..{:.1} ms (last new allowed flow that still passed .. first \
         that did not, {} probes); `quarantine` audit event ts +{:.0} ms (ms resolution)",
        ms(lower),
        ms(upper),
        scan.probes,
        ms(by_event)
    );
    assert!(
        upper < Duration::from_secs(1),
        "quarantine took {upper:?} to be in force"
    );
    assert_eq!(quarantined["segment"], "cameras", "{quarantined}");
    assert_eq!(
        quarantined["source"], "trigger:denied_flows",
        "{quarantined}"
    );
    assert!(
        quarantined["reason"]
            .as_str()
            .is_some_and(|r| r.contains("denied flows")),
        "{quarantined}"
    );
    let info = lab.device_info("cam-01");
    assert_eq!(info["state"], "quarantined", "{info}");
    assert_eq!(info["quarantine"]["by"], "trigger:denied_flows", "{info}");

    // Its open connections are cut, both ways.
    assert!(
        !conn.echoes(Duration::from_secs(1)),
        "the connection cam-01 had opened still carries data after its quarantine"
    );
    assert!(
        !inbound.echoes(Duration::from_secs(1)),
        "the connection opened to cam-01 still carries data after its quarantine"
    );

    // Only the Quarantine allow flows work; nothing reaches it.
    let (coap_before, snmp_before) = (coap.received(), snmp.received());
    let mut quarantined_flows = vec![
        (
            "quarantine allow",
            "cam-01",
            Probe::tcp("198.51.100.20:443"),
            true,
        ),
        (
            "camera, its own rule",
            "cam-01",
            Probe::tcp("198.51.100.10:8883"),
            false,
        ),
    ];
    quarantined_flows.extend(reach_cam.iter().cloned().map(|(n, h, p)| (n, h, p, false)));
    lab.assert_flows("quarantined", &quarantined_flows);
    assert_eq!(
        (coap.received(), snmp.received()),
        (coap_before, snmp_before),
        "a datagram reached the quarantined camera"
    );

    // Release restores it, and the Quarantine rules are not its own.
    let released = lab.control(&["release", "cam-01"]);
    assert!(released.status.success(), "release: {released:?}");
    assert_eq!(lab.device_info("cam-01")["state"], "active");
    let mut after = normal.clone();
    after.push((
        "quarantine allow, not quarantined",
        "cam-01",
        Probe::tcp("198.51.100.20:443"),
        false,
    ));
    lab.assert_flows("released", &after);
    let release = lab
        .wait_for_audit(Duration::from_secs(1), |e| e["event"] == "release")
        .expect("a release event");
    assert_eq!(release["device"], "cam-01", "{release}");
}

const RESTART_POLICY: &str = r#"
kind: Segment
name: cameras
devices:
  - id: cam-01
    addresses: [10.20.2.21]
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
---
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
  - id: temp-002
    mac: "02:00:00:00:10:02"
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
---
kind: Quarantine
allow:
  - to: 198.51.100.20
    ports: ["443/tcp"]
"#;

/// What the daemon says of `device`: its `address(source)`s, its state (`active` or
/// `quarantined`) and its quarantine record.
fn device_state(lab: &Lab, device: &str) -> (Vec<String>, String, Value) {
    let info = lab.device_info(device);
    (
        lab.bound_addresses(device),
        info["state"].as_str().unwrap_or("?").to_string(),
        info["quarantine"].clone(),
    )
}

#[test]
fn quarantine_and_learned_bindings_survive_kill_9_and_a_restart() {
    let lab = Lab::builder()
        .device("cam-01", &["10.20.2.21"])
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["10.20.1.50"])
        .device_with_mac("temp-002", "02:00:00:00:10:02", &["10.20.1.60"])
        .uplink_host("198.51.100.10")
        .uplink_host("198.51.100.20")
        .build();
    lab.write_policy(RESTART_POLICY);
    lab.write_leases(&[("temp-002", "10.20.1.60")]);
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.20:443"),
    );
    let leases = lab.lease_file().display().to_string();
    let log = lab.audit_log().display().to_string();
    let args = [
        "--dhcp-leases",
        leases.as_str(),
        "--audit-log",
        log.as_str(),
    ];
    let mut first = lab.start_enforcing(&args);

    let bound = lab.control(&["bind", "temp-001", "10.20.1.50"]);
    assert!(bound.status.success(), "bind: {bound:?}");
    let quarantined = lab.control(&["quarantine", "cam-01", "--reason", "ticket 4711"]);
    assert!(quarantined.status.success(), "quarantine: {quarantined:?}");
    let before = (
        device_state(&lab, "cam-01"),
        device_state(&lab, "temp-001"),
        device_state(&lab, "temp-002"),
    );
    assert_eq!(before.0 .1, "quarantined");
    assert_eq!(before.1 .0, ["10.20.1.50(bind)"]);
    assert_eq!(before.2 .0, ["10.20.1.60(lease)"]);
    let enforced = [
        (
            "quarantined camera",
            "cam-01",
            Probe::tcp("198.51.100.10:8883"),
            false,
        ),
        (
            "quarantine allow",
            "cam-01",
            Probe::tcp("198.51.100.20:443"),
            true,
        ),
        (
            "bound sensor",
            "temp-001",
            Probe::tcp("198.51.100.10:8883"),
            true,
        ),
        (
            "leased sensor",
            "temp-002",
            Probe::tcp("198.51.100.10:8883"),
            true,
        ),
    ];
    lab.assert_flows("before kill -9", &enforced);

    first.kill9();
    let status = lab.control(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(3),
        "status with no daemon: {status:?}"
    );
    lab.assert_flows("while the daemon is dead", &enforced);

    // The lease file changes while no daemon runs: the restarted daemon follows the file.
    lab.add_address("temp-002", "10.20.1.61");
    lab.write_leases(&[("temp-002", "10.20.1.61")]);

    let _second = lab.start_enforcing(&args);
    let after = (
        device_state(&lab, "cam-01"),
        device_state(&lab, "temp-001"),
        device_state(&lab, "temp-002"),
    );
    assert_eq!(
        (&after.0, &after.1),
        (&before.0, &before.1),
        "the daemon's state after the restart"
    );
    assert_eq!(after.0 .2["reason"], "ticket 4711");
    assert_eq!(after.0 .2["by"], "manual");
    assert_eq!(after.2 .0, ["10.20.1.61(lease)"]);
    // The move that happened while no daemon ran is on the record, as any other.
    let moved = |event: &str, address: &str| {
        lab.audit_events().iter().any(|e| {
            e["event"] == event
                && e["device"] == "temp-002"
                && e["address"] == address
                && e["source"] == "lease"
        })
    };
    assert!(
        moved("unbind", "10.20.1.60") && moved("bind", "10.20.1.61"),
        "no unbind of .60 and bind of .61 in the audit log: {:?}",
        lab.audit_events()
    );
    // (temp-002's probe now names its source: it has two addresses.)
    let mut enforced: Vec<_> = enforced
        .iter()
        .filter(|case| case.1 != "temp-002")
        .cloned()
        .collect();
    enforced.extend([
        (
            "sensor at its new lease",
            "temp-002",
            Probe::tcp("198.51.100.10:8883").from("10.20.1.61"),
            true,
        ),
        (
            "sensor at its expired lease",
            "temp-002",
            Probe::tcp("198.51.100.10:8883").from("10.20.1.60"),
            false,
        ),
    ]);
    lab.assert_flows("after the restart", &enforced);

    // What was restored is live state, not a picture of it: release and unbind work.
    let released = lab.control(&["release", "cam-01"]);
    assert!(released.status.success(), "release: {released:?}");
    let unbound = lab.control(&["unbind", "temp-001", "10.20.1.50"]);
    assert!(unbound.status.success(), "unbind: {unbound:?}");
    lab.assert_flows(
        "released and unbound after the restart",
        &[
            (
                "released camera",
                "cam-01",
                Probe::tcp("198.51.100.10:8883"),
                true,
            ),
            (
                "unbound sensor",
                "temp-001",
                Probe::tcp("198.51.100.10:8883"),
                false,
            ),
        ],
    );
}

const MOVING_POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
---
kind: Segment
name: cameras
devices:
  - id: cam-01
    mac: "02:00:00:00:20:01"
allow:
  - to: 198.51.100.10
    ports: ["554/tcp"]
---
kind: Quarantine
allow:
  - to: 198.51.100.20
    ports: ["443/tcp"]
"#;

#[test]
fn a_quarantine_follows_the_device_to_a_new_address_and_not_the_address() {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["10.20.1.50"])
        .device_with_mac("cam-01", "02:00:00:00:20:01", &[])
        .uplink_host("198.51.100.10")
        .uplink_host("198.51.100.20")
        .build();
    lab.write_policy(MOVING_POLICY);
    lab.write_leases(&[("temp-001", "10.20.1.50")]);
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:554"),
        lab.tcp_listen(UPLINK, "198.51.100.20:443"),
    );
    let leases = lab.lease_file().display().to_string();
    let _daemon = lab.start_enforcing(&["--dhcp-leases", &leases]);
    let out = lab.control(&["quarantine", "temp-001", "--reason", "ticket 4712"]);
    assert!(out.status.success(), "quarantine: {out:?}");

    // temp-001 moves to a new address, and its old one goes to cam-01. (The new one first:
    // a namespace that loses its last address loses its default route.)
    lab.add_address("temp-001", "10.20.1.51");
    lab.move_address("temp-001", "cam-01", "10.20.1.50");
    lab.write_leases(&[("temp-001", "10.20.1.51"), ("cam-01", "10.20.1.50")]);
    let moved = wait_until(Duration::from_secs(5), || {
        (lab.bound_addresses("cam-01") == ["10.20.1.50(lease)"]
            && lab.bound_addresses("temp-001") == ["10.20.1.51(lease)"])
        .then_some(())
    });
    assert!(moved.is_some(), "the lease change was not applied");
    lab.assert_flows(
        "after the move",
        &[
            (
                "quarantined device at its new address, its segment's rule",
                "temp-001",
                Probe::tcp("198.51.100.10:8883"),
                false,
            ),
            (
                "quarantined device at its new address, quarantine allow",
                "temp-001",
                Probe::tcp("198.51.100.20:443"),
                true,
            ),
            (
                "the new owner of the quarantined device's old address, its rule",
                "cam-01",
                Probe::tcp("198.51.100.10:554"),
                true,
            ),
            (
                "the new owner of the quarantined device's old address, quarantine allow",
                "cam-01",
                Probe::tcp("198.51.100.20:443"),
                false,
            ),
        ],
    );
    assert_eq!(lab.device_info("temp-001")["state"], "quarantined");
    assert_eq!(lab.device_info("cam-01")["state"], "active");
}
