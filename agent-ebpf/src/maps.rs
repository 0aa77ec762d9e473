//! Map names, capacities, keys and values shared by the XDP program and the agent.
//!
//! Rules for every type here (DESIGN.md): `#[repr(C)]`, explicit `_pad` fields so no byte
//! of a key is ever uninitialised, sizes checked at compile time, no bool/enum/Option.
//! Addresses are 16 network-order octets: IPv6 as is, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`),
//! so one key type serves both families. Keys that hold addresses are aligned (`align(4)` or
//! `align(8)`, which changes no size) so that BPF code copies them in words, not octets.
//!
//! Every policy-derived key carries a `generation` slot (0 or 1). A reload writes the new
//! generation beside the live one, then flips [`Config::generation`] in one store; the
//! program reads it once per packet, so each packet is judged wholly by one policy.

/// An IPv6 address or an IPv4-mapped IPv4 address, network byte order.
pub type Addr = [u8; 16];

pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Not `ZONES`: that was an LPM trie, which a daemon must not adopt (pinned) as this hash.
pub const MAP_ZONE_PREFIXES: &str = "ZONE_PREFIXES";
pub const MAP_ZONE_LENGTHS: &str = "ZONE_LENGTHS";
pub const MAP_SEGMENTS: &str = "SEGMENTS";
pub const MAP_POLICY: &str = "POLICY";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_CONNTRACK: &str = "CONNTRACK";
pub const MAP_DEVICE_IFACES: &str = "DEVICE_IFACES";
pub const MAP_DEVICE_IFACE_SLOTS: &str = "DEVICE_IFACE_SLOTS";
pub const MAP_FLOW_STAMPS: &str = "FLOW_STAMPS";
pub const MAP_STAMP_COUNTS: &str = "STAMP_COUNTS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_EVENT_RATE: &str = "EVENT_RATE";
pub const MAP_FRAGMENTS: &str = "FRAGMENTS";
pub const MAP_UNKNOWN_SOURCES: &str = "UNKNOWN_SOURCES";
pub const MAP_UNKNOWN_PENDING: &str = "UNKNOWN_PENDING";
pub const MAP_OVER_LIMIT: &str = "OVER_LIMIT";
/// Every map, for pinning. The programs' caches (`CLOCK`, `RECENT_FLOWS`) are theirs
/// alone, and start empty.
pub const ALL_MAPS: [&str; 18] = [
    MAP_EVENTS,
    MAP_EVENT_RATE,
    MAP_OVER_LIMIT,
    MAP_FRAGMENTS,
    MAP_UNKNOWN_SOURCES,
    MAP_UNKNOWN_PENDING,
    MAP_CONFIG,
    MAP_ENDPOINTS,
    MAP_ZONE_PREFIXES,
    MAP_ZONE_LENGTHS,
    MAP_SEGMENTS,
    MAP_POLICY,
    MAP_COUNTERS,
    MAP_CONNTRACK,
    MAP_DEVICE_IFACES,
    MAP_DEVICE_IFACE_SLOTS,
    MAP_FLOW_STAMPS,
    MAP_STAMP_COUNTS,
];

/// Capacities per generation; the maps hold two generations.
pub const MAX_ENDPOINTS: u32 = 131_072;
pub const MAX_ZONE_PREFIXES: u32 = 16_384;
/// Distinct prefix lengths of the zones that may contain an IPv4 address, and of those that
/// may contain another one: classifying an address costs a lookup per length.
pub const MAX_ZONE_LENGTHS: usize = 16;
pub const MAX_SEGMENTS: u32 = 4_096;
pub const MAX_POLICY_ENTRIES: u32 = 131_072;
pub const GENERATIONS: u32 = 2;
/// Tracked flows (LRU: the least recently used are evicted when full).
pub const MAX_TRACKED_FLOWS: u32 = 65_536;
/// Fragmented datagrams whose first fragment passed (LRU).
pub const MAX_TRACKED_DATAGRAMS: u32 = 8_192;
/// How long the rest of a datagram may follow its first fragment (Linux's `ipfrag_time`).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;
/// Sources seen on device-facing interfaces that no device owns (LRU), for the inventory.
pub const MAX_UNKNOWN_SOURCES: u32 = 4_096;
pub const MAX_DEVICE_IFACES: u32 = 256;
/// `DEVICE_IFACES` direct-mapped, so that the tc hook asks an array (which the verifier
/// inlines) rather than a hash whether a packet came in on a device-facing interface. Slot
/// [`device_iface_slot`] holds the one device-facing interface index that maps there,
/// [`NO_DEVICE_IFACE`] if none does, or 0 if the answer is in `DEVICE_IFACES`: when two
/// map there, and in a map not yet written (as after an upgrade).
pub const DEVICE_IFACE_SLOT_COUNT: u32 = 256;
/// A slot no device-facing interface maps to (no interface index is this large).
pub const NO_DEVICE_IFACE: u32 = u32::MAX;

/// The `DEVICE_IFACE_SLOTS` slot of interface index `ifindex`.
#[inline(always)]
pub const fn device_iface_slot(ifindex: u32) -> u32 {
    ifindex % DEVICE_IFACE_SLOT_COUNT
}
/// Ring buffer for events to the daemon, bytes (a power of two, page aligned).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Sources whose event rate is tracked (LRU).
pub const MAX_EVENT_SOURCES: u32 = 16_384;
/// Per source, at most this many events per second reach the daemon; the rest are counted
/// in the last slot of `COUNTERS` ([`COUNTER_EVENTS_SUPPRESSED`]).
pub const EVENTS_PER_SOURCE_PER_SECOND: u32 = 20;

/// Program names in the object file: XDP ingress on device-facing interfaces (traffic from
/// devices) and tc egress on the same interfaces (traffic towards devices).
pub const PROG_FROM_DEVICE: &str = "segward_from_device";
pub const PROG_TO_DEVICE: &str = "segward_to_device";

/// Mapped-IPv4 prefix length: an IPv4 /n is an IPv6 /(96 + n).
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Is `addr` IPv4-mapped (`::ffff:0:0/96`)?
#[inline(always)]
pub fn is_v4_mapped(addr: &Addr) -> bool {
    let [high, low] = addr_halves(addr);
    high == 0 && low >> 32 == 0xffff
}

/// `addr` masked to its first `bits` bits (128 and more: all of it).
#[inline(always)]
pub fn mask_addr(addr: &Addr, bits: u8) -> Addr {
    // In 64-bit halves: BPF has no 128-bit shifts.
    let [high, low] = addr_halves(addr);
    let bits = u32::from(bits.min(128));
    let mask = |bits: u32| u64::MAX.checked_shl(64 - bits).unwrap_or(0);
    let high = high & mask(bits.min(64));
    let low = low & mask(bits.saturating_sub(64));
    let mut masked = [0; 16];
    masked[..8].copy_from_slice(&high.to_be_bytes());
    masked[8..].copy_from_slice(&low.to_be_bytes());
    masked
}

/// The first and last 8 octets of `addr` as big-endian numbers (compared as two words, not
/// with `memcmp`, which BPF has only as a byte loop).
#[inline(always)]
pub fn addr_halves(addr: &Addr) -> [u64; 2] {
    let mut high = [0; 8];
    let mut low = [0; 8];
    high.copy_from_slice(&addr[..8]);
    low.copy_from_slice(&addr[8..]);
    [u64::from_be_bytes(high), u64::from_be_bytes(low)]
}

/// IPv4-mapped form of an IPv4 address. Computed as a number: ten zero octets written as
/// such become a `memset` call, which BPF has only as a byte loop. Little-endian, so that
/// on the BPF target (and x86) no octet is swapped: the address is two words stored as
/// they are.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    ((u32::from_le_bytes(octets) as u128) << 96 | 0xffff << 80).to_le_bytes()
}

/// Global settings, the single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The live generation slot (0 or 1), always the parity of `epoch`, which is what the
    /// programs read ([`Config::live_generation`]).
    pub generation: u8,
    /// [`CONFIG_AUDIT`] and friends.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Idle timeouts of tracked flows, seconds: TCP and SCTP, UDP, everything else.
    pub timeout_tcp: u32,
    pub timeout_udp: u32,
    pub timeout_other: u32,
    /// Counts installs and changes of these settings (never 0; an install changes its
    /// parity, nothing else does): a tracked flow checked in
    /// this epoch passes on its flow entry alone, one checked in an earlier one is checked
    /// again (see [`FlowEntry`]); a drop kept in an earlier one is judged again.
    pub epoch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            generation: 0,
            flags: 0,
            _pad: [0; 2],
            timeout_tcp: Self::DEFAULT_TIMEOUT_TCP,
            timeout_udp: Self::DEFAULT_TIMEOUT_UDP,
            timeout_other: Self::DEFAULT_TIMEOUT_OTHER,
            epoch: 2,
        }
    }
}

impl Config {
    /// The live generation slot, read off the epoch: one load, so a packet reading `CONFIG`
    /// while the daemon rewrites it gets an epoch and a generation that belong together.
    #[inline(always)]
    pub const fn live_generation(&self) -> u8 {
        (self.epoch & 1) as u8
    }

    pub const DEFAULT_TIMEOUT_TCP: u32 = 3600;
    pub const DEFAULT_TIMEOUT_UDP: u32 = 120;
    pub const DEFAULT_TIMEOUT_OTHER: u32 = 30;
}

/// A flow as the packets of one direction carry it. Conntrack entries are keyed by the
/// *reply* direction of an allowed flow, so a reply finds its entry with its own tuple.
/// ICMP echo carries its identifier in both ports.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(src: Addr, dst: Addr, sport: u16, dport: u16, protocol: u8) -> Self {
        FlowKey {
            src,
            dst,
            sport,
            dport,
            protocol,
            _pad: [0, 0, 0],
        }
    }

    /// The tuple of the packets that go the other way (a flow's replies).
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        FlowKey::new(self.dst, self.src, self.dport, self.sport, self.protocol)
    }
}

/// A tracked flow, under the tuple of the packets it lets pass.
///
/// A *reply* entry (keyed by the reply direction of an allowed flow) lets the flow's replies
/// pass whatever the policy says now. An *opener* entry ([`FLOW_OPENER`], keyed by the
/// direction that opened the flow) caches "the policy allows this flow" for an answered flow,
/// so that its further packets skip the policy lookups.
///
/// Either kind passes a packet on the entry alone (one lookup) only if it was checked in the
/// current [`Config::epoch`]: its device, the device's MAC and quarantine, and for an opener
/// the verdict, as the full judgement found them. Every install (and change of settings)
/// starts a new epoch, so a reload, lease move or quarantine sends each flow through the
/// full judgement once more.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet that refreshed it.
    pub last_seen_ns: u64,
    /// The device that opened the flow, or the device it was opened to (for quarantine cuts).
    pub device: u32,
    /// The epoch it was last checked in; 0: not yet.
    pub epoch: u32,
    /// The MAC that a device sending under this tuple had when checked
    /// ([`FLOW_SENDER_MAC`]).
    pub mac: [u8; 6],
    /// `FLOW_*` flags.
    pub flags: u16,
}

impl FlowEntry {
    /// Marks the entry checked in `epoch` for packets from `sender` (a device, at XDP), or
    /// for packets towards a device (`None`, at tc).
    #[inline(always)]
    pub fn mark_checked(&mut self, epoch: u32, sender: Option<&Endpoint>) {
        self.flags &= !(FLOW_FROM_DEVICE | FLOW_SENDER_MAC);
        if let Some(sender) = sender {
            self.flags |= FLOW_FROM_DEVICE;
            if sender.flags & ENDPOINT_CHECK_MAC != 0 {
                self.flags |= FLOW_SENDER_MAC;
                self.mac = sender.mac;
            }
        }
        self.epoch = epoch;
    }
}

/// The flow was opened by a quarantined device under the Quarantine rules: the only kind
/// of tracked flow a quarantined device keeps.
pub const FLOW_QUARANTINED: u16 = 1;
/// An opener entry: the cached verdict of an answered flow (see [`FlowEntry`]).
pub const FLOW_OPENER: u16 = 2;
/// A reply passed: the flow is answered, and its opener's verdict may be cached.
pub const FLOW_ANSWERED: u16 = 4;
/// Checked for packets from a device (XDP); else for packets towards one (tc). A tuple's
/// sender is either a device or not, so an entry is checked for one hook only.
pub const FLOW_FROM_DEVICE: u16 = 8;
/// Checked for packets from a device that pins its MAC: they must come from `mac`.
pub const FLOW_SENDER_MAC: u16 = 16;
/// Not an entry of the flow table: a CPU's copy that keeps a drop of the flow, its reason
/// in the high byte of the flags (the programs' `kept_drop`).
pub const FLOW_KEPT_DROP: u16 = 32;

/// A fragmented datagram, as every fragment of it carries it (IPv4 ids are widened).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatagramKey {
    pub src: Addr,
    pub dst: Addr,
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// A datagram whose first fragment passed: its other fragments pass too, for a while.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatagramEntry {
    pub first_seen_ns: u64,
    /// The device that sent or receives it.
    pub device: u32,
    pub _pad: u32,
}

/// A source address (with the MAC it came from) that no device owns.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnknownKey {
    pub addr: Addr,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// What the inventory knows of an unknown source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnknownSeen {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
}

/// Per CPU, the unknown source it saw last and its packets since that `UNKNOWN_SOURCES`
/// does not count yet: a flood from one source costs a compare a packet, not an LRU update.
/// They are added there when another source comes, and by the daemon when it reads the
/// inventory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnknownPending {
    pub key: UnknownKey,
    pub packets: u64,
    pub last_seen_ns: u64,
}

/// A drop (or an audited would-be drop) worth telling the daemon about.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// `verdict::Reason` as a number.
    pub reason: u8,
    /// 1 if audit mode let the packet pass.
    pub audited: u8,
    /// [`HOOK_FROM_DEVICE`] or [`HOOK_TO_DEVICE`].
    pub hook: u8,
    /// The device the packet came from or went to (0: none).
    pub device: u32,
    /// The frame's source MAC.
    pub mac: [u8; 6],
    pub _pad: [u8; 6],
}

pub const HOOK_FROM_DEVICE: u8 = 0;
pub const HOOK_TO_DEVICE: u8 = 1;

/// Per-source event rate state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    pub window_start_ns: u64,
    pub events: u32,
    pub _pad: u32,
}

/// A source over its event limit until `until_ns` (its window's end), as one CPU last saw
/// it; kernel-only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverLimit {
    /// The `EVENT_RATE` key, as [`addr_halves`].
    pub source: [u64; 2],
    pub until_ns: u64,
}

/// Whole agent in audit mode: would-be drops pass and are counted.
pub const CONFIG_AUDIT: u8 = 1;
/// Report each new flow a device opens (event reason `allowed`), for the fan-out trigger.
pub const CONFIG_REPORT_NEW_FLOWS: u8 = 2;

/// Key of `ENDPOINTS`: an exact address.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: Addr,
}

/// An address the policy knows exactly: a device's address or one of the gateway's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Device number (1-based; 0 for a gateway address).
    pub device: u32,
    /// Destination identity of this address: which policy targets it belongs to.
    pub identity: u32,
    /// Segment number of the owning device.
    pub segment: u16,
    /// `ENDPOINT_*` flags.
    pub flags: u8,
    pub _pad: u8,
    /// The device's pinned MAC (when `ENDPOINT_CHECK_MAC`).
    pub mac: [u8; 6],
    pub _pad2: [u8; 2],
}

/// The address belongs to a device (and may send).
pub const ENDPOINT_DEVICE: u8 = 1;
/// The device's MAC is pinned: a different source MAC is a spoof.
pub const ENDPOINT_CHECK_MAC: u8 = 2;
/// The device is quarantined: its `segment` is a Quarantine segment and its `identity`
/// is [`crate::verdict::IDENTITY_QUARANTINED`], which no policy entry grants.
pub const ENDPOINT_QUARANTINED: u8 = 4;
/// The device's segment is in audit mode (copied here so that drops decided before the
/// segment is looked up, such as spoofs, are audited too).
pub const ENDPOINT_AUDIT: u8 = 8;

/// Key of `ZONE_PREFIXES`: a zone prefix of `prefix_len` bits (an IPv4 /n as IPv4-mapped
/// /(96 + n)), `addr` masked to them.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneKey {
    pub generation: u8,
    pub prefix_len: u8,
    pub _pad: [u8; 2],
    pub addr: Addr,
}

/// Value of `ZONE_PREFIXES`: the identity of every address inside the prefix that is not an
/// endpoint. Userspace gives each prefix the identity of the *set* of zones/CIDRs
/// containing it, so the longest prefix containing an address answers "in which zones".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZoneIdentity {
    pub identity: u32,
}

/// Value of `ZONE_LENGTHS` (indexed by generation): the prefix lengths that generation's
/// `ZONE_PREFIXES` entries have, longest first, so that the longest prefix containing an
/// address is the first hit of one exact lookup per length; the cost grows with the number
/// of distinct lengths, not of prefixes. `v4` has the lengths of prefixes that contain an
/// IPv4(-mapped) address, `v6` of those that contain another address (`::/0` is in both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZoneLengths {
    pub v4_count: u8,
    pub v6_count: u8,
    pub v4: [u8; MAX_ZONE_LENGTHS],
    pub v6: [u8; MAX_ZONE_LENGTHS],
    pub _pad: [u8; 2],
}

impl ZoneLengths {
    /// The lengths of `prefixes`; `Err` with the number of lengths one family needs when
    /// that is more than [`MAX_ZONE_LENGTHS`].
    pub fn of(prefixes: impl IntoIterator<Item = ZoneKey>) -> Result<ZoneLengths, usize> {
        let v4_space = v4_mapped([0; 4]);
        // Bit n: some prefix of length n.
        let (mut v4, mut v6) = ([false; 129], [false; 129]);
        for prefix in prefixes {
            let bits = prefix.prefix_len.min(128);
            let shared = bits.min(V4_MAPPED_PREFIX_BITS as u8);
            v4[bits as usize] |= mask_addr(&prefix.addr, shared) == mask_addr(&v4_space, shared);
            v6[bits as usize] |= mask_addr(&prefix.addr, V4_MAPPED_PREFIX_BITS as u8) != v4_space
                || u32::from(bits) < V4_MAPPED_PREFIX_BITS;
        }
        let mut lengths = ZoneLengths::default();
        for (set, count, list) in [
            (&v4, &mut lengths.v4_count, &mut lengths.v4),
            (&v6, &mut lengths.v6_count, &mut lengths.v6),
        ] {
            let needed = set.iter().filter(|&&b| b).count();
            if needed > MAX_ZONE_LENGTHS {
                return Err(needed);
            }
            for (slot, bits) in list
                .iter_mut()
                .zip((0..=128u8).rev().filter(|&b| set[b as usize]))
            {
                *slot = bits;
                *count += 1;
            }
        }
        Ok(lengths)
    }
}

/// A segment of a generation: its slot in `SEGMENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentKey {
    pub generation: u8,
    pub _pad: u8,
    pub segment: u16,
}

impl SegmentKey {
    /// Its index in `SEGMENTS`, an array: segment numbers are dense, so an array slot
    /// answers what a hash lookup would (~30 ns) in a few instructions. `None` for a
    /// segment number beyond [`MAX_SEGMENTS`]. A slot no install wrote holds a segment
    /// without rules, in enforce mode: it denies, as a missing entry did.
    #[inline(always)]
    pub fn slot(&self) -> Option<u32> {
        let segment = u32::from(self.segment);
        (segment < MAX_SEGMENTS).then_some(u32::from(self.generation) * MAX_SEGMENTS + segment)
    }
}

/// Per-segment facts the program needs before it looks up policy entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SegmentPolicy {
    /// Bit n set: some `allow` entry of this segment has port prefix length n (0..=16);
    /// [`PREFIXES_PORTLESS`], [`PREFIXES_ANY_PROTOCOL`]: some has a protocol without ports,
    /// or `any`. The program tries only these, so a miss costs at most 18 lookups whatever
    /// the number of rules, and typically one.
    pub allow_port_prefixes: u32,
    /// The same for `accept` entries.
    pub accept_port_prefixes: u32,
    /// `SEGMENT_*` flags.
    pub flags: u32,
}

/// The segment is in audit mode.
pub const SEGMENT_AUDIT: u32 = 1;

/// In a `SegmentPolicy` prefix mask: some entry has a protocol without ports (ICMP, GRE...).
pub const PREFIXES_PORTLESS: u32 = 1 << 30;
/// In a `SegmentPolicy` prefix mask: some entry has the protocol `any`.
pub const PREFIXES_ANY_PROTOCOL: u32 = 1 << 31;

/// Key of `POLICY`: "segment may open a flow of `protocol` to port `port/port_prefix` of a
/// peer with `identity`" (`DIR_ALLOW`), or "a peer with `identity` may open one to the
/// segment" (`DIR_ACCEPT`). `port` is masked to `port_prefix` bits; `protocol` 0 is `any`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub generation: u8,
    pub direction: u8,
    pub protocol: u8,
    pub port_prefix: u8,
    pub segment: u16,
    pub port: u16,
    pub identity: u32,
}

pub const DIR_ALLOW: u8 = 0;
pub const DIR_ACCEPT: u8 = 1;

/// Protocol number used for `any`.
pub const PROTO_ANY: u8 = 0;

/// Which rule a policy entry came from (index into the agent's compiled rule table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub rule: u32,
}

/// `port` masked to its first `prefix` bits.
#[inline(always)]
pub const fn mask_port(port: u16, prefix: u8) -> u16 {
    if prefix == 0 {
        0
    } else if prefix >= 16 {
        port
    } else {
        port & !(u16::MAX >> prefix)
    }
}

const _: () = {
    assert!(core::mem::size_of::<Config>() == 20);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowEntry>() == 24);
    assert!(core::mem::size_of::<Event>() == 64);
    assert!(core::mem::size_of::<DatagramKey>() == 40);
    assert!(core::mem::size_of::<DatagramEntry>() == 16);
    assert!(core::mem::size_of::<UnknownKey>() == 24);
    assert!(core::mem::size_of::<UnknownSeen>() == 24);
    assert!(core::mem::size_of::<UnknownPending>() == 40);
    assert!(core::mem::size_of::<EventRate>() == 16);
    assert!(core::mem::size_of::<OverLimit>() == 24);
    assert!(core::mem::size_of::<AddrKey>() == 20);
    assert!(core::mem::size_of::<Endpoint>() == 20);
    assert!(core::mem::size_of::<ZoneKey>() == 20);
    assert!(core::mem::size_of::<ZoneIdentity>() == 4);
    assert!(core::mem::size_of::<ZoneLengths>() == 36);
    assert!(core::mem::size_of::<SegmentKey>() == 4);
    assert!(core::mem::size_of::<SegmentPolicy>() == 12);
    assert!(core::mem::size_of::<PolicyKey>() == 12);
    assert!(core::mem::size_of::<PolicyValue>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all are `#[repr(C)]`, `Copy`, and have explicit padding (checked above), so
    // every byte is initialised and any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for EventRate {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for ZoneKey {}
    unsafe impl aya::Pod for ZoneIdentity {}
    unsafe impl aya::Pod for ZoneLengths {}
    unsafe impl aya::Pod for SegmentKey {}
    unsafe impl aya::Pod for SegmentPolicy {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for DatagramKey {}
    unsafe impl aya::Pod for DatagramEntry {}
    unsafe impl aya::Pod for UnknownKey {}
    unsafe impl aya::Pod for UnknownSeen {}
    unsafe impl aya::Pod for UnknownPending {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(prefix_len: u8, addr: Addr) -> ZoneKey {
        ZoneKey {
            prefix_len,
            addr: mask_addr(&addr, prefix_len),
            ..ZoneKey::default()
        }
    }

    const V6: Addr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    #[test]
    fn masks_and_maps_addresses() {
        let a = v4_mapped([10, 1, 2, 3]);
        assert_eq!(a, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert!(is_v4_mapped(&a) && !is_v4_mapped(&V6));
        assert_eq!(mask_addr(&a, 96 + 16), v4_mapped([10, 1, 0, 0]));
        assert_eq!(mask_addr(&a, 128), a);
        assert_eq!(mask_addr(&a, 0), [0; 16]);
        assert_eq!(mask_addr(&V6, 70)[..9], V6[..9]);
        assert_eq!(mask_addr(&[0xff; 16], 70)[8..], [0xfc, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn zone_lengths_per_family_longest_first() {
        let lengths = ZoneLengths::of([
            prefix(96 + 24, v4_mapped([10, 1, 2, 0])),
            prefix(96 + 8, v4_mapped([10, 0, 0, 0])),
            prefix(96 + 24, v4_mapped([10, 9, 9, 0])),
            prefix(48, V6),
            // ::/0 contains addresses of both families; ::ffff:0:0/96 only IPv4 ones.
            prefix(0, [0; 16]),
            prefix(96, v4_mapped([0; 4])),
        ])
        .expect("few lengths");
        assert_eq!(
            lengths.v4[..usize::from(lengths.v4_count)],
            [120, 104, 96, 0]
        );
        assert_eq!(lengths.v6[..usize::from(lengths.v6_count)], [48, 0]);
    }

    #[test]
    fn too_many_zone_lengths() {
        let many = (0..=MAX_ZONE_LENGTHS as u8).map(|n| prefix(96 + n, v4_mapped([10, 0, 0, 0])));
        assert_eq!(ZoneLengths::of(many), Err(MAX_ZONE_LENGTHS + 1));
    }

    #[test]
    fn each_segment_of_each_generation_has_a_slot_of_its_own() {
        let slot = |generation, segment| {
            SegmentKey {
                generation,
                _pad: 0,
                segment,
            }
            .slot()
        };
        // Slot n is taken by the n-th (generation, segment) pair in order, and no other:
        // a generation being written never touches the live one's.
        let mut next = 0;
        for generation in 0..GENERATIONS as u8 {
            for segment in 0..MAX_SEGMENTS as u16 {
                assert_eq!(
                    slot(generation, segment),
                    Some(next),
                    "{generation}/{segment}"
                );
                next += 1;
            }
            assert_eq!(
                slot(generation, MAX_SEGMENTS as u16),
                None,
                "beyond the segments"
            );
        }
        assert_eq!(next, MAX_SEGMENTS * GENERATIONS, "the array's size");
    }
}
