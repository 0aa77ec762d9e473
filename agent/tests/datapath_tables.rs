//! Test layer 2 (DESIGN.md): crafted frames through the real loaded programs with
//! BPF_PROG_TEST_RUN, each with the verdict SPEC §2 demands and the counter it must be
//! counted under. Every row is also judged by the host reference, which must agree.
//!
//! Rows run in order against one datapath: reply rows (and further fragments, ICMP errors)
//! rely on the flows and datagrams that earlier rows opened. The rows come in phases, each
//! installing its policy into that datapath: as compiled; with three devices quarantined
//! (`compile_with`); with the quarantine lifted; with the whole agent in audit mode.
//! Runs as root (it loads BPF programs).

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use agent_ebpf::{
    maps::{v4_mapped, AddrKey, DEVICE_IFACE_SLOT_COUNT},
    parse::{parse, Packet, Parsed, MAX_IPV6_EXT_HEADERS},
    verdict::Reason::{self, *},
};
use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use segward::{
    datapath::{Hook, TestRun},
    policy::{
        compile::{compile_with, CompiledPolicy, DeviceState, EntryChanges},
        load::load_str,
    },
};

const POLICY: &str = r#"
kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
    addresses: [10.20.1.11, "2001:db8:20:1::11"]
  - id: temp-002
    addresses: [10.20.1.12, "2001:db8:20:1::12"]
allow:
  - to: mqtt-broker
    ports: ["8883/tcp"]
  - to: historians
    ports: ["5000-5010/tcp"]
  - to: 10.0.0.0/16
    ports: ["123/udp", icmp]
  - to: "2001:db8:100::/48"
    ports: ["123/udp", icmpv6]
  - to: gateway
    ports: ["53/udp"]
---
kind: Segment
name: brokers
devices:
  - id: mqtt-broker
    mac: "02:00:00:00:20:01"
    addresses: [10.20.2.10, "2001:db8:20:2::10"]
allow:
  - to: cloud
    ports: ["443/tcp", "2905/sctp"]
accept:
  - from: ops-vpn
    ports: ["22/tcp"]
  - from: 198.51.100.0/24
    ports: ["8883/tcp"]
  - from: "2001:db8:cc::/48"
    ports: ["8883/tcp"]
---
kind: Segment
name: historians
devices:
  - id: hist-1
    addresses: [10.20.3.10, "2001:db8:20:3::10"]
allow:
  - to: sensors
    ports: [any]
  - to: "::/0"
    ports: ["443/tcp"]
---
kind: Segment
name: cameras
mode: audit
devices:
  - id: cam-1
    mac: "02:00:00:00:40:01"
    addresses: [10.20.4.10, "2001:db8:20:4::10"]
allow:
  - to: hist-1
    ports: ["554/tcp"]
---
kind: Segment
name: remediation
devices:
  - id: remediation-host
    addresses: [10.20.8.1, "2001:db8:20:8::1"]
---
kind: Quarantine
allow:
  - to: remediation
    ports: ["443/tcp"]
  - to: 198.18.0.0/24
    ports: ["80/tcp"]
  - to: "2001:db8:18::/48"
    ports: ["80/tcp"]
---
kind: Zone
name: ops-vpn
cidrs: [192.0.2.0/24, "2001:db8:9::/48"]
---
kind: Zone
name: cloud
cidrs: [198.51.100.0/24, "2001:db8:cc::/48", 10.20.3.0/24, "2001:db8:20:3::/64"]
"#;

const T1_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 0x01];
const BROKER_MAC: [u8; 6] = [2, 0, 0, 0, 0x20, 0x01];
const CAM_MAC: [u8; 6] = [2, 0, 0, 0, 0x40, 0x01];
/// Nobody's MAC.
const EVIL_MAC: [u8; 6] = [2, 0xee, 0xee, 0xee, 0xee, 0xee];

/// The hosts of the test network, in one address family.
struct Net {
    family: &'static str,
    t1: IpAddr,
    t2: IpAddr,
    broker: IpAddr,
    hist: IpAddr,
    cam: IpAddr,
    gateway: IpAddr,
    /// Near the gateway, but not one of its addresses.
    not_gateway: IpAddr,
    /// Inside the sensors' CIDR rule, and at its last address.
    ntp: IpAddr,
    ntp_edge: IpAddr,
    /// Just outside that CIDR.
    not_ntp: IpAddr,
    /// In zone ops-vpn.
    ops: IpAddr,
    /// In zone cloud.
    cloud: IpAddr,
    /// In no zone and no CIDR of the policy.
    world: IpAddr,
    /// In the sensors' subnet, bound to no device.
    unbound: IpAddr,
    /// remediation-host, which the Quarantine rules allow (443/tcp).
    remedy: IpAddr,
    /// Inside the Quarantine's CIDR rule (80/tcp).
    updates: IpAddr,
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const fn v6(s: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
    ))
}

const V4: Net = Net {
    family: "IPv4",
    t1: v4(10, 20, 1, 11),
    t2: v4(10, 20, 1, 12),
    broker: v4(10, 20, 2, 10),
    hist: v4(10, 20, 3, 10),
    cam: v4(10, 20, 4, 10),
    gateway: v4(10, 20, 0, 1),
    not_gateway: v4(10, 20, 0, 2),
    ntp: v4(10, 0, 0, 9),
    ntp_edge: v4(10, 0, 255, 255),
    not_ntp: v4(10, 1, 0, 0),
    ops: v4(192, 0, 2, 5),
    cloud: v4(198, 51, 100, 7),
    world: v4(203, 0, 113, 9),
    unbound: v4(10, 20, 1, 99),
    remedy: v4(10, 20, 8, 1),
    updates: v4(198, 18, 0, 80),
};

const V6: Net = Net {
    family: "IPv6",
    t1: v6([0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0x11]),
    t2: v6([0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0x12]),
    broker: v6([0x2001, 0xdb8, 0x20, 2, 0, 0, 0, 0x10]),
    hist: v6([0x2001, 0xdb8, 0x20, 3, 0, 0, 0, 0x10]),
    cam: v6([0x2001, 0xdb8, 0x20, 4, 0, 0, 0, 0x10]),
    gateway: v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1]),
    not_gateway: v6([0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 2]),
    ntp: v6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 9]),
    ntp_edge: v6([0x2001, 0xdb8, 0x100, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff]),
    not_ntp: v6([0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 0]),
    ops: v6([0x2001, 0xdb8, 9, 0, 0, 0, 0, 5]),
    cloud: v6([0x2001, 0xdb8, 0xcc, 0, 0, 0, 0, 7]),
    world: v6([0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 9]),
    unbound: v6([0x2001, 0xdb8, 0x20, 1, 0, 0, 0, 0x99]),
    remedy: v6([0x2001, 0xdb8, 0x20, 8, 0, 0, 0, 1]),
    updates: v6([0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x80]),
};

/// Devices with a pinned MAC: frames from their addresses carry it unless a row says
/// otherwise.
const PINNED: [(IpAddr, [u8; 6]); 6] = [
    (V4.t1, T1_MAC),
    (V6.t1, T1_MAC),
    (V4.broker, BROKER_MAC),
    (V6.broker, BROKER_MAC),
    (V4.cam, CAM_MAC),
    (V6.cam, CAM_MAC),
];

/// XDP on a device-facing interface: what devices send.
const FROM: Hook = Hook::FromDevice;
/// tc egress towards devices, for a frame from the uplink.
const UPLINK: Hook = Hook::ToDevice {
    ingress_ifindex: UPLINK_IFINDEX,
};
/// tc egress towards devices, for a frame the gateway itself sends.
const LOCAL: Hook = Hook::ToDevice { ingress_ifindex: 0 };
/// tc egress towards devices, for a frame that came in on a device-facing interface.
const DEVICE_SIDE: Hook = Hook::ToDevice {
    ingress_ifindex: DEVICE_IFINDEX,
};

const IPV6_UNSPECIFIED: IpAddr = v6([0; 8]);
const LINK_LOCAL: IpAddr = v6([0xfe80, 0, 0, 0, 0, 0, 0, 0x99]);
const GATEWAY_LINK_LOCAL: IpAddr = v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]);
const ALL_NODES: IpAddr = v6([0xff02, 0, 0, 0, 0, 0, 0, 1]);
const ALL_ROUTERS: IpAddr = v6([0xff02, 0, 0, 0, 0, 0, 0, 2]);
const DHCPV6_SERVERS: IpAddr = v6([0xff02, 0, 0, 0, 0, 0, 1, 2]);
const SOLICITED_NODE: IpAddr = v6([0xff02, 0, 0, 0, 0, 1, 0xff00, 0x11]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass(Reason),
    Drop(Reason),
    /// A would-be drop for `Reason` that audit mode lets pass.
    Audit(Reason),
}
use Expect::*;

impl Expect {
    fn verdict(self) -> Verdict {
        let (passes, reason, audited) = match self {
            Pass(r) => (true, r, false),
            Drop(r) => (false, r, false),
            Audit(r) => (true, r, true),
        };
        Verdict {
            passes,
            reason,
            audited,
        }
    }
}

struct Row {
    section: &'static str,
    name: String,
    hook: Hook,
    frame: Vec<u8>,
    expect: Expect,
}

/// Rows in order, each tagged with the SPEC rule it is about and prefixed with `prefix`.
#[derive(Default)]
struct Table {
    section: &'static str,
    prefix: &'static str,
    rows: Vec<Row>,
}

/// What a row sends: a described frame (given its device's pinned MAC unless it has one)
/// or raw bytes.
trait Wire {
    fn wire(self) -> Vec<u8>;
}

impl Wire for Frame {
    fn wire(mut self) -> Vec<u8> {
        if self.src_mac.is_none() {
            let src = self.src_ip();
            self.src_mac = PINNED.iter().find(|(ip, _)| Some(*ip) == src).map(|p| p.1);
        }
        self.bytes()
    }
}

impl Wire for Vec<u8> {
    fn wire(self) -> Vec<u8> {
        self
    }
}

impl Table {
    fn section(&mut self, section: &'static str) {
        self.section = section;
    }

    fn row(&mut self, name: impl AsRef<str>, hook: Hook, frame: impl Wire, expect: Expect) {
        let name = match self.prefix {
            "" => name.as_ref().to_owned(),
            prefix => format!("{prefix}: {}", name.as_ref()),
        };
        self.rows.push(Row {
            section: self.section,
            name,
            hook,
            frame: frame.wire(),
            expect,
        });
    }
}

/// Rows for one address family; the same flows in both, so v4 and v6 get the same rules.
#[rustfmt::skip]
fn family_rows(t: &mut Table, n: &Net) {
    t.prefix = n.family;
    let is_v4 = n.family == "IPv4";

    t.section("rule 1: VLAN tags");
    t.row("802.1Q tag, allowed flow", FROM, tcp(n.t1, n.broker, 40000, 8883).tag(ETH_P_8021Q), Pass(Allowed));
    t.row("802.1ad tag, allowed flow", FROM, tcp(n.t1, n.broker, 40000, 8883).tag(ETH_P_8021AD), Pass(Allowed));
    t.row("802.1Q tag, denied flow", FROM, tcp(n.t1, n.world, 40000, 8883).tag(ETH_P_8021Q), Drop(DefaultDeny));
    t.row("802.1Q tag towards a device, accepted flow", UPLINK, tcp(n.ops, n.broker, 50000, 22).tag(ETH_P_8021Q), Pass(Allowed));
    t.row("802.1ad + 802.1Q tags (QinQ)", FROM, tcp(n.t1, n.broker, 40000, 8883).tag(ETH_P_8021AD).tag(ETH_P_8021Q), Drop(NonIp));
    t.row("two 802.1Q tags", FROM, tcp(n.t1, n.broker, 40000, 8883).tag(ETH_P_8021Q).tag(ETH_P_8021Q), Drop(NonIp));
    t.row("two tags towards a device", UPLINK, tcp(n.ops, n.broker, 50000, 22).tag(ETH_P_8021AD).tag(ETH_P_8021Q), Drop(NonIp));

    t.section("rule 2: source identity");
    t.row("unbound source, TCP a device may open", FROM, tcp(n.unbound, n.broker, 40000, 8883), Drop(UnknownDevice));
    t.row("unbound source, UDP to the gateway", FROM, udp(n.unbound, n.gateway, 40000, 53), Drop(UnknownDevice));
    t.row("unbound source, echo", FROM, echo(n.unbound, n.ntp, 1), Drop(UnknownDevice));
    t.row("unbound source, other protocol", FROM, proto(n.unbound, n.hist, 47), Drop(UnknownDevice));
    t.row("the gateway's address as a device's source", FROM, tcp(n.gateway, n.broker, 40000, 8883), Drop(UnknownDevice));
    t.row("a zone address as a device's source", FROM, tcp(n.cloud, n.broker, 40000, 8883), Drop(UnknownDevice));
    t.row("temp-001 (pinned MAC) from another MAC", FROM, tcp(n.t1, n.broker, 40000, 8883).mac(EVIL_MAC), Drop(Spoof));
    t.row("temp-001 (pinned MAC) from the broker's MAC", FROM, tcp(n.t1, n.broker, 40000, 8883).mac(BROKER_MAC), Drop(Spoof));
    t.row("mqtt-broker (pinned MAC) from temp-001's MAC", FROM, tcp(n.broker, n.cloud, 40000, 443).mac(T1_MAC), Drop(Spoof));
    t.row("temp-002 (no pinned MAC) from any MAC", FROM, tcp(n.t2, n.broker, 40000, 8883).mac(EVIL_MAC), Pass(Allowed));
    if is_v4 {
        t.row("DHCP discover from 0.0.0.0", FROM, udp(v4(0, 0, 0, 0), v4(255, 255, 255, 255), 68, 67), Pass(Essential));
        t.row("DHCP request from an unbound address", FROM, udp(n.unbound, n.gateway, 68, 67), Pass(Essential));
        t.row("DHCP renewal from temp-001", FROM, udp(n.t1, n.gateway, 68, 67), Pass(Essential));
        t.row("DHCP from temp-001's address and another MAC", FROM, udp(n.t1, n.gateway, 68, 67).mac(EVIL_MAC), Drop(Spoof));
        t.row("unbound source, DHCP server port 67→68 (rogue server)", FROM, udp(n.unbound, v4(255, 255, 255, 255), 67, 68), Drop(UnknownDevice));
        t.row("unbound source, UDP 68→68", FROM, udp(n.unbound, n.gateway, 68, 68), Drop(UnknownDevice));
        t.row("unbound source, TCP 68→67", FROM, tcp(n.unbound, n.gateway, 68, 67), Drop(UnknownDevice));
    } else {
        t.row("DHCPv6 solicit from link-local", FROM, udp(LINK_LOCAL, DHCPV6_SERVERS, 546, 547), Pass(Essential));
        t.row("DHCPv6 from an unbound global address", FROM, udp(n.unbound, DHCPV6_SERVERS, 546, 547), Pass(Essential));
        t.row("router solicitation from link-local", FROM, icmp(LINK_LOCAL, ALL_ROUTERS, 133), Pass(Essential));
        t.row("neighbour solicitation (DAD) from ::", FROM, icmp(IPV6_UNSPECIFIED, SOLICITED_NODE, 135), Pass(Essential));
        t.row("neighbour advertisement from link-local", FROM, icmp(LINK_LOCAL, ALL_NODES, 136), Pass(Essential));
        t.row("neighbour solicitation from temp-001", FROM, icmp(n.t1, SOLICITED_NODE, 135), Pass(Essential));
        t.row("neighbour advertisement from temp-001's address and another MAC", FROM, icmp(n.t1, ALL_NODES, 136).mac(EVIL_MAC), Drop(Spoof));
        t.row("unbound source, router advertisement (rogue router)", FROM, icmp(LINK_LOCAL, ALL_NODES, 134), Drop(UnknownDevice));
        t.row("unbound source, redirect", FROM, icmp(LINK_LOCAL, ALL_NODES, 137), Drop(UnknownDevice));
        t.row("unbound source, DHCPv6 server port 547→546", FROM, udp(LINK_LOCAL, ALL_NODES, 547, 546), Drop(UnknownDevice));
        t.row("unbound source, echo from link-local", FROM, echo(LINK_LOCAL, n.gateway, 1), Drop(UnknownDevice));
    }

    t.section("rule 5: allow rules");
    let to_broker = tcp(n.t1, n.broker, 40001, 8883);
    t.row("temp-001 → mqtt-broker 8883/tcp (to: a device)", FROM, to_broker.clone(), Pass(Allowed));
    t.row("temp-002 → mqtt-broker 8883/tcp (to: a device)", FROM, tcp(n.t2, n.broker, 40001, 8883), Pass(Allowed));
    t.row("temp-001 → mqtt-broker 8884/tcp", FROM, tcp(n.t1, n.broker, 40001, 8884), Drop(DefaultDeny));
    t.row("temp-001 → mqtt-broker 8883/udp", FROM, udp(n.t1, n.broker, 40001, 8883), Drop(DefaultDeny));
    t.row("temp-001 → mqtt-broker echo", FROM, echo(n.t1, n.broker, 1), Drop(DefaultDeny));
    t.row("temp-001 → hist-1 5000/tcp (to: a segment, range start)", FROM, tcp(n.t1, n.hist, 40002, 5000), Pass(Allowed));
    t.row("temp-001 → hist-1 5007/tcp (inside the range)", FROM, tcp(n.t1, n.hist, 40002, 5007), Pass(Allowed));
    t.row("temp-001 → hist-1 5010/tcp (range end)", FROM, tcp(n.t1, n.hist, 40002, 5010), Pass(Allowed));
    t.row("temp-001 → hist-1 4999/tcp (below the range)", FROM, tcp(n.t1, n.hist, 40002, 4999), Drop(DefaultDeny));
    t.row("temp-001 → hist-1 5011/tcp (above the range)", FROM, tcp(n.t1, n.hist, 40002, 5011), Drop(DefaultDeny));
    t.row("temp-001 → hist-1 5000/udp", FROM, udp(n.t1, n.hist, 40002, 5000), Drop(DefaultDeny));
    t.row("temp-001 → hist-1 5000/sctp", FROM, sctp(n.t1, n.hist, 40002, 5000), Drop(DefaultDeny));
    let ntp_query = udp(n.t1, n.ntp, 40003, 123);
    t.row("temp-001 → NTP 123/udp (to: a CIDR)", FROM, ntp_query.clone(), Pass(Allowed));
    t.row("temp-001 → last address of the CIDR 123/udp", FROM, udp(n.t1, n.ntp_edge, 40003, 123), Pass(Allowed));
    t.row("temp-001 → just outside the CIDR 123/udp", FROM, udp(n.t1, n.not_ntp, 40003, 123), Drop(DefaultDeny));
    t.row("temp-001 → NTP 124/udp", FROM, udp(n.t1, n.ntp, 40003, 124), Drop(DefaultDeny));
    t.row("temp-001 → NTP 123/tcp", FROM, tcp(n.t1, n.ntp, 40003, 123), Drop(DefaultDeny));
    let ping = echo(n.t1, n.ntp, 0x0101);
    t.row("temp-001 → NTP echo (icmp rule)", FROM, ping.clone(), Pass(Allowed));
    t.row("temp-001 → NTP other ICMP type (icmp rule)", FROM, icmp(n.t1, n.ntp, if is_v4 { 13 } else { 139 }), Pass(Allowed));
    t.row("temp-001 → just outside the CIDR echo", FROM, echo(n.t1, n.not_ntp, 0x0101), Drop(DefaultDeny));
    t.row("temp-001 → NTP with the other family's ICMP number", FROM, proto(n.t1, n.ntp, if is_v4 { 58 } else { 1 }), Drop(DefaultDeny));
    let dns = udp(n.t1, n.gateway, 40004, 53);
    t.row("temp-001 → gateway 53/udp (to: gateway)", FROM, dns.clone(), Pass(Allowed));
    t.row("temp-001 → gateway 53/tcp", FROM, tcp(n.t1, n.gateway, 40004, 53), Drop(DefaultDeny));
    t.row("temp-001 → next to the gateway 53/udp", FROM, udp(n.t1, n.not_gateway, 40004, 53), Drop(DefaultDeny));
    let to_cloud = tcp(n.broker, n.cloud, 40005, 443);
    t.row("mqtt-broker → cloud 443/tcp (to: a zone)", FROM, to_cloud.clone(), Pass(Allowed));
    t.row("mqtt-broker → cloud 2905/sctp (to: a zone)", FROM, sctp(n.broker, n.cloud, 40005, 2905), Pass(Allowed));
    t.row("mqtt-broker → cloud 2906/sctp", FROM, sctp(n.broker, n.cloud, 40005, 2906), Drop(DefaultDeny));
    t.row("mqtt-broker → cloud 80/tcp", FROM, tcp(n.broker, n.cloud, 40005, 80), Drop(DefaultDeny));
    t.row("mqtt-broker → hist-1 443/tcp (zone covers a device)", FROM, tcp(n.broker, n.hist, 40005, 443), Pass(Allowed));
    t.row("mqtt-broker → temp-001 443/tcp (not in the zone)", FROM, tcp(n.broker, n.t1, 40005, 443), Drop(DefaultDeny));
    t.row("mqtt-broker → ops-vpn 443/tcp (another zone)", FROM, tcp(n.broker, n.ops, 40005, 443), Drop(DefaultDeny));
    t.row("hist-1 → temp-001 TCP (any)", FROM, tcp(n.hist, n.t1, 40006, 1234), Pass(Allowed));
    t.row("hist-1 → temp-002 UDP (any)", FROM, udp(n.hist, n.t2, 40006, 9), Pass(Allowed));
    t.row("hist-1 → temp-001 SCTP (any)", FROM, sctp(n.hist, n.t1, 40006, 9), Pass(Allowed));
    t.row("hist-1 → temp-001 echo (any)", FROM, echo(n.hist, n.t1, 7), Pass(Allowed));
    t.row("hist-1 → temp-001 GRE (any)", FROM, proto(n.hist, n.t1, 47), Pass(Allowed));
    t.row("hist-1 → mqtt-broker TCP", FROM, tcp(n.hist, n.broker, 40006, 8883), Drop(DefaultDeny));
    t.row("temp-001 → temp-002 8883/tcp (same segment, no rule)", FROM, tcp(n.t1, n.t2, 40007, 8883), Drop(DefaultDeny));
    t.row("temp-001 → temp-002 echo (same segment, no rule)", FROM, echo(n.t1, n.t2, 7), Drop(DefaultDeny));
    if is_v4 {
        t.row("hist-1 → IPv4 world 443/tcp (an IPv6 CIDR ::/0 is no IPv4 target)", FROM, tcp(n.hist, n.world, 40008, 443), Drop(DefaultDeny));
    } else {
        t.row("hist-1 → IPv6 world 443/tcp (to: ::/0)", FROM, tcp(n.hist, n.world, 40008, 443), Pass(Allowed));
    }

    t.section("rule 5: accept rules");
    let ssh = tcp(n.ops, n.broker, 50000, 22);
    t.row("ops-vpn → mqtt-broker 22/tcp (from: a zone)", UPLINK, ssh.clone(), Pass(Allowed));
    t.row("ops-vpn → mqtt-broker 23/tcp", UPLINK, tcp(n.ops, n.broker, 50000, 23), Drop(DefaultDeny));
    t.row("ops-vpn → mqtt-broker 22/udp", UPLINK, udp(n.ops, n.broker, 50000, 22), Drop(DefaultDeny));
    t.row("world → mqtt-broker 22/tcp", UPLINK, tcp(n.world, n.broker, 50000, 22), Drop(DefaultDeny));
    t.row("ops-vpn → temp-001 22/tcp (another segment)", UPLINK, tcp(n.ops, n.t1, 50000, 22), Drop(DefaultDeny));
    t.row("cloud → mqtt-broker 8883/tcp (from: a CIDR)", UPLINK, tcp(n.cloud, n.broker, 50001, 8883), Pass(Allowed));
    t.row("world → mqtt-broker 8883/tcp", UPLINK, tcp(n.world, n.broker, 50001, 8883), Drop(DefaultDeny));
    t.row("the gateway itself → mqtt-broker 22/tcp", LOCAL, tcp(n.gateway, n.broker, 50002, 22), Drop(DefaultDeny));
    t.row("ops-vpn → an address that is no device", UPLINK, tcp(n.ops, n.unbound, 50000, 22), Drop(DefaultDeny));
    t.row("ops-vpn → hist-1 TCP (hist-1 accepts nothing)", UPLINK, tcp(n.ops, n.hist, 50000, 5000), Drop(DefaultDeny));
    if is_v4 {
        t.row("gateway → broadcast DHCP offer", LOCAL, udp(n.gateway, v4(255, 255, 255, 255), 67, 68), Pass(Essential));
        t.row("gateway → temp-001 DHCP ack", LOCAL, udp(n.gateway, n.t1, 67, 68), Pass(Essential));
        t.row("gateway → temp-001 UDP 68→67 (not a server reply)", LOCAL, udp(n.gateway, n.t1, 68, 67), Drop(DefaultDeny));
        t.row("gateway ARP towards devices", LOCAL, arp(n.gateway, n.t1), Pass(Essential));
    } else {
        t.row("gateway → all nodes router advertisement", LOCAL, icmp(GATEWAY_LINK_LOCAL, ALL_NODES, 134), Pass(Essential));
        t.row("gateway → temp-001 neighbour solicitation", LOCAL, icmp(n.gateway, n.t1, 135), Pass(Essential));
        t.row("gateway → temp-001 neighbour advertisement", LOCAL, icmp(n.gateway, n.t1, 136), Pass(Essential));
        t.row("gateway → link-local DHCPv6 reply", LOCAL, udp(GATEWAY_LINK_LOCAL, LINK_LOCAL, 547, 546), Pass(Essential));
        t.row("gateway → temp-001 redirect", LOCAL, icmp(n.gateway, n.t1, 137), Drop(DefaultDeny));
    }
    t.row("gateway → unbound address TCP", LOCAL, tcp(n.gateway, n.unbound, 50003, 22), Drop(DefaultDeny));

    t.section("rule 4: replies");
    t.row("mqtt-broker's reply to temp-001 (device to device)", FROM, to_broker.reply(), Pass(Reply));
    t.row("...and on its way out to temp-001 (judged at XDP)", DEVICE_SIDE, to_broker.reply(), Pass(Forwarded));
    t.row("mqtt-broker → temp-001 on another port", FROM, tcp(n.broker, n.t1, 8883, 40999), Drop(DefaultDeny));
    t.row("NTP reply from the uplink", UPLINK, ntp_query.reply(), Pass(Reply));
    t.row("NTP reply to another port", UPLINK, udp(n.ntp, n.t1, 123, 40999), Drop(DefaultDeny));
    t.row("NTP 'reply' over TCP", UPLINK, tcp(n.ntp, n.t1, 123, 40003), Drop(DefaultDeny));
    t.row("echo reply, same identifier", UPLINK, ping.reply(), Pass(Reply));
    t.row("echo reply, another identifier", UPLINK, echo_reply(n.ntp, n.t1, 0x0102), Drop(DefaultDeny));
    t.row("echo reply from another host", UPLINK, echo_reply(n.not_ntp, n.t1, 0x0101), Drop(DefaultDeny));
    t.row("DNS reply from the gateway itself", LOCAL, dns.reply(), Pass(Reply));
    t.row("cloud's reply to mqtt-broker", UPLINK, to_cloud.reply(), Pass(Reply));
    t.row("mqtt-broker's reply to ops-vpn (accepted flow)", FROM, ssh.reply(), Pass(Reply));
    t.row("reply-looking TCP of a flow never allowed", UPLINK, tcp(n.world, n.t1, 443, 40001), Drop(DefaultDeny));
    let denied = tcp(n.t1, n.world, 40010, 443);
    t.row("temp-001 → world 443/tcp (denied)", FROM, denied.clone(), Drop(DefaultDeny));
    t.row("...its reply-looking answer", UPLINK, denied.reply(), Drop(DefaultDeny));
    t.row("from a device-facing interface to temp-002 (judged at XDP)", DEVICE_SIDE, tcp(n.t1, n.t2, 40011, 9999), Pass(Forwarded));
    t.row("from a device-facing interface, any source", DEVICE_SIDE, tcp(n.world, n.broker, 40011, 9999), Pass(Forwarded));

    // A flow whose reply passed is answered: its next packet is judged in full and caches
    // the verdict in an opener entry; the packets after pass on their flow entries alone.
    t.section("rule 4: answered flows");
    for round in ["", " again"] {
        t.row(format!("temp-001's next NTP query{round}"), FROM, ntp_query.clone(), Pass(Allowed));
        t.row(format!("...NTP's next reply{round}"), UPLINK, ntp_query.reply(), Pass(Reply));
        t.row(format!("temp-001's next packet to mqtt-broker{round} (device to device)"), FROM, to_broker.clone(), Pass(Allowed));
        t.row(format!("...mqtt-broker's next reply{round}"), FROM, to_broker.reply(), Pass(Reply));
        t.row(format!("ops-vpn's next packet of the accepted flow{round}"), UPLINK, ssh.clone(), Pass(Allowed));
        t.row(format!("...mqtt-broker's next reply{round}"), FROM, ssh.reply(), Pass(Reply));
    }
    t.row("temp-001's NTP query from another MAC (temp-001's is pinned)", FROM, ntp_query.clone().mac(EVIL_MAC), Drop(Spoof));
    t.row("mqtt-broker's reply to temp-001 from temp-001's MAC", FROM, to_broker.reply().mac(T1_MAC), Drop(Spoof));
    t.row("mqtt-broker's reply to ops-vpn from another MAC", FROM, ssh.reply().mac(EVIL_MAC), Drop(Spoof));
    t.row("NTP's reply, arriving on a device-facing interface (judged at XDP)", DEVICE_SIDE, ntp_query.reply(), Pass(Forwarded));
    t.row("temp-001's address from the uplink, on its flow to mqtt-broker (an XDP entry)", UPLINK, to_broker.clone(), Drop(DefaultDeny));

    t.section("rule 6: default deny");
    t.row("temp-001 → world 80/tcp", FROM, tcp(n.t1, n.world, 40012, 80), Drop(DefaultDeny));
    t.row("temp-001 → world GRE", FROM, proto(n.t1, n.world, 47), Drop(DefaultDeny));
    t.row("mqtt-broker → world echo", FROM, echo(n.broker, n.world, 3), Drop(DefaultDeny));
    t.row("hist-1 → gateway 53/udp", FROM, udp(n.hist, n.gateway, 40012, 53), Drop(DefaultDeny));
    t.row("world → temp-001 SYN", UPLINK, tcp(n.world, n.t1, 40012, 22), Drop(DefaultDeny));

    t.section("§2.6: audit segment");
    let audited = tcp(n.cam, n.world, 40013, 80);
    t.row("cam-1 → hist-1 554/tcp (allowed)", FROM, tcp(n.cam, n.hist, 40013, 554), Pass(Allowed));
    t.row("cam-1 → world 80/tcp (would be denied)", FROM, audited.clone(), Audit(DefaultDeny));
    t.row("...its reply", UPLINK, audited.reply(), Pass(Reply));
    t.row("cam-1 → mqtt-broker 8883/tcp (would be denied)", FROM, tcp(n.cam, n.broker, 40013, 8883), Audit(DefaultDeny));
    t.row("ops-vpn → cam-1 22/tcp (would be denied)", UPLINK, tcp(n.ops, n.cam, 50004, 22), Audit(DefaultDeny));

    t.section("rule 4: ICMP errors");
    icmp_error_rows(t, n, &to_broker);

    t.section("rule 7: fragments");
    // A datagram is (source, destination, IP id, protocol): its first fragment carries the
    // L4 header and is judged as a flow; the rest pass if and only if it passed.
    let first = tcp(n.t1, n.broker, 40020, 8883).datagram_id(0x1001);
    t.row("first fragment of an allowed flow", FROM, first.clone().fragment(0, true), Pass(Allowed));
    t.row("...its second fragment", FROM, first.clone().fragment(185, true), Pass(Reply));
    t.row("...its last fragment", FROM, first.clone().fragment(370, false), Pass(Reply));
    t.row("...its second fragment again (a duplicate)", FROM, first.clone().fragment(185, true), Pass(Reply));
    t.row("...its second fragment from another MAC (temp-001's is pinned)", FROM, first.clone().fragment(185, true).mac(EVIL_MAC), Drop(Spoof));
    t.row("a further fragment like its own, with another IP id", FROM, first.clone().datagram_id(0x1002).fragment(185, true), Drop(Fragment));
    t.row("a further fragment with its IP id, to another destination", FROM, tcp(n.t1, n.hist, 40020, 8883).datagram_id(0x1001).fragment(185, true), Drop(Fragment));
    t.row("a further fragment with its IP id, of another protocol", FROM, udp(n.t1, n.broker, 40020, 8883).datagram_id(0x1001).fragment(185, true), Drop(Fragment));
    t.row("a further fragment with its IP id, from another device", FROM, tcp(n.t2, n.broker, 40020, 8883).datagram_id(0x1001).fragment(185, true), Drop(Fragment));
    t.row("a further fragment with its IP id, the other way round", FROM, tcp(n.broker, n.t1, 8883, 40020).datagram_id(0x1001).fragment(185, true), Drop(Fragment));
    if !is_v4 {
        t.row("a further fragment whose 32-bit IP id differs above bit 16", FROM, first.clone().datagram_id(0x1_1001).fragment(185, true), Drop(Fragment));
    }
    let denied_first = tcp(n.t1, n.world, 40020, 8883).datagram_id(0x1003);
    t.row("first fragment of a denied flow", FROM, denied_first.clone().fragment(0, true), Drop(DefaultDeny));
    t.row("...its second fragment", FROM, denied_first.clone().fragment(185, true), Drop(Fragment));
    t.row("...its last fragment", FROM, denied_first.fragment(370, false), Drop(Fragment));
    t.row("non-first fragment, first fragment never seen (offset 1)", FROM, udp(n.t1, n.ntp, 40020, 123).datagram_id(0x1004).fragment(1, true), Drop(Fragment));
    t.row("non-first fragment of a tracked flow, its datagram's first fragment never seen", FROM, to_broker.clone().datagram_id(0x1005).fragment(185, false), Drop(Fragment));
    t.row("non-first fragment from an unbound source", FROM, udp(n.unbound, n.ntp, 40020, 123).datagram_id(0x1006).fragment(185, false), Drop(UnknownDevice));
    let audited_first = tcp(n.cam, n.world, 40020, 80).datagram_id(0x1007);
    t.row("first fragment of a flow an audit segment would deny", FROM, audited_first.clone().fragment(0, true), Audit(DefaultDeny));
    t.row("...its last fragment", FROM, audited_first.fragment(185, false), Audit(Fragment));
    t.row("non-first fragment from an audit segment, first fragment never seen", FROM, tcp(n.cam, n.world, 40020, 80).datagram_id(0x1008).fragment(185, false), Audit(Fragment));
    let accepted_first = tcp(n.ops, n.broker, 50020, 22).datagram_id(0x2001);
    t.row("towards a device: first fragment of an accepted flow", UPLINK, accepted_first.clone().fragment(0, true), Pass(Allowed));
    t.row("...its last fragment", UPLINK, accepted_first.clone().fragment(185, false), Pass(Reply));
    let reply_from_device = accepted_first.reply().datagram_id(0x2006);
    t.row("first fragment of mqtt-broker's reply to that accepted flow", FROM, reply_from_device.clone().fragment(0, true), Pass(Reply));
    t.row("last fragment of mqtt-broker's reply datagram, whose first fragment passed as a reply", FROM, reply_from_device.fragment(185, false), Pass(Reply));
    let reply_first = ntp_query.reply().datagram_id(0x2002);
    t.row("towards a device: first fragment of a reply of a tracked flow", UPLINK, reply_first.clone().fragment(0, true), Pass(Reply));
    t.row("towards a device: last fragment of NTP's reply datagram, whose first fragment passed as a reply", UPLINK, reply_first.fragment(185, false), Pass(Reply));
    let unaccepted_first = tcp(n.world, n.t1, 443, 40020).datagram_id(0x2003);
    t.row("towards a device: first fragment of a flow no rule accepts", UPLINK, unaccepted_first.clone().fragment(0, true), Drop(DefaultDeny));
    t.row("...its last fragment", UPLINK, unaccepted_first.fragment(185, false), Drop(Fragment));
    t.row("towards a device: non-first fragment, first fragment never seen", UPLINK, tcp(n.world, n.t1, 443, 40020).datagram_id(0x2004).fragment(185, false), Drop(Fragment));
    t.row("towards an address that is no device: non-first fragment", UPLINK, tcp(n.ops, n.unbound, 50020, 22).datagram_id(0x2005).fragment(185, false), Drop(DefaultDeny));
    if !is_v4 {
        let atomic = tcp(n.t1, n.broker, 40021, 8883).datagram_id(0x3001);
        t.row("atomic fragment (offset 0, last)", FROM, atomic.clone().fragment(0, false), Pass(Allowed));
        t.row("...a further fragment with its IP id (an atomic fragment is a whole datagram)", FROM, atomic.fragment(185, false), Drop(Fragment));
        let behind = tcp(n.t1, n.broker, 40022, 8883).ext(&[EXT_HOP_BY_HOP, EXT_DEST_OPTS]).datagram_id(0x3002);
        t.row("first fragment, fragment header after other extension headers", FROM, behind.clone().fragment(0, true), Pass(Allowed));
        t.row("...its last fragment", FROM, behind.fragment(185, false), Pass(Reply));
    }
}

/// ICMP errors (ICMP 3/11/12, ICMPv6 1-4) about a packet of a tracked flow continue it, in
/// both directions; any other ICMP error is a new ICMP flow. `to_broker` is a tracked flow
/// from temp-001 to mqtt-broker.
#[rustfmt::skip]
fn icmp_error_rows(t: &mut Table, n: &Net, to_broker: &Frame) {
    let is_v4 = n.family == "IPv4";
    let other = if is_v4 { &V6 } else { &V4 };
    // (name, type, code)
    let errors: &[(&str, u8, u8)] = if is_v4 {
        &[("host unreachable", 3, 1), ("port unreachable", 3, 3), ("time exceeded", 11, 0), ("parameter problem", 12, 0)]
    } else {
        &[("no route", 1, 0), ("port unreachable", 1, 4), ("packet too big", 2, 0), ("time exceeded", 3, 0), ("parameter problem", 4, 0)]
    };
    let (unreachable, port_unreachable) = if is_v4 { (3, 3) } else { (1, 4) };
    // Errors come from routers on the way as often as from the destination.
    let router = n.world;

    let udp_flow = udp(n.t1, n.ntp, 40060, 123);
    let tcp_flow = tcp(n.broker, n.cloud, 40061, 443);
    let echo_flow = echo(n.t1, n.ntp, 0x0606);
    t.row("temp-001 → NTP 123/udp", FROM, udp_flow.clone(), Pass(Allowed));
    t.row("mqtt-broker → cloud 443/tcp", FROM, tcp_flow.clone(), Pass(Allowed));
    t.row("temp-001 → NTP echo", FROM, echo_flow.clone(), Pass(Allowed));
    for (flow_name, flow, device) in [("temp-001's UDP flow", &udp_flow, n.t1), ("mqtt-broker's TCP flow", &tcp_flow, n.broker), ("temp-001's echo", &echo_flow, n.t1)] {
        for &(error, ty, code) in errors {
            t.row(format!("{error} ({ty}/{code}) from a router about {flow_name}"), UPLINK, icmp_error(router, device, ty, code, flow), Pass(Reply));
        }
    }
    t.row("port unreachable from NTP itself about temp-001's UDP flow", UPLINK, icmp_error(n.ntp, n.t1, unreachable, port_unreachable, &udp_flow), Pass(Reply));
    if is_v4 {
        t.row("port unreachable about temp-001's UDP flow, quote with IPv4 options", UPLINK, icmp_error(router, n.t1, unreachable, port_unreachable, &udp_flow.clone().options(2)), Pass(Reply));
    }

    t.row("unreachable about a flow never opened (temp-001 → world)", UPLINK, icmp_error(router, n.t1, unreachable, 0, &tcp(n.t1, n.world, 40062, 443)), Drop(DefaultDeny));
    let denied = tcp(n.t1, n.world, 40063, 443);
    t.row("temp-001 → world 443/tcp (denied)", FROM, denied.clone(), Drop(DefaultDeny));
    t.row("unreachable about that denied flow", UPLINK, icmp_error(router, n.t1, unreachable, 0, &denied), Drop(DefaultDeny));
    t.row("unreachable about temp-001's UDP flow, sent to temp-002", UPLINK, icmp_error(router, n.t2, unreachable, port_unreachable, &udp_flow), Drop(DefaultDeny));
    t.row("unreachable about temp-001's UDP flow, another source port quoted", UPLINK, icmp_error(router, n.t1, unreachable, port_unreachable, &udp(n.t1, n.ntp, 40999, 123)), Drop(DefaultDeny));
    t.row("unreachable about temp-001's UDP flow, another destination quoted", UPLINK, icmp_error(router, n.t1, unreachable, port_unreachable, &udp(n.t1, n.ntp_edge, 40060, 123)), Drop(DefaultDeny));
    t.row("unreachable about temp-001's UDP flow's ports over TCP", UPLINK, icmp_error(router, n.t1, unreachable, 0, &tcp(n.t1, n.ntp, 40060, 123)), Drop(DefaultDeny));
    t.row("unreachable about temp-001's echo, another identifier", UPLINK, icmp_error(router, n.t1, unreachable, 0, &echo(n.t1, n.ntp, 0x0607)), Drop(DefaultDeny));
    t.row("unreachable about mqtt-broker's TCP flow, sent to temp-001", UPLINK, icmp_error(router, n.t1, unreachable, 0, &tcp_flow), Drop(DefaultDeny));
    t.row(format!("redirect ({}) quoting temp-001's UDP flow (not an error about it)", if is_v4 { 5 } else { 137 }), UPLINK, icmp_error(router, n.t1, if is_v4 { 5 } else { 137 }, 0, &udp_flow), Drop(DefaultDeny));
    if is_v4 {
        t.row("source quench (4) quoting temp-001's UDP flow (not an error about it)", UPLINK, icmp_error(router, n.t1, 4, 0, &udp_flow), Drop(DefaultDeny));
    }

    let accepted = tcp(n.ops, n.broker, 50060, 22);
    t.row("ops-vpn → mqtt-broker 22/tcp (accepted)", UPLINK, accepted.clone(), Pass(Allowed));
    t.row("mqtt-broker's port unreachable about that accepted flow", FROM, icmp_error(n.broker, n.ops, unreachable, port_unreachable, &accepted), Pass(Reply));
    t.row("mqtt-broker's port unreachable about a flow ops-vpn never opened", FROM, icmp_error(n.broker, n.ops, unreachable, port_unreachable, &tcp(n.ops, n.broker, 50061, 22)), Drop(DefaultDeny));
    t.row("temp-001's port unreachable about NTP's reply", FROM, icmp_error(n.t1, n.ntp, unreachable, port_unreachable, &udp_flow.reply()), Pass(Reply));
    t.row("temp-001's port unreachable about an NTP packet of no flow (icmp rule)", FROM, icmp_error(n.t1, n.ntp, unreachable, port_unreachable, &udp(n.ntp, n.t1, 123, 40999)), Pass(Allowed));
    t.row("mqtt-broker's port unreachable about temp-001's flow to it (device to device)", FROM, icmp_error(n.broker, n.t1, unreachable, port_unreachable, to_broker), Pass(Reply));
    t.row("temp-002's unreachable to mqtt-broker about temp-001's flow", FROM, icmp_error(n.t2, n.broker, unreachable, 0, to_broker), Drop(DefaultDeny));

    // What cannot be read as a quoted packet leaves a plain ICMP packet, judged by the rules.
    let (ip_header, l4) = if is_v4 { (20, 8) } else { (40, 8) };
    let quote = |len: usize| icmp_error(router, n.t1, unreachable, port_unreachable, &udp_flow).cut_payload(len);
    t.row(format!("temp-001's UDP flow quoted in full ({} bytes), for comparison", ip_header + l4), UPLINK, quote(ip_header + l4), Pass(Reply));
    for (what, len) in [("no quote", 0), ("a quote cut inside its IP header", ip_header / 2), ("a quote of the IP header only", ip_header), ("a quote with 4 bytes of UDP header", ip_header + 4), ("a quote with 7 bytes of UDP header", ip_header + 7)] {
        t.row(format!("unreachable about temp-001's UDP flow with {what}"), UPLINK, quote(len), Drop(DefaultDeny));
    }
    let damaged = |at: usize, byte: u8| {
        let mut frame = icmp_error(router, n.t1, unreachable, port_unreachable, &udp_flow);
        frame.payload[at] = byte;
        frame
    };
    t.row("unreachable about temp-001's UDP flow, quote with another IP version", UPLINK, damaged(0, if is_v4 { 0x65 } else { 0x40 }), Drop(DefaultDeny));
    if is_v4 {
        t.row("unreachable about temp-001's UDP flow, quote with IHL 4", UPLINK, damaged(0, 0x44), Drop(DefaultDeny));
        t.row("unreachable about temp-001's UDP flow, quote with IHL 15", UPLINK, damaged(0, 0x4f), Drop(DefaultDeny));
    } else {
        t.row("unreachable about temp-001's UDP flow, quote behind an extension header (not walked)", UPLINK, icmp_error(router, n.t1, unreachable, port_unreachable, &udp_flow.clone().ext(&[EXT_DEST_OPTS])), Drop(DefaultDeny));
    }
    t.row(format!("unreachable quoting an {} packet", other.family), UPLINK, icmp_error(router, n.t1, unreachable, port_unreachable, &udp(other.t1, other.ntp, 40060, 123)), Drop(DefaultDeny));
    t.row("unreachable quoting an error about temp-001's UDP flow", UPLINK, icmp_error(router, n.t1, unreachable, 0, &icmp_error(n.t1, n.ntp, unreachable, 0, &udp_flow)), Drop(DefaultDeny));
    t.row("temp-001's port unreachable about NTP's reply, quote cut short (icmp rule)", FROM, icmp_error(n.t1, n.ntp, unreachable, port_unreachable, &udp_flow.reply()).cut_payload(ip_header + 4), Pass(Allowed));
    t.row("mqtt-broker's port unreachable about the accepted flow, quote cut short", FROM, icmp_error(n.broker, n.ops, unreachable, port_unreachable, &accepted).cut_payload(ip_header + 4), Drop(DefaultDeny));
}

/// SPEC §2 rule 3. `before` runs with the policy as compiled, `during` with mqtt-broker,
/// temp-002 and cam-1 quarantined, `lifted` with the policy as compiled again; all three
/// against the same conntrack.
#[rustfmt::skip]
fn quarantine_rows(before: &mut Table, during: &mut Table, lifted: &mut Table, n: &Net) {
    let is_v4 = n.family == "IPv4";
    for t in [&mut *before, &mut *during, &mut *lifted] {
        t.prefix = n.family;
        t.section("rule 3: quarantine");
    }
    let (unreachable, port_unreachable) = if is_v4 { (3, 3) } else { (1, 4) };

    // Flows opened before the quarantine, by and to the devices that will be quarantined.
    let t = before;
    let broker_cloud = tcp(n.broker, n.cloud, 40050, 443);
    let ops_ssh = tcp(n.ops, n.broker, 50050, 22);
    let t1_broker = tcp(n.t1, n.broker, 40051, 8883);
    let broker_hist = tcp(n.broker, n.hist, 40052, 443);
    let t2_ntp = udp(n.t2, n.ntp, 40053, 123);
    let hist_t2 = udp(n.hist, n.t2, 40054, 9);
    let t2_datagram = udp(n.t2, n.ntp, 40055, 123).datagram_id(0x4001);
    t.row("before: mqtt-broker → cloud 443/tcp", FROM, broker_cloud.clone(), Pass(Allowed));
    t.row("before: ops-vpn → mqtt-broker 22/tcp (accepted)", UPLINK, ops_ssh.clone(), Pass(Allowed));
    // Answered, so their verdicts are cached: the quarantine must still end them.
    t.row("before: cloud's reply", UPLINK, broker_cloud.reply(), Pass(Reply));
    t.row("before: mqtt-broker's reply to ops-vpn", FROM, ops_ssh.reply(), Pass(Reply));
    for round in ["", ", on its cached verdict"] {
        t.row(format!("before: mqtt-broker's next packet to cloud{round}"), FROM, broker_cloud.clone(), Pass(Allowed));
        t.row(format!("before: ops-vpn's next packet to mqtt-broker{round}"), UPLINK, ops_ssh.clone(), Pass(Allowed));
    }
    t.row("before: temp-001 → mqtt-broker 8883/tcp", FROM, t1_broker.clone(), Pass(Allowed));
    t.row("before: mqtt-broker → hist-1 443/tcp", FROM, broker_hist.clone(), Pass(Allowed));
    t.row("before: temp-002 → NTP 123/udp", FROM, t2_ntp.clone(), Pass(Allowed));
    t.row("before: hist-1 → temp-002 9/udp", FROM, hist_t2.clone(), Pass(Allowed));
    t.row("before: temp-002 → NTP 123/udp, first fragment", FROM, t2_datagram.clone().fragment(0, true), Pass(Allowed));
    t.row("before: mqtt-broker → remediation-host 443/tcp (no rule outside the quarantine)", FROM, tcp(n.broker, n.remedy, 40056, 443), Drop(DefaultDeny));
    t.row("before: ops-vpn → cam-1 22/tcp (audit segment)", UPLINK, tcp(n.ops, n.cam, 50051, 22), Audit(DefaultDeny));

    let t = during;
    let to_remedy = tcp(n.broker, n.remedy, 40056, 443);
    let to_updates = tcp(n.broker, n.updates, 40057, 80);
    t.row("mqtt-broker (quarantined) → remediation-host 443/tcp (Quarantine rule)", FROM, to_remedy.clone(), Pass(Allowed));
    t.row("...remediation-host's reply", FROM, to_remedy.reply(), Pass(Reply));
    t.row("...on its way out to mqtt-broker (judged at XDP)", DEVICE_SIDE, to_remedy.reply(), Pass(Forwarded));
    t.row("mqtt-broker (quarantined) → update server 80/tcp (Quarantine rule, a CIDR)", FROM, to_updates.clone(), Pass(Allowed));
    t.row("...the update server's reply from the uplink (a flow opened in quarantine)", UPLINK, to_updates.reply(), Pass(Reply));
    t.row("...mqtt-broker's next packet of it", FROM, to_updates.clone(), Pass(Allowed));
    t.row("...a router's unreachable about it", UPLINK, icmp_error(n.world, n.broker, unreachable, 0, &to_updates), Pass(Reply));
    t.row("mqtt-broker (quarantined) → remediation-host 8443/tcp", FROM, tcp(n.broker, n.remedy, 40056, 8443), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → remediation-host 443/udp", FROM, udp(n.broker, n.remedy, 40056, 443), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → update server 443/tcp", FROM, tcp(n.broker, n.updates, 40057, 443), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → cloud 443/tcp (its segment's rule)", FROM, tcp(n.broker, n.cloud, 40058, 443), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → cloud 2905/sctp (its segment's rule)", FROM, sctp(n.broker, n.cloud, 40058, 2905), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → hist-1 443/tcp (its segment's rule)", FROM, tcp(n.broker, n.hist, 40058, 443), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → world echo", FROM, echo(n.broker, n.world, 4), Drop(Quarantined));
    t.row("mqtt-broker (quarantined) → temp-002 (quarantined) 443/tcp", FROM, tcp(n.broker, n.t2, 40058, 443), Drop(Quarantined));
    t.row("temp-002 (quarantined) → NTP 123/udp (its segment's rule)", FROM, udp(n.t2, n.ntp, 40058, 123), Drop(Quarantined));
    t.row("temp-002 (quarantined) → remediation-host 443/tcp (Quarantine rule)", FROM, tcp(n.t2, n.remedy, 40058, 443), Pass(Allowed));
    t.row("temp-001 (same segment, not quarantined) → NTP 123/udp", FROM, udp(n.t1, n.ntp, 40058, 123), Pass(Allowed));
    t.row("temp-001 → mqtt-broker 8883/tcp (to: the quarantined device)", FROM, tcp(n.t1, n.broker, 40058, 8883), Drop(Quarantined));
    t.row("hist-1 → temp-002 9/udp (to: sensors, its quarantined member)", FROM, udp(n.hist, n.t2, 40058, 9), Drop(Quarantined));
    t.row("hist-1 → temp-001 9/udp (to: sensors)", FROM, udp(n.hist, n.t1, 40058, 9), Pass(Allowed));
    t.row("remediation-host → mqtt-broker 443/tcp (Quarantine rules go one way)", FROM, tcp(n.remedy, n.broker, 40058, 443), Drop(Quarantined));
    t.row("ops-vpn → mqtt-broker 22/tcp (its accept rule)", UPLINK, tcp(n.ops, n.broker, 50052, 22), Drop(Quarantined));
    t.row("cloud → mqtt-broker 8883/tcp (its accept rule)", UPLINK, tcp(n.cloud, n.broker, 50052, 8883), Drop(Quarantined));
    t.row("world → mqtt-broker 22/tcp (no rule either)", UPLINK, tcp(n.world, n.broker, 50052, 22), Drop(Quarantined));
    t.row("the gateway itself → mqtt-broker 22/tcp", LOCAL, tcp(n.gateway, n.broker, 50052, 22), Drop(Quarantined));

    t.row("cloud's reply to mqtt-broker's flow from before", UPLINK, broker_cloud.reply(), Drop(Quarantined));
    t.row("a router's unreachable about that flow", UPLINK, icmp_error(n.world, n.broker, unreachable, 0, &broker_cloud), Drop(Quarantined));
    t.row("mqtt-broker's next packet of that flow", FROM, broker_cloud.clone(), Drop(Quarantined));
    t.row("mqtt-broker's reply to the ssh flow accepted before", FROM, ops_ssh.reply(), Drop(Quarantined));
    t.row("mqtt-broker's port unreachable about that ssh flow", FROM, icmp_error(n.broker, n.ops, unreachable, port_unreachable, &ops_ssh), Drop(Quarantined));
    t.row("ops-vpn's next packet of that ssh flow", UPLINK, ops_ssh.clone(), Drop(Quarantined));
    t.row("mqtt-broker's reply to temp-001's flow from before", FROM, t1_broker.reply(), Drop(Quarantined));
    t.row("temp-001's next packet of that flow", FROM, t1_broker.clone(), Drop(Quarantined));
    t.row("NTP's reply to temp-002's flow from before", UPLINK, t2_ntp.reply(), Drop(Quarantined));
    t.row("temp-002's reply to hist-1's flow from before", FROM, hist_t2.reply(), Drop(Quarantined));
    // The kernel judges a packet by the device at the hook's end; the daemon's flow cut
    // (Datapath::cut_flows) ends these when it quarantines.
    t.row("hist-1's reply to mqtt-broker's flow from before (judged at hist-1, not quarantined)", FROM, broker_hist.reply(), Pass(Reply));
    t.row("temp-002's further fragment of a datagram from before (its first fragment passed)", FROM, t2_datagram.clone().fragment(185, false), Pass(Reply));
    let remedy_datagram = tcp(n.t2, n.remedy, 40059, 443).datagram_id(0x4002);
    t.row("temp-002 (quarantined) → remediation-host 443/tcp, first fragment", FROM, remedy_datagram.clone().fragment(0, true), Pass(Allowed));
    t.row("...its last fragment", FROM, remedy_datagram.fragment(185, false), Pass(Reply));
    t.row("temp-002's non-first fragment, first fragment never seen", FROM, udp(n.t2, n.ntp, 40059, 123).datagram_id(0x4003).fragment(185, false), Drop(Fragment));
    t.row("towards mqtt-broker: non-first fragment, first fragment never seen", UPLINK, tcp(n.ops, n.broker, 50053, 22).datagram_id(0x4004).fragment(185, false), Drop(Fragment));

    if is_v4 {
        t.row("DHCP renewal from mqtt-broker (quarantined)", FROM, udp(n.broker, n.gateway, 68, 67), Pass(Essential));
        t.row("gateway → mqtt-broker DHCP ack", LOCAL, udp(n.gateway, n.broker, 67, 68), Pass(Essential));
        t.row("ARP who-has from mqtt-broker (quarantined)", FROM, arp(n.broker, n.gateway), Pass(Essential));
        t.row("ARP with mqtt-broker's IP from another MAC", FROM, arp(n.broker, n.gateway).mac(EVIL_MAC), Drop(Spoof));
    } else {
        t.row("neighbour solicitation from mqtt-broker (quarantined)", FROM, icmp(n.broker, SOLICITED_NODE, 135), Pass(Essential));
        t.row("DHCPv6 from mqtt-broker (quarantined)", FROM, udp(n.broker, DHCPV6_SERVERS, 546, 547), Pass(Essential));
        t.row("gateway → mqtt-broker neighbour advertisement", LOCAL, icmp(n.gateway, n.broker, 136), Pass(Essential));
    }
    t.row("mqtt-broker's address from another MAC, a Quarantine flow", FROM, tcp(n.broker, n.remedy, 40059, 443).mac(EVIL_MAC), Drop(Spoof));
    t.row("mqtt-broker's address from temp-001's MAC, a Quarantine flow", FROM, tcp(n.broker, n.remedy, 40059, 443).mac(T1_MAC), Drop(Spoof));

    t.row("cam-1 (quarantined, audit segment) → hist-1 554/tcp (its segment's rule)", FROM, tcp(n.cam, n.hist, 40059, 554), Audit(Quarantined));
    t.row("cam-1 (quarantined, audit segment) → remediation-host 443/tcp", FROM, tcp(n.cam, n.remedy, 40059, 443), Pass(Allowed));
    t.row("ops-vpn → cam-1 (quarantined, audit segment) 22/tcp", UPLINK, tcp(n.ops, n.cam, 50054, 22), Audit(Quarantined));
    t.row("temp-001 (enforcing) → cam-1 (quarantined, audit segment) 554/tcp", FROM, tcp(n.t1, n.cam, 40059, 554), Drop(Quarantined));
    t.row("cam-1's address from another MAC", FROM, tcp(n.cam, n.remedy, 40059, 443).mac(EVIL_MAC), Audit(Spoof));

    let t = lifted;
    t.row("lifted: mqtt-broker → cloud 443/tcp", FROM, tcp(n.broker, n.cloud, 40058, 443), Pass(Allowed));
    t.row("lifted: mqtt-broker → remediation-host 443/tcp (no rule outside the quarantine)", FROM, tcp(n.broker, n.remedy, 40058, 443), Drop(DefaultDeny));
    t.row("lifted: ops-vpn → mqtt-broker 22/tcp", UPLINK, tcp(n.ops, n.broker, 50055, 22), Pass(Allowed));
    t.row("lifted: temp-001 → mqtt-broker 8883/tcp", FROM, tcp(n.t1, n.broker, 40058, 8883), Pass(Allowed));
    t.row("lifted: hist-1 → temp-002 9/udp", FROM, udp(n.hist, n.t2, 40058, 9), Pass(Allowed));
    t.row("lifted: cam-1 → hist-1 554/tcp", FROM, tcp(n.cam, n.hist, 40058, 554), Pass(Allowed));
    t.row("lifted: the update server's reply to the flow opened in quarantine", UPLINK, to_updates.reply(), Pass(Reply));
    t.row("lifted: mqtt-broker's next packet to cloud of the flow from before", FROM, broker_cloud.clone(), Pass(Allowed));
    t.row("lifted: ops-vpn's next packet to mqtt-broker of the flow from before", UPLINK, ops_ssh.clone(), Pass(Allowed));
}

#[rustfmt::skip]
fn once_rows(t: &mut Table) {
    t.prefix = "";
    t.section("rule 1: ARP and other ethertypes");
    t.row("ARP who-has from temp-001", FROM, arp(V4.t1, V4.gateway), Pass(Essential));
    t.row("ARP from temp-002 (no pinned MAC), any MAC", FROM, arp(V4.t2, V4.gateway).mac(EVIL_MAC), Pass(Essential));
    t.row("ARP from an unbound address", FROM, arp(V4.unbound, V4.gateway), Pass(Essential));
    t.row("ARP probe from 0.0.0.0", FROM, arp(v4(0, 0, 0, 0), V4.t1), Pass(Essential));
    t.row("ARP behind an 802.1Q tag", FROM, arp(V4.t1, V4.gateway).tag(ETH_P_8021Q), Pass(Essential));
    t.row("spoofed ARP: temp-001's IP, another MAC", FROM, arp(V4.t1, V4.gateway).mac(EVIL_MAC), Drop(Spoof));
    t.row("spoofed ARP: mqtt-broker's IP, temp-001's MAC", FROM, arp(V4.broker, V4.gateway).mac(T1_MAC), Drop(Spoof));
    t.row("spoofed ARP behind an 802.1ad tag", FROM, arp(V4.t1, V4.gateway).mac(EVIL_MAC).tag(ETH_P_8021AD), Drop(Spoof));
    t.row("ARP behind two tags", FROM, arp(V4.t1, V4.gateway).tag(ETH_P_8021AD).tag(ETH_P_8021Q), Drop(NonIp));
    for (name, ty) in [("LLDP", 0x88cc), ("MPLS", 0x8847), ("PPPoE discovery", 0x8863), ("EAPOL", 0x888e), ("RARP", 0x8035), ("an 802.3 length", 0x0040), ("zero", 0)] {
        t.row(format!("ethertype {name} ({ty:#06x})"), FROM, ethertype(ty), Drop(NonIp));
        t.row(format!("ethertype {name} ({ty:#06x}) towards devices"), UPLINK, ethertype(ty), Drop(NonIp));
    }
    t.row("LLDP behind an 802.1Q tag", FROM, ethertype(0x88cc).tag(ETH_P_8021Q), Drop(NonIp));
}

/// Every way a frame can be cut short or lie about its headers.
#[rustfmt::skip]
fn malformed_rows(t: &mut Table) {
    t.prefix = "";
    t.section("rule 7: truncated");
    let bases = [
        ("tagged IPv4/TCP with options", tcp(V4.t1, V4.broker, 40030, 8883).tag(ETH_P_8021Q).options(3), Allowed),
        ("IPv4/UDP", udp(V4.t1, V4.ntp, 40030, 123), Allowed),
        ("IPv4/ICMP echo", echo(V4.t1, V4.ntp, 9), Allowed),
        ("IPv4/SCTP", sctp(V4.broker, V4.cloud, 40030, 2905), Allowed),
        ("IPv6/TCP", tcp(V6.t1, V6.broker, 40030, 8883), Allowed),
        ("IPv6/ICMPv6 echo", echo(V6.t1, V6.ntp, 9), Allowed),
        ("IPv6/UDP behind hop-by-hop, routing, fragment, AH, destination options", udp(V6.t1, V6.ntp, 40030, 123).ext(&[EXT_HOP_BY_HOP, EXT_ROUTING, EXT_FRAGMENT, EXT_AUTH, EXT_DEST_OPTS]), Allowed),
        ("802.1ad-tagged IPv6/SCTP", sctp(V6.broker, V6.cloud, 40030, 2905).tag(ETH_P_8021AD), Allowed),
        ("ARP", arp(V4.t1, V4.gateway), Essential),
    ];
    for (base, frame, reason) in bases {
        let layout = frame.layout();
        let bytes = frame.wire();
        t.row(format!("{base}: whole"), FROM, bytes.clone(), Pass(reason));
        for len in ETH_HLEN..bytes.len() {
            let (end, header) = *layout.iter().find(|(end, _)| *end > len).expect("within the frame");
            let at = if layout.iter().any(|(e, _)| *e == len) { "at a header boundary, before the" } else { "inside the" };
            let name = format!("{base}: cut to {len} of {} bytes ({at} {header}, which ends at {end})", bytes.len());
            t.row(&name, FROM, bytes[..len].to_vec(), Drop(Malformed));
            if !tc_refuses(&bytes[..len]) {
                t.row(format!("{name}, towards a device"), UPLINK, bytes[..len].to_vec(), Drop(Malformed));
            }
        }
    }

    t.section("rule 7: bad IPv4 headers");
    let v4_tcp = || tcp(V4.t1, V4.broker, 40031, 8883);
    t.row("IPv4/TCP as sent", FROM, v4_tcp(), Pass(Allowed));
    for ihl in 0..5 {
        t.row(format!("IHL {ihl}"), FROM, patch(v4_tcp(), ETH_HLEN, &[0x40 | ihl]), Drop(Malformed));
    }
    t.row("IHL 6 without options: the TCP header comes up short", FROM, patch(v4_tcp(), ETH_HLEN, &[0x46]), Drop(Malformed));
    t.row("IHL 15 in a 54-byte frame", FROM, patch(v4_tcp(), ETH_HLEN, &[0x4f]), Drop(Malformed));
    t.row("IHL 8 with 2 option words present", FROM, patch(v4_tcp().options(2), ETH_HLEN, &[0x48]), Drop(Malformed));
    for version in [0u8, 6, 15] {
        t.row(format!("IP version {version} in an IPv4 ethertype"), FROM, patch(v4_tcp(), ETH_HLEN, &[(version << 4) | 5]), Drop(Malformed));
    }
    t.row("total length 19 < header length 20", FROM, patch(v4_tcp(), ETH_HLEN + 2, &[0, 19]), Drop(Malformed));
    t.row("total length 0", FROM, patch(v4_tcp(), ETH_HLEN + 2, &[0, 0]), Drop(Malformed));
    t.row("total length 24 < header length 28 (options)", FROM, patch(v4_tcp().options(2), ETH_HLEN + 2, &[0, 24]), Drop(Malformed));
    t.row("bad IPv4 header towards a device", UPLINK, patch(tcp(V4.ops, V4.broker, 50000, 22), ETH_HLEN, &[0x44]), Drop(Malformed));

    t.section("rule 7: bad IPv6 headers");
    let v6_tcp = || tcp(V6.t1, V6.broker, 40032, 8883);
    t.row("IPv6/TCP as sent", FROM, v6_tcp(), Pass(Allowed));
    for version in [0u8, 4, 15] {
        t.row(format!("IP version {version} in an IPv6 ethertype"), FROM, patch(v6_tcp(), ETH_HLEN, &[version << 4]), Drop(Malformed));
    }
    let chain = |n: usize| v6_tcp().ext(&vec![EXT_DEST_OPTS; n]);
    t.row(format!("{} extension headers", MAX_IPV6_EXT_HEADERS - 1), FROM, chain(MAX_IPV6_EXT_HEADERS - 1), Pass(Allowed));
    t.row(format!("{MAX_IPV6_EXT_HEADERS} extension headers (the walker's bound)"), FROM, chain(MAX_IPV6_EXT_HEADERS), Pass(Allowed));
    t.row(format!("{} extension headers (over the bound)", MAX_IPV6_EXT_HEADERS + 1), FROM, chain(MAX_IPV6_EXT_HEADERS + 1), Drop(Malformed));
    t.row(format!("{} extension headers, the last a non-first fragment", MAX_IPV6_EXT_HEADERS + 1), FROM, chain(MAX_IPV6_EXT_HEADERS).fragment(185, false), Drop(Malformed));
    t.row("40 extension headers", FROM, chain(40), Drop(Malformed));
    t.row("over-long chain towards a device", UPLINK, tcp(V6.ops, V6.broker, 50000, 22).ext(&[EXT_DEST_OPTS; 20]), Drop(Malformed));
    t.row("an extension header longer than the frame", FROM, patch(v6_tcp().ext(&[EXT_DEST_OPTS]), ETH_HLEN + 40 + 1, &[255]), Drop(Malformed));

    t.section("rule 7: bad ARP");
    let arp_at = |offset: usize, bytes: &[u8]| patch(arp(V4.t1, V4.gateway), ETH_HLEN + offset, bytes);
    t.row("ARP for hardware type IEEE 802", FROM, arp_at(0, &[0, 6]), Drop(Malformed));
    t.row("ARP for protocol IPv6", FROM, arp_at(2, &[0x86, 0xdd]), Drop(Malformed));
    t.row("ARP with 8-byte hardware addresses", FROM, arp_at(4, &[8]), Drop(Malformed));
    t.row("ARP with 16-byte protocol addresses", FROM, arp_at(5, &[16]), Drop(Malformed));
}

/// With the whole agent in audit mode (SPEC §2.6), every would-be drop passes, counted.
#[rustfmt::skip]
fn audit_rows(t: &mut Table) {
    t.prefix = "agent in audit mode";
    t.section("§2.6: whole-agent audit");
    t.row("temp-001 → world 443/tcp", FROM, tcp(V4.t1, V4.world, 40040, 443), Audit(DefaultDeny));
    t.row("world → temp-001 22/tcp", UPLINK, tcp(V6.world, V6.t1, 40040, 22), Audit(DefaultDeny));
    t.row("unbound source", FROM, tcp(V6.unbound, V6.broker, 40040, 8883), Audit(UnknownDevice));
    t.row("temp-001 from another MAC", FROM, tcp(V4.t1, V4.broker, 40040, 8883).mac(EVIL_MAC), Audit(Spoof));
    t.row("spoofed ARP", FROM, arp(V4.t1, V4.gateway).mac(EVIL_MAC), Audit(Spoof));
    t.row("LLDP", FROM, ethertype(0x88cc), Audit(NonIp));
    t.row("non-first fragment, first fragment never seen", FROM, udp(V4.t1, V4.ntp, 40040, 123).datagram_id(0x5001).fragment(185, false), Audit(Fragment));
    t.row("IHL 4", FROM, patch(tcp(V4.t1, V4.broker, 40040, 8883), ETH_HLEN, &[0x44]), Audit(Malformed));
    t.row("temp-001 → mqtt-broker 8883/tcp", FROM, tcp(V4.t1, V4.broker, 40041, 8883), Pass(Allowed));
    t.row("DHCP discover", FROM, udp(v4(0, 0, 0, 0), v4(255, 255, 255, 255), 68, 67), Pass(Essential));
}

/// `frame`'s bytes with `bytes` written at `offset`.
fn patch(frame: Frame, offset: usize, bytes: &[u8]) -> Vec<u8> {
    let mut wire = frame.wire();
    wire[offset..offset + bytes.len()].copy_from_slice(bytes);
    wire
}

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::FromDevice => "from a device (XDP)",
        Hook::ToDevice { ingress_ifindex: 0 } => "to a device from the gateway (tc)",
        Hook::ToDevice { ingress_ifindex } if ingress_ifindex == DEVICE_IFINDEX => {
            "to a device from a device-facing interface (tc)"
        }
        Hook::ToDevice { .. } => "to a device from the uplink (tc)",
    }
}

fn compiled(state: &DeviceState) -> CompiledPolicy {
    compiled_from(POLICY, state)
}

fn compiled_from(yaml: &str, state: &DeviceState) -> CompiledPolicy {
    let policy = load_str(Path::new("tables.yaml"), yaml).expect("the table policy loads");
    compile_with(&policy, &[V4.gateway, V6.gateway], state).expect("the table policy compiles")
}

/// temp-002's address after it moved (a new lease), and hist-1 holding its old one.
const TEMP_002_MOVED: IpAddr = v4(10, 20, 1, 99);

fn moved_policy() -> CompiledPolicy {
    let state = DeviceState {
        learned: [("hist-1".to_owned(), [V4.t2].into())].into(),
        ..DeviceState::default()
    };
    compiled_from(&POLICY.replace("10.20.1.12", "10.20.1.99"), &state)
}

/// SPEC §2.7: permissions and flows follow the device, not the address. `before` runs with
/// the policy as compiled, `moved` with temp-002 at a new address and its old one hist-1's.
#[rustfmt::skip]
fn moved_rows(before: &mut Table, moved: &mut Table) {
    for t in [&mut *before, &mut *moved] {
        t.section("§2.7: a moved address");
    }
    let ntp_query = udp(V4.t2, V4.ntp, 40070, 123);
    before.row("temp-002 → NTP 123/udp", FROM, ntp_query.clone(), Pass(Allowed));
    before.row("...NTP's reply", UPLINK, ntp_query.reply(), Pass(Reply));
    moved.row("NTP's reply to temp-002's flow, to the address hist-1 has now", UPLINK, ntp_query.reply(), Drop(DefaultDeny));
    moved.row("temp-002 → NTP 123/udp from its new address", FROM, udp(TEMP_002_MOVED, V4.ntp, 40070, 123), Pass(Allowed));
    moved.row("hist-1 → NTP 123/udp from temp-002's old address (no rule)", FROM, ntp_query, Drop(DefaultDeny));
}

/// The devices the quarantine rows quarantine: one with a pinned MAC and accept rules, one
/// in a segment another segment's rules target, one in an audit-mode segment.
fn quarantine_state() -> DeviceState {
    DeviceState {
        quarantined: ["mqtt-broker", "temp-002", "cam-1"]
            .into_iter()
            .map(String::from)
            .collect(),
        ..DeviceState::default()
    }
}

/// The kernel's programs with fresh maps, enforcing `policy`.
fn enforcing(policy: CompiledPolicy) -> Kernel {
    let mut kernel = Kernel::new(load_datapath());
    kernel
        .datapath
        .install(policy)
        .expect("installing the policy");
    kernel
}

/// Runs `rows` through kernel and host; what failed, with the frame in hex.
fn run(kernel: &mut Kernel, host: &Host, policy: &CompiledPolicy, rows: &[Row]) -> Vec<String> {
    let mut failures = Vec::new();
    for row in rows {
        let expected = row.expect.verdict();
        let kernel_verdict = kernel.run(row.hook, &row.frame);
        let host_verdict = host.judge(policy, row.hook, &row.frame);
        if kernel_verdict.as_ref() != Ok(&expected) || host_verdict != expected {
            let kernel_verdict = match kernel_verdict {
                Ok(v) => v.to_string(),
                Err(e) => format!("error: {e}"),
            };
            failures.push(format!(
                "[{}] {} ({}): expected {expected}, kernel {kernel_verdict}, host {host_verdict}\n    frame {}",
                row.section,
                row.name,
                hook_name(row.hook),
                hex(&row.frame),
            ));
        }
    }
    failures
}

#[test]
fn verdict_table() {
    let plain = compiled(&DeviceState::default());
    let quarantined = compiled(&quarantine_state());
    let mut kernel = Kernel::new(load_datapath());
    let mut host = Host::default();

    let mut enforced = Table::default();
    let (mut during, mut lifted) = (Table::default(), Table::default());
    once_rows(&mut enforced);
    family_rows(&mut enforced, &V4);
    family_rows(&mut enforced, &V6);
    malformed_rows(&mut enforced);
    quarantine_rows(&mut enforced, &mut during, &mut lifted, &V4);
    quarantine_rows(&mut enforced, &mut during, &mut lifted, &V6);
    let mut moved = Table::default();
    moved_rows(&mut lifted, &mut moved);
    let moved_policy = moved_policy();
    let mut audit = Table::default();
    audit_rows(&mut audit);

    // Each phase installs its policy into the same datapath: tracked flows carry over.
    let phases = [
        ("as compiled", &plain, false, &enforced),
        (
            "mqtt-broker, temp-002, cam-1 quarantined",
            &quarantined,
            false,
            &during,
        ),
        ("quarantine lifted", &plain, false, &lifted),
        (
            "temp-002 moved, hist-1 at its old address",
            &moved_policy,
            false,
            &moved,
        ),
        ("agent in audit mode", &plain, true, &audit),
    ];
    let mut failures = Vec::new();
    for (phase, policy, audit, table) in phases {
        kernel
            .datapath
            .install(policy.clone())
            .unwrap_or_else(|e| panic!("installing the policy ({phase}): {e}"));
        kernel
            .datapath
            .set_audit(audit)
            .expect("setting audit mode");
        host.audit = audit;
        let failed = run(&mut kernel, &host, policy, &table.rows);
        failures.extend(failed.into_iter().map(|f| format!("({phase}) {f}")));
    }

    let rows: Vec<&Row> = phases.iter().flat_map(|p| &p.3.rows).collect();
    let mut sections: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for row in &rows {
        let (passes, drops) = sections.entry(row.section).or_default();
        if row.expect.verdict().passes {
            *passes += 1;
        } else {
            *drops += 1;
        }
    }
    println!("{} rows:", rows.len());
    for (section, (passes, drops)) in &sections {
        println!("  {section}: {passes} pass, {drops} drop");
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Frames shorter than an Ethernet header never reach the programs (the kernel refuses
/// them); the shared parser calls them malformed. Nor does the tc hook's test run take IP
/// frames cut inside their IP header, so the table runs those on the XDP hook only.
#[test]
fn frames_the_kernel_refuses() {
    let datapath = load_datapath();
    let refused = |hook: Hook, frame: &[u8]| {
        let run = TestRun {
            hook,
            frame,
            repeat: 1,
        };
        datapath.test_run(run).is_err()
    };
    let v4 = tcp(V4.t1, V4.broker, 40000, 8883).bytes();
    let v6 = tcp(V6.t1, V6.broker, 40000, 8883).bytes();
    for len in 0..ETH_HLEN {
        let runt = &v4[..len];
        assert_eq!(
            parse(&Packet::from_slice(runt)),
            Err(Malformed),
            "{len} bytes"
        );
        assert!(refused(FROM, runt), "XDP ran on a {len}-byte frame");
        assert!(refused(UPLINK, runt), "tc ran on a {len}-byte frame");
    }
    for frame in [v4, v6] {
        for len in ETH_HLEN..frame.len() {
            let cut = &frame[..len];
            assert_eq!(
                refused(UPLINK, cut),
                tc_refuses(cut),
                "{len} bytes: {}",
                hex(cut)
            );
            assert!(!refused(FROM, cut), "XDP refused {len} bytes");
        }
    }
}

/// The frame builder writes what etherparse reads, and the shared parser reads the same.
#[test]
fn frames_are_real() {
    let frames = [
        tcp(V4.t1, V4.broker, 40000, 8883)
            .tag(ETH_P_8021Q)
            .options(2),
        udp(V6.t1, V6.ntp, 40000, 123).ext(&[EXT_HOP_BY_HOP, EXT_ROUTING, EXT_AUTH, EXT_DEST_OPTS]),
        echo(V4.t1, V4.ntp, 0x4242),
        echo_reply(V6.ntp, V6.t1, 0x4242),
        icmp(LINK_LOCAL, ALL_ROUTERS, 133),
        tcp(V6.t1, V6.broker, 40000, 8883).tag(ETH_P_8021AD),
        arp(V4.t1, V4.gateway).mac(T1_MAC),
        icmp_error(V4.world, V4.t1, 3, 3, &udp(V4.t1, V4.ntp, 40000, 123)),
        icmp_error(V6.world, V6.t1, 2, 0, &tcp(V6.t1, V6.ntp, 40000, 123)),
    ];
    for frame in frames {
        let bytes = frame.bytes();
        let theirs = etherparse_reading(&bytes);
        let ours = match parse(&Packet::from_slice(&bytes)) {
            Ok(Parsed::Ip(flow)) => {
                let addr = |a: [u8; 16]| IpAddr::from(a).to_canonical();
                let detail = (flow.icmp_type, flow.tuple.sport);
                format!(
                    "{} {} {} {:?} {}",
                    addr(flow.tuple.src),
                    addr(flow.tuple.dst),
                    flow.tuple.protocol,
                    detail,
                    flow.tuple.dport
                )
            }
            Ok(Parsed::Arp {
                sender_ip,
                sender_mac,
            }) => {
                format!(
                    "arp {} {}",
                    IpAddr::from(sender_ip).to_canonical(),
                    hex(&sender_mac)
                )
            }
            Ok(Parsed::Fragment(f)) => format!("fragment {}", f.datagram_id),
            Err(reason) => format!("error {reason:?}"),
        };
        assert_eq!(ours, theirs, "{frame:?}\n{}", hex(&bytes));
    }
}

/// The builder's IP ids and ICMP quotes are where the parser looks for them.
#[test]
fn fragments_and_quotes_are_where_the_parser_looks() {
    for (frame, id) in [
        (udp(V4.t1, V4.ntp, 40000, 123).datagram_id(0xbeef), 0xbeef),
        (
            udp(V6.t1, V6.ntp, 40000, 123).datagram_id(0x1234_5678),
            0x1234_5678,
        ),
        (
            udp(V6.t1, V6.ntp, 40000, 123)
                .ext(&[EXT_HOP_BY_HOP, EXT_DEST_OPTS])
                .datagram_id(0xfeed_f00d),
            0xfeed_f00d,
        ),
    ] {
        let bytes = frame.clone().fragment(185, true).bytes();
        match parse(&Packet::from_slice(&bytes)) {
            Ok(Parsed::Fragment(f)) => assert_eq!(f.datagram_id, id, "{}", hex(&bytes)),
            other => panic!("{other:?} from {}", hex(&bytes)),
        }
        let bytes = frame.fragment(0, true).bytes();
        match parse(&Packet::from_slice(&bytes)) {
            Ok(Parsed::Ip(flow)) => {
                assert!(flow.first_fragment, "{}", hex(&bytes));
                assert_eq!(flow.datagram_id, id, "{}", hex(&bytes));
            }
            other => panic!("{other:?} from {}", hex(&bytes)),
        }
    }
    for (n, ty) in [(&V4, 11), (&V6, 3)] {
        let quoted = udp(n.t1, n.ntp, 40000, 123);
        let bytes = icmp_error(n.world, n.t1, ty, 0, &quoted).bytes();
        let Ok(Parsed::Ip(flow)) = parse(&Packet::from_slice(&bytes)) else {
            panic!("an ICMP error does not parse: {}", hex(&bytes));
        };
        let related = flow.related.expect("the quote is read");
        assert_eq!(
            (related.dst, related.sport, related.dport, related.protocol),
            (segward::policy::compile::addr_octets(n.ntp), 40000, 123, 17),
            "{}",
            hex(&bytes)
        );
    }
}

/// The facts the decision uses, as etherparse reads them, in the format of `frames_are_real`.
fn etherparse_reading(bytes: &[u8]) -> String {
    let packet = SlicedPacket::from_ethernet(bytes).expect("etherparse reads the frame");
    let (src, dst, protocol) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.payload().ip_number.0,
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.payload().ip_number.0,
        ),
        Some(NetSlice::Arp(arp)) => {
            let ip: [u8; 4] = arp.sender_protocol_addr().try_into().expect("IPv4 ARP");
            return format!("arp {} {}", IpAddr::from(ip), hex(arp.sender_hw_addr()));
        }
        None => panic!("etherparse found no network layer"),
    };
    // ICMP: (type, echo identifier) like the parser; ports otherwise.
    let echo_id = |ty: u8, rest: [u8; 4]| {
        let id = u16::from_be_bytes([rest[0], rest[1]]);
        (
            ty,
            if matches!(ty, 0 | 8 | 128 | 129) {
                id
            } else {
                0
            },
        )
    };
    let (detail, dport) = match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => ((0, tcp.source_port()), tcp.destination_port()),
        Some(TransportSlice::Udp(udp)) => ((0, udp.source_port()), udp.destination_port()),
        Some(TransportSlice::Icmpv4(icmp)) => {
            let detail = echo_id(icmp.type_u8(), icmp.bytes5to8());
            (detail, detail.1)
        }
        Some(TransportSlice::Icmpv6(icmp)) => {
            let detail = echo_id(icmp.type_u8(), icmp.bytes5to8());
            (detail, detail.1)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    format!("{src} {dst} {protocol} {detail:?} {dport}")
}

/// An install's removals go to the kernel in one batch, which stops at an entry that is
/// not there: the entries after it must still go.
#[test]
fn a_removal_of_an_absent_entry_does_not_stop_the_others() {
    let mut kernel = enforcing(compiled(&DeviceState::default()));
    let key = |ip: [u8; 4]| AddrKey {
        generation: 0,
        _pad: [0; 3],
        addr: v4_mapped(ip),
    };
    let changes = EntryChanges {
        // In this order: the absent one first.
        endpoints: vec![(key([10, 0, 0, 1]), None), (key([10, 20, 1, 11]), None)],
        ..EntryChanges::default()
    };
    kernel.datapath.patch(&changes).expect("patching");
    let frame = tcp(V4.t1, V4.broker, 40000, 8883).mac(T1_MAC).bytes();
    let verdict = kernel.run(FROM, &frame).expect("a test run");
    assert_eq!(
        verdict,
        Drop(UnknownDevice).verdict(),
        "temp-001's endpoint is still there"
    );
}

/// Idle flows expire on the kernel's clock, and replies keep them alive: the clock that the
/// programs read (cached per tick, see `now` in the program) moves.
#[test]
fn idle_flows_expire_and_replies_keep_them_alive() {
    let mut kernel = enforcing(compiled(&DeviceState::default()));
    // Entries refresh at most once a second, so a timeout must be longer to be kept alive;
    // 3 s leaves a reply 1.75 s late before the flow expires under a loaded machine.
    let timeout = Duration::from_secs(3);
    let secs = timeout.as_secs() as u32;
    kernel
        .datapath
        .set_timeouts(secs, secs, secs)
        .expect("setting the timeouts");
    let query = udp(V4.t1, V4.ntp, 40003, 123).mac(T1_MAC).bytes();
    let reply = udp(V4.ntp, V4.t1, 123, 40003).bytes();
    let mut verdict = |hook, frame: &[u8]| kernel.run(hook, frame).expect("a test run");
    assert_eq!(verdict(FROM, &query), Pass(Allowed).verdict(), "the query");
    // Longer than the timeout, a reply every quarter second.
    let started = Instant::now();
    while started.elapsed() < timeout + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            verdict(UPLINK, &reply),
            Pass(Reply).verdict(),
            "a reply {:?} after the query, each a quarter second after the last",
            started.elapsed()
        );
    }
    std::thread::sleep(timeout + Duration::from_millis(500));
    assert_eq!(
        verdict(UPLINK, &reply),
        Drop(DefaultDeny).verdict(),
        "a reply after the flow was idle longer than its timeout"
    );
}

/// The tc hook knows device-facing interfaces from one array slot per interface index, or,
/// where two share a slot, from the hash of them all: frames that came in on any of them
/// were judged at XDP and pass; an interface that only shares a slot with them is not one,
/// nor is one forgotten.
#[test]
fn device_facing_interfaces_are_known_whichever_slot_they_share_until_forgotten() {
    let mut kernel = enforcing(compiled(&DeviceState::default()));
    let slots = DEVICE_IFACE_SLOT_COUNT;
    // DEVICE_IFINDEX's slot is shared by a second one; another holds one alone.
    let (shared, alone) = (DEVICE_IFINDEX + slots, DEVICE_IFINDEX + 1);
    for ifindex in [shared, alone] {
        kernel
            .datapath
            .add_device_ifindex(ifindex)
            .expect("marking an interface device-facing");
    }
    let frame = tcp(V4.world, V4.broker, 40011, 9999).bytes();
    let cases = [
        (
            DEVICE_IFINDEX,
            Pass(Forwarded),
            "device-facing, sharing its slot",
        ),
        (shared, Pass(Forwarded), "device-facing, sharing its slot"),
        (alone, Pass(Forwarded), "device-facing, alone in its slot"),
        (
            DEVICE_IFINDEX + 2 * slots,
            Drop(DefaultDeny),
            "in the shared slot, not device-facing",
        ),
        (
            alone + slots,
            Drop(DefaultDeny),
            "in a one-interface slot, not device-facing",
        ),
        (UPLINK_IFINDEX, Drop(DefaultDeny), "the uplink"),
    ];
    let check = |kernel: &mut Kernel, cases: &[(u32, Expect, &str)]| -> Vec<String> {
        cases
            .iter()
            .filter_map(|&(ingress_ifindex, expect, what)| {
                let verdict = kernel.run(Hook::ToDevice { ingress_ifindex }, &frame);
                (verdict != Ok(expect.verdict())).then(|| {
                    format!(
                        "ifindex {ingress_ifindex} ({what}): expected {expect:?}, got {verdict:?}"
                    )
                })
            })
            .collect()
    };
    let mut failures = check(&mut kernel, &cases);
    // A restarted daemon keeps only the interfaces it attached to.
    kernel
        .datapath
        .keep_device_ifindexes(&[DEVICE_IFINDEX])
        .expect("forgetting the other interfaces");
    let kept = [
        (DEVICE_IFINDEX, Pass(Forwarded), "kept"),
        (shared, Drop(DefaultDeny), "forgotten, had shared its slot"),
        (
            alone,
            Drop(DefaultDeny),
            "forgotten, had been alone in its slot",
        ),
    ];
    failures.extend(check(&mut kernel, &kept));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A drop is kept for a flow's next packets (`kept_drop`) only while nothing it was
/// judged by has changed: the same tuple from another MAC, or after the flow table gained
/// the tuple's entry, is judged anew.
#[test]
fn a_kept_drop_holds_only_while_nothing_it_was_judged_by_changed() {
    let policy = compiled(&DeviceState::default());
    let mut kernel = enforcing(policy.clone());
    let mut t = Table::default();
    t.section("kept drops");
    let spoofed = tcp(V4.t1, V4.broker, 40100, 8883).mac(EVIL_MAC);
    t.row(
        "temp-001's flow from another MAC",
        FROM,
        spoofed.clone(),
        Drop(Spoof),
    );
    t.row("...again: the drop is kept", FROM, spoofed, Drop(Spoof));
    t.row(
        "the same flow from temp-001's MAC",
        FROM,
        tcp(V4.t1, V4.broker, 40100, 8883),
        Pass(Allowed),
    );
    let early_reply = udp(V4.ntp, V4.t1, 123, 40100);
    t.row(
        "an NTP 'reply' before any query",
        UPLINK,
        early_reply.clone(),
        Drop(DefaultDeny),
    );
    t.row(
        "...again: the drop is kept",
        UPLINK,
        early_reply.clone(),
        Drop(DefaultDeny),
    );
    t.row(
        "temp-001's NTP query",
        FROM,
        udp(V4.t1, V4.ntp, 40100, 123),
        Pass(Allowed),
    );
    t.row(
        "the same reply, now of a tracked flow",
        UPLINK,
        early_reply,
        Pass(Reply),
    );
    let mut failures = run(&mut kernel, &Host::default(), &policy, &t.rows);
    // Settings are judged by too: a drop kept before audit mode is not kept in it.
    let mut audited = Table::default();
    audited.section("kept drops, in audit mode");
    let spoofed = tcp(V4.t1, V4.broker, 40101, 8883).mac(EVIL_MAC);
    t = Table::default();
    t.section("kept drops, before audit mode");
    t.row(
        "temp-001's flow from another MAC",
        FROM,
        spoofed.clone(),
        Drop(Spoof),
    );
    t.row(
        "...again: the drop is kept",
        FROM,
        spoofed.clone(),
        Drop(Spoof),
    );
    audited.row("...in audit mode", FROM, spoofed, Audit(Spoof));
    failures.extend(run(&mut kernel, &Host::default(), &policy, &t.rows));
    kernel.datapath.set_audit(true).expect("setting audit mode");
    let mut host = Host::default();
    host.audit = true;
    failures.extend(run(&mut kernel, &host, &policy, &audited.rows));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Packets from unknown sources are counted in the inventory, whether they went there at
/// once or waited in a CPU's count of its last source (`UnknownPending`).
#[test]
fn the_inventory_counts_every_packet_of_unknown_sources() {
    let mut kernel = enforcing(compiled(&DeviceState::default()));
    let stranger = |last: u8| v4(10, 20, 9, last);
    let send = |kernel: &mut Kernel, source: IpAddr, packets: u32| {
        let frame = tcp(source, V4.broker, 40000, 8883).mac(EVIL_MAC).bytes();
        let run = TestRun {
            hook: FROM,
            frame: &frame,
            repeat: packets,
        };
        let result = kernel.datapath.test_run(run).expect("a test run");
        assert!(!result.passes(FROM), "an unknown source's packet passed");
    };
    // Interleaved, so that each source's count waits and is added in turn.
    send(&mut kernel, stranger(1), 5);
    send(&mut kernel, stranger(2), 1);
    send(&mut kernel, stranger(1), 3);
    let counted: BTreeMap<IpAddr, u64> = kernel
        .datapath
        .unknown_sources()
        .expect("reading the inventory")
        .into_iter()
        .map(|(key, seen)| (IpAddr::from(key.addr).to_canonical(), seen.packets))
        .collect();
    assert_eq!(
        counted,
        BTreeMap::from([(stranger(1), 8), (stranger(2), 1)]),
        "packets per unknown source"
    );
}

/// A flow cut behind the programs' backs (the daemon's flow-cutter) lives on in a CPU's copy
/// of its entry (`RECENT_FLOWS`) for up to a second; the new epoch the daemon starts after
/// a cut ends that at once.
#[test]
fn a_new_epoch_after_a_flow_cut_ends_the_copies_of_its_entries() {
    // One CPU, so that every run finds the copy the one before left.
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).expect("CPU 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).expect("pinning to CPU 0");
    let mut kernel = enforcing(compiled(&DeviceState::default()));
    let query = udp(V4.t1, V4.ntp, 40200, 123).mac(T1_MAC).bytes();
    let reply = udp(V4.ntp, V4.t1, 123, 40200).bytes();
    let verdict =
        |kernel: &mut Kernel, hook, frame: &[u8]| kernel.run(hook, frame).expect("a test run");
    assert_eq!(
        verdict(&mut kernel, FROM, &query),
        Pass(Allowed).verdict(),
        "the query"
    );
    for _ in 0..2 {
        assert_eq!(
            verdict(&mut kernel, UPLINK, &reply),
            Pass(Reply).verdict(),
            "the reply"
        );
    }
    let IpAddr::V4(t1) = V4.t1 else {
        unreachable!()
    };
    let cut = kernel
        .datapath
        .flow_cutter()
        .expect("a flow cutter")
        .cut(&[], &[v4_mapped(t1.octets())]);
    assert!(cut > 0, "no flow of temp-001 was cut");
    assert_eq!(
        verdict(&mut kernel, UPLINK, &reply),
        Pass(Reply).verdict(),
        "the reply, in the second after the cut (the copy of its entry)"
    );
    kernel.datapath.start_epoch().expect("starting an epoch");
    assert_eq!(
        verdict(&mut kernel, UPLINK, &reply),
        Drop(DefaultDeny).verdict(),
        "the reply of a cut flow, in a new epoch"
    );
}
