//! The reference evaluator: SPEC §2 on the policy *model*, one new flow at a time.
//!
//! `segward explain` prints its verdicts, `segward diff` builds on its matching, and the tests
//! hold the compiled datapath to it. It judges by rules only: the essentials of rules 1/2
//! (ARP, DHCP, neighbour discovery), spoofing, replies and malformed packets belong to the
//! datapath and are not modelled here.
//!
//! Addresses are compared in canonical form: `::ffff:10.0.0.1` is the host `10.0.0.1` (as the
//! loader has it), and a CIDR inside `::ffff:0:0/96` is the IPv4 CIDR it maps. Any other IPv6
//! CIDR, even `::/0`, covers IPv6 addresses only: a rule never reaches a family it does not
//! name. The compiler follows the same rules (see the tests' `datapath_regressions`).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;

use super::{
    compile::{source_text, target_text},
    model::{
        canonical_net, AcceptRule, AllowRule, Device, Location, Mode, Policy, PortSpec, Protocol,
        Segment, Source, Target, Zone,
    },
};

/// Who opens the flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowSource {
    /// A device by id.
    Device(String),
    /// An address: a device's if bound to one, else a source outside the device network.
    Address(IpAddr),
}

/// Where the flow goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowDestination {
    /// A device by id: zone and CIDR rules apply through any of its static addresses.
    Device(String),
    /// An address: a device's, one of the gateway's own, or an outside address.
    Address(IpAddr),
    /// The gateway as such: only `to: gateway` rules match (offline its addresses are
    /// unknown; give one of them as an address to have zone and CIDR rules apply too).
    Gateway,
}

/// The protocol and destination port of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    Icmp,
    Icmpv6,
}

impl Service {
    pub fn protocol(self) -> Protocol {
        match self {
            Service::Tcp(_) => Protocol::Tcp,
            Service::Udp(_) => Protocol::Udp,
            Service::Sctp(_) => Protocol::Sctp,
            Service::Icmp => Protocol::Icmp,
            Service::Icmpv6 => Protocol::Icmpv6,
        }
    }

    pub fn port(self) -> Option<u16> {
        match self {
            Service::Tcp(p) | Service::Udp(p) | Service::Sctp(p) => Some(p),
            Service::Icmp | Service::Icmpv6 => None,
        }
    }

    /// Whether one entry of a rule's `ports:` covers this service.
    pub fn matches(self, spec: &PortSpec) -> bool {
        spec.protocol == Protocol::Any
            || (spec.protocol == self.protocol()
                && self.port().is_none_or(|port| spec.ports.contains(&port)))
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Tcp(p) => write!(f, "{p}/tcp"),
            Service::Udp(p) => write!(f, "{p}/udp"),
            Service::Sctp(p) => write!(f, "{p}/sctp"),
            Service::Icmp => f.write_str("icmp"),
            Service::Icmpv6 => f.write_str("icmpv6"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid port {0:?}: expected N/tcp, N/udp or N/sctp (N in 1-65535), icmp or icmpv6")]
pub struct ServiceError(String);

impl FromStr for Service {
    type Err = ServiceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ServiceError(text.to_owned());
        match text {
            "icmp" => return Ok(Service::Icmp),
            "icmpv6" => return Ok(Service::Icmpv6),
            _ => {}
        }
        let (port, protocol) = text.split_once('/').ok_or_else(invalid)?;
        // `u16::from_str` would also take `+80`.
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(invalid)?;
        match protocol {
            "tcp" => Ok(Service::Tcp(port)),
            "udp" => Ok(Service::Udp(port)),
            "sctp" => Ok(Service::Sctp(port)),
            _ => Err(invalid()),
        }
    }
}

/// A device with the segment it belongs to.
#[derive(Clone, Copy, Debug)]
pub struct DeviceRef<'p> {
    pub segment: &'p Segment,
    pub device: &'p Device,
}

/// The rule that lets a flow through.
#[derive(Clone, Copy, Debug)]
pub enum DecidingRule<'p> {
    /// An `allow` rule of the source device's segment.
    Allow {
        segment: &'p Segment,
        rule: &'p AllowRule,
    },
    /// An `accept` rule of the destination device's segment.
    Accept {
        segment: &'p Segment,
        rule: &'p AcceptRule,
    },
    /// An `allow` rule of the Quarantine document (the source is quarantined).
    Quarantine { rule: &'p AllowRule },
}

impl<'p> DecidingRule<'p> {
    pub fn location(&self) -> &'p Location {
        match self {
            DecidingRule::Allow { rule, .. } | DecidingRule::Quarantine { rule } => &rule.location,
            DecidingRule::Accept { rule, .. } => &rule.location,
        }
    }

    /// The segment whose rule it is (`None` for the Quarantine document).
    pub fn segment(&self) -> Option<&'p Segment> {
        match self {
            DecidingRule::Allow { segment, .. } | DecidingRule::Accept { segment, .. } => {
                Some(segment)
            }
            DecidingRule::Quarantine { .. } => None,
        }
    }

    /// `allow`, `accept` or `quarantine`.
    pub fn kind(&self) -> &'static str {
        match self {
            DecidingRule::Allow { .. } => "allow",
            DecidingRule::Accept { .. } => "accept",
            DecidingRule::Quarantine { .. } => "quarantine",
        }
    }

    /// The rule as written, e.g. `to: mqtt-broker ports: [8883/tcp]`.
    pub fn text(&self) -> String {
        let (peer, ports) = match self {
            DecidingRule::Allow { rule, .. } | DecidingRule::Quarantine { rule } => {
                (format!("to: {}", target_text(&rule.to)), &rule.ports)
            }
            DecidingRule::Accept { rule, .. } => {
                (format!("from: {}", source_text(&rule.from)), &rule.ports)
            }
        };
        let ports: Vec<String> = ports.iter().map(PortSpec::to_string).collect();
        format!("{peer} ports: [{}]", ports.join(", "))
    }
}

/// Which list of rules was consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The source device's segment's `allow` rules.
    Allow,
    /// The destination device's segment's `accept` rules (the source is outside).
    Accept,
}

/// Why a new flow is dropped.
#[derive(Clone, Copy, Debug)]
pub enum DenyReason<'p> {
    /// The source address is bound to no device, and the flow does not go to a device (so it
    /// is not a flow from outside the device network either).
    UnknownDevice { address: IpAddr },
    /// No rule of `segment` matches.
    DefaultDeny {
        segment: &'p Segment,
        direction: Direction,
    },
    /// The source is quarantined and no Quarantine `allow` rule matches.
    Quarantined { source: DeviceRef<'p> },
    /// Nothing may open a flow to a quarantined device.
    DestinationQuarantined { destination: DeviceRef<'p> },
}

impl DenyReason<'_> {
    /// The reason as the audit log and metrics name it.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnknownDevice { .. } => "unknown_device",
            DenyReason::DefaultDeny { .. } => "default_deny",
            DenyReason::Quarantined { .. } => "quarantined",
            DenyReason::DestinationQuarantined { .. } => "destination_quarantined",
        }
    }
}

/// The verdict for a new flow.
#[derive(Clone, Copy, Debug)]
pub enum Verdict<'p> {
    /// `rule` is the first rule that applies; `port` is the entry of its `ports:` that matched.
    Allow {
        rule: DecidingRule<'p>,
        port: &'p PortSpec,
    },
    /// `audited_by`: the segment whose rules judged the flow, when it is in audit mode: the
    /// packet passes anyway and is reported as `audit_deny` (SPEC §2.6).
    Deny {
        reason: DenyReason<'p>,
        audited_by: Option<&'p Segment>,
    },
}

impl Verdict<'_> {
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }

    /// Whether the packet gets through: allowed, or denied in audit mode.
    pub fn passes(&self) -> bool {
        match self {
            Verdict::Allow { .. } => true,
            Verdict::Deny { audited_by, .. } => audited_by.is_some(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("no device {0:?} in the policy")]
    UnknownDevice(String),
}

/// What a destination (or an outside source) is, as far as rules care.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Place<'p> {
    /// A device; `address` is the one the flow uses, if known.
    Device {
        device: DeviceRef<'p>,
        address: Option<IpAddr>,
    },
    /// The gateway itself; `address` is the one the flow uses, if known.
    Gateway { address: Option<IpAddr> },
    /// Addresses outside the device network: one host, or a whole block of them.
    Outside(IpNet),
}

/// A policy indexed for judging flows.
pub struct Evaluator<'p> {
    policy: &'p Policy,
    gateway: HashSet<IpAddr>,
    quarantined: HashSet<String>,
    devices: HashMap<&'p str, DeviceRef<'p>>,
    owners: HashMap<IpAddr, DeviceRef<'p>>,
    zones: HashMap<&'p str, &'p Zone>,
}

impl<'p> Evaluator<'p> {
    /// `gateway` are the gateway's own addresses (may be empty offline).
    pub fn new(policy: &'p Policy, gateway: &[IpAddr]) -> Self {
        let mut devices = HashMap::new();
        let mut owners = HashMap::new();
        for segment in &policy.segments {
            for device in &segment.devices {
                let r = DeviceRef { segment, device };
                // The loader rejects duplicates; keep the first so that any model is judged.
                devices.entry(device.id.as_str()).or_insert(r);
                for ip in &device.addresses {
                    owners.entry(ip.to_canonical()).or_insert(r);
                }
            }
        }
        Evaluator {
            policy,
            gateway: gateway.iter().map(IpAddr::to_canonical).collect(),
            quarantined: HashSet::new(),
            devices,
            owners,
            zones: policy.zones.iter().map(|z| (z.name.as_str(), z)).collect(),
        }
    }

    /// Judges these devices as quarantined (SPEC §2 rule 3).
    pub fn with_quarantined<I, S>(mut self, devices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.quarantined.extend(devices.into_iter().map(Into::into));
        self
    }

    pub fn policy(&self) -> &'p Policy {
        self.policy
    }

    pub fn device(&self, id: &str) -> Option<DeviceRef<'p>> {
        self.devices.get(id).copied()
    }

    /// The device that `ip` is statically bound to.
    pub fn owner(&self, ip: IpAddr) -> Option<DeviceRef<'p>> {
        self.owners.get(&ip.to_canonical()).copied()
    }

    /// Names of the zones that contain `ip`, in policy order.
    pub fn zones_containing(&self, ip: IpAddr) -> Vec<&'p str> {
        let host = IpNet::from(ip.to_canonical());
        self.policy
            .zones
            .iter()
            .filter(|z| z.cidrs.iter().any(|c| canonical_net(*c).contains(&host)))
            .map(|z| z.name.as_str())
            .collect()
    }

    /// The verdict for a new flow from `from` to `to` (SPEC §2 rules 2, 3, 5, 6).
    pub fn judge(
        &self,
        from: &FlowSource,
        to: &FlowDestination,
        service: Service,
    ) -> Result<Verdict<'p>, QueryError> {
        let to = self.destination(to)?;
        Ok(match from {
            FlowSource::Device(id) => self.judge_from_device(self.known_device(id)?, &to, service),
            FlowSource::Address(ip) => match self.owner(*ip) {
                Some(source) => self.judge_from_device(source, &to, service),
                None => self.judge_from_outside(*ip, &to, service),
            },
        })
    }

    fn known_device(&self, id: &str) -> Result<DeviceRef<'p>, QueryError> {
        self.device(id)
            .ok_or_else(|| QueryError::UnknownDevice(id.to_owned()))
    }

    fn destination(&self, to: &FlowDestination) -> Result<Place<'p>, QueryError> {
        Ok(match to {
            FlowDestination::Device(id) => Place::Device {
                device: self.known_device(id)?,
                address: None,
            },
            FlowDestination::Gateway => Place::Gateway { address: None },
            FlowDestination::Address(ip) => self.place_of(*ip),
        })
    }

    /// What `ip` is; a device binding wins over a gateway address, as in the datapath.
    fn place_of(&self, ip: IpAddr) -> Place<'p> {
        let ip = ip.to_canonical();
        if let Some(device) = self.owner(ip) {
            Place::Device {
                device,
                address: Some(ip),
            }
        } else if self.gateway.contains(&ip) {
            Place::Gateway { address: Some(ip) }
        } else {
            Place::Outside(ip.into())
        }
    }

    fn is_quarantined(&self, device: &Device) -> bool {
        self.quarantined.contains(&device.id)
    }

    fn judge_from_device(
        &self,
        source: DeviceRef<'p>,
        to: &Place<'p>,
        service: Service,
    ) -> Verdict<'p> {
        let deny = |reason| Verdict::Deny {
            reason,
            audited_by: audit_mode(source.segment),
        };
        if let Place::Device { device, .. } = *to {
            if self.is_quarantined(device.device) {
                return deny(DenyReason::DestinationQuarantined {
                    destination: device,
                });
            }
        }
        if self.is_quarantined(source.device) {
            let rules = self.policy.quarantine.iter().flat_map(|q| &q.allow);
            return match self.first_allow(rules, to, service) {
                Some((rule, port)) => Verdict::Allow {
                    rule: DecidingRule::Quarantine { rule },
                    port,
                },
                None => deny(DenyReason::Quarantined { source }),
            };
        }
        match self.first_allow(&source.segment.allow, to, service) {
            Some((rule, port)) => Verdict::Allow {
                rule: DecidingRule::Allow {
                    segment: source.segment,
                    rule,
                },
                port,
            },
            None => deny(DenyReason::DefaultDeny {
                segment: source.segment,
                direction: Direction::Allow,
            }),
        }
    }

    fn judge_from_outside(&self, ip: IpAddr, to: &Place<'p>, service: Service) -> Verdict<'p> {
        let Place::Device {
            device: destination,
            ..
        } = *to
        else {
            // Only flows to devices come from outside the device network; any other flow
            // with this source comes from the device network, from an unbound address.
            return Verdict::Deny {
                reason: DenyReason::UnknownDevice {
                    address: ip.to_canonical(),
                },
                audited_by: None,
            };
        };
        let deny = |reason| Verdict::Deny {
            reason,
            audited_by: audit_mode(destination.segment),
        };
        if self.is_quarantined(destination.device) {
            return deny(DenyReason::DestinationQuarantined { destination });
        }
        let from = IpNet::from(ip.to_canonical());
        let first = destination.segment.accept.iter().find_map(|rule| {
            let port = rule.ports.iter().find(|p| service.matches(p))?;
            self.source_covers(&rule.from, &from)
                .then_some((rule, port))
        });
        match first {
            Some((rule, port)) => Verdict::Allow {
                rule: DecidingRule::Accept {
                    segment: destination.segment,
                    rule,
                },
                port,
            },
            None => deny(DenyReason::DefaultDeny {
                segment: destination.segment,
                direction: Direction::Accept,
            }),
        }
    }

    /// The first rule (in file order) whose target covers `to` and whose ports match.
    fn first_allow(
        &self,
        rules: impl IntoIterator<Item = &'p AllowRule>,
        to: &Place<'p>,
        service: Service,
    ) -> Option<(&'p AllowRule, &'p PortSpec)> {
        rules.into_iter().find_map(|rule| {
            let port = rule.ports.iter().find(|p| service.matches(p))?;
            self.target_covers(&rule.to, to).then_some((rule, port))
        })
    }

    /// Whether an `allow` rule's `to:` covers `place` (SPEC §2 rule 5).
    pub(crate) fn target_covers(&self, target: &Target, place: &Place<'p>) -> bool {
        match (target, place) {
            (Target::Segment(name), Place::Device { device, .. }) => device.segment.name == *name,
            (Target::Device(id), Place::Device { device, .. }) => device.device.id == *id,
            (Target::Gateway, Place::Gateway { .. }) => true,
            (Target::Zone(name), _) => self.zone_cidrs(name).any(|c| cidr_covers(c, place)),
            (Target::Cidr(net), _) => cidr_covers(*net, place),
            _ => false,
        }
    }

    /// Whether an `accept` rule's `from:` covers every address of `from`.
    pub(crate) fn source_covers(&self, source: &Source, from: &IpNet) -> bool {
        let place = Place::Outside(*from);
        match source {
            Source::Zone(name) => self.zone_cidrs(name).any(|c| cidr_covers(c, &place)),
            Source::Cidr(net) => cidr_covers(*net, &place),
        }
    }

    fn zone_cidrs(&self, name: &str) -> impl Iterator<Item = IpNet> + 'p {
        let zone: Option<&'p Zone> = self.zones.get(name).copied();
        zone.into_iter().flat_map(|z| z.cidrs.iter().copied())
    }
}

fn audit_mode(segment: &Segment) -> Option<&Segment> {
    (segment.mode == Mode::Audit).then_some(segment)
}

/// Whether the CIDR `net` covers `place` (a zone or CIDR also covers device addresses in it).
fn cidr_covers(net: IpNet, place: &Place) -> bool {
    let net = canonical_net(net);
    let host = |ip: IpAddr| net.contains(&ip.to_canonical());
    match place {
        Place::Device {
            address: Some(ip), ..
        }
        | Place::Gateway { address: Some(ip) } => host(*ip),
        // A device by id: through any of its static addresses.
        Place::Device {
            device,
            address: None,
        } => device.device.addresses.iter().any(|&ip| host(ip)),
        Place::Gateway { address: None } => false,
        Place::Outside(block) => net.contains(&canonical_net(*block)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use agent_ebpf::{
        maps::{Config, FlowKey},
        parse::Parsed,
        verdict::{judge_from_device, judge_to_device, Flow},
    };

    use super::*;
    use crate::policy::{
        compile::{addr_octets, compile},
        load::load_str,
    };

    /// A small plant: rules on purpose in an order where several could match.
    const PLANT: &str = r#"kind: Segment
name: sensors
devices:
  - id: temp-001
    mac: "02:00:00:00:10:01"
    addresses: [10.20.1.11, "fd00:20:1::11"]
  - id: temp-002
    addresses: [10.20.1.12]
  - id: temp-003
allow:
  - to: mqtt-broker
    ports: ["8883/tcp"]
  - to: broker-1
    ports: ["8000-8999/tcp", "icmp"]
  - to: ntp
    ports: ["123/udp"]
  - to: 10.20.9.0/24
    ports: ["9000/tcp", "icmpv6"]
  - to: gateway
    ports: ["53/udp"]
  - to: "fd00:99::/64"
    ports: ["any"]
  - to: temp-002
    ports: ["7000/tcp"]
---
kind: Segment
name: mqtt-broker
mode: audit
devices:
  - id: broker-1
    addresses: [10.20.9.1, "fd00:9::1"]
allow:
  - to: cloud
    ports: ["tcp"]
accept:
  - from: ops-vpn
    ports: ["22/tcp", "icmp"]
  - from: 192.0.2.128/25
    ports: ["1883/tcp"]
---
kind: Segment
name: plcs
devices:
  - id: plc-7
    addresses: [10.20.3.7]
allow:
  - to: sensors
    ports: ["502/tcp"]
  - to: 0.0.0.0/0
    ports: ["udp"]
accept:
  - from: "2001:db8:9::/48"
    ports: ["502/tcp"]
---
kind: Zone
name: ntp
cidrs: [198.51.100.123/32]
---
kind: Zone
name: cloud
cidrs: [198.51.100.0/24, 10.20.9.0/28]
---
kind: Zone
name: ops-vpn
cidrs: [192.0.2.0/24, "2001:db8:9::/48"]
---
kind: Quarantine
allow:
  - to: remediation-host
    ports: ["443/tcp"]
  - to: 203.0.113.0/28
    ports: ["80/tcp"]
---
kind: Segment
name: remediation
devices:
  - id: remediation-host
    addresses: [10.20.8.1]
"#;

    const GATEWAY: [IpAddr; 2] = [
        IpAddr::V4(std::net::Ipv4Addr::new(10, 20, 0, 1)),
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1)),
    ];

    fn plant() -> Policy {
        load_str(Path::new("plant.yaml"), PLANT).expect("the test policy loads")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    fn dev(id: &str) -> FlowSource {
        FlowSource::Device(id.into())
    }

    fn addr(text: &str) -> FlowSource {
        FlowSource::Address(ip(text))
    }

    fn to_dev(id: &str) -> FlowDestination {
        FlowDestination::Device(id.into())
    }

    fn to_addr(text: &str) -> FlowDestination {
        FlowDestination::Address(ip(text))
    }

    /// `allow plant.yaml:LINE` or `deny REASON [audit SEGMENT]`, for terse assertions.
    fn outcome(verdict: Result<Verdict, QueryError>) -> String {
        match verdict {
            Ok(Verdict::Allow { rule, port }) => format!(
                "allow {}:{} {} {port}",
                rule.location().file.display(),
                rule.location().line,
                rule.kind()
            ),
            Ok(Verdict::Deny { reason, audited_by }) => {
                let audit = audited_by
                    .map(|s| format!(" audit {}", s.name))
                    .unwrap_or_default();
                format!("deny {}{audit}", reason.code())
            }
            Err(e) => format!("error {e}"),
        }
    }

    fn judge(from: FlowSource, to: FlowDestination, service: &str) -> String {
        let policy = plant();
        let ev = Evaluator::new(&policy, &GATEWAY);
        outcome(ev.judge(&from, &to, service.parse().expect("a test service")))
    }

    #[test]
    fn allow_to_a_segment_names_the_rule() {
        assert_eq!(
            judge(dev("temp-001"), to_dev("broker-1"), "8883/tcp"),
            "allow plant.yaml:11 allow 8883/tcp"
        );
        assert_eq!(
            judge(addr("10.20.1.12"), to_addr("fd00:9::1"), "8883/tcp"),
            "allow plant.yaml:11 allow 8883/tcp"
        );
    }

    #[test]
    fn first_rule_that_applies_decides() {
        // 8883/tcp to broker-1 matches lines 11 (segment) and 13 (device): the first decides.
        // 8884/tcp only matches the device rule's range.
        assert_eq!(
            judge(dev("temp-001"), to_dev("broker-1"), "8884/tcp"),
            "allow plant.yaml:13 allow 8000-8999/tcp"
        );
        // 9000/tcp to 10.20.9.1: the CIDR rule on line 17 (the device rule's range ends at 8999).
        assert_eq!(
            judge(dev("temp-001"), to_addr("10.20.9.1"), "9000/tcp"),
            "allow plant.yaml:17 allow 9000/tcp"
        );
    }

    #[test]
    fn allow_to_a_device() {
        assert_eq!(
            judge(dev("temp-001"), to_dev("temp-002"), "7000/tcp"),
            "allow plant.yaml:23 allow 7000/tcp"
        );
        assert_eq!(
            judge(dev("temp-001"), to_addr("10.20.1.12"), "7000/tcp"),
            "allow plant.yaml:23 allow 7000/tcp"
        );
    }

    #[test]
    fn same_segment_needs_a_rule() {
        assert_eq!(
            judge(dev("temp-002"), to_dev("temp-001"), "7000/tcp"),
            "deny default_deny"
        );
        assert_eq!(
            judge(dev("plc-7"), to_dev("plc-7"), "502/tcp"),
            "deny default_deny"
        );
    }

    #[test]
    fn zones_cover_outside_addresses_and_device_addresses_inside_them() {
        assert_eq!(
            judge(dev("temp-001"), to_addr("198.51.100.123"), "123/udp"),
            "allow plant.yaml:15 allow 123/udp"
        );
        assert_eq!(
            judge(dev("temp-001"), to_addr("198.51.100.124"), "123/udp"),
            "deny default_deny"
        );
        // Zone cloud has 10.20.9.0/28, which holds broker-1's IPv4 address; the broker's
        // segment is in audit mode, so the denials pass as audit_deny.
        assert_eq!(
            judge(dev("broker-1"), to_addr("10.20.9.1"), "4000/tcp"),
            "allow plant.yaml:33 allow tcp"
        );
        assert_eq!(
            judge(dev("broker-1"), to_addr("fd00:9::1"), "4000/tcp"),
            "deny default_deny audit mqtt-broker"
        );
        // By id, a zone covers a device through any of its static addresses.
        assert_eq!(
            judge(dev("broker-1"), to_dev("broker-1"), "4000/tcp"),
            "allow plant.yaml:33 allow tcp"
        );
        // A device without static addresses is reached by segment and device rules only.
        assert_eq!(
            judge(dev("plc-7"), to_dev("temp-003"), "53/udp"),
            "deny default_deny"
        );
    }

    #[test]
    fn cidrs_cover_outside_addresses_and_device_addresses_inside_them() {
        assert_eq!(
            judge(dev("temp-001"), to_addr("10.20.9.200"), "9000/tcp"),
            "allow plant.yaml:17 allow 9000/tcp"
        );
        assert_eq!(
            judge(dev("plc-7"), to_addr("10.20.1.11"), "5000/udp"),
            "allow plant.yaml:49 allow udp"
        );
        assert_eq!(
            judge(dev("plc-7"), to_dev("temp-002"), "5000/udp"),
            "allow plant.yaml:49 allow udp"
        );
        // An IPv4 CIDR does not cover IPv6 addresses, and an IPv6 CIDR no IPv4 addresses.
        assert_eq!(
            judge(dev("plc-7"), to_addr("fd00:20:1::11"), "5000/udp"),
            "deny default_deny"
        );
        assert_eq!(
            judge(dev("temp-001"), to_addr("fd00:99::5"), "5/sctp"),
            "allow plant.yaml:21 allow any"
        );
    }

    #[test]
    fn gateway_by_address_and_by_class() {
        assert_eq!(
            judge(dev("temp-001"), to_addr("10.20.0.1"), "53/udp"),
            "allow plant.yaml:19 allow 53/udp"
        );
        assert_eq!(
            judge(dev("temp-001"), to_addr("fd00:20::1"), "53/udp"),
            "allow plant.yaml:19 allow 53/udp"
        );
        assert_eq!(
            judge(dev("temp-001"), FlowDestination::Gateway, "53/udp"),
            "allow plant.yaml:19 allow 53/udp"
        );
        assert_eq!(
            judge(dev("temp-001"), FlowDestination::Gateway, "54/udp"),
            "deny default_deny"
        );
        // The gateway's address is inside plc-7's 0.0.0.0/0; the class alone is not.
        assert_eq!(
            judge(dev("plc-7"), to_addr("10.20.0.1"), "54/udp"),
            "allow plant.yaml:49 allow udp"
        );
        assert_eq!(
            judge(dev("plc-7"), FlowDestination::Gateway, "54/udp"),
            "deny default_deny"
        );
    }

    #[test]
    fn accept_rules_judge_outside_sources_to_devices() {
        assert_eq!(
            judge(addr("192.0.2.7"), to_dev("broker-1"), "22/tcp"),
            "allow plant.yaml:36 accept 22/tcp"
        );
        assert_eq!(
            judge(addr("2001:db8:9::5"), to_addr("10.20.9.1"), "icmp"),
            "allow plant.yaml:36 accept icmp"
        );
        // Both rules cover 192.0.2.200; only the second has 1883/tcp.
        assert_eq!(
            judge(addr("192.0.2.200"), to_dev("broker-1"), "1883/tcp"),
            "allow plant.yaml:38 accept 1883/tcp"
        );
        assert_eq!(
            judge(addr("192.0.2.7"), to_dev("broker-1"), "1883/tcp"),
            "deny default_deny audit mqtt-broker"
        );
        assert_eq!(
            judge(addr("2001:db8:9::5"), to_dev("plc-7"), "502/tcp"),
            "allow plant.yaml:52 accept 502/tcp"
        );
        assert_eq!(
            judge(addr("192.0.2.7"), to_dev("plc-7"), "502/tcp"),
            "deny default_deny"
        );
        // Accept rules are for sources outside the device network, not for devices.
        assert_eq!(
            judge(dev("temp-001"), to_dev("plc-7"), "502/tcp"),
            "deny default_deny"
        );
    }

    #[test]
    fn unbound_sources_are_unknown_devices_unless_they_reach_a_device() {
        assert_eq!(
            judge(addr("10.20.1.99"), FlowDestination::Gateway, "53/udp"),
            "deny unknown_device"
        );
        assert_eq!(
            judge(addr("10.20.1.99"), to_addr("198.51.100.123"), "123/udp"),
            "deny unknown_device"
        );
        assert_eq!(
            judge(addr("10.20.1.99"), to_dev("temp-001"), "22/tcp"),
            "deny default_deny"
        );
    }

    #[test]
    fn addresses_are_compared_in_canonical_form() {
        // `::ffff:10.20.1.11` is temp-001's IPv4 address.
        assert_eq!(
            judge(
                addr("::ffff:10.20.1.11"),
                to_addr("::ffff:10.20.9.1"),
                "8883/tcp"
            ),
            "allow plant.yaml:11 allow 8883/tcp"
        );
        let policy = load_str(
            Path::new("t.yaml"),
            "kind: Segment\nname: a\ndevices: [{id: d, addresses: [10.0.0.1]}]\nallow:\n  \
             - {to: \"::ffff:192.0.2.0/120\", ports: [any]}\n  - {to: \"::/0\", ports: [tcp]}\n",
        )
        .expect("loads");
        let ev = Evaluator::new(&policy, &[]);
        let judge = |to: &str, service: &str| {
            outcome(ev.judge(&dev("d"), &to_addr(to), service.parse().expect("service")))
        };
        // A CIDR inside ::ffff:0:0/96 is the IPv4 CIDR it maps; any other IPv6 CIDR covers
        // IPv6 addresses only.
        assert_eq!(judge("192.0.2.9", "icmp"), "allow t.yaml:5 allow any");
        assert_eq!(judge("198.51.100.1", "80/tcp"), "deny default_deny");
        assert_eq!(judge("2001:db8::1", "80/tcp"), "allow t.yaml:6 allow tcp");
    }

    #[test]
    fn port_ranges_protocols_icmp_and_any() {
        for (service, want) in [
            ("8000/tcp", "allow plant.yaml:13 allow 8000-8999/tcp"),
            ("8999/tcp", "allow plant.yaml:13 allow 8000-8999/tcp"),
            ("7999/tcp", "deny default_deny"),
            ("9000/tcp", "allow plant.yaml:17 allow 9000/tcp"),
            ("9001/tcp", "deny default_deny"),
            ("8883/udp", "deny default_deny"),
            ("8883/sctp", "deny default_deny"),
            ("icmp", "allow plant.yaml:13 allow icmp"),
            ("icmpv6", "allow plant.yaml:17 allow icmpv6"),
        ] {
            assert_eq!(
                judge(dev("temp-001"), to_addr("10.20.9.1"), service),
                want,
                "{service}"
            );
        }
        // `any` covers every protocol; a bare `tcp` every TCP port and nothing else.
        for service in ["1/tcp", "65535/udp", "9/sctp", "icmp", "icmpv6"] {
            assert_eq!(
                judge(dev("temp-001"), to_addr("fd00:99::1"), service),
                "allow plant.yaml:21 allow any"
            );
        }
        assert_eq!(
            judge(dev("broker-1"), to_addr("198.51.100.9"), "65535/tcp"),
            "allow plant.yaml:33 allow tcp"
        );
        assert_eq!(
            judge(dev("broker-1"), to_addr("198.51.100.9"), "icmp"),
            "deny default_deny audit mqtt-broker"
        );
    }

    #[test]
    fn a_quarantined_source_has_only_the_quarantine_rules() {
        let policy = plant();
        let ev = Evaluator::new(&policy, &GATEWAY).with_quarantined(["temp-001"]);
        let judge = |from: FlowSource, to: FlowDestination, service: &str| {
            outcome(ev.judge(&from, &to, service.parse().expect("service")))
        };
        assert_eq!(
            judge(dev("temp-001"), to_dev("remediation-host"), "443/tcp"),
            "allow plant.yaml:69 quarantine 443/tcp"
        );
        assert_eq!(
            judge(addr("fd00:20:1::11"), to_addr("203.0.113.5"), "80/tcp"),
            "allow plant.yaml:71 quarantine 80/tcp"
        );
        // Its segment's rules no longer apply.
        assert_eq!(
            judge(dev("temp-001"), to_dev("broker-1"), "8883/tcp"),
            "deny quarantined"
        );
        // Others in the segment are not affected...
        assert_eq!(
            judge(dev("temp-002"), to_dev("broker-1"), "8883/tcp"),
            "allow plant.yaml:11 allow 8883/tcp"
        );
        // ...but nothing may open a flow to the quarantined device: not its segment's own
        // rules, not accept rules, not another quarantined device's Quarantine rules.
        assert_eq!(
            judge(dev("temp-002"), to_dev("temp-001"), "7000/tcp"),
            "deny destination_quarantined"
        );
        assert_eq!(
            judge(dev("plc-7"), to_addr("10.20.1.11"), "502/tcp"),
            "deny destination_quarantined"
        );
        let ev = Evaluator::new(&policy, &GATEWAY).with_quarantined(["broker-1", "temp-001"]);
        assert_eq!(
            outcome(ev.judge(&addr("192.0.2.7"), &to_dev("broker-1"), Service::Tcp(22))),
            "deny destination_quarantined audit mqtt-broker"
        );
        let ev =
            Evaluator::new(&policy, &GATEWAY).with_quarantined(["temp-001", "remediation-host"]);
        assert_eq!(
            outcome(ev.judge(
                &dev("temp-001"),
                &to_dev("remediation-host"),
                Service::Tcp(443)
            )),
            "deny destination_quarantined"
        );
    }

    #[test]
    fn without_a_quarantine_document_a_quarantined_device_opens_nothing() {
        let policy = load_str(
            Path::new("t.yaml"),
            "kind: Segment\nname: a\ndevices: [{id: d, addresses: [10.0.0.1]}]\nallow:\n  \
             - {to: gateway, ports: [any]}\n",
        )
        .expect("loads");
        let ev = Evaluator::new(&policy, &[]).with_quarantined(["d"]);
        assert_eq!(
            outcome(ev.judge(&dev("d"), &FlowDestination::Gateway, Service::Icmp)),
            "deny quarantined"
        );
    }

    #[test]
    fn unknown_device_ids_are_errors() {
        assert_eq!(
            judge(dev("temp-009"), FlowDestination::Gateway, "53/udp"),
            "error no device \"temp-009\" in the policy"
        );
        assert_eq!(
            judge(dev("temp-001"), to_dev("nope"), "53/udp"),
            "error no device \"nope\" in the policy"
        );
    }

    #[test]
    fn services_parse_and_print() {
        for text in ["1/tcp", "65535/udp", "22/sctp", "icmp", "icmpv6"] {
            let service: Service = text.parse().expect(text);
            assert_eq!(service.to_string(), text);
        }
        for bad in [
            "",
            "0/tcp",
            "65536/tcp",
            "+22/tcp",
            "22",
            "tcp",
            "22/TCP",
            "22/icmp",
            "any",
            "1-2/tcp",
            "/tcp",
            "22/",
        ] {
            assert!(
                bad.parse::<Service>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn rule_text_reads_like_the_yaml() {
        let policy = plant();
        let ev = Evaluator::new(&policy, &GATEWAY);
        let Ok(Verdict::Allow { rule, .. }) =
            ev.judge(&dev("temp-001"), &to_dev("broker-1"), Service::Icmp)
        else {
            panic!("expected an allow");
        };
        assert_eq!(rule.text(), "to: broker-1 ports: [8000-8999/tcp, icmp]");
        assert_eq!(rule.segment().map(|s| s.name.as_str()), Some("sensors"));
        let Ok(Verdict::Allow { rule, .. }) = ev.judge(
            &addr("192.0.2.200"),
            &to_dev("broker-1"),
            Service::Tcp(1883),
        ) else {
            panic!("expected an allow");
        };
        assert_eq!(rule.text(), "from: 192.0.2.128/25 ports: [1883/tcp]");
    }

    // ---------------------------------------------------------------------------------------
    // The evaluator against the datapath's decision logic on compiled policies.

    mod differential {
        use std::collections::HashSet;

        use proptest::{collection::vec, prelude::*};

        use super::*;

        /// A random policy; indices are resolved (modulo the lengths) when it is written out.
        #[derive(Clone, Debug)]
        struct Plan {
            segments: Vec<SegmentPlan>,
            zones: Vec<Vec<IpNet>>,
            gateway: Vec<IpAddr>,
        }

        #[derive(Clone, Debug)]
        struct SegmentPlan {
            audit: bool,
            devices: Vec<DevicePlan>,
            allow: Vec<(TargetPlan, Vec<String>)>,
            accept: Vec<(SourcePlan, Vec<String>)>,
        }

        #[derive(Clone, Debug)]
        struct DevicePlan {
            mac: bool,
            addresses: Vec<IpAddr>,
        }

        #[derive(Clone, Debug)]
        enum TargetPlan {
            Segment(usize),
            Device(usize),
            Zone(usize),
            Cidr(IpNet),
            Gateway,
        }

        #[derive(Clone, Debug)]
        enum SourcePlan {
            Zone(usize),
            Cidr(IpNet),
        }

        /// Addresses from a few small blocks, so that CIDRs, devices and flows overlap.
        /// (IPv4-mapped IPv6 forms have regression tests of their own, below.)
        fn address() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                4 => (0u8..4, 1u8..9).prop_map(|(a, b)| IpAddr::from([10, 0, a, b])),
                3 => (0u16..4, 1u16..9)
                    .prop_map(|(a, b)| IpAddr::from([0xfd00, 0, 0, a, 0, 0, 0, b])),
                1 => (1u8..9).prop_map(|b| IpAddr::from([192, 0, 2, b])),
                1 => (1u16..9).prop_map(|b| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, b])),
            ]
        }

        fn cidr() -> impl Strategy<Value = IpNet> {
            (address(), any::<prop::sample::Index>()).prop_map(|(ip, i)| {
                let prefix = match ip {
                    IpAddr::V4(_) => [0u8, 8, 16, 23, 24, 30, 32][i.index(7)],
                    IpAddr::V6(_) => [0u8, 1, 16, 64, 112, 125, 128][i.index(7)],
                };
                IpNet::new(ip, prefix).map_or(IpNet::from(ip), |n| n.trunc())
            })
        }

        fn ports() -> impl Strategy<Value = Vec<String>> {
            let port = prop_oneof![Just(22u16), Just(80), Just(443), Just(1), Just(65535)];
            let spec = prop_oneof![
                (
                    port.clone(),
                    prop_oneof![Just("tcp"), Just("udp"), Just("sctp")]
                )
                    .prop_map(|(p, proto)| format!("{p}/{proto}")),
                (1u16..600, 0u16..600)
                    .prop_map(|(lo, len)| format!("{lo}-{}/tcp", lo.saturating_add(len))),
                Just("tcp".to_owned()),
                Just("udp".to_owned()),
                Just("icmp".to_owned()),
                Just("icmpv6".to_owned()),
                Just("any".to_owned()),
            ];
            vec(spec, 1..4)
        }

        fn target() -> impl Strategy<Value = TargetPlan> {
            prop_oneof![
                any::<usize>().prop_map(TargetPlan::Segment),
                any::<usize>().prop_map(TargetPlan::Device),
                any::<usize>().prop_map(TargetPlan::Zone),
                cidr().prop_map(TargetPlan::Cidr),
                Just(TargetPlan::Gateway),
            ]
        }

        fn source() -> impl Strategy<Value = SourcePlan> {
            prop_oneof![
                any::<usize>().prop_map(SourcePlan::Zone),
                cidr().prop_map(SourcePlan::Cidr),
            ]
        }

        fn plan() -> impl Strategy<Value = Plan> {
            let device = (any::<bool>(), vec(address(), 0..3))
                .prop_map(|(mac, addresses)| DevicePlan { mac, addresses });
            let segment = (
                prop::bool::weighted(0.2),
                vec(device, 0..4),
                vec((target(), ports()), 0..5),
                vec((source(), ports()), 0..3),
            )
                .prop_map(|(audit, devices, allow, accept)| SegmentPlan {
                    audit,
                    devices,
                    allow,
                    accept,
                });
            (
                vec(segment, 1..4),
                vec(vec(cidr(), 1..3), 0..3),
                vec(address(), 0..3),
            )
                .prop_map(|(segments, zones, gateway)| Plan {
                    segments,
                    zones,
                    gateway,
                })
        }

        /// The plan as segment files, and the gateway's addresses (none of them a device's).
        fn render(plan: &Plan) -> (String, Vec<IpAddr>) {
            let mut used = HashSet::new();
            let mut ids = Vec::new();
            let mut devices = Vec::new();
            for (s, segment) in plan.segments.iter().enumerate() {
                let mut rendered = Vec::new();
                for device in &segment.devices {
                    let id = format!("d{}", ids.len());
                    let addresses: Vec<String> = device
                        .addresses
                        .iter()
                        .filter(|ip| used.insert(ip.to_canonical()))
                        .map(|ip| format!("\"{ip}\""))
                        .collect();
                    let mac = if device.mac {
                        format!(", mac: \"02:00:00:00:00:{:02x}\"", ids.len())
                    } else {
                        String::new()
                    };
                    rendered.push(format!(
                        "  - {{id: {id}{mac}, addresses: [{}]}}\n",
                        addresses.join(", ")
                    ));
                    ids.push(id);
                }
                devices.push((s, rendered));
            }
            let ports = |p: &[String]| {
                p.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let zone_name = |i: usize| format!("z{}", i % plan.zones.len());
            let mut text = String::new();
            for ((s, segment), (_, rendered)) in plan.segments.iter().enumerate().zip(devices) {
                text.push_str(&format!("---\nkind: Segment\nname: s{s}\n"));
                if segment.audit {
                    text.push_str("mode: audit\n");
                }
                text.push_str("devices:\n");
                text.extend(rendered);
                text.push_str("allow:\n");
                for (target, p) in &segment.allow {
                    let to = match target {
                        TargetPlan::Segment(i) => format!("s{}", i % plan.segments.len()),
                        TargetPlan::Device(i) if !ids.is_empty() => ids[i % ids.len()].clone(),
                        TargetPlan::Zone(i) if !plan.zones.is_empty() => zone_name(*i),
                        TargetPlan::Cidr(net) => format!("\"{net}\""),
                        _ => "gateway".into(),
                    };
                    text.push_str(&format!("  - {{to: {to}, ports: [{}]}}\n", ports(p)));
                }
                text.push_str("accept:\n");
                for (source, p) in &segment.accept {
                    let from = match source {
                        SourcePlan::Zone(i) if !plan.zones.is_empty() => zone_name(*i),
                        SourcePlan::Zone(_) => "\"192.0.2.0/24\"".into(),
                        SourcePlan::Cidr(net) => format!("\"{net}\""),
                    };
                    text.push_str(&format!("  - {{from: {from}, ports: [{}]}}\n", ports(p)));
                }
            }
            for (z, cidrs) in plan.zones.iter().enumerate() {
                let cidrs: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
                text.push_str(&format!(
                    "---\nkind: Zone\nname: z{z}\ncidrs: [{}]\n",
                    cidrs.join(", ")
                ));
            }
            let gateway = plan
                .gateway
                .iter()
                .copied()
                .filter(|ip| !used.contains(&ip.to_canonical()))
                .collect();
            (text, gateway)
        }

        /// Where a flow goes: resolved against the policy and the gateway when judged.
        #[derive(Clone, Debug)]
        enum Towards {
            DeviceAddress(usize),
            Gateway(usize),
            Address(IpAddr),
        }

        #[derive(Clone, Debug)]
        struct FlowPlan {
            device: usize,
            towards: Towards,
            outside: IpAddr,
            service: Service,
        }

        fn service() -> impl Strategy<Value = Service> {
            let port = prop_oneof![
                Just(22u16),
                Just(80),
                Just(443),
                Just(1),
                Just(65535),
                1u16..700,
                any::<u16>()
            ];
            prop_oneof![
                port.clone().prop_map(Service::Tcp),
                port.clone().prop_map(Service::Udp),
                port.prop_map(Service::Sctp),
                Just(Service::Icmp),
                Just(Service::Icmpv6),
            ]
        }

        fn flow_plan() -> impl Strategy<Value = FlowPlan> {
            let towards = prop_oneof![
                any::<usize>().prop_map(Towards::DeviceAddress),
                any::<usize>().prop_map(Towards::Gateway),
                address().prop_map(Towards::Address),
            ];
            (any::<usize>(), towards, address(), service()).prop_map(
                |(device, towards, outside, service)| FlowPlan {
                    device,
                    towards,
                    outside,
                    service,
                },
            )
        }

        /// The packet the datapath would see for `service` between two addresses.
        fn packet(src: IpAddr, dst: IpAddr, src_mac: [u8; 6], service: Service) -> Parsed {
            let (protocol, icmp_type) = match service {
                // Echo requests: nothing the datapath lets through as essential.
                Service::Icmp => (1, 8),
                Service::Icmpv6 => (58, 128),
                other => (other.protocol().number(), 0),
            };
            // An ephemeral source port (never DHCP's); ICMP echo carries its id in both ports.
            let (sport, dport) = match service.port() {
                Some(port) => (40_000, port),
                None => (4242, 4242),
            };
            Parsed::Ip(Flow {
                tuple: FlowKey::new(addr_octets(src), addr_octets(dst), sport, dport, protocol),
                src_mac,
                icmp_type,
                ..Flow::default()
            })
        }

        /// Checks every flow of `flows` against both sides; `Err` describes a disagreement.
        fn check(text: &str, gateway: &[IpAddr], flows: &[FlowPlan]) -> Result<(), String> {
            let policy = load_str(Path::new("p.yaml"), text)
                .map_err(|e| format!("the generated policy does not load:\n{e}\n{text}"))?;
            let compiled = compile(&policy, gateway).map_err(|e| e.to_string())?;
            let ev = Evaluator::new(&policy, gateway);
            let config = Config::default();
            let senders: Vec<(&Device, IpAddr)> = policy
                .segments
                .iter()
                .flat_map(|s| &s.devices)
                .flat_map(|d| d.addresses.iter().map(move |&ip| (d, ip)))
                .collect();
            if senders.is_empty() {
                return Ok(());
            }
            for flow in flows {
                let (device, src) = senders[flow.device % senders.len()];
                let dst = match flow.towards {
                    Towards::DeviceAddress(i) => senders[i % senders.len()].1,
                    Towards::Gateway(i) if !gateway.is_empty() => gateway[i % gateway.len()],
                    Towards::Gateway(_) => flow.outside,
                    Towards::Address(ip) => ip,
                };
                let mac = device.mac.map_or([0; 6], |m| m.0);

                // From a device (XDP ingress on a device-facing interface).
                let ours = ev
                    .judge(
                        &FlowSource::Address(src),
                        &FlowDestination::Address(dst),
                        flow.service,
                    )
                    .map_err(|e| e.to_string())?;
                let theirs =
                    judge_from_device(&compiled, &config, &packet(src, dst, mac, flow.service), 0);
                if ours.passes() != theirs.passes() {
                    return Err(format!(
                        "{src} → {dst} {}: evaluator {} ({}), datapath {theirs:?}\n{text}\
                         gateway: {gateway:?}",
                        flow.service,
                        outcome(Ok(ours)),
                        if ours.passes() { "passes" } else { "dropped" },
                    ));
                }

                // From outside to a device (tc egress on its interface).
                if ev.owner(flow.outside).is_some() {
                    continue;
                }
                let ours = ev
                    .judge(
                        &FlowSource::Address(flow.outside),
                        &FlowDestination::Address(src),
                        flow.service,
                    )
                    .map_err(|e| e.to_string())?;
                let inbound = packet(flow.outside, src, [0; 6], flow.service);
                let theirs = judge_to_device(&compiled, &config, &inbound, false, 0);
                if ours.passes() != theirs.passes() {
                    return Err(format!(
                        "{} → {src} {}: evaluator {} ({}), datapath {theirs:?}\n{text}\
                         gateway: {gateway:?}",
                        flow.outside,
                        flow.service,
                        outcome(Ok(ours)),
                        if ours.passes() { "passes" } else { "dropped" },
                    ));
                }
            }
            Ok(())
        }

        /// Minimal cases where the datapath once disagreed with SPEC §2, found by the
        /// property test below and fixed in compile.rs.
        mod datapath_regressions {
            use super::*;

            const DEVICE_10_0_0_1: &str =
                "kind: Segment\nname: s\ndevices: [{id: d, addresses: [10.0.0.1]}]\n";

            /// Whether a new flow from `src` to `dst` passes: (evaluator, datapath). A flow
            /// from a device's address is judged on ingress, any other towards the device.
            fn passes(text: &str, src: &str, dst: &str, service: Service) -> (bool, bool) {
                let policy = load_str(Path::new("t.yaml"), text).expect("the case loads");
                let compiled = compile(&policy, &[]).expect("the case compiles");
                let ev = Evaluator::new(&policy, &[]);
                let (src, dst) = (ip(src), ip(dst));
                let ours = ev
                    .judge(
                        &FlowSource::Address(src),
                        &FlowDestination::Address(dst),
                        service,
                    )
                    .expect("judged");
                let packet = packet(src, dst, [0; 6], service);
                let config = Config::default();
                let theirs = if ev.owner(src).is_some() {
                    judge_from_device(&compiled, &config, &packet, 0)
                } else {
                    judge_to_device(&compiled, &config, &packet, false, 0)
                };
                (ours.passes(), theirs.passes())
            }

            #[test]
            fn an_ipv6_cidr_does_not_cover_ipv4_addresses() {
                let text = format!(
                    "{DEVICE_10_0_0_1}allow:\n  - {{to: \"::/0\", ports: [tcp]}}\naccept:\n  \
                     - {{from: \"::/0\", ports: [tcp]}}\n"
                );
                let tcp = Service::Tcp(22);
                assert_eq!(passes(&text, "10.0.0.1", "192.0.2.1", tcp), (false, false));
                assert_eq!(passes(&text, "192.0.2.1", "10.0.0.1", tcp), (false, false));
            }

            #[test]
            fn an_ipv4_mapped_cidr_covers_device_addresses() {
                let text = "kind: Segment\nname: s\ndevices: [{id: d, addresses: [10.0.0.1]}, \
                            {id: e, addresses: [10.0.0.2]}]\nallow:\n  \
                            - {to: \"::ffff:0.0.0.0/96\", ports: [any]}\n";
                // It does cover an outside IPv4 address, and should cover a device's as well.
                assert_eq!(
                    passes(text, "10.0.0.1", "192.0.2.1", Service::Icmp),
                    (true, true)
                );
                assert_eq!(
                    passes(text, "10.0.0.1", "10.0.0.2", Service::Icmp),
                    (true, true)
                );
            }

            #[test]
            fn an_ipv4_mapped_device_address_is_in_ipv4_cidrs() {
                let text = "kind: Segment\nname: s\ndevices: [{id: d, addresses: [10.0.0.1]}, \
                            {id: e, addresses: [\"::ffff:10.0.0.2\"]}]\nallow:\n  \
                            - {to: 10.0.0.0/8, ports: [any]}\n";
                assert_eq!(
                    passes(text, "10.0.0.1", "10.0.0.2", Service::Icmp),
                    (true, true)
                );
            }

            #[test]
            fn a_cidr_and_its_ipv4_mapped_twin_both_apply() {
                let text = format!(
                    "{DEVICE_10_0_0_1}allow:\n  - {{to: z, ports: [80/tcp]}}\n  \
                     - {{to: \"::ffff:10.0.0.0/104\", ports: [81/tcp]}}\n---\nkind: Zone\n\
                     name: z\ncidrs: [10.0.0.0/8]\n"
                );
                for port in [80, 81] {
                    let tcp = Service::Tcp(port);
                    assert_eq!(passes(&text, "10.0.0.1", "10.9.9.9", tcp), (true, true));
                }
            }

            #[test]
            fn the_datapath_names_the_first_rule_that_applies() {
                for rules in [
                    "  - {to: 0.0.0.0/0, ports: [any]}\n  - {to: s, ports: [1-443/tcp]}\n",
                    "  - {to: s, ports: [1-1000/tcp]}\n  - {to: d, ports: [22/tcp]}\n",
                ] {
                    let text = format!("{DEVICE_10_0_0_1}allow:\n{rules}");
                    let policy = load_str(Path::new("t.yaml"), &text).expect("the case loads");
                    let compiled = compile(&policy, &[]).expect("the case compiles");
                    let (src, tcp) = (ip("10.0.0.1"), Service::Tcp(22));
                    let packet = packet(src, src, [0; 6], tcp);
                    let theirs = judge_from_device(&compiled, &Config::default(), &packet, 0);
                    let theirs = compiled.rule(theirs.rule).map(|r| r.location.line);
                    let ours = Evaluator::new(&policy, &[])
                        .judge(
                            &FlowSource::Address(src),
                            &FlowDestination::Address(src),
                            tcp,
                        )
                        .ok()
                        .and_then(|v| match v {
                            Verdict::Allow { rule, .. } => Some(rule.location().line),
                            Verdict::Deny { .. } => None,
                        });
                    assert_eq!((ours, theirs), (Some(5), Some(5)), "{rules}");
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn evaluator_agrees_with_the_datapath(
                plan in plan(),
                flows in vec(flow_plan(), 1..24),
            ) {
                let (text, gateway) = render(&plan);
                if let Err(disagreement) = check(&text, &gateway, &flows) {
                    prop_assert!(false, "{}", disagreement);
                }
            }
        }
    }
}
