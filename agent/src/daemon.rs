//! `segward run`: load the policy, put it into the kernel, enforce until told to stop.

use std::path::PathBuf;

use agent_ebpf::{
    maps::{Addr, Event, HOOK_TO_DEVICE},
    verdict::Reason,
};
use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

use crate::{
    datapath::{pin_dir, uninstall, Datapath},
    netns::Netns,
    policy::compile::CompiledPolicy,
    policy::{compile::compile, load::load_dir},
};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policy_dir: PathBuf,
    pub device_ifaces: Vec<String>,
    pub audit: bool,
    pub netns: Option<String>,
    /// Remove programs, links and maps on exit instead of leaving them enforcing.
    pub detach_on_exit: bool,
}

/// The name of a gateway's pinned state: its network namespace, or `host`.
pub fn instance_name(netns: Option<&str>) -> &str {
    netns.unwrap_or("host")
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let netns = match &opts.netns {
        Some(name) => Netns::named(name)?,
        None => Netns::current(),
    };
    let compiled = load_policy(&opts, &netns)?;
    let (segments, devices) = (compiled.segment_names.len(), compiled.device_ids.len());

    let pins = pin_dir(instance_name(opts.netns.as_deref()));
    let mut datapath = Datapath::load_pinned(&pins)?;
    datapath.set_audit(opts.audit)?;
    datapath.install(compiled)?;
    for iface in &opts.device_ifaces {
        datapath.attach_device_iface(&netns, iface)?;
    }
    for link in datapath.detach_other_ifaces(&opts.device_ifaces)? {
        info!(
            link,
            "detached from an interface that is no longer configured"
        );
    }
    info!(
        policy = %opts.policy_dir.display(),
        segments,
        devices,
        interfaces = ?opts.device_ifaces,
        netns = opts.netns.as_deref().unwrap_or("-"),
        mode = if opts.audit { "audit" } else { "enforce" },
        pins = %pins.display(),
        "enforcing"
    );

    let mut generation: u64 = 1;
    info!(generation, "policy loaded");

    // SAFETY: the stream owns the ring buffer's fd for as long as the AsyncFd lives.
    let mut events = unsafe { AsyncFd::register(datapath.take_events()?) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            ready = events.readable_mut() => {
                let mut ready = ready?;
                while let Some(event) = ready.get_inner_mut().next_event() {
                    log_event(&event, datapath.live());
                }
                ready.clear_ready();
            }
            _ = hangup.recv() => {
                // A policy that fails to load changes nothing: the old one keeps enforcing.
                match load_policy(&opts, &netns).and_then(|p| Ok(datapath.install(p)?)) {
                    Ok(()) => {
                        generation += 1;
                        info!(generation, "policy loaded");
                    }
                    Err(error) => warn!(generation, error = format!("{error:#}"), "policy rejected"),
                }
            }
        }
    }
    for (reason, enforced, audited) in datapath.counters()? {
        if enforced + audited > 0 {
            info!(
                reason = reason.name(),
                packets = enforced,
                audited,
                "counter"
            );
        }
    }
    info!(events_suppressed = datapath.events_suppressed()?, "counter");
    if opts.detach_on_exit {
        drop(datapath);
        uninstall(&pins)?;
        info!("stopped; programs detached and pins removed");
    } else {
        info!("stopped; the pinned programs go on enforcing (`segward uninstall` removes them)");
    }
    Ok(())
}

/// Reads and compiles the policy directory for the gateway's current addresses.
fn load_policy(opts: &RunOptions, netns: &Netns) -> anyhow::Result<CompiledPolicy> {
    let policy = load_dir(&opts.policy_dir)?;
    let gateway = netns.gateway_addresses()?;
    compile(&policy, &gateway).context("compiling the policy")
}

/// One drop from the kernel, as an audit event (SPEC §5 names).
fn log_event(event: &Event, policy: Option<&CompiledPolicy>) {
    let reason = Reason::from_number(event.reason).unwrap_or(Reason::DefaultDeny);
    let kind = match reason {
        _ if event.audited != 0 => "audit_deny",
        Reason::UnknownDevice => "unknown_device",
        Reason::Spoof => "spoof",
        _ => "deny",
    };
    let device = policy
        .and_then(|p| p.device_ids.get((event.device as usize).checked_sub(1)?))
        .map_or("-", String::as_str);
    info!(
        target: "segward::audit",
        event = kind,
        device,
        src = %addr_text(&event.src),
        dst = %addr_text(&event.dst),
        proto = event.protocol,
        dport = event.dport,
        reason = reason.name(),
        towards_device = event.hook == HOOK_TO_DEVICE,
        "{kind}"
    );
}

/// An address as people write it: IPv4-mapped addresses as plain IPv4.
fn addr_text(addr: &Addr) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(*addr);
    v6.to_ipv4_mapped()
        .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
}
