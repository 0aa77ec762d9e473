//! The configurations under test: no filtering, segward, and the same policy as nftables
//! (two ways) and as linear iptables rules; each installed in, and removed from, the lab's
//! gateway namespace.

use std::{fmt::Write as _, fs, net::Ipv4Addr, os::fd::OwnedFd, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use super::traffic::{ns_cmd, Flow, SENDER, SENDER_ADDR, TARGET};
use super::xdp;
use crate::lab::{Daemon, Lab, GATEWAY};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Filter {
    None,
    /// A minimal XDP program (`xdp::floor`): what the veth XDP path costs by itself.
    XdpFloor,
    Segward,
    /// The textbook stateful gateway: one forward chain, established flows first, then
    /// one lookup in a set of (source, destination, protocol, port).
    NftForward,
    /// The same set, looked up at the device link's ingress hook, before routing and
    /// connection tracking: the cheapest place nftables can drop a device's packet.
    NftIngress,
    /// One iptables-nft rule per allow rule, established flows first.
    Iptables,
}

impl Filter {
    pub const ALL: [Filter; 6] = [
        Filter::None,
        Filter::XdpFloor,
        Filter::Segward,
        Filter::NftForward,
        Filter::NftIngress,
        Filter::Iptables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Filter::None => "no filtering",
            Filter::XdpFloor => "XDP floor (11 instructions, no maps)",
            Filter::Segward => "segward",
            Filter::NftForward => "nftables, forward hook",
            Filter::NftIngress => "nftables, ingress hook",
            Filter::Iptables => "iptables-nft, linear",
        }
    }

    /// Whether the gateway's connection tracking runs for the allowed flow.
    pub fn conntrack(self) -> bool {
        matches!(
            self,
            Filter::NftForward | Filter::NftIngress | Filter::Iptables
        )
    }
}

/// One allow rule: the sender may open flows to `dst` on `port`/`proto`.
struct Rule {
    dst: Ipv4Addr,
    port: u16,
    proto: &'static str,
}

/// A policy of `count` allow rules and its files for every filter.
pub struct Policy {
    pub rules: u32,
    segward: PathBuf,
    nft_forward: PathBuf,
    nft_ingress: PathBuf,
    iptables: PathBuf,
}

impl Policy {
    /// Rule i allows TCP to host 172.16.0.1 + i/50, port 1000 + i%50 (so no rule covers
    /// another); the allowed flow's rule sits in the middle of the list.
    pub fn write(lab: &Lab, count: u32) -> Result<Policy> {
        let mut rules: Vec<Rule> = (0..count - 1)
            .map(|i| Rule {
                dst: Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + i / 50),
                port: 1_000 + (i % 50) as u16,
                proto: "tcp",
            })
            .collect();
        rules.insert(
            (count / 2) as usize,
            Rule {
                dst: TARGET,
                port: Flow::Allowed.port(),
                proto: "udp",
            },
        );
        let dir = lab.dir().join(format!("rules-{count}"));
        let segward = dir.join("segward");
        fs::create_dir_all(&segward).with_context(|| format!("creating {}", segward.display()))?;
        let policy = Policy {
            rules: count,
            nft_forward: dir.join("forward.nft"),
            nft_ingress: dir.join("ingress.nft"),
            iptables: dir.join("iptables.rules"),
            segward,
        };
        let iface = lab.device_iface(SENDER);
        write(
            &policy.segward.join("bench.yaml"),
            &segment_yaml(lab, &rules)?,
        )?;
        let set = nft_set(&rules)?;
        write(
            &policy.nft_forward,
            &format!(
                "table inet bench {{\n{set}\
                 \tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy drop;\n\
                 \t\tct state established,related accept\n\
                 \t\tiifname \"{iface}\" ip saddr . ip daddr . meta l4proto . th dport @allowed accept\n\
                 \t}}\n}}\n"
            ),
        )?;
        write(
            &policy.nft_ingress,
            &format!(
                "table netdev bench {{\n{set}\
                 \tchain from_devices {{\n\
                 \t\ttype filter hook ingress device \"{iface}\" priority filter; policy drop;\n\
                 \t\tmeta protocol arp accept\n\
                 \t\tip saddr . ip daddr . meta l4proto . th dport @allowed accept\n\
                 \t}}\n}}\n\
                 table inet bench {{\n\
                 \tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy drop;\n\
                 \t\tct state established,related accept\n\
                 \t\tiifname \"{iface}\" accept\n\
                 \t}}\n}}\n"
            ),
        )?;
        let mut iptables = String::from(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        );
        for r in &rules {
            writeln!(
                iptables,
                "-A FORWARD -i {iface} -s {SENDER_ADDR}/32 -d {}/32 -p {p} -m {p} --dport {} -j ACCEPT",
                r.dst,
                r.port,
                p = r.proto
            )?;
        }
        iptables.push_str("COMMIT\n");
        write(&policy.iptables, &iptables)?;
        Ok(policy)
    }
}

fn segment_yaml(lab: &Lab, rules: &[Rule]) -> Result<String> {
    let mut yaml = format!(
        "kind: Segment\nname: bench\ndevices:\n  - id: {SENDER}\n    mac: \"{}\"\n    \
         addresses: [{SENDER_ADDR}]\nallow:\n",
        lab.device_mac(SENDER)
    );
    for r in rules {
        writeln!(
            yaml,
            "  - to: {}/32\n    ports: [\"{}/{}\"]",
            r.dst, r.port, r.proto
        )?;
    }
    Ok(yaml)
}

fn nft_set(rules: &[Rule]) -> Result<String> {
    let mut set = String::from(
        "\tset allowed {\n\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service\n\
         \t\telements = {\n",
    );
    for r in rules {
        writeln!(
            set,
            "\t\t\t{SENDER_ADDR} . {} . {} . {},",
            r.dst, r.proto, r.port
        )?;
    }
    set.push_str("\t\t}\n\t}\n");
    Ok(set)
}

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A filter in force in the gateway; `remove` takes it out again.
pub struct Installed<'lab> {
    daemon: Option<Daemon<'lab>>,
    /// The XDP floor's link: closing it detaches the program.
    link: Option<OwnedFd>,
}

impl Installed<'_> {
    /// The process whose CPU time counts towards the filter's (segward's daemon).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid())
    }
}

/// Installs `filter` with `policy` into a gateway that filters nothing.
pub fn install<'lab>(lab: &'lab Lab, filter: Filter, policy: &Policy) -> Result<Installed<'lab>> {
    let file = |p: &PathBuf| p.display().to_string();
    let mut link = None;
    let daemon = match filter {
        Filter::None => None,
        Filter::XdpFloor => {
            let iface = lab.device_iface(SENDER).to_string();
            let prog = xdp::load(&xdp::floor(Flow::Denied.port()))?;
            link = Some(lab.run_in(GATEWAY, || xdp::attach(&prog, &iface))?);
            None
        }
        Filter::Segward => {
            let dir = file(&policy.segward);
            let iface = lab.device_iface(SENDER);
            Some(lab.start_segward(&[
                "run",
                "--policy",
                &dir,
                "--device-iface",
                iface,
                "--detach-on-exit",
            ]))
        }
        Filter::NftForward => {
            ns_cmd(lab, GATEWAY, &["nft", "-f", &file(&policy.nft_forward)])?;
            None
        }
        Filter::NftIngress => {
            ns_cmd(lab, GATEWAY, &["nft", "-f", &file(&policy.nft_ingress)])?;
            None
        }
        Filter::Iptables => {
            ns_cmd(
                lab,
                GATEWAY,
                &["iptables-nft-restore", &file(&policy.iptables)],
            )?;
            None
        }
    };
    Ok(Installed { daemon, link })
}

/// Removes what `install` put in, and checks that the gateway filters nothing any more:
/// no segward program attached or pinned, no nftables ruleset (iptables-nft's included).
pub fn remove(lab: &Lab, installed: Installed<'_>) -> Result<()> {
    drop(installed.link);
    if let Some(mut daemon) = installed.daemon {
        let status = daemon.stop();
        if !status.success() {
            bail!(
                "segward did not stop cleanly ({status}):\n{}",
                daemon.output_so_far()
            );
        }
    }
    ns_cmd(lab, GATEWAY, &["nft", "flush", "ruleset"])?;
    let ruleset = ns_cmd(lab, GATEWAY, &["nft", "list", "ruleset"])?;
    if !ruleset.trim().is_empty() {
        bail!("the gateway still has an nftables ruleset:\n{ruleset}");
    }
    let pins = std::path::Path::new("/sys/fs/bpf/segward").join(lab.gateway_netns());
    if pins.exists() {
        bail!(
            "segward's pins are still there after --detach-on-exit: {}",
            pins.display()
        );
    }
    let iface = lab.device_iface(SENDER).to_string();
    let link = ns_cmd(lab, GATEWAY, &["ip", "-d", "link", "show", "dev", &iface])?;
    let tcx = lab.run_in(GATEWAY, || {
        SchedClassifier::query_tcx(&iface, TcAttachType::Egress).map(|(_, progs)| progs.len())
    });
    let tcx = tcx.with_context(|| format!("querying tc programs on {iface}"))?;
    if link.contains("prog/xdp") || tcx > 0 {
        bail!("programs are still attached to the gateway's {iface} ({tcx} tc):\n{link}");
    }
    Ok(())
}
