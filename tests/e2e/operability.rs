//! Operating the agent (SPEC §3-§5): a GitOps policy repository updated by `git pull` or by
//! a git-sync style symlink swap is in force within a second, a broken policy is rejected
//! while the old one keeps enforcing, and `/metrics` shows what the agent does.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::lab::{Daemon, Lab, Outcome, Probe, UPLINK};

/// A policy change must be in force this soon after it is written (the target).
const IN_FORCE_WITHIN: Duration = Duration::from_secs(1);
/// How long the probing loops keep trying before they give up (beyond the target, so that
/// a slow reload is measured and reported rather than cut off).
const PROBE_LIMIT: Duration = Duration::from_secs(4);
/// Timeout of one probe in the measuring loops: a dropped SYN shows as silence this long.
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);

const HOST: &str = "198.51.100.10";

/// The segment file with these allowed TCP ports (to HOST), and `extra` appended verbatim.
fn sensors(ports: &[u16], extra: &str) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}/tcp\"")).collect();
    format!(
        "kind: Segment\n\
         name: sensors\n\
         devices:\n\
         \x20 - id: temp-001\n\
         \x20   addresses: [10.20.1.11]\n\
         allow:\n\
         \x20 - to: {HOST}\n\
         \x20   ports: [{}]\n\
         {extra}",
        ports.join(", ")
    )
}

/// A policy that fails to load: the rule names a target that does not exist.
const BROKEN: &str = "kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: [\"1883/tcp\"]
  - to: mqtt-brokr
    ports: [\"8883/tcp\"]
";

fn lab() -> Lab {
    Lab::builder()
        .device("temp-001", &["10.20.1.11"])
        .uplink_host(HOST)
        .build()
}

fn tcp(port: u16) -> Probe {
    Probe::tcp((HOST, port))
}

// ---- git --------------------------------------------------------------------------------

/// `git ARGS...` in `dir`, isolated from any user or system configuration; panics unless it
/// succeeds.
fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "-c",
            "user.name=segward e2e",
            "-c",
            "user.email=e2e@segward.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "`git {}` in {} failed ({}):\n{}{}",
        args.join(" "),
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An origin repository, the policy checkout the daemon watches, and a second clone where
/// changes are made and pushed from: a GitOps repository in miniature, all in the lab's
/// directory.
struct PolicyRepo {
    /// The checkout `segward run --policy` watches.
    checkout: PathBuf,
    /// Where changes are committed and pushed from.
    work: PathBuf,
}

impl PolicyRepo {
    fn new(lab: &Lab, first: &str) -> PolicyRepo {
        let dir = lab.dir();
        let origin = dir.join("origin.git");
        git(
            dir,
            &["init", "--quiet", "--bare", origin.to_str().unwrap()],
        );
        let work = dir.join("work");
        git(dir, &["clone", "--quiet", "origin.git", "work"]);
        let repo = PolicyRepo {
            checkout: dir.join("segments"),
            work,
        };
        repo.commit("sensors.yaml", first, "first policy");
        git(dir, &["clone", "--quiet", "origin.git", "segments"]);
        assert!(repo.checkout.join("sensors.yaml").is_file());
        repo
    }

    /// Commits `file` with `text` in the other clone and pushes it to the origin.
    fn commit(&self, file: &str, text: &str, message: &str) {
        std::fs::write(self.work.join(file), text).unwrap();
        git(&self.work, &["add", file]);
        git(&self.work, &["commit", "--quiet", "-m", message]);
        git(&self.work, &["push", "--quiet", "origin", "HEAD:main"]);
    }

    /// `git pull` in the watched checkout; returns when it has finished.
    fn pull(&self) -> Instant {
        git(&self.checkout, &["pull", "--quiet", "--ff-only"]);
        Instant::now()
    }
}

// ---- measuring --------------------------------------------------------------------------

/// Probes `probe` from `host` in a bounded loop until it is judged as `passes` says, and
/// returns how long after `since` the first probe so judged was sent; `None` if that did
/// not happen within PROBE_LIMIT.
fn in_force_after(
    lab: &Lab,
    host: &str,
    probe: &Probe,
    passes: bool,
    since: Instant,
) -> Option<Duration> {
    loop {
        let sent = Instant::now();
        let outcome = lab.probe(host, probe, PROBE_TIMEOUT);
        let judged = if passes {
            outcome.passed()
        } else {
            outcome == Outcome::TimedOut
        };
        if judged {
            return Some(sent - since);
        }
        if since.elapsed() > PROBE_LIMIT {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that `probe` is judged as `passes` says within IN_FORCE_WITHIN of `since`, and
/// returns how long it took.
#[track_caller]
fn assert_in_force(
    lab: &Lab,
    daemon: &Daemon<'_>,
    what: &str,
    probe: &Probe,
    passes: bool,
    since: Instant,
) -> Duration {
    let (want, does) = if passes {
        ("pass", "passes")
    } else {
        ("be dropped", "is dropped")
    };
    let Some(latency) = in_force_after(lab, "temp-001", probe, passes, since) else {
        // Tell a change the daemon did not notice from one it cannot load.
        let generation_then = generation(lab);
        let reload = lab.control(&["reload"]);
        let after_reload = lab.probe("temp-001", probe, PROBE_TIMEOUT * 4);
        panic!(
            "{what}: {probe} did not {want} within {PROBE_LIMIT:?} (policy generation {}); \
             an explicit `segward reload` then said {:?}{:?} and the probe {after_reload}\n\
             --- daemon output ---\n{}",
            generation_then,
            String::from_utf8_lossy(&reload.stdout).trim(),
            String::from_utf8_lossy(&reload.stderr).trim(),
            daemon.output_so_far()
        );
    };
    println!("{what}: {probe} {does} {latency:?} after the change");
    assert!(
        latency < IN_FORCE_WITHIN,
        "{what}: in force only {latency:?} after the change (must be < {IN_FORCE_WITHIN:?})"
    );
    latency
}

/// `segward status --json`'s policy generation.
fn generation(lab: &Lab) -> u64 {
    let out = lab.control(&["status", "--json"]);
    assert!(
        out.status.success(),
        "segward status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout));
    status["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {status}"))
}

/// The audit log's events of one kind, parsed.
fn audit_events(path: &Path, event: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("audit log line is not JSON ({e}): {l}"))
        })
        .filter(|v| v["event"] == event)
        .collect()
}

// ---- git pull ---------------------------------------------------------------------------

#[test]
fn a_git_pull_is_in_force_within_a_second_and_a_broken_one_is_rejected() {
    let lab = lab();
    let repo = PolicyRepo::new(&lab, &sensors(&[8883], ""));
    let audit_log = lab.dir().join("audit.jsonl");
    let _servers = (
        lab.tcp_listen(UPLINK, (HOST, 8883)),
        lab.tcp_listen(UPLINK, (HOST, 1883)),
    );
    let mut args = vec!["run".to_string(), "--policy".into()];
    args.push(repo.checkout.display().to_string());
    args.extend(["--device-iface".into(), lab.device_iface("temp-001").into()]);
    args.extend(["--audit-log".into(), audit_log.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = lab.start_segward(&args);

    // Before: the first policy.
    lab.assert_passes("temp-001", &tcp(8883));
    lab.assert_dropped("temp-001", &tcp(1883));
    assert_eq!(generation(&lab), 1);

    // A pull that opens a flow.
    repo.commit(
        "sensors.yaml",
        &sensors(&[8883, 1883], ""),
        "open 1883 to the broker",
    );
    let pulled = repo.pull();
    let opened = assert_in_force(
        &lab,
        &daemon,
        "pull 1 (adds 1883)",
        &tcp(1883),
        true,
        pulled,
    );
    lab.assert_passes("temp-001", &tcp(8883));
    assert_eq!(generation(&lab), 2, "one pull, one reload");

    // A pull that closes one.
    repo.commit("sensors.yaml", &sensors(&[1883], ""), "close 8883");
    let pulled = repo.pull();
    let closed = assert_in_force(
        &lab,
        &daemon,
        "pull 2 (removes 8883)",
        &tcp(8883),
        false,
        pulled,
    );
    lab.assert_dropped("temp-001", &tcp(8883));
    lab.assert_passes("temp-001", &tcp(1883));
    assert_eq!(generation(&lab), 3, "one pull, one reload");

    // A pull that changes a file but not the compiled policy: no reload. (The comment goes
    // at the end, so that no rule moves to another line: rules are reported as file:line.)
    repo.commit(
        "sensors.yaml",
        &sensors(&[1883], "# owner: plant operations\n"),
        "a comment",
    );
    let _ = repo.pull();
    assert!(
        std::fs::read_to_string(repo.checkout.join("sensors.yaml"))
            .unwrap()
            .contains("# owner"),
        "the pull wrote the comment"
    );
    // Twice the time a real change takes to be in force (above) and then some.
    std::thread::sleep(IN_FORCE_WITHIN + Duration::from_millis(500));
    assert_eq!(
        generation(&lab),
        3,
        "a change that compiles to the policy in force bumped the generation:\n{}",
        daemon.output_so_far()
    );
    assert!(
        !daemon.output_so_far().contains("generation=4"),
        "a comment-only change was reloaded:\n{}",
        daemon.output_so_far()
    );

    // A broken pull: rejected, on the record, and the old policy keeps enforcing.
    repo.commit("sensors.yaml", BROKEN, "a typo");
    let pulled = repo.pull();
    assert!(
        daemon.wait_for_output("policy rejected", PROBE_LIMIT),
        "the broken policy was not rejected:\n{}",
        daemon.output_so_far()
    );
    println!("broken pull rejected {:?} after the pull", pulled.elapsed());
    let line = BROKEN
        .lines()
        .position(|l| l.contains("mqtt-brokr"))
        .unwrap()
        + 1;
    let logged = daemon
        .output_so_far()
        .lines()
        .find(|l| l.contains("policy rejected"))
        .unwrap()
        .to_owned();
    let at = format!("sensors.yaml:{line}:");
    assert!(
        logged.contains(&at) && logged.contains("mqtt-brokr"),
        "the daemon's rejection names {at} and the target: {logged}"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let rejected = loop {
        let events = audit_events(&audit_log, "policy_rejected");
        if !events.is_empty() || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        rejected.len(),
        1,
        "one policy_rejected event in the audit log:\n{}",
        std::fs::read_to_string(&audit_log).unwrap_or_default()
    );
    let error = rejected[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&at) && error.contains("unknown target") && error.contains("mqtt-brokr"),
        "the audit log's error names {at} and the unknown target: {}",
        rejected[0]
    );
    assert!(rejected[0]["ts"].is_string(), "{}", rejected[0]);
    let loaded: Vec<u64> = audit_events(&audit_log, "policy_loaded")
        .iter()
        .filter_map(|e| e["generation"].as_u64())
        .collect();
    assert_eq!(loaded, [1, 2, 3], "policy_loaded events by generation");
    lab.assert_passes("temp-001", &tcp(1883));
    lab.assert_dropped("temp-001", &tcp(8883));
    assert_eq!(
        generation(&lab),
        3,
        "a rejected policy is no new generation"
    );
    assert!(daemon.is_running(), "the daemon survives a broken policy");
    println!(
        "reload latency after git pull: opened a flow in {opened:?}, closed one in {closed:?}"
    );
}

// ---- git-sync style symlink swap --------------------------------------------------------

/// The policy path is a symlink to one revision's directory, swapped atomically to the next
/// (`ln -s NEW tmp && mv -T tmp current`: symlink(2) then rename(2)), as git-sync does.
/// `revisions` is where the revision directories live, relative to the symlink's directory.
fn symlink_swap_is_in_force_within_a_second(revisions: &str) {
    let lab = lab();
    let root = lab.dir().join("sync");
    let write_revision = |name: &str, ports: &[u16]| {
        let dir = root.join(revisions).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sensors.yaml"), sensors(ports, "")).unwrap();
        Path::new(revisions).join(name)
    };
    let swap_to = |target: &Path| {
        let tmp = root.join("tmp-link");
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("current")).unwrap();
    };
    let rev_a = write_revision("rev-a", &[8883]);
    swap_to(&rev_a);
    let _servers = (
        lab.tcp_listen(UPLINK, (HOST, 8883)),
        lab.tcp_listen(UPLINK, (HOST, 1883)),
    );
    let current = root.join("current");
    let daemon = lab.start_segward(&[
        "run",
        "--policy",
        current.to_str().unwrap(),
        "--device-iface",
        lab.device_iface("temp-001"),
    ]);
    lab.assert_passes("temp-001", &tcp(8883));
    lab.assert_dropped("temp-001", &tcp(1883));

    let rev_b = write_revision("rev-b", &[1883]);
    swap_to(&rev_b);
    let swapped = Instant::now();
    let opened = assert_in_force(&lab, &daemon, "swap to rev-b", &tcp(1883), true, swapped);
    lab.assert_dropped("temp-001", &tcp(8883));
    assert_eq!(generation(&lab), 2, "one swap, one reload");

    // And back: the daemon follows the link, not the directory it first resolved.
    swap_to(&rev_a);
    let swapped = Instant::now();
    let back = assert_in_force(&lab, &daemon, "swap back", &tcp(8883), true, swapped);
    lab.assert_dropped("temp-001", &tcp(1883));
    assert_eq!(generation(&lab), 3, "two swaps, two reloads");
    println!("reload latency after a symlink swap ({revisions}): {opened:?}, back: {back:?}");
}

#[test]
fn a_symlink_swap_to_a_sibling_revision_is_in_force_within_a_second() {
    // current -> rev-a, swapped to rev-b (all in one directory).
    symlink_swap_is_in_force_within_a_second(".");
}

#[test]
fn a_git_sync_worktree_swap_is_in_force_within_a_second() {
    // git-sync v4's layout: current -> .worktrees/<hash>.
    symlink_swap_is_in_force_within_a_second(".worktrees");
}

// ---- metrics ----------------------------------------------------------------------------

/// A port on the host's loopback that nothing listens on (the daemon binds it next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One scrape of `/metrics`.
struct Metrics {
    content_type: String,
    body: String,
}

impl Metrics {
    /// A plain HTTP/1.1 GET.
    fn scrape(addr: SocketAddr) -> Metrics {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connecting to the metrics listener {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("reading the metrics response: {e}"));
        let raw = String::from_utf8(raw).expect("the metrics response is UTF-8");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
        let mut lines = head.lines();
        let status = lines.next().unwrap_or_default();
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "GET /metrics: {status}\n{raw}"
        );
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        };
        if let Some(length) = header("content-length") {
            assert_eq!(length.parse::<usize>().ok(), Some(body.len()), "{raw}");
        }
        Metrics {
            content_type: header("content-type").unwrap_or_default(),
            body,
        }
    }

    /// The value of one series, written as in the exposition: `name` or `name{labels}`.
    fn get(&self, series: &str) -> Option<f64> {
        self.body.lines().find_map(|l| {
            let rest = l.strip_prefix(series)?;
            let value = rest.strip_prefix(' ')?.split_whitespace().next()?;
            value.parse().ok()
        })
    }

    /// `get`, panicking with the whole scrape when the series is missing.
    #[track_caller]
    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no {series} in the scrape:\n{}", self.body))
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("chunk end");
    }
}

/// Scrapes until `done` holds for the scrape (at most 3 s); returns the last scrape.
fn scrape_until(addr: SocketAddr, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = Metrics::scrape(addr);
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const ALLOWED: &str = "segward_packets_total{verdict=\"pass\",reason=\"allowed\"}";
const REPLY: &str = "segward_packets_total{verdict=\"pass\",reason=\"reply\"}";
const DENIED: &str = "segward_packets_total{verdict=\"drop\",reason=\"default_deny\"}";
const ACTIVE: &str = "segward_devices{state=\"active\"}";
const QUARANTINED: &str = "segward_devices{state=\"quarantined\"}";
const GENERATION: &str = "segward_policy_generation";
const RELOADS_OK: &str = "segward_policy_reloads_total{result=\"ok\"}";
const RELOADS_REJECTED: &str = "segward_policy_reloads_total{result=\"rejected\"}";
const CONNTRACK: &str = "segward_conntrack_entries";

/// New flows (one datagram each, from its own socket) that the policy allows.
const ALLOWED_FLOWS: u32 = 20;
/// Datagrams that the policy denies.
const DENIED_DATAGRAMS: u32 = 50;

#[test]
fn metrics_show_verdicts_quarantines_and_the_policy_generation() {
    let lab = lab();
    lab.write_policy(
        "kind: Segment
name: sensors
devices:
  - id: temp-001
    addresses: [10.20.1.11]
allow:
  - to: 198.51.100.10
    ports: [\"123/udp\"]
",
    );
    let _ntp = lab.udp_echo_server(UPLINK, (HOST, 123));
    let denied = lab.udp_echo_server(UPLINK, (HOST, 9999));
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _daemon = lab.start_enforcing(&["--metrics", &addr.to_string()]);

    let m0 = Metrics::scrape(addr);
    let ct = m0.content_type.to_ascii_lowercase();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "content type {:?} is neither OpenMetrics nor Prometheus text",
        m0.content_type
    );
    if ct.starts_with("application/openmetrics-text") {
        assert_eq!(
            m0.body.lines().last(),
            Some("# EOF"),
            "OpenMetrics text ends with # EOF:\n{}",
            m0.body
        );
    }
    for family in [
        "segward_packets_total{",
        "segward_devices{",
        "segward_policy_generation ",
        "segward_policy_reloads_total{",
        "segward_conntrack_entries ",
        "segward_events_suppressed_total ",
    ] {
        assert!(
            m0.body.lines().any(|l| l.starts_with(family)),
            "no {family}… series (SPEC §5) in:\n{}",
            m0.body
        );
    }
    assert_eq!(m0.value(GENERATION), 1.0, "generation at start");
    assert_eq!(m0.value(RELOADS_OK), 0.0);
    assert_eq!(m0.value(RELOADS_REJECTED), 0.0);
    assert_eq!(m0.value(QUARANTINED), 0.0);
    assert_eq!(m0.value(ACTIVE), 1.0);

    // Allowed traffic: each probe is a new flow (its own source port), echoed back.
    for i in 0..ALLOWED_FLOWS {
        assert!(
            lab.udp_roundtrip("temp-001", (HOST, 123), Duration::from_secs(2)),
            "allowed flow {i} did not pass"
        );
    }
    let n = f64::from(ALLOWED_FLOWS);
    let m1 = scrape_until(addr, |m| {
        m.value(ALLOWED) - m0.value(ALLOWED) >= n && m.value(REPLY) - m0.value(REPLY) >= n
    });
    println!(
        "after {ALLOWED_FLOWS} allowed flows: allowed {} -> {}, reply {} -> {}, conntrack {}",
        m0.value(ALLOWED),
        m1.value(ALLOWED),
        m0.value(REPLY),
        m1.value(REPLY),
        m1.value(CONNTRACK)
    );
    assert!(
        m1.value(ALLOWED) - m0.value(ALLOWED) >= n,
        "{ALLOWED} moved by less than the {ALLOWED_FLOWS} flows opened:\n{}",
        m1.body
    );
    assert!(
        m1.value(REPLY) - m0.value(REPLY) >= n,
        "{REPLY} moved by less than the {ALLOWED_FLOWS} replies:\n{}",
        m1.body
    );
    assert_eq!(
        m1.value(DENIED),
        m0.value(DENIED),
        "{DENIED} moved though nothing was denied:\n{}",
        m1.body
    );
    assert!(
        m1.value(CONNTRACK) >= n,
        "the {ALLOWED_FLOWS} UDP flows are tracked:\n{}",
        m1.body
    );

    // Denied traffic.
    lab.run_in("temp-001", || {
        let socket = UdpSocket::bind("10.20.1.11:0").unwrap();
        for _ in 0..DENIED_DATAGRAMS {
            socket.send_to(b"denied", (HOST, 9999)).unwrap();
        }
    });
    let d = f64::from(DENIED_DATAGRAMS);
    let m2 = scrape_until(addr, |m| m.value(DENIED) - m1.value(DENIED) >= d);
    println!(
        "after {DENIED_DATAGRAMS} denied datagrams: default_deny {} -> {}",
        m1.value(DENIED),
        m2.value(DENIED)
    );
    assert!(
        m2.value(DENIED) - m1.value(DENIED) >= d,
        "{DENIED} moved by less than the {DENIED_DATAGRAMS} datagrams denied:\n{}",
        m2.body
    );
    assert!(
        denied.peers().is_empty(),
        "the denied datagrams got through"
    );
    assert_eq!(
        m2.value(ALLOWED),
        m1.value(ALLOWED),
        "{ALLOWED} moved though only denied traffic was sent:\n{}",
        m2.body
    );

    // A quarantine.
    let out = lab.control(&["quarantine", "temp-001", "--reason", "test"]);
    assert!(
        out.status.success(),
        "quarantine: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m3 = Metrics::scrape(addr);
    assert_eq!(
        m3.value(QUARANTINED),
        1.0,
        "quarantined devices:\n{}",
        m3.body
    );
    assert_eq!(m3.value(ACTIVE), 0.0, "active devices:\n{}", m3.body);
    assert_eq!(
        m3.value(GENERATION),
        1.0,
        "a quarantine is no new policy generation"
    );

    // A reload.
    let out = lab.control(&["reload"]);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m4 = Metrics::scrape(addr);
    assert_eq!(m4.value(GENERATION), 2.0, "generation after a reload");
    assert_eq!(m4.value(RELOADS_OK), 1.0, "ok reloads after a reload");
    assert_eq!(m4.value(RELOADS_REJECTED), 0.0);
    assert_eq!(
        m4.value(QUARANTINED),
        1.0,
        "the quarantine outlives a reload"
    );

    // A rejected reload (the watcher may reject the written file on its own as well).
    lab.write_policy("kind: Segment\nname: sensors\nbogus: key\n");
    let out = lab.control(&["reload"]);
    assert!(!out.status.success(), "a broken policy is not loaded");
    let m5 = Metrics::scrape(addr);
    assert!(
        m5.value(RELOADS_REJECTED) >= 1.0,
        "rejected reloads:\n{}",
        m5.body
    );
    assert_eq!(m5.value(RELOADS_OK), 1.0, "a rejected reload is not ok");
    assert_eq!(
        m5.value(GENERATION),
        2.0,
        "a rejected reload is no new generation"
    );
}
