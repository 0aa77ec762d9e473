//! The validated policy: what the segment files say, with every name resolved and every
//! item carrying the place it was written, so that later stages (compiler, lint, explain,
//! diff) can point back at the YAML.

use std::{fmt, net::IpAddr, ops::RangeInclusive, path::PathBuf, sync::Arc, time::Duration};

use ipnet::{IpNet, Ipv4Net};

/// Where something was written: `file:line:col`, 1-based.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: Arc<PathBuf>,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A whole policy directory.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub segments: Vec<Segment>,
    pub zones: Vec<Zone>,
    pub quarantine: Option<Quarantine>,
}

/// A device of a policy, with where it sits.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAt<'p> {
    /// Its number: its place among all the policy's devices (segment by segment), from 1,
    /// as the datapath numbers devices.
    pub number: u32,
    pub segment_index: usize,
    pub segment: &'p Segment,
    pub device: &'p Device,
}

/// Where the devices of one policy sit, so that the daemon finds one by id, MAC or static
/// address without a walk over all of them. Built once per policy; the lookups take that
/// policy, which holds the devices (the index holds only their numbers).
#[derive(Clone, Debug, Default)]
pub struct DeviceIndex {
    /// Device numbers, in the order of the devices' ids.
    by_id: Vec<u32>,
    /// How many devices come before each segment's.
    segment_starts: Vec<u32>,
    /// The device that has each MAC (the last one listed, should two share one), in the
    /// order of the MACs. Sorted lists, not hash maps: half the memory at 100k devices.
    by_mac: Vec<([u8; 6], u32)>,
    /// The device that has each static address (canonical: IPv4 as IPv4), in the order of
    /// the addresses.
    statics: Vec<(IpAddr, u32)>,
}

impl DeviceIndex {
    pub fn new(policy: &Policy) -> DeviceIndex {
        let mut index = DeviceIndex::default();
        let mut ids: Vec<(&str, u32)> = Vec::new();
        for segment in &policy.segments {
            index.segment_starts.push(ids.len() as u32);
            for device in &segment.devices {
                let number = ids.len() as u32 + 1;
                ids.push((&device.id, number));
                if let Some(mac) = device.mac {
                    index.by_mac.push((mac.0, number));
                }
                for ip in &device.addresses {
                    index.statics.push((ip.to_canonical(), number));
                }
            }
        }
        ids.sort_unstable();
        index.by_id = ids.into_iter().map(|(_, number)| number).collect();
        // The last device listed with a MAC comes first among those with it, and is kept.
        index
            .by_mac
            .sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        index.by_mac.dedup_by_key(|(mac, _)| *mac);
        // A policy binds an address to one device: no duplicates to drop.
        index.statics.sort_unstable();
        index.by_mac.shrink_to_fit();
        index.statics.shrink_to_fit();
        index
    }

    /// Device `number` of `policy`.
    pub fn by_number<'p>(&self, policy: &'p Policy, number: u32) -> Option<DeviceAt<'p>> {
        let before = number.checked_sub(1)?;
        // The last segment that starts at or before it (segments without devices start
        // where the next one does).
        let segment_index = self
            .segment_starts
            .partition_point(|&s| s <= before)
            .checked_sub(1)?;
        let segment = policy.segments.get(segment_index)?;
        let device = segment
            .devices
            .get((before - self.segment_starts[segment_index]) as usize)?;
        Some(DeviceAt {
            number,
            segment_index,
            segment,
            device,
        })
    }

    /// The device of `policy` whose id is `id`.
    pub fn by_id<'p>(&self, policy: &'p Policy, id: &str) -> Option<DeviceAt<'p>> {
        let found = self
            .by_id
            .binary_search_by(|&n| {
                let at = self.by_number(policy, n);
                at.map_or("", |at| at.device.id.as_str()).cmp(id)
            })
            .ok()?;
        self.by_number(policy, self.by_id[found])
    }

    /// The device of `policy` whose MAC is `mac`.
    pub fn by_mac<'p>(&self, policy: &'p Policy, mac: [u8; 6]) -> Option<DeviceAt<'p>> {
        let found = self.by_mac.binary_search_by_key(&mac, |(m, _)| *m).ok()?;
        self.by_number(policy, self.by_mac[found].1)
    }

    /// The number of the device that has `ip` as a static address.
    pub fn static_owner(&self, ip: IpAddr) -> Option<u32> {
        let ip = ip.to_canonical();
        let found = self.statics.binary_search_by_key(&ip, |(a, _)| *a).ok()?;
        Some(self.statics[found].1)
    }

    pub fn is_static(&self, ip: IpAddr) -> bool {
        self.static_owner(ip).is_some()
    }

    /// Every static address of the policy (canonical).
    pub fn static_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.statics.iter().map(|(ip, _)| *ip)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Clone, Debug)]
pub struct Segment {
    pub name: String,
    pub description: Option<String>,
    pub mode: Mode,
    pub devices: Vec<Device>,
    pub allow: Vec<AllowRule>,
    pub accept: Vec<AcceptRule>,
    pub location: Location,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub mac: Option<MacAddr>,
    /// Static addresses; learned ones come from identity sources at run time.
    pub addresses: Vec<IpAddr>,
    pub location: Location,
}

/// What an `allow` rule's `to:` names, resolved against the policy's names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Segment(String),
    Device(String),
    Zone(String),
    Cidr(IpNet),
    Gateway,
}

/// What an `accept` rule's `from:` names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Zone(String),
    Cidr(IpNet),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    /// Every protocol (`any`).
    Any,
}

impl Protocol {
    /// IANA protocol number; `Any` is 0 (never a real L4 protocol on the wire we judge).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
            Protocol::Any => 0,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }
}

/// One entry of `ports:`. For protocols without ports the range is the full `0..=65535`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub ports: RangeInclusive<u16>,
    pub location: Location,
}

impl PortSpec {
    pub const ALL_PORTS: RangeInclusive<u16> = 0..=u16::MAX;
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
            Protocol::Icmp => return f.write_str("icmp"),
            Protocol::Icmpv6 => return f.write_str("icmpv6"),
            Protocol::Any => return f.write_str("any"),
        };
        let (lo, hi) = (*self.ports.start(), *self.ports.end());
        if (lo, hi) == (0, u16::MAX) {
            f.write_str(proto)
        } else if lo == hi {
            write!(f, "{lo}/{proto}")
        } else {
            write!(f, "{lo}-{hi}/{proto}")
        }
    }
}

#[derive(Clone, Debug)]
pub struct AllowRule {
    pub to: Target,
    pub ports: Vec<PortSpec>,
    /// Location of the rule (the `- to:` list item).
    pub location: Location,
}

#[derive(Clone, Debug)]
pub struct AcceptRule {
    pub from: Source,
    pub ports: Vec<PortSpec>,
    pub location: Location,
}

#[derive(Clone, Debug)]
pub struct Zone {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    pub location: Location,
}

#[derive(Clone, Debug)]
pub struct Quarantine {
    pub allow: Vec<AllowRule>,
    pub triggers: Triggers,
    pub exempt: Vec<String>,
    pub location: Location,
}

#[derive(Clone, Debug, Default)]
pub struct Triggers {
    pub denied_flows: Option<DeniedFlowsTrigger>,
    pub fanout: Option<FanoutTrigger>,
}

#[derive(Clone, Debug)]
pub struct DeniedFlowsTrigger {
    pub count: u32,
    pub window: Duration,
}

#[derive(Clone, Debug)]
pub struct FanoutTrigger {
    pub destinations: u32,
    pub window: Duration,
}

/// `net` with an IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`) written as the IPv4 one.
pub fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_index_finds_devices_by_id_number_mac_and_static_address() {
        let yaml = "kind: Segment\nname: a\ndevices:\n\
            - {id: zeta, mac: \"02:00:00:00:00:01\", addresses: [10.0.0.1]}\n\
            - {id: alpha, addresses: [\"::ffff:10.0.0.2\", 2001:db8::2]}\n---\n\
            kind: Segment\nname: empty\n---\n\
            kind: Segment\nname: b\ndevices:\n- {id: mid, mac: \"02:00:00:00:00:03\"}\n\
            - {id: same-mac, mac: \"02:00:00:00:00:03\"}\n";
        let policy = crate::policy::load::load_str(std::path::Path::new("t.yaml"), yaml).unwrap();
        let index = DeviceIndex::new(&policy);
        let found = |id: &str| {
            index
                .by_id(&policy, id)
                .map(|at| (at.number, at.segment.name.as_str(), at.device.id.as_str()))
        };
        assert_eq!(found("zeta"), Some((1, "a", "zeta")));
        assert_eq!(found("alpha"), Some((2, "a", "alpha")));
        assert_eq!(found("mid"), Some((3, "b", "mid")));
        assert_eq!(found("nobody"), None);
        assert_eq!(index.by_number(&policy, 3).unwrap().segment_index, 2);
        assert!(index.by_number(&policy, 0).is_none());
        assert!(index.by_number(&policy, 5).is_none());
        let mac = |last: u8| index.by_mac(&policy, [2, 0, 0, 0, 0, last]);
        // Two devices with one MAC: the last listed has it.
        assert_eq!(mac(3).unwrap().number, 4);
        assert!(mac(2).is_none());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(index.static_owner(ip("10.0.0.2")), Some(2));
        assert_eq!(index.static_owner(ip("::ffff:10.0.0.1")), Some(1));
        assert!(index.is_static(ip("2001:db8::2")));
        assert!(!index.is_static(ip("10.0.0.3")));
        assert_eq!(index.static_addresses().count(), 3);
    }
}
