//! The smart-factory demo: `cargo xtask demo` runs it for people, the e2e test `demo` runs
//! the same story and checks the [`Summary`] it returns.
//!
//! It builds the devices of the example policy (`segments/`: sensors, a camera, PLCs, a
//! robot, the MQTT broker, each with the MAC and address written there) as namespaces of a
//! lab (`tests/lab/`), with an uplink that plays the cloud endpoint, the NTP server, the
//! remediation server and an ops-VPN host (in the zones of `segments/zones.yaml`); runs the
//! real `segward run` on `segments/` as written; and tells a short story with real
//! traffic, showing the daemon's audit log (JSON lines) as it is written:
//!
//! 1. a normal shift: MQTT telemetry, the broker to the cloud, Modbus, NTP, ops-VPN ssh;
//! 2. zero trust: a sensor denied the camera, a sensor denied the cloud;
//! 3. the camera is compromised and scans a PLC: quarantined automatically, its open
//!    connection cut; it may reach only remediation;
//! 4. the operator releases it (`segward release`): its own policy again.
//!
//! Then the packets by reason (`segward status --json`), and the clean-up (namespaces and
//! pins) is checked. Traffic never leaves the lab; every loop is bounded.
//!
//! Ctrl-C: whoever runs the demo sets [`INTERRUPTED`] (xtask does, from a SIGINT handler);
//! the story stops at its next step and the lab is torn down.

#![allow(dead_code)] // xtask and the e2e test use different parts

mod events;
mod output;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::unix::process::CommandExt as _;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::lab::{self, Lab, Outcome, Probe, TcpConn, DROP_TIMEOUT, PASS_TIMEOUT, UPLINK};
use events::{Event, Tail};
use output::{Printer, BOLD, CYAN, GREEN, MAGENTA, RED, YELLOW};

/// Set it (e.g. from a SIGINT handler) to stop the demo at its next step; the lab is then
/// torn down and [`run`] returns `Err(Interrupted)`.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The demo was stopped by [`INTERRUPTED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted;

fn checkpoint() -> Result<(), Interrupted> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// A sleep that ends early on an interrupt.
fn pause(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        checkpoint()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    checkpoint()
}

pub struct Options {
    /// ANSI colours and arrows (a terminal, NO_COLOR unset).
    pub color: bool,
    /// A pause after each flow, so that people can follow (none in tests and CI).
    pub pace: Duration,
}

/// The devices of `segments/` as the lab builds them: id, role, MAC, address. The daemon's
/// own device list is compared with this at the start, so a change of `segments/` that the
/// demo does not follow is reported, not silently demonstrated wrong.
const DEVICES: [(&str, &str, &str, &str); 8] = [
    ("temp-001", "sensor", "02:00:00:00:10:01", "10.20.1.11"),
    ("temp-002", "sensor", "02:00:00:00:10:02", "10.20.1.12"),
    ("vib-001", "sensor", "02:00:00:00:10:03", "10.20.1.21"),
    ("cam-01", "camera", "02:00:00:00:20:01", "10.20.2.21"),
    ("plc-7", "PLC", "02:00:00:00:30:07", "10.20.3.7"),
    ("plc-8", "PLC", "02:00:00:00:30:08", "10.20.3.8"),
    ("robot-1", "robot", "02:00:00:00:40:01", "10.20.4.1"),
    ("broker-1", "broker", "02:00:00:00:90:01", "10.20.9.1"),
];

/// Hosts behind the uplink, one in each zone of `segments/zones.yaml`: name, address, zone.
const REMOTES: [(&str, &str, &str); 4] = [
    ("cloud", "198.51.100.10", "cloud-telemetry"),
    ("ntp", "198.51.100.123", "ntp"),
    ("remediation", "203.0.113.5", "remediation"),
    ("ops-vpn", "192.0.2.5", "ops-vpn"),
];

/// What the compromised camera scans, one SYN per port, SCAN_GAP apart: about 25 new flows
/// a second, more than the kernel reports per device (20 a second), so that the
/// `denied_flows` trigger (more than 20 in 10 s) trips in the scan's second second.
const SCAN_PORTS: RangeInclusive<u16> = 1..=40;
const SCAN_GAP: Duration = Duration::from_millis(40);
/// Where `segward run --netns NS` pins its programs and maps: `PINS/NS`.
const PINS: &str = "/sys/fs/bpf/segward";
/// How long to wait for an audit event that a step has caused.
const EVENT_WAIT: Duration = Duration::from_secs(2);

fn address(name: &str) -> IpAddr {
    DEVICES
        .iter()
        .find(|d| d.0 == name)
        .map(|d| d.3)
        .or_else(|| REMOTES.iter().find(|r| r.0 == name).map(|r| r.1))
        .unwrap_or_else(|| panic!("demo: no host {name:?}"))
        .parse()
        .expect("demo: addresses are IP literals")
}

fn is_remote(name: &str) -> bool {
    REMOTES.iter().any(|r| r.0 == name)
}

/// `sensor temp-001`, `cloud`.
fn label(name: &str) -> String {
    match DEVICES.iter().find(|d| d.0 == name) {
        Some((id, role, ..)) => format!("{role} {id}"),
        None => name.to_string(),
    }
}

/// The example policy: `segments/` at the top of the repository.
pub fn policy_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
    dir.canonicalize().unwrap_or(dir)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Tcp(u16),
    Udp(u16),
}

impl Port {
    fn number(self) -> u16 {
        match self {
            Port::Tcp(p) | Port::Udp(p) => p,
        }
    }
    fn proto(self) -> &'static str {
        match self {
            Port::Tcp(_) => "tcp",
            Port::Udp(_) => "udp",
        }
    }
    fn text(self) -> String {
        format!("{}/{}", self.number(), self.proto())
    }
}

/// One flow of the story.
struct Flow {
    id: &'static str,
    from: &'static str,
    to: &'static str,
    port: Port,
    note: &'static str,
    pass: bool,
}

const fn flow(
    id: &'static str,
    from: &'static str,
    to: &'static str,
    port: Port,
    note: &'static str,
    pass: bool,
) -> Flow {
    Flow {
        id,
        from,
        to,
        port,
        note,
        pass,
    }
}

/// How one flow of the story went.
#[derive(Clone, Debug)]
pub struct FlowResult {
    /// The story's name for it, e.g. `sensor-to-camera`.
    pub id: &'static str,
    /// `temp-001 -> cam-01 554/tcp`
    pub flow: String,
    pub expected_pass: bool,
    /// It went through both ways.
    pub passed: bool,
    /// `passed`, `timed out` (a drop), `refused`, ...
    pub outcome: String,
    /// For a drop: the reason of the daemon's `deny` event for it.
    pub reason: Option<String>,
}

impl FlowResult {
    pub fn as_told(&self) -> bool {
        if self.expected_pass {
            self.passed
        } else {
            self.outcome == Outcome::TimedOut.to_string() && self.reason.is_some()
        }
    }
}

/// The automatic quarantine as the audit log and `segward devices` showed it.
#[derive(Clone, Debug)]
pub struct QuarantineSeen {
    pub device: String,
    /// The event's `source`: `trigger:denied_flows`.
    pub by: String,
    /// The event's `reason`: `21 denied flows in 10s`.
    pub detail: String,
    /// From the scan's first SYN to the event's time stamp.
    pub after: Duration,
    /// SYNs the scan had sent when the event was read.
    pub after_syns: usize,
    /// `segward devices --json` afterwards: its `state` and `quarantine.by`.
    pub state: String,
    pub state_by: String,
}

/// The camera's port scan.
#[derive(Clone, Debug, Default)]
pub struct ScanResult {
    pub target: String,
    pub syns: usize,
    /// `deny` events about the scan in the audit log, by reason (the log is rate-limited:
    /// the kernel's counters have every packet).
    pub logged_default_deny: usize,
    pub logged_quarantined: usize,
    /// Connections from the camera that the target's listener (port 22) accepted.
    pub reached_target: usize,
}

/// One `segward_packets_total` counter at the end of the story.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketCount {
    /// `pass` or `drop`.
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
}

/// Everything the story saw, for the final table and for the e2e test.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub flows: Vec<FlowResult>,
    pub scan: ScanResult,
    pub quarantine: Option<QuarantineSeen>,
    /// The camera's connection that was open when it was quarantined carried no more data.
    pub connection_cut: bool,
    /// `segward release cam-01` succeeded and a `release` event was logged.
    pub released: bool,
    pub release_event: bool,
    /// Non-zero counters of `segward status --json` just before the daemon stopped.
    pub packets: Vec<PacketCount>,
    /// How `segward run` ended on SIGTERM.
    pub daemon_exit: String,
    /// Whatever did not go as the story says, one line each.
    pub surprises: Vec<String>,
    /// Every namespace of the lab and the daemon's pins are gone.
    pub cleaned_up: bool,
    pub elapsed: Duration,
}

impl Summary {
    /// The flow the story calls `id`; panics if there is none.
    pub fn flow(&self, id: &str) -> &FlowResult {
        self.flows
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("the demo tried no flow {id:?}: {:#?}", self.flows))
    }

    /// The `segward status` counter of (verdict, reason); 0 if it was not listed.
    pub fn packets(&self, verdict: &str, reason: &str) -> u64 {
        self.packets
            .iter()
            .find(|p| p.verdict == verdict && p.reason == reason)
            .map_or(0, |p| p.packets)
    }

    /// Everything went as the story tells it, and nothing was left behind.
    pub fn as_told(&self) -> bool {
        self.surprises.is_empty() && self.cleaned_up
    }
}

/// Runs the whole demo: lab, daemon, story, summary, clean-up. Panics (after cleaning up)
/// if the lab or the daemon cannot be started; what merely went differently from the story
/// is in `Summary::surprises`.
pub fn run(opts: &Options) -> Result<Summary, Interrupted> {
    let start = Instant::now();
    let out = Printer::new(opts.color, start);
    let policy = policy_dir();
    out.plain(&out.paint(
        BOLD,
        "segward demo: a smart factory in network namespaces, enforced by segward",
    ));
    out.line(&format!(
        "building the lab: a gateway, {} devices of segments/ (sensors, a camera, PLCs, a \
         robot, the MQTT broker), an uplink with the cloud, NTP, remediation and an ops VPN",
        DEVICES.len()
    ));
    let built = catch_unwind(AssertUnwindSafe(build_lab));
    let lab = match built {
        Ok(lab) => lab,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => return interrupted(&out, None),
        Err(panic) => resume_unwind(panic),
    };
    let namespaces = lab.namespaces();
    let pins = Path::new(PINS).join(lab.gateway_netns());
    out.note(&format!(
        "lab {}: namespaces {}-gw (gateway), -d0..-d{} (devices), -up (uplink)",
        lab.id(),
        lab.id(),
        DEVICES.len() - 1
    ));

    let told = catch_unwind(AssertUnwindSafe(|| {
        checkpoint()?;
        Story::new(&lab, &out, opts.pace).tell(&policy)
    }));
    if INTERRUPTED.load(Ordering::SeqCst) {
        drop(told);
        return interrupted(&out, Some((lab, namespaces, pins)));
    }
    let mut summary = match told {
        Ok(Ok(summary)) => summary,
        Ok(Err(Interrupted)) => unreachable!("interrupted without INTERRUPTED"),
        Err(panic) => resume_unwind(panic), // the lab is dropped while unwinding
    };
    drop(lab);
    let left = leftovers(&namespaces, &pins);
    summary.cleaned_up = left.is_empty();
    if !left.is_empty() {
        summary
            .surprises
            .push(format!("left behind: {}", left.join(", ")));
    }
    summary.elapsed = start.elapsed();
    print_summary(&out, &summary, namespaces.len());
    Ok(summary)
}

fn interrupted(
    out: &Printer,
    lab: Option<(Lab, Vec<String>, PathBuf)>,
) -> Result<Summary, Interrupted> {
    println!();
    out.line("interrupted: stopping segward, deleting the lab's namespaces and pins ...");
    let left = match lab {
        Some((lab, namespaces, pins)) => {
            drop(lab);
            leftovers(&namespaces, &pins)
        }
        // Interrupted while the lab was being built: it deleted itself while unwinding.
        // Its namespaces are named `sw<pid>x<n>-<role>` (tests/lab/).
        None => {
            let ours = format!("sw{}x", std::process::id());
            let mut left: Vec<String> = lab::netns_list()
                .into_iter()
                .filter(|ns| ns.starts_with(&ours))
                .map(|ns| format!("namespace {ns}"))
                .collect();
            if let Ok(pins) = std::fs::read_dir(PINS) {
                left.extend(
                    pins.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| name.starts_with(&ours))
                        .map(|name| format!("pins {PINS}/{name}")),
                );
            }
            left
        }
    };
    if left.is_empty() {
        out.line("clean-up: done, no namespaces or pins left");
    } else {
        out.line(&format!("clean-up: LEFT BEHIND {}", left.join(", ")));
    }
    Err(Interrupted)
}

fn leftovers(namespaces: &[String], pins: &Path) -> Vec<String> {
    let mut left: Vec<String> = namespaces
        .iter()
        .filter(|ns| lab::netns_exists(ns))
        .map(|ns| format!("namespace {ns}"))
        .collect();
    if pins.exists() {
        left.push(format!("pins {}", pins.display()));
    }
    left
}

fn build_lab() -> Lab {
    let mut builder = Lab::builder();
    for (id, _, mac, addr) in DEVICES {
        builder = builder.device_with_mac(id, mac, &[addr]);
    }
    for (_, addr, _) in REMOTES {
        builder = builder.uplink_host(addr);
    }
    builder.build()
}

/// The story's state: the lab, where it prints, the audit log it follows and what it saw.
struct Story<'a> {
    lab: &'a Lab,
    out: &'a Printer,
    pace: Duration,
    tail: Tail,
    /// Events read from the log and not yet shown.
    pending: Vec<Event>,
    /// Denied flows the story tried (source, destination, port): their `deny` events (a
    /// retransmitted SYN brings another) go with the flow's line, not on lines of their own.
    tried: Vec<(IpAddr, IpAddr, Option<u16>)>,
    /// During the scan: its target (its `deny` events are counted, not shown one by one),
    /// its start and the SYNs sent so far.
    scan: Option<(IpAddr, SystemTime, usize)>,
    summary: Summary,
}

impl<'a> Story<'a> {
    fn new(lab: &'a Lab, out: &'a Printer, pace: Duration) -> Story<'a> {
        Story {
            lab,
            out,
            pace,
            tail: Tail::new(lab.dir().join("audit.jsonl")),
            pending: Vec::new(),
            tried: Vec::new(),
            scan: None,
            summary: Summary::default(),
        }
    }

    fn arrow(&self) -> &'static str {
        self.out.arrow()
    }

    fn surprise(&mut self, what: String) {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return; // a command the Ctrl-C killed too; the story ends at its next step
        }
        self.out
            .line(&format!("{} {what}", self.out.paint(YELLOW, "!!")));
        self.summary.surprises.push(what);
    }

    fn tell(mut self, policy: &Path) -> Result<Summary, Interrupted> {
        let lab = self.lab;
        // Servers: the broker, the cloud, NTP, remediation, the robot's Modbus, the
        // camera's RTSP, the PLC's ssh (which also tells whether the scan got through).
        let _servers = (
            lab.tcp_listen("broker-1", (address("broker-1"), 8883)),
            lab.tcp_listen(UPLINK, (address("cloud"), 8883)),
            lab.udp_echo_server(UPLINK, (address("ntp"), 123)),
            lab.tcp_listen(UPLINK, (address("remediation"), 443)),
            lab.tcp_listen("robot-1", (address("robot-1"), 502)),
            lab.tcp_listen("cam-01", (address("cam-01"), 554)),
        );
        let plc_ssh = lab.tcp_listen("plc-7", (address("plc-7"), 22));

        let audit_log = lab.dir().join("audit.jsonl");
        let mut args: Vec<String> = vec!["run".into(), "--policy".into()];
        args.push(policy.display().to_string());
        for iface in lab.device_ifaces() {
            args.extend(["--device-iface".into(), iface]);
        }
        args.extend([
            "--uplink-iface".into(),
            lab.uplink_iface().into(),
            "--audit-log".into(),
            audit_log.display().to_string(),
            "--detach-on-exit".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        checkpoint()?;
        // Its own process group: a Ctrl-C on the terminal reaches the demo, which stops
        // the daemon itself before it deletes the lab.
        let mut daemon = lab.start_segward_with(&args, |cmd| {
            cmd.process_group(0);
        });
        self.out.line(&format!(
            "segward run --policy {} --netns {}: {} (pid {})",
            policy.display(),
            lab.gateway_netns(),
            self.out.paint(GREEN, "enforcing"),
            daemon.pid()
        ));
        self.out.note(&format!(
            "    on dev0..dev{} (device links) and {} (uplink); audit log {}",
            DEVICES.len() - 1,
            lab.uplink_iface(),
            audit_log.display()
        ));
        self.check_devices();
        match self.wait_event(|e| e.event == "policy_loaded") {
            Some(e) => self.show_event(e),
            None => self.surprise("no policy_loaded event in the audit log".into()),
        }
        self.show_events();

        self.out.act("1. A normal shift");
        use Port::{Tcp, Udp};
        for f in [
            flow(
                "sensor-mqtt",
                "temp-001",
                "broker-1",
                Tcp(8883),
                "MQTT telemetry",
                true,
            ),
            flow(
                "vibration-mqtt",
                "vib-001",
                "broker-1",
                Tcp(8883),
                "MQTT telemetry",
                true,
            ),
            flow(
                "broker-cloud",
                "broker-1",
                "cloud",
                Tcp(8883),
                "telemetry to the cloud",
                true,
            ),
            flow(
                "plc-modbus",
                "plc-7",
                "robot-1",
                Tcp(502),
                "Modbus/TCP to the robot",
                true,
            ),
            flow("sensor-ntp", "temp-002", "ntp", Udp(123), "time sync", true),
            flow(
                "ops-ssh",
                "ops-vpn",
                "plc-7",
                Tcp(22),
                "maintenance over the VPN",
                true,
            ),
        ] {
            self.try_flow(&f)?;
        }
        let mut camera_conn = self.open_camera_connection()?;

        self.out.act("2. Zero trust: only what the segments allow");
        for f in [
            flow(
                "sensor-to-camera",
                "temp-001",
                "cam-01",
                Tcp(554),
                "sensor tries the camera",
                false,
            ),
            flow(
                "sensor-to-cloud",
                "temp-002",
                "cloud",
                Tcp(8883),
                "sensor bypasses the broker",
                false,
            ),
            flow(
                "camera-to-plc",
                "cam-01",
                "plc-8",
                Tcp(502),
                "camera tries a PLC",
                false,
            ),
        ] {
            self.try_flow(&f)?;
        }

        self.out.act("3. The camera is compromised");
        self.scan_plc(&plc_ssh)?;
        if let Some(conn) = camera_conn.as_mut() {
            checkpoint()?;
            let cut = !conn.echoes(Duration::from_secs(1));
            self.summary.connection_cut = cut;
            let verdict = if cut {
                self.out.paint(RED, "CUT")
            } else {
                self.out.paint(YELLOW, "STILL OPEN")
            };
            self.out.flow(
                &format!("camera cam-01 {} broker-1 8883/tcp", self.arrow()),
                "its open MQTT connection",
                &verdict,
            );
            if !cut {
                self.surprise(
                    "the camera's open connection still carried data after its quarantine".into(),
                );
            }
        }
        drop(camera_conn);
        self.out.note(
            "quarantined: it may open only what segments/quarantine.yaml allows \
             (remediation 443/tcp); nothing may open a flow to it",
        );
        for f in [
            flow(
                "quarantined-mqtt",
                "cam-01",
                "broker-1",
                Tcp(8883),
                "its own MQTT rule",
                false,
            ),
            flow(
                "quarantined-remediation",
                "cam-01",
                "remediation",
                Tcp(443),
                "fetch remediation",
                true,
            ),
        ] {
            self.try_flow(&f)?;
        }

        self.out.act("4. The operator releases the camera");
        self.release("cam-01")?;
        for f in [
            flow(
                "released-mqtt",
                "cam-01",
                "broker-1",
                Tcp(8883),
                "MQTT telemetry again",
                true,
            ),
            flow(
                "released-remediation",
                "cam-01",
                "remediation",
                Tcp(443),
                "no longer allowed",
                false,
            ),
        ] {
            self.try_flow(&f)?;
        }

        checkpoint()?;
        self.summary.packets = self.packet_counts();
        let status = daemon.stop();
        self.summary.daemon_exit = status.to_string();
        self.show_events();
        self.out.line(&format!(
            "segward stopped ({status}); --detach-on-exit removed its programs"
        ));
        if !status.success() {
            self.surprise(format!("segward did not stop cleanly: {status}"));
        }
        for bad in std::mem::take(&mut self.tail.bad_lines) {
            self.surprise(format!("audit log: {bad}"));
        }
        Ok(self.summary)
    }

    /// `segward devices --json` lists the demo's devices, MACs and addresses.
    fn check_devices(&mut self) {
        let reply = self.control_json(&["devices"]);
        let listed = reply["devices"].as_array().cloned().unwrap_or_default();
        let mut wrong = Vec::new();
        for (id, _, mac, addr) in DEVICES {
            let Some(d) = listed.iter().find(|d| d["id"] == id) else {
                wrong.push(format!("{id} is not in segments/"));
                continue;
            };
            let has_mac = d["mac"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(mac));
            let has_addr = d["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["address"] == addr));
            if !has_mac || !has_addr {
                wrong.push(format!("{id}: segments/ has {d}, the lab {mac} {addr}"));
            }
        }
        if wrong.is_empty() {
            self.out.line(&format!(
                "segward devices: the {} devices of segments/ are the lab's (ids, MACs, addresses)",
                listed.len()
            ));
        } else {
            for w in wrong {
                self.surprise(format!("segments/ and the demo's lab differ: {w}"));
            }
        }
    }

    /// `segward ARGS --json` against the lab's daemon.
    fn control_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.lab.control(&all);
        if !out.status.success() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Value::Null; // the Ctrl-C killed it too; the next step stops
            }
            panic!(
                "`segward {}` failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`segward {}` printed no JSON ({e}): {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Reads new audit events into `pending`.
    fn poll(&mut self) {
        let new = self.tail.poll();
        self.pending.extend(new);
    }

    /// Waits (≤ EVENT_WAIT) for a pending event that `pred` accepts; takes it out.
    fn wait_event(&mut self, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            self.poll();
            if let Some(i) = self.pending.iter().position(&pred) {
                return Some(self.pending.remove(i));
            }
            if Instant::now() >= deadline || checkpoint().is_err() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Shows the pending events, one line each; the scan's denials are counted instead.
    fn show_events(&mut self) {
        self.poll();
        for e in std::mem::take(&mut self.pending) {
            self.show_event(e);
        }
    }

    fn show_event(&mut self, e: Event) {
        let arrow = self.arrow();
        match e.event.as_str() {
            "deny" if self.is_scan_event(&e) => match e.reason.as_deref() {
                Some("quarantined") => self.summary.scan.logged_quarantined += 1,
                _ => self.summary.scan.logged_default_deny += 1,
            },
            "deny" if self.was_tried(&e) => {}
            "policy_loaded" => self.out.note(&format!(
                "audit: policy_loaded (generation {})",
                e.generation.unwrap_or(0)
            )),
            "quarantine" => self.on_quarantine(e),
            "release" => {
                self.summary.release_event = true;
                self.out.line(&format!(
                    "{} {}",
                    self.out.paint(CYAN, "RELEASE"),
                    e.device.as_deref().unwrap_or("?")
                ));
            }
            other => {
                let who = e
                    .device
                    .clone()
                    .or(e.src.map(|a| a.to_string()))
                    .unwrap_or_default();
                let dst = e.dst.map(|a| a.to_string()).unwrap_or_default();
                let port = match (e.dport, e.proto.as_deref()) {
                    (Some(p), Some(proto)) => format!(" {p}/{proto}"),
                    (None, Some(proto)) => format!(" {proto}"),
                    _ => String::new(),
                };
                let reason = e.reason.map(|r| format!(" ({r})")).unwrap_or_default();
                self.out
                    .note(&format!("audit: {other} {who} {arrow} {dst}{port}{reason}"));
            }
        }
    }

    fn is_scan_event(&self, e: &Event) -> bool {
        let camera = address("cam-01");
        matches!(self.scan, Some((target, ..)) if e.dst == Some(target) && e.src == Some(camera))
    }

    fn was_tried(&self, e: &Event) -> bool {
        self.tried
            .iter()
            .any(|(src, dst, port)| e.src == Some(*src) && e.dst == Some(*dst) && e.dport == *port)
    }

    fn on_quarantine(&mut self, e: Event) {
        let device = e.device.clone().unwrap_or_default();
        let by = e.source.clone().unwrap_or_default();
        let detail = e.reason.clone().unwrap_or_default();
        let (after, syns) = match (self.scan, e.ts) {
            (Some((_, started, syns)), Some(ts)) => {
                (ts.duration_since(started).unwrap_or_default(), syns)
            }
            _ => (Duration::ZERO, 0),
        };
        self.out.line(&format!(
            "{} {device} ({by}: {detail}) {:.1} s into the scan, after {syns} SYNs",
            self.out.paint(MAGENTA, "QUARANTINE"),
            after.as_secs_f64()
        ));
        if self.summary.quarantine.is_none() {
            self.summary.quarantine = Some(QuarantineSeen {
                device,
                by,
                detail,
                after,
                after_syns: syns,
                state: String::new(),
                state_by: String::new(),
            });
        }
    }

    /// Tries one flow and prints its line; a drop is shown with the reason of its `deny`
    /// event.
    fn try_flow(&mut self, f: &Flow) -> Result<(), Interrupted> {
        checkpoint()?;
        let (host, dst) = (
            if is_remote(f.from) { UPLINK } else { f.from },
            address(f.to),
        );
        let target = SocketAddr::new(dst, f.port.number());
        let mut probe = match f.port {
            Port::Tcp(_) => Probe::tcp(target),
            Port::Udp(_) => Probe::udp(target),
        };
        let src = address(f.from);
        if is_remote(f.from) {
            probe = probe.from(src);
        }
        let timeout = if f.pass { PASS_TIMEOUT } else { DROP_TIMEOUT };
        let outcome = self.lab.probe(host, &probe, timeout);
        let mut reason = None;
        if outcome == Outcome::TimedOut {
            self.tried.push((src, dst, Some(f.port.number())));
            let port = f.port.number();
            reason = self
                .wait_event(|e| {
                    e.event == "deny"
                        && e.src == Some(src)
                        && e.dst == Some(dst)
                        && e.dport == Some(port)
                })
                .and_then(|e| e.reason);
        }
        let result = FlowResult {
            id: f.id,
            flow: format!("{} -> {} {}", f.from, f.to, f.port.text()),
            expected_pass: f.pass,
            passed: outcome.passed(),
            outcome: outcome.to_string(),
            reason: reason.clone(),
        };
        let verdict = match (outcome.passed(), &outcome) {
            (true, _) => self.out.paint(GREEN, "ALLOWED"),
            (false, Outcome::TimedOut) => {
                let why = reason
                    .as_deref()
                    .map(|r| r.replace('_', " "))
                    .unwrap_or_else(|| "no deny event logged".into());
                format!("{}  ({why})", self.out.paint(RED, "DENIED"))
            }
            (false, other) => self.out.paint(YELLOW, &other.to_string().to_uppercase()),
        };
        self.out.flow(
            &format!(
                "{} {} {} {}",
                label(f.from),
                self.arrow(),
                f.to,
                f.port.text()
            ),
            f.note,
            &verdict,
        );
        let told = result.as_told();
        self.summary.flows.push(result);
        if !told {
            let want = if f.pass {
                "pass"
            } else {
                "be denied, with a deny event"
            };
            self.surprise(format!(
                "{} {} should {want}, but it {outcome}{}",
                f.id,
                self.summary.flows.last().unwrap().flow,
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
        self.show_events();
        pause(self.pace)
    }

    /// The camera's MQTT connection, opened now and kept open into its quarantine.
    fn open_camera_connection(&mut self) -> Result<Option<TcpConn>, Interrupted> {
        checkpoint()?;
        let conn = self
            .lab
            .tcp_connect("cam-01", (address("broker-1"), 8883), PASS_TIMEOUT);
        let (conn, passed, outcome) = match conn {
            Ok(mut c) => {
                let ok = c.echoes(PASS_TIMEOUT);
                let outcome = if ok { "passed" } else { "connected, no echo" };
                (Some(c), ok, outcome.to_string())
            }
            Err(e) => (None, false, e.to_string()),
        };
        let verdict = if passed {
            self.out.paint(GREEN, "ALLOWED")
        } else {
            self.out.paint(YELLOW, &outcome.to_uppercase())
        };
        self.out.flow(
            &format!("camera cam-01 {} broker-1 8883/tcp", self.arrow()),
            "MQTT, connection kept open",
            &verdict,
        );
        self.summary.flows.push(FlowResult {
            id: "camera-mqtt-open",
            flow: "cam-01 -> broker-1 8883/tcp".into(),
            expected_pass: true,
            passed,
            outcome: outcome.clone(),
            reason: None,
        });
        if !passed {
            self.surprise(format!(
                "the camera's MQTT connection did not open: {outcome}"
            ));
        }
        self.show_events();
        Ok(conn)
    }

    /// The compromised camera scans plc-7: one SYN per port, answers not awaited. The
    /// quarantine is shown as soon as it is logged.
    fn scan_plc(&mut self, plc_ssh: &lab::TcpServer) -> Result<(), Interrupted> {
        let target = address("plc-7");
        let camera = address("cam-01");
        self.out.line(&format!(
            "{} cam-01 scans plc-7, ports {}-{} (one SYN each, {} ms apart)",
            self.out.paint(RED, "ATTACK"),
            SCAN_PORTS.start(),
            SCAN_PORTS.end(),
            SCAN_GAP.as_millis()
        ));
        self.summary.scan.target = "plc-7".into();
        let started = SystemTime::now();
        for port in SCAN_PORTS {
            checkpoint()?;
            // A 1 ms connect: the SYN leaves, the socket is closed unanswered.
            let _ = self
                .lab
                .tcp_connect("cam-01", (target, port), Duration::from_millis(1));
            self.summary.scan.syns += 1;
            self.scan = Some((target, started, self.summary.scan.syns));
            self.show_events();
            pause(SCAN_GAP)?;
        }
        if self.summary.quarantine.is_none() {
            if let Some(e) = self.wait_event(|e| e.event == "quarantine") {
                self.on_quarantine(e);
            }
        }
        pause(Duration::from_millis(200))?;
        self.show_events();
        self.scan = None;
        let reached = plc_ssh.peers().iter().filter(|p| p.ip() == camera).count();
        self.summary.scan.reached_target = reached;
        let s = &self.summary.scan;
        self.out.line(&format!(
            "scan over: {} SYNs, plc-7 got {}",
            s.syns,
            if reached == 0 {
                "none".to_string()
            } else {
                reached.to_string()
            }
        ));
        self.out.note(&format!(
            "    audit log: {} denied (default deny), {} dropped as quarantined (the kernel \
             reports up to 20 a second per device; its counters have every packet)",
            s.logged_default_deny, s.logged_quarantined,
        ));
        if reached > 0 {
            self.surprise(format!("{reached} scan connections reached plc-7"));
        }
        match self.summary.quarantine.clone() {
            None => self.surprise("the scanning camera was not quarantined".into()),
            Some(q) => {
                let info = self.device_info(&q.device);
                let state = info["state"].as_str().unwrap_or("?").to_string();
                let by = info["quarantine"]["by"].as_str().unwrap_or("").to_string();
                let since = info["quarantine"]["since"].as_str().unwrap_or("?");
                self.out.line(&format!(
                    "segward devices: {} {state} since {since}, by {by}",
                    q.device
                ));
                if state != "quarantined" {
                    self.surprise(format!("segward devices says {} is {state}", q.device));
                }
                let q = self.summary.quarantine.as_mut().unwrap();
                q.state = state;
                q.state_by = by;
            }
        }
        Ok(())
    }

    fn device_info(&self, device: &str) -> Value {
        let reply = self.control_json(&["devices"]);
        reply["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == device).cloned())
            .unwrap_or(Value::Null)
    }

    /// `segward release DEVICE` through the control socket, as an operator would.
    fn release(&mut self, device: &str) -> Result<(), Interrupted> {
        checkpoint()?;
        let out = self.lab.control(&["release", device]);
        checkpoint()?;
        let said = String::from_utf8_lossy(if out.status.success() {
            &out.stdout
        } else {
            &out.stderr
        })
        .trim()
        .to_string();
        self.out.line(&format!(
            "operator: segward release {device} {} {said}",
            self.arrow()
        ));
        if !out.status.success() {
            self.surprise(format!(
                "segward release {device} failed ({}): {said}",
                out.status
            ));
        }
        if let Some(e) = self.wait_event(|e| e.event == "release") {
            self.show_event(e);
        }
        self.summary.released = out.status.success() && self.summary.release_event;
        if out.status.success() && !self.summary.release_event {
            self.surprise(format!("no release event for {device} in the audit log"));
        }
        self.show_events();
        Ok(())
    }

    /// The non-zero `segward_packets_total` counters, from `segward status --json`.
    fn packet_counts(&self) -> Vec<PacketCount> {
        let status = self.control_json(&["status"]);
        let mut counts: Vec<PacketCount> = status["packets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(PacketCount {
                    verdict: p["verdict"].as_str()?.to_string(),
                    reason: p["reason"].as_str()?.to_string(),
                    packets: p["packets"].as_u64()?,
                })
            })
            .filter(|p| p.packets > 0)
            .collect();
        // pass before drop, then the biggest first
        counts.sort_by(|a, b| {
            (a.verdict != "pass", std::cmp::Reverse(a.packets))
                .cmp(&(b.verdict != "pass", std::cmp::Reverse(b.packets)))
        });
        counts
    }
}

fn print_summary(out: &Printer, s: &Summary, namespaces: usize) {
    out.act("Summary");
    let told = s.flows.iter().filter(|f| f.as_told()).count();
    let allowed = s.flows.iter().filter(|f| f.passed).count();
    out.plain(&format!(
        "flows:      {told} of {} as the policy says ({allowed} allowed, {} denied)",
        s.flows.len(),
        s.flows.len() - allowed
    ));
    match &s.quarantine {
        Some(q) => out.plain(&format!(
            "quarantine: {} automatically ({}: {}) {:.1} s into its scan of {}; its open \
             connection {}; {}",
            q.device,
            q.by,
            q.detail,
            q.after.as_secs_f64(),
            s.scan.target,
            if s.connection_cut { "cut" } else { "NOT cut" },
            if s.released {
                "released by the operator"
            } else {
                "NOT released"
            }
        )),
        None => out.plain("quarantine: NONE"),
    }
    out.plain("packets by reason (segward status --json, before it stopped):");
    out.plain(&format!(
        "    {:<8} {:<16} {:>8}",
        "verdict", "reason", "packets"
    ));
    for p in &s.packets {
        let verdict = if p.verdict == "pass" {
            out.paint(GREEN, &format!("{:<8}", p.verdict))
        } else {
            out.paint(RED, &format!("{:<8}", p.verdict))
        };
        out.plain(&format!("    {verdict} {:<16} {:>8}", p.reason, p.packets));
    }
    if s.cleaned_up {
        out.plain(&format!(
            "clean-up:   {namespaces} namespaces deleted, no pins left"
        ));
    }
    if s.surprises.is_empty() {
        out.plain(&format!(
            "{} in {:.1} s",
            out.paint(GREEN, "the story went as told"),
            s.elapsed.as_secs_f64()
        ));
    } else {
        out.plain(&out.paint(YELLOW, "NOT as told:"));
        for w in &s.surprises {
            out.plain(&format!("  - {w}"));
        }
        out.plain(&format!("finished in {:.1} s", s.elapsed.as_secs_f64()));
    }
}
