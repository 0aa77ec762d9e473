//! Fail closed, stay attached: SIGKILL of the daemon under traffic changes nothing, and a
//! restarted daemon adopts the pinned programs, maps and flows without a gap or a second
//! attachment.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};

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
"#;

/// Denied probes sent while the first daemon runs; their drops must still be counted by
/// the second daemon.
const DENIED_BEFORE_KILL: u64 = 5;

fn start(lab: &Lab) -> Daemon<'_> {
    lab.write_policy(POLICY);
    lab.start_enforcing(&[])
}

/// Programs attached to the device interface: (XDP programs, TCX egress programs).
fn attachments(lab: &Lab) -> (usize, usize) {
    let iface = lab.device_iface("temp-001").to_string();
    let link = lab.exec_ok("gateway", &["ip", "-d", "link", "show", "dev", &iface]);
    let xdp = link.matches("prog/xdp").count();
    let tcx = lab.run_in("gateway", || {
        SchedClassifier::query_tcx(&iface, TcAttachType::Egress)
            .map(|(_, programs)| programs.len())
            .unwrap_or_else(|e| panic!("querying tcx on {iface}: {e}"))
    });
    (xdp, tcx)
}

#[test]
fn sigkill_keeps_enforcing_and_a_restart_adopts_without_a_gap() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .uplink_host("198.51.100.10")
        .build();
    let _server = lab.tcp_listen(UPLINK, "198.51.100.10:8883");
    let _closed = lab.udp_echo_server(UPLINK, "198.51.100.10:9999");
    let allowed = Probe::tcp("198.51.100.10:8883");
    let denied = Probe::udp("198.51.100.10:9999");

    let mut first = start(&lab);
    assert_eq!(
        attachments(&lab),
        (1, 1),
        "one XDP and one tc program after start"
    );
    let mut conn = lab
        .tcp_connect("temp-001", "198.51.100.10:8883", Duration::from_secs(3))
        .expect("the allowed connection opens");
    assert!(
        conn.echoes(Duration::from_secs(3)),
        "the allowed connection carries data"
    );
    for _ in 0..DENIED_BEFORE_KILL {
        lab.assert_dropped("temp-001", &denied);
    }

    let status = first.kill9();
    assert!(!status.success(), "the daemon died of SIGKILL: {status}");
    assert_eq!(
        attachments(&lab),
        (1, 1),
        "the programs stay attached after SIGKILL"
    );
    assert!(
        conn.echoes(Duration::from_secs(3)),
        "the established flow goes on without a daemon"
    );
    lab.assert_dropped("temp-001", &denied);
    lab.assert_passes("temp-001", &allowed);

    let mut second = start(&lab);
    assert_eq!(
        attachments(&lab),
        (1, 1),
        "the restart adopted the links instead of adding new ones"
    );
    assert!(
        conn.echoes(Duration::from_secs(3)),
        "the established flow survives the restart"
    );
    lab.assert_dropped("temp-001", &denied);
    lab.assert_passes("temp-001", &allowed);

    second.stop();
    let output = second.output_so_far();
    let dropped = second
        .logged_counter(Some("default_deny"), "packets")
        .unwrap_or_else(|| panic!("no default_deny counter in the output:\n{output}"));
    assert!(
        dropped > DENIED_BEFORE_KILL,
        "counters continue across the restart: {dropped} default_deny drops counted, but \
         {DENIED_BEFORE_KILL} were sent to the first daemon and more after\n{output}"
    );
    assert!(
        output.contains("go on enforcing"),
        "a plain stop leaves enforcement in place"
    );
    assert_eq!(
        attachments(&lab),
        (1, 1),
        "still enforcing after a plain stop"
    );
}
