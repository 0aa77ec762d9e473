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
