//! `segward run`: load the policy, put it into the kernel, enforce until told to stop.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
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

    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
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
    Ok(compile(&policy, &gateway).context("compiling the policy")?)
}
