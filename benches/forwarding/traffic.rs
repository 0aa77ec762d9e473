//! Real traffic from the sender's namespace, what it costs in CPU time, and what the
//! receiver got.
//!
//! The packet generator is the kernel's own (BPF_PROG_TEST_RUN in live-frames mode, what
//! xdp-trafgen uses): an XDP program writes the flow's frame and redirects it into the
//! sender's link to the gateway, as many times as asked. So frames reach the gateway as XDP
//! frames, not skbs: the gateway's veth runs its XDP program (if any) on the raw frame and
//! builds an skb only for frames that go on, as a NIC driver does; and sending costs the
//! sender a few tens of ns per frame, so nearly all the CPU time measured is the gateway's.

use std::{
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::xdp;
use crate::lab::{Lab, GATEWAY, UPLINK, UPLINK_ADDR, UPLINK_IFACE};

/// The lab device that sends everything.
pub const SENDER: &str = "sender";
pub const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
/// The uplink host every flow goes to.
pub const TARGET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const SOURCE_PORT: u16 = 40_000;
/// A MAC no namespace owns: the gateway addresses forwarded frames to it, so the uplink
/// namespace counts them and discards them before IP, at the same small cost whatever the
/// gateway does.
const SINK_MAC: &str = "02:5a:00:ff:ff:fe";
/// The CPU the generator runs on; the gateway's and the receiver's work follows it there.
pub const CPU: usize = 0;
/// How long the allowed flow's reply may take to make it established.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A one-way UDP flow from the sender to the uplink host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flow {
    /// The one flow a rule in the middle of the rule list allows.
    Allowed,
    /// The same destination on a port no rule allows.
    Denied,
}

impl Flow {
    pub const ALL: [Flow; 2] = [Flow::Allowed, Flow::Denied];

    pub fn port(self) -> u16 {
        match self {
            Flow::Allowed => 5_000,
            Flow::Denied => 9,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flow::Allowed => "allowed",
            Flow::Denied => "denied",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the sender's frames go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Through the sender's link to the gateway.
    Gateway,
    /// Nowhere: the generator drops them, so nothing outside the sender sees them.
    Alone,
}

/// One generator run.
pub struct Run {
    pub sent: u64,
    /// Frames that arrived at the uplink namespace during the run.
    pub delivered: u64,
    /// CPU time of the run in ns per packet sent.
    pub cpu_ns: f64,
    /// Packets per second sent.
    pub pps: f64,
}

/// Sends the lab's flows and accounts for their cost.
pub struct Generator<'lab> {
    lab: &'lab Lab,
    /// Per flow: its generator program into the link, and its generator that drops.
    to_gateway: [OwnedFd; 2],
    alone: [OwnedFd; 2],
    frames: [Vec<u8>; 2],
    ksoftirqd: u32,
}

impl<'lab> Generator<'lab> {
    /// Prepares the lab (sink neighbour, GRO on the gateway's device link) and loads the
    /// generator programs.
    pub fn new(lab: &'lab Lab) -> Result<Generator<'lab>> {
        let uplink = UPLINK_ADDR.to_string();
        let neigh = ["ip", "neigh", "replace", &uplink, "lladdr", SINK_MAC];
        let neigh = [&neigh[..], &["dev", UPLINK_IFACE, "nud", "permanent"]].concat();
        ns_cmd(lab, GATEWAY, &neigh)?;
        let device_link = lab.device_iface(SENDER);
        lab.run_in(GATEWAY, || xdp::enable_gro(device_link))?;
        let link = lab.run_in(SENDER, || xdp::ifindex("eth0"))?;
        let frames = Flow::ALL.map(|flow| frame(lab, flow));
        let load = |frame: &Vec<u8>, to: Option<u32>| xdp::load(&xdp::generator(frame, to));
        Ok(Generator {
            lab,
            to_gateway: [load(&frames[0], Some(link))?, load(&frames[1], Some(link))?],
            alone: [load(&frames[0], None)?, load(&frames[1], None)?],
            frames,
            ksoftirqd: ksoftirqd_pid(CPU)?,
        })
    }

    /// Sends `count` packets of `flow` to `link` at full speed and measures the CPU time:
    /// the generator's thread's (with the softirq work done in its context: the gateway's
    /// and the receiver's), its CPU's ksoftirqd thread's, and `daemon`'s (a process of the
    /// configuration under test).
    pub fn send(&self, flow: Flow, link: Link, count: u64, daemon: Option<u32>) -> Result<Run> {
        let prog = match link {
            Link::Gateway => &self.to_gateway[flow.index()],
            Link::Alone => &self.alone[flow.index()],
        };
        let frame = &self.frames[flow.index()];
        let received = rx_packets(self.lab, UPLINK, "eth0")?;
        let helpers = self.helper_cpu_ns(daemon)?;
        let (cpu_ns, wall) = self
            .lab
            .run_in(SENDER, || xdp::generate(prog, frame, count, CPU))
            .with_context(|| format!("sending {count} {} packets", flow.name()))?;
        let helpers = self.helper_cpu_ns(daemon)? - helpers;
        let delivered = rx_packets(self.lab, UPLINK, "eth0")? - received;
        Ok(Run {
            sent: count,
            delivered,
            cpu_ns: (cpu_ns + helpers) as f64 / count as f64,
            pps: count as f64 / wall.as_secs_f64().max(1e-9),
        })
    }

    /// Sends a burst of the allowed flow and a reply from the uplink host to it, so that a
    /// stateful filter tracks the flow as established; with `conntrack`, waits until the
    /// gateway's connection tracking shows the reply.
    pub fn establish(&self, conntrack: bool, daemon: Option<u32>) -> Result<()> {
        self.send(Flow::Allowed, Link::Gateway, 100, daemon)?;
        self.lab
            .run_in(UPLINK, || {
                let socket = UdpSocket::bind((TARGET, Flow::Allowed.port()))?;
                socket.send_to(b"reply", (SENDER_ADDR, SOURCE_PORT))
            })
            .context("sending the allowed flow's reply from the uplink host")?;
        if !conntrack {
            return Ok(());
        }
        let forward = format!(
            "src={SENDER_ADDR} dst={TARGET} sport={SOURCE_PORT} dport={} ",
            Flow::Allowed.port()
        );
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let table = ns_cmd(self.lab, GATEWAY, &["cat", "/proc/net/nf_conntrack"])?;
            let entry = table.lines().find(|l| l.contains(&forward));
            if entry.is_some_and(|l| !l.contains("[UNREPLIED]")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the gateway's conntrack did not see the allowed flow's reply within \
                     {REPLY_TIMEOUT:?}; its entry: {entry:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn helper_cpu_ns(&self, daemon: Option<u32>) -> Result<u64> {
        std::iter::once(self.ksoftirqd)
            .chain(daemon)
            .map(task_cpu_ns)
            .sum()
    }
}

/// The flow's 60-byte frame from the sender's MAC to the gateway's: Ethernet, IPv4 (with
/// its checksum, which the gateway checks), UDP (no checksum, as IPv4 allows), zeroes.
fn frame(lab: &Lab, flow: Flow) -> Vec<u8> {
    let mac = |text: &str| -> Vec<u8> {
        text.split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("the lab's MACs are well-formed"))
            .collect()
    };
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&46u16.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&SENDER_ADDR.octets());
    ip[16..20].copy_from_slice(&TARGET.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = mac(lab.gateway_mac(SENDER));
    frame.extend(mac(lab.device_mac(SENDER)));
    frame.extend(0x0800u16.to_be_bytes());
    frame.extend(ip);
    frame.extend(SOURCE_PORT.to_be_bytes());
    frame.extend(flow.port().to_be_bytes());
    frame.extend(26u16.to_be_bytes()); // UDP length
    frame.extend([0; 2]);
    frame.resize(60, 0);
    frame
}

/// Runs `cmd` inside `host`'s namespace; Err names the command and shows its output.
pub fn ns_cmd(lab: &Lab, host: &str, cmd: &[&str]) -> Result<String> {
    let out = lab.exec(host, cmd);
    if !out.status.success() {
        bail!(
            "`{}` in the {host} namespace failed ({}): {}{}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Packets received on `iface` in `host`'s namespace.
fn rx_packets(lab: &Lab, host: &str, iface: &str) -> Result<u64> {
    let json = ns_cmd(lab, host, &["ip", "-j", "-s", "link", "show", "dev", iface])?;
    let links: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("parsing `ip -j link`: {json}"))?;
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet count for {iface} in {host}: {json}"))
}

/// The ksoftirqd thread of `cpu`: softirq work that overflows the generator's context
/// runs there.
fn ksoftirqd_pid(cpu: usize) -> Result<u32> {
    let name = format!("ksoftirqd/{cpu}\n");
    fs::read_dir("/proc")
        .context("listing /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == name))
        .with_context(|| format!("no ksoftirqd/{cpu} thread in /proc"))
}

/// CPU time of all threads of `pid` so far, in ns (schedstat: exact, not tick-sampled).
fn task_cpu_ns(pid: u32) -> Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        let path = task?.path().join("schedstat");
        // A thread that exited since the listing no longer counts.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .with_context(|| format!("parsing {}: {text:?}", path.display()))?;
    }
    Ok(total)
}
