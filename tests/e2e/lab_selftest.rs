//! Tests of the lab fixture itself, without segward: plain Linux forwarding must let
//! everything through, teardown must leave nothing behind, and the daemon helper must
//! behave (exercised with a stand-in shell script).

use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lab::{self, Daemon, Lab, Outcome, Probe, DROP_TIMEOUT, PASS_TIMEOUT};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn assert_gone(names: &[String]) {
    assert!(!names.is_empty());
    let listed = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in names {
        assert!(
            !lab::netns_exists(n),
            "namespace {n} is still in /run/netns"
        );
        assert!(
            !listed.split_whitespace().any(|w| w == n),
            "namespace {n} still listed by `ip netns list`"
        );
    }
}

/// Runs `f`, which must panic, and returns the panic message.
fn panics_with<T>(f: impl FnOnce() -> T) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(p) => panic_message(&*p),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn lab_device_reaches_uplink_host_over_tcp_udp_icmp() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .uplink_host("198.51.100.10")
        .uplink_host("198.51.100.20")
        .build();
    let tcp = lab.tcp_listen("uplink", "198.51.100.10:8883");
    let udp = lab.udp_echo_server("uplink", "198.51.100.10:5683");

    lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
    lab.assert_passes("temp-001", &Probe::udp("198.51.100.10:5683"));
    lab.assert_passes("temp-001", &Probe::icmp("198.51.100.10"));
    lab.assert_passes("temp-001", &Probe::icmp("198.51.100.20"));
    assert!(lab.udp_roundtrip("temp-001", "198.51.100.10:5683", PASS_TIMEOUT));
    assert!(lab.ping("temp-001", "198.51.100.20", PASS_TIMEOUT));
    // No NAT anywhere: the uplink host sees the device's own address.
    assert_eq!(tcp.peers()[0].ip(), ip("10.20.1.11"));
    assert_eq!(udp.peers()[0].ip(), ip("10.20.1.11"));

    // A held connection carries data both ways, repeatedly.
    let mut conn = lab
        .tcp_connect("temp-001", "198.51.100.10:8883", PASS_TIMEOUT)
        .expect("connect");
    assert_eq!(conn.local_addr().ip(), ip("10.20.1.11"));
    for i in 0..3 {
        let line = format!("hello {i}");
        assert_eq!(conn.roundtrip(&line, PASS_TIMEOUT).unwrap(), line);
    }
    assert!(conn.echoes(PASS_TIMEOUT));

    // The other direction: a remote host opens a flow to the device.
    let ssh = lab.tcp_listen("temp-001", "10.20.1.11:22");
    lab.assert_passes("uplink", &Probe::tcp("10.20.1.11:22").from("198.51.100.20"));
    assert_eq!(ssh.peers()[0].ip(), ip("198.51.100.20"));

    // The gateway's own address answers devices.
    lab.assert_passes("temp-001", &Probe::icmp(lab.gateway_addr()));
}

#[test]
fn lab_device_to_device_goes_through_the_gateway() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .device_with_mac("cam-01", "02:00:00:00:20:01", &["10.20.2.21"])
        .build();
    assert_eq!(lab.device_iface("temp-001"), "dev0");
    assert_eq!(lab.device_iface("cam-01"), "dev1");
    assert_eq!(lab.device_ifaces(), vec!["dev0", "dev1"]);
    assert_eq!(lab.uplink_iface(), "uplink0");
    assert_eq!(lab.devices(), vec!["temp-001", "cam-01"]);

    // MACs: the pinned one, a deterministic default, and the gateway's ends.
    let mac_of = |host: &str, iface: &str| {
        lab.exec_ok(host, &["cat", &format!("/sys/class/net/{iface}/address")])
            .trim()
            .to_string()
    };
    assert_eq!(mac_of("cam-01", "eth0"), "02:00:00:00:20:01");
    assert_eq!(lab.device_mac("cam-01"), "02:00:00:00:20:01");
    assert_eq!(mac_of("temp-001", "eth0"), lab.device_mac("temp-001"));
    assert_eq!(mac_of("gateway", "dev1"), lab.gateway_mac("cam-01"));

    // Each device namespace has only lo and its one link.
    let mut ifaces = lab.run_in("cam-01", || {
        nix::net::if_::if_nameindex()
            .unwrap()
            .iter()
            .map(|i| i.name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    });
    ifaces.sort();
    assert_eq!(ifaces, vec!["eth0", "lo"]);

    let tcp = lab.tcp_listen("cam-01", "10.20.2.21:554");
    let _udp = lab.udp_echo_server("cam-01", "10.20.2.21:5000");
    lab.assert_passes("temp-001", &Probe::tcp("10.20.2.21:554"));
    lab.assert_passes("temp-001", &Probe::udp("10.20.2.21:5000"));
    lab.assert_passes("temp-001", &Probe::icmp("10.20.2.21"));
    lab.assert_passes("cam-01", &Probe::icmp("10.20.1.11"));
    assert_eq!(tcp.peers()[0].ip(), ip("10.20.1.11"));

    // The path really is forwarded: the device's route is the gateway.
    let routes = lab.exec_ok("temp-001", &["ip", "route"]);
    assert!(
        routes.contains("default via 10.254.254.1 dev eth0 onlink"),
        "{routes}"
    );
    let gw_routes = lab.exec_ok("gateway", &["ip", "route"]);
    assert!(gw_routes.contains("10.20.2.21 dev dev1"), "{gw_routes}");
}

#[test]
fn lab_unlisted_destination_fails_fast_and_outcomes_are_told_apart() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .uplink_host("198.51.100.10")
        .build();
    // Nobody owns 203.0.113.99 and the gateway has no default route: an ICMP error
    // comes back at once.
    let t0 = Instant::now();
    let tcp = lab.probe("temp-001", &Probe::tcp("203.0.113.99:80"), PASS_TIMEOUT);
    assert!(
        matches!(tcp, Outcome::Unreachable(_)),
        "tcp to nowhere: {tcp}"
    );
    let icmp = lab.probe("temp-001", &Probe::icmp("203.0.113.99"), PASS_TIMEOUT);
    assert!(
        matches!(icmp, Outcome::Unreachable(_)),
        "ping to nowhere: {icmp}"
    );
    let udp = lab.probe("temp-001", &Probe::udp("203.0.113.99:53"), PASS_TIMEOUT);
    assert!(!udp.passed(), "udp to nowhere: {udp}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );

    // A host without a listener answers: refused, which is not a drop.
    let refused = lab.probe("temp-001", &Probe::tcp("198.51.100.10:9"), PASS_TIMEOUT);
    assert_eq!(refused, Outcome::Refused);
    let refused = lab.probe("temp-001", &Probe::udp("198.51.100.10:9"), PASS_TIMEOUT);
    assert_eq!(refused, Outcome::Refused);
    let msg = panics_with(|| lab.assert_dropped("temp-001", &Probe::tcp("198.51.100.10:9")));
    assert!(msg.contains("refused"), "{msg}");

    // Silence is what a drop looks like: a source the gateway cannot route back to.
    let t0 = Instant::now();
    lab.assert_dropped(
        "temp-001",
        &Probe::tcp("198.51.100.10:9").from("10.20.1.99"),
    );
    lab.assert_dropped("temp-001", &Probe::icmp("198.51.100.10").from("10.20.1.99"));
    lab.assert_dropped(
        "temp-001",
        &Probe::udp("198.51.100.10:9").from("10.20.1.99"),
    );
    let took = t0.elapsed();
    assert!(took >= DROP_TIMEOUT * 3 && took < DROP_TIMEOUT * 3 + Duration::from_secs(2));
}

#[test]
fn lab_namespaces_are_gone_after_drop() {
    let lab = Lab::builder()
        .device("a", &["10.20.1.11"])
        .device("b", &[])
        .uplink_host("198.51.100.10")
        .build();
    let names = lab.namespaces();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| lab::netns_exists(n)));
    assert!(names.contains(&lab.gateway_netns().to_string()));
    assert!(names.contains(&lab.uplink_netns().to_string()));
    assert!(names.contains(&lab.netns_of("b").to_string()));
    assert_eq!(lab.netns_of("gateway"), lab.gateway_netns());
    assert_eq!(lab.netns_of("uplink"), lab.uplink_netns());
    let dir = lab.dir().to_path_buf();
    assert!(dir.is_dir());
    let _server = lab.tcp_listen("uplink", "198.51.100.10:80");
    drop(_server);
    drop(lab);
    assert_gone(&names);
    assert!(!dir.exists());
}

#[test]
fn lab_panicking_test_still_removes_namespaces() {
    let names = Mutex::new(Vec::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::builder()
            .device("temp-001", &["10.20.1.11"])
            .uplink_host("198.51.100.10")
            .build();
        *names.lock().unwrap() = lab.namespaces();
        let _server = lab.tcp_listen("uplink", "198.51.100.10:8883");
        let _conn = lab.tcp_connect("temp-001", "198.51.100.10:8883", PASS_TIMEOUT);
        panic!("a test failing half-way");
    }));
    assert!(result.is_err());
    assert_gone(&names.into_inner().unwrap());
}

#[test]
fn lab_failed_build_cleans_up_what_it_made() {
    for step in ["namespaces", "links", "addresses"] {
        let msg = panics_with(|| {
            Lab::builder()
                .device("temp-001", &["10.20.1.11"])
                .uplink_host("198.51.100.10")
                .fail_at(step)
                .build()
        });
        assert!(msg.contains("injected failure"), "{msg}");
        // "lab setup failed (lab sw<pid>x<n>): ..."
        let id = msg
            .split("(lab ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap();
        let left: Vec<String> = lab::netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{id}-")))
            .collect();
        assert!(left.is_empty(), "step {step}: left behind {left:?}");
    }
    // Bad input is refused before anything is created.
    let msg = panics_with(|| Lab::builder().device("x", &["10.20.1.1/24"]).build());
    assert!(msg.contains("not an IP address"), "{msg}");
    let msg = panics_with(|| Lab::builder().device_with_mac("x", "02:00:00:00:00", &[]));
    assert!(msg.contains("not a MAC address"), "{msg}");
    let msg = panics_with(|| {
        Lab::builder()
            .device("x", &["10.20.1.1"])
            .uplink_host("10.20.1.1")
            .build()
    });
    assert!(msg.contains("given to both"), "{msg}");
    let msg = panics_with(|| Lab::builder().device("x", &["10.255.0.7"]).build());
    assert!(msg.contains("reserved"), "{msg}");
}

#[test]
fn lab_two_labs_at_once_do_not_collide() {
    let build = || {
        Lab::builder()
            .device("temp-001", &["10.20.1.11"])
            .uplink_host("198.51.100.10")
            .build()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(build);
        let b = s.spawn(build);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.id(), b.id());
    let (na, nb) = (a.namespaces(), b.namespaces());
    assert!(na.iter().all(|n| !nb.contains(n)));
    // Same addresses and interface names in both, yet separate worlds.
    assert_eq!(a.device_iface("temp-001"), b.device_iface("temp-001"));
    let _only_in_a = a.tcp_listen("uplink", "198.51.100.10:8883");
    a.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
    assert_eq!(
        b.probe("temp-001", &Probe::tcp("198.51.100.10:8883"), PASS_TIMEOUT),
        Outcome::Refused
    );
    drop(_only_in_a);
    drop(a);
    assert_gone(&na);
    b.assert_passes("temp-001", &Probe::icmp("198.51.100.10"));
    drop(b);
    assert_gone(&nb);
}

/// Namespaces deleted here are created here, with names that cannot be a live lab's.
struct ScratchNetns(Vec<String>);

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[test]
fn lab_stale_namespaces_of_dead_processes_are_reaped() {
    // A pid that no longer exists.
    let dead = loop {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break pid;
        }
    };
    let stale = format!("sw{dead}x0-gw");
    let live = "sw1x999999-gw".to_string(); // pid 1 always exists: not ours to reap
    let foreign = format!("sw{dead}-not-a-lab"); // not our naming scheme
    let _scratch = ScratchNetns(vec![stale.clone(), live.clone(), foreign.clone()]);
    for n in [&stale, &live, &foreign] {
        let st = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {n}");
    }
    let lab = Lab::builder().build();
    assert!(!lab::netns_exists(&stale), "stale {stale} was not reaped");
    assert!(lab::netns_exists(&live), "{live} belongs to a live pid");
    assert!(lab::netns_exists(&foreign), "{foreign} is not ours");
    drop(lab);
}

#[test]
fn lab_run_in_exec_sysctls_and_address_moves() {
    let lab = Lab::builder()
        .device("a", &["10.20.1.11", "10.20.1.12"])
        .device("b", &["10.20.1.21"])
        .uplink_host("198.51.100.10")
        .build();
    let addrs = lab.exec_ok("a", &["ip", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains("10.20.1.11/32") && addrs.contains("10.20.1.12/32"),
        "{addrs}"
    );
    assert_eq!(lab.device_addr("a"), ip("10.20.1.11"));
    let cat = |host: &str, path: &str| lab.exec_ok(host, &["cat", path]).trim().to_string();
    assert_eq!(
        cat("gateway", "/proc/sys/net/ipv4/conf/all/forwarding"),
        "1"
    );
    assert_eq!(cat("a", "/proc/sys/net/ipv4/conf/all/forwarding"), "0");
    assert_eq!(cat("uplink", "/proc/sys/net/ipv4/conf/all/forwarding"), "0");
    for (host, iface) in [("gateway", "dev0"), ("gateway", "uplink0"), ("a", "eth0")] {
        assert_eq!(
            cat(host, &format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter")),
            "0"
        );
    }
    assert_eq!(cat("gateway", "/proc/sys/net/ipv4/conf/all/rp_filter"), "0");
    // No IPv6 asked for: IPv6 is off (no MLD/RS noise on the device links).
    assert_eq!(cat("a", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"), "1");
    // run_in sees the namespace's own sysctls.
    let fwd = lab.run_in("gateway", || {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/forwarding").unwrap()
    });
    assert_eq!(fwd.trim(), "1");

    // The second address works as a source too.
    let server = lab.tcp_listen("uplink", "198.51.100.10:8883");
    lab.assert_passes("a", &Probe::tcp("198.51.100.10:8883").from("10.20.1.12"));
    assert_eq!(server.peers()[0].ip(), ip("10.20.1.12"));

    // A lease changes hands: 10.20.1.11 moves from a to b.
    lab.move_address("a", "b", "10.20.1.11");
    assert_eq!(lab.device_addrs("a"), vec![ip("10.20.1.12")]);
    assert_eq!(
        lab.device_addrs("b"),
        vec![ip("10.20.1.21"), ip("10.20.1.11")]
    );
    lab.assert_passes("b", &Probe::tcp("198.51.100.10:8883").from("10.20.1.11"));
    // a can still send from it (a spoof), but the answers go to b now.
    lab.assert_dropped("a", &Probe::tcp("198.51.100.10:8883").from("10.20.1.11"));
    lab.add_uplink_host("198.51.100.77");
    lab.assert_passes("b", &Probe::icmp("198.51.100.77"));
}

#[test]
fn lab_ipv6_works_like_ipv4() {
    let lab = Lab::builder()
        .device("temp-001", &["10.20.1.11", "fd00:20::11"])
        .device("cam-01", &["fd00:20::21"])
        .uplink_host("2001:db8:100::10")
        .uplink_host("198.51.100.10")
        .build();
    assert!(lab.has_ipv6());
    let _tcp = lab.tcp_listen("uplink", "[2001:db8:100::10]:8883");
    let _udp = lab.udp_echo_server("uplink", "[2001:db8:100::10]:5683");
    lab.assert_passes("temp-001", &Probe::tcp("[2001:db8:100::10]:8883"));
    lab.assert_passes("temp-001", &Probe::udp("[2001:db8:100::10]:5683"));
    lab.assert_passes("temp-001", &Probe::icmp("2001:db8:100::10"));
    lab.assert_passes("temp-001", &Probe::icmp("198.51.100.10"));
    lab.assert_passes("temp-001", &Probe::icmp(lab.gateway_addr6()));
    lab.assert_passes("cam-01", &Probe::icmp("fd00:20::11"));
    let cam = lab.tcp_listen("cam-01", "[fd00:20::21]:554");
    lab.assert_passes("temp-001", &Probe::tcp("[fd00:20::21]:554"));
    assert_eq!(cam.peers()[0].ip(), ip("fd00:20::11"));
    lab.assert_passes(
        "uplink",
        &Probe::tcp("[fd00:20::21]:554").from("2001:db8:100::10"),
    );
    let unreachable = lab.probe("temp-001", &Probe::icmp("2001:db8:ffff::1"), PASS_TIMEOUT);
    assert!(
        matches!(unreachable, Outcome::Unreachable(_)),
        "{unreachable}"
    );
    let addrs = lab.exec_ok("temp-001", &["ip", "-6", "addr"]);
    assert!(!addrs.contains("tentative"), "{addrs}");
}

#[test]
fn lab_daemon_helper_with_a_stand_in_daemon() {
    // Ready, output captured, graceful stop on SIGTERM.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo 'loaded 3 segments'; echo 'INFO segward: enforcing on dev0' >&2; \
         trap 'echo got TERM >&2; exit 0' TERM; while :; do sleep 0.05; done",
    ]);
    let mut d = Daemon::start(cmd, Duration::from_secs(10));
    assert!(d.is_running());
    assert!(d.wait_for_output("loaded 3 segments", Duration::from_secs(5)));
    assert!(d.stderr_so_far().contains("enforcing on dev0"));
    assert!(!d.wait_for_output("never printed", Duration::from_millis(100)));
    let status = d.stop();
    assert!(status.success(), "{status}");
    assert!(
        d.wait_for_output("got TERM", Duration::from_secs(2)),
        "{}",
        d.output_so_far()
    );
    assert!(!d.is_running());
    drop(d);

    // kill9 is a crash.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' TERM; echo enforcing >&2; exec sleep 60"]);
    let mut d = Daemon::start(cmd, Duration::from_secs(10));
    let pid = d.pid();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(d.kill9().signal(), Some(9));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(d);

    // "not enforcing" in a word does not count, and a silent daemon times out and dies.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo 'still loading, nonenforcing' >&2; exec sleep 60",
    ]);
    let msg = panics_with(|| Daemon::start(cmd, Duration::from_millis(500)));
    assert!(msg.contains("did not report `enforcing`"), "{msg}");
    assert!(msg.contains("still loading"), "{msg}");

    // A daemon that exits early: the panic shows why.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo 'policy error: segments/x.yaml:3:1' >&2; exit 2"]);
    let t0 = Instant::now();
    let msg = panics_with(|| Daemon::start(cmd, Duration::from_secs(20)));
    assert!(
        msg.contains("exited") && msg.contains("segments/x.yaml:3:1"),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));

    // The lab adds --netns itself, and for `run` its own control socket and state.
    let lab = Lab::builder().build();
    let cmd = lab.segward_command(&["run", "--policy", "/nonexistent"]);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(cmd.get_program(), lab::segward_bin());
    let socket = lab.control_socket().display().to_string();
    let state = lab.dir().join("state").display().to_string();
    assert_eq!(
        args,
        [
            "run",
            "--policy",
            "/nonexistent",
            "--netns",
            lab.gateway_netns(),
            "--socket",
            &socket,
            "--state-dir",
            &state,
        ]
    );
}
