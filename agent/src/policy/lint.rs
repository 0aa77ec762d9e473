//! Lints: what a valid policy says that its author probably did not mean (SPEC §3, `check`).
//!
//! The loader has already rejected everything that is invalid (unknown targets, duplicate
//! names, devices and addresses); these checks run on a loaded [`Policy`] and report, at the
//! `file:line:col` of the item concerned, rules that change nothing, rules that reach further
//! than they seem to, devices that can never be identified, and policies that do not fit the
//! datapath's maps. Most are warnings (`check --strict` fails on them); errors are kept for
//! what cannot work as written.

use std::collections::HashMap;

use ipnet::IpNet;

use super::{
    compile::{compile, target_text, CompiledPolicy},
    diagnostic::Diagnostics,
    model::{
        canonical_net, AcceptRule, AllowRule, Device, Location, MacAddr, Policy, PortSpec,
        Protocol, Source, Target,
    },
};

/// Runs every lint on `policy`. The diagnostics are in the order the lints found them; sort
/// them for display.
pub fn lint(policy: &Policy) -> Diagnostics {
    let index = Index::new(policy);
    let mut out = Diagnostics::new();
    let lists = rule_lists(policy);
    for list in &lists {
        shadowed_rules(&index, list, &mut out);
        redundant_port_specs(list, &mut out);
        rules_reaching_devices(&index, list, &mut out);
        wide_open_rules(&index, list, &mut out);
    }
    segments_without_devices(policy, &mut out);
    devices_without_address(policy, &mut out);
    duplicate_macs(policy, &mut out);
    capacity(policy, &mut out);
    out
}

/// Share of a map's capacity above which `check` warns.
const CAPACITY_WARNING_PERCENT: usize = 80;

/// Networks at least this large (prefix length at most this) count as "a large share of the
/// internet" for [`wide_open_rules`]: a /8 of IPv4, a whole ISP allocation of IPv6.
const BROAD_V4_PREFIX: u8 = 8;
const BROAD_V6_PREFIX: u8 = 32;

/// Port ranges at least this wide count as "every service" for [`wide_open_rules`].
const WIDE_PORT_RANGE: u32 = 1024;

/// How many devices a message names before it says "and N more".
const MAX_NAMED_DEVICES: usize = 6;

/// Lookups over the policy's names.
struct Index<'p> {
    /// Zone name → its CIDRs, canonical (see [`Index::nets`]).
    zones: HashMap<&'p str, Vec<IpNet>>,
    /// Device id → its segment's name.
    segment_of: HashMap<&'p str, &'p str>,
    /// Every device with static addresses, with its segment's name, in policy order.
    addressed: Vec<(&'p Device, &'p str)>,
}

impl<'p> Index<'p> {
    fn new(policy: &'p Policy) -> Self {
        let devices = || {
            policy
                .segments
                .iter()
                .flat_map(|s| s.devices.iter().map(move |d| (d, s.name.as_str())))
        };
        Index {
            zones: policy
                .zones
                .iter()
                .map(|z| {
                    let cidrs = z.cidrs.iter().copied().map(canonical_net).collect();
                    (z.name.as_str(), cidrs)
                })
                .collect(),
            segment_of: devices().map(|(d, s)| (d.id.as_str(), s)).collect(),
            addressed: devices().filter(|(d, _)| !d.addresses.is_empty()).collect(),
        }
    }

    /// The networks a zone or CIDR peer stands for; empty for other peers. IPv4-mapped IPv6
    /// CIDRs are written as the IPv4 ones, so that `::ffff:10.0.0.0/104` is `10.0.0.0/8`.
    fn nets(&self, peer: &Target) -> Vec<IpNet> {
        match peer {
            Target::Cidr(net) => vec![canonical_net(*net)],
            Target::Zone(name) => self.zones.get(name.as_str()).cloned().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Whether every address that `inner` matches is matched by `outer` too.
    fn covers(&self, outer: &Target, inner: &Target) -> bool {
        if outer == inner {
            return true;
        }
        match (outer, inner) {
            (Target::Segment(segment), Target::Device(id)) => {
                self.segment_of.get(id.as_str()) == Some(&segment.as_str())
            }
            (Target::Zone(_) | Target::Cidr(_), Target::Zone(_) | Target::Cidr(_)) => {
                // Adjacent CIDRs of a zone together cover what neither covers alone.
                let outer = IpNet::aggregate(&self.nets(outer));
                self.nets(inner)
                    .iter()
                    .all(|net| outer.iter().any(|o| o.contains(net)))
            }
            _ => false,
        }
    }

    /// Devices with a static address inside `peer` (a zone or CIDR).
    fn devices_inside(&self, peer: &Target) -> Vec<(&'p Device, &'p str)> {
        let nets = self.nets(peer);
        self.addressed
            .iter()
            .filter(|(device, _)| {
                device.addresses.iter().any(|ip| {
                    let ip = ip.to_canonical();
                    nets.iter().any(|net| net.contains(&ip))
                })
            })
            .copied()
            .collect()
    }
}

#[derive(Clone, Copy)]
enum RuleKind {
    Allow,
    Accept,
    QuarantineAllow,
}

impl RuleKind {
    fn name(self) -> &'static str {
        match self {
            RuleKind::Allow => "allow rule",
            RuleKind::Accept => "accept rule",
            RuleKind::QuarantineAllow => "quarantine allow rule",
        }
    }

    fn key(self) -> &'static str {
        match self {
            RuleKind::Accept => "from",
            RuleKind::Allow | RuleKind::QuarantineAllow => "to",
        }
    }
}

/// An `allow` or `accept` rule with its peer as a [`Target`] (accept sources are a subset).
struct Rule<'p> {
    peer: Target,
    ports: &'p [PortSpec],
    location: &'p Location,
}

/// The rules that are judged together: one segment's `allow`, its `accept`, or the
/// quarantine's `allow`.
struct RuleList<'p> {
    kind: RuleKind,
    rules: Vec<Rule<'p>>,
}

impl RuleList<'_> {
    /// A rule as written, e.g. `to: ntp ports: [123/udp]`.
    fn text(&self, rule: &Rule) -> String {
        let peer = target_text(&rule.peer);
        let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        format!("{}: {peer} ports: [{}]", self.kind.key(), ports.join(", "))
    }
}

impl<'p> From<&'p AllowRule> for Rule<'p> {
    fn from(rule: &'p AllowRule) -> Self {
        Rule {
            peer: rule.to.clone(),
            ports: &rule.ports,
            location: &rule.location,
        }
    }
}

impl<'p> From<&'p AcceptRule> for Rule<'p> {
    fn from(rule: &'p AcceptRule) -> Self {
        let peer = match &rule.from {
            Source::Zone(name) => Target::Zone(name.clone()),
            Source::Cidr(net) => Target::Cidr(*net),
        };
        Rule {
            peer,
            ports: &rule.ports,
            location: &rule.location,
        }
    }
}

fn rule_lists(policy: &Policy) -> Vec<RuleList<'_>> {
    let mut lists = Vec::new();
    for segment in &policy.segments {
        lists.push(RuleList {
            kind: RuleKind::Allow,
            rules: segment.allow.iter().map(Rule::from).collect(),
        });
        lists.push(RuleList {
            kind: RuleKind::Accept,
            rules: segment.accept.iter().map(Rule::from).collect(),
        });
    }
    if let Some(quarantine) = &policy.quarantine {
        lists.push(RuleList {
            kind: RuleKind::QuarantineAllow,
            rules: quarantine.allow.iter().map(Rule::from).collect(),
        });
    }
    lists
}

/// `file:line` of a location, for naming another rule in a message.
fn file_line(location: &Location) -> String {
    format!("{}:{}", location.file.display(), location.line)
}

/// Whether the union of `by` admits every packet that `spec` admits.
fn spec_covered(by: &[&PortSpec], spec: &PortSpec) -> bool {
    if by.iter().any(|p| p.protocol == Protocol::Any) {
        return true;
    }
    let mut ranges: Vec<(u32, u32)> = by
        .iter()
        .filter(|p| p.protocol == spec.protocol)
        .map(|p| (u32::from(*p.ports.start()), u32::from(*p.ports.end())))
        .collect();
    ranges.sort_unstable();
    // Sweep up from the spec's first port; each range that starts at or below the next port
    // still to cover extends the covered stretch.
    let mut next = u32::from(*spec.ports.start());
    let end = u32::from(*spec.ports.end());
    for (low, high) in ranges {
        if low > next {
            break;
        }
        next = next.max(high + 1);
        if next > end {
            return true;
        }
    }
    false
}

fn ports_covered(by: &[PortSpec], ports: &[PortSpec]) -> bool {
    let by: Vec<&PortSpec> = by.iter().collect();
    ports.iter().all(|spec| spec_covered(&by, spec))
}

/// A rule that another rule of the same list already covers (same or wider peer, same or
/// wider ports) changes no verdict.
fn shadowed_rules(index: &Index, list: &RuleList, out: &mut Diagnostics) {
    let covers = |outer: &Rule, inner: &Rule| {
        index.covers(&outer.peer, &inner.peer) && ports_covered(outer.ports, inner.ports)
    };
    for (i, rule) in list.rules.iter().enumerate() {
        // Of two rules that cover each other, only the later one is reported.
        let covering =
            list.rules.iter().enumerate().find(|&(j, other)| {
                j != i && covers(other, rule) && (j < i || !covers(rule, other))
            });
        let Some((_, other)) = covering else { continue };
        let (text, other_text) = (list.text(rule), list.text(other));
        let at = file_line(other.location);
        let kind = list.kind.name();
        let message = if !covers(rule, other) {
            format!(
                "{kind} \"{text}\" is shadowed by the broader rule at {at} (\"{other_text}\"): \
                 it adds nothing; remove it, or narrow the broader rule"
            )
        } else if text == other_text {
            format!("{kind} \"{text}\" repeats the rule at {at}; remove one of them")
        } else {
            format!(
                "{kind} \"{text}\" matches exactly what the rule at {at} (\"{other_text}\") \
                 matches; remove one of them"
            )
        };
        out.warning(rule.location.clone(), message);
    }
}

/// A port spec that another spec of the same rule already covers, e.g. `22/tcp` next to `tcp`.
fn redundant_port_specs(list: &RuleList, out: &mut Diagnostics) {
    for rule in &list.rules {
        for (i, spec) in rule.ports.iter().enumerate() {
            // Of two equal specs, only the later one is reported.
            let covering = rule.ports.iter().enumerate().find(|&(j, other)| {
                j != i && spec_covered(&[other], spec) && (j < i || !spec_covered(&[spec], other))
            });
            let Some((_, other)) = covering else { continue };
            let message = if spec_covered(&[spec], other) {
                format!(
                    "\"{spec}\" is listed twice in this rule (first at {})",
                    other.location
                )
            } else {
                format!("\"{spec}\" is already covered by \"{other}\" in this rule")
            };
            out.warning(spec.location.clone(), message);
        }
    }
}

/// "temp-001, temp-002 (segment sensors), plc-7 (segment plcs) and 3 more".
fn name_devices(devices: &[(&Device, &str)]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (device, segment) in devices.iter().take(MAX_NAMED_DEVICES) {
        match groups.last_mut() {
            Some((last, ids)) if last == segment => ids.push(&device.id),
            _ => groups.push((segment, vec![&device.id])),
        }
    }
    let mut text = groups
        .iter()
        .map(|(segment, ids)| format!("{} (segment {segment})", ids.join(", ")))
        .collect::<Vec<_>>()
        .join(", ");
    if devices.len() > MAX_NAMED_DEVICES {
        text.push_str(&format!(" and {} more", devices.len() - MAX_NAMED_DEVICES));
    }
    text
}

/// A zone or CIDR also covers the device addresses inside it (SPEC §2 rule 5), which is easy
/// to overlook when the zone was meant for the outside world.
fn rules_reaching_devices(index: &Index, list: &RuleList, out: &mut Diagnostics) {
    for rule in &list.rules {
        let devices = index.devices_inside(&rule.peer);
        if devices.is_empty() {
            continue;
        }
        let peer = match &rule.peer {
            Target::Zone(name) => format!("zone {name:?}"),
            other => target_text(other),
        };
        let names = name_devices(&devices);
        let message = match list.kind {
            RuleKind::Accept => format!(
                "\"from: {}\" also matches devices {names}: {peer} contains their addresses; \
                 \"accept\" is meant for sources outside the device network (to let devices \
                 in, give their segment an allow rule)",
                target_text(&rule.peer)
            ),
            RuleKind::Allow | RuleKind::QuarantineAllow => format!(
                "\"to: {}\" also reaches devices {names}: {peer} contains their addresses; if \
                 that is intended, name their segments or devices in \"to:\"",
                target_text(&rule.peer)
            ),
        };
        out.warning(rule.location.clone(), message);
    }
}

fn is_broad(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() <= BROAD_V4_PREFIX,
        IpNet::V6(n) => n.prefix_len() <= BROAD_V6_PREFIX,
    }
}

/// What a port spec opens, if it opens every service: "every protocol", "all tcp ports".
fn wide_ports(spec: &PortSpec) -> Option<String> {
    if spec.protocol == Protocol::Any {
        return Some("every protocol".into());
    }
    let width = u32::from(*spec.ports.end()) - u32::from(*spec.ports.start()) + 1;
    if !spec.protocol.has_ports() || width < WIDE_PORT_RANGE {
        return None;
    }
    // A spec over all ports displays as its protocol's name.
    let protocol = PortSpec {
        ports: PortSpec::ALL_PORTS,
        ..spec.clone()
    };
    Some(if spec.ports == PortSpec::ALL_PORTS {
        format!("all {protocol} ports")
    } else {
        format!("{width} {protocol} ports")
    })
}

/// `any` (or thousands of ports) to or from a large share of the internet.
fn wide_open_rules(index: &Index, list: &RuleList, out: &mut Diagnostics) {
    for rule in &list.rules {
        let Some(net) = index.nets(&rule.peer).into_iter().find(is_broad) else {
            continue;
        };
        let peer = match &rule.peer {
            Target::Zone(name) => format!("zone {name:?} ({net})"),
            _ => net.to_string(),
        };
        for spec in rule.ports {
            let Some(what) = wide_ports(spec) else {
                continue;
            };
            let message = match list.kind {
                RuleKind::Accept => format!(
                    "\"{spec}\" accepts {what} from {peer}, a /{} network; accept only the \
                     ports and the narrowest CIDRs that are needed",
                    net.prefix_len()
                ),
                RuleKind::Allow | RuleKind::QuarantineAllow => format!(
                    "\"{spec}\" opens {what} towards {peer}, a /{} network; allow only the \
                     ports and the narrowest CIDRs that the devices need",
                    net.prefix_len()
                ),
            };
            out.warning(spec.location.clone(), message);
        }
    }
}

fn segments_without_devices(policy: &Policy, out: &mut Diagnostics) {
    for segment in policy.segments.iter().filter(|s| s.devices.is_empty()) {
        out.warning(
            segment.location.clone(),
            format!(
                "segment {:?} has no devices: its rules apply to no device, and rules naming \
                 it reach nothing",
                segment.name
            ),
        );
    }
}

/// A device without static addresses gets them from DHCP leases, which are matched by MAC.
fn devices_without_address(policy: &Policy, out: &mut Diagnostics) {
    let devices = policy.segments.iter().flat_map(|s| &s.devices);
    for device in devices.filter(|d| d.mac.is_none() && d.addresses.is_empty()) {
        out.warning(
            device.location.clone(),
            format!(
                "device {:?} has no \"addresses\" and no \"mac\": DHCP leases are matched by MAC, \
                 so only `segward bind` can give it an address; add one of them",
                device.id
            ),
        );
    }
}

/// Two devices with one MAC make DHCP leases and the anti-spoofing check ambiguous: either
/// device could be given the other's address, and with it the other's permissions.
fn duplicate_macs(policy: &Policy, out: &mut Diagnostics) {
    let mut first: HashMap<MacAddr, &Device> = HashMap::new();
    for device in policy.segments.iter().flat_map(|s| &s.devices) {
        let Some(mac) = device.mac else { continue };
        match first.get(&mac) {
            Some(owner) => out.error(
                device.location.clone(),
                format!(
                    "device {:?} has the MAC {mac} of device {:?} (at {}): DHCP leases are \
                     matched by MAC, so either could get the other's address and permissions",
                    device.id, owner.id, owner.location
                ),
            ),
            None => {
                first.insert(mac, device);
            }
        }
    }
}

/// The entries the policy needs in each datapath map against the map's size. Gateway
/// addresses are only known at run time; they add one endpoint each.
fn capacity(policy: &Policy, out: &mut Diagnostics) {
    // Capacity belongs to the whole policy: report it at its first document.
    let Some(location) = first_location(policy) else {
        return;
    };
    match compile(policy, &[]) {
        Ok(compiled) => {
            for (what, needed, capacity) in usage(&compiled) {
                let percent = needed * 100 / capacity as usize;
                if percent >= CAPACITY_WARNING_PERCENT {
                    out.warning(
                        location.clone(),
                        format!(
                            "the policy needs {needed} {what} entries, {percent}% of the \
                             datapath's {capacity}; it will not fit much longer"
                        ),
                    );
                }
            }
        }
        Err(e) => out.error(
            location,
            format!("{e}; reduce the devices, zones or rules that need them"),
        ),
    }
}

/// (what, entries needed, capacity) per map, as `compile` checks them.
fn usage(compiled: &CompiledPolicy) -> [(&'static str, usize, u32); 4] {
    use agent_ebpf::maps::{MAX_ENDPOINTS, MAX_POLICY_ENTRIES, MAX_SEGMENTS, MAX_ZONE_PREFIXES};
    [
        ("endpoint", compiled.endpoints.len(), MAX_ENDPOINTS),
        ("zone prefix", compiled.zones.len(), MAX_ZONE_PREFIXES),
        ("segment", compiled.segments.len(), MAX_SEGMENTS),
        ("policy", compiled.policy.len(), MAX_POLICY_ENTRIES),
    ]
}

fn first_location(policy: &Policy) -> Option<Location> {
    let segments = policy.segments.iter().map(|s| &s.location);
    let zones = policy.zones.iter().map(|z| &z.location);
    let quarantine = policy.quarantine.iter().map(|q| &q.location);
    segments.chain(zones).chain(quarantine).min().cloned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::dedent;
    use crate::policy::load::load_str;

    /// The lint diagnostics of `text` (as `t.yaml`), sorted, one string each.
    fn lints(text: &str) -> Vec<String> {
        let policy = load_str(Path::new("t.yaml"), text).expect("test policy must load");
        let mut diagnostics = lint(&policy);
        diagnostics.sort();
        diagnostics.iter().map(ToString::to_string).collect()
    }

    /// Runs each case's YAML and compares every diagnostic, location included.
    fn table(cases: &[(&str, &str, &[&str])]) {
        for (name, text, expected) in cases {
            assert_eq!(lints(&dedent(text)), *expected, "case {name:?}");
        }
    }

    #[test]
    fn shadowed_rules_name_the_covering_rule() {
        table(&[
            (
                "a CIDR inside a wider CIDR, fewer ports; IPv4-mapped IPv6 is IPv4",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                allow:
                  - to: 10.0.0.0/12
                    ports: ["tcp"]
                  - to: 10.1.0.0/16
                    ports: ["22/tcp", "443/tcp"]
                  - to: "::ffff:10.2.0.0/112"
                    ports: ["22/tcp"]
                "#,
                &[
                    "t.yaml:7:5: warning: allow rule \"to: 10.1.0.0/16 ports: [22/tcp, 443/tcp]\" is shadowed by the broader rule at t.yaml:5 (\"to: 10.0.0.0/12 ports: [tcp]\"): it adds nothing; remove it, or narrow the broader rule",
                    "t.yaml:9:5: warning: allow rule \"to: ::ffff:10.2.0.0/112 ports: [22/tcp]\" is shadowed by the broader rule at t.yaml:5 (\"to: 10.0.0.0/12 ports: [tcp]\"): it adds nothing; remove it, or narrow the broader rule",
                ],
            ),
            (
                "the narrower rule comes first; adjacent zone CIDRs together cover it",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                allow:
                  - to: 10.0.0.0/8
                    ports: ["8883/tcp"]
                  - to: lan
                    ports: ["8000-9000/tcp", "udp"]
                ---
                kind: Zone
                name: lan
                cidrs: [10.0.0.0/9, 10.128.0.0/9]
                "#,
                &["t.yaml:5:5: warning: allow rule \"to: 10.0.0.0/8 ports: [8883/tcp]\" is shadowed by the broader rule at t.yaml:7 (\"to: lan ports: [8000-9000/tcp, udp]\"): it adds nothing; remove it, or narrow the broader rule"],
            ),
            (
                "a segment covers its own device; ports covered by the union of two ranges",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                allow:
                  - to: s
                    ports: ["1-100/tcp", "101-200/tcp"]
                  - to: d
                    ports: ["50-150/tcp"]
                "#,
                &["t.yaml:7:5: warning: allow rule \"to: d ports: [50-150/tcp]\" is shadowed by the broader rule at t.yaml:5 (\"to: s ports: [1-100/tcp, 101-200/tcp]\"): it adds nothing; remove it, or narrow the broader rule"],
            ),
            (
                "the same rule twice, and the same rule in other words",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                allow:
                  - to: gateway
                    ports: ["53/udp"]
                  - to: gateway
                    ports: ["53/udp"]
                  - to: 172.16.0.0/12
                    ports: ["1-65535/tcp"]
                  - to: 172.16.0.0/12
                    ports: ["1-32767/tcp", "32768-65535/tcp"]
                "#,
                &[
                    "t.yaml:7:5: warning: allow rule \"to: gateway ports: [53/udp]\" repeats the rule at t.yaml:5; remove one of them",
                    "t.yaml:11:5: warning: allow rule \"to: 172.16.0.0/12 ports: [1-32767/tcp, 32768-65535/tcp]\" matches exactly what the rule at t.yaml:9 (\"to: 172.16.0.0/12 ports: [1-65535/tcp]\") matches; remove one of them",
                ],
            ),
            (
                "accept rules and the quarantine's allow rules",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                accept:
                  - from: ops
                    ports: ["any"]
                  - from: 192.0.2.128/25
                    ports: ["icmp"]
                ---
                kind: Zone
                name: ops
                cidrs: [192.0.2.0/24]
                ---
                kind: Quarantine
                allow:
                  - to: ops
                    ports: ["443/tcp"]
                  - to: ops
                    ports: ["443/tcp"]
                "#,
                &[
                    "t.yaml:7:5: warning: accept rule \"from: 192.0.2.128/25 ports: [icmp]\" is shadowed by the broader rule at t.yaml:5 (\"from: ops ports: [any]\"): it adds nothing; remove it, or narrow the broader rule",
                    "t.yaml:18:5: warning: quarantine allow rule \"to: ops ports: [443/tcp]\" repeats the rule at t.yaml:16; remove one of them",
                ],
            ),
            (
                "overlaps that are not shadowing",
                r#"
                kind: Segment
                name: s
                devices: [{id: d, addresses: [192.168.0.1]}]
                allow:
                  - to: 10.0.0.0/12
                    ports: ["8000-8100/tcp"]
                  - to: 10.0.0.0/12
                    ports: ["8050-8200/tcp"]
                  - to: 10.1.0.0/16
                    ports: ["8000/udp"]
                  - to: 11.0.0.0/12
                    ports: ["8000/tcp"]
                  - to: s
                    ports: ["22/tcp"]
                  - to: e
                    ports: ["22/tcp"]
                accept:
                  - from: 10.0.0.0/12
                    ports: ["8000-8100/tcp"]
                ---
                kind: Segment
                name: t
                devices: [{id: e, addresses: [192.168.0.2]}, {id: f, addresses: [192.168.0.3]}]
                allow:
                  - to: e
                    ports: ["22/tcp"]
                  - to: t
                    ports: ["22/tcp"]
                  - to: 2001:db8::/48
                    ports: ["tcp"]
                  - to: 10.0.0.0/12
                    ports: ["tcp"]
                "#,
                &["t.yaml:25:5: warning: allow rule \"to: e ports: [22/tcp]\" is shadowed by the broader rule at t.yaml:27 (\"to: t ports: [22/tcp]\"): it adds nothing; remove it, or narrow the broader rule"],
            ),
        ]);
    }

    #[test]
    fn redundant_port_specs_within_a_rule() {
        table(&[(
            "listed twice, and covered by a wider spec",
            r#"
            kind: Segment
            name: s
            devices: [{id: d, addresses: [192.168.0.1]}]
            allow:
              - to: gateway
                ports: ["53/udp", "22/tcp", "53/udp", "1-1024/tcp", "icmp", "icmpv6"]
            "#,
            &[
                "t.yaml:6:23: warning: \"22/tcp\" is already covered by \"1-1024/tcp\" in this rule",
                "t.yaml:6:33: warning: \"53/udp\" is listed twice in this rule (first at t.yaml:6:13)",
            ],
        )]);
    }

    #[test]
    fn zone_and_cidr_rules_that_reach_devices() {
        table(&[
            (
                "allow to a CIDR and a zone that contain device addresses",
                r#"
                kind: Segment
                name: sensors
                devices:
                  - {id: temp-1, addresses: [10.20.1.11]}
                  - {id: temp-2, addresses: [10.20.1.12]}
                  - {id: temp-3, mac: "02:00:00:00:00:03"}
                allow:
                  - to: 10.20.0.0/16
                    ports: ["8883/tcp"]
                  - to: cloud
                    ports: ["443/tcp"]
                  - to: 10.30.0.0/16
                    ports: ["443/tcp"]
                  - to: "::ffff:10.20.1.0/120"
                    ports: ["22/tcp"]
                ---
                kind: Segment
                name: plcs
                devices: [{id: plc-7, addresses: ["2001:db8:20::7", 10.99.0.7]}]
                ---
                kind: Zone
                name: cloud
                cidrs: [198.51.100.0/24, "2001:db8::/32"]
                "#,
                &[
                    "t.yaml:8:5: warning: \"to: 10.20.0.0/16\" also reaches devices temp-1, temp-2 (segment sensors): 10.20.0.0/16 contains their addresses; if that is intended, name their segments or devices in \"to:\"",
                    "t.yaml:10:5: warning: \"to: cloud\" also reaches devices plc-7 (segment plcs): zone \"cloud\" contains their addresses; if that is intended, name their segments or devices in \"to:\"",
                    "t.yaml:14:5: warning: \"to: ::ffff:10.20.1.0/120\" also reaches devices temp-1, temp-2 (segment sensors): ::ffff:10.20.1.0/120 contains their addresses; if that is intended, name their segments or devices in \"to:\"",
                ],
            ),
            (
                "accept from a CIDR with devices in it; long lists are cut short",
                r#"
                kind: Segment
                name: a
                devices:
                  - {id: a1, addresses: [10.0.0.1]}
                  - {id: a2, addresses: [10.0.0.2]}
                  - {id: a3, addresses: [10.0.0.3]}
                  - {id: a4, addresses: [10.0.0.4]}
                  - {id: a5, addresses: [10.0.0.5]}
                accept:
                  - from: 10.0.0.0/24
                    ports: ["22/tcp"]
                ---
                kind: Segment
                name: b
                devices:
                  - {id: b1, addresses: [10.0.0.11]}
                  - {id: b2, addresses: ["::ffff:10.0.0.12"]}
                  - {id: b3, addresses: [10.0.0.13]}
                "#,
                &["t.yaml:10:5: warning: \"from: 10.0.0.0/24\" also matches devices a1, a2, a3, a4, a5 (segment a), b1 (segment b) and 2 more: 10.0.0.0/24 contains their addresses; \"accept\" is meant for sources outside the device network (to let devices in, give their segment an allow rule)"],
            ),
        ]);
    }

    #[test]
    fn wide_ports_to_broad_networks() {
        table(&[(
            "any, all ports or 1024+ ports to a /8 (IPv6: /32) or wider; narrower or fewer pass",
            r#"
            kind: Segment
            name: s
            devices: [{id: d, mac: "02:00:00:00:00:01"}]
            allow:
              - to: 0.0.0.0/0
                ports: ["any"]
              - to: internet
                ports: ["1024-2047/tcp", "1-1023/tcp", "icmp"]
              - to: "2001:db8::/33"
                ports: ["any"]
            accept:
              - from: internet
                ports: ["udp"]
            ---
            kind: Zone
            name: internet
            cidrs: [11.0.0.0/8, "2000::/3"]
            "#,
            &[
                "t.yaml:6:13: warning: \"any\" opens every protocol towards 0.0.0.0/0, a /0 network; allow only the ports and the narrowest CIDRs that the devices need",
                "t.yaml:8:13: warning: \"1024-2047/tcp\" opens 1024 tcp ports towards zone \"internet\" (11.0.0.0/8), a /8 network; allow only the ports and the narrowest CIDRs that the devices need",
                "t.yaml:13:13: warning: \"udp\" accepts all udp ports from zone \"internet\" (11.0.0.0/8), a /8 network; accept only the ports and the narrowest CIDRs that are needed",
            ],
        )]);
    }

    #[test]
    fn segments_and_devices_that_cannot_work() {
        table(&[(
            "no devices, no way to get an address, one MAC for two devices",
            r#"
            kind: Segment
            name: empty
            description: nothing here yet
            ---
            kind: Segment
            name: s
            devices:
              - id: static-only
                addresses: [192.168.0.1]
              - id: dhcp-only
                mac: "02:00:00:00:00:01"
              - id: bind-only
              - id: clone
                mac: "02:00:00:00:00:01"
                addresses: [192.168.0.2]
              - id: other-clone
                mac: "02:00:00:00:00:01"
            "#,
            &[
                "t.yaml:1:1: warning: segment \"empty\" has no devices: its rules apply to no device, and rules naming it reach nothing",
                "t.yaml:12:5: warning: device \"bind-only\" has no \"addresses\" and no \"mac\": DHCP leases are matched by MAC, so only `segward bind` can give it an address; add one of them",
                "t.yaml:13:5: error: device \"clone\" has the MAC 02:00:00:00:00:01 of device \"dhcp-only\" (at t.yaml:10:5): DHCP leases are matched by MAC, so either could get the other's address and permissions",
                "t.yaml:16:5: error: device \"other-clone\" has the MAC 02:00:00:00:00:01 of device \"dhcp-only\" (at t.yaml:10:5): DHCP leases are matched by MAC, so either could get the other's address and permissions",
            ],
        )]);
    }

    /// A segment allowing `ports` single ports to each of `cidrs` separate addresses: every
    /// (address, port) pair is one policy entry.
    fn policy_entries(cidrs: usize, ports: usize) -> String {
        let cidrs: Vec<String> = (0..cidrs)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let ports: Vec<String> = (1..=ports).map(|p| format!("\"{p}/tcp\"")).collect();
        format!(
            "kind: Segment\nname: s\ndevices: [{{id: d, addresses: [192.168.0.1]}}]\n\
             allow:\n  - to: many\n    ports: [{}]\n---\nkind: Zone\nname: many\ncidrs: [{}]\n",
            ports.join(", "),
            cidrs.join(", ")
        )
    }

    #[test]
    fn capacity_against_the_datapath_maps() {
        table(&[
            ("well within", &policy_entries(100, 100), &[]),
            (
                "above 80%",
                &policy_entries(110, 1000),
                &["t.yaml:1:1: warning: the policy needs 110000 policy entries, 83% of the datapath's 131072; it will not fit much longer"],
            ),
            (
                "over",
                &policy_entries(132, 1000),
                &["t.yaml:1:1: error: the policy needs 132000 policy entries but the datapath holds 131072; reduce the devices, zones or rules that need them"],
            ),
        ]);
    }

    #[test]
    fn an_empty_policy_has_nothing_to_report() {
        assert!(lint(&Policy::default()).is_empty());
    }

    #[test]
    fn the_example_policy_is_clean() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let policy = crate::policy::load::load_dir(&dir).unwrap();
        assert_eq!(lint(&policy), Diagnostics::new());
    }
}
