//! `segward explain DIR --from … --to … --port …`: the offline verdict for one new flow.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use serde_json::{json, Value};

use super::write_stdout;
use crate::policy::{
    evaluate::{
        DecidingRule, DenyReason, DeviceRef, Direction, Evaluator, FlowDestination, FlowSource,
        Service, Verdict,
    },
    load::{load_dir, LoadError},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The verdict is for a NEW flow, judged by the rules: what the essentials \
(ARP, DHCP, neighbour discovery) and replies of tracked flows get is not shown. A source address \
that is bound to no device is judged as a source outside the device network (accept rules) when \
the destination is a device, else as an unknown device. --to DEVICE: zone and CIDR rules apply \
through any of its static addresses; give an address to judge one. --to gateway: offline the \
gateway's addresses are unknown, so only `to: gateway` rules reach it.

Output: `allow` or `deny` on the first line; then the deciding rule as `file:line: text`, or the \
reason for the denial.
Exit status: 0 allow, 1 deny, 2 bad usage or an unreadable or invalid policy.")]
pub struct ExplainArgs {
    /// Policy directory.
    pub dir: PathBuf,
    /// Source: a device id or an address.
    #[arg(long)]
    pub from: String,
    /// Destination: a device id, an address, or `gateway`.
    #[arg(long)]
    pub to: String,
    /// `N/tcp`, `N/udp`, `N/sctp`, `icmp` or `icmpv6`.
    #[arg(long)]
    pub port: String,
    /// Judge the source as quarantined.
    #[arg(long)]
    pub quarantined: bool,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ExplainArgs) -> ExitCode {
    let service = match args.port.parse::<Service>() {
        Ok(service) => service,
        Err(e) => return usage(format_args!("--port: {e}")),
    };
    let from = match args.from.parse::<IpAddr>() {
        Ok(ip) => FlowSource::Address(ip),
        Err(_) if args.from == "gateway" => {
            return usage(format_args!(
                "--from gateway: the gateway's own flows are not judged by rules; give a device \
                 id or an address"
            ))
        }
        Err(_) => FlowSource::Device(args.from.clone()),
    };
    let to = match args.to.parse::<IpAddr>() {
        Ok(ip) => FlowDestination::Address(ip),
        Err(_) if args.to == "gateway" => FlowDestination::Gateway,
        Err(_) => FlowDestination::Device(args.to.clone()),
    };
    let policy = match load_dir(&args.dir) {
        Ok(policy) => policy,
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            return usage(format_args!(
                "the policy in {} is invalid; see `segward check`",
                args.dir.display()
            ));
        }
        Err(e) => return usage(format_args!("{e}")),
    };

    let evaluator = Evaluator::new(&policy, &[]);
    let source = match &from {
        FlowSource::Device(id) => evaluator.device(id),
        FlowSource::Address(ip) => evaluator.owner(*ip),
    };
    let evaluator = match (args.quarantined, source) {
        (false, _) => evaluator,
        (true, Some(source)) => evaluator.with_quarantined([source.device.id.as_str()]),
        // An unknown device id is reported by `judge` below.
        (true, None) if matches!(from, FlowSource::Device(_)) => evaluator,
        (true, None) => {
            return usage(format_args!(
                "--quarantined: {} is bound to no device, and only devices are quarantined",
                args.from
            ))
        }
    };
    let verdict = match evaluator.judge(&from, &to, service) {
        Ok(verdict) => verdict,
        Err(e) => {
            return usage(format_args!(
                "{e} (--from and --to take device ids or addresses)"
            ))
        }
    };

    let explanation = Explanation {
        evaluator: &evaluator,
        from: &from,
        to: &to,
        service,
        quarantined: args.quarantined,
        verdict: &verdict,
    };
    let text = if args.json {
        explanation.json().to_string()
    } else {
        explanation.lines().join("\n")
    };
    if !write_stdout(&format!("{text}\n")) {
        ExitCode::from(2)
    } else if verdict.is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage(message: std::fmt::Arguments) -> ExitCode {
    eprintln!("segward explain: {message}");
    ExitCode::from(2)
}

/// A verdict with what it is about, for printing.
struct Explanation<'a, 'p> {
    evaluator: &'a Evaluator<'p>,
    from: &'a FlowSource,
    to: &'a FlowDestination,
    service: Service,
    quarantined: bool,
    verdict: &'a Verdict<'p>,
}

impl Explanation<'_, '_> {
    fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match self.verdict {
            Verdict::Allow { rule, port } => {
                lines.push("allow".into());
                lines.push(format!("{}: {}", short_location(rule), rule.text()));
                let whose = match rule {
                    DecidingRule::Allow { segment, .. } => {
                        format!("allow rule of segment {:?}", segment.name)
                    }
                    DecidingRule::Accept { segment, .. } => {
                        format!("accept rule of segment {:?}", segment.name)
                    }
                    DecidingRule::Quarantine { .. } => {
                        "allow rule of the Quarantine (all that applies to a quarantined source)"
                            .into()
                    }
                };
                lines.push(format!("rule: first matching {whose}, port entry {port}"));
            }
            Verdict::Deny { reason, audited_by } => {
                lines.push("deny".into());
                lines.push(self.reason(reason));
                if let Some(segment) = audited_by {
                    lines.push(format!(
                        "audit: segment {:?} is in audit mode, so the packet passes and is \
                         reported as audit_deny",
                        segment.name
                    ));
                }
            }
        }
        lines.push(format!(
            "flow: {} → {}, {}",
            self.describe_source(),
            self.describe_destination(),
            self.service
        ));
        lines
    }

    fn reason(&self, reason: &DenyReason) -> String {
        let to = self.describe_destination();
        let service = self.service;
        match reason {
            DenyReason::UnknownDevice { address } => format!(
                "unknown device: {address} is bound to no device; from the device network such \
                 a source may only do DHCP, neighbour discovery and ARP, and from outside only \
                 flows to devices are let in"
            ),
            DenyReason::DefaultDeny {
                segment,
                direction: Direction::Allow,
            } => format!(
                "default deny: no allow rule of segment {:?} matches {to}, {service}",
                segment.name
            ),
            DenyReason::DefaultDeny {
                segment,
                direction: Direction::Accept,
            } => format!(
                "default deny: no accept rule of segment {:?} matches {}, {service}",
                segment.name,
                self.describe_source()
            ),
            DenyReason::Quarantined { source } => {
                let rules = if self.evaluator.policy().quarantine.is_some() {
                    format!("no allow rule of the Quarantine matches {to}, {service}")
                } else {
                    "the policy has no Quarantine document to allow anything".into()
                };
                format!(
                    "quarantined: {} is quarantined and {rules}",
                    source.device.id
                )
            }
            DenyReason::DestinationQuarantined { destination } => format!(
                "quarantined destination: nothing may open a flow to quarantined device {}",
                destination.device.id
            ),
        }
    }

    fn describe_source(&self) -> String {
        let quarantined = if self.quarantined {
            ", quarantined"
        } else {
            ""
        };
        match self.from {
            FlowSource::Device(id) => match self.evaluator.device(id) {
                Some(d) => format!("{id} (segment {}{quarantined})", d.segment.name),
                None => id.clone(),
            },
            FlowSource::Address(ip) => self.describe_address(*ip, quarantined),
        }
    }

    fn describe_destination(&self) -> String {
        match self.to {
            FlowDestination::Device(id) => match self.evaluator.device(id) {
                Some(d) => format!("{id} (segment {})", d.segment.name),
                None => id.clone(),
            },
            FlowDestination::Address(ip) => self.describe_address(*ip, ""),
            FlowDestination::Gateway => "gateway".into(),
        }
    }

    fn describe_address(&self, ip: IpAddr, note: &str) -> String {
        if let Some(d) = self.evaluator.owner(ip) {
            return format!("{ip} ({}, segment {}{note})", d.device.id, d.segment.name);
        }
        match self.evaluator.zones_containing(ip).as_slice() {
            [] => format!("{ip} (no device)"),
            [zone] => format!("{ip} (no device; zone {zone})"),
            zones => format!("{ip} (no device; zones {})", zones.join(", ")),
        }
    }

    fn json(&self) -> Value {
        let (rule, reason, audited) = match self.verdict {
            Verdict::Allow { rule, port } => {
                let location = rule.location();
                let rule = json!({
                    "location": short_location(rule),
                    "file": location.file.display().to_string(),
                    "line": location.line,
                    "column": location.column,
                    "kind": rule.kind(),
                    "segment": rule.segment().map(|s| s.name.as_str()),
                    "text": rule.text(),
                    "matched_port": port.to_string(),
                });
                (rule, Value::Null, false)
            }
            Verdict::Deny { reason, audited_by } => {
                (Value::Null, json!(reason.code()), audited_by.is_some())
            }
        };
        let message = match self.verdict {
            Verdict::Allow { .. } => Value::Null,
            Verdict::Deny { reason, .. } => json!(self.reason(reason)),
        };
        json!({
            "verdict": if self.verdict.is_allow() { "allow" } else { "deny" },
            "passes": self.verdict.passes(),
            "from": self.source_json(),
            "to": self.destination_json(),
            "port": self.service.to_string(),
            "quarantined": self.quarantined,
            "rule": rule,
            "reason": reason,
            "message": message,
            "audited": audited,
        })
    }

    fn source_json(&self) -> Value {
        match self.from {
            FlowSource::Device(id) => device_json(self.evaluator.device(id), None),
            FlowSource::Address(ip) => self.address_json(*ip),
        }
    }

    fn destination_json(&self) -> Value {
        match self.to {
            FlowDestination::Device(id) => device_json(self.evaluator.device(id), None),
            FlowDestination::Address(ip) => self.address_json(*ip),
            FlowDestination::Gateway => json!({"gateway": true}),
        }
    }

    fn address_json(&self, ip: IpAddr) -> Value {
        match self.evaluator.owner(ip) {
            Some(d) => device_json(Some(d), Some(ip)),
            None => json!({"address": ip, "zones": self.evaluator.zones_containing(ip)}),
        }
    }
}

fn device_json(device: Option<DeviceRef>, address: Option<IpAddr>) -> Value {
    json!({
        "device": device.map(|d| d.device.id.as_str()),
        "segment": device.map(|d| d.segment.name.as_str()),
        "address": address,
    })
}

/// `file:line`, as the audit log names rules.
fn short_location(rule: &DecidingRule) -> String {
    let location = rule.location();
    format!("{}:{}", location.file.display(), location.line)
}
