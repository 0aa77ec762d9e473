//! Audit mode (SPEC §2.6): would-be drops pass and are counted as audited, per segment
//! (`mode: audit`) and for the whole agent (`--audit`).

use crate::lab::{Daemon, Lab, Probe, UPLINK};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
---
kind: Segment
name: cameras
mode: audit
devices:
  - id: cam-01
    addresses: [10.20.2.21]
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp"]
"#;

fn lab() -> Lab {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .device("cam-01", &["10.20.2.21"])
        .device("stranger", &["10.20.7.7"])
        .uplink_host("198.51.100.10")
        .build();
    lab.write_policy(POLICY);
    lab
}

/// The `audited` count of a reason in the counters the daemon logs when it stops.
fn audited(daemon: &mut Daemon<'_>, reason: &str) -> u64 {
    daemon.stop();
    daemon.logged_counter(Some(reason), "audited").unwrap_or(0)
}

#[test]
fn an_audit_segment_lets_would_be_drops_pass_and_counts_them() {
    let lab = lab();
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:22"),
    );
    let mut daemon = lab.start_enforcing(&[]);
    lab.assert_passes("cam-01", &Probe::tcp("198.51.100.10:22"));
    lab.assert_dropped("temp-001", &Probe::tcp("198.51.100.10:22"));
    lab.assert_dropped("stranger", &Probe::tcp("198.51.100.10:8883"));
    assert!(
        audited(&mut daemon, "default_deny") >= 1,
        "audited drops are counted"
    );
}

#[test]
fn audit_mode_for_the_whole_agent_lets_everything_pass() {
    let lab = lab();
    let _servers = (
        lab.tcp_listen(UPLINK, "198.51.100.10:8883"),
        lab.tcp_listen(UPLINK, "198.51.100.10:22"),
    );
    let mut daemon = lab.start_enforcing(&["--audit"]);
    lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:22"));
    lab.assert_passes("stranger", &Probe::tcp("198.51.100.10:8883"));
    assert!(
        audited(&mut daemon, "unknown_device") >= 1,
        "audited unknown sources are counted"
    );
}
