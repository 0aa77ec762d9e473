//! The kernel hooks: parse with [`agent_ebpf::parse`], judge with [`agent_ebpf::verdict`],
//! count, and pass or drop. Everything else lives in the shared library.

use agent_ebpf::{
    maps::{
        addr_halves, device_iface_slot, is_v4_mapped, mask_addr, Addr, AddrKey, Config,
        DatagramEntry, DatagramKey, Endpoint, Event, EventRate, FlowEntry, FlowKey, OverLimit,
        PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, UnknownKey, UnknownPending, UnknownSeen,
        ZoneIdentity, ZoneKey, ZoneLengths, CONFIG_REPORT_NEW_FLOWS, DEVICE_IFACE_SLOT_COUNT,
        EVENTS_BYTES, EVENTS_PER_SOURCE_PER_SECOND, GENERATIONS, HOOK_FROM_DEVICE, HOOK_TO_DEVICE,
        MAX_DEVICE_IFACES, MAX_ENDPOINTS, MAX_EVENT_SOURCES, MAX_POLICY_ENTRIES, MAX_SEGMENTS,
        MAX_TRACKED_DATAGRAMS, MAX_TRACKED_FLOWS, MAX_UNKNOWN_SOURCES, MAX_ZONE_PREFIXES,
    },
    parse::{parse, Packet, Parsed},
    verdict::{
        drop_reason, judge_from_device, judge_to_device, mac_eq, Decision, Flow, Reason, Tables,
        COUNTER_EVENTS_SUPPRESSED, COUNTER_SLOTS,
    },
};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static ENDPOINTS: HashMap<AddrKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS * GENERATIONS, 0);
#[map]
static ZONE_PREFIXES: HashMap<ZoneKey, ZoneIdentity> =
    HashMap::with_max_entries(MAX_ZONE_PREFIXES * GENERATIONS, 0);
/// The prefix lengths that `ZONE_PREFIXES` entries have, per generation.
#[map]
static ZONE_LENGTHS: Array<ZoneLengths> = Array::with_max_entries(GENERATIONS, 0);
#[map]
static SEGMENTS: Array<SegmentPolicy> = Array::with_max_entries(MAX_SEGMENTS * GENERATIONS, 0);
#[map]
static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(MAX_POLICY_ENTRIES * GENERATIONS, 0);
#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_TRACKED_FLOWS, 0);
#[map]
static FRAGMENTS: LruHashMap<DatagramKey, DatagramEntry> =
    LruHashMap::with_max_entries(MAX_TRACKED_DATAGRAMS, 0);
/// Sources on device-facing interfaces that no device owns: the device inventory.
#[map]
static UNKNOWN_SOURCES: LruHashMap<UnknownKey, UnknownSeen> =
    LruHashMap::with_max_entries(MAX_UNKNOWN_SOURCES, 0);
/// Per CPU, packets of the last unknown source not yet in `UNKNOWN_SOURCES`.
#[map]
static UNKNOWN_PENDING: PerCpuArray<UnknownPending> = PerCpuArray::with_max_entries(1, 0);
/// Interface indexes (in the gateway's namespace) of the device-facing interfaces.
#[map]
static DEVICE_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICE_IFACES, 0);
/// `DEVICE_IFACES` direct-mapped (see [`DEVICE_IFACE_SLOT_COUNT`]).
#[map]
static DEVICE_IFACE_SLOTS: Array<u32> = Array::with_max_entries(DEVICE_IFACE_SLOT_COUNT, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
/// Drops and audited would-be drops, for the daemon's audit log.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Per-source event rate: a flood from one source must not flood the log.
#[map]
static EVENT_RATE: LruHashMap<Addr, EventRate> = LruHashMap::with_max_entries(MAX_EVENT_SOURCES, 0);
/// Per CPU, the last source found over its event limit: a flood from one source is then
/// suppressed without an `EVENT_RATE` lookup per packet.
#[map]
static OVER_LIMIT: PerCpuArray<OverLimit> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, flow entries as the table gave them lately, and kept drops (`kept_drop` in
/// verdict.rs), with the stamp of the entry's last write (`FLOW_STAMPS`), direct-mapped by
/// a hash of the tuple: `Tables::recent`. The flow table's lookup is a hash of a 40-byte
/// key and three calls in the kernel; this one is inlined. Per CPU, so that no other CPU writes a slot
/// while a packet reads it (a torn slot could pair one flow's tuple with another's entry).
/// Not pinned: a new program's starts empty.
#[map]
static RECENT_FLOWS: PerCpuArray<RecentFlow> = PerCpuArray::with_max_entries(RECENT_FLOW_SLOTS, 0);

/// Slots per CPU (72 bytes each): flows beyond that many share slots, and take turns.
const RECENT_FLOW_SLOTS: u32 = 4096;

#[repr(C)]
struct RecentFlow {
    key: FlowKey,
    entry: FlowEntry,
    /// `Tables::flow_writes` of the key before the entry was copied.
    flow_writes: u64,
}

/// Slots of `FLOW_STAMPS`.
const FLOW_STAMP_SLOTS: u32 = 1024;

/// Per slot of a hash of the tuple, a stamp of the programs' last write to a `CONNTRACK`
/// entry whose key maps there (`Tables::flow_writes`): this CPU's number and its count of such writes,
/// so that no two writes leave the same stamp. Pinned with its counts, so that the programs
/// of a restarted daemon see the writes of those they replace, link by link.
#[map]
static FLOW_STAMPS: Array<u64> = Array::with_max_entries(FLOW_STAMP_SLOTS, 0);

/// Per CPU, its count of writes to `CONNTRACK` (see `FLOW_STAMPS`).
#[map]
static STAMP_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Puts `entry` with its `flow_writes` into this CPU's `RECENT_FLOWS` slot of `key`.
#[inline(always)]
fn keep_recent(key: &FlowKey, entry: &FlowEntry, flow_writes: u64) {
    if let Some(slot) = RECENT_FLOWS.get_ptr_mut(recent_slot(key, RECENT_FLOW_SLOTS)) {
        // SAFETY: this CPU's slot, which nothing else writes while we run.
        unsafe {
            (*slot).key = *key;
            (*slot).entry = *entry;
            (*slot).flow_writes = flow_writes;
        }
    }
}

/// Stamps a write to the `CONNTRACK` entry `key`, after it: a copy or kept drop of a flow
/// whose key maps to the same slot is judged again.
#[inline(always)]
fn stamp_flow_write(key: &FlowKey) {
    let (Some(count), Some(stamp)) = (
        STAMP_COUNTS.get_ptr_mut(0),
        FLOW_STAMPS.get_ptr_mut(recent_slot(key, FLOW_STAMP_SLOTS)),
    ) else {
        return;
    };
    // SAFETY: this CPU's count; the stamp is an aligned word, stored whole. Readers load
    // the stamp before the flow table, so one that saw the old stamp judges again (x86
    // keeps stores in order; elsewhere the drop's second bounds what a reordering costs).
    unsafe {
        *count += 1;
        // SAFETY: a plain helper call.
        let cpu = u64::from(bpf_get_smp_processor_id());
        *stamp = (cpu << 48) | (*count & ((1 << 48) - 1));
    }
}

/// The slot of `key` in an array of `slots` (a power of two): a multiplicative hash of the
/// parts that tell flows apart most.
#[inline(always)]
fn recent_slot(key: &FlowKey, slots: u32) -> u32 {
    let [src, dst] = [&key.src, &key.dst].map(|addr| addr_halves(addr)[1] as u32);
    let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
    let mixed = src ^ dst.rotate_left(16) ^ ports ^ u32::from(key.protocol);
    mixed.wrapping_mul(0x9e37_79b1) >> (32 - slots.trailing_zeros())
}

/// Are `a` and `b` the same key? Compared as five words: `==` on them would be `memcmp`,
/// which BPF has only as a byte loop.
#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    const { assert!(size_of::<FlowKey>() == 40 && align_of::<FlowKey>() == 8) };
    // SAFETY: same size and alignment, and every byte of a FlowKey is initialised (explicit
    // padding).
    let [a, b] = [a, b].map(|key| unsafe { &*(key as *const FlowKey).cast::<[u64; 5]>() });
    (0..5).fold(0, |differ, i| differ | (a[i] ^ b[i])) == 0
}

/// The coarse clock's last reading and the tick it was read in (see [`now`]).
#[map]
static CLOCK: Array<TickClock> = Array::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct TickClock {
    jiffies: u64,
    ns: u64,
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic survives to here: the verifier rejects a program with a reachable panic path.
    loop {}
}

struct MapTables;

impl Tables for MapTables {
    #[inline(always)]
    fn endpoint(&self, key: &AddrKey) -> Option<Endpoint> {
        // SAFETY (all lookups): the value is copied out at once; entries are plain data.
        unsafe { ENDPOINTS.get(key).copied() }
    }

    #[inline(always)]
    fn zone(&self, key: &AddrKey) -> Option<ZoneIdentity> {
        let lengths = ZONE_LENGTHS.get(u32::from(key.generation))?;
        let (count, list) = if is_v4_mapped(&key.addr) {
            (lengths.v4_count, &lengths.v4)
        } else {
            (lengths.v6_count, &lengths.v6)
        };
        // One exact lookup per length the policy uses, longest first: the first prefix found
        // is the longest match. (An LPM trie visits a node per level: ~85 ns at 1k prefixes,
        // against ~20 ns per lookup here.)
        for &prefix_len in list.iter().take(usize::from(count)) {
            let probe = ZoneKey {
                generation: key.generation,
                prefix_len,
                _pad: [0, 0],
                addr: mask_addr(&key.addr, prefix_len),
            };
            if let Some(zone) = unsafe { ZONE_PREFIXES.get(&probe) } {
                return Some(*zone);
            }
        }
        None
    }

    #[inline(always)]
    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy> {
        SEGMENTS.get(key.slot()?).copied()
    }

    #[inline(always)]
    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        unsafe { POLICY.get(key).copied() }
    }

    #[inline(always)]
    fn tracked(&self, key: &FlowKey) -> Option<FlowEntry> {
        unsafe { CONNTRACK.get(key).copied() }
    }

    #[inline(always)]
    fn tracked_and_kept(&self, key: &FlowKey, flow_writes: u64) -> Option<FlowEntry> {
        let entry = CONNTRACK.get_ptr(key)?;
        // SAFETY: plain data.
        keep_recent(key, unsafe { &*entry }, flow_writes);
        // SAFETY: as above.
        Some(unsafe { *entry })
    }

    #[inline(always)]
    fn track(&self, key: &FlowKey, entry: &FlowEntry) {
        // A full LRU evicts the oldest flow; a failed insert only costs a reply re-judged.
        let _ = CONNTRACK.insert(key, entry, 0);
        stamp_flow_write(key);
    }

    #[inline(always)]
    fn refresh(&self, key: &FlowKey, now_ns: u64) -> bool {
        match CONNTRACK.get_ptr_mut(key) {
            // SAFETY: plain data; a racing writer can at worst store a similar time.
            Some(entry) => {
                unsafe { (*entry).last_seen_ns = now_ns };
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn update(&self, key: &FlowKey, change: impl FnOnce(&mut FlowEntry)) -> bool {
        match CONNTRACK.get_ptr_mut(key) {
            // SAFETY: plain data; a racing writer can at worst store a similar change.
            Some(entry) => {
                change(unsafe { &mut *entry });
                stamp_flow_write(key);
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn recent(&self, key: &FlowKey, flow_writes: u64) -> Option<FlowEntry> {
        let slot = RECENT_FLOWS.get_ptr(recent_slot(key, RECENT_FLOW_SLOTS))?;
        // SAFETY: this CPU's slot, which nothing else writes while we run.
        unsafe {
            ((*slot).flow_writes == flow_writes && same_key(&(*slot).key, key))
                .then(|| (*slot).entry)
        }
    }

    #[inline(always)]
    fn flow_writes(&self, key: &FlowKey) -> u64 {
        FLOW_STAMPS
            .get(recent_slot(key, FLOW_STAMP_SLOTS))
            .copied()
            .unwrap_or(0)
    }

    #[inline(always)]
    fn keep_drop(&self, key: &FlowKey, dropped: &FlowEntry, flow_writes: u64) {
        keep_recent(key, dropped, flow_writes);
    }

    #[inline(always)]
    fn datagram(&self, key: &DatagramKey) -> Option<DatagramEntry> {
        unsafe { FRAGMENTS.get(key).copied() }
    }

    #[inline(always)]
    fn track_datagram(&self, key: &DatagramKey, entry: &DatagramEntry) {
        let _ = FRAGMENTS.insert(key, entry, 0);
    }
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}

/// Counts the decision and reports a drop (and, when asked, a new flow); true if the
/// packet passes.
#[inline(always)]
fn account(
    config: &Config,
    decision: &Decision,
    parsed: Option<&Parsed>,
    hook: u8,
    now_ns: u64,
) -> bool {
    bump(decision.counter_index());
    if let Some(parsed) = parsed {
        let new_flow = decision.new_flow && config.flags & CONFIG_REPORT_NEW_FLOWS != 0;
        if !decision.reason.passes() || new_flow {
            let source = event_source(decision, parsed, hook);
            // Checked before the call: in a flood, nearly every packet ends here.
            if over_event_limit(&source, now_ns) {
                bump(COUNTER_EVENTS_SUPPRESSED);
            } else {
                report(decision, parsed, hook, &source, now_ns);
            }
        }
    }
    decision.passes()
}

/// Whose events `decision` of `parsed` counts against: a known device as a whole (by
/// number, in a key no address can have: ffff:ffff:ffff:ffff:ffff:ffff:<device>), else
/// the unknown address at the outer end.
#[inline(always)]
fn event_source(decision: &Decision, parsed: &Parsed, hook: u8) -> Addr {
    let (src, dst) = match parsed {
        Parsed::Arp { sender_ip, .. } => (sender_ip, None),
        Parsed::Ip(flow) => (&flow.tuple.src, Some(&flow.tuple.dst)),
        Parsed::Fragment(fragment) => (&fragment.src, Some(&fragment.dst)),
    };
    if decision.device != 0 {
        ((u128::MAX << 32) | u128::from(decision.device)).to_be_bytes()
    } else if hook == HOOK_TO_DEVICE {
        dst.copied().unwrap_or_default()
    } else {
        *src
    }
}

/// Is `source` the one this CPU last found over its event limit, and still is?
#[inline(always)]
fn over_event_limit(source: &Addr, now_ns: u64) -> bool {
    OVER_LIMIT.get_ptr(0).is_some_and(|cached| {
        // SAFETY: per-CPU slot, only this CPU uses it while we run.
        unsafe { (*cached).source == addr_halves(source) && now_ns < (*cached).until_ns }
    })
}

/// Is `decision` about a packet from a source no device owns (for the inventory)?
#[inline(always)]
fn from_unknown_source(decision: &Decision) -> bool {
    decision.device == 0 && matches!(decision.reason, Reason::UnknownDevice | Reason::Essential)
}

/// Adds a packet from a source no device owns to the inventory: to this CPU's pending
/// count if it is the source it saw last (see `UnknownPending`), else to `UNKNOWN_SOURCES`,
/// with the pending count of the source before.
#[inline(always)]
fn remember_unknown(parsed: &Parsed, now_ns: u64) {
    let Parsed::Ip(flow) = parsed else {
        return;
    };
    let Some(pending) = UNKNOWN_PENDING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, which nothing else writes while we run.
    unsafe {
        let key = &(*pending).key;
        let [high, low] = addr_halves(&key.addr);
        if [high, low] == addr_halves(&flow.tuple.src) && mac_eq(&key.mac, &flow.src_mac) {
            (*pending).packets += 1;
            (*pending).last_seen_ns = now_ns;
            return;
        }
    }
    remember_new_unknown(flow, pending, now_ns);
}

/// The source of `flow` is not this CPU's last (`pending`): that one's packets go to
/// `UNKNOWN_SOURCES`, and so does this packet, and `flow`'s source becomes the last.
#[inline(never)]
fn remember_new_unknown(flow: &Flow, pending: *mut UnknownPending, now_ns: u64) {
    // SAFETY: this CPU's slot (see `remember_unknown`).
    let last = unsafe { *pending };
    if last.packets > 0 {
        add_unknown(&last.key, last.packets, last.last_seen_ns);
    }
    let key = UnknownKey {
        addr: flow.tuple.src,
        mac: flow.src_mac,
        _pad: [0; 2],
    };
    add_unknown(&key, 1, now_ns);
    // SAFETY: as above.
    unsafe {
        *pending = UnknownPending {
            key,
            packets: 0,
            last_seen_ns: now_ns,
        };
    }
}

/// Counts `packets` of unknown source `key`, the last at `seen_ns`, in `UNKNOWN_SOURCES`.
#[inline(always)]
fn add_unknown(key: &UnknownKey, packets: u64, seen_ns: u64) {
    match UNKNOWN_SOURCES.get_ptr_mut(key) {
        // SAFETY: plain data; a racing CPU can at worst miscount.
        Some(seen) => unsafe {
            (*seen).last_seen_ns = seen_ns;
            (*seen).packets += packets;
        },
        None => {
            let seen = UnknownSeen {
                first_seen_ns: seen_ns,
                last_seen_ns: seen_ns,
                packets,
            };
            let _ = UNKNOWN_SOURCES.insert(key, &seen, 0);
        }
    }
}

/// Sends an event for a drop, at most `EVENTS_PER_SOURCE_PER_SECOND` per source (see
/// [`event_source`]); the rest only count as suppressed.
#[inline(never)]
fn report(decision: &Decision, parsed: &Parsed, hook: u8, source: &Addr, now_ns: u64) {
    if !within_event_limit(source, now_ns) {
        bump(COUNTER_EVENTS_SUPPRESSED);
        return;
    }
    // Written in place in the ring buffer: an `Event` built on the stack first would cost
    // this function's frame its 64 bytes, and the hooks' stack is tight (512 in all).
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(COUNTER_EVENTS_SUPPRESSED);
        return;
    };
    let event = entry.write(Event {
        ts_ns: now_ns,
        reason: decision.reason as u8,
        audited: decision.audited as u8,
        hook,
        device: decision.device,
        ..Event::default()
    });
    match parsed {
        Parsed::Arp {
            sender_ip,
            sender_mac,
        } => {
            event.src = *sender_ip;
            event.mac = *sender_mac;
        }
        Parsed::Ip(flow) => {
            event.src = flow.tuple.src;
            event.dst = flow.tuple.dst;
            event.sport = flow.tuple.sport;
            event.dport = flow.tuple.dport;
            event.protocol = flow.tuple.protocol;
            event.mac = flow.src_mac;
        }
        Parsed::Fragment(fragment) => {
            event.src = fragment.src;
            event.dst = fragment.dst;
            event.protocol = fragment.protocol;
            event.mac = fragment.src_mac;
        }
    }
    entry.submit(0);
}

/// Counts an event of `source` against its limit; false if it is over, which this CPU
/// then remembers (`OVER_LIMIT`) until the limit's window ends.
#[inline(always)]
fn within_event_limit(source: &Addr, now_ns: u64) -> bool {
    let cached = OVER_LIMIT.get_ptr_mut(0);
    match EVENT_RATE.get_ptr_mut(source) {
        // SAFETY: plain data; a racing CPU can at worst miscount by one.
        Some(rate) => unsafe {
            if now_ns.saturating_sub((*rate).window_start_ns) >= 1_000_000_000 {
                (*rate).window_start_ns = now_ns;
                (*rate).events = 1;
                true
            } else if (*rate).events < EVENTS_PER_SOURCE_PER_SECOND {
                (*rate).events += 1;
                true
            } else {
                if let Some(cached) = cached {
                    *cached = OverLimit {
                        source: addr_halves(source),
                        until_ns: (*rate).window_start_ns + 1_000_000_000,
                    };
                }
                false
            }
        },
        None => {
            let fresh = EventRate {
                window_start_ns: now_ns,
                events: 1,
                _pad: 0,
            };
            let _ = EVENT_RATE.insert(source, &fresh, 0);
            true
        }
    }
}

/// XDP ingress on a device-facing interface: everything a device sends.
#[xdp]
pub fn segward_from_device(ctx: XdpContext) -> u32 {
    let config = config();
    // SAFETY: data..data_end is the frame for the duration of this call.
    let packet = unsafe { Packet::from_raw(ctx.data(), ctx.data_end()) };
    let now = now();
    let parsed = parse(&packet);
    let decision = match &parsed {
        Ok(parsed) => {
            let decision = judge_from_device(&MapTables, &config, parsed, now);
            // Checked here: the call is for the rare unknown source only.
            if from_unknown_source(&decision) {
                remember_unknown(parsed, now);
            }
            decision
        }
        Err(reason) => drop_reason(&config, *reason),
    };
    if account(
        &config,
        &decision,
        parsed.as_ref().ok(),
        HOOK_FROM_DEVICE,
        now,
    ) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// tc egress on a device-facing interface: everything sent towards a device.
#[classifier]
pub fn segward_to_device(ctx: TcContext) -> i32 {
    let config = config();
    // Headers must be in the linear part for direct access; 128 bytes cover every header we
    // read (VLAN + IPv6 with extension headers may need more, and then parse() says malformed).
    // Pulling what is linear already is not free (a helper call, and a cloned skb's head is
    // copied to make it writable), so only a short linear part is pulled.
    let wanted = ctx.len().min(128);
    if ctx.data_end() - ctx.data() < wanted as usize {
        let _ = ctx.pull_data(wanted);
    }
    // SAFETY: as above, for the skb's linear data.
    let packet = unsafe { Packet::from_raw(ctx.data(), ctx.data_end()) };
    // SAFETY: reading a field of the context the kernel handed us.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let from_device_iface = is_device_iface(ingress);
    let now = now();
    let parsed = parse(&packet);
    let decision = match &parsed {
        Ok(parsed) => judge_to_device(&MapTables, &config, parsed, from_device_iface, now),
        Err(reason) => drop_reason(&config, *reason),
    };
    if account(
        &config,
        &decision,
        parsed.as_ref().ok(),
        HOOK_TO_DEVICE,
        now,
    ) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// Is `ifindex` a device-facing interface? One array slot answers, unless it sends us to
/// `DEVICE_IFACES` (0: see [`DEVICE_IFACE_SLOT_COUNT`]).
#[inline(always)]
fn is_device_iface(ifindex: u32) -> bool {
    match DEVICE_IFACE_SLOTS.get(device_iface_slot(ifindex)).copied() {
        Some(0) | None => unsafe { DEVICE_IFACES.get(&ifindex).is_some() },
        Some(slot) => slot == ifindex,
    }
}

/// CLOCK_MONOTONIC_COARSE: one tick's resolution (4 ms at HZ=250), which every user of the
/// time can afford (idle timeouts and refreshes count in seconds, event windows are 1 s,
/// fragments get 30 s). The clock only moves once a tick, so its reading is kept with the
/// tick (`jiffies`) it was taken in, and read again only in the next one: the verifier
/// inlines `bpf_jiffies64` and the `CLOCK` lookup into a few loads, where the clock's helper
/// call costs ~14 ns a packet on a CPU whose returns are mitigated (SRSO safe RET). A reading
/// can be a tick old (jiffies advance before the clock, and CPUs race to store a tick's
/// reading), which nothing here notices: every user counts in seconds.
#[inline(always)]
fn now() -> u64 {
    // SAFETY (both helpers): plain helper calls.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: plain data; see above for racing writers.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).ns = bpf_ktime_get_coarse_ns();
            (*clock).jiffies = jiffies;
        }
        (*clock).ns
    }
}
