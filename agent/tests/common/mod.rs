//! Shared by the privileged datapath tests: a frame builder, the kernel's verdict as
//! BPF_PROG_TEST_RUN and the counters report it, and the host reference verdict (the same
//! decision logic over a compiled policy and a flow table of its own).

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use agent_ebpf::{
    maps::{
        AddrKey, Config, DatagramEntry, DatagramKey, Endpoint, FlowEntry, FlowKey, PolicyKey,
        PolicyValue, SegmentKey, SegmentPolicy, ZoneIdentity, CONFIG_AUDIT,
    },
    parse::{parse, Packet},
    verdict::{drop_reason, judge_from_device, judge_to_device, Reason, Tables},
};
use segward::{
    datapath::{Counters, Datapath, Hook, TestRun},
    policy::compile::CompiledPolicy,
};

/// The interface index the tests register as device-facing (nothing is attached to it).
pub const DEVICE_IFINDEX: u32 = 4242;
/// An interface index that is not device-facing: the uplink.
pub const UPLINK_IFINDEX: u32 = 7;

/// The source MAC of frames that were given none.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xff, 0xfe];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IPv6 extension header numbers the parser walks.
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_AUTH: u8 = 51;
pub const EXT_DEST_OPTS: u8 = 60;

/// Panics unless we may load BPF programs: these tests must never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads BPF programs and must run as root (e.g. `sudo -E cargo test ...`)"
    );
}

/// A loaded datapath with [`DEVICE_IFINDEX`] registered as device-facing.
pub fn load_datapath() -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("loading the BPF programs");
    datapath
        .add_device_ifindex(DEVICE_IFINDEX)
        .expect("registering the device-facing ifindex");
    datapath
}

/// BPF_PROG_TEST_RUN for tc refuses (EINVAL) an untagged IP frame shorter than its IP
/// header, which it pulls into the skb before the program runs.
pub fn tc_refuses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => frame.len() < ETH_HLEN + 20,
        ETH_P_IPV6 => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// An Ethernet frame, described by its headers. Checksums are left zero: nothing on the
/// judged path reads them.
#[derive(Clone, Debug)]
pub struct Frame {
    /// `None`: the test decides (the tables fill in a device's pinned MAC).
    pub src_mac: Option<[u8; 6]>,
    pub dst_mac: [u8; 6],
    /// TPIDs of VLAN tags, outermost first.
    pub tags: Vec<u16>,
    pub body: Body,
    /// Bytes after the last header.
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum Body {
    /// An ARP request whose sender MAC is the frame's source MAC.
    Arp {
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
    },
    Ip(IpPacket),
    /// Any other ethertype, with 46 bytes of zeroes.
    Ethertype(u16),
}

#[derive(Clone, Debug)]
pub struct IpPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 option words (4 bytes each, at most 10).
    pub option_words: u8,
    /// Fragment offset (8-octet units) and more-fragments flag, of the IPv4 header or of
    /// every IPv6 fragment header in `ext`.
    pub fragment: (u16, bool),
    /// IPv6 extension headers in order (`EXT_*`).
    pub ext: Vec<u8>,
    /// The identification of the IPv4 header (16 bits) or of every IPv6 fragment header.
    pub datagram_id: u32,
}

/// The IP identification of frames that were given none.
pub const DEFAULT_DATAGRAM_ID: u32 = 0x1234;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(u16, u16),
    Udp(u16, u16),
    Sctp(u16, u16),
    /// ICMP for IPv4, ICMPv6 for IPv6; `id` is the echo identifier (or the second word of
    /// any other type).
    Icmp {
        ty: u8,
        id: u16,
    },
    /// An ICMP/ICMPv6 error (or any type) with a code: its second word is zero, except for
    /// ICMPv6 packet too big (the MTU, 1280). The quoted packet is the frame's payload
    /// (see [`icmp_error`]).
    IcmpError {
        ty: u8,
        code: u8,
    },
    /// Any other protocol number, with 8 bytes of zeroes.
    Proto(u8),
}

pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Frame {
    ip_frame(src, dst, L4::Tcp(sport, dport))
}

pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Frame {
    ip_frame(src, dst, L4::Udp(sport, dport))
}

pub fn sctp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Frame {
    ip_frame(src, dst, L4::Sctp(sport, dport))
}

/// ICMP (IPv4) or ICMPv6 (IPv6) of type `ty`.
pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8) -> Frame {
    ip_frame(src, dst, L4::Icmp { ty, id: 0 })
}

pub fn echo(src: IpAddr, dst: IpAddr, id: u16) -> Frame {
    let ty = if src.is_ipv4() { 8 } else { 128 };
    ip_frame(src, dst, L4::Icmp { ty, id })
}

pub fn echo_reply(src: IpAddr, dst: IpAddr, id: u16) -> Frame {
    let ty = if src.is_ipv4() { 0 } else { 129 };
    ip_frame(src, dst, L4::Icmp { ty, id })
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) error of type `ty` and code `code` quoting the IP
/// packet of `quoted` (all of it: the frames here are far shorter than the quoting limits).
/// [`Frame::cut_payload`] shortens the quote.
pub fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &Frame) -> Frame {
    let mut frame = ip_frame(src, dst, L4::IcmpError { ty, code });
    frame.payload = quoted.ip_bytes();
    frame
}

pub fn proto(src: IpAddr, dst: IpAddr, protocol: u8) -> Frame {
    ip_frame(src, dst, L4::Proto(protocol))
}

pub fn ip_frame(src: IpAddr, dst: IpAddr, l4: L4) -> Frame {
    assert_eq!(
        src.is_ipv4(),
        dst.is_ipv4(),
        "{src} and {dst}: one family per packet"
    );
    Frame::new(Body::Ip(IpPacket {
        src,
        dst,
        l4,
        option_words: 0,
        fragment: (0, false),
        ext: Vec::new(),
        datagram_id: DEFAULT_DATAGRAM_ID,
    }))
}

/// A who-has for `target` from `sender`.
pub fn arp(sender: IpAddr, target: IpAddr) -> Frame {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("ARP is IPv4 only: {ip}"),
    };
    Frame {
        dst_mac: [0xff; 6],
        ..Frame::new(Body::Arp {
            sender_ip: v4(sender),
            target_ip: v4(target),
        })
    }
}

pub fn ethertype(ethertype: u16) -> Frame {
    Frame::new(Body::Ethertype(ethertype))
}

impl Frame {
    fn new(body: Body) -> Self {
        Frame {
            src_mac: None,
            dst_mac: GATEWAY_MAC,
            tags: Vec::new(),
            body,
            payload: Vec::new(),
        }
    }

    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.src_mac = Some(mac);
        self
    }

    /// Adds a VLAN tag with this TPID inside the ones already there.
    pub fn tag(mut self, tpid: u16) -> Self {
        self.tags.push(tpid);
        self
    }

    pub fn options(mut self, words: u8) -> Self {
        self.ip_mut().option_words = words;
        self
    }

    /// An IPv4 fragment, or with IPv6 an extension chain ending in a fragment header.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        let ip = self.ip_mut();
        ip.fragment = (offset, more);
        if ip.src.is_ipv6() && !ip.ext.contains(&EXT_FRAGMENT) {
            ip.ext.push(EXT_FRAGMENT);
        }
        self
    }

    /// The datagram's IP identification (16 bits in IPv4, 32 in IPv6 fragment headers).
    pub fn datagram_id(mut self, id: u32) -> Self {
        let ip = self.ip_mut();
        assert!(
            ip.src.is_ipv6() || id <= 0xffff,
            "an IPv4 identification has 16 bits: {id:#x}"
        );
        ip.datagram_id = id;
        self
    }

    /// Keeps the first `len` bytes after the last header (of an ICMP error: of its quote).
    pub fn cut_payload(mut self, len: usize) -> Self {
        self.payload.truncate(len);
        self
    }

    pub fn ext(mut self, headers: &[u8]) -> Self {
        self.ip_mut().ext = headers.to_vec();
        self
    }

    fn ip_mut(&mut self) -> &mut IpPacket {
        match &mut self.body {
            Body::Ip(ip) => ip,
            body => panic!("not an IP frame: {body:?}"),
        }
    }

    /// The packet of the other direction of this flow (echo requests become replies); its
    /// source MAC is left to the test.
    pub fn reply(&self) -> Frame {
        let Body::Ip(ip) = &self.body else {
            panic!("only IP frames have replies: {self:?}");
        };
        let l4 = match ip.l4 {
            L4::Tcp(s, d) => L4::Tcp(d, s),
            L4::Udp(s, d) => L4::Udp(d, s),
            L4::Sctp(s, d) => L4::Sctp(d, s),
            L4::Icmp { ty, id } => L4::Icmp {
                ty: match ty {
                    8 => 0,
                    0 => 8,
                    128 => 129,
                    129 => 128,
                    other => other,
                },
                id,
            },
            L4::IcmpError { ty, code } => L4::IcmpError { ty, code },
            L4::Proto(p) => L4::Proto(p),
        };
        Frame {
            src_mac: None,
            dst_mac: self.src_mac.unwrap_or(DEFAULT_MAC),
            tags: self.tags.clone(),
            body: Body::Ip(IpPacket {
                src: ip.dst,
                dst: ip.src,
                l4,
                ..ip.clone()
            }),
            payload: self.payload.clone(),
        }
    }

    pub fn src_ip(&self) -> Option<IpAddr> {
        match &self.body {
            Body::Ip(ip) => Some(ip.src),
            Body::Arp { sender_ip, .. } => Some(IpAddr::V4(*sender_ip)),
            Body::Ethertype(_) => None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.encode().0
    }

    /// The IP packet (or ARP payload): the frame without its Ethernet header and tags.
    pub fn ip_bytes(&self) -> Vec<u8> {
        self.bytes().split_off(ETH_HLEN + 4 * self.tags.len())
    }

    /// The end offset and name of each header, in order.
    pub fn layout(&self) -> Vec<(usize, &'static str)> {
        self.encode().1
    }

    fn encode(&self) -> (Vec<u8>, Vec<(usize, &'static str)>) {
        let mut out = Vec::with_capacity(128);
        let mut layout = Vec::new();
        let src_mac = self.src_mac.unwrap_or(DEFAULT_MAC);
        out.extend(self.dst_mac);
        out.extend(src_mac);
        for &tpid in &self.tags {
            out.extend(tpid.to_be_bytes());
            out.extend(7u16.to_be_bytes()); // VLAN 7
        }
        let ethertype = match &self.body {
            Body::Arp { .. } => ETH_P_ARP,
            Body::Ip(ip) if ip.src.is_ipv4() => ETH_P_IP,
            Body::Ip(_) => ETH_P_IPV6,
            Body::Ethertype(t) => *t,
        };
        out.extend(ethertype.to_be_bytes());
        // A tagged frame's ethertype ends its last tag.
        layout.push((ETH_HLEN, "Ethernet header"));
        for i in 0..self.tags.len() {
            layout.push((ETH_HLEN + 4 * (i + 1), "VLAN tag"));
        }
        match &self.body {
            Body::Arp {
                sender_ip,
                target_ip,
            } => {
                out.extend([0, 1, 0x08, 0x00, 6, 4, 0, 1]);
                out.extend(src_mac);
                out.extend(sender_ip.octets());
                out.extend([0; 6]);
                out.extend(target_ip.octets());
                layout.push((out.len(), "ARP"));
            }
            Body::Ip(ip) => ip.encode(&mut out, &mut layout, self.payload.len()),
            Body::Ethertype(_) => out.extend([0; 46]),
        }
        out.extend(&self.payload);
        (out, layout)
    }
}

impl IpPacket {
    fn encode(&self, out: &mut Vec<u8>, layout: &mut Vec<(usize, &'static str)>, payload: usize) {
        let v4 = self.src.is_ipv4();
        let (protocol, l4) = self.l4.encode(v4);
        let (offset, more) = self.fragment;
        let fragment = (offset << 3) | u16::from(more);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let header_len = 20 + 4 * usize::from(self.option_words);
                let total = (header_len + l4.len() + payload) as u16;
                out.extend([0x40 | (header_len / 4) as u8, 0]);
                out.extend(total.to_be_bytes());
                out.extend((self.datagram_id as u16).to_be_bytes());
                out.extend(((offset & 0x1fff) | if more { 0x2000 } else { 0 }).to_be_bytes());
                out.extend([64, protocol, 0, 0]);
                out.extend(src.octets());
                out.extend(dst.octets());
                layout.push((out.len(), "IPv4 header"));
                if self.option_words > 0 {
                    out.resize(out.len() + 4 * usize::from(self.option_words), 1); // NOPs
                    layout.push((out.len(), "IPv4 options"));
                }
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let chain: usize = self.ext.iter().map(|&h| ext_len(h)).sum();
                let payload_len = (chain + l4.len() + payload) as u16;
                let first = self.ext.first().copied().unwrap_or(protocol);
                out.extend([0x60, 0, 0, 0]);
                out.extend(payload_len.to_be_bytes());
                out.extend([first, 64]);
                out.extend(src.octets());
                out.extend(dst.octets());
                layout.push((out.len(), "IPv6 header"));
                for (i, &header) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).copied().unwrap_or(protocol);
                    let start = out.len();
                    out.resize(start + ext_len(header), 0);
                    out[start] = next;
                    match header {
                        EXT_AUTH => out[start + 1] = 1, // (1 + 2) * 4 = 12 bytes
                        EXT_FRAGMENT => {
                            out[start + 2..start + 4].copy_from_slice(&fragment.to_be_bytes());
                            out[start + 4..start + 8]
                                .copy_from_slice(&self.datagram_id.to_be_bytes());
                        }
                        _ => {} // 0: (0 + 1) * 8 = 8 bytes
                    }
                    layout.push((out.len(), "IPv6 extension header"));
                }
            }
            _ => panic!("{} and {}: one family per packet", self.src, self.dst),
        }
        out.extend(&l4);
        layout.push((out.len(), self.l4.name(v4)));
    }
}

fn ext_len(header: u8) -> usize {
    if header == EXT_AUTH {
        12
    } else {
        8
    }
}

impl L4 {
    /// Protocol number and header bytes.
    fn encode(self, v4: bool) -> (u8, Vec<u8>) {
        let ports = |s: u16, d: u16, len: usize| {
            let mut h = vec![0; len];
            h[0..2].copy_from_slice(&s.to_be_bytes());
            h[2..4].copy_from_slice(&d.to_be_bytes());
            h
        };
        match self {
            L4::Tcp(s, d) => {
                let mut h = ports(s, d, 20);
                h[12] = 0x50; // data offset 5
                h[13] = 0x02; // SYN
                (6, h)
            }
            L4::Udp(s, d) => {
                let mut h = ports(s, d, 8);
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                (17, h)
            }
            L4::Sctp(s, d) => (132, ports(s, d, 12)),
            L4::Icmp { ty, id } => {
                let mut h = vec![ty, 0, 0, 0, 0, 0, 0, 1];
                h[4..6].copy_from_slice(&id.to_be_bytes());
                (if v4 { 1 } else { 58 }, h)
            }
            L4::IcmpError { ty, code } => {
                let mut h = vec![ty, code, 0, 0, 0, 0, 0, 0];
                if !v4 && ty == 2 {
                    h[4..8].copy_from_slice(&1280u32.to_be_bytes());
                }
                (if v4 { 1 } else { 58 }, h)
            }
            L4::Proto(p) => (p, vec![0; 8]),
        }
    }

    fn name(self, v4: bool) -> &'static str {
        match self {
            L4::Tcp(..) => "TCP header",
            L4::Udp(..) => "UDP header",
            L4::Sctp(..) => "SCTP header",
            L4::Icmp { .. } | L4::IcmpError { .. } if v4 => "ICMP header",
            L4::Icmp { .. } | L4::IcmpError { .. } => "ICMPv6 header",
            L4::Proto(_) => "payload",
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What happened to a frame: passed or dropped, and which counter it was counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub passes: bool,
    pub reason: Reason,
    /// A would-be drop that audit mode let pass.
    pub audited: bool,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match (self.passes, self.audited) {
            (true, false) => "pass",
            (true, true) => "pass (audited)",
            (false, false) => "drop",
            // Audited means passed: only a broken datapath does this.
            (false, true) => "drop, yet counted as audited",
        };
        write!(f, "{verdict} {}", self.reason.name())
    }
}

/// The kernel side: runs frames through the loaded programs and tells from the counters
/// why each passed or dropped.
pub struct Kernel {
    pub datapath: Datapath,
    counters: Counters,
}

impl Kernel {
    pub fn new(datapath: Datapath) -> Self {
        let counters = datapath.counters().expect("reading counters");
        Kernel { datapath, counters }
    }

    /// Runs `frame` once; `Err` when the kernel refuses to run it or the counters do not
    /// show exactly one decision.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> Result<Verdict, String> {
        let result = self
            .datapath
            .test_run(TestRun {
                hook,
                frame,
                repeat: 1,
            })
            .map_err(|e| e.to_string())?;
        let counters = self.datapath.counters().map_err(|e| e.to_string())?;
        let moved: Vec<(Reason, bool)> = counters
            .iter()
            .zip(&self.counters)
            .flat_map(
                |(&(reason, enforced, audited), &(_, was_enforced, was_audited))| {
                    let times = |now: u64, was: u64| (now - was) as usize;
                    std::iter::repeat_n((reason, false), times(enforced, was_enforced)).chain(
                        std::iter::repeat_n((reason, true), times(audited, was_audited)),
                    )
                },
            )
            .collect();
        self.counters = counters;
        match moved[..] {
            [(reason, audited)] => Ok(Verdict {
                passes: result.passes(hook),
                reason,
                audited,
            }),
            _ => Err(format!(
                "action {} but the counters moved by {moved:?}",
                result.action
            )),
        }
    }
}

/// The host reference: the shared decision logic over a compiled policy and its own flow
/// table, fed the same frames in the same order as the kernel.
#[derive(Default)]
pub struct Host {
    flows: RefCell<HashMap<FlowKey, FlowEntry>>,
    datagrams: RefCell<HashMap<DatagramKey, DatagramEntry>>,
    /// Whole-agent audit mode, as `Datapath::set_audit`.
    pub audit: bool,
}

/// The compiled policy (generation 0, as compiled) plus the host's flow table.
struct HostTables<'a> {
    policy: &'a CompiledPolicy,
    flows: &'a RefCell<HashMap<FlowKey, FlowEntry>>,
    datagrams: &'a RefCell<HashMap<DatagramKey, DatagramEntry>>,
}

impl Tables for HostTables<'_> {
    fn endpoint(&self, key: &AddrKey) -> Option<Endpoint> {
        self.policy.endpoint(key)
    }

    fn zone(&self, key: &AddrKey) -> Option<ZoneIdentity> {
        self.policy.zone(key)
    }

    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy> {
        self.policy.segment(key)
    }

    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        self.policy.policy(key)
    }

    fn tracked(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.borrow().get(key).copied()
    }

    fn track(&self, key: &FlowKey, entry: &FlowEntry) {
        self.flows.borrow_mut().insert(*key, *entry);
    }

    fn update(&self, key: &FlowKey, change: impl FnOnce(&mut FlowEntry)) -> bool {
        self.flows.borrow_mut().get_mut(key).map(change).is_some()
    }

    fn datagram(&self, key: &DatagramKey) -> Option<DatagramEntry> {
        self.datagrams.borrow().get(key).copied()
    }

    fn track_datagram(&self, key: &DatagramKey, entry: &DatagramEntry) {
        self.datagrams.borrow_mut().insert(*key, *entry);
    }
}

impl Host {
    /// Judges `frame` as the kernel hook `hook` would, against `policy`.
    pub fn judge(&self, policy: &CompiledPolicy, hook: Hook, frame: &[u8]) -> Verdict {
        let config = Config {
            // Host tables hold the compiled generation 0, whichever slot the kernel uses.
            generation: 0,
            flags: if self.audit { CONFIG_AUDIT } else { 0 },
            // No epoch: no flow entry is ever taken on its own, every packet is judged in
            // full, so the kernel's cached verdicts are checked against fresh ones.
            epoch: 0,
            ..Config::default()
        };
        let tables = HostTables {
            policy,
            flows: &self.flows,
            datagrams: &self.datagrams,
        };
        // The tests keep each datapath far younger than the shortest conntrack timeout (30 s):
        // nothing expires on either side, so the host needs no clock.
        let now_ns = 0;
        let decision = match parse(&Packet::from_slice(frame)) {
            Ok(parsed) => match hook {
                Hook::FromDevice => judge_from_device(&tables, &config, &parsed, now_ns),
                Hook::ToDevice { ingress_ifindex } => {
                    let from_device_iface = ingress_ifindex == DEVICE_IFINDEX;
                    judge_to_device(&tables, &config, &parsed, from_device_iface, now_ns)
                }
            },
            Err(reason) => drop_reason(&config, reason),
        };
        Verdict {
            passes: decision.passes(),
            reason: decision.reason,
            audited: decision.audited,
        }
    }
}
