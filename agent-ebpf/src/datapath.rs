//! XDP on the device-facing interfaces: parse, then judge with the shared decision logic.

use agent_ebpf::{
    maps::{
        v4_mapped, Addr, AddrKey, Config, Endpoint, PolicyKey, PolicyValue, SegmentKey,
        SegmentPolicy, ZoneIdentity, GENERATIONS, MAX_ENDPOINTS, MAX_POLICY_ENTRIES, MAX_SEGMENTS,
        MAX_ZONE_PREFIXES,
    },
    verdict::{
        drop_reason, judge_arp, judge_from_device, Decision, Flow, Reason, Tables, PROTO_ICMP,
        PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_COUNT,
    },
};
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::XdpContext,
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static ENDPOINTS: HashMap<AddrKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS * GENERATIONS, 0);
#[map]
static ZONES: LpmTrie<AddrKey, ZoneIdentity> =
    LpmTrie::with_max_entries(MAX_ZONE_PREFIXES * GENERATIONS, 0);
#[map]
static SEGMENTS: HashMap<SegmentKey, SegmentPolicy> =
    HashMap::with_max_entries(MAX_SEGMENTS * GENERATIONS, 0);
#[map]
static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(MAX_POLICY_ENTRIES * GENERATIONS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT * 2, 0);

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic survives to here: the verifier rejects a program with a reachable panic path.
    loop {}
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// IPv6 extension headers walked before giving up (`malformed`).
const MAX_IPV6_EXT_HEADERS: usize = 8;

struct MapTables;

impl Tables for MapTables {
    #[inline(always)]
    fn endpoint(&self, key: &AddrKey) -> Option<Endpoint> {
        // SAFETY: copied out at once; entries are plain data.
        unsafe { ENDPOINTS.get(key).copied() }
    }

    #[inline(always)]
    fn zone(&self, prefix_len: u32, key: &AddrKey) -> Option<ZoneIdentity> {
        ZONES.get(Key::new(prefix_len, *key)).copied()
    }

    #[inline(always)]
    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy> {
        // SAFETY: as above.
        unsafe { SEGMENTS.get(key).copied() }
    }

    #[inline(always)]
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        // SAFETY: as above.
        unsafe { POLICY.get(key).copied() }
    }
}

#[xdp]
pub fn segward_device(ctx: XdpContext) -> u32 {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let decision = try_segward_device(&ctx, &config).unwrap_or_else(|r| drop_reason(&config, r));
    if let Some(counter) = COUNTERS.get_ptr_mut(decision.counter_index()) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
    if decision.passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// A packet from a device. `Err` is a drop decided while parsing.
#[inline(always)]
fn try_segward_device(ctx: &XdpContext, config: &Config) -> Result<Decision, Reason> {
    let packet = Packet::new(ctx);
    let eth: [u8; ETH_HLEN] = packet.read(0)?;
    let src_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let mut offset = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag: [u8; 4] = packet.read(offset)?;
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    let flow = match ethertype {
        ETH_P_ARP => return judge_arp_packet(&packet, config, offset),
        ETH_P_IP => parse_ipv4(&packet, offset, src_mac)?,
        ETH_P_IPV6 => parse_ipv6(&packet, offset, src_mac)?,
        _ => return Err(Reason::NonIp),
    };
    Ok(judge_from_device(&MapTables, config, &flow))
}

/// Ethernet/IPv4 ARP: the sender hardware and protocol addresses.
#[inline(always)]
fn judge_arp_packet(packet: &Packet, config: &Config, offset: usize) -> Result<Decision, Reason> {
    let arp: [u8; 28] = packet.read(offset)?;
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4.
    if arp[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return Err(Reason::Malformed);
    }
    let sender_mac = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
    let sender_ip = [arp[14], arp[15], arp[16], arp[17]];
    Ok(judge_arp(
        &MapTables,
        config,
        &v4_mapped(sender_ip),
        &sender_mac,
    ))
}

#[inline(always)]
fn parse_ipv4(packet: &Packet, offset: usize, src_mac: [u8; 6]) -> Result<Flow, Reason> {
    let ip: [u8; 20] = packet.read(offset)?;
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || header_len < 20 {
        return Err(Reason::Malformed);
    }
    // The whole header, options included, must be there.
    packet.check(offset, header_len)?;
    if (u16::from_be_bytes([ip[2], ip[3]]) as usize) < header_len {
        return Err(Reason::Malformed);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        // No L4 header to judge; tracked flows' fragments come with conntrack.
        return Err(Reason::Fragment);
    }
    let mut flow = Flow {
        src: v4_mapped([ip[12], ip[13], ip[14], ip[15]]),
        dst: v4_mapped([ip[16], ip[17], ip[18], ip[19]]),
        src_mac,
        protocol: ip[9],
        icmp_type: 0,
        sport: 0,
        dport: 0,
    };
    parse_l4(packet, offset + header_len, &mut flow)?;
    Ok(flow)
}

#[inline(always)]
fn parse_ipv6(packet: &Packet, offset: usize, src_mac: [u8; 6]) -> Result<Flow, Reason> {
    let ip: [u8; 40] = packet.read(offset)?;
    if ip[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next_header = ip[6];
    let mut l4 = offset + 40;
    let mut walked = 0;
    loop {
        let header_len = match next_header {
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let ext: [u8; 2] = packet.read(l4)?;
                next_header = ext[0];
                (ext[1] as usize + 1) * 8
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let ext: [u8; 2] = packet.read(l4)?;
                next_header = ext[0];
                (ext[1] as usize + 2) * 4
            }
            44 => {
                let frag: [u8; 4] = packet.read(l4)?;
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return Err(Reason::Fragment);
                }
                next_header = frag[0];
                8
            }
            _ => break,
        };
        l4 += header_len;
        walked += 1;
        if walked >= MAX_IPV6_EXT_HEADERS {
            return Err(Reason::Malformed);
        }
    }
    let mut src: Addr = [0; 16];
    let mut dst: Addr = [0; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    let mut flow = Flow {
        src,
        dst,
        src_mac,
        protocol: next_header,
        icmp_type: 0,
        sport: 0,
        dport: 0,
    };
    parse_l4(packet, l4, &mut flow)?;
    Ok(flow)
}

/// Ports or ICMP type; a header too short for its protocol is malformed.
#[inline(always)]
fn parse_l4(packet: &Packet, offset: usize, flow: &mut Flow) -> Result<(), Reason> {
    let min_len = match flow.protocol {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        PROTO_SCTP => 12,
        _ => return Ok(()),
    };
    packet.check(offset, min_len)?;
    let head: [u8; 4] = packet.read(offset)?;
    if matches!(flow.protocol, PROTO_ICMP | PROTO_ICMPV6) {
        flow.icmp_type = head[0];
    } else {
        flow.sport = u16::from_be_bytes([head[0], head[1]]);
        flow.dport = u16::from_be_bytes([head[2], head[3]]);
    }
    Ok(())
}

/// Bounds-checked reads of packet data: every access compares pointer + size with
/// `data_end`, as the verifier demands. Offsets are kept below 64 KiB.
struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    fn new(ctx: &XdpContext) -> Self {
        Packet {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    #[inline(always)]
    fn check(&self, offset: usize, len: usize) -> Result<(), Reason> {
        if offset > 0xffff || self.start + offset + len > self.end {
            return Err(Reason::Malformed);
        }
        Ok(())
    }

    /// Reads `N` bytes at `offset`. At least two: LLVM turns a one-byte check `p + 1 > end`
    /// into `p >= end`, from which the verifier grants no range at a variable offset.
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Result<[u8; N], Reason> {
        const { assert!(N >= 2) };
        self.check(offset, N)?;
        // SAFETY: in bounds (checked above); packet data has no alignment guarantee.
        Ok(unsafe { core::ptr::read_unaligned((self.start + offset) as *const [u8; N]) })
    }
}
