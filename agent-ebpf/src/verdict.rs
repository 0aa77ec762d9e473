//! How a packet becomes a verdict (SPEC §2), written once for the kernel and the host.
//!
//! The kernel hooks parse a packet ([`crate::parse`]) and call [`judge_from_device`] (XDP
//! ingress on device-facing interfaces) or [`judge_to_device`] (tc egress on them) with
//! [`Tables`] backed by BPF maps; the agent calls the same functions with tables built from a
//! compiled policy. Nothing here may panic, loop
//! unboundedly or use more than a few hundred bytes of stack: it runs in the verifier's world.
//!
//! Padding is written `[0, 0, 0]`, not `[0; 3]`: rustc emits a zero repeat as `memset`, which
//! BPF has only as a call to a byte loop.

use crate::{
    maps::{
        mask_port, Addr, AddrKey, Config, DatagramEntry, DatagramKey, Endpoint, FlowEntry, FlowKey,
        PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, ZoneIdentity, CONFIG_AUDIT, DIR_ACCEPT,
        DIR_ALLOW, ENDPOINT_AUDIT, ENDPOINT_CHECK_MAC, ENDPOINT_DEVICE, ENDPOINT_QUARANTINED,
        FLOW_ANSWERED, FLOW_FROM_DEVICE, FLOW_KEPT_DROP, FLOW_OPENER, FLOW_QUARANTINED,
        FLOW_SENDER_MAC, FRAGMENT_TIMEOUT_NS, PREFIXES_ANY_PROTOCOL, PREFIXES_PORTLESS, PROTO_ANY,
        SEGMENT_AUDIT,
    },
    parse::Parsed,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Identity of addresses that belong to no endpoint and no zone; no policy entry has it.
pub const IDENTITY_WORLD: u32 = 0;
/// Identity of a quarantined device's addresses: no policy entry grants it, so nothing may
/// open a flow to the device (SPEC §2 rule 3).
pub const IDENTITY_QUARANTINED: u32 = u32::MAX;

/// The lookups the decision needs. Values are returned by copy: they are small, and the
/// kernel must not hold references into maps across other calls.
pub trait Tables {
    fn endpoint(&self, key: &AddrKey) -> Option<Endpoint>;
    /// The longest zone prefix that contains `key`'s address.
    fn zone(&self, key: &AddrKey) -> Option<ZoneIdentity>;
    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy>;
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue>;
    /// The flow entry of packets that look like `key`.
    fn tracked(&self, key: &FlowKey) -> Option<FlowEntry>;
    /// As [`Tables::tracked`], for a packet of `key`: the kernel also keeps a copy at hand
    /// for [`Tables::recent`], with `flow_writes` ([`Tables::flow_writes`], read before).
    fn tracked_and_kept(&self, key: &FlowKey, _flow_writes: u64) -> Option<FlowEntry> {
        self.tracked(key)
    }
    /// Adds or replaces the flow entry of packets that look like `key`.
    fn track(&self, key: &FlowKey, entry: &FlowEntry);
    /// Changes the flow entry `key` in place, if it is there (true): an entry removed in
    /// the meantime (a quarantine cut) must stay removed.
    fn update(&self, key: &FlowKey, change: impl FnOnce(&mut FlowEntry)) -> bool;
    /// Marks the flow entry `key`, found live, seen at `now_ns`, if it is there (true). Keeping
    /// a live entry alive changes no verdict, so the kernel leaves no stamp for it (see
    /// [`Tables::flow_writes`]): a busy flow table would otherwise end kept drops each second.
    fn refresh(&self, key: &FlowKey, now_ns: u64) -> bool {
        self.update(key, |e| e.last_seen_ns = now_ns)
    }

    // The caches in front of the flow table. The kernel keeps them per CPU; the host keeps
    // none (these defaults), so that it judges every packet from its tables.

    /// The flow entry `key` as [`Tables::tracked_and_kept`] last found it, if it is still at hand and
    /// no write has changed it since (its [`Tables::flow_writes`] is still `flow_writes`): a
    /// cache that spares a packet the flow table's lookup. Its time may be older than the
    /// table's (a refresh is not a write): the caller says how old it takes.
    fn recent(&self, _key: &FlowKey, _flow_writes: u64) -> Option<FlowEntry> {
        None
    }
    /// A stamp of the last write (add, change) to the flow entry of `key`, which changes
    /// with every such write (and may with writes to others): a copy of the entry
    /// ([`Tables::recent`]) and a kept drop hold only while it has not changed.
    fn flow_writes(&self, _key: &FlowKey) -> u64 {
        0
    }
    /// Keeps `dropped` (see `kept_drop`), with the `flow_writes` read before its packet was
    /// judged, where [`Tables::recent`] finds copies of `key`'s entry.
    fn keep_drop(&self, _key: &FlowKey, _dropped: &FlowEntry, _flow_writes: u64) {}
    /// The fragmented datagram `key`, if its first fragment passed.
    fn datagram(&self, key: &DatagramKey) -> Option<DatagramEntry>;
    /// Lets the other fragments of datagram `key` pass.
    fn track_datagram(&self, key: &DatagramKey, entry: &DatagramEntry);
}

/// The L3/L4 facts of an IP packet that the decision uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Addresses, ports (host order; 0 for protocols without ports) and protocol, built in
    /// place as the flow table's key: lookups take it as it is, and the kernel copies it,
    /// when it must, in words (a copy of a lone address is 32 byte moves in BPF).
    pub tuple: FlowKey,
    pub src_mac: [u8; 6],
    /// ICMP/ICMPv6 type, else 0.
    pub icmp_type: u8,
    /// The first fragment of a fragmented datagram (`datagram_id` names the datagram).
    pub first_fragment: bool,
    pub datagram_id: u32,
    /// For an ICMP error, the packet it is about.
    pub related: Option<Related>,
}

/// The packet an ICMP error quotes: sent by the error's destination to `dst`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Related {
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// A fragment other than the first of a datagram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    pub src: Addr,
    pub dst: Addr,
    pub src_mac: [u8; 6],
    pub protocol: u8,
    pub datagram_id: u32,
}

impl Fragment {
    #[inline(always)]
    fn datagram(&self) -> DatagramKey {
        DatagramKey {
            src: self.src,
            dst: self.dst,
            id: self.datagram_id,
            protocol: self.protocol,
            _pad: [0, 0, 0],
        }
    }
}

/// Why a packet passed or was dropped; the index of its counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An `allow`/`accept` rule matched.
    Allowed = 0,
    /// ARP, DHCP, DHCPv6, neighbour/router solicitation: what every device needs to get on
    /// the network.
    Essential = 1,
    /// No rule allows the flow.
    DefaultDeny = 2,
    /// The source address is bound to no device.
    UnknownDevice = 3,
    /// The source MAC differs from the device's pinned MAC (IP or ARP).
    Spoof = 4,
    /// Headers that cannot be parsed.
    Malformed = 5,
    /// An ethertype other than IPv4, IPv6 and ARP.
    NonIp = 6,
    /// A non-first IPv4 or IPv6 fragment of a datagram whose first fragment did not pass.
    Fragment = 7,
    /// A packet of a tracked flow in either direction, an ICMP error about one, or a
    /// further fragment of a datagram whose first fragment passed.
    Reply = 8,
    /// A quarantined device opened a flow the Quarantine rules do not allow, or something
    /// tried to open a flow to a quarantined device.
    Quarantined = 9,
    /// Towards a device from another device-facing interface: judged (and counted) where
    /// it came in, passed here.
    Forwarded = 10,
}

/// Number of [`Reason`]s; counters are indexed `reason + REASON_COUNT * audited`.
pub const REASON_COUNT: u32 = 11;
/// Slots of the `COUNTERS` array: enforced and audited per reason, then suppressed events.
pub const COUNTER_SLOTS: u32 = REASON_COUNT * 2 + 1;
/// The counter of events dropped by the per-source rate limit.
pub const COUNTER_EVENTS_SUPPRESSED: u32 = REASON_COUNT * 2;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Allowed,
        Reason::Essential,
        Reason::DefaultDeny,
        Reason::UnknownDevice,
        Reason::Spoof,
        Reason::Malformed,
        Reason::NonIp,
        Reason::Fragment,
        Reason::Reply,
        Reason::Quarantined,
        Reason::Forwarded,
    ];

    #[inline(always)]
    pub const fn passes(self) -> bool {
        matches!(
            self,
            Reason::Allowed | Reason::Essential | Reason::Reply | Reason::Forwarded
        )
    }

    pub const fn from_number(n: u8) -> Option<Reason> {
        match n {
            0..=10 => Some(Reason::ALL[n as usize]),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Essential => "essential",
            Reason::DefaultDeny => "default_deny",
            Reason::UnknownDevice => "unknown_device",
            Reason::Spoof => "spoof",
            Reason::Malformed => "malformed",
            Reason::NonIp => "non_ip",
            Reason::Fragment => "fragment",
            Reason::Reply => "reply",
            Reason::Quarantined => "quarantined",
            Reason::Forwarded => "forwarded",
        }
    }
}

/// The outcome for one packet. Without implicit padding: a copy of one must define every
/// byte, or BPF code may store a register that was never written, which the verifier
/// refuses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The matching policy entry's rule (0 when no rule decided).
    pub rule: u32,
    /// The source device (0 when unknown).
    pub device: u32,
    /// A would-be drop that audit mode lets pass.
    pub audited: bool,
    /// The packet opened a flow that is now tracked.
    pub new_flow: bool,
    pub _pad: [u8; 2],
}

impl Decision {
    #[inline(always)]
    pub const fn new(reason: Reason) -> Self {
        Decision {
            reason,
            rule: 0,
            device: 0,
            audited: false,
            new_flow: false,
            _pad: [0, 0],
        }
    }

    #[inline(always)]
    pub const fn passes(&self) -> bool {
        self.reason.passes() || self.audited
    }

    /// Index into the per-CPU counter array.
    #[inline(always)]
    pub const fn counter_index(&self) -> u32 {
        self.reason as u32 + if self.audited { REASON_COUNT } else { 0 }
    }
}

/// A drop that the whole agent's audit mode turns into a counted pass.
#[inline(always)]
pub fn drop_reason(config: &Config, reason: Reason) -> Decision {
    Decision {
        audited: config.flags & CONFIG_AUDIT != 0,
        ..Decision::new(reason)
    }
}

/// ARP from a device: passes unless its sender IP is bound to a device whose MAC is pinned
/// and differs from the sender MAC (SPEC §2 rule 1).
#[inline(always)]
fn judge_arp<T: Tables>(
    tables: &T,
    config: &Config,
    sender_ip: &Addr,
    sender_mac: &[u8; 6],
) -> Decision {
    let key = addr_key(config, sender_ip);
    match tables.endpoint(&key) {
        Some(owner) if is_spoofed(&owner, sender_mac) => device_drop(config, &owner, Reason::Spoof),
        _ => Decision::new(Reason::Essential),
    }
}

/// A frame from a device (XDP ingress on a device-facing interface): SPEC §2 rules 1-7.
#[inline(always)]
pub fn judge_from_device<T: Tables>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    now_ns: u64,
) -> Decision {
    let (tracked, flow_writes) =
        match judge_by_own_entry::<T, true>(tables, config, packet, false, now_ns) {
            Ok(judge) => judge,
            Err(decided) => return decided,
        };
    let decision = decide_from_device(tables, config, packet, tracked, now_ns);
    leave_behind::<T, true>(
        tables,
        config,
        packet,
        &decision,
        false,
        flow_writes,
        now_ns,
    );
    decision
}

/// What `packet`'s own flow entry or kept drop says ([`own_entry`]), at XDP (`FROM_DEVICE`)
/// or at tc: `Err` the decision if it decides the packet (a first fragment that passes on
/// it lets the rest of its datagram pass too); else how to judge it in full: whether it has
/// an entry, and the stamp read before the table.
#[inline(always)]
fn judge_by_own_entry<T: Tables, const FROM_DEVICE: bool>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    from_device_iface: bool,
    now_ns: u64,
) -> Result<(bool, u64), Decision> {
    let Parsed::Ip(flow) = packet else {
        return Ok((false, 0));
    };
    if !has_own_entry::<FROM_DEVICE>(flow, from_device_iface) {
        return Ok((false, 0));
    }
    let sender_mac = FROM_DEVICE.then_some(&flow.src_mac);
    let mut decided = Decision::new(Reason::Reply);
    match own_entry(tables, config, flow, sender_mac, now_ns, &mut decided) {
        OwnEntry::Decided => {
            remember_first_fragment(tables, flow, &decided, now_ns);
            Err(decided)
        }
        OwnEntry::Judge {
            tracked,
            flow_writes,
        } => Ok((tracked, flow_writes)),
    }
}

/// Is `flow` one that its own flow entry may decide, at XDP (`FROM_DEVICE`) or at tc? Not
/// ICMP errors (judged by the flow they quote), not the essentials (never tracked), and at
/// tc not what came in on a device-facing interface (judged there).
#[inline(always)]
fn has_own_entry<const FROM_DEVICE: bool>(flow: &Flow, from_device_iface: bool) -> bool {
    let essential = if FROM_DEVICE {
        is_essential(flow)
    } else {
        from_device_iface || is_essential_reply(flow)
    };
    flow.related.is_none() && !essential
}

/// A frame towards a device (tc egress on a device-facing interface). Frames that came in
/// on a device-facing interface were judged there (`from_device_iface`); the rest come from
/// the uplink or the gateway itself: replies of tracked flows, `accept` rules, and what the
/// gateway must send for devices to get on the network.
#[inline(always)]
pub fn judge_to_device<T: Tables>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    from_device_iface: bool,
    now_ns: u64,
) -> Decision {
    let (tracked, flow_writes) =
        match judge_by_own_entry::<T, false>(tables, config, packet, from_device_iface, now_ns) {
            Ok(judge) => judge,
            Err(decided) => return decided,
        };
    let decision = decide_to_device(tables, config, packet, from_device_iface, tracked, now_ns);
    let iface = from_device_iface;
    leave_behind::<T, false>(
        tables,
        config,
        packet,
        &decision,
        iface,
        flow_writes,
        now_ns,
    );
    decision
}

/// What a packet judged in full leaves for others: a first fragment that passed lets the
/// rest of its datagram pass; a drop of a flow whose own entry was looked up (with
/// `flow_writes` read before) is kept for its next packets. Whether it was looked up is
/// asked again rather than carried over: a value carried across the full judgement would
/// multiply the verifier's states.
#[inline(always)]
fn leave_behind<T: Tables, const FROM_DEVICE: bool>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    decision: &Decision,
    from_device_iface: bool,
    flow_writes: u64,
    now_ns: u64,
) {
    let Parsed::Ip(flow) = packet else {
        return;
    };
    remember_first_fragment(tables, flow, decision, now_ns);
    if !decision.passes() && has_own_entry::<FROM_DEVICE>(flow, from_device_iface) {
        remember_drop::<T, FROM_DEVICE>(tables, config, flow, decision, flow_writes, now_ns);
    }
}

/// A first fragment that passed (whatever let it pass) lets the rest of its datagram pass.
#[inline(always)]
fn remember_first_fragment<T: Tables>(tables: &T, flow: &Flow, decision: &Decision, now_ns: u64) {
    // Checked here: the call is for the rare first fragment only.
    if flow.first_fragment && decision.reason.passes() {
        remember_datagram(tables, flow, decision, now_ns);
    }
}

/// Keeps the drop `decision` of `flow` for its next packets (see [`kept_drop`]). Not
/// inlined: its stores would multiply the verifier's states at every hook's end, and its
/// record stays off the hooks' stack frames.
#[inline(never)]
fn remember_drop<T: Tables, const FROM_DEVICE: bool>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    decision: &Decision,
    flow_writes: u64,
    now_ns: u64,
) {
    let dropped = kept_drop::<FROM_DEVICE>(config, flow, decision, now_ns);
    tables.keep_drop(&flow.tuple, &dropped, flow_writes);
}

/// A drop of a packet of a flow judged in full, kept for the flow's next packets as a copy
/// of a flow entry ([`Tables::recent`]) marked [`FLOW_KEPT_DROP`], with the reason in the
/// flags' high byte (a drop has no rule, and no kept drop is audited): it holds as a copy
/// does, while nothing it was judged by has changed: the epoch (policy, devices,
/// settings), the flow's entry (the only one a drop's judgement reads: no write since),
/// the hook and the sender's MAC; and for a second at most. A flood of one denied flow is
/// then dropped on the one slot a reply passes on. A pass is never kept this way.
#[inline(always)]
fn kept_drop<const FROM_DEVICE: bool>(
    config: &Config,
    flow: &Flow,
    decision: &Decision,
    now_ns: u64,
) -> FlowEntry {
    let hook = if FROM_DEVICE {
        FLOW_FROM_DEVICE | FLOW_SENDER_MAC
    } else {
        0
    };
    FlowEntry {
        last_seen_ns: now_ns,
        device: decision.device,
        epoch: config.epoch,
        mac: flow.src_mac,
        flags: FLOW_KEPT_DROP | hook | (decision.reason as u16) << 8,
    }
}

/// The first fragment of a datagram that passed (whatever let it pass) lets the rest of
/// the datagram pass. Not inlined: it keeps its key off the hooks' stack frames.
#[inline(never)]
fn remember_datagram<T: Tables>(tables: &T, flow: &Flow, decision: &Decision, now_ns: u64) {
    let datagram = DatagramKey {
        src: flow.tuple.src,
        dst: flow.tuple.dst,
        id: flow.datagram_id,
        protocol: flow.tuple.protocol,
        _pad: [0, 0, 0],
    };
    tables.track_datagram(
        &datagram,
        &DatagramEntry {
            first_seen_ns: now_ns,
            device: decision.device,
            _pad: 0,
        },
    );
}

#[inline(always)]
fn decide_from_device<T: Tables>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    tracked: bool,
    now_ns: u64,
) -> Decision {
    let (src, src_mac) = match packet {
        Parsed::Arp {
            sender_ip,
            sender_mac,
        } => return judge_arp(tables, config, sender_ip, sender_mac),
        Parsed::Ip(flow) => (&flow.tuple.src, &flow.src_mac),
        Parsed::Fragment(fragment) => (&fragment.src, &fragment.src_mac),
    };
    let source = match tables.endpoint(&addr_key(config, src)) {
        Some(e) if e.flags & ENDPOINT_DEVICE != 0 => e,
        _ if matches!(packet, Parsed::Ip(flow) if is_essential(flow)) => {
            return Decision::new(Reason::Essential);
        }
        _ => return drop_reason(config, Reason::UnknownDevice),
    };
    if is_spoofed(&source, src_mac) {
        return device_drop(config, &source, Reason::Spoof);
    }
    let flow = match packet {
        Parsed::Ip(flow) => flow,
        Parsed::Fragment(fragment) => {
            return judge_fragment(tables, config, fragment, &source, now_ns);
        }
        Parsed::Arp { .. } => return Decision::new(Reason::Essential),
    };
    let passed = |reason| Decision {
        device: source.device,
        ..Decision::new(reason)
    };
    if is_essential(flow) {
        return passed(Reason::Essential);
    }
    if continues_tracked(
        tables,
        config,
        flow,
        tracked,
        &source,
        Some(&source),
        now_ns,
    ) {
        return passed(Reason::Reply);
    }
    let generation = config.live_generation();
    let Some(segment) = tables.segment(&segment_key(generation, source.segment)) else {
        return device_drop(config, &source, Reason::DefaultDeny);
    };
    let key = PolicyKey {
        generation,
        direction: DIR_ALLOW,
        protocol: flow.tuple.protocol,
        port_prefix: 0,
        segment: source.segment,
        port: 0,
        identity: address_identity(tables, config, &flow.tuple.dst),
    };
    let deny_reason = if is_quarantined(&source) || key.identity == IDENTITY_QUARANTINED {
        Reason::Quarantined
    } else {
        Reason::DefaultDeny
    };
    let mut decision = judge_new_flow(tables, config, key, flow.tuple.dport, &segment, deny_reason);
    if decision.passes() {
        decision.new_flow = track(
            tables,
            config,
            flow,
            &decision,
            &source,
            Some(&source),
            now_ns,
        );
    }
    decision.device = source.device;
    decision
}

#[inline(always)]
fn decide_to_device<T: Tables>(
    tables: &T,
    config: &Config,
    packet: &Parsed,
    from_device_iface: bool,
    tracked: bool,
    now_ns: u64,
) -> Decision {
    let dst = match packet {
        // The gateway's own ARP; devices' ARP was judged on ingress.
        Parsed::Arp { .. } => return Decision::new(Reason::Essential),
        Parsed::Ip(flow) => &flow.tuple.dst,
        Parsed::Fragment(fragment) => &fragment.dst,
    };
    let destination = match tables.endpoint(&addr_key(config, dst)) {
        Some(e) if e.flags & ENDPOINT_DEVICE != 0 => e,
        _ if matches!(packet, Parsed::Ip(flow) if is_essential_reply(flow)) => {
            return Decision::new(Reason::Essential);
        }
        _ => return drop_reason(config, Reason::DefaultDeny),
    };
    let passed = |reason| Decision {
        device: destination.device,
        ..Decision::new(reason)
    };
    if from_device_iface {
        return passed(Reason::Forwarded);
    }
    let flow = match packet {
        Parsed::Ip(flow) => flow,
        Parsed::Fragment(fragment) => {
            return judge_fragment(tables, config, fragment, &destination, now_ns);
        }
        Parsed::Arp { .. } => return Decision::new(Reason::Essential),
    };
    if is_essential_reply(flow) {
        return passed(Reason::Essential);
    }
    if continues_tracked(tables, config, flow, tracked, &destination, None, now_ns) {
        return passed(Reason::Reply);
    }
    if is_quarantined(&destination) {
        return device_drop(config, &destination, Reason::Quarantined);
    }
    let generation = config.live_generation();
    let Some(segment) = tables.segment(&segment_key(generation, destination.segment)) else {
        return device_drop(config, &destination, Reason::DefaultDeny);
    };
    let key = PolicyKey {
        generation,
        direction: DIR_ACCEPT,
        protocol: flow.tuple.protocol,
        port_prefix: 0,
        segment: destination.segment,
        port: 0,
        identity: address_identity(tables, config, &flow.tuple.src),
    };
    let mut decision = judge_new_flow(
        tables,
        config,
        key,
        flow.tuple.dport,
        &segment,
        Reason::DefaultDeny,
    );
    if decision.passes() {
        decision.new_flow = track(tables, config, flow, &decision, &destination, None, now_ns);
    }
    decision.device = destination.device;
    decision
}

/// A drop of a packet from or to `device`, audited when the agent or the device's segment
/// is in audit mode.
#[inline(always)]
fn device_drop(config: &Config, device: &Endpoint, reason: Reason) -> Decision {
    let mut d = drop_reason(config, reason);
    d.audited |= device.flags & ENDPOINT_AUDIT != 0;
    d.device = device.device;
    d
}

/// A non-first fragment from or to `device`: it passes if its datagram's first fragment did.
#[inline(always)]
fn judge_fragment<T: Tables>(
    tables: &T,
    config: &Config,
    fragment: &Fragment,
    device: &Endpoint,
    now_ns: u64,
) -> Decision {
    match tables.datagram(&fragment.datagram()) {
        Some(d) if now_ns.saturating_sub(d.first_seen_ns) < FRAGMENT_TIMEOUT_NS => Decision {
            device: device.device,
            ..Decision::new(Reason::Reply)
        },
        _ => device_drop(config, device, Reason::Fragment),
    }
}

/// A new flow against the segment's policy entries (`key` has everything but the port).
#[inline(always)]
fn judge_new_flow<T: Tables>(
    tables: &T,
    config: &Config,
    key: PolicyKey,
    port: u16,
    segment: &SegmentPolicy,
    deny_reason: Reason,
) -> Decision {
    let prefixes = if key.direction == DIR_ALLOW {
        segment.allow_port_prefixes
    } else {
        segment.accept_port_prefixes
    };
    match lookup_policy(tables, key, port, prefixes) {
        Some(rule) => Decision {
            rule,
            ..Decision::new(Reason::Allowed)
        },
        None => {
            let mut d = drop_reason(config, deny_reason);
            d.audited |= segment.flags & SEGMENT_AUDIT != 0;
            d
        }
    }
}

#[inline(always)]
fn is_quarantined(device: &Endpoint) -> bool {
    device.flags & ENDPOINT_QUARANTINED != 0
}

/// What a packet's own flow entry (or a recent drop of its flow) says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OwnEntry {
    /// Its entry was checked in this epoch: its reply (a reply entry) or its opener's verdict
    /// (an opener entry) holds, its device is there and unchanged, and the packet passes on
    /// it. Or a drop of its flow is kept ([`kept_drop`]). The decision is written.
    Decided,
    /// The packet is judged in full. `tracked`: there is an entry, not checked in this epoch
    /// for this hook, expired, or an opener whose replies' entry is gone; `flow_writes`:
    /// [`Tables::flow_writes`] before the flow table was read.
    Judge { tracked: bool, flow_writes: u64 },
}

/// Looks up the flow entry of `flow`, a packet from a device (XDP) with source MAC
/// `sender_mac`, or towards one (tc, `None`): in this CPU's slot of it ([`Tables::recent`]:
/// a copy of the entry, or a kept drop of the flow), then the flow table. Writes into
/// `decided` the decision if it is [`OwnEntry::Decided`]. Only the outcome, `decided` and
/// the stamp leave, not the entry, so that
/// its many possible values do not multiply the verifier's states across the full
/// judgement (`tests/verifier_budget.rs` watches the total). Inlined: it is on the path of
/// every packet, and a call costs ~10 ns on a CPU that mitigates returns (SRSO safe RET).
#[inline(always)]
fn own_entry<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    sender_mac: Option<&[u8; 6]>,
    now_ns: u64,
    decided: &mut Decision,
) -> OwnEntry {
    let key = &flow.tuple;
    // Read before the table: a write after it makes what is judged now stale.
    let flow_writes = tables.flow_writes(key);
    // A copy of the entry, unchanged since, found less than a second after the entry's last
    // refresh, that was checked and passes the packet now, passes it: the table is asked
    // again (and refreshed) once a second. A kept drop holds the same way.
    if let Some(entry) = tables.recent(key, flow_writes) {
        let idle = now_ns.saturating_sub(entry.last_seen_ns);
        if idle < REFRESH_NS.min(timeout_ns(config, flow.tuple.protocol))
            && checked_for(config, &entry, sender_mac)
        {
            if entry.flags & FLOW_KEPT_DROP != 0 {
                decided.reason =
                    Reason::from_number((entry.flags >> 8) as u8).unwrap_or(Reason::DefaultDeny);
                decided.device = entry.device;
                return OwnEntry::Decided;
            }
            return passes_on(&entry, decided);
        }
    }
    let Some(entry) = tables.tracked_and_kept(key, flow_writes) else {
        return OwnEntry::Judge {
            tracked: false,
            flow_writes,
        };
    };
    let stale = OwnEntry::Judge {
        tracked: true,
        flow_writes,
    };
    let idle = now_ns.saturating_sub(entry.last_seen_ns);
    if !checked_for(config, &entry, sender_mac) || idle >= timeout_ns(config, flow.tuple.protocol) {
        return stale;
    }
    let passes = passes_on(&entry, decided);
    // Timeouts count in seconds: refreshing more often than once a second is waste.
    if idle > REFRESH_NS {
        let _ = tables.refresh(key, now_ns);
        // An opener's packets keep its replies' entry alive too; without it (evicted), the
        // full judgement tracks the replies again. Not a refresh: that entry was not found
        // live, and its replies may have been dropped as expired.
        if entry.flags & FLOW_OPENER != 0
            && !tables.update(&flow.tuple.reversed(), |e| e.last_seen_ns = now_ns)
        {
            return stale;
        }
    }
    passes
}

/// Was `entry` checked in this epoch, for packets from a device with source MAC
/// `sender_mac` (XDP), or towards one (tc, `None`)?
#[inline(always)]
fn checked_for(config: &Config, entry: &FlowEntry, sender_mac: Option<&[u8; 6]>) -> bool {
    let checked_here = match sender_mac {
        Some(mac) => {
            entry.flags & FLOW_FROM_DEVICE != 0
                && (entry.flags & FLOW_SENDER_MAC == 0 || mac_eq(&entry.mac, mac))
        }
        None => entry.flags & FLOW_FROM_DEVICE == 0,
    };
    checked_here && entry.epoch == config.epoch && entry.epoch != 0
}

/// Writes into `decided` the decision of a packet that passes on `entry`.
#[inline(always)]
fn passes_on(entry: &FlowEntry, decided: &mut Decision) -> OwnEntry {
    decided.device = entry.device;
    if entry.flags & FLOW_OPENER != 0 {
        decided.reason = Reason::Allowed;
    }
    OwnEntry::Decided
}

/// Does `flow`, from or to `device`, continue a tracked flow: a reply of it (`tracked`: an
/// entry under the packet's own tuple was found), or an ICMP error about one of its packets? A
/// quarantined device keeps only the flows it opened under the Quarantine rules. A reply
/// entry found to hold is marked checked in this epoch, for `sender` (the device the packet
/// comes from; `None`: it goes to `device`).
#[inline(always)]
fn continues_tracked<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    tracked: bool,
    device: &Endpoint,
    sender: Option<&Endpoint>,
    now_ns: u64,
) -> bool {
    let required = quarantine_flag(device);
    if let Some(related) = &flow.related {
        return related_to_tracked(tables, config, flow, related, required, now_ns);
    }
    // Looked up again, not carried over from `own_entry` (see there why); this runs once
    // per flow and epoch.
    let Some(entry) = tracked.then(|| tables.tracked(&flow.tuple)).flatten() else {
        return false;
    };
    let idle = now_ns.saturating_sub(entry.last_seen_ns);
    if entry.flags & FLOW_OPENER != 0
        || idle >= timeout_ns(config, flow.tuple.protocol)
        || entry.flags & required != required
    {
        return false;
    }
    // The entry is the device's at one end of the flow: towards a device, that device's;
    // from a device, its own (a flow opened to it) or the device's it answers (which opened
    // the flow). So after a lease move the address's new owner gets and gives none of the
    // old owner's replies, before the daemon's flow cut is through.
    if entry.device != device.device
        && (sender.is_none() || !is_device_at(tables, config, &flow.tuple.dst, entry.device))
    {
        return false;
    }
    let _ = tables.update(&flow.tuple, |e| {
        e.mark_checked(config.epoch, sender);
        e.flags |= FLOW_ANSWERED;
        if idle > REFRESH_NS {
            e.last_seen_ns = now_ns;
        }
    });
    true
}

/// Is `addr` an address of device `device`? Not inlined: it is for device-to-device
/// replies, once a flow and epoch, and keeps its key off the hooks' stack frames.
#[inline(never)]
fn is_device_at<T: Tables>(tables: &T, config: &Config, addr: &Addr, device: u32) -> bool {
    tables
        .endpoint(&addr_key(config, addr))
        .is_some_and(|e| e.flags & ENDPOINT_DEVICE != 0 && e.device == device)
}

/// Is the ICMP error `flow` about a packet of a live tracked flow with `required` flags?
/// The quoted packet went from `flow.tuple.dst` to `related.dst`: it was either a reply of a
/// tracked flow, or opened one (whose replies are its reverse). Errors do not keep a flow
/// alive. Not inlined: it keeps its keys off the hooks' stack frames.
#[inline(never)]
fn related_to_tracked<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    related: &Related,
    required: u16,
    now_ns: u64,
) -> bool {
    let live = |key: &FlowKey| match tables.tracked(key) {
        Some(entry) => {
            now_ns.saturating_sub(entry.last_seen_ns) < timeout_ns(config, key.protocol)
                && entry.flags & required == required
        }
        None => false,
    };
    // One key, turned round for the second look: the frame holds one.
    let mut key = FlowKey::new(
        flow.tuple.dst,
        related.dst,
        related.sport,
        related.dport,
        related.protocol,
    );
    if live(&key) {
        return true;
    }
    key = key.reversed();
    live(&key)
}

/// Tracks the flow `flow` that `decision` passed, of `device`: its replies pass from now
/// on, and once it is answered, an opener entry caches its verdict. `sender`: the device
/// `flow` comes from; `None`: it goes towards `device`. True if the flow is new.
#[inline(always)]
fn track<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    decision: &Decision,
    device: &Endpoint,
    sender: Option<&Endpoint>,
    now_ns: u64,
) -> bool {
    let tracked = track_replies(tables, config, flow, device, now_ns);
    // Only a verdict of the policy itself is cached: an audited would-be drop must be
    // judged (and reported) packet by packet.
    if tracked == Tracked::Answered && decision.reason == Reason::Allowed && !decision.audited {
        cache_verdict(tables, config, flow, device, sender, now_ns);
    }
    tracked == Tracked::New
}

/// Writes the opener entry of the answered flow `flow` of `device`, checked in this epoch.
/// Not inlined: its stores would multiply the verifier's states at every hook's end.
#[inline(never)]
fn cache_verdict<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    device: &Endpoint,
    sender: Option<&Endpoint>,
    now_ns: u64,
) {
    let mut opener = FlowEntry {
        last_seen_ns: now_ns,
        device: device.device,
        flags: FLOW_OPENER | quarantine_flag(device),
        ..FlowEntry::default()
    };
    opener.mark_checked(config.epoch, sender);
    tables.track(&flow.tuple, &opener);
}

/// What [`track_replies`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// No live entry: the flow is new.
    New,
    /// A live entry, no reply yet.
    Open,
    /// A live entry, and a reply passed.
    Answered,
}

/// Remembers an allowed flow of `device` so that its replies pass. Not inlined: it runs
/// once per new flow, and keeps its keys off the hooks' stack frames.
#[inline(never)]
fn track_replies<T: Tables>(
    tables: &T,
    config: &Config,
    flow: &Flow,
    device: &Endpoint,
    now_ns: u64,
) -> Tracked {
    let reply = flow.tuple.reversed();
    let quarantined = quarantine_flag(device);
    let live = tables.tracked(&reply).filter(|e| {
        // A new reply entry replaces another device's, or an opener under the same tuple (a
        // simultaneous open): replies pass whatever the policy says now.
        e.device == device.device
            && e.flags & (FLOW_OPENER | FLOW_QUARANTINED) == quarantined
            && now_ns.saturating_sub(e.last_seen_ns) < timeout_ns(config, flow.tuple.protocol)
    });
    let Some(entry) = live else {
        tables.track(
            &reply,
            &FlowEntry {
                last_seen_ns: now_ns,
                device: device.device,
                flags: quarantined,
                ..FlowEntry::default()
            },
        );
        return Tracked::New;
    };
    if now_ns.saturating_sub(entry.last_seen_ns) > REFRESH_NS {
        let _ = tables.refresh(&reply, now_ns);
    }
    if entry.flags & FLOW_ANSWERED != 0 {
        Tracked::Answered
    } else {
        Tracked::Open
    }
}

/// The flag of flows that a quarantined `device` keeps.
#[inline(always)]
fn quarantine_flag(device: &Endpoint) -> u16 {
    if is_quarantined(device) {
        FLOW_QUARANTINED
    } else {
        0
    }
}

/// Tracked flows are refreshed at most once a second, from either direction: a map write
/// per packet is not free, and timeouts are counted in seconds.
const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn timeout_ns(config: &Config, protocol: u8) -> u64 {
    let seconds = match protocol {
        PROTO_TCP | PROTO_SCTP => config.timeout_tcp,
        PROTO_UDP => config.timeout_udp,
        _ => config.timeout_other,
    };
    seconds as u64 * 1_000_000_000
}

#[inline(always)]
fn segment_key(generation: u8, segment: u16) -> SegmentKey {
    SegmentKey {
        generation,
        _pad: 0,
        segment,
    }
}

#[inline(always)]
fn addr_key(config: &Config, addr: &Addr) -> AddrKey {
    AddrKey {
        generation: config.live_generation(),
        _pad: [0, 0, 0],
        addr: *addr,
    }
}

#[inline(always)]
fn is_spoofed(owner: &Endpoint, mac: &[u8; 6]) -> bool {
    owner.flags & ENDPOINT_CHECK_MAC != 0 && !mac_eq(&owner.mac, mac)
}

/// Byte-wise comparison: `==` on arrays may lower to a `memcmp` call, which BPF lacks.
#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])
        == 0
}

/// DHCP/DHCPv6 client traffic and IPv6 router/neighbour solicitation and advertisement.
#[inline(always)]
pub fn is_essential(flow: &Flow) -> bool {
    match flow.tuple.protocol {
        PROTO_UDP => matches!((flow.tuple.sport, flow.tuple.dport), (68, 67) | (546, 547)),
        // 133 router solicitation, 135 neighbour solicitation, 136 neighbour advertisement.
        // Router advertisements (134) from a device would be a rogue router: not essential.
        PROTO_ICMPV6 => matches!(flow.icmp_type, 133 | 135 | 136),
        _ => false,
    }
}

/// What the gateway sends so that devices can get on the network: DHCP/DHCPv6 server
/// replies and IPv6 router advertisements and neighbour solicitation/advertisement.
#[inline(always)]
pub fn is_essential_reply(flow: &Flow) -> bool {
    match flow.tuple.protocol {
        PROTO_UDP => matches!((flow.tuple.sport, flow.tuple.dport), (67, 68) | (547, 546)),
        PROTO_ICMPV6 => matches!(flow.icmp_type, 134..=136),
        _ => false,
    }
}

#[inline(always)]
pub const fn has_ports(protocol: u8) -> bool {
    matches!(protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// Which policy targets `addr` belongs to: an endpoint's own identity, else the identity
/// of the longest zone prefix containing it, else the world.
#[inline(always)]
pub fn address_identity<T: Tables>(tables: &T, config: &Config, addr: &Addr) -> u32 {
    let key = addr_key(config, addr);
    if let Some(e) = tables.endpoint(&key) {
        return e.identity;
    }
    match tables.zone(&key) {
        Some(z) => z.identity,
        None => IDENTITY_WORLD,
    }
}

/// The rule of the policy entry for `key` (direction, segment, identity, protocol set) and
/// `port`, trying only the port prefix lengths the segment uses, then the `any` protocol,
/// each only if the segment has such entries (`prefixes`).
#[inline(always)]
fn lookup_policy<T: Tables>(
    tables: &T,
    mut key: PolicyKey,
    port: u16,
    prefixes: u32,
) -> Option<u32> {
    if has_ports(key.protocol) {
        let mut i: u8 = 0;
        while i <= 16 {
            let prefix = 16 - i;
            // No shorter prefix left to try.
            if prefixes & ((2 << prefix) - 1) == 0 {
                break;
            }
            if prefixes & (1 << prefix) != 0 {
                key.port_prefix = prefix;
                key.port = mask_port(port, prefix);
                if let Some(v) = tables.policy(&key) {
                    return Some(v.rule);
                }
            }
            i += 1;
        }
    } else if prefixes & PREFIXES_PORTLESS != 0 {
        if let Some(v) = tables.policy(&key) {
            return Some(v.rule);
        }
    }
    if prefixes & PREFIXES_ANY_PROTOCOL == 0 {
        return None;
    }
    key.protocol = PROTO_ANY;
    key.port_prefix = 0;
    key.port = 0;
    tables.policy(&key).map(|v| v.rule)
}
