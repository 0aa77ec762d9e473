//! Identity changes (SPEC §2.7): addresses learned from a dnsmasq lease file and from
//! `segward bind`/`unbind` carry their device's permissions as soon as the change is
//! acknowledged, and an address that moves on never keeps its old owner's.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::lab::{wait_until, Lab, Probe, UdpServer, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp", "123/udp"]
---
kind: Segment
name: cameras
devices:
  - id: cam-01
    mac: "02:00:00:00:20:01"
allow:
  - to: 198.51.100.10
    ports: ["554/tcp"]
"#;

/// How long a lease file change may take to be in force.
const LEASE_ACK: Duration = Duration::from_secs(5);

fn lab(temp_addrs: &[&str], cam_addrs: &[&str]) -> Lab {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", temp_addrs)
        .device_with_mac("cam-01", "02:00:00:00:20:01", cam_addrs)
        .uplink_host("198.51.100.10")
        .build();
    lab.write_policy(POLICY);
    lab
}

/// Waits until the daemon lists exactly `want` (`address(source)`, sorted) for `device`:
/// the daemon answers only once a change is in the kernel, so this is the acknowledgement.
#[track_caller]
fn wait_for_addresses(lab: &Lab, device: &str, want: &[&str]) {
    let got = wait_until(LEASE_ACK, || {
        let got = lab.bound_addresses(device);
        (got == want).then_some(())
    });
    assert!(
        got.is_some(),
        "{device}: the daemon lists {:?}, expected {want:?} within {LEASE_ACK:?}",
        lab.bound_addresses(device)
    );
}

/// Datagrams the server received from `src`.
fn received_from(server: &UdpServer, src: &str) -> usize {
    server
        .peers()
        .iter()
        .filter(|p| p.ip().to_string() == src)
        .count()
}

/// The `bind`/`unbind` events of the audit log, as (event, device, address, source).
fn identity_events(lab: &Lab) -> Vec<(String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    lab.audit_events()
        .iter()
        .filter(|e| e["event"] == "bind" || e["event"] == "unbind")
        .map(|e| {
            (
                s(&e["event"]),
                s(&e["device"]),
                s(&e["address"]),
                s(&e["source"]),
            )
        })
        .collect()
}

fn ev(event: &str, device: &str, address: &str, source: &str) -> (String, String, String, String) {
    (event.into(), device.into(), address.into(), source.into())
}

/// Sends UDP datagrams from `src` (in `device`'s namespace) to `dst` every 2 ms until told
/// to stop (at most 10 s); returns the number sent when joined.
fn udp_stream(
    lab: &Lab,
    device: &str,
    src: &str,
    dst: &str,
) -> (Arc<AtomicBool>, thread::JoinHandle<usize>) {
    let (src, dst): (SocketAddr, SocketAddr) =
        (format!("{src}:0").parse().unwrap(), dst.parse().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = lab.spawn_in(device, move || {
        let socket = UdpSocket::bind(src).expect("binding the sender");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
            if socket.send_to(b"identity", dst).is_ok() {
                sent += 1;
            }
            thread::sleep(Duration::from_millis(2));
        }
        sent
    });
    (stop, handle)
}

#[test]
fn a_lease_change_moves_the_permissions_with_the_address() {
    let lab = lab(&["10.20.1.50"], &["10.20.2.60"]);
    lab.write_leases(&[("temp-001", "10.20.1.50"), ("cam-01", "10.20.2.60")]);
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:554"),
    );
    let ntp = lab.udp_echo_server(UPLINK, "198.51.100.10:123");
    let leases = lab.lease_file().display().to_string();
    let log = lab.audit_log().display().to_string();
    let _daemon = lab.start_enforcing(&["--dhcp-leases", &leases, "--audit-log", &log]);

    // Leases read at start: each device at its leased address, under its own segment.
    wait_for_addresses(&lab, "temp-001", &["10.20.1.50(lease)"]);
    wait_for_addresses(&lab, "cam-01", &["10.20.2.60(lease)"]);
    lab.assert_flows(
        "leases read at start",
        &[
            (
                "sensor, its rule",
                "temp-001",
                Probe::tcp("198.51.100.10:8883"),
                true,
            ),
            (
                "sensor, camera rule",
                "temp-001",
                Probe::tcp("198.51.100.10:554"),
                false,
            ),
            (
                "camera, its rule",
                "cam-01",
                Probe::tcp("198.51.100.10:554"),
                true,
            ),
            (
                "camera, sensor rule",
                "cam-01",
                Probe::tcp("198.51.100.10:8883"),
                false,
            ),
        ],
    );

    // temp-001 gets a new address. Its old one stays configured on the device (and routed),
    // so that a packet from it that wrongly passed would come back and show.
    lab.add_address("temp-001", "10.20.1.51");
    lab.write_leases(&[("temp-001", "10.20.1.51"), ("cam-01", "10.20.2.60")]);
    wait_for_addresses(&lab, "temp-001", &["10.20.1.51(lease)"]);
    let before = received_from(&ntp, "10.20.1.50");
    lab.assert_flows(
        "after the new lease",
        &[
            (
                "sensor at its new address",
                "temp-001",
                Probe::tcp("198.51.100.10:8883").from("10.20.1.51"),
                true,
            ),
            (
                "sensor at its new address, camera rule",
                "temp-001",
                Probe::tcp("198.51.100.10:554").from("10.20.1.51"),
                false,
            ),
            (
                "the old address, TCP",
                "temp-001",
                Probe::tcp("198.51.100.10:8883").from("10.20.1.50"),
                false,
            ),
            (
                "the old address, UDP",
                "temp-001",
                Probe::udp("198.51.100.10:123").from("10.20.1.50"),
                false,
            ),
        ],
    );
    assert_eq!(
        received_from(&ntp, "10.20.1.50"),
        before,
        "a datagram from the sensor's old address reached the uplink"
    );

    // The old address is handed to cam-01. While the lease file changes, cam-01 sends from
    // it all the time: never may one of these datagrams pass with temp-001's 123/udp.
    lab.move_address("temp-001", "cam-01", "10.20.1.50");
    let (stop, sender) = udp_stream(&lab, "cam-01", "10.20.1.50", "198.51.100.10:123");
    thread::sleep(Duration::from_millis(100));
    lab.write_leases(&[
        ("temp-001", "10.20.1.51"),
        ("cam-01", "10.20.2.60"),
        ("cam-01", "10.20.1.50"),
    ]);
    wait_for_addresses(&lab, "cam-01", &["10.20.1.50(lease)", "10.20.2.60(lease)"]);
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    assert!(
        sent > 50,
        "only {sent} datagrams were sent during the hand-over"
    );
    assert_eq!(
        received_from(&ntp, "10.20.1.50"),
        before,
        "cam-01 got through with temp-001's 123/udp at the handed-over address ({sent} sent)"
    );
    lab.assert_flows(
        "after the hand-over",
        &[
            (
                "camera at the handed-over address, its rule",
                "cam-01",
                Probe::tcp("198.51.100.10:554").from("10.20.1.50"),
                true,
            ),
            (
                "camera at the handed-over address, the sensor's rule",
                "cam-01",
                Probe::tcp("198.51.100.10:8883").from("10.20.1.50"),
                false,
            ),
            (
                "sensor at its new address still",
                "temp-001",
                Probe::tcp("198.51.100.10:8883").from("10.20.1.51"),
                true,
            ),
        ],
    );
    wait_for_addresses(&lab, "temp-001", &["10.20.1.51(lease)"]);

    // Every change is on the record. (The leases read at start may or may not be logged
    // as binds; the changes must be.)
    let events = identity_events(&lab);
    let changes: Vec<_> = events
        .iter()
        .skip_while(|e| e.0 == "bind" && ["10.20.1.50", "10.20.2.60"].contains(&e.2.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        changes,
        [
            ev("unbind", "temp-001", "10.20.1.50", "lease"),
            ev("bind", "temp-001", "10.20.1.51", "lease"),
            ev("bind", "cam-01", "10.20.1.50", "lease"),
        ],
        "all identity events: {events:#?}"
    );
}

#[test]
fn bind_and_unbind_are_in_force_when_acknowledged() {
    let lab = lab(&["10.20.1.70"], &["10.20.2.60"]);
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:554"),
    );
    let ntp = lab.udp_echo_server(UPLINK, "198.51.100.10:123");
    let log = lab.audit_log().display().to_string();
    let _daemon = lab.start_enforcing(&["--audit-log", &log]);

    // No address is known yet: nothing passes.
    lab.assert_dropped("temp-001", &Probe::tcp("198.51.100.10:8883"));

    // Each bind is in force by the time the command returns: no waiting.
    let bound = lab.control(&["bind", "temp-001", "10.20.1.70"]);
    assert!(bound.status.success(), "bind: {bound:?}");
    assert_eq!(
        String::from_utf8_lossy(&bound.stdout).trim(),
        "10.20.1.70 bound to temp-001"
    );
    lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
    let bound = lab.control(&["bind", "cam-01", "10.20.2.60"]);
    assert!(bound.status.success(), "bind: {bound:?}");
    lab.assert_passes("cam-01", &Probe::tcp("198.51.100.10:554"));

    // The address moves to cam-01; the bind that says so is all it takes.
    lab.move_address("temp-001", "cam-01", "10.20.1.70");
    let moved = lab.control(&["bind", "cam-01", "10.20.1.70"]);
    assert!(moved.status.success(), "bind: {moved:?}");
    let before = received_from(&ntp, "10.20.1.70");
    lab.assert_flows(
        "after the bind that moved the address",
        &[
            (
                "moved address, the old owner's TCP rule",
                "cam-01",
                Probe::tcp("198.51.100.10:8883").from("10.20.1.70"),
                false,
            ),
            (
                "moved address, the old owner's UDP rule",
                "cam-01",
                Probe::udp("198.51.100.10:123").from("10.20.1.70"),
                false,
            ),
            (
                "moved address, the new owner's rule",
                "cam-01",
                Probe::tcp("198.51.100.10:554").from("10.20.1.70"),
                true,
            ),
        ],
    );
    assert_eq!(received_from(&ntp, "10.20.1.70"), before);
    assert_eq!(lab.bound_addresses("temp-001"), Vec::<String>::new());
    assert_eq!(
        lab.bound_addresses("cam-01"),
        ["10.20.1.70(bind)", "10.20.2.60(bind)"]
    );

    // Unbound: the address is nobody's any more.
    let unbound = lab.control(&["unbind", "cam-01", "10.20.1.70"]);
    assert!(unbound.status.success(), "unbind: {unbound:?}");
    lab.assert_dropped(
        "cam-01",
        &Probe::tcp("198.51.100.10:554").from("10.20.1.70"),
    );
    lab.assert_passes(
        "cam-01",
        &Probe::tcp("198.51.100.10:554").from("10.20.2.60"),
    );

    assert_eq!(
        identity_events(&lab),
        [
            ev("bind", "temp-001", "10.20.1.70", "bind"),
            ev("bind", "cam-01", "10.20.2.60", "bind"),
            ev("unbind", "temp-001", "10.20.1.70", "bind"),
            ev("bind", "cam-01", "10.20.1.70", "bind"),
            ev("unbind", "cam-01", "10.20.1.70", "bind"),
        ]
    );
}

#[test]
fn an_expired_lease_takes_its_permissions_away() {
    let lab = lab(&["10.20.1.50"], &[]);
    let _server = lab.tcp_listen(UPLINK, "198.51.100.10:8883");
    lab.write_leases_expiring(&[("temp-001", "10.20.1.50")], Duration::from_secs(2));
    let written = Instant::now();
    let leases = lab.lease_file().display().to_string();
    let log = lab.audit_log().display().to_string();
    let _daemon = lab.start_enforcing(&["--dhcp-leases", &leases, "--audit-log", &log]);

    assert_eq!(lab.bound_addresses("temp-001"), ["10.20.1.50(lease)"]);
    lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
    assert!(
        written.elapsed() < Duration::from_secs(2),
        "too slow to see the lease before it expires"
    );

    // Nothing touches the file: the lease runs out by itself.
    let gone = wait_until(Duration::from_secs(6), || {
        lab.bound_addresses("temp-001").is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "the expired lease is still bound: {:?}",
        lab.bound_addresses("temp-001")
    );
    lab.assert_dropped("temp-001", &Probe::tcp("198.51.100.10:8883"));
    assert_eq!(
        identity_events(&lab)
            .into_iter()
            .filter(|e| e.0 == "unbind")
            .collect::<Vec<_>>(),
        [ev("unbind", "temp-001", "10.20.1.50", "lease")]
    );
}

const POLICY_V6: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
allow:
  - to: 2001:db8:100::10
    ports: ["8883/tcp"]
---
kind: Segment
name: cameras
devices:
  - id: cam-01
    mac: "02:00:00:00:20:01"
allow:
  - to: 2001:db8:100::10
    ports: ["554/tcp"]
"#;

#[test]
fn a_dhcpv6_lease_moves_the_permissions_with_the_address() {
    let lab = Lab::builder()
        .device_with_mac("temp-001", "02:00:00:00:10:01", &["fd00:20::50"])
        .device_with_mac("cam-01", "02:00:00:00:20:01", &["fd00:20::60"])
        .uplink_host("2001:db8:100::10")
        .build();
    lab.write_policy(POLICY_V6);
    lab.write_leases(&[("temp-001", "fd00:20::50"), ("cam-01", "fd00:20::60")]);
    let _servers = (
        lab.tcp_listen(UPLINK, "[2001:db8:100::10]:8883"),
        lab.tcp_listen(UPLINK, "[2001:db8:100::10]:554"),
    );
    let leases = lab.lease_file().display().to_string();
    let _daemon = lab.start_enforcing(&["--dhcp-leases", &leases]);
    wait_for_addresses(&lab, "temp-001", &["fd00:20::50(lease)"]);
    lab.assert_flows(
        "leases read at start",
        &[
            (
                "sensor, its rule",
                "temp-001",
                Probe::tcp("[2001:db8:100::10]:8883"),
                true,
            ),
            (
                "camera, sensor rule",
                "cam-01",
                Probe::tcp("[2001:db8:100::10]:8883"),
                false,
            ),
        ],
    );

    // The sensor's address goes to the camera.
    lab.add_address("temp-001", "fd00:20::51");
    lab.move_address("temp-001", "cam-01", "fd00:20::50");
    lab.write_leases(&[
        ("temp-001", "fd00:20::51"),
        ("cam-01", "fd00:20::60"),
        ("cam-01", "fd00:20::50"),
    ]);
    wait_for_addresses(
        &lab,
        "cam-01",
        &["fd00:20::50(lease)", "fd00:20::60(lease)"],
    );
    lab.assert_flows(
        "after the hand-over",
        &[
            (
                "sensor at its new address",
                "temp-001",
                Probe::tcp("[2001:db8:100::10]:8883").from("fd00:20::51"),
                true,
            ),
            (
                "camera at the handed-over address, the sensor's rule",
                "cam-01",
                Probe::tcp("[2001:db8:100::10]:8883").from("fd00:20::50"),
                false,
            ),
            (
                "camera at the handed-over address, its rule",
                "cam-01",
                Probe::tcp("[2001:db8:100::10]:554").from("fd00:20::50"),
                true,
            ),
        ],
    );
}
