//! How bytes become a [`Parsed`] packet: Ethernet (one 802.1Q/802.1ad tag), ARP, IPv4,
//! IPv6 with a bounded walk over extension headers, and the L4 ports or ICMP type. Shared by
//! the kernel hooks and the host (tests, benchmarks), so both read packets the same way.
//!
//! Every access compares pointer + size with the end, as the verifier demands.

use core::marker::PhantomData;

use crate::{
    maps::{v4_mapped, Addr, FlowKey},
    verdict::{
        Flow, Fragment, Reason, Related, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    },
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// IPv6 extension headers walked at most; a longer chain is `malformed`.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// What a frame is, as far as the decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Ethernet/IPv4 ARP with its sender addresses.
    Arp {
        sender_ip: Addr,
        sender_mac: [u8; 6],
    },
    Ip(Flow),
    /// A fragment other than the first: no L4 header to judge by.
    Fragment(Fragment),
}

/// Parses a frame; `Err` is the drop reason (malformed, non-IP).
#[inline(always)]
pub fn parse(packet: &Packet) -> Result<Parsed, Reason> {
    let eth: [u8; ETH_HLEN] = packet.read(0)?;
    let src_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let mut offset = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag: [u8; 4] = packet.read(offset)?;
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    match ethertype {
        ETH_P_ARP => parse_arp(packet, offset),
        ETH_P_IP => parse_ipv4(packet, offset, src_mac),
        ETH_P_IPV6 => parse_ipv6(packet, offset, src_mac),
        _ => Err(Reason::NonIp),
    }
}

#[inline(always)]
fn parse_arp(packet: &Packet, offset: usize) -> Result<Parsed, Reason> {
    let arp: [u8; 28] = packet.read(offset)?;
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4.
    if arp[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return Err(Reason::Malformed);
    }
    Ok(Parsed::Arp {
        sender_mac: [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]],
        sender_ip: v4_mapped([arp[14], arp[15], arp[16], arp[17]]),
    })
}

#[inline(always)]
fn parse_ipv4(packet: &Packet, offset: usize, src_mac: [u8; 6]) -> Result<Parsed, Reason> {
    let ip: [u8; 20] = packet.read(offset)?;
    let header_len = ipv4_header_len(&ip)?;
    // The whole header, options included, must be there.
    packet.check(offset, header_len)?;
    if (u16::from_be_bytes([ip[2], ip[3]]) as usize) < header_len {
        return Err(Reason::Malformed);
    }
    let src = v4_mapped([ip[12], ip[13], ip[14], ip[15]]);
    let dst = v4_mapped([ip[16], ip[17], ip[18], ip[19]]);
    let datagram_id = u16::from_be_bytes([ip[4], ip[5]]) as u32;
    let fragment = u16::from_be_bytes([ip[6], ip[7]]);
    if fragment & 0x1fff != 0 {
        return Ok(Parsed::Fragment(Fragment {
            src,
            dst,
            src_mac,
            protocol: ip[9],
            datagram_id,
        }));
    }
    let mut flow = Flow {
        // Ports are read by `parse_l4`.
        tuple: FlowKey::new(src, dst, 0, 0, ip[9]),
        src_mac,
        first_fragment: fragment & IPV4_MORE_FRAGMENTS != 0,
        datagram_id,
        ..Flow::default()
    };
    parse_l4(packet, offset + header_len, &mut flow)?;
    Ok(Parsed::Ip(flow))
}

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

/// The IPv4 header length from the version/IHL octet; a bad version or IHL is malformed.
#[inline(always)]
fn ipv4_header_len(ip: &[u8; 20]) -> Result<usize, Reason> {
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || header_len < 20 {
        return Err(Reason::Malformed);
    }
    Ok(header_len)
}

#[inline(always)]
fn parse_ipv6(packet: &Packet, offset: usize, src_mac: [u8; 6]) -> Result<Parsed, Reason> {
    let (head, src, dst) = read_ipv6_header(packet, offset)?;
    if head[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next_header = head[6];
    let mut l4 = offset + 40;
    let mut walked = 0;
    let mut first_fragment = false;
    let mut datagram_id = 0;
    loop {
        let header_len = match next_header {
            0 | 43 | 44 | 51 | 60 if walked == MAX_IPV6_EXT_HEADERS => {
                return Err(Reason::Malformed);
            }
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
                let frag: [u8; 8] = packet.read(l4)?;
                datagram_id = u32::from_be_bytes([frag[4], frag[5], frag[6], frag[7]]);
                let offset_and_more = u16::from_be_bytes([frag[2], frag[3]]);
                if offset_and_more & 0xfff8 != 0 {
                    return Ok(Parsed::Fragment(Fragment {
                        src,
                        dst,
                        src_mac,
                        protocol: frag[0],
                        datagram_id,
                    }));
                }
                // Offset 0 without "more fragments" is an atomic fragment: a whole datagram.
                first_fragment = offset_and_more & 1 != 0;
                next_header = frag[0];
                8
            }
            _ => break,
        };
        l4 += header_len;
        walked += 1;
    }
    let mut flow = Flow {
        // Ports are read by `parse_l4`.
        tuple: FlowKey::new(src, dst, 0, 0, next_header),
        src_mac,
        first_fragment,
        datagram_id,
        ..Flow::default()
    };
    parse_l4(packet, l4, &mut flow)?;
    Ok(Parsed::Ip(flow))
}

/// The fixed IPv6 header: its first 8 octets, the source and the destination, read in
/// place (one 40-octet copy would cost the stack another 40 bytes).
#[inline(always)]
fn read_ipv6_header(packet: &Packet, offset: usize) -> Result<([u8; 8], Addr, Addr), Reason> {
    packet.check(offset, 40)?;
    Ok((
        packet.read(offset)?,
        packet.read(offset + 8)?,
        packet.read(offset + 24)?,
    ))
}

/// Ports or ICMP type; a header too short for its protocol is malformed.
#[inline(always)]
fn parse_l4(packet: &Packet, offset: usize, flow: &mut Flow) -> Result<(), Reason> {
    let min_len = match flow.tuple.protocol {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        PROTO_SCTP => 12,
        _ => return Ok(()),
    };
    packet.check(offset, min_len)?;
    let head: [u8; 4] = packet.read(offset)?;
    if matches!(flow.tuple.protocol, PROTO_ICMP | PROTO_ICMPV6) {
        flow.icmp_type = head[0];
        if is_echo(flow.tuple.protocol, head[0]) {
            // The echo identifier pairs requests with replies, like a port pair.
            let id: [u8; 6] = packet.read(offset + 2)?;
            flow.tuple.sport = u16::from_be_bytes([id[2], id[3]]);
            flow.tuple.dport = flow.tuple.sport;
        } else if is_icmp_error(flow.tuple.protocol, head[0]) {
            flow.related = parse_related(packet, offset + 8, flow.tuple.protocol);
        }
    } else {
        flow.tuple.sport = u16::from_be_bytes([head[0], head[1]]);
        flow.tuple.dport = u16::from_be_bytes([head[2], head[3]]);
    }
    Ok(())
}

/// Destination unreachable, time exceeded and parameter problem (ICMP and ICMPv6), and
/// packet too big (ICMPv6): the errors that carry the packet they are about.
#[inline(always)]
pub const fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (PROTO_ICMP, 3 | 11 | 12) | (PROTO_ICMPV6, 1..=4)
    )
}

/// The packet that an ICMP error of `error_protocol` quotes at `offset` (its IP header and
/// the first 8 octets of its payload). Its source is not read: the error's destination is
/// taken as the quoted packet's sender, so a forged source quotes nothing more than a flow
/// of the error's own recipient. `None` when it cannot be read or is of the other family;
/// the error is then judged as a flow of its own. Not inlined: its reads stay off the
/// hooks' stack frames (and the flow it is for stays out of memory).
#[inline(never)]
fn parse_related(packet: &Packet, offset: usize, error_protocol: u8) -> Option<Related> {
    let (dst, protocol, l4) = if error_protocol == PROTO_ICMP {
        let ip: [u8; 20] = packet.read(offset).ok()?;
        let header_len = ipv4_header_len(&ip).ok()?;
        (
            v4_mapped([ip[16], ip[17], ip[18], ip[19]]),
            ip[9],
            offset + header_len,
        )
    } else {
        // Quoted extension headers are not walked: such an error is judged on its own.
        let head: [u8; 8] = packet.read(offset).ok()?;
        if head[0] >> 4 != 6 {
            return None;
        }
        (packet.read(offset + 24).ok()?, head[6], offset + 40)
    };
    let head: [u8; 8] = packet.read(l4).ok()?;
    let (sport, dport) = match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => (
            u16::from_be_bytes([head[0], head[1]]),
            u16::from_be_bytes([head[2], head[3]]),
        ),
        PROTO_ICMP | PROTO_ICMPV6 if is_echo(protocol, head[0]) => {
            let id = u16::from_be_bytes([head[4], head[5]]);
            (id, id)
        }
        _ => return None,
    };
    Some(Related {
        dst,
        sport,
        dport,
        protocol,
    })
}

/// ICMP echo request/reply, ICMPv6 echo request/reply.
#[inline(always)]
pub const fn is_echo(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129)
    )
}

/// Bounds-checked reads of packet data. Offsets are kept below 64 KiB.
pub struct Packet<'a> {
    start: usize,
    end: usize,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> Packet<'a> {
    /// # Safety
    /// `start..end` must be readable memory for as long as the `Packet` lives (the packet
    /// data of an XDP or tc context).
    #[inline(always)]
    pub unsafe fn from_raw(start: usize, end: usize) -> Self {
        Packet {
            start,
            end,
            _bytes: PhantomData,
        }
    }

    /// A packet over bytes in memory (host tests and benchmarks).
    pub fn from_slice(bytes: &'a [u8]) -> Self {
        let start = bytes.as_ptr() as usize;
        Packet {
            start,
            end: start + bytes.len(),
            _bytes: PhantomData,
        }
    }

    #[inline(always)]
    pub fn check(&self, offset: usize, len: usize) -> Result<(), Reason> {
        if offset > 0xffff || self.start + offset + len > self.end {
            return Err(Reason::Malformed);
        }
        Ok(())
    }

    /// Reads `N` bytes at `offset`. At least two: LLVM turns a one-byte check `p + 1 > end`
    /// into `p >= end`, from which the verifier grants no range at a variable offset.
    #[inline(always)]
    pub fn read<const N: usize>(&self, offset: usize) -> Result<[u8; N], Reason> {
        const { assert!(N >= 2) };
        self.check(offset, N)?;
        // SAFETY: in bounds (checked above); packet data has no alignment guarantee.
        Ok(unsafe { core::ptr::read_unaligned((self.start + offset) as *const [u8; N]) })
    }
}
