//! Atomic policy swaps (SPEC §2.7): under continuous traffic, 200 reloads alternating
//! between two policies never let through a packet that both deny, and never break a flow
//! that both allow.

use std::{
    fs,
    net::UdpSocket,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::lab::{Lab, UPLINK};

const RELOADS: u64 = 200;

fn policy(extra_port: u16) -> String {
    format!(
        r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: ["8883/tcp", "{extra_port}/udp"]
"#
    )
}

#[test]
fn two_hundred_reloads_under_traffic_are_atomic() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .uplink_host("198.51.100.10")
        .build();
    let dir = lab.dir().join("policy");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sensors.yaml");
    // Written the way a git checkout does: a new file renamed over the old one.
    let write_policy = |port: u16| {
        let tmp = lab.dir().join("sensors.yaml.new");
        fs::write(&tmp, policy(port)).unwrap();
        fs::rename(&tmp, &file).unwrap();
    };
    write_policy(9001);

    let _tcp = lab.tcp_listen(UPLINK, "198.51.100.10:8883");
    let denied_by_both = lab.udp_echo_server(UPLINK, "198.51.100.10:9003");
    let mut daemon = lab.start_enforcing(&[]);
    let pid = Pid::from_raw(daemon.pid() as i32);

    let mut conn = lab
        .tcp_connect("temp-001", "198.51.100.10:8883", Duration::from_secs(3))
        .expect("the flow both policies allow opens");
    assert!(conn.echoes(Duration::from_secs(3)));

    // A flood (bounded in count and time) of datagrams that both policies deny.
    let socket = lab.run_in("temp-001", || UdpSocket::bind("10.20.1.11:0").unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if sent.load(Ordering::Relaxed) >= 200_000 {
                    break;
                }
                let _ = socket.send_to(b"denied by both", "198.51.100.10:9003");
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(100));
            }
        })
    };

    let started = Instant::now();
    for reload in 1..=RELOADS {
        write_policy(if reload % 2 == 1 { 9002 } else { 9001 });
        kill(pid, Signal::SIGHUP).expect("signal the daemon");
        let needle = format!("policy loaded generation={}", reload + 1);
        assert!(
            daemon.wait_for_output(&needle, Duration::from_secs(10)),
            "reload {reload} was not acknowledged:\n{}",
            daemon.output_so_far()
        );
        if reload % 20 == 0 {
            assert!(
                conn.echoes(Duration::from_secs(3)),
                "the established flow broke at reload {reload}"
            );
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();

    let sent = sent.load(Ordering::Relaxed);
    assert!(
        sent > 1000,
        "the flood ran during the reloads ({sent} datagrams)"
    );
    assert!(
        denied_by_both.peers().is_empty(),
        "{} datagrams denied by both policies got through during {RELOADS} reloads",
        denied_by_both.peers().len()
    );
    assert!(
        conn.echoes(Duration::from_secs(3)),
        "the established flow survives all reloads"
    );
    println!(
        "{RELOADS} reloads in {elapsed:?} under a flood of {sent} denied datagrams: none passed"
    );
}
