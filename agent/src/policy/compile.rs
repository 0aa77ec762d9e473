//! How a YAML rule becomes map entries.
//!
//! Destinations (and `accept` sources) are classified by *identity*: the set of policy
//! targets an address belongs to (its segment, its device, the gateway, every zone and CIDR
//! containing it). Identities are interned to numbers; each endpoint address carries its own,
//! and each zone prefix carries the identity of every zone/CIDR containing it, so that one
//! exact lookup plus at most one longest-prefix lookup classifies any address. Policy entries
//! are keyed by (segment, direction, identity, protocol, masked port): a lookup costs the
//! same whether the policy has ten rules or ten thousand.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use agent_ebpf::{
    maps::{
        mask_port, Addr, AddrKey, DatagramEntry, DatagramKey, Endpoint, FlowEntry, FlowKey,
        PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, ZoneIdentity, ADDR_KEY_HEADER_BITS,
        DIR_ACCEPT, DIR_ALLOW, ENDPOINT_AUDIT, ENDPOINT_CHECK_MAC, ENDPOINT_DEVICE,
        ENDPOINT_QUARANTINED, MAX_ENDPOINTS, MAX_POLICY_ENTRIES, MAX_SEGMENTS, MAX_ZONE_PREFIXES,
        PROTO_ANY, SEGMENT_AUDIT, V4_MAPPED_PREFIX_BITS,
    },
    verdict::{Tables, IDENTITY_QUARANTINED, IDENTITY_WORLD},
};
use ipnet::{IpNet, Ipv6Net};

use super::model::{canonical_net, Location, Mode, Policy, PortSpec, Source, Target};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("the policy needs {needed} {what} entries but the datapath holds {capacity}")]
    Capacity {
        what: &'static str,
        needed: usize,
        capacity: u32,
    },
}

/// A rule that policy entries point back to (`PolicyValue::rule` is its index + 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub location: Location,
    pub segment: String,
    /// `allow` or `accept`.
    pub direction: u8,
    /// The rule as a person would write it, e.g. `to: mqtt-broker ports: [8883/tcp]`.
    pub text: String,
}

/// The exact entries the datapath loads, all with generation 0 (the writer sets the slot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub endpoints: BTreeMap<AddrKey, Endpoint>,
    /// LPM entries: (prefix length in key bits, key).
    pub zones: BTreeMap<(u32, AddrKey), ZoneIdentity>,
    pub segments: BTreeMap<SegmentKey, SegmentPolicy>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub rules: Vec<RuleRef>,
    /// Segment numbers are indices here.
    pub segment_names: Vec<String>,
    /// Device numbers are indices + 1 here.
    pub device_ids: Vec<String>,
}

impl CompiledPolicy {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get((id as usize).checked_sub(1)?)
    }
}

/// What the daemon knows beyond the policy files, compiled in with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Addresses learned at run time (DHCP leases, `segward bind`), by device id. An
    /// address that the policy binds statically to another device is not used.
    pub learned: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Quarantined devices (SPEC §2 rule 3).
    pub quarantined: BTreeSet<String>,
}

/// Name of the Quarantine's segments in [`CompiledPolicy::segment_names`]: one for
/// devices of enforcing segments, one (audited) for devices of audit-mode segments.
pub const QUARANTINE_SEGMENT_NAME: &str = "quarantine";

/// An address as the datapath stores it.
pub fn addr_octets(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A CIDR as (prefix length within a 128-bit address, network address).
fn prefix_bits(net: &IpNet) -> (u32, Addr) {
    match net {
        IpNet::V4(n) => (
            V4_MAPPED_PREFIX_BITS + u32::from(n.prefix_len()),
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

fn key(addr: Addr) -> AddrKey {
    AddrKey {
        generation: 0,
        _pad: [0; 3],
        addr,
    }
}

/// What an address can belong to, as far as rules care.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Class {
    Segment(usize),
    Device(usize),
    Gateway,
    Cidr(IpNet),
}

/// Compiles `policy` for a gateway whose own addresses are `gateway_addrs`.
pub fn compile(policy: &Policy, gateway_addrs: &[IpAddr]) -> Result<CompiledPolicy, CompileError> {
    compile_with(policy, gateway_addrs, &DeviceState::default())
}

/// Compiles `policy` with the learned addresses and quarantines of `state`.
pub fn compile_with(
    policy: &Policy,
    gateway_addrs: &[IpAddr],
    state: &DeviceState,
) -> Result<CompiledPolicy, CompileError> {
    let segment_index: HashMap<&str, usize> = policy
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let device_index: HashMap<&str, usize> = policy
        .segments
        .iter()
        .flat_map(|s| &s.devices)
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    let zone_cidrs: HashMap<&str, &[IpNet]> = policy
        .zones
        .iter()
        .map(|z| (z.name.as_str(), z.cidrs.as_slice()))
        .collect();

    // Each rule's peer as the classes it matches (a zone is the union of its CIDRs).
    let classes_of_target = |t: &Target| -> Vec<Class> {
        match t {
            Target::Segment(name) => segment_index
                .get(name.as_str())
                .map(|&i| Class::Segment(i))
                .into_iter()
                .collect(),
            Target::Device(id) => device_index
                .get(id.as_str())
                .map(|&i| Class::Device(i))
                .into_iter()
                .collect(),
            Target::Zone(name) => zone_cidrs
                .get(name.as_str())
                .into_iter()
                .flat_map(|c| c.iter().map(|n| Class::Cidr(canonical_net(*n))))
                .collect(),
            Target::Cidr(net) => vec![Class::Cidr(canonical_net(*net))],
            Target::Gateway => vec![Class::Gateway],
        }
    };
    let classes_of_source = |s: &Source| -> Vec<Class> {
        match s {
            Source::Zone(name) => classes_of_target(&Target::Zone(name.clone())),
            Source::Cidr(net) => classes_of_target(&Target::Cidr(*net)),
        }
    };

    let mut out = CompiledPolicy::default();
    let mut grants: Vec<Grant> = Vec::new();
    for (s, segment) in policy.segments.iter().enumerate() {
        for rule in &segment.allow {
            out.rules.push(RuleRef {
                location: rule.location.clone(),
                segment: segment.name.clone(),
                direction: DIR_ALLOW,
                text: format!(
                    "to: {} ports: [{}]",
                    target_text(&rule.to),
                    ports_text(&rule.ports)
                ),
            });
            grants.push(Grant {
                segment: s,
                direction: DIR_ALLOW,
                peer: classes_of_target(&rule.to),
                ports: &rule.ports,
                rule: out.rules.len() as u32,
            });
        }
        for rule in &segment.accept {
            out.rules.push(RuleRef {
                location: rule.location.clone(),
                segment: segment.name.clone(),
                direction: DIR_ACCEPT,
                text: format!(
                    "from: {} ports: [{}]",
                    source_text(&rule.from),
                    ports_text(&rule.ports)
                ),
            });
            grants.push(Grant {
                segment: s,
                direction: DIR_ACCEPT,
                peer: classes_of_source(&rule.from),
                ports: &rule.ports,
                rule: out.rules.len() as u32,
            });
        }
    }
    // The Quarantine's rules, once per quarantine segment (enforcing, then audited).
    let quarantine_segment = policy.segments.len();
    for rule in policy.quarantine.iter().flat_map(|q| &q.allow) {
        out.rules.push(RuleRef {
            location: rule.location.clone(),
            segment: QUARANTINE_SEGMENT_NAME.into(),
            direction: DIR_ALLOW,
            text: format!(
                "to: {} ports: [{}]",
                target_text(&rule.to),
                ports_text(&rule.ports)
            ),
        });
        for segment in [quarantine_segment, quarantine_segment + 1] {
            grants.push(Grant {
                segment,
                direction: DIR_ALLOW,
                peer: classes_of_target(&rule.to),
                ports: &rule.ports,
                rule: out.rules.len() as u32,
            });
        }
    }
    let targeted: BTreeSet<Class> = grants.iter().flat_map(|g| g.peer.iter().cloned()).collect();
    let targeted_cidrs: Vec<IpNet> = targeted
        .iter()
        .filter_map(|c| match c {
            Class::Cidr(n) => Some(*n),
            _ => None,
        })
        .collect();
    let cidr_classes = |contains: &dyn Fn(&IpNet) -> bool| -> Vec<Class> {
        targeted_cidrs
            .iter()
            .filter(|n| contains(n))
            .map(|n| Class::Cidr(*n))
            .collect()
    };

    let statically_bound: HashMap<IpAddr, &str> = policy
        .segments
        .iter()
        .flat_map(|s| &s.devices)
        .flat_map(|d| {
            d.addresses
                .iter()
                .map(|ip| (ip.to_canonical(), d.id.as_str()))
        })
        .collect();
    let mut identities = Identities::default();
    let mut device_number = 0u32;
    for (s, segment) in policy.segments.iter().enumerate() {
        out.segment_names.push(segment.name.clone());
        let audit = segment.mode == Mode::Audit;
        for device in &segment.devices {
            device_number += 1;
            out.device_ids.push(device.id.clone());
            let learned = state.learned.get(&device.id).into_iter().flatten();
            let addresses = device.addresses.iter().chain(learned.filter(|ip| {
                statically_bound
                    .get(&ip.to_canonical())
                    .is_none_or(|owner| *owner == device.id)
            }));
            let quarantined = state.quarantined.contains(&device.id);
            let mut flags = ENDPOINT_DEVICE;
            if device.mac.is_some() {
                flags |= ENDPOINT_CHECK_MAC;
            }
            if audit {
                flags |= ENDPOINT_AUDIT;
            }
            if quarantined {
                flags |= ENDPOINT_QUARANTINED;
            }
            for ip in addresses.map(IpAddr::to_canonical) {
                let (segment, identity) = if quarantined {
                    (
                        quarantine_segment + usize::from(audit),
                        IDENTITY_QUARANTINED,
                    )
                } else {
                    let mut classes = cidr_classes(&|n| n.contains(&ip));
                    classes.extend([Class::Segment(s), Class::Device(device_number as usize - 1)]);
                    (s, identities.intern(classes, &targeted))
                };
                out.endpoints.insert(
                    key(addr_octets(ip)),
                    Endpoint {
                        device: device_number,
                        identity,
                        segment: segment as u16,
                        flags,
                        _pad: 0,
                        mac: device.mac.map_or([0; 6], |m| m.0),
                        _pad2: [0; 2],
                    },
                );
            }
        }
    }
    out.segment_names.extend([
        QUARANTINE_SEGMENT_NAME.to_owned(),
        QUARANTINE_SEGMENT_NAME.to_owned(),
    ]);
    for ip in gateway_addrs.iter().map(IpAddr::to_canonical) {
        let mut classes = cidr_classes(&|n| n.contains(&ip));
        classes.push(Class::Gateway);
        out.endpoints
            .entry(key(addr_octets(ip)))
            .or_insert(Endpoint {
                identity: identities.intern(classes, &targeted),
                ..Endpoint::default()
            });
    }
    for net in &targeted_cidrs {
        let classes = cidr_classes(&|outer| outer.contains(net));
        let (bits, addr) = prefix_bits(net);
        out.zones.insert(
            (ADDR_KEY_HEADER_BITS + bits, key(addr)),
            ZoneIdentity {
                identity: identities.intern(classes, &targeted),
            },
        );
    }
    // IPv4 addresses sit at ::ffff:0:0/96 in the trie, where an IPv6 prefix of /80 or
    // shorter (`::/0`) would match them too. An IPv6 CIDR contains no IPv4 address (as for
    // the device addresses above), so that range gets an entry of its own, for the world:
    // an IPv4 CIDR covering it all (0.0.0.0/0) already has this very key.
    let v4_space = Ipv6Net::new(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).expect("a /96");
    if targeted_cidrs
        .iter()
        .any(|n| matches!(n, IpNet::V6(v6) if v6.contains(&v4_space)))
    {
        let (bits, addr) = prefix_bits(&IpNet::V6(v4_space));
        out.zones
            .entry((ADDR_KEY_HEADER_BITS + bits, key(addr)))
            .or_insert(ZoneIdentity {
                identity: IDENTITY_WORLD,
            });
    }

    // Bit n of a segment's mask: some entry of that direction has port prefix length n.
    let mut port_prefix_masks = vec![(0u32, 0u32); out.segment_names.len()];
    for grant in &grants {
        for (classes, &identity) in &identities.numbers {
            if !grant.peer.iter().any(|c| classes.contains(c)) {
                continue;
            }
            for spec in grant.ports {
                for (port, port_prefix) in port_prefixes(spec) {
                    let entry = PolicyKey {
                        generation: 0,
                        direction: grant.direction,
                        protocol: spec.protocol.number(),
                        port_prefix,
                        segment: grant.segment as u16,
                        port,
                        identity,
                    };
                    // The first rule that applies decides: keep the earliest rule's id.
                    out.policy
                        .entry(entry)
                        .or_insert(PolicyValue { rule: grant.rule });
                    if spec.protocol.has_ports() {
                        let (allow, accept) = &mut port_prefix_masks[grant.segment];
                        let mask = if grant.direction == DIR_ALLOW {
                            allow
                        } else {
                            accept
                        };
                        *mask |= 1 << port_prefix;
                    }
                }
            }
        }
    }
    name_first_rules(&mut out.policy);
    let audited_segments = policy
        .segments
        .iter()
        .map(|s| s.mode == Mode::Audit)
        .chain([false, true]);
    for (s, audit) in audited_segments.enumerate() {
        let (allow_port_prefixes, accept_port_prefixes) = port_prefix_masks[s];
        out.segments.insert(
            SegmentKey {
                generation: 0,
                _pad: 0,
                segment: s as u16,
            },
            SegmentPolicy {
                allow_port_prefixes,
                accept_port_prefixes,
                flags: if audit { SEGMENT_AUDIT } else { 0 },
            },
        );
    }

    for (what, needed, capacity) in [
        ("endpoint", out.endpoints.len(), MAX_ENDPOINTS),
        ("zone prefix", out.zones.len(), MAX_ZONE_PREFIXES),
        ("segment", out.segments.len(), MAX_SEGMENTS),
        ("policy", out.policy.len(), MAX_POLICY_ENTRIES),
    ] {
        if needed > capacity as usize {
            return Err(CompileError::Capacity {
                what,
                needed,
                capacity,
            });
        }
    }
    Ok(out)
}

/// The datapath stops at the most port-specific entry that matches (then tries `any`), but
/// the rule that decides is the *first* that applies (SPEC §2). Every other entry a packet
/// matching an entry can match is a shorter port prefix containing it, or the `any`
/// protocol entry, so each entry takes the earliest rule among those.
fn name_first_rules(policy: &mut BTreeMap<PolicyKey, PolicyValue>) {
    let earliest: Vec<(PolicyKey, u32)> = policy
        .iter()
        .map(|(key, value)| {
            let covering = (0..key.port_prefix)
                .map(|prefix| PolicyKey {
                    port_prefix: prefix,
                    port: mask_port(key.port, prefix),
                    ..*key
                })
                .chain((key.protocol != PROTO_ANY).then_some(PolicyKey {
                    protocol: PROTO_ANY,
                    port_prefix: 0,
                    port: 0,
                    ..*key
                }));
            let first = covering
                .filter_map(|k| policy.get(&k))
                .map(|v| v.rule)
                .fold(value.rule, u32::min);
            (*key, first)
        })
        .collect();
    for (key, rule) in earliest {
        policy.insert(key, PolicyValue { rule });
    }
}

/// One rule, resolved: segment `segment` may exchange `ports` with `peer` in `direction`.
struct Grant<'a> {
    segment: usize,
    direction: u8,
    peer: Vec<Class>,
    ports: &'a [PortSpec],
    rule: u32,
}

/// Interned class sets; only classes that some rule names count.
#[derive(Default)]
struct Identities {
    numbers: BTreeMap<BTreeSet<Class>, u32>,
}

impl Identities {
    fn intern(&mut self, classes: Vec<Class>, targeted: &BTreeSet<Class>) -> u32 {
        let set: BTreeSet<Class> = classes
            .into_iter()
            .filter(|c| targeted.contains(c))
            .collect();
        if set.is_empty() {
            return IDENTITY_WORLD;
        }
        let next = self.numbers.len() as u32 + 1;
        *self.numbers.entry(set).or_insert(next)
    }
}

/// A port spec as (masked port, prefix length) entries covering exactly its range.
fn port_prefixes(spec: &PortSpec) -> Vec<(u16, u8)> {
    if !spec.protocol.has_ports() {
        return vec![(0, 0)];
    }
    let (mut lo, hi) = (u32::from(*spec.ports.start()), u32::from(*spec.ports.end()));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let prefix = 16 - size.trailing_zeros() as u8;
        out.push((mask_port(lo as u16, prefix), prefix));
        lo += size;
    }
    out
}

pub fn target_text(t: &Target) -> String {
    match t {
        Target::Segment(n) | Target::Device(n) | Target::Zone(n) => n.clone(),
        Target::Cidr(net) => net.to_string(),
        Target::Gateway => "gateway".into(),
    }
}

pub fn source_text(s: &Source) -> String {
    match s {
        Source::Zone(n) => n.clone(),
        Source::Cidr(net) => net.to_string(),
    }
}

fn ports_text(ports: &[PortSpec]) -> String {
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The compiled entries looked up the way the kernel looks them up (generation 0).
impl Tables for CompiledPolicy {
    fn endpoint(&self, key: &AddrKey) -> Option<Endpoint> {
        self.endpoints.get(key).copied()
    }

    fn zone(&self, prefix_len: u32, key: &AddrKey) -> Option<ZoneIdentity> {
        let addr = u128::from_be_bytes(key.addr);
        let max_bits = prefix_len.saturating_sub(ADDR_KEY_HEADER_BITS).min(128);
        (0..=max_bits).rev().find_map(|bits| {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            let probe = AddrKey {
                addr: (addr & mask).to_be_bytes(),
                ..*key
            };
            self.zones
                .get(&(ADDR_KEY_HEADER_BITS + bits, probe))
                .copied()
        })
    }

    fn segment(&self, key: &SegmentKey) -> Option<SegmentPolicy> {
        self.segments.get(key).copied()
    }

    fn policy(&self, key: &PolicyKey) -> Option<PolicyValue> {
        self.policy.get(key).copied()
    }

    /// A compiled policy alone has no flow table: every flow judged against it is new.
    fn tracked(&self, _key: &FlowKey) -> Option<FlowEntry> {
        None
    }

    fn track(&self, _key: &FlowKey, _entry: &FlowEntry) {}

    fn refresh(&self, _key: &FlowKey, _now_ns: u64) {}

    fn datagram(&self, _key: &DatagramKey) -> Option<DatagramEntry> {
        None
    }

    fn track_datagram(&self, _key: &DatagramKey, _entry: &DatagramEntry) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Protocol;

    fn spec(lo: u16, hi: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            ports: lo..=hi,
            location: Location {
                file: std::sync::Arc::new("t.yaml".into()),
                line: 1,
                column: 1,
            },
        }
    }

    #[test]
    fn port_ranges_become_minimal_prefixes() {
        assert_eq!(port_prefixes(&spec(8883, 8883)), vec![(8883, 16)]);
        assert_eq!(port_prefixes(&spec(0, 65535)), vec![(0, 0)]);
        // Cilium's example: 1024-65535 is 6 prefixes.
        let p = port_prefixes(&spec(1024, 65535));
        assert_eq!(
            p,
            vec![
                (1024, 6),
                (2048, 5),
                (4096, 4),
                (8192, 3),
                (16384, 2),
                (32768, 1)
            ]
        );
        assert_eq!(port_prefixes(&spec(1, 3)), vec![(1, 16), (2, 15)]);
    }

    #[test]
    fn ipv6_cidrs_cover_no_ipv4_address() {
        let yaml = "kind: Segment\nname: s\nallow: [{to: \"::/0\", ports: [any]}, \
                    {to: 10.0.0.0/8, ports: [any]}]\n";
        let policy = crate::policy::load::load_str(std::path::Path::new("t.yaml"), yaml).unwrap();
        let compiled = compile(&policy, &[]).unwrap();
        let identity = |ip: &str| {
            let addr = addr_octets(ip.parse().unwrap());
            agent_ebpf::verdict::address_identity(&compiled, &Default::default(), &addr)
        };
        assert_ne!(identity("2001:db8::1"), IDENTITY_WORLD);
        assert_ne!(identity("10.1.2.3"), IDENTITY_WORLD);
        assert_ne!(identity("10.1.2.3"), identity("2001:db8::1"));
        assert_eq!(identity("192.0.2.1"), IDENTITY_WORLD);
    }

    #[test]
    fn prefixes_cover_exactly_the_range() {
        for (lo, hi) in [
            (1, 1),
            (5, 77),
            (80, 8080),
            (1000, 65535),
            (0, 1),
            (65534, 65535),
        ] {
            let p = port_prefixes(&spec(lo, hi));
            for port in 0..=u16::MAX {
                let covered = p
                    .iter()
                    .filter(|&&(base, len)| mask_port(port, len) == base)
                    .count();
                let want = usize::from((lo..=hi).contains(&port));
                assert_eq!(covered, want, "port {port} in {lo}-{hi}: prefixes {p:?}");
            }
        }
    }
}
