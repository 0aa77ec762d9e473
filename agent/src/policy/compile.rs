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
        PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, ZoneIdentity, ZoneKey, ZoneLengths,
        DIR_ACCEPT, DIR_ALLOW, ENDPOINT_AUDIT, ENDPOINT_CHECK_MAC, ENDPOINT_DEVICE,
        ENDPOINT_QUARANTINED, MAX_ENDPOINTS, MAX_POLICY_ENTRIES, MAX_SEGMENTS, MAX_ZONE_LENGTHS,
        MAX_ZONE_PREFIXES, PREFIXES_ANY_PROTOCOL, PREFIXES_PORTLESS, PROTO_ANY, SEGMENT_AUDIT,
        V4_MAPPED_PREFIX_BITS,
    },
    verdict::{Tables, IDENTITY_QUARANTINED, IDENTITY_WORLD},
};
use ipnet::{IpNet, Ipv6Net};

use super::model::{
    canonical_net, Device, DeviceIndex, Location, Mode, Policy, PortSpec, Source, Target,
};

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
    pub zones: BTreeMap<ZoneKey, ZoneIdentity>,
    /// The prefix lengths of `zones`.
    pub zone_lengths: ZoneLengths,
    pub segments: BTreeMap<SegmentKey, SegmentPolicy>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub rules: Vec<RuleRef>,
    /// Segment numbers are indices here.
    pub segment_names: Vec<String>,
    pub device_ids: DeviceIds,
    /// How addresses were classified, kept so that one device's endpoints can be compiled
    /// again on their own (see [`CompiledPolicy::recompile_devices`]).
    classification: Classification,
    /// The gateway's own endpoints, which a device's address takes precedence over.
    gateway: BTreeMap<AddrKey, Endpoint>,
    /// The keys of `endpoints` that are devices', by device number, so that a device's
    /// endpoints are found without a walk over all of them.
    device_endpoints: BTreeSet<(u32, AddrKey)>,
}

/// The ids of a compilation's devices by number (from 1), in one string: as a `String`
/// each, 100k ids would take four times the bytes they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceIds {
    text: String,
    /// Where each id ends in `text`.
    ends: Vec<u32>,
}

impl DeviceIds {
    fn push(&mut self, id: &str) {
        self.text.push_str(id);
        self.ends.push(self.text.len() as u32);
    }

    /// The id of device `number`.
    pub fn get(&self, number: u32) -> Option<&str> {
        let index = (number as usize).checked_sub(1)?;
        let end = *self.ends.get(index)? as usize;
        let start = index.checked_sub(1).map_or(0, |i| self.ends[i] as usize);
        Some(&self.text[start..end])
    }
}

/// Entries to write (`Some`) or remove (`None`), map by map, in the order of the keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryChanges {
    pub endpoints: Vec<(AddrKey, Option<Endpoint>)>,
    pub zones: Vec<(ZoneKey, Option<ZoneIdentity>)>,
    pub segments: Vec<(SegmentKey, Option<SegmentPolicy>)>,
    pub policy: Vec<(PolicyKey, Option<PolicyValue>)>,
    /// New zone prefix lengths, when they change.
    pub zone_lengths: Option<ZoneLengths>,
}

impl EntryChanges {
    /// What turns the entries of `old` into those of `new`.
    pub fn between(old: &CompiledPolicy, new: &CompiledPolicy) -> EntryChanges {
        EntryChanges {
            endpoints: changes(&old.endpoints, &new.endpoints),
            zones: changes(&old.zones, &new.zones),
            segments: changes(&old.segments, &new.segments),
            policy: changes(&old.policy, &new.policy),
            zone_lengths: (old.zone_lengths != new.zone_lengths).then_some(new.zone_lengths),
        }
    }

    /// How many entries change.
    pub fn len(&self) -> usize {
        self.endpoints.len()
            + self.zones.len()
            + self.segments.len()
            + self.policy.len()
            + usize::from(self.zone_lengths.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The changes from `old` to `new`, in one walk over both.
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> Vec<(K, Option<V>)> {
    use std::cmp::Ordering;
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    let mut out = Vec::new();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return out,
            (Some((&k, _)), None) => {
                out.push((k, None));
                old.next();
            }
            (None, Some((&k, &v))) => {
                out.push((k, Some(v)));
                new.next();
            }
            (Some((&ko, vo)), Some((&kn, &vn))) => match ko.cmp(&kn) {
                Ordering::Less => {
                    out.push((ko, None));
                    old.next();
                }
                Ordering::Greater => {
                    out.push((kn, Some(vn)));
                    new.next();
                }
                Ordering::Equal => {
                    if **vo != vn {
                        out.push((kn, Some(vn)));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
}

fn apply<K: Ord + Copy, V: Copy>(map: &mut BTreeMap<K, V>, changes: &[(K, Option<V>)]) {
    for (k, v) in changes {
        match v {
            Some(v) => map.insert(*k, *v),
            None => map.remove(k),
        };
    }
}

impl CompiledPolicy {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get((id as usize).checked_sub(1)?)
    }

    /// Applies `changes` to the entries (rules and names stay as they are).
    pub fn apply(&mut self, changes: &EntryChanges) {
        for (k, v) in &changes.endpoints {
            let old = match v {
                Some(v) => self.endpoints.insert(*k, *v),
                None => self.endpoints.remove(k),
            };
            if let Some(old) = old.filter(is_device) {
                self.device_endpoints.remove(&(old.device, *k));
            }
            if let Some(new) = v.filter(is_device) {
                self.device_endpoints.insert((new.device, *k));
            }
        }
        apply(&mut self.zones, &changes.zones);
        apply(&mut self.segments, &changes.segments);
        apply(&mut self.policy, &changes.policy);
        if let Some(lengths) = changes.zone_lengths {
            self.zone_lengths = lengths;
        }
    }

    /// The endpoint changes that compiling `policy` (the policy this was compiled from,
    /// whose devices `index` indexes) with `state` makes to the devices `devices`, whose
    /// learned addresses or quarantine changed; everything else stays. Costs lookups of
    /// those devices only, not a compilation. `None` when the full compilation is needed: a
    /// device's address needs an identity this compilation does not have, or is taken from
    /// an owner not in `devices`.
    pub fn recompile_devices(
        &self,
        policy: &Policy,
        index: &DeviceIndex,
        state: &DeviceState,
        devices: &BTreeSet<String>,
    ) -> Option<EntryChanges> {
        let identities = &self.classification.identities;
        let mut wanted = BTreeMap::new();
        let mut current = BTreeMap::new();
        let mut numbers = BTreeSet::new();
        for id in devices {
            // Not a device of the policy: it has no endpoints.
            let Some(at) = index.by_id(policy, id) else {
                continue;
            };
            if self.device_ids.get(at.number) != Some(id.as_str()) {
                return None; // not the policy this was compiled from
            }
            numbers.insert(at.number);
            // Learned addresses that the policy binds statically to another device are not
            // used.
            let learned = state.learned.get(id).into_iter().flatten().filter(|ip| {
                index
                    .static_owner(**ip)
                    .is_none_or(|owner| owner == at.number)
            });
            let place = DevicePlace {
                segment: at.segment_index,
                number: at.number,
                audit: at.segment.mode == Mode::Audit,
                quarantine_segment: policy.segments.len(),
            };
            wanted.extend(place.endpoints(
                at.device,
                at.device.addresses.iter().chain(learned).copied(),
                state.quarantined.contains(id),
                &self.classification.classifier,
                |set| identities.find(set),
            )?);
            // Every key of device `n` lies between (n, the least key) and (n + 1, it).
            let least = key([0; 16]);
            current.extend(
                self.device_endpoints
                    .range((at.number, least)..(at.number + 1, least))
                    .map(|&(_, k)| (k, self.endpoints[&k])),
            );
        }
        let taken_from_others = wanted.keys().any(|k| {
            self.endpoints
                .get(k)
                .is_some_and(|e| !numbers.contains(&e.device) && is_device(e))
        });
        if taken_from_others {
            return None;
        }
        let mut endpoints = changes(&current, &wanted);
        // An address a device gives up that is the gateway's goes back to the gateway.
        for (k, v) in &mut endpoints {
            if v.is_none() {
                *v = self.gateway.get(k).copied();
            }
        }
        Some(EntryChanges {
            endpoints,
            ..EntryChanges::default()
        })
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

/// A CIDR as a `ZONE_PREFIXES` key (generation 0).
fn zone_key(net: &IpNet) -> ZoneKey {
    let (prefix_len, addr) = match net {
        IpNet::V4(n) => (
            V4_MAPPED_PREFIX_BITS as u8 + n.prefix_len(),
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (n.prefix_len(), n.network().octets()),
    };
    ZoneKey {
        prefix_len,
        addr,
        ..ZoneKey::default()
    }
}

/// Whether `endpoint` is a device's (not the gateway's).
fn is_device(endpoint: &Endpoint) -> bool {
    endpoint.flags & ENDPOINT_DEVICE != 0
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
    let classifier = Classifier::new(grants.iter().flat_map(|g| g.peer.iter().cloned()).collect());
    let statically_bound: HashMap<IpAddr, &str> = static_addresses(policy).collect();
    let mut identities = Identities::default();
    let mut device_number = 0u32;
    let mut device_endpoints: Vec<(AddrKey, Endpoint)> = Vec::new();
    for (s, segment) in policy.segments.iter().enumerate() {
        out.segment_names.push(segment.name.clone());
        for device in &segment.devices {
            device_number += 1;
            out.device_ids.push(&device.id);
            let learned = state.learned.get(&device.id).into_iter().flatten();
            let addresses = device.addresses.iter().chain(learned.filter(|ip| {
                statically_bound
                    .get(&ip.to_canonical())
                    .is_none_or(|owner| *owner == device.id)
            }));
            let placed = DevicePlace {
                segment: s,
                number: device_number,
                audit: segment.mode == Mode::Audit,
                quarantine_segment,
            };
            let entries = placed.endpoints(
                device,
                addresses.copied(),
                state.quarantined.contains(&device.id),
                &classifier,
                |set| Some(identities.intern(set)),
            );
            device_endpoints.extend(entries.expect("interning always finds an identity"));
        }
    }
    // Maps built from all their entries at once are packed full: a third smaller than maps
    // built one insert at a time. An address learned by two devices is the later one's: the
    // entries are ordered so that it comes first among those of its address, and is kept.
    device_endpoints.sort_by_key(|(k, _)| *k);
    device_endpoints.reverse();
    device_endpoints.dedup_by_key(|(k, _)| *k);
    out.device_endpoints = device_endpoints
        .iter()
        .map(|(k, e)| (e.device, *k))
        .collect();
    out.endpoints = device_endpoints.into_iter().collect();
    out.segment_names.extend([
        QUARANTINE_SEGMENT_NAME.to_owned(),
        QUARANTINE_SEGMENT_NAME.to_owned(),
    ]);
    for ip in gateway_addrs.iter().map(IpAddr::to_canonical) {
        let mut classes = classifier.cidr_classes(IpNet::from(ip));
        classes.push(Class::Gateway);
        let endpoint = Endpoint {
            identity: identities.intern(classifier.targeted_set(classes)),
            ..Endpoint::default()
        };
        out.gateway.insert(key(addr_octets(ip)), endpoint);
        out.endpoints
            .entry(key(addr_octets(ip)))
            .or_insert(endpoint);
    }
    for net in &classifier.targeted_cidrs {
        let classes = classifier.cidr_classes(*net);
        out.zones.insert(
            zone_key(net),
            ZoneIdentity {
                identity: identities.intern(classifier.targeted_set(classes)),
            },
        );
    }
    // IPv4 addresses sit at ::ffff:0:0/96 among the prefixes, where an IPv6 prefix of /80 or
    // shorter (`::/0`) would match them too. An IPv6 CIDR contains no IPv4 address (as for
    // the device addresses above), so that range gets an entry of its own, for the world:
    // an IPv4 CIDR covering it all (0.0.0.0/0) already has this very key.
    let v4_space = Ipv6Net::new(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).expect("a /96");
    if classifier
        .targeted_cidrs
        .iter()
        .any(|n| matches!(n, IpNet::V6(v6) if v6.contains(&v4_space)))
    {
        out.zones
            .entry(zone_key(&IpNet::V6(v4_space)))
            .or_insert(ZoneIdentity {
                identity: IDENTITY_WORLD,
            });
    }

    // Bit n of a segment's mask: some entry of that direction has port prefix length n
    // (or a protocol without ports, or `any`).
    let mut port_prefix_masks = vec![(0u32, 0u32); out.segment_names.len()];
    // The identities that contain each class, so that a rule visits only the identities
    // it grants (all of them for each rule would grow with rules × identities).
    let mut containing: HashMap<&Class, Vec<u32>> = HashMap::new();
    for (classes, &identity) in &identities.0 {
        for class in classes {
            containing.entry(class).or_default().push(identity);
        }
    }
    for grant in &grants {
        let granted: BTreeSet<u32> = grant
            .peer
            .iter()
            .filter_map(|c| containing.get(c))
            .flatten()
            .copied()
            .collect();
        for identity in granted {
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
                    let (allow, accept) = &mut port_prefix_masks[grant.segment];
                    let mask = if grant.direction == DIR_ALLOW {
                        allow
                    } else {
                        accept
                    };
                    *mask |= match spec.protocol.number() {
                        PROTO_ANY => PREFIXES_ANY_PROTOCOL,
                        _ if spec.protocol.has_ports() => 1 << port_prefix,
                        _ => PREFIXES_PORTLESS,
                    };
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

    out.zone_lengths =
        ZoneLengths::of(out.zones.keys().copied()).map_err(|needed| CompileError::Capacity {
            what: "zone prefix length",
            needed,
            capacity: MAX_ZONE_LENGTHS as u32,
        })?;
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
    out.classification = Classification {
        classifier,
        identities,
    };
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

/// Every static address of `policy`, with its device.
fn static_addresses(policy: &Policy) -> impl Iterator<Item = (IpAddr, &str)> {
    policy
        .segments
        .iter()
        .flat_map(|s| &s.devices)
        .flat_map(|d| {
            d.addresses
                .iter()
                .map(move |ip| (ip.to_canonical(), d.id.as_str()))
        })
}

/// One rule, resolved: segment `segment` may exchange `ports` with `peer` in `direction`.
struct Grant<'a> {
    segment: usize,
    direction: u8,
    peer: Vec<Class>,
    ports: &'a [PortSpec],
    rule: u32,
}

/// How a compilation classifies addresses: the classes some rule names, and the class
/// sets it has interned as identities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Classification {
    classifier: Classifier,
    identities: Identities,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Classifier {
    targeted: BTreeSet<Class>,
    targeted_cidrs: Vec<IpNet>,
    /// The prefix lengths of `targeted_cidrs`, IPv4's and IPv6's apart: the targeted CIDRs
    /// containing an address are found with one lookup per length, not a test of each.
    v4_lengths: BTreeSet<u8>,
    v6_lengths: BTreeSet<u8>,
}

impl Classifier {
    fn new(targeted: BTreeSet<Class>) -> Classifier {
        let targeted_cidrs: Vec<IpNet> = targeted
            .iter()
            .filter_map(|c| match c {
                Class::Cidr(n) => Some(*n),
                _ => None,
            })
            .collect();
        let lengths = |v4: bool| {
            targeted_cidrs
                .iter()
                .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                .map(|n| n.prefix_len())
                .collect()
        };
        Classifier {
            v4_lengths: lengths(true),
            v6_lengths: lengths(false),
            targeted_cidrs,
            targeted,
        }
    }

    /// The targeted CIDRs that contain `net` (of its own family: an IPv6 CIDR contains no
    /// IPv4 address), as classes; an address is the CIDR of its full length.
    fn cidr_classes(&self, net: IpNet) -> Vec<Class> {
        let lengths = match net {
            IpNet::V4(_) => &self.v4_lengths,
            IpNet::V6(_) => &self.v6_lengths,
        };
        lengths
            .range(..=net.prefix_len())
            .filter_map(|&len| {
                let outer = Class::Cidr(IpNet::new(net.addr(), len).ok()?.trunc());
                self.targeted.contains(&outer).then_some(outer)
            })
            .collect()
    }

    /// The targeted part of `classes`; `None` (nothing targeted) is the world.
    fn targeted_set(&self, classes: Vec<Class>) -> Option<BTreeSet<Class>> {
        let set: BTreeSet<Class> = classes
            .into_iter()
            .filter(|c| self.targeted.contains(c))
            .collect();
        (!set.is_empty()).then_some(set)
    }
}

/// Interned class sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Identities(BTreeMap<BTreeSet<Class>, u32>);

impl Identities {
    fn intern(&mut self, set: Option<BTreeSet<Class>>) -> u32 {
        let Some(set) = set else {
            return IDENTITY_WORLD;
        };
        let next = self.0.len() as u32 + 1;
        *self.0.entry(set).or_insert(next)
    }

    /// The identity of `set` if it is interned already.
    fn find(&self, set: Option<BTreeSet<Class>>) -> Option<u32> {
        match set {
            None => Some(IDENTITY_WORLD),
            Some(set) => self.0.get(&set).copied(),
        }
    }
}

/// Where a device sits in a compiled policy.
struct DevicePlace {
    segment: usize,
    /// Its number in the datapath (see [`DeviceIds`]).
    number: u32,
    audit: bool,
    quarantine_segment: usize,
}

impl DevicePlace {
    /// The endpoint entries of `device` at `addresses`; `identity` turns an address's
    /// targeted classes into its identity, or gives up (then so does this).
    fn endpoints(
        &self,
        device: &Device,
        addresses: impl Iterator<Item = IpAddr>,
        quarantined: bool,
        classifier: &Classifier,
        mut identity: impl FnMut(Option<BTreeSet<Class>>) -> Option<u32>,
    ) -> Option<Vec<(AddrKey, Endpoint)>> {
        let mut flags = ENDPOINT_DEVICE;
        if device.mac.is_some() {
            flags |= ENDPOINT_CHECK_MAC;
        }
        if self.audit {
            flags |= ENDPOINT_AUDIT;
        }
        if quarantined {
            flags |= ENDPOINT_QUARANTINED;
        }
        addresses
            .map(|ip| ip.to_canonical())
            .map(|ip| {
                let (segment, identity) = if quarantined {
                    (
                        self.quarantine_segment + usize::from(self.audit),
                        IDENTITY_QUARANTINED,
                    )
                } else {
                    let mut classes = classifier.cidr_classes(IpNet::from(ip));
                    classes.extend([
                        Class::Segment(self.segment),
                        Class::Device(self.number as usize - 1),
                    ]);
                    (self.segment, identity(classifier.targeted_set(classes))?)
                };
                Some((
                    key(addr_octets(ip)),
                    Endpoint {
                        device: self.number,
                        identity,
                        segment: segment as u16,
                        flags,
                        _pad: 0,
                        mac: device.mac.map_or([0; 6], |m| m.0),
                        _pad2: [0; 2],
                    },
                ))
            })
            .collect()
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

    fn zone(&self, key: &AddrKey) -> Option<ZoneIdentity> {
        let addr = u128::from_be_bytes(key.addr);
        (0..=128u8).rev().find_map(|bits| {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            let probe = ZoneKey {
                generation: key.generation,
                prefix_len: bits,
                _pad: [0; 2],
                addr: (addr & mask).to_be_bytes(),
            };
            self.zones.get(&probe).copied()
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

    fn update(&self, _key: &FlowKey, _change: impl FnOnce(&mut FlowEntry)) -> bool {
        false
    }

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
    fn device_ids_by_number() {
        let mut ids = DeviceIds::default();
        for id in ["cam-1", "p", "sensor-22"] {
            ids.push(id);
        }
        let got: Vec<Option<&str>> = (0..5).map(|n| ids.get(n)).collect();
        assert_eq!(
            got,
            [None, Some("cam-1"), Some("p"), Some("sensor-22"), None]
        );
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

    /// What an endpoint means, whatever numbers its compilation gave identities: the
    /// class set behind its identity (`None`: the world; quarantined endpoints carry none).
    fn meaning(
        p: &CompiledPolicy,
        e: &Endpoint,
    ) -> (u32, u16, u8, [u8; 6], Option<BTreeSet<Class>>) {
        let classes = p
            .classification
            .identities
            .0
            .iter()
            .find(|(_, &n)| n == e.identity)
            .map(|(set, _)| set.clone());
        (e.device, e.segment, e.flags, e.mac, classes)
    }

    #[test]
    fn recompiling_devices_gives_what_a_full_compilation_gives() {
        let yaml = "kind: Zone\nname: plant\ncidrs: [10.1.0.0/16]\n---\n\
            kind: Segment\nname: a\ndevices:\n\
            - {id: a1, mac: \"02:00:00:00:00:01\", addresses: [10.1.0.1]}\n\
            - {id: a2, addresses: [10.2.0.1]}\n\
            allow: [{to: b, ports: [80/tcp]}]\n---\n\
            kind: Segment\nname: b\nmode: audit\ndevices:\n\
            - {id: b1, addresses: [10.1.0.5]}\n- {id: b2, addresses: []}\n\
            allow: [{to: plant, ports: [any]}, {to: a1, ports: [22/tcp]}]\n---\n\
            kind: Quarantine\nallow: [{to: plant, ports: [443/tcp]}]\n";
        let policy = crate::policy::load::load_str(std::path::Path::new("t.yaml"), yaml).unwrap();
        let index = DeviceIndex::new(&policy);
        let gateway: Vec<IpAddr> = vec!["10.1.0.254".parse().unwrap()];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let learned = |pairs: &[(&str, &str)]| -> BTreeMap<String, BTreeSet<IpAddr>> {
            let mut m: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
            for (d, a) in pairs {
                m.entry(d.to_string()).or_default().insert(ip(a));
            }
            m
        };
        let state = |pairs: &[(&str, &str)], quarantined: &[&str]| DeviceState {
            learned: learned(pairs),
            quarantined: quarantined.iter().map(|d| d.to_string()).collect(),
        };
        // Each step: the state after it. Consecutive states are patched one to the next.
        let steps = [
            state(&[], &[]),
            state(&[("a2", "10.2.0.7")], &[]), // same identity as a2's own
            state(&[("b1", "10.2.0.7")], &[]), // moved to another segment
            state(&[("b1", "10.2.0.7"), ("b2", "10.1.0.6")], &[]), // b2's first address
            state(&[("b1", "10.2.0.7"), ("b2", "10.1.0.6")], &["a1"]),
            state(&[("b2", "10.1.0.6")], &["a1", "b2"]), // audit-segment quarantine
            state(&[("b2", "10.1.0.6")], &["b2"]),       // release
            state(&[("a2", "10.1.0.9")], &[]),           // needs a new identity
            state(&[("a2", "10.1.0.254")], &[]),         // the gateway's address
            state(&[], &[]),                             // ... given back
            state(&[("b1", "10.1.0.1")], &[]),           // a1's static address
        ];
        let mut patched_steps = 0;
        for pair in steps.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            let touched: BTreeSet<String> = ["a1", "a2", "b1", "b2"]
                .into_iter()
                .filter(|d| {
                    before.learned.get(*d) != after.learned.get(*d)
                        || before.quarantined.contains(*d) != after.quarantined.contains(*d)
                })
                .map(String::from)
                .collect();
            let mut patched = compile_with(&policy, &gateway, before).unwrap();
            let full = compile_with(&policy, &gateway, after).unwrap();
            let Some(changes) = patched.recompile_devices(&policy, &index, after, &touched) else {
                continue;
            };
            patched_steps += 1;
            patched.apply(&changes);
            let keys: BTreeSet<&AddrKey> = patched
                .endpoints
                .keys()
                .chain(full.endpoints.keys())
                .collect();
            for k in keys {
                let p = patched.endpoints.get(k).map(|e| meaning(&patched, e));
                let f = full.endpoints.get(k).map(|e| meaning(&full, e));
                assert_eq!(p, f, "{before:?} → {after:?}: endpoint {:?}", k.addr);
            }
        }
        assert!(
            patched_steps >= 7,
            "only {patched_steps} of {} steps could be patched",
            steps.len() - 1
        );
    }
}
