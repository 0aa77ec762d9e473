//! Section 2: real traffic through the lab's gateway namespace at the highest rate one
//! sending core sustains; segward against no filtering, nftables sets and linear iptables
//! rules, at several rule counts; gateway CPU per packet and packets per second.

mod filters;
mod traffic;
pub mod xdp;

use std::panic::AssertUnwindSafe;

use anyhow::{anyhow, bail, Result};

use crate::{
    lab::Lab,
    report::{median, number, Section, Table, Target},
    Options,
};
use filters::{Filter, Policy};
use traffic::{Flow, Generator, Link, Run, CPU, SENDER, SENDER_ADDR, TARGET};

/// Frames that may reach the uplink during a denied run without the filter letting a
/// denied packet through (none are expected: the lab has no other traffic).
const STRAY_FRAMES: u64 = 10;
/// Share of allowed packets that must arrive.
const MIN_DELIVERED: f64 = 0.99;
/// Warm-up packets before each measured run after the first round.
const WARM_UP: u64 = 1_000;

struct Plan {
    rule_counts: Vec<u32>,
    rounds: usize,
    /// Intended CPU time of one measured run (its packet count is sized from short runs
    /// of the same configuration).
    run_secs: f64,
    max_packets: u64,
}

impl Plan {
    fn new(options: &Options) -> Plan {
        if options.quick {
            Plan {
                rule_counts: vec![10, 1_000],
                rounds: 1,
                run_secs: 0.2,
                max_packets: 300_000,
            }
        } else {
            Plan {
                rule_counts: vec![10, 1_000, 10_000],
                rounds: 9,
                run_secs: 0.6,
                max_packets: 2_000_000,
            }
        }
    }
}

/// Everything measured at one rule count: per round, the sender-alone cost and one run
/// per filter and flow.
struct Measured {
    rules: u32,
    /// The sender-alone CPU ns per packet, per round.
    alone: Vec<f64>,
    /// `runs[filter][flow]`, one per round.
    runs: Vec<[Vec<Run>; 2]>,
    /// Packets per measured run, `[filter][flow]`, sized in the first round.
    counts: Vec<[Option<u64>; 2]>,
    alone_count: Option<u64>,
}

impl Measured {
    fn new(rules: u32) -> Measured {
        Measured {
            rules,
            alone: Vec::new(),
            runs: Filter::ALL
                .iter()
                .map(|_| [Vec::new(), Vec::new()])
                .collect(),
            counts: vec![[None; 2]; Filter::ALL.len()],
            alone_count: None,
        }
    }

    fn runs(&self, filter: Filter, flow: Flow) -> &[Run] {
        &self.runs[filter_index(filter)][flow_index(flow)]
    }

    /// Gateway CPU ns per packet in each round: the run's cost less the sender's alone.
    fn gateway_ns(&self, filter: Filter, flow: Flow) -> Vec<f64> {
        self.runs(filter, flow)
            .iter()
            .zip(&self.alone)
            .map(|(run, alone)| run.cpu_ns - alone)
            .collect()
    }

    fn median_of(&self, filter: Filter, flow: Flow, value: impl Fn(&Run) -> f64) -> f64 {
        let mut xs: Vec<f64> = self.runs(filter, flow).iter().map(value).collect();
        median(&mut xs)
    }

    fn gateway_median(&self, filter: Filter, flow: Flow) -> f64 {
        median(&mut self.gateway_ns(filter, flow))
    }

    /// Median over rounds of `a`'s gateway cost over `b`'s, each pair from one round.
    fn ratio(&self, a: (Filter, Flow), b: (Filter, Flow)) -> f64 {
        let mut xs: Vec<f64> = self
            .gateway_ns(a.0, a.1)
            .iter()
            .zip(self.gateway_ns(b.0, b.1))
            .map(|(x, y)| x / y)
            .collect();
        median(&mut xs)
    }

    /// Median over rounds of `a`'s gateway cost less `b`'s, for `flow`.
    fn difference(&self, a: Filter, b: Filter, flow: Flow) -> f64 {
        let mut xs: Vec<f64> = self
            .gateway_ns(a, flow)
            .iter()
            .zip(self.gateway_ns(b, flow))
            .map(|(x, y)| x - y)
            .collect();
        median(&mut xs)
    }

    /// Median over rounds of segward's delivered rate over that of no filtering.
    fn allowed_pps_ratio(&self) -> f64 {
        let none = self.runs(Filter::None, Flow::Allowed);
        let mut xs: Vec<f64> = self
            .runs(Filter::Segward, Flow::Allowed)
            .iter()
            .zip(none)
            .map(|(s, n)| s.pps / n.pps)
            .collect();
        median(&mut xs)
    }
}

fn filter_index(filter: Filter) -> usize {
    Filter::ALL
        .iter()
        .position(|f| *f == filter)
        .expect("a known filter")
}

fn flow_index(flow: Flow) -> usize {
    Flow::ALL
        .iter()
        .position(|f| *f == flow)
        .expect("a known flow")
}

pub fn run(options: &Options) -> Result<Section> {
    let plan = Plan::new(options);
    // The lab panics on failure (after deleting its namespaces): report it as this
    // section's error instead of ending the whole benchmark.
    let measured =
        std::panic::catch_unwind(AssertUnwindSafe(|| measure(&plan))).map_err(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow!("the lab failed: {text}")
        })??;
    Ok(section(&plan, &measured))
}

fn measure(plan: &Plan) -> Result<Vec<Measured>> {
    let lab = Lab::builder()
        .device(SENDER, &[&SENDER_ADDR.to_string()])
        .uplink_host(&TARGET.to_string())
        .build();
    let generator = Generator::new(&lab)?;
    let policies = plan
        .rule_counts
        .iter()
        .map(|&rules| Policy::write(&lab, rules))
        .collect::<Result<Vec<_>>>()?;
    let mut measured: Vec<Measured> = plan.rule_counts.iter().map(|&r| Measured::new(r)).collect();
    // Rounds interleave everything, so that a slow spell of the machine (another job on
    // the sibling core) touches every configuration alike and ratios stay in one round.
    for _ in 0..plan.rounds {
        for (policy, m) in policies.iter().zip(&mut measured) {
            let count = sized(plan, &mut m.alone_count, |n| {
                generator.send(Flow::Denied, Link::Alone, n, None)
            })?;
            m.alone.push(
                generator
                    .send(Flow::Denied, Link::Alone, count, None)?
                    .cpu_ns,
            );
            for filter in Filter::ALL {
                let installed = filters::install(&lab, filter, policy)?;
                let daemon = installed.daemon_pid();
                generator.establish(filter.conntrack(), daemon)?;
                for flow in Flow::ALL {
                    let slot = &mut m.counts[filter_index(filter)][flow_index(flow)];
                    let count = sized(plan, slot, |n| {
                        generator.send(flow, Link::Gateway, n, daemon)
                    })?;
                    let run = generator.send(flow, Link::Gateway, count, daemon)?;
                    check(filter, flow, policy.rules, &run)?;
                    m.runs[filter_index(filter)][flow_index(flow)].push(run);
                }
                filters::remove(&lab, installed)?;
            }
        }
    }
    Ok(measured)
}

/// The packet count of a measured run: on first use, sized from short runs so that the
/// run takes about `plan.run_secs` of CPU time; afterwards the same count, after a short
/// warm-up.
fn sized(plan: &Plan, slot: &mut Option<u64>, send: impl Fn(u64) -> Result<Run>) -> Result<u64> {
    if let Some(count) = *slot {
        send(WARM_UP)?;
        return Ok(count);
    }
    let mut n = WARM_UP;
    let count = loop {
        let cpu_ns = send(n)?.cpu_ns;
        // Long enough for the CPU time to mean something.
        if n as f64 * cpu_ns >= 20e6 || n >= plan.max_packets {
            break (plan.run_secs * 1e9 / cpu_ns) as u64;
        }
        n *= 10;
    };
    let count = count.clamp(WARM_UP, plan.max_packets);
    *slot = Some(count);
    Ok(count)
}

/// The benchmark never measures a broken setup: allowed traffic must arrive in every
/// configuration, denied traffic only without filtering.
fn check(filter: Filter, flow: Flow, rules: u32, run: &Run) -> Result<()> {
    let what = format!(
        "{} at {rules} rules: {} of {} {} packets arrived at the uplink",
        filter.name(),
        run.delivered,
        run.sent,
        flow.name()
    );
    if flow == Flow::Allowed || filter == Filter::None {
        if (run.delivered as f64) < run.sent as f64 * MIN_DELIVERED {
            bail!("{what}; at least {:.0} % must", MIN_DELIVERED * 100.0);
        }
    } else if run.delivered > STRAY_FRAMES {
        bail!("{what}; the filter must drop them");
    }
    Ok(())
}

fn section(plan: &Plan, measured: &[Measured]) -> Section {
    let mut costs = Table::new(
        format!(
            "Gateway CPU per packet and packet rates, per configuration (median of {} \
             round(s))",
            plan.rounds
        ),
        &[
            "rules",
            "configuration",
            "allowed: gateway ns/packet",
            "allowed: pps per gateway core",
            "allowed: pps delivered",
            "denied: gateway ns/packet",
            "denied: pps dropped",
        ],
    );
    let mut ratios = Table::new(
        "Ratios of gateway CPU per packet, each from one round's measurements (median over \
         rounds); segward's own program cost",
        &[
            "rules",
            "denied: segward / nftables forward",
            "denied: segward / nftables ingress",
            "denied: segward / iptables",
            "allowed: segward / no filtering, gateway capacity",
            "allowed: segward / no filtering, pps delivered",
            "segward − XDP floor, ns: denied / allowed",
        ],
    );
    let rate = |pps: f64| match pps {
        _ if pps >= 1e6 => format!("{:.2} M", pps / 1e6),
        _ if pps >= 1e3 => format!("{:.1} k", pps / 1e3),
        _ => format!("{pps:.0}"),
    };
    let mut targets = Vec::new();
    for m in measured {
        for filter in Filter::ALL {
            let allowed_ns = m.gateway_median(filter, Flow::Allowed);
            let delivered = m.median_of(filter, Flow::Allowed, |r| {
                r.pps * r.delivered.min(r.sent) as f64 / r.sent as f64
            });
            let (denied_ns, dropped) = if filter == Filter::None {
                ("(forwarded)".to_owned(), "".to_owned())
            } else {
                let dropped = m.median_of(filter, Flow::Denied, |r| {
                    r.pps * (r.sent - r.delivered) as f64 / r.sent as f64
                });
                (
                    number(m.gateway_median(filter, Flow::Denied)),
                    rate(dropped),
                )
            };
            costs.row(vec![
                m.rules.to_string(),
                filter.name().to_owned(),
                number(allowed_ns),
                rate(1e9 / allowed_ns),
                rate(delivered),
                denied_ns,
                dropped,
            ]);
        }
        let denied = |f: Filter| m.ratio((Filter::Segward, Flow::Denied), (f, Flow::Denied));
        let capacity = m.ratio(
            (Filter::None, Flow::Allowed),
            (Filter::Segward, Flow::Allowed),
        );
        let over_floor = |flow: Flow| number(m.difference(Filter::Segward, Filter::XdpFloor, flow));
        ratios.row(vec![
            m.rules.to_string(),
            format!("{:.2}", denied(Filter::NftForward)),
            format!("{:.2}", denied(Filter::NftIngress)),
            format!("{:.3}", denied(Filter::Iptables)),
            format!("{capacity:.2}"),
            format!("{:.2}", m.allowed_pps_ratio()),
            format!(
                "{} / {}",
                over_floor(Flow::Denied),
                over_floor(Flow::Allowed)
            ),
        ]);
        targets.push(Target::at_most(
            format!(
                "{} rules: denied packet, segward / the cheaper nftables (gateway CPU)",
                m.rules
            ),
            denied(Filter::NftForward).max(denied(Filter::NftIngress)),
            1.0 / 3.0,
            "×",
        ));
        targets.push(Target::at_most(
            format!(
                "{} rules: allowed throughput lost to segward vs no filtering (gateway capacity)",
                m.rules
            ),
            (1.0 - capacity) * 100.0,
            10.0,
            "%",
        ));
    }
    if let (Some(first), Some(last)) = (measured.first(), measured.last()) {
        targets.push(Target::at_most(
            format!(
                "denied packet, segward's gateway CPU at {} rules / at {} rules",
                last.rules, first.rules
            ),
            last.gateway_median(Filter::Segward, Flow::Denied)
                / first.gateway_median(Filter::Segward, Flow::Denied),
            1.3,
            "×",
        ));
    }
    let mut alone: Vec<f64> = measured.iter().flat_map(|m| m.alone.clone()).collect();
    Section {
        title: "Forwarding through the gateway (real traffic)",
        method: format!(
            "Real traffic through the lab: a sender device namespace, the gateway namespace \
             (forwarding between the device link and the uplink), the uplink namespace as \
             receiver.\n\n\
             - **Traffic.** The packet generator is the kernel's own, as in xdp-trafgen: \
             BPF_PROG_TEST_RUN in live-frames mode runs, in the sender's namespace on CPU \
             {CPU} at the highest priority, an XDP program that writes a 60-byte UDP frame \
             (valid IPv4 checksum) and redirects it into the sender's link, as fast as the \
             core allows. Frames thus reach the gateway's veth as XDP frames, as from a NIC's \
             receive ring: an XDP program runs on the raw frame, and an skb is built (GRO on) \
             only for frames that go on. trafgen was tried first and dropped: its frames are \
             skbs, which veth copies into an XDP buffer and back for any XDP program (a cost \
             no NIC has), and it costs the sender several hundred ns per frame, more than \
             most gateways here. Two flows: *allowed*, to {TARGET}:{allowed}/udp, whose rule \
             sits in the middle of the rule list, made established by a reply from the \
             uplink first, as real flows are; *denied*, the same host on port {denied}, which \
             no rule allows.\n\
             - **Configurations**, each with the same {counts} allow rules (TCP to distinct \
             host/port pairs, and the allowed flow's): no filtering; the *XDP floor*, an \
             11-instruction program that drops the denied port and passes the rest (what \
             any XDP program costs on this path); segward, the rules as YAML; nftables with \
             one set of `ip saddr . ip daddr . meta l4proto . th dport`, looked up either in \
             the forward chain after `ct state established,related accept` (the textbook \
             stateful gateway) or at the device link's netdev ingress hook, before routing \
             and conntrack (the cheapest drop nftables has; the forward chain then only lets \
             replies back); iptables-nft, ESTABLISHED,RELATED first, then one rule per allow \
             rule. Between configurations segward stops with `--detach-on-exit` and the \
             gateway is checked to hold no XDP or tc program, pin or ruleset.\n\
             - **Receiver.** The gateway forwards to a MAC the uplink does not own, so the \
             uplink counts each frame and discards it before IP, equally cheaply in every \
             configuration.\n\
             - **CPU.** One core does all the work (generator, gateway, receiver). CPU per \
             packet is the generator thread's CPU time (which includes the softirq work run \
             in its context: the gateway's and the receiver's), its CPU's ksoftirqd thread's \
             and segward's daemon's (schedstat), over packets sent. The *gateway's share* is \
             that less the sender alone, measured each round with the same frames dropped \
             by the generator instead of sent. *Gateway capacity* is 1 / gateway ns per \
             packet: what one gateway core forwards; the throughput target compares it. \
             Pps delivered and dropped are measured in wall time, sender included, on a \
             machine other jobs may share.\n\
             - **Repeats.** Each run is sized to about {secs} s of CPU time from short runs \
             of the same configuration; {rounds} round(s) interleave all rule counts and \
             configurations; figures are medians over rounds, ratios and differences \
             medians of per-round ones.\n\
             - **Checks.** In every run allowed packets must arrive (≥ {min:.0} %) and \
             denied ones must not (≤ {STRAY_FRAMES} frames); without filtering the denied \
             flow must arrive too, so that its absence is the filter's doing.",
            allowed = Flow::Allowed.port(),
            denied = Flow::Denied.port(),
            counts = plan
                .rule_counts
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            secs = plan.run_secs,
            rounds = plan.rounds,
            min = MIN_DELIVERED * 100.0,
        ),
        tables: vec![costs, ratios],
        targets,
        notes: vec![
            format!(
                "The sender alone costs {} ns per packet (median), the gateway's share is the \
             rest. The XDP floor drops a packet for a few tens of ns and passes one for what \
             no filtering costs, so on this path an XDP filter costs what its program does: \
             segward − XDP floor is segward's program (and its daemon).",
                number(median(&mut alone))
            ),
            "Where segward's cost goes: an allowed packet of an established (answered) flow \
         passes on its flow entry, from this CPU's RECENT_FLOWS slot (the datapath section's \
         'answered flow' class). The denied flow's first packet is judged in full (its flow, \
         source with anti-spoofing, segment, the destination's identity and the policy: five \
         hash lookups and an array slot, against the one set lookup of the nftables ingress configuration, which \
         knows no device identities, MACs, segments or quarantine); its next packets are \
         dropped on the kept drop (its RECENT_FLOWS slot), as long as nothing the judgement read \
         changes. A flood of new denied flows (a scan) is judged in full packet by packet, \
         at about the 'judged in full' cost of the datapath section."
                .into(),
        ],
    }
}
