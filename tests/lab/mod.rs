//! The end-to-end lab: a gateway, N devices and an uplink, each in its own network
//! namespace, wired with veth pairs; real traffic helpers; and the real `segward` daemon.
//!
//! ```text
//!   device ns  <name>-d0          gateway ns  <name>-gw                 uplink ns  <name>-up
//!   eth0 (dev MAC, /32 addrs) --- dev0  (GW_ADDR/32)
//!   eth0                      --- dev1  (GW_ADDR/32)     uplink0 10.255.0.1/24 --- eth0 10.255.0.2/24
//!   ...                                                                           lo: uplink hosts /32
//! ```
//!
//! * Devices: their addresses as /32 (/128) on `eth0`, `default via GW_ADDR dev eth0 onlink`.
//! * Gateway: forwarding on; GW_ADDR (and GW_ADDR6) on every device link, so devices can
//!   ARP/ND for it; a /32 (/128) route per device address via that device's link; a /32
//!   (/128) route per uplink host via 10.255.0.2 (fd00:255::2). No default route: any other
//!   destination is unreachable (ICMP from the gateway), nothing ever leaves the lab.
//! * Uplink: `eth0` 10.255.0.2/24 (fd00:255::2/64), default via the gateway; every "uplink
//!   host" is an extra /32 (/128) on its `lo`, so one namespace plays many remote hosts.
//! * rp_filter, redirects and ICMP rate limits are off everywhere; IPv6 is disabled in labs
//!   without IPv6 addresses (no MLD/RS chatter), and used without DAD/RA otherwise.
//!
//! Namespaces are named `sw<pid>x<n>-gw`, `-up`, `-d<i>`; all are deleted on drop (also
//! while unwinding from a panic, and when `build()` fails half-way). Namespaces of this
//! scheme whose process is gone are reaped when a lab is built.
//!
//! Hosts are named by strings: a device's name, `"gateway"` or `"uplink"`.
//!
//! ```rust,ignore
//! let lab = Lab::builder()
//!     .device("temp-001", &["10.20.1.11"])
//!     .device_with_mac("cam-01", "02:00:00:00:20:01", &["10.20.2.21"])
//!     .uplink_host("198.51.100.10")
//!     .build();
//! let policy = lab.dir().join("segments"); // write YAML there
//! let _segward = lab.start_segward(&["run", "--policy", policy.to_str().unwrap(),
//!     "--device-iface", lab.device_iface("temp-001"), "--device-iface", lab.device_iface("cam-01"),
//!     "--uplink-iface", lab.uplink_iface()]);
//! let _broker = lab.tcp_listen("uplink", "198.51.100.10:8883");
//! lab.assert_passes("temp-001", &Probe::tcp("198.51.100.10:8883"));
//! lab.assert_dropped("cam-01", &Probe::tcp("198.51.100.10:8883"));
//! lab.assert_dropped("cam-01", &Probe::icmp("10.20.1.11"));
//! ```
//!
//! "Passes" means the flow works both ways within PASS_TIMEOUT (3 s); "dropped" means
//! nothing at all came back within DROP_TIMEOUT (1 s) — a TCP RST or an ICMP error is an
//! answer, not a drop, and `assert_dropped` fails on it.

#![allow(dead_code, unused_imports)] // each e2e test module uses a different part of the API

mod daemon;
mod files;
mod netns;
mod traffic;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use daemon::{segward, segward_bin, Daemon, READY_TIMEOUT, STOP_GRACE};
pub use files::wait_until;
pub use netns::{exists as netns_exists, list as netns_list};
pub use traffic::{sockaddr, IpLike, Outcome, Probe, Proto, TcpConn, TcpServer, UdpServer};

/// The gateway's own IPv4 address, on every device-facing link.
pub const GW_ADDR: Ipv4Addr = Ipv4Addr::new(10, 254, 254, 1);
/// The gateway's own IPv6 address, on every device-facing link.
pub const GW_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x254, 0, 0, 0, 0, 0, 1);
/// Gateway end of the uplink link (`uplink0`), /24.
pub const UPLINK_GW_ADDR: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
/// Uplink end of the uplink link (`eth0` in the uplink namespace), /24.
pub const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
pub const UPLINK_GW_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 1);
pub const UPLINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 2);
/// Gateway-side name of the uplink link.
pub const UPLINK_IFACE: &str = "uplink0";

/// Host names that are not devices.
pub const GATEWAY: &str = "gateway";
pub const UPLINK: &str = "uplink";

/// Timeout for a flow that should pass.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout for a flow that should be dropped (a drop can only show as silence).
pub const DROP_TIMEOUT: Duration = Duration::from_secs(1);

const NEED_ROOT: &str =
    "e2e tests need root (CAP_NET_ADMIN, CAP_BPF): run them via `cargo xtask test`";

/// Panics (never skips) unless we may create namespaces and load BPF.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21 (mounts for `ip netns`), CAP_BPF 39.
    let missing: Vec<&str> = [
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
    ]
    .into_iter()
    .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        panic!("{NEED_ROOT} (missing: {})", missing.join(", "));
    }
}

struct DeviceSpec {
    name: String,
    mac: Option<String>,
    addrs: Vec<IpAddr>,
}

/// Describes a lab; `build()` creates it.
#[derive(Default)]
pub struct LabBuilder {
    devices: Vec<DeviceSpec>,
    uplink_hosts: Vec<IpAddr>,
    ipv6: bool,
    fail_at: Option<&'static str>,
}

fn parse_addrs(owner: &str, addrs: &[&str]) -> Vec<IpAddr> {
    addrs
        .iter()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("lab: {owner}: {a:?} is not an IP address"))
        })
        .collect()
}

fn normalise_mac(owner: &str, mac: &str) -> String {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        ok,
        "lab: {owner}: {mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
    );
    let mac = mac.to_ascii_lowercase();
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert!(
        first & 1 == 0,
        "lab: {owner}: {mac} is a multicast MAC address"
    );
    mac
}

/// Addresses that the lab's own wiring uses or that cannot be a host's.
fn check_addr(owner: &str, a: IpAddr) {
    let reserved = match a {
        IpAddr::V4(v4) => {
            v4 == GW_ADDR
                || v4.octets()[..3] == [10, 255, 0]
                || v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6 == GW_ADDR6
                || v6.segments()[..4] == [0xfd00, 0x255, 0, 0]
                || v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.segments()[0] & 0xffc0 == 0xfe80
        }
    };
    assert!(
        !reserved,
        "lab: {owner}: {a} is reserved (loopback/multicast/link-local, or the lab's own \
         {GW_ADDR}, {GW_ADDR6}, 10.255.0.0/24, fd00:255::/64)"
    );
}

impl LabBuilder {
    /// A device with the given addresses (IPv4 and/or IPv6; may be empty) and a
    /// deterministic MAC (see `Lab::device_mac`).
    pub fn device(self, name: &str, addrs: &[&str]) -> Self {
        self.add_device(name, None, addrs)
    }

    /// A device whose `eth0` has this MAC (policies pin MACs).
    pub fn device_with_mac(self, name: &str, mac: &str, addrs: &[&str]) -> Self {
        let mac = normalise_mac(name, mac);
        self.add_device(name, Some(mac), addrs)
    }

    fn add_device(mut self, name: &str, mac: Option<String>, addrs: &[&str]) -> Self {
        assert!(
            !name.is_empty() && name != GATEWAY && name != UPLINK,
            "lab: {name:?} cannot name a device"
        );
        assert!(
            self.devices.iter().all(|d| d.name != name),
            "lab: device {name:?} declared twice"
        );
        let addrs = parse_addrs(name, addrs);
        self.devices.push(DeviceSpec {
            name: name.to_string(),
            mac,
            addrs,
        });
        self
    }

    /// A remote host behind the uplink (an extra address on the uplink namespace's `lo`).
    pub fn uplink_host(mut self, addr: &str) -> Self {
        self.uplink_hosts
            .extend(parse_addrs("uplink host", &[addr]));
        self
    }

    /// Enable IPv6 even if no IPv6 address was given (it is enabled automatically when one
    /// is), e.g. to add IPv6 addresses later with `Lab::add_address`.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// Self-test hook: panic at the named setup step ("namespaces", "links", "addresses"),
    /// to prove that a half-built lab is cleaned up.
    #[doc(hidden)]
    pub fn fail_at(mut self, step: &'static str) -> Self {
        self.fail_at = Some(step);
        self
    }

    /// Creates the lab. Panics with a clear message on failure, after deleting whatever
    /// it had created.
    pub fn build(self) -> Lab {
        require_root();
        let mut seen: Vec<(IpAddr, &str)> = Vec::new();
        let owners = self
            .devices
            .iter()
            .flat_map(|d| d.addrs.iter().map(move |a| (*a, d.name.as_str())))
            .chain(self.uplink_hosts.iter().map(|a| (*a, "uplink host")));
        for (a, owner) in owners {
            check_addr(owner, a);
            if let Some((_, other)) = seen.iter().find(|(b, _)| *b == a) {
                panic!("lab: {a} is given to both {other} and {owner}");
            }
            seen.push((a, owner));
        }
        let ipv6 = self.ipv6 || seen.iter().any(|(a, _)| a.is_ipv6());

        netns::reap_stale();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}{}x{}",
            netns::NAME_PREFIX,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let devices = self
            .devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| Device {
                ns: format!("{id}-d{i}"),
                iface: format!("dev{i}"),
                mac: d
                    .mac
                    .unwrap_or_else(|| format!("02:5a:00:d0:{:02x}:{:02x}", i >> 8, i & 0xff)),
                gw_mac: format!("02:5a:00:9a:{:02x}:{:02x}", i >> 8, i & 0xff),
                addrs: Mutex::new(d.addrs),
                name: d.name,
            })
            .collect();
        let mut lab = Lab {
            gw_ns: format!("{id}-gw"),
            up_ns: format!("{id}-up"),
            id,
            devices,
            uplink_hosts: Mutex::new(self.uplink_hosts),
            ipv6,
            created: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("segward-lab-")
                .tempdir()
                .expect("lab: cannot create a temporary directory"),
        };
        // If setup panics, `lab` is dropped while unwinding and deletes what exists.
        lab.setup(self.fail_at);
        lab
    }
}

struct Device {
    name: String,
    ns: String,
    iface: String,
    mac: String,
    gw_mac: String,
    addrs: Mutex<Vec<IpAddr>>,
}

/// A running lab. See the module documentation for the topology.
pub struct Lab {
    id: String,
    gw_ns: String,
    up_ns: String,
    devices: Vec<Device>,
    uplink_hosts: Mutex<Vec<IpAddr>>,
    ipv6: bool,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
    dir: tempfile::TempDir,
}

/// `ip -n NS <words>`; the words are split on whitespace (no argument here has spaces).
fn ipn(ns: &str, words: &str) -> Result<(), String> {
    let args: Vec<&str> = ["-n", ns]
        .into_iter()
        .chain(words.split_whitespace())
        .collect();
    netns::ip(&args)
}

/// `ipn` during setup: failure panics (and the half-built lab is torn down).
fn setup_ipn(ns: &str, words: &str) {
    if let Err(e) = ipn(ns, words) {
        panic!("lab setup failed: {e}");
    }
}

/// Sysctls every lab namespace gets, before any of its links exist (new links copy the
/// `default` values).
fn base_sysctls(ipv6: bool, forwarding: bool) -> Result<(), String> {
    use netns::sysctl;
    for scope in ["all", "default"] {
        sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        sysctl(&format!("net.ipv4.conf.{scope}.accept_redirects"), "0")?;
        sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "0")?;
        sysctl(&format!("net.ipv4.conf.{scope}.accept_source_route"), "0")?;
        if ipv6 {
            sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.dad_transmits"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.accept_ra"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.autoconf"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.router_solicitations"), "0")?;
            sysctl(&format!("net.ipv6.conf.{scope}.accept_redirects"), "0")?;
        } else {
            sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "1")?;
        }
    }
    sysctl("net.ipv4.icmp_ratelimit", "0")?;
    if ipv6 {
        sysctl("net.ipv6.icmp.ratelimit", "0")?;
    }
    let fwd = if forwarding { "1" } else { "0" };
    sysctl("net.ipv4.conf.all.forwarding", fwd)?;
    if ipv6 {
        sysctl("net.ipv6.conf.all.forwarding", fwd)?;
    }
    Ok(())
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    fn setup(&mut self, fail_at: Option<&'static str>) {
        let id = self.id.clone();
        let check = |step: &str| {
            if fail_at == Some(step) {
                panic!("lab setup failed (lab {id}): injected failure at step {step:?}");
            }
        };
        // 1. namespaces and their sysctls
        let all: Vec<String> = [self.gw_ns.clone(), self.up_ns.clone()]
            .into_iter()
            .chain(self.devices.iter().map(|d| d.ns.clone()))
            .collect();
        for ns in &all {
            if let Err(e) = netns::add(ns) {
                // `ip netns add` killed half-way (a Ctrl-C) can leave the name behind.
                if netns::exists(ns) {
                    self.created.push(ns.clone());
                }
                panic!("lab setup failed: {e}");
            }
            self.created.push(ns.clone());
            let (ipv6, fwd) = (self.ipv6, *ns == self.gw_ns);
            if let Err(e) = netns::run_in(ns, move || base_sysctls(ipv6, fwd)) {
                panic!("lab setup failed in {ns}: {e}");
            }
            setup_ipn(ns, "link set lo up");
        }
        check("namespaces");

        // 2. veth pairs, created directly in their namespaces (never in the root one)
        let (gw, up) = (self.gw_ns.as_str(), self.up_ns.as_str());
        for d in &self.devices {
            let (iface, gw_mac, mac, ns) = (&d.iface, &d.gw_mac, &d.mac, &d.ns);
            setup_ipn(
                gw,
                &format!(
                    "link add {iface} address {gw_mac} type veth \
                     peer name eth0 address {mac} netns {ns}"
                ),
            );
        }
        setup_ipn(
            gw,
            &format!("link add {UPLINK_IFACE} type veth peer name eth0 netns {up}"),
        );
        check("links");

        // 3. addresses and routes
        for d in &self.devices {
            let (iface, ns) = (&d.iface, &d.ns);
            setup_ipn(gw, &format!("addr add {GW_ADDR}/32 dev {iface}"));
            if self.ipv6 {
                setup_ipn(gw, &format!("addr add {GW_ADDR6}/128 dev {iface} nodad"));
            }
            setup_ipn(gw, &format!("link set {iface} up"));
            setup_ipn(ns, "link set eth0 up");
            setup_ipn(
                ns,
                &format!("route add default via {GW_ADDR} dev eth0 onlink"),
            );
            if self.ipv6 {
                setup_ipn(
                    ns,
                    &format!("-6 route add default via {GW_ADDR6} dev eth0 onlink"),
                );
            }
            for a in d.addrs.lock().unwrap().iter() {
                self.wire_device_addr(d, *a)
                    .unwrap_or_else(|e| panic!("lab setup failed: {e}"));
            }
        }
        setup_ipn(
            gw,
            &format!("addr add {UPLINK_GW_ADDR}/24 dev {UPLINK_IFACE}"),
        );
        setup_ipn(up, &format!("addr add {UPLINK_ADDR}/24 dev eth0"));
        if self.ipv6 {
            setup_ipn(
                gw,
                &format!("addr add {UPLINK_GW_ADDR6}/64 dev {UPLINK_IFACE} nodad"),
            );
            setup_ipn(up, &format!("addr add {UPLINK_ADDR6}/64 dev eth0 nodad"));
        }
        setup_ipn(gw, &format!("link set {UPLINK_IFACE} up"));
        setup_ipn(up, "link set eth0 up");
        setup_ipn(up, &format!("route add default via {UPLINK_GW_ADDR}"));
        if self.ipv6 {
            setup_ipn(up, &format!("-6 route add default via {UPLINK_GW_ADDR6}"));
        }
        for h in self.uplink_hosts() {
            self.wire_uplink_host(h)
                .unwrap_or_else(|e| panic!("lab setup failed: {e}"));
        }
        check("addresses");
    }

    /// Puts `a` on the device's eth0 and routes it from the gateway via the device's link.
    fn wire_device_addr(&self, d: &Device, a: IpAddr) -> Result<(), String> {
        if a.is_ipv6() && !self.ipv6 {
            return Err(format!(
                "{}: {a}: this lab was built without IPv6 (use `Lab::builder().ipv6()`)",
                d.name
            ));
        }
        let (iface, ns) = (&d.iface, &d.ns);
        match a {
            IpAddr::V4(_) => {
                ipn(ns, &format!("-4 addr add {a}/32 dev eth0"))?;
                ipn(
                    &self.gw_ns,
                    &format!("-4 route add {a}/32 dev {iface} src {GW_ADDR}"),
                )
            }
            IpAddr::V6(_) => {
                ipn(ns, &format!("-6 addr add {a}/128 dev eth0 nodad"))?;
                ipn(
                    &self.gw_ns,
                    &format!("-6 route add {a}/128 dev {iface} src {GW_ADDR6}"),
                )
            }
        }
    }

    fn unwire_device_addr(&self, d: &Device, a: IpAddr) -> Result<(), String> {
        let (iface, ns) = (&d.iface, &d.ns);
        let cidr = if a.is_ipv4() {
            format!("{a}/32")
        } else {
            format!("{a}/128")
        };
        ipn(&self.gw_ns, &format!("route del {cidr} dev {iface}"))?;
        ipn(ns, &format!("addr del {cidr} dev eth0"))
    }

    /// Puts `h` on the uplink namespace's lo and routes it from the gateway via the uplink.
    fn wire_uplink_host(&self, h: IpAddr) -> Result<(), String> {
        if h.is_ipv6() && !self.ipv6 {
            return Err(format!(
                "uplink host {h}: this lab was built without IPv6 (use `Lab::builder().ipv6()`)"
            ));
        }
        let (up, gw) = (&self.up_ns, &self.gw_ns);
        match h {
            IpAddr::V4(_) => {
                ipn(up, &format!("-4 addr add {h}/32 dev lo"))?;
                ipn(
                    gw,
                    &format!("-4 route add {h}/32 via {UPLINK_ADDR} dev {UPLINK_IFACE}"),
                )
            }
            IpAddr::V6(_) => {
                ipn(up, &format!("-6 addr add {h}/128 dev lo nodad"))?;
                ipn(
                    gw,
                    &format!("-6 route add {h}/128 via {UPLINK_ADDR6} dev {UPLINK_IFACE}"),
                )
            }
        }
    }

    // ---- topology -------------------------------------------------------------------

    fn device(&self, name: &str) -> &Device {
        self.devices
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
                panic!("lab: no device {name:?} (devices: {names:?})")
            })
    }

    /// This lab's unique prefix (`sw<pid>x<n>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The gateway's namespace, for `segward run --netns`.
    pub fn gateway_netns(&self) -> &str {
        &self.gw_ns
    }
    pub fn uplink_netns(&self) -> &str {
        &self.up_ns
    }
    /// Namespace of a host: a device name, `"gateway"` or `"uplink"`.
    pub fn netns_of(&self, host: &str) -> &str {
        match host {
            GATEWAY => &self.gw_ns,
            UPLINK => &self.up_ns,
            dev => &self.device(dev).ns,
        }
    }
    /// Every namespace of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        self.created.clone()
    }

    /// Gateway-side interface of a device's link (`dev0`, `dev1`, ... in declaration order).
    pub fn device_iface(&self, device: &str) -> &str {
        &self.device(device).iface
    }
    /// All device-facing interfaces of the gateway, in declaration order.
    pub fn device_ifaces(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.iface.clone()).collect()
    }
    /// Gateway-side interface of the uplink (`uplink0`).
    pub fn uplink_iface(&self) -> &str {
        UPLINK_IFACE
    }
    /// Device names, in declaration order.
    pub fn devices(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }
    /// MAC of the device's `eth0`: the one given to `device_with_mac`, else
    /// `02:5a:00:d0:00:<index>`.
    pub fn device_mac(&self, device: &str) -> &str {
        &self.device(device).mac
    }
    /// MAC of the gateway's end of that device's link (`02:5a:00:9a:00:<index>`).
    pub fn gateway_mac(&self, device: &str) -> &str {
        &self.device(device).gw_mac
    }
    /// The device's current addresses.
    pub fn device_addrs(&self, device: &str) -> Vec<IpAddr> {
        self.device(device).addrs.lock().unwrap().clone()
    }
    /// The device's first address (panics if it has none).
    pub fn device_addr(&self, device: &str) -> IpAddr {
        self.device_addrs(device)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("lab: device {device:?} has no address"))
    }
    pub fn uplink_hosts(&self) -> Vec<IpAddr> {
        self.uplink_hosts.lock().unwrap().clone()
    }
    /// The gateway's own IPv4 address (on every device link): GW_ADDR.
    pub fn gateway_addr(&self) -> IpAddr {
        IpAddr::V4(GW_ADDR)
    }
    /// The gateway's own IPv6 address (only configured in labs with IPv6): GW_ADDR6.
    pub fn gateway_addr6(&self) -> IpAddr {
        IpAddr::V6(GW_ADDR6)
    }
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }
    /// A scratch directory (policies, sockets, state) removed with the lab.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    // ---- changing the lab while it runs --------------------------------------------

    /// Gives a device another address (on its eth0, routed by the gateway): what a DHCP
    /// lease does. Panics if the address is in use elsewhere in the lab.
    pub fn add_address(&self, device: &str, addr: impl IpLike) {
        let a = addr.to_ip();
        check_addr(device, a);
        let taken = self
            .devices
            .iter()
            .find(|d| d.addrs.lock().unwrap().contains(&a));
        if let Some(owner) = taken {
            panic!("lab: {a} already belongs to {}", owner.name);
        }
        assert!(
            !self.uplink_hosts().contains(&a),
            "lab: {a} is an uplink host"
        );
        let d = self.device(device);
        self.wire_device_addr(d, a)
            .unwrap_or_else(|e| panic!("lab: {e}"));
        d.addrs.lock().unwrap().push(a);
    }

    /// Takes an address away from a device (and the gateway's route to it).
    pub fn remove_address(&self, device: &str, addr: impl IpLike) {
        let a = addr.to_ip();
        let d = self.device(device);
        assert!(
            d.addrs.lock().unwrap().contains(&a),
            "lab: {a} is not an address of {device}"
        );
        self.unwire_device_addr(d, a)
            .unwrap_or_else(|e| panic!("lab: {e}"));
        d.addrs.lock().unwrap().retain(|x| *x != a);
    }

    /// Moves an address from one device to another (a lease changing hands).
    pub fn move_address(&self, from: &str, to: &str, addr: impl IpLike) {
        let a = addr.to_ip();
        self.remove_address(from, a);
        self.add_address(to, a);
    }

    /// Adds a remote host behind the uplink while the lab runs.
    pub fn add_uplink_host(&self, addr: impl IpLike) {
        let a = addr.to_ip();
        check_addr("uplink host", a);
        self.wire_uplink_host(a)
            .unwrap_or_else(|e| panic!("lab: {e}"));
        self.uplink_hosts.lock().unwrap().push(a);
    }

    // ---- running things in a namespace ---------------------------------------------

    /// Runs `f` on a fresh thread inside `host`'s network namespace and returns its
    /// result (a panic in `f` propagates). Sockets `f` creates live in that namespace.
    pub fn run_in<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in(self.netns_of(host), f)
    }

    /// Runs `f` on a background thread inside `host`'s network namespace, e.g. traffic that
    /// goes on while the test changes something; join the handle for `f`'s result.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = self.netns_of(host).to_string();
        std::thread::spawn(move || netns::run_in(&ns, f))
    }

    /// `ip netns exec <ns of host> ARGS...`, output captured, exit status not checked.
    pub fn exec(&self, host: &str, args: &[&str]) -> Output {
        netns::exec(self.netns_of(host), args)
    }

    /// Like `exec`, but panics (showing stderr) unless the command succeeds; returns stdout.
    pub fn exec_ok(&self, host: &str, args: &[&str]) -> String {
        let out = self.exec(host, args);
        assert!(
            out.status.success(),
            "`{}` in {host} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    // ---- traffic -------------------------------------------------------------------

    /// A line-echo TCP server on `addr` (e.g. `"198.51.100.10:8883"`, port 0 for any) in
    /// `host`'s namespace. Stops on drop.
    pub fn tcp_listen(&self, host: &str, addr: impl ToSocketAddrs + std::fmt::Debug) -> TcpServer {
        let addr = sockaddr(addr);
        TcpServer::start(self.netns_of(host), addr)
            .unwrap_or_else(|e| panic!("lab: tcp_listen in {host}: {e}"))
    }

    /// A UDP echo server on `addr` in `host`'s namespace. Stops on drop.
    pub fn udp_echo_server(
        &self,
        host: &str,
        addr: impl ToSocketAddrs + std::fmt::Debug,
    ) -> UdpServer {
        let addr = sockaddr(addr);
        UdpServer::start(self.netns_of(host), addr)
            .unwrap_or_else(|e| panic!("lab: udp_echo_server in {host}: {e}"))
    }

    /// Tries one flow from `host`, bounded by `timeout`. See `Outcome`.
    pub fn probe(&self, host: &str, probe: &Probe, timeout: Duration) -> Outcome {
        self.run_in(host, || traffic::probe(probe, timeout))
    }

    /// Asserts that the flow passes (within PASS_TIMEOUT).
    #[track_caller]
    pub fn assert_passes(&self, host: &str, probe: &Probe) {
        let outcome = self.probe(host, probe, PASS_TIMEOUT);
        assert!(
            outcome.passed(),
            "expected {probe} from {host} to pass, but it {outcome}"
        );
    }

    /// Asserts that the flow is dropped: nothing at all comes back within DROP_TIMEOUT
    /// (a refusal or an ICMP error would mean a packet got through or was answered).
    #[track_caller]
    pub fn assert_dropped(&self, host: &str, probe: &Probe) {
        let outcome = self.probe(host, probe, DROP_TIMEOUT);
        assert!(
            outcome == Outcome::TimedOut,
            "expected {probe} from {host} to be dropped (time out), but it {outcome}"
        );
    }

    /// Opens a TCP connection from `host` (bounded by `timeout`) and hands it back, e.g.
    /// to show that an established flow keeps working, or is cut.
    pub fn tcp_connect(
        &self,
        host: &str,
        dst: impl ToSocketAddrs + std::fmt::Debug,
        timeout: Duration,
    ) -> std::io::Result<TcpConn> {
        let dst = sockaddr(dst);
        self.run_in(host, || traffic::tcp_connect(None, dst, timeout))
    }

    /// `tcp_connect` from a chosen (possibly unassigned: IP_TRANSPARENT) source address.
    pub fn tcp_connect_from(
        &self,
        host: &str,
        src: impl IpLike,
        dst: impl ToSocketAddrs + std::fmt::Debug,
        timeout: Duration,
    ) -> std::io::Result<TcpConn> {
        let (src, dst) = (src.to_ip(), sockaddr(dst));
        self.run_in(host, || traffic::tcp_connect(Some(src), dst, timeout))
    }

    /// One datagram to a UDP echo server; true if it came back within `timeout`.
    pub fn udp_roundtrip(
        &self,
        host: &str,
        dst: impl ToSocketAddrs + std::fmt::Debug,
        timeout: Duration,
    ) -> bool {
        self.probe(host, &Probe::udp(dst), timeout).passed()
    }

    /// One ICMP echo request; true if the reply came back within `timeout`.
    pub fn ping(&self, host: &str, dst: impl IpLike, timeout: Duration) -> bool {
        self.probe(host, &Probe::icmp(dst), timeout).passed()
    }

    // ---- the daemon ----------------------------------------------------------------

    /// `segward ARGS... --netns <gateway namespace>` as a Command, not started.
    pub fn segward_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(segward_bin());
        cmd.args(args).args(["--netns", &self.gw_ns]);
        if args.first() == Some(&"run") {
            // The lab's own control socket and state, so that labs never meet.
            cmd.arg("--socket")
                .arg(self.control_socket())
                .arg("--state-dir")
                .arg(self.dir().join("state"));
        }
        cmd
    }

    /// The control socket of the lab's `segward run`.
    pub fn control_socket(&self) -> std::path::PathBuf {
        self.dir().join("control.sock")
    }

    /// A daemon command (`status`, `quarantine ...`) against the lab's daemon.
    pub fn control(&self, args: &[&str]) -> std::process::Output {
        Command::new(segward_bin())
            .args(args)
            .arg("--socket")
            .arg(self.control_socket())
            .output()
            .expect("lab: running segward")
    }

    /// Writes `yaml` as the lab's policy directory (one file) and returns the directory.
    pub fn write_policy(&self, yaml: &str) -> std::path::PathBuf {
        let dir = self.dir().join("policy");
        std::fs::create_dir_all(&dir).expect("lab: policy dir");
        std::fs::write(dir.join("policy.yaml"), yaml).expect("lab: policy file");
        dir
    }

    /// `segward run` on the lab's policy directory (see `write_policy`), attached to every
    /// device interface, with `extra` arguments.
    pub fn start_enforcing(&self, extra: &[&str]) -> Daemon<'_> {
        let mut args = vec!["run".to_string(), "--policy".into()];
        args.push(self.dir().join("policy").display().to_string());
        for iface in self.device_ifaces() {
            args.extend(["--device-iface".into(), iface]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_segward(&args)
    }

    /// Tries each flow `(name, host, probe, passes)`; "dropped" means nothing came back at
    /// all (no RST, no ICMP error). Returns one line per flow judged wrongly.
    pub fn judge_flows(&self, cases: &[(&str, &str, Probe, bool)]) -> Vec<String> {
        cases
            .iter()
            .filter_map(|(name, host, probe, passes)| {
                let timeout = if *passes { PASS_TIMEOUT } else { DROP_TIMEOUT };
                let outcome = self.probe(host, probe, timeout);
                let ok = if *passes {
                    outcome.passed()
                } else {
                    outcome == Outcome::TimedOut
                };
                (!ok).then(|| {
                    let want = if *passes { "pass" } else { "be dropped" };
                    format!("{name}: {probe} from {host} should {want}, but it {outcome}")
                })
            })
            .collect()
    }

    /// Asserts that every flow of `judge_flows` is judged as expected; `what` names the
    /// moment in the failure message.
    #[track_caller]
    pub fn assert_flows(&self, what: &str, cases: &[(&str, &str, Probe, bool)]) {
        let failures = self.judge_flows(cases);
        assert!(
            failures.is_empty(),
            "{what}: {} flows judged wrongly:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }

    /// Starts `segward ARGS... --netns <gateway ns>` and waits (≤ 20 s) until it reports
    /// `enforcing`; panics with its output otherwise.
    pub fn start_segward(&self, args: &[&str]) -> Daemon<'_> {
        self.start_segward_with(args, |_| {})
    }

    /// `start_segward`, with a chance to adjust the command (env vars, ...) first.
    pub fn start_segward_with(
        &self,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon<'_> {
        let mut cmd = self.segward_command(args);
        configure(&mut cmd);
        Daemon::start(cmd, READY_TIMEOUT)
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "lab {}: gateway ns {} (GW_ADDR {GW_ADDR}), uplink ns {} via {UPLINK_IFACE}, hosts {:?}\n",
            self.id,
            self.gw_ns,
            self.up_ns,
            self.uplink_hosts()
        );
        for d in &self.devices {
            s += &format!(
                "  device {:?}: ns {}, gateway iface {}, mac {}, addrs {:?}\n",
                d.name,
                d.ns,
                d.iface,
                d.mac,
                d.addrs.lock().unwrap()
            );
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprint!("{}", self.summary());
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = netns::del(ns) {
                eprintln!("lab: could not delete namespace {ns}: {e}");
            }
        }
    }
}

/// The socket address `ip:port` (ip as a string or address).
pub fn at(ip: impl IpLike, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_ip(), port)
}
