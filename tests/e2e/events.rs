//! Drop events from the kernel ring buffer: each drop is reported with its device and
//! reason, and a flood from one device is rate-limited in the kernel, the excess counted.

use std::{net::UdpSocket, time::Duration};

use crate::lab::{Lab, Probe};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: ["123/udp"]
"#;

/// Datagrams of the flood: far more than the per-source limit of 20 events a second.
const FLOOD: usize = 500;

#[test]
fn drops_are_reported_and_a_flood_is_rate_limited() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .device("stranger", &["10.20.7.7"])
        .uplink_host("198.51.100.10")
        .build();
    lab.write_policy(POLICY);
    let mut daemon = lab.start_enforcing(&[]);

    lab.run_in("temp-001", || {
        let socket = UdpSocket::bind("10.20.1.11:0").unwrap();
        for _ in 0..FLOOD {
            let _ = socket.send_to(b"scan", "198.51.100.10:9999");
        }
    });
    lab.assert_dropped("stranger", &Probe::udp("198.51.100.10:123"));
    assert!(
        daemon.wait_for_output("event=\"unknown_device\"", Duration::from_secs(5)),
        "no unknown_device event:\n{}",
        daemon.output_so_far()
    );
    std::thread::sleep(Duration::from_millis(300));
    daemon.stop();
    let output = daemon.output_so_far();

    let denies: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("event=\"deny\"") && l.contains("device=\"temp-001\""))
        .collect();
    assert!(
        !denies.is_empty(),
        "the device's drops were reported:\n{output}"
    );
    assert!(
        denies
            .iter()
            .all(|l| l.contains("dst=198.51.100.10") && l.contains("dport=9999")),
        "deny events carry the flow:\n{}",
        denies.join("\n")
    );
    assert!(
        denies.len() <= 60,
        "{} deny events for one device: the kernel's rate limit did not hold",
        denies.len()
    );
    let suppressed = daemon
        .logged_counter(None, "events_suppressed")
        .unwrap_or_else(|| panic!("no events_suppressed counter:\n{output}"));
    assert!(
        suppressed as usize + denies.len() >= FLOOD,
        "every drop is either reported or counted as suppressed ({} + {suppressed} < {FLOOD})",
        denies.len()
    );
    let unknown = output
        .lines()
        .find(|l| l.contains("event=\"unknown_device\""))
        .unwrap();
    assert!(unknown.contains("src=10.20.7.7"), "{unknown}");
}
