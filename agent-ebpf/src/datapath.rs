//! The kernel hooks: parse with [`agent_ebpf::parse`], judge with [`agent_ebpf::verdict`],
//! count, and pass or drop. Everything else lives in the shared library.

use agent_ebpf::{
    maps::{
        Addr, AddrKey, Config, DatagramEntry, DatagramKey, Endpoint, Event, EventRate, FlowEntry,
        FlowKey, PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, UnknownKey, UnknownSeen,
        ZoneIdentity, CONFIG_REPORT_NEW_FLOWS, EVENTS_BYTES, EVENTS_PER_SOURCE_PER_SECOND,
        GENERATIONS, HOOK_FROM_DEVICE, HOOK_TO_DEVICE, MAX_DEVICE_IFACES, MAX_ENDPOINTS,
        MAX_EVENT_SOURCES, MAX_POLICY_ENTRIES, MAX_SEGMENTS, MAX_TRACKED_DATAGRAMS,
        MAX_TRACKED_FLOWS, MAX_UNKNOWN_SOURCES, MAX_ZONE_PREFIXES,
    },
    parse::{parse, Packet, Parsed},
    verdict::{
        drop_reason, judge_from_device, judge_to_device, Decision, Reason, Tables,
        COUNTER_EVENTS_SUPPRESSED, COUNTER_SLOTS,
    },
};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
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
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_TRACKED_FLOWS, 0);
#[map]
static FRAGMENTS: LruHashMap<DatagramKey, DatagramEntry> =
    LruHashMap::with_max_entries(MAX_TRACKED_DATAGRAMS, 0);
/// Sources on device-facing interfaces that no device owns: the device inventory.
#[map]
static UNKNOWN_SOURCES: LruHashMap<UnknownKey, UnknownSeen> =
    LruHashMap::with_max_entries(MAX_UNKNOWN_SOURCES, 0);
/// Interface indexes (in the gateway's namespace) of the device-facing interfaces.
#[map]
static DEVICE_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICE_IFACES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
/// Drops and audited would-be drops, for the daemon's audit log.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Per-source event rate: a flood from one source must not flood the log.
#[map]
static EVENT_RATE: LruHashMap<Addr, EventRate> = LruHashMap::with_max_entries(MAX_EVENT_SOURCES, 0);

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
    fn zone(&self, prefix_len: u32, key: &AddrKey) -> Option<ZoneIdentity> {
        ZONES.get(Key::new(prefix_len, *key)).copied()
    }

    #[inline(always)]
    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy> {
        unsafe { SEGMENTS.get(key).copied() }
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
    fn track(&self, key: &FlowKey, entry: &FlowEntry) {
        // A full LRU evicts the oldest flow; a failed insert only costs a reply re-judged.
        let _ = CONNTRACK.insert(key, entry, 0);
    }

    #[inline(always)]
    fn refresh(&self, key: &FlowKey, now_ns: u64) {
        if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
            // SAFETY: plain data; a racing writer can at worst store a similar time.
            unsafe { (*entry).last_seen_ns = now_ns };
        }
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
            report(decision, parsed, hook, now_ns);
        }
    }
    decision.passes()
}

/// Adds a packet from a source no device owns to the inventory.
#[inline(never)]
fn remember_unknown(decision: &Decision, parsed: &Parsed, now_ns: u64) {
    let Parsed::Ip(flow) = parsed else {
        return;
    };
    if decision.device != 0 || !matches!(decision.reason, Reason::UnknownDevice | Reason::Essential)
    {
        return;
    }
    let key = UnknownKey {
        addr: flow.src,
        mac: flow.src_mac,
        _pad: [0; 2],
    };
    match UNKNOWN_SOURCES.get_ptr_mut(&key) {
        // SAFETY: plain data; a racing CPU can at worst miscount by one.
        Some(seen) => unsafe {
            (*seen).last_seen_ns = now_ns;
            (*seen).packets += 1;
        },
        None => {
            let seen = UnknownSeen {
                first_seen_ns: now_ns,
                last_seen_ns: now_ns,
                packets: 1,
            };
            let _ = UNKNOWN_SOURCES.insert(&key, &seen, 0);
        }
    }
}

/// Sends an event for a drop, at most `EVENTS_PER_SOURCE_PER_SECOND` per source (a
/// device, or an unknown source address); the rest only count as suppressed.
#[inline(never)]
fn report(decision: &Decision, parsed: &Parsed, hook: u8, now_ns: u64) {
    let mut event = Event {
        ts_ns: now_ns,
        reason: decision.reason as u8,
        audited: decision.audited as u8,
        hook,
        device: decision.device,
        ..Event::default()
    };
    match parsed {
        Parsed::Arp {
            sender_ip,
            sender_mac,
        } => {
            event.src = *sender_ip;
            event.mac = *sender_mac;
        }
        Parsed::Ip(flow) => {
            event.src = flow.src;
            event.dst = flow.dst;
            event.sport = flow.sport;
            event.dport = flow.dport;
            event.protocol = flow.protocol;
            event.mac = flow.src_mac;
        }
        Parsed::Fragment(fragment) => {
            event.src = fragment.src;
            event.dst = fragment.dst;
            event.protocol = fragment.protocol;
            event.mac = fragment.src_mac;
        }
    }
    // Known devices are limited as a whole (by number, in a key no address can have).
    let source = if decision.device != 0 {
        let d = decision.device.to_be_bytes();
        [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, d[0], d[1],
            d[2], d[3],
        ]
    } else if hook == HOOK_TO_DEVICE {
        event.dst
    } else {
        event.src
    };
    let within_limit = match EVENT_RATE.get_ptr_mut(&source) {
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
                false
            }
        },
        None => {
            let fresh = EventRate {
                window_start_ns: now_ns,
                events: 1,
                _pad: 0,
            };
            let _ = EVENT_RATE.insert(&source, &fresh, 0);
            true
        }
    };
    if !within_limit || EVENTS.output::<Event>(&event, 0).is_err() {
        bump(COUNTER_EVENTS_SUPPRESSED);
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
            remember_unknown(&decision, parsed, now);
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
    let _ = ctx.pull_data(ctx.len().min(128));
    // SAFETY: as above, for the skb's linear data.
    let packet = unsafe { Packet::from_raw(ctx.data(), ctx.data_end()) };
    // SAFETY: reading a field of the context the kernel handed us.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let from_device_iface = unsafe { DEVICE_IFACES.get(&ingress).is_some() };
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

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_ns() }
}
