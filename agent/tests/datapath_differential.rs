//! Test layer 3 (DESIGN.md): random policies and random frames; the kernel's verdict (with
//! BPF_PROG_TEST_RUN, and the counter it was counted under) must equal the host reference
//! verdict, the shared decision logic over the compiled policy.
//!
//! Seeded: the seed is printed on failure, and `SEGWARD_DIFF_SEED=<n>` replays a run.
//!
//! Conntrack: both sides keep their flow tables across policy installs, as the daemon's
//! kernel does across reloads, so replies of flows that an earlier policy allowed are judged
//! alike. Every `POLICIES_PER_DATAPATH` policies both start afresh with a new datapath, so
//! that no flow lives long enough to time out on one side only (the host has no clock).
//! Runs as root (it loads BPF programs).

mod common;

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::{maps::Config, verdict::Reason};
use common::*;
use ipnet::IpNet;
use segward::{
    datapath::Hook,
    policy::{compile::compile, load::load_str},
};

const DATAPATHS: usize = 16;
const POLICIES_PER_DATAPATH: usize = 25;
const FRAMES_PER_POLICY: usize = 150;

/// A datapath is retired long before its oldest flow could time out.
const MAX_DATAPATH_AGE: Duration = Duration::from_secs(Config::DEFAULT_TIMEOUT_OTHER as u64 / 3);

/// Well-known and boundary ports, so that frames hit the rules.
const PORTS: [u16; 12] = [1, 22, 53, 67, 68, 80, 123, 443, 546, 547, 8883, 65535];
const EVIL_MAC: [u8; 6] = [2, 0xee, 0xee, 0xee, 0xee, 0xee];

/// xorshift64*: small, seedable, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn range(&mut self, low: usize, high: usize) -> usize {
        low + self.below(high - low + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn port(&mut self) -> u16 {
        if self.percent(70) {
            self.pick(&PORTS)
        } else {
            self.next() as u16
        }
    }
}

/// Addresses devices are given (and unbound sources come from): 10.0.a.b, 2001:db8:0:a::b.
fn local_pool(v4: bool, a: u8, b: u8) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::new(10, 0, a, b))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, a.into(), 0, 0, 0, b.into()))
    }
}

fn random_local(rng: &mut Rng, v4: bool) -> IpAddr {
    let (a, b) = (rng.below(4) as u8, rng.range(1, 8) as u8);
    local_pool(v4, a, b)
}

/// Beyond the device network: 192.0.2.b / 198.51.100.b, 2001:db8:ff:c::b.
fn random_outside(rng: &mut Rng, v4: bool) -> IpAddr {
    let b = rng.range(1, 8) as u8;
    match (v4, rng.percent(50)) {
        (true, true) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, b)),
        (true, false) => IpAddr::V4(Ipv4Addr::new(198, 51, 100, b)),
        (false, c) => IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xff,
            c.into(),
            0,
            0,
            0,
            b.into(),
        )),
    }
}

/// Addresses no policy names: unspecified, broadcast, link-local, multicast, and IPv6
/// packets carrying IPv4-mapped addresses.
fn random_special(rng: &mut Rng, v4: bool) -> IpAddr {
    if v4 {
        rng.pick(&[
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251)),
            IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)),
        ])
    } else {
        let mapped = match random_local(rng, true) {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        };
        rng.pick(&[
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x99)),
            IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2)),
            mapped,
        ])
    }
}

/// A CIDR around an interesting address, host bits cleared as the loader demands.
fn random_cidr(rng: &mut Rng) -> IpNet {
    let v4 = rng.percent(50);
    let base = match rng.below(3) {
        0 | 1 => random_local(rng, v4),
        _ => random_outside(rng, v4),
    };
    let len = if v4 {
        rng.pick(&[0, 8, 16, 23, 24, 26, 29, 31, 32])
    } else {
        rng.pick(&[0, 16, 32, 48, 60, 64, 100, 120, 127, 128])
    };
    IpNet::new(base, len)
        .expect("a valid prefix length")
        .trunc()
}

/// A random address inside `net`.
fn inside(rng: &mut Rng, net: IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = u32::MAX.checked_shr(n.prefix_len().into()).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()) | (rng.next() as u32 & host),
            ))
        }
        IpNet::V6(n) => {
            let host = u128::MAX.checked_shr(n.prefix_len().into()).unwrap_or(0);
            let random = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | (random & host)))
        }
    }
}

/// An entry of `ports:`.
#[derive(Clone, Copy)]
enum Ports {
    One(&'static str, u16),
    Range(&'static str, u16, u16),
    /// `tcp`, `udp`, `sctp`: every port.
    All(&'static str),
    Icmp,
    Icmpv6,
    Any,
}

impl Ports {
    fn random(rng: &mut Rng) -> Self {
        let proto = rng.pick(&["tcp", "udp", "sctp"]);
        match rng.below(10) {
            0..=3 => Ports::One(proto, rng.pick(&PORTS)),
            4 | 5 => {
                let low = rng.pick(&PORTS);
                let high = (usize::from(low) + rng.pick(&[1, 10, 1000, 65535])).min(65535);
                Ports::Range(proto, low, high as u16)
            }
            6 => Ports::All(proto),
            7 => Ports::Icmp,
            8 => Ports::Icmpv6,
            _ => Ports::Any,
        }
    }

    /// A header this spec lets through (if the family fits).
    fn l4(self, rng: &mut Rng, v4: bool) -> L4 {
        let with_ports = |proto: &str, sport: u16, dport: u16| match proto {
            "tcp" => L4::Tcp(sport, dport),
            "udp" => L4::Udp(sport, dport),
            _ => L4::Sctp(sport, dport),
        };
        let sport = rng.port();
        match self {
            Ports::One(proto, port) => with_ports(proto, sport, port),
            Ports::Range(proto, low, high) => {
                let port = rng.range(low.into(), high.into()) as u16;
                with_ports(proto, sport, port)
            }
            Ports::All(proto) => with_ports(proto, sport, rng.port()),
            Ports::Icmp | Ports::Icmpv6 => L4::Icmp {
                ty: if v4 { 8 } else { 128 },
                id: rng.range(1, 3) as u16,
            },
            Ports::Any => random_l4(rng, v4),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::One(proto, port) => write!(f, "{port}/{proto}"),
            Ports::Range(proto, low, high) => write!(f, "{low}-{high}/{proto}"),
            Ports::All(proto) => f.write_str(proto),
            Ports::Icmp => f.write_str("icmp"),
            Ports::Icmpv6 => f.write_str("icmpv6"),
            Ports::Any => f.write_str("any"),
        }
    }
}

/// What a rule's `to:` / `from:` names.
#[derive(Clone, Copy)]
enum Peer {
    Segment(usize),
    Device(usize),
    Zone(usize),
    Gateway,
    Cidr(IpNet),
}

struct Rule {
    peer: Peer,
    ports: Vec<Ports>,
}

struct Segment {
    audit: bool,
    devices: Vec<usize>,
    allow: Vec<Rule>,
    accept: Vec<Rule>,
}

struct Device {
    addresses: Vec<IpAddr>,
    mac: [u8; 6],
    pinned: bool,
}

/// A random policy, and the gateway and agent settings it runs with.
struct World {
    segments: Vec<Segment>,
    devices: Vec<Device>,
    zones: Vec<Vec<IpNet>>,
    gateways: Vec<IpAddr>,
    audit: bool,
}

impl World {
    fn random(rng: &mut Rng) -> Self {
        let mut free: Vec<IpAddr> = [true, false]
            .into_iter()
            .flat_map(|v4| (0..4).flat_map(move |a| (1..9).map(move |b| local_pool(v4, a, b))))
            .collect();
        let zones: Vec<Vec<IpNet>> = (0..rng.range(0, 3))
            .map(|_| (0..rng.range(1, 3)).map(|_| random_cidr(rng)).collect())
            .collect();
        let mut devices = Vec::new();
        let mut segments: Vec<Segment> = (0..rng.range(1, 4))
            .map(|_| Segment {
                audit: rng.percent(20),
                devices: (0..rng.range(0, 3))
                    .map(|_| {
                        let mut addresses = Vec::new();
                        for (v4, p) in [(true, 70), (false, 60)] {
                            if rng.percent(p) {
                                let candidates: Vec<usize> = (0..free.len())
                                    .filter(|&i| free[i].is_ipv4() == v4)
                                    .collect();
                                addresses.push(free.swap_remove(rng.pick(&candidates)));
                            }
                        }
                        devices.push(Device {
                            addresses,
                            mac: [2, 0, 0, 0, 0, devices.len() as u8],
                            pinned: rng.percent(50),
                        });
                        devices.len() - 1
                    })
                    .collect(),
                allow: Vec::new(),
                accept: Vec::new(),
            })
            .collect();
        let (segment_count, device_count, zone_count) =
            (segments.len(), devices.len(), zones.len());
        let ports = |rng: &mut Rng| (0..rng.range(1, 3)).map(|_| Ports::random(rng)).collect();
        for segment in &mut segments {
            segment.allow = (0..rng.range(0, 4))
                .map(|_| {
                    let peer = match rng.below(6) {
                        0 => Peer::Segment(rng.below(segment_count)),
                        1 if device_count > 0 => Peer::Device(rng.below(device_count)),
                        2 if zone_count > 0 => Peer::Zone(rng.below(zone_count)),
                        3 => Peer::Gateway,
                        _ => Peer::Cidr(random_cidr(rng)),
                    };
                    Rule {
                        peer,
                        ports: ports(rng),
                    }
                })
                .collect();
            segment.accept = (0..rng.range(0, 2))
                .map(|_| {
                    let peer = if zone_count > 0 && rng.percent(50) {
                        Peer::Zone(rng.below(zone_count))
                    } else {
                        Peer::Cidr(random_cidr(rng))
                    };
                    Rule {
                        peer,
                        ports: ports(rng),
                    }
                })
                .collect();
        }
        let gateways = (0..rng.range(0, 3))
            .map(|_| match rng.below(3) {
                // Sometimes a device's address, which the device keeps.
                0 => {
                    let v4 = rng.percent(50);
                    random_local(rng, v4)
                }
                1 => local_pool(true, rng.below(4) as u8, 254),
                _ => local_pool(false, rng.below(4) as u8, 254),
            })
            .collect();
        World {
            segments,
            devices,
            zones,
            gateways,
            audit: rng.percent(10),
        }
    }

    fn yaml(&self) -> String {
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut yaml = String::new();
        for (s, segment) in self.segments.iter().enumerate() {
            writeln!(yaml, "---\nkind: Segment\nname: seg-{s}").unwrap();
            if segment.audit {
                yaml.push_str("mode: audit\n");
            }
            if !segment.devices.is_empty() {
                yaml.push_str("devices:\n");
            }
            for &d in &segment.devices {
                let device = &self.devices[d];
                writeln!(yaml, "  - id: dev-{d}").unwrap();
                if device.pinned {
                    writeln!(yaml, "    mac: \"{}\"", mac_text(device.mac)).unwrap();
                }
                let addresses = device.addresses.iter().map(IpAddr::to_string).collect();
                writeln!(yaml, "    addresses: {}", list(addresses)).unwrap();
            }
            let kinds = [
                ("allow", "to", &segment.allow),
                ("accept", "from", &segment.accept),
            ];
            for (key, peer_key, rules) in kinds {
                if !rules.is_empty() {
                    writeln!(yaml, "{key}:").unwrap();
                }
                for rule in rules {
                    let peer = match rule.peer {
                        Peer::Segment(s) => format!("seg-{s}"),
                        Peer::Device(d) => format!("dev-{d}"),
                        Peer::Zone(z) => format!("zone-{z}"),
                        Peer::Gateway => "gateway".to_owned(),
                        Peer::Cidr(cidr) => cidr.to_string(),
                    };
                    let ports = rule.ports.iter().map(Ports::to_string).collect();
                    writeln!(
                        yaml,
                        "  - {peer_key}: \"{peer}\"\n    ports: {}",
                        list(ports)
                    )
                    .unwrap();
                }
            }
        }
        for (z, cidrs) in self.zones.iter().enumerate() {
            let cidrs = cidrs.iter().map(IpNet::to_string).collect();
            writeln!(
                yaml,
                "---\nkind: Zone\nname: zone-{z}\ncidrs: {}",
                list(cidrs)
            )
            .unwrap();
        }
        yaml
    }

    /// Every CIDR the policy names, in zones and in rules.
    fn cidrs(&self) -> Vec<IpNet> {
        let rules = self
            .segments
            .iter()
            .flat_map(|s| s.allow.iter().chain(&s.accept));
        let in_rules = rules.filter_map(|r| match r.peer {
            Peer::Cidr(cidr) => Some(cidr),
            _ => None,
        });
        self.zones
            .iter()
            .flatten()
            .copied()
            .chain(in_rules)
            .collect()
    }

    fn addresses_of(&self, devices: &[usize]) -> Vec<IpAddr> {
        devices
            .iter()
            .flat_map(|&d| self.devices[d].addresses.iter().copied())
            .collect()
    }

    /// An address of family `v4` that the policy may or may not know.
    fn address(&self, rng: &mut Rng, v4: bool) -> IpAddr {
        let all_devices: Vec<usize> = (0..self.devices.len()).collect();
        let device_addrs: Vec<IpAddr> = family(self.addresses_of(&all_devices), v4);
        let cidrs: Vec<IpNet> = self
            .cidrs()
            .into_iter()
            .filter(|c| c.addr().is_ipv4() == v4)
            .collect();
        let gateways = family(self.gateways.clone(), v4);
        match rng.below(20) {
            0..=6 if !device_addrs.is_empty() => rng.pick(&device_addrs),
            7..=10 if !cidrs.is_empty() => {
                let cidr = rng.pick(&cidrs);
                inside(rng, cidr)
            }
            11 | 12 if !gateways.is_empty() => rng.pick(&gateways),
            13..=15 => random_local(rng, v4),
            16 | 17 => random_outside(rng, v4),
            _ => random_special(rng, v4),
        }
    }

    /// The source MAC of a frame from `src`: mostly its device's own, else another's.
    fn mac(&self, rng: &mut Rng, src: IpAddr) -> [u8; 6] {
        let owner = self.devices.iter().find(|d| d.addresses.contains(&src));
        match owner {
            Some(device) if rng.percent(85) => device.mac,
            _ if !self.devices.is_empty() && rng.percent(50) => {
                self.devices[rng.below(self.devices.len())].mac
            }
            _ => EVIL_MAC,
        }
    }

    /// A new flow that a rule of the policy allows (or accepts), if one can be built.
    fn aimed(&self, rng: &mut Rng) -> Option<(Frame, Hook)> {
        let segment = &self.segments[rng.below(self.segments.len())];
        let accept = !segment.accept.is_empty() && (segment.allow.is_empty() || rng.percent(30));
        let rules = if accept {
            &segment.accept
        } else {
            &segment.allow
        };
        let rule = rules.get(rng.below(rules.len().max(1)))?;
        let ports = rule.ports[rng.below(rule.ports.len())];
        let v4 = match ports {
            Ports::Icmp => true,
            Ports::Icmpv6 => false,
            _ => rng.percent(50),
        };
        let members = family(self.addresses_of(&segment.devices), v4);
        let peers = family(
            match rule.peer {
                Peer::Segment(s) => self.addresses_of(&self.segments[s].devices),
                Peer::Device(d) => self.devices[d].addresses.clone(),
                Peer::Zone(z) => self.zones[z]
                    .iter()
                    .map(|&cidr| inside(rng, cidr))
                    .collect(),
                Peer::Gateway => self.gateways.clone(),
                Peer::Cidr(cidr) => vec![inside(rng, cidr)],
            },
            v4,
        );
        if members.is_empty() || peers.is_empty() {
            return None;
        }
        let (member, peer) = (rng.pick(&members), rng.pick(&peers));
        let l4 = ports.l4(rng, v4);
        let (mut frame, hook) = if accept {
            let uplink = Hook::ToDevice {
                ingress_ifindex: UPLINK_IFINDEX,
            };
            (ip_frame(peer, member, l4), uplink)
        } else {
            (ip_frame(member, peer, l4), Hook::FromDevice)
        };
        frame.src_mac = Some(self.mac(rng, frame.src_ip().expect("an IP frame")));
        Some((frame, hook))
    }
}

fn family(addresses: Vec<IpAddr>, v4: bool) -> Vec<IpAddr> {
    addresses
        .into_iter()
        .filter(|a| a.is_ipv4() == v4)
        .collect()
}

fn mac_text(mac: [u8; 6]) -> String {
    let octets: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    octets.join(":")
}

fn random_l4(rng: &mut Rng, v4: bool) -> L4 {
    let ports = |rng: &mut Rng| {
        if rng.percent(10) {
            rng.pick(&[(68, 67), (67, 68), (546, 547), (547, 546)])
        } else {
            (rng.port(), rng.port())
        }
    };
    match rng.below(10) {
        0..=2 => {
            let (s, d) = ports(rng);
            L4::Tcp(s, d)
        }
        3..=5 => {
            let (s, d) = ports(rng);
            L4::Udp(s, d)
        }
        6 => L4::Sctp(rng.port(), rng.port()),
        7 | 8 => {
            let ty = if v4 {
                rng.pick(&[0, 8, 8, 3, 11, 13])
            } else {
                rng.pick(&[128, 128, 129, 133, 134, 135, 136, 1, 137])
            };
            L4::Icmp {
                ty,
                id: rng.range(1, 3) as u16,
            }
        }
        _ => L4::Proto(rng.pick(&[0, 2, 6, 17, 43, 44, 47, 50, 51, 58, 59, 60, 132, 255])),
    }
}

/// Any frame at all, from or towards the devices of `world`.
fn random_frame(rng: &mut Rng, world: &World) -> Frame {
    let v4 = rng.percent(50);
    let mut frame = match rng.below(50) {
        0..=2 => {
            let sender = world.address(rng, true);
            arp(sender, world.address(rng, true))
        }
        3 => ethertype(rng.pick(&[0x88cc, 0x8847, 0x0806, 0x0800, 0x86dd, 0x8100, 0])),
        _ => {
            let (src, dst) = (world.address(rng, v4), world.address(rng, v4));
            let mut frame = ip_frame(src, dst, random_l4(rng, v4));
            if let Body::Ip(ip) = &mut frame.body {
                if v4 && rng.percent(10) {
                    ip.option_words = rng.range(1, 10) as u8;
                }
                if !v4 && rng.percent(15) {
                    let headers = [
                        EXT_HOP_BY_HOP,
                        EXT_ROUTING,
                        EXT_AUTH,
                        EXT_DEST_OPTS,
                        EXT_FRAGMENT,
                    ];
                    ip.ext = (0..rng.range(1, 10)).map(|_| rng.pick(&headers)).collect();
                }
                if rng.percent(8) {
                    let offset = if rng.percent(50) {
                        0
                    } else {
                        rng.range(1, 8191) as u16
                    };
                    ip.fragment = (offset, rng.percent(50));
                    if !v4 && !ip.ext.contains(&EXT_FRAGMENT) {
                        ip.ext.push(EXT_FRAGMENT);
                    }
                }
            }
            frame
        }
    };
    if let Some(src) = frame.src_ip() {
        frame.src_mac = Some(world.mac(rng, src));
    }
    match rng.below(20) {
        0 => frame.tags.push(rng.pick(&[ETH_P_8021Q, ETH_P_8021AD])),
        1 => frame.tags.extend([ETH_P_8021AD, ETH_P_8021Q]),
        _ => {}
    }
    if rng.percent(20) {
        frame.payload = (0..rng.range(1, 64)).map(|_| rng.next() as u8).collect();
    }
    frame
}

fn random_hook(rng: &mut Rng) -> Hook {
    match rng.below(8) {
        0..=3 => Hook::FromDevice,
        4 | 5 => Hook::ToDevice {
            ingress_ifindex: UPLINK_IFINDEX,
        },
        6 => Hook::ToDevice { ingress_ifindex: 0 },
        _ => Hook::ToDevice {
            ingress_ifindex: DEVICE_IFINDEX,
        },
    }
}

/// Frames sent so far on one datapath, whose replies later frames may be.
#[derive(Default)]
struct History {
    /// Frames that passed as new flows (most are tracked now), with the hook that judged them.
    opened: Vec<(Frame, Hook)>,
    /// All IP frames.
    sent: Vec<(Frame, Hook)>,
    /// The length of `opened` when the current policy was installed.
    opened_before: usize,
}

impl History {
    /// The next test case: a reply (mostly of a flow that was opened), a flow some rule
    /// allows, or anything.
    fn next_case(&self, rng: &mut Rng, world: &World) -> (Frame, Hook) {
        let roll = rng.below(100);
        let earlier: &[(Frame, Hook)] = match roll {
            // Mostly flows of the current policy, whose devices are still there.
            0..=14 => &self.opened[self.opened_before..],
            15..=19 => &self.opened,
            20..=24 => &self.sent,
            _ => &[],
        };
        if !earlier.is_empty() {
            let (frame, hook) = &earlier[rng.below(earlier.len())];
            let mut reply = frame.reply();
            reply.src_mac = Some(world.mac(rng, reply.src_ip().expect("an IP frame")));
            // Mostly the way a reply would come, sometimes any way.
            let hook = match hook {
                _ if rng.percent(30) => random_hook(rng),
                Hook::FromDevice => Hook::ToDevice {
                    ingress_ifindex: rng.pick(&[UPLINK_IFINDEX, 0]),
                },
                Hook::ToDevice { .. } => Hook::FromDevice,
            };
            return (reply, hook);
        }
        if roll < 60 {
            if let Some(case) = world.aimed(rng) {
                return case;
            }
        }
        (random_frame(rng, world), random_hook(rng))
    }

    fn new_policy(&mut self) {
        self.opened_before = self.opened.len();
    }

    fn record(&mut self, frame: Frame, hook: Hook, verdict: Verdict) {
        if !matches!(frame.body, Body::Ip(_)) {
            return;
        }
        let opened = match verdict.reason {
            Reason::Allowed => true,
            Reason::DefaultDeny => verdict.audited,
            _ => false,
        };
        if opened {
            self.opened.push((frame.clone(), hook));
        }
        self.sent.push((frame, hook));
    }
}

/// Damages `bytes` now and then (cut short, or a header byte overwritten); true if it did.
fn maybe_damage(rng: &mut Rng, bytes: &mut Vec<u8>) -> bool {
    match rng.below(100) {
        0..=4 => bytes.truncate(rng.range(ETH_HLEN, bytes.len() - 1)),
        5..=7 => {
            let i = rng.range(ETH_HLEN - 2, bytes.len().min(80) - 1);
            bytes[i] = rng.next() as u8;
        }
        8 => {
            // The IP version and header length, or whatever sits there.
            let ethertype = u16::from_be_bytes([bytes[12], bytes[13]]);
            let tagged = matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD);
            bytes[ETH_HLEN + if tagged { 4 } else { 0 }] = rng.next() as u8;
        }
        _ => return false,
    }
    true
}

fn seed() -> u64 {
    match std::env::var("SEGWARD_DIFF_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("SEGWARD_DIFF_SEED={text:?} is not a u64")),
        Err(_) => SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as u64,
    }
}

#[test]
fn kernel_matches_host() {
    require_root();
    let seed = seed();
    eprintln!("seed {seed} (replay with SEGWARD_DIFF_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut tally: BTreeMap<(&str, bool), usize> = BTreeMap::new();
    for d in 0..DATAPATHS {
        let born = Instant::now();
        let mut kernel = Kernel::new(load_datapath());
        let mut host = Host::default();
        let mut history = History::default();
        for p in 0..POLICIES_PER_DATAPATH {
            let world = World::random(&mut rng);
            let yaml = world.yaml();
            let policy = load_str(Path::new("random.yaml"), &yaml).unwrap_or_else(|e| {
                panic!("seed {seed}: the generator wrote an invalid policy:\n{e}\n{yaml}")
            });
            let compiled = compile(&policy, &world.gateways).expect("a small policy compiles");
            kernel
                .datapath
                .set_audit(world.audit)
                .expect("setting audit mode");
            kernel
                .datapath
                .install(compiled.clone())
                .expect("installing the policy");
            host.audit = world.audit;
            history.new_policy();
            for f in 0..FRAMES_PER_POLICY {
                let (frame, mut hook) = history.next_case(&mut rng, &world);
                let mut bytes = frame.bytes();
                let damaged = maybe_damage(&mut rng, &mut bytes);
                if tc_refuses(&bytes) {
                    hook = Hook::FromDevice;
                }
                let theirs = kernel.run(hook, &bytes);
                let ours = host.judge(&compiled, hook, &bytes);
                if theirs.as_ref() != Ok(&ours) {
                    let theirs = theirs.map_or_else(|e| format!("error: {e}"), |v| v.to_string());
                    panic!(
                        "kernel and host disagree (seed {seed}: datapath {d}, policy {p}, frame {f})\n\
                         hook:   {hook:?}\nframe:  {}\nkernel: {theirs}\nhost:   {ours}\n\
                         agent audit mode: {}; gateway addresses: {:?}\npolicy:\n{yaml}\n\
                         replay with SEGWARD_DIFF_SEED={seed}",
                        hex(&bytes),
                        world.audit,
                        world.gateways,
                    );
                }
                if !damaged {
                    history.record(frame, hook, ours);
                }
                *tally.entry((ours.reason.name(), ours.audited)).or_default() += 1;
            }
        }
        assert!(
            born.elapsed() < MAX_DATAPATH_AGE,
            "a datapath lived {:?}: flows could have timed out in the kernel only; \
             lower POLICIES_PER_DATAPATH",
            born.elapsed()
        );
    }
    println!(
        "seed {seed}: {} policies, {} frames in {:?}; verdicts (reason, audited):",
        DATAPATHS * POLICIES_PER_DATAPATH,
        DATAPATHS * POLICIES_PER_DATAPATH * FRAMES_PER_POLICY,
        started.elapsed()
    );
    for ((reason, audited), count) in &tally {
        println!(
            "  {reason}{}: {count}",
            if *audited { " (audited)" } else { "" }
        );
    }
    // A generator that never reaches some verdict would test that much less.
    for reason in Reason::ALL {
        assert!(
            tally.keys().any(|(name, _)| *name == reason.name()),
            "seed {seed}: no frame was judged {}; the generator needs tuning",
            reason.name()
        );
    }
}
