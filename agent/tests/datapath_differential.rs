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
//!
//! Some devices of a policy are quarantined (SPEC §2 rule 3) and some have learned addresses,
//! compiled in with `compile_with`.
//! Every frame judged as a new flow (allowed, default deny, quarantined) that the reference
//! evaluator can express is also judged by it, which must agree on the verdict, the reason
//! and audit. The frame mix includes further fragments of earlier datagrams and ICMP errors
//! quoting earlier packets, for kernel and host.

mod common;

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::{
    maps::{Config, FlowKey},
    parse::{parse, Packet, Parsed},
    verdict::{Reason, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP},
};
use common::*;
use ipnet::IpNet;
use segward::{
    datapath::Hook,
    policy::{
        compile::{compile_with, DeviceState},
        evaluate::{self, DenyReason, Evaluator, FlowDestination, FlowSource, Service},
        load::load_str,
        model::Policy,
    },
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
    /// The Quarantine document's `allow` rules, if the policy has one.
    quarantine: Option<Vec<Rule>>,
    /// Quarantined devices.
    quarantined: Vec<usize>,
    /// Addresses devices learned at run time (mostly free ones; now and then one that the
    /// policy binds to a device, which the compiler ignores for any other device).
    learned: Vec<(usize, IpAddr)>,
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
        let allow_rule = |rng: &mut Rng| {
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
        };
        for segment in &mut segments {
            segment.allow = (0..rng.range(0, 4)).map(|_| allow_rule(rng)).collect();
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
        let quarantine = rng
            .percent(70)
            .then(|| (0..rng.range(0, 3)).map(|_| allow_rule(rng)).collect());
        let mut learned = Vec::new();
        if device_count > 0 && rng.percent(40) {
            for _ in 0..rng.range(1, 3) {
                let d = rng.below(device_count);
                let statics: Vec<IpAddr> =
                    devices.iter().flat_map(|d| d.addresses.clone()).collect();
                let ip = if statics.is_empty() || rng.percent(80) {
                    free.swap_remove(rng.below(free.len()))
                } else {
                    rng.pick(&statics)
                };
                learned.push((d, ip));
            }
        }
        let quarantined = if rng.percent(50) {
            (0..device_count).filter(|_| rng.percent(35)).collect()
        } else {
            Vec::new()
        };
        World {
            segments,
            devices,
            zones,
            gateways,
            audit: rng.percent(10),
            quarantine,
            quarantined,
            learned,
        }
    }

    /// What the daemon knows beyond the policy.
    fn state(&self) -> DeviceState {
        let mut state = DeviceState {
            quarantined: self.quarantined_ids().into_iter().collect(),
            ..DeviceState::default()
        };
        for &(d, ip) in &self.learned {
            state
                .learned
                .entry(format!("dev-{d}"))
                .or_default()
                .insert(ip);
        }
        state
    }

    /// `policy` with the learned addresses bound statically, for the evaluator, which knows
    /// only static ones. A learned address bound statically to another device is not used.
    fn with_learned(&self, policy: &Policy) -> Policy {
        let mut model = policy.clone();
        let owner = |ip: IpAddr| {
            self.devices
                .iter()
                .position(|device| device.addresses.contains(&ip))
        };
        for &(d, ip) in &self.learned {
            if owner(ip).is_some_and(|o| o != d) {
                continue;
            }
            let id = format!("dev-{d}");
            let device = model
                .segments
                .iter_mut()
                .flat_map(|s| &mut s.devices)
                .find(|device| device.id == id)
                .expect("every device is in a segment");
            device.addresses.push(ip);
        }
        model
    }

    fn quarantined_ids(&self) -> Vec<String> {
        self.quarantined
            .iter()
            .map(|d| format!("dev-{d}"))
            .collect()
    }

    fn yaml(&self) -> String {
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
            format!("[{}]", quoted.join(", "))
        };
        let rule_yaml = |yaml: &mut String, peer_key: &str, rule: &Rule| {
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
                    rule_yaml(&mut yaml, peer_key, rule);
                }
            }
        }
        if let Some(rules) = &self.quarantine {
            yaml.push_str("---\nkind: Quarantine\n");
            if !rules.is_empty() {
                yaml.push_str("allow:\n");
            }
            for rule in rules {
                rule_yaml(&mut yaml, "to", rule);
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
            .flat_map(|s| s.allow.iter().chain(&s.accept))
            .chain(self.quarantine.iter().flatten());
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
            .flat_map(|&d| {
                let learned = self.learned.iter().filter(move |l| l.0 == d);
                let learned = learned.map(|l| l.1);
                self.devices[d].addresses.iter().copied().chain(learned)
            })
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
        let owner = self
            .devices
            .iter()
            .find(|d| d.addresses.contains(&src))
            .or_else(|| {
                let learned = self.learned.iter().find(|l| l.1 == src);
                learned.map(|l| &self.devices[l.0])
            });
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
        let quarantine = self.quarantine.as_deref().unwrap_or_default();
        // Now and then a Quarantine flow of a quarantined device.
        let quarantined = !self.quarantined.is_empty() && !quarantine.is_empty() && rng.percent(25);
        let accept = !quarantined
            && !segment.accept.is_empty()
            && (segment.allow.is_empty() || rng.percent(30));
        let rules = if quarantined {
            quarantine
        } else if accept {
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
        let members = if quarantined {
            &self.quarantined
        } else {
            &segment.devices
        };
        let members = family(self.addresses_of(members), v4);
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
        if rng.percent(10) {
            // The first fragment of a datagram, whose further fragments may follow.
            frame = frame.fragment(0, true).datagram_id(rng.range(1, 3) as u32);
        }
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
                    ip.datagram_id = rng.range(1, 3) as u32;
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
    /// First fragments that passed.
    first_fragments: Vec<(Frame, Hook)>,
    /// The length of `opened` when the current policy was installed.
    opened_before: usize,
}

impl History {
    /// The next test case: a reply (mostly of a flow that was opened), a flow some rule
    /// allows, or anything.
    fn next_case(&self, rng: &mut Rng, world: &World) -> (Frame, Hook) {
        if !self.sent.is_empty() && rng.percent(10) {
            // Mostly about datagrams and flows that passed.
            let fragments = rng.percent(50);
            let passed = if fragments {
                &self.first_fragments
            } else {
                &self.opened
            };
            let earlier = if passed.is_empty() || rng.percent(30) {
                &self.sent
            } else {
                passed
            };
            let (frame, hook) = &earlier[rng.below(earlier.len())];
            return if fragments {
                further_fragment(rng, world, frame, *hook)
            } else {
                icmp_error_about(rng, world, frame, *hook)
            };
        }
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
            Reason::DefaultDeny | Reason::Quarantined => verdict.audited,
            _ => false,
        };
        if opened {
            self.opened.push((frame.clone(), hook));
        }
        let first_fragment = matches!(&frame.body, Body::Ip(ip) if ip.fragment == (0, true));
        if first_fragment && verdict.passes {
            self.first_fragments.push((frame.clone(), hook));
        }
        self.sent.push((frame, hook));
    }
}

/// A fragment of `frame`'s datagram other than the first, the way `frame` went (mostly),
/// now and then of a neighbouring datagram.
fn further_fragment(rng: &mut Rng, world: &World, frame: &Frame, hook: Hook) -> (Frame, Hook) {
    let mut fragment = frame.clone();
    let Body::Ip(ip) = &mut fragment.body else {
        unreachable!("only IP frames are recorded");
    };
    ip.fragment = (rng.range(1, 8191) as u16, rng.percent(50));
    if rng.percent(20) {
        ip.datagram_id = rng.range(1, 3) as u32;
    }
    if ip.src.is_ipv6() && !ip.ext.contains(&EXT_FRAGMENT) {
        ip.ext.push(EXT_FRAGMENT);
    }
    if rng.percent(20) {
        fragment.src_mac = Some(world.mac(rng, ip.src));
    }
    let hook = if rng.percent(20) {
        random_hook(rng)
    } else {
        hook
    };
    (fragment, hook)
}

/// An ICMP error about `frame` (or about its reply), to the quoted packet's sender, from
/// its destination or any address; sometimes with its quote cut short.
fn icmp_error_about(rng: &mut Rng, world: &World, frame: &Frame, hook: Hook) -> (Frame, Hook) {
    let (quoted, hook) = if rng.percent(30) {
        let towards = match hook {
            Hook::FromDevice => Hook::ToDevice {
                ingress_ifindex: rng.pick(&[UPLINK_IFINDEX, 0]),
            },
            Hook::ToDevice { .. } => Hook::FromDevice,
        };
        (frame.reply(), towards)
    } else {
        (frame.clone(), hook)
    };
    let Body::Ip(ip) = &quoted.body else {
        unreachable!("only IP frames are recorded");
    };
    let v4 = ip.src.is_ipv4();
    let (ty, code) = if v4 {
        rng.pick(&[(3, 1), (3, 3), (11, 0), (12, 0), (5, 0), (4, 0)])
    } else {
        rng.pick(&[(1, 0), (1, 4), (2, 0), (3, 0), (4, 0), (137, 0)])
    };
    let from = if rng.percent(50) {
        ip.dst
    } else {
        world.address(rng, v4)
    };
    // The error comes back to the sender: towards a device if a device sent the packet.
    let hook = match hook {
        _ if rng.percent(20) => random_hook(rng),
        Hook::FromDevice => Hook::ToDevice {
            ingress_ifindex: rng.pick(&[UPLINK_IFINDEX, 0]),
        },
        Hook::ToDevice { .. } => Hook::FromDevice,
    };
    let mut error = icmp_error(from, ip.src, ty, code, &quoted);
    if rng.percent(15) {
        let len = rng.below(error.payload.len() + 1);
        error = error.cut_payload(len);
    }
    error.src_mac = Some(world.mac(rng, from));
    (error, hook)
}

/// The flow a frame opens, as the reference evaluator asks about it: `None` when the frame
/// is no new flow it models (not judged by the rules, not to a device from outside, a
/// protocol it has no word for).
fn evaluator_case(
    ev: &Evaluator,
    hook: Hook,
    bytes: &[u8],
) -> Option<(FlowSource, FlowDestination, Service)> {
    let Ok(Parsed::Ip(flow)) = parse(&Packet::from_slice(bytes)) else {
        return None;
    };
    let FlowKey {
        src,
        dst,
        protocol,
        dport,
        ..
    } = flow.tuple;
    let (src, dst) = (
        IpAddr::from(src).to_canonical(),
        IpAddr::from(dst).to_canonical(),
    );
    match hook {
        Hook::FromDevice => {}
        // Judged as a flow from outside the device network to a device.
        Hook::ToDevice { ingress_ifindex } if ingress_ifindex != DEVICE_IFINDEX => {
            if ev.owner(src).is_some() || ev.owner(dst).is_none() {
                return None;
            }
        }
        Hook::ToDevice { .. } => return None,
    }
    let service = match protocol {
        PROTO_TCP => Service::Tcp(dport),
        PROTO_UDP => Service::Udp(dport),
        PROTO_SCTP => Service::Sctp(dport),
        PROTO_ICMP => Service::Icmp,
        PROTO_ICMPV6 => Service::Icmpv6,
        _ => return None,
    };
    Some((
        FlowSource::Address(src),
        FlowDestination::Address(dst),
        service,
    ))
}

/// The evaluator's verdict in the datapath's terms (ignoring whole-agent audit mode).
fn evaluator_verdict(verdict: &evaluate::Verdict) -> (Reason, bool) {
    match verdict {
        evaluate::Verdict::Allow { .. } => (Reason::Allowed, false),
        evaluate::Verdict::Deny { reason, audited_by } => {
            let reason = match reason {
                DenyReason::UnknownDevice { .. } => Reason::UnknownDevice,
                DenyReason::DefaultDeny { .. } => Reason::DefaultDeny,
                DenyReason::Quarantined { .. } | DenyReason::DestinationQuarantined { .. } => {
                    Reason::Quarantined
                }
            };
            (reason, audited_by.is_some())
        }
    }
}

/// The evaluator's verdict as `segward explain` words it.
fn evaluator_text(verdict: &evaluate::Verdict) -> String {
    match verdict {
        evaluate::Verdict::Allow { rule, port } => {
            format!("allow ({} rule \"{}\", {port})", rule.kind(), rule.text())
        }
        evaluate::Verdict::Deny { reason, audited_by } => match audited_by {
            Some(segment) => format!(
                "deny {} (audited: {} is in audit mode)",
                reason.code(),
                segment.name
            ),
            None => format!("deny {}", reason.code()),
        },
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
    // Reason → new flows the evaluator judged too; (kind, reason) → frames.
    let mut evaluated: BTreeMap<&str, usize> = BTreeMap::new();
    let mut mix: BTreeMap<(&str, &str), usize> = BTreeMap::new();
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
            let compiled = compile_with(&policy, &world.gateways, &world.state())
                .expect("a small policy compiles");
            let model = world.with_learned(&policy);
            let ev =
                Evaluator::new(&model, &world.gateways).with_quarantined(world.quarantined_ids());
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
                         quarantined: {:?}; learned: {:?}\nreplay with SEGWARD_DIFF_SEED={seed}",
                        hex(&bytes),
                        world.audit,
                        world.gateways,
                        world.quarantined_ids(),
                        world.learned,
                    );
                }
                let new_flow = matches!(
                    ours.reason,
                    Reason::Allowed | Reason::DefaultDeny | Reason::Quarantined
                );
                if let Some((from, to, service)) =
                    evaluator_case(&ev, hook, &bytes).filter(|_| new_flow)
                {
                    let verdict = ev.judge(&from, &to, service).unwrap_or_else(|e| {
                        panic!("seed {seed}: the evaluator cannot judge {from:?} → {to:?}: {e}")
                    });
                    let (reason, audited) = evaluator_verdict(&verdict);
                    let audited = audited || (world.audit && reason != Reason::Allowed);
                    if (reason, audited) != (ours.reason, ours.audited) {
                        panic!(
                            "the evaluator disagrees (seed {seed}: datapath {d}, policy {p}, frame {f})\n\
                             hook:      {hook:?}\nframe:     {}\nflow:      {from:?} → {to:?} {service}\n\
                             kernel and host: {ours}\nevaluator: {}\n\
                             agent audit mode: {}; gateway addresses: {:?}; quarantined: {:?}; \
                             learned (dev, address): {:?}\npolicy:\n{yaml}\n\
                             replay with SEGWARD_DIFF_SEED={seed}",
                            hex(&bytes),
                            evaluator_text(&verdict),
                            world.audit,
                            world.gateways,
                            world.quarantined_ids(),
                            world.learned,
                        );
                    }
                    *evaluated.entry(reason.name()).or_default() += 1;
                }
                match parse(&Packet::from_slice(&bytes)) {
                    Ok(Parsed::Fragment(_)) => {
                        *mix.entry(("further fragments", ours.reason.name()))
                            .or_default() += 1
                    }
                    Ok(Parsed::Ip(flow)) if flow.related.is_some() => {
                        *mix.entry(("ICMP errors with a quote", ours.reason.name()))
                            .or_default() += 1
                    }
                    _ => {}
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
    let frames = DATAPATHS * POLICIES_PER_DATAPATH * FRAMES_PER_POLICY;
    println!(
        "seed {seed}: {} policies, {frames} frames in {:?}; verdicts (reason, audited):",
        DATAPATHS * POLICIES_PER_DATAPATH,
        started.elapsed()
    );
    for ((reason, audited), count) in &tally {
        println!(
            "  {reason}{}: {count}",
            if *audited { " (audited)" } else { "" }
        );
    }
    let compared: usize = evaluated.values().sum();
    println!("new flows also judged by the evaluator: {compared} {evaluated:?}");
    for ((kind, reason), count) in &mix {
        println!("  {kind}, {reason}: {count}");
    }
    // A generator that never reaches some verdict would test that much less.
    for reason in Reason::ALL {
        assert!(
            tally.keys().any(|(name, _)| *name == reason.name()),
            "seed {seed}: no frame was judged {}; the generator needs tuning",
            reason.name()
        );
    }
    assert!(
        compared > frames / 10,
        "seed {seed}: only {compared} of {frames} frames were compared with the evaluator"
    );
    for reason in [Reason::Allowed, Reason::DefaultDeny, Reason::Quarantined] {
        assert!(
            evaluated.contains_key(reason.name()),
            "seed {seed}: the evaluator judged no new flow {}; the generator needs tuning",
            reason.name()
        );
    }
    for kind in ["further fragments", "ICMP errors with a quote"] {
        assert!(
            mix.contains_key(&(kind, Reason::Reply.name())),
            "seed {seed}: none of the {kind} passed as a reply; the generator needs tuning"
        );
    }
}
