//! `segward run`: load the policy, put it into the kernel, enforce, and keep the kernel in
//! step with everything that changes while it runs: policy reloads, learned addresses,
//! quarantines. One task owns the [`Agent`]; kernel events, control calls, lease changes
//! and signals reach it through one `select!`, so changes never interleave.

pub mod state;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use agent_ebpf::{
    maps::{Addr, Event, HOOK_FROM_DEVICE},
    verdict::Reason,
};
use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{debug, info, warn};

use crate::{
    audit::{proto_name, AuditEvent, AuditLog, EventKind},
    config::DaemonConfig,
    control::{
        self,
        protocol::{
            BoundAddress, DeviceInfo, PacketCount, QuarantineInfo, StatusReport, UnknownSource,
        },
        Reply, Request, Response,
    },
    datapath::{pin_dir, uninstall, Datapath, FlowCutter},
    identity::{leases, moves, Bindings},
    metrics::{self, Scrape, Snapshot},
    netns::Netns,
    policy::{
        compile::{addr_octets, compile_with, CompiledPolicy, DeviceState},
        load::load_dir,
        model::{DeviceIndex, MacAddr, Policy},
    },
    quarantine::{FlowId, Observation, Triggers},
    watch::{self, Watch},
};
use state::{QuarantineRecord, State};

/// Per-packet audit events written per device and second; the kernel sends at most 20.
const AUDIT_EVENTS_PER_DEVICE_PER_SECOND: u32 = 20;
/// The longest quarantine reason kept.
const MAX_REASON_CHARS: usize = 1024;
/// How long the policy directory must be quiet before a change is loaded: `git pull` and
/// friends write a checkout in a burst of renames.
const POLICY_QUIET: Duration = Duration::from_millis(150);

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: DaemonConfig,
    pub netns: Option<String>,
    /// Remove programs, links and maps on exit instead of leaving them enforcing.
    pub detach_on_exit: bool,
}

/// The name of a gateway's pinned state: its network namespace, or `host`.
pub fn instance_name(netns: Option<&str>) -> &str {
    netns.unwrap_or("host")
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = &opts.config;
    let netns = match &opts.netns {
        Some(name) => Netns::named(name)?,
        None => Netns::current(),
    };
    let policy_dir = config
        .policy
        .clone()
        .context("no policy directory: give --policy or `policy:` in the configuration file")?;
    let policy = load_policy_dir(&policy_dir)?;
    let state = state::load(&config.state_dir)?;
    let audit = AuditLog::open(
        config.audit_log.as_deref(),
        AUDIT_EVENTS_PER_DEVICE_PER_SECOND,
    )?;
    let pins = pin_dir(instance_name(opts.netns.as_deref()));
    let mut datapath = Datapath::load_pinned(&pins)?;
    datapath.set_audit(config.audit)?;
    let seconds = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    datapath.set_timeouts(
        seconds(config.conntrack.tcp),
        seconds(config.conntrack.udp),
        seconds(config.conntrack.icmp),
    )?;
    let bindings = Bindings {
        binds: state.binds.clone(),
        leases: state.leases.clone(),
    };
    let (flow_cuts, mut flows_cut) = spawn_flow_cutter(datapath.flow_cutter()?)?;
    let mut agent = Agent {
        gateway: netns.gateway_addresses()?,
        device_index: DeviceIndex::new(&policy),
        triggers: Triggers::new(policy.quarantine.as_ref()),
        policy,
        policy_dir,
        config: config.clone(),
        netns: opts.netns.clone(),
        datapath,
        state,
        bindings,
        audit,
        generation: 0,
        reloads_ok: 0,
        reloads_rejected: 0,
        started: Instant::now(),
        next_lease_expiry: None,
        pending_cuts: PendingCuts::default(),
        flow_cuts,
    };
    let compiled = agent.compile(&agent.policy, &agent.device_index)?;
    agent.install(compiled)?;
    agent.policy_loaded();
    // Parsing a big policy peaks far above what the daemon keeps; hand that back.
    crate::heap::release_free_pages();
    // Leases that changed while no daemon ran: applied, cut and recorded like any change.
    agent.leases_changed();
    let mut attached = Vec::new();
    for iface in &config.device_ifaces {
        attached.push(agent.datapath.attach_device_iface(&netns, iface)?);
    }
    agent.datapath.keep_device_ifindexes(&attached)?;
    for link in agent.datapath.detach_other_ifaces(&config.device_ifaces)? {
        info!(
            link,
            "detached from an interface that is no longer configured"
        );
    }

    let listener = control::bind(&config.socket).await?;
    let (calls_tx, mut calls) = mpsc::channel::<control::Call>(16);
    tokio::spawn(listener.serve(calls_tx));
    let (scrapes_tx, mut scrapes) = mpsc::channel::<Scrape>(4);
    if let Some(addr) = config.metrics {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tokio::spawn(metrics::serve(listener, scrapes_tx));
    }
    let mut policy_watch = watch_policy(&agent.policy_dir)?;
    let mut lease_watch = match &config.dhcp_leases {
        Some(path) => Some(leases::watch(path)?),
        None => None,
    };
    info!(
        policy = %agent.policy_dir.display(),
        segments = agent.policy.segments.len(),
        devices = agent.device_count(),
        interfaces = ?config.device_ifaces,
        netns = opts.netns.as_deref().unwrap_or("-"),
        mode = agent.mode(),
        quarantined = agent.state.quarantined.len(),
        socket = %config.socket.display(),
        pins = %pins.display(),
        "enforcing"
    );
    // Under systemd (Type=notify): ready once enforcing. Elsewhere this does nothing.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    // SAFETY: the stream owns the ring buffer's fd for as long as the AsyncFd lives.
    let mut events = unsafe { AsyncFd::register(agent.datapath.take_events()?) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        let lease_expiry = agent
            .next_lease_expiry
            .map_or(Duration::from_secs(3600), |t| {
                t.duration_since(SystemTime::now()).unwrap_or_default()
            });
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            ready = events.readable_mut() => {
                let mut ready = ready?;
                while let Some(event) = ready.get_inner_mut().next_event() {
                    agent.on_event(&event);
                }
                ready.clear_ready();
            }
            _ = hangup.recv() => {
                let _ = agent.reload();
                if let Err(e) = agent.audit.reopen() {
                    warn!(error = %e, "reopening the audit log");
                }
            }
            Some((request, respond)) = calls.recv() => {
                let response = agent.handle(request);
                let _ = respond.send(response);
            }
            Some(respond) = scrapes.recv() => {
                let _ = respond.send(metrics::render(agent.snapshot()));
            }
            Some(()) = policy_watch.changes.recv() => {
                // The directory may have been replaced (a symlink swap): watch it anew.
                policy_watch = watch_policy(&agent.policy_dir)?;
                let _ = agent.reload_if_changed();
            }
            Some(()) = next_change(&mut lease_watch) => agent.leases_changed(),
            Some(()) = flows_cut.recv() => agent.flows_cut(),
            _ = tokio::time::sleep(lease_expiry), if agent.next_lease_expiry.is_some() => {
                agent.leases_changed();
            }
        }
        agent.cut_pending_flows();
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    agent.log_counters()?;
    if opts.detach_on_exit {
        drop(agent);
        uninstall(&pins)?;
        info!("stopped; programs detached and pins removed");
    } else {
        info!("stopped; the pinned programs go on enforcing (`segward uninstall` removes them)");
    }
    Ok(())
}

/// Tracked flows to delete: those of `devices` (quarantined) and those at `addrs` (their
/// addresses, and addresses that moved to another owner).
#[derive(Default)]
struct PendingCuts {
    devices: Vec<u32>,
    addrs: Vec<Addr>,
}

/// Deletes tracked flows on a thread of its own: a walk over a full flow table takes long
/// enough (~100 ms at 60k flows) to hold up the commands that come after it. Says on the
/// receiver when a cut is done.
fn spawn_flow_cutter(
    mut cutter: FlowCutter,
) -> anyhow::Result<(
    std::sync::mpsc::Sender<PendingCuts>,
    mpsc::UnboundedReceiver<()>,
)> {
    let (tx, rx) = std::sync::mpsc::channel::<PendingCuts>();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("flow-cutter".into())
        .spawn(move || {
            for cuts in rx {
                let cut = cutter.cut(&cuts.devices, &cuts.addrs);
                debug!(cut, "tracked flows cut");
                // The walk held the table's keys (~2.5 MB at 60k flows): hand them back.
                crate::heap::release_free_pages();
                let _ = done_tx.send(());
            }
        })
        .context("starting the flow-cutter thread")?;
    Ok((tx, done_rx))
}

/// The daemon's state, owned by its one task.
struct Agent {
    policy: Policy,
    /// Where the policy's devices are.
    device_index: DeviceIndex,
    policy_dir: PathBuf,
    gateway: Vec<IpAddr>,
    config: DaemonConfig,
    netns: Option<String>,
    datapath: Datapath,
    state: State,
    bindings: Bindings,
    audit: AuditLog,
    triggers: Triggers,
    generation: u64,
    reloads_ok: u64,
    reloads_rejected: u64,
    started: Instant,
    /// When the next active lease expires.
    next_lease_expiry: Option<SystemTime>,
    /// Tracked flows to delete once the change that ended them is in force and answered.
    pending_cuts: PendingCuts,
    /// Where they go to be deleted (see [`spawn_flow_cutter`]).
    flow_cuts: std::sync::mpsc::Sender<PendingCuts>,
}

/// Runs `make` on a thread of its own and keeps a copy of what it made, made on this
/// thread. Parsing or compiling a big policy leaves the pages it used full of holes between
/// the few blocks the result keeps; the copy, made once that work is freed, packs the
/// result into few pages, and the pages of the work go back (see [`Agent::load_policy`]):
/// the daemon holds what the policy takes, not what making it took (6 MiB less at 100k
/// devices than keeping the result where it was made).
fn made_apart<T: Clone + Send>(
    make: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let made = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("policy-maker".into())
            .spawn_scoped(scope, make)
            .map(|maker| maker.join())
    });
    match made {
        Ok(Ok(made)) => Ok(made?.clone()),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => Err(anyhow::Error::new(e).context("starting a thread")),
    }
}

fn load_policy_dir(dir: &std::path::Path) -> anyhow::Result<Policy> {
    made_apart(|| Ok(load_dir(dir)?))
}

/// The next change a watch reports; never, without a watch.
async fn next_change(watch: &mut Option<Watch>) -> Option<()> {
    match watch {
        Some(watch) => watch.changes.recv().await,
        None => std::future::pending().await,
    }
}

/// Watches the policy directory (where its path leads now, recursively) and the directory
/// holding its path as configured, since the path may be swapped as a whole (a rename, a
/// git-sync symlink swap). `.git` internals and editors' scratch files do not count.
fn watch_policy(dir: &std::path::Path) -> anyhow::Result<Watch> {
    let context = || format!("policy directory {}", dir.display());
    let configured = std::path::absolute(dir).with_context(context)?;
    let target = dir.canonicalize().with_context(context)?;
    let holder = configured.parent().unwrap_or(&configured).to_path_buf();
    let relevant = {
        let (configured, target) = (configured.clone(), target.clone());
        move |path: &std::path::Path| {
            let in_git = path.components().any(|c| c.as_os_str() == ".git");
            let scratch = path.extension().is_some_and(|e| e == "swp" || e == "tmp")
                || path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with('~'));
            let ours = path == configured || path.starts_with(&target);
            ours && !in_git && !scratch
        }
    };
    Ok(watch::watch(
        &[(&target, true), (&holder, false)],
        POLICY_QUIET,
        relevant,
    )?)
}

impl Agent {
    fn mode(&self) -> &'static str {
        if self.config.audit {
            "audit"
        } else {
            "enforce"
        }
    }

    fn device_count(&self) -> usize {
        self.policy.segments.iter().map(|s| s.devices.len()).sum()
    }

    /// Compiles `policy`, whose devices `index` indexes.
    fn compile(&self, policy: &Policy, index: &DeviceIndex) -> anyhow::Result<CompiledPolicy> {
        let state = self.device_state(index);
        let gateway = &self.gateway;
        made_apart(|| compile_with(policy, gateway, &state).context("compiling the policy"))
    }

    /// Learned addresses and quarantines, for the policy whose devices `index` indexes.
    fn device_state(&self, index: &DeviceIndex) -> DeviceState {
        DeviceState {
            learned: self.bindings.by_device(|a| index.is_static(a)),
            quarantined: self.state.quarantined.keys().cloned().collect(),
        }
    }

    /// Installs a compiled policy and tells the kernel whether opened flows are wanted.
    fn install(&mut self, compiled: CompiledPolicy) -> anyhow::Result<()> {
        let installed = self.datapath.install(compiled)?;
        debug!(
            entries_written = installed.written,
            in_force_us = installed.in_force.as_micros() as u64,
            total_us = installed.total.as_micros() as u64,
            "policy installed"
        );
        self.datapath
            .set_report_new_flows(self.triggers.wants_opened_flows())?;
        Ok(())
    }

    /// Puts the addresses and quarantines of `devices` into force after they changed:
    /// only their endpoints are compiled and written when the live compilation allows it,
    /// otherwise the whole policy is compiled again.
    fn refresh(&mut self, devices: &BTreeSet<String>) -> anyhow::Result<()> {
        let state = self.device_state(&self.device_index);
        let changes = self.datapath.live().and_then(|live| {
            live.recompile_devices(&self.policy, &self.device_index, &state, devices)
        });
        let Some(changes) = changes else {
            let compiled = self.compile(&self.policy, &self.device_index)?;
            return self.install(compiled);
        };
        let installed = self.datapath.patch(&changes)?;
        debug!(
            devices = devices.len(),
            entries_written = installed.written,
            in_force_us = installed.in_force.as_micros() as u64,
            "device endpoints installed"
        );
        Ok(())
    }

    fn policy_loaded(&mut self) {
        self.generation += 1;
        info!(generation = self.generation, "policy loaded");
        self.audit
            .record(AuditEvent::new(EventKind::PolicyLoaded).generation(self.generation));
    }

    /// Reloads after a change in the policy directory, unless what it holds now compiles
    /// to exactly what is in force (an editor's save of an unchanged file, a `git pull`
    /// that changed other files).
    fn reload_if_changed(&mut self) -> Result<u64, String> {
        self.load_policy(true)
    }

    fn reload(&mut self) -> Result<u64, String> {
        self.load_policy(false)
    }

    /// Loads the policy directory again; a policy that fails to load or compile changes
    /// nothing: the old one keeps enforcing. `skip_unchanged`: nor does one that compiles
    /// to exactly what is in force.
    fn load_policy(&mut self, skip_unchanged: bool) -> Result<u64, String> {
        let outcome = self.try_load_policy(skip_unchanged);
        // Whatever came of it, parsing and compiling peaked far above what the daemon
        // keeps (a rejected or unchanged policy included); hand that back.
        crate::heap::release_free_pages();
        outcome
    }

    fn try_load_policy(&mut self, skip_unchanged: bool) -> Result<u64, String> {
        let attempt = load_policy_dir(&self.policy_dir).and_then(|policy| {
            self.gateway = match &self.netns {
                Some(name) => Netns::named(name)?.gateway_addresses()?,
                None => Netns::current().gateway_addresses()?,
            };
            let index = DeviceIndex::new(&policy);
            let compiled = self.compile(&policy, &index)?;
            Ok((policy, index, compiled))
        });
        let (policy, index, compiled) = match attempt {
            Ok(ok) => ok,
            Err(error) => {
                let error = format!("{error:#}");
                self.reloads_rejected += 1;
                warn!(generation = self.generation, error, "policy rejected");
                self.audit
                    .record(AuditEvent::new(EventKind::PolicyRejected).error(error.clone()));
                return Err(error);
            }
        };
        if skip_unchanged && self.datapath.live() == Some(&compiled) {
            return Ok(self.generation);
        }
        self.device_index = index;
        self.triggers = Triggers::new(policy.quarantine.as_ref());
        self.policy = policy;
        if let Err(error) = self.install(compiled) {
            let error = format!("{error:#}");
            warn!(error, "installing the policy failed");
            return Err(error);
        }
        self.reloads_ok += 1;
        self.policy_loaded();
        Ok(self.generation)
    }

    /// The numbers for a metrics scrape.
    fn snapshot(&mut self) -> Snapshot {
        let mut packets = Vec::new();
        for (reason, enforced, audited) in self.datapath.counters().unwrap_or_default() {
            let verdict = if reason.passes() { "pass" } else { "drop" };
            packets.push((verdict, reason.name(), enforced));
            if !reason.passes() {
                packets.push(("audit", reason.name(), audited));
            }
        }
        let devices = self.device_count() as u64;
        let quarantined = self.state.quarantined.len() as u64;
        let unknown = self.unknown_sources().map_or(0, |u| u.len()) as u64;
        Snapshot {
            packets,
            devices: vec![
                ("active", devices.saturating_sub(quarantined)),
                ("quarantined", quarantined),
                ("unknown", unknown),
            ],
            generation: self.generation,
            reloads: vec![("ok", self.reloads_ok), ("rejected", self.reloads_rejected)],
            conntrack_entries: self.datapath.flow_entries().unwrap_or(0) as u64,
            events_suppressed: self.datapath.events_suppressed().unwrap_or(0)
                + self.audit.suppressed(),
        }
    }

    /// One event from the kernel: into the audit log, and past the quarantine triggers.
    fn on_event(&mut self, event: &Event) {
        let Some(reason) = Reason::from_number(event.reason) else {
            return;
        };
        let device = self.device_id(event.device);
        let dst = addr_ip(&event.dst);
        if reason == Reason::Allowed {
            // A flow opened, reported for the fan-out trigger only.
            if let Some(device) = device {
                self.observe(&device, Observation::Opened { dst });
            }
            return;
        }
        let kind = match reason {
            _ if event.audited != 0 => EventKind::AuditDeny,
            Reason::UnknownDevice => EventKind::UnknownDevice,
            Reason::Spoof => EventKind::Spoof,
            _ => EventKind::Deny,
        };
        let mut line = AuditEvent::new(kind)
            .src(addr_ip(&event.src))
            .proto(proto_name(event.protocol))
            .reason(reason.name())
            .mac(MacAddr(event.mac).to_string());
        if event.dst != [0; 16] {
            line = line.dst(dst);
        }
        if event.dport != 0 {
            line = line.dport(event.dport);
        }
        if let Some(device) = &device {
            line = line.device(device.clone());
            if let Some(segment) = self.segment_of(device) {
                line = line.segment(segment.to_owned());
            }
        }
        self.audit.record(line);
        if let (Some(device), EventKind::Deny, HOOK_FROM_DEVICE) = (device, kind, event.hook) {
            let flow = FlowId {
                protocol: event.protocol,
                dst,
                sport: event.sport,
                dport: event.dport,
            };
            self.observe(&device, Observation::Denied { flow });
        }
    }

    /// Feeds the triggers; quarantines the device when one trips.
    fn observe(&mut self, device: &str, seen: Observation) {
        if self.state.quarantined.contains_key(device) {
            return;
        }
        let Some(trip) = self.triggers.observe(device, Instant::now(), seen) else {
            return;
        };
        let by = format!("trigger:{}", trip.trigger);
        match self.quarantine(device, &trip.detail, &by) {
            Ok(message) => info!(device, trigger = trip.trigger, "{message}"),
            Err(error) => warn!(device, error, "automatic quarantine failed"),
        }
    }

    fn device_id(&self, number: u32) -> Option<String> {
        let compiled = self.datapath.live()?;
        compiled.device_ids.get(number).map(str::to_owned)
    }

    /// The number of `id` in the live compilation.
    fn device_number(&self, id: &str) -> Option<u32> {
        let number = self.device_index.by_id(&self.policy, id)?.number;
        let compiled = self.datapath.live()?;
        (compiled.device_ids.get(number)? == id).then_some(number)
    }

    fn segment_of(&self, device: &str) -> Option<&str> {
        let at = self.device_index.by_id(&self.policy, device)?;
        Some(&at.segment.name)
    }

    /// The device that has `address` as a static address.
    fn static_owner(&self, address: IpAddr) -> Option<&str> {
        let number = self.device_index.static_owner(address)?;
        let at = self.device_index.by_number(&self.policy, number)?;
        Some(&at.device.id)
    }

    fn is_static(&self) -> impl Fn(IpAddr) -> bool + '_ {
        |a| self.device_index.is_static(a)
    }

    fn knows_device(&self, device: &str) -> Result<(), String> {
        match self.segment_of(device) {
            Some(_) => Ok(()),
            None => Err(format!("unknown device {device:?}")),
        }
    }

    /// Every address a device has now: static, then learned.
    fn addresses_of(&self, device: &str) -> Vec<BoundAddress> {
        let statics = self
            .device_index
            .by_id(&self.policy, device)
            .into_iter()
            .flat_map(|at| &at.device.addresses)
            .map(|a| BoundAddress {
                address: a.to_canonical(),
                source: "static".into(),
            });
        let learned = self
            .bindings
            .owners(self.is_static())
            .into_iter()
            .filter(|(_, (owner, _))| owner == device)
            .map(|(address, (_, source))| BoundAddress {
                address,
                source: source.name().into(),
            });
        statics.chain(learned).collect()
    }

    /// Quarantines `device` (SPEC §2 rule 3): kept in the state directory, in force in the
    /// kernel, on the record; all before this returns. From then on the kernel passes no
    /// tracked flow of the device but those it opens under the Quarantine rules; the
    /// others are deleted right after the answer (see [`Agent::cut_pending_flows`]), so
    /// that they do not resume on release.
    fn quarantine(&mut self, device: &str, reason: &str, by: &str) -> Result<String, String> {
        self.knows_device(device)?;
        if let Some(record) = self.state.quarantined.get(device) {
            return Ok(format!(
                "{device} is already quarantined (since {}, by {})",
                record.since, record.by
            ));
        }
        let record = QuarantineRecord {
            reason: reason.to_owned(),
            since: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            by: by.to_owned(),
        };
        self.state.quarantined.insert(device.to_owned(), record);
        self.commit_state(&BTreeSet::from([device.to_owned()]), |agent| {
            agent.state.quarantined.remove(device);
        })?;
        let addrs: Vec<Addr> = self
            .addresses_of(device)
            .iter()
            .map(|a| addr_octets(a.address))
            .collect();
        self.pending_cuts.devices.extend(self.device_number(device));
        self.pending_cuts.addrs.extend(addrs);
        self.audit.record(
            AuditEvent::new(EventKind::Quarantine)
                .device(device.to_owned())
                .segment(self.segment_of(device).unwrap_or_default().to_owned())
                .reason(reason.to_owned())
                .source(by.to_owned()),
        );
        Ok(format!("{device} quarantined"))
    }

    /// Has the tracked flows that quarantines and moves ended deleted, after the answer
    /// and off the daemon's loop. The kernel passes a quarantined device none of them
    /// already (see `continues_tracked`); deleting them keeps them from resuming on
    /// release, and ends the flows at a moved address.
    fn cut_pending_flows(&mut self) {
        if self.pending_cuts.devices.is_empty() && self.pending_cuts.addrs.is_empty() {
            return;
        }
        if self
            .flow_cuts
            .send(std::mem::take(&mut self.pending_cuts))
            .is_err()
        {
            warn!("the flow-cutter thread is gone; tracked flows are no longer cut");
        }
    }

    /// After the flow-cutter thread deleted flows: the programs' per-CPU copies of their
    /// entries (`RECENT_FLOWS`) go too, with a new epoch.
    fn flows_cut(&mut self) {
        if let Err(e) = self.datapath.start_epoch() {
            warn!(error = %e, "starting a new epoch after a flow cut");
        }
    }

    fn release(&mut self, device: &str) -> Result<String, String> {
        self.knows_device(device)?;
        let Some(record) = self.state.quarantined.remove(device) else {
            return Err(format!("{device} is not quarantined"));
        };
        self.commit_state(&BTreeSet::from([device.to_owned()]), |agent| {
            agent.state.quarantined.insert(device.to_owned(), record);
        })?;
        self.audit.record(
            AuditEvent::new(EventKind::Release)
                .device(device.to_owned())
                .segment(self.segment_of(device).unwrap_or_default().to_owned()),
        );
        Ok(format!("{device} released"))
    }

    /// Puts the change to `devices` into the kernel, then saves the state (durably: the
    /// caller answers only after this returns). The kernel goes first because saving waits
    /// for the disk (fsync), which would hold a quarantine back by milliseconds. On
    /// failure `undo` reverts the caller's change, and kernel and file keep the old state.
    fn commit_state(
        &mut self,
        devices: &BTreeSet<String>,
        undo: impl FnOnce(&mut Self),
    ) -> Result<(), String> {
        self.sync_bindings();
        let result = self
            .refresh(devices)
            .map_err(|e| format!("{e:#}"))
            .and_then(|()| {
                state::save(&self.config.state_dir, &self.state).map_err(|e| e.to_string())
            });
        if result.is_err() {
            undo(self);
            self.sync_bindings();
            if let Err(e) = self.refresh(devices) {
                warn!(error = %format!("{e:#}"), "restoring the devices in the kernel");
            }
            if let Err(e) = state::save(&self.config.state_dir, &self.state) {
                warn!(error = %e, "restoring the state file");
            }
        }
        result
    }

    fn sync_bindings(&mut self) {
        self.state.binds = self.bindings.binds.clone();
        self.state.leases = self.bindings.leases.clone();
    }

    /// Changes the learned bindings with `change`, then puts the result into force: the new
    /// generation has no old owner's binding for a moved address (SPEC §2.7), flows at moved
    /// addresses are cut, and each move is on the record.
    fn rebind(&mut self, change: impl FnOnce(&mut Bindings)) -> Result<usize, String> {
        let before_bindings = self.bindings.clone();
        let before = self.bindings.owners(self.is_static());
        change(&mut self.bindings);
        let after = self.bindings.owners(self.is_static());
        let moved = moves(&before, &after);
        if moved.is_empty() {
            return Ok(0);
        }
        let devices: BTreeSet<String> = moved
            .iter()
            .flat_map(|m| [&m.from, &m.to])
            .flatten()
            .map(|(device, _)| device.clone())
            .collect();
        self.commit_state(&devices, |agent| agent.bindings = before_bindings)?;
        self.pending_cuts.addrs.extend(
            moved
                .iter()
                .filter(|m| m.from.is_some())
                .map(|m| addr_octets(m.address)),
        );
        for m in &moved {
            for (kind, end) in [(EventKind::Unbind, &m.from), (EventKind::Bind, &m.to)] {
                if let Some((device, source)) = end {
                    let mut event = AuditEvent::new(kind)
                        .device(device.clone())
                        .address(m.address)
                        .source(source.name());
                    if let Some(segment) = self.segment_of(device) {
                        event = event.segment(segment.to_owned());
                    }
                    self.audit.record(event);
                }
            }
        }
        Ok(moved.len())
    }

    fn bind(&mut self, device: &str, address: IpAddr) -> Result<String, String> {
        self.knows_device(device)?;
        let address = address.to_canonical();
        check_bindable(address)?;
        if let Some(owner) = self.static_owner(address) {
            return if owner == device {
                Ok(format!("{address} is already a static address of {device}"))
            } else {
                Err(format!(
                    "{address} is a static address of {owner} in the policy; change the policy to move it"
                ))
            };
        }
        let device = device.to_owned();
        let moved = self.rebind(|b| {
            b.binds.insert(address, device.clone());
        })?;
        Ok(match moved {
            0 => format!("{address} was already bound to {device}"),
            _ => format!("{address} bound to {device}"),
        })
    }

    fn unbind(&mut self, device: &str, address: IpAddr) -> Result<String, String> {
        self.knows_device(device)?;
        let address = address.to_canonical();
        if self.bindings.binds.get(&address).map(String::as_str) != Some(device) {
            let why = match (
                self.static_owner(address),
                self.bindings.leases.get(&address),
            ) {
                (Some(owner), _) if owner == device => "it is a static address in the policy",
                (_, Some(owner)) if owner == device => {
                    "it comes from a DHCP lease and goes when the lease does"
                }
                _ => "it is not bound to that device",
            };
            return Err(format!("cannot unbind {address} from {device}: {why}"));
        }
        self.rebind(|b| {
            b.binds.remove(&address);
        })?;
        Ok(format!("{address} unbound from {device}"))
    }

    /// Reads the lease file again and applies what changed.
    fn leases_changed(&mut self) {
        let before = self.bindings.leases.clone();
        self.read_leases();
        let leases = std::mem::replace(&mut self.bindings.leases, before);
        if let Err(error) = self.rebind(|b| b.leases = leases) {
            warn!(error, "applying lease changes");
        }
    }

    /// The lease file's bindings in force now, by the device whose MAC holds each lease.
    fn read_leases(&mut self) {
        let Some(path) = self.config.dhcp_leases.clone() else {
            // No lease file (any more): no lease bindings.
            self.bindings.leases.clear();
            return;
        };
        let file = match leases::read(&path) {
            Ok(file) => file,
            Err(error) => {
                warn!(error = %error, "reading the lease file; keeping the bindings as they are");
                return;
            }
        };
        for problem in &file.problems {
            warn!("{}", problem.display(&path));
        }
        let now = SystemTime::now();
        self.bindings.leases = leases::active(&file, now)
            .into_iter()
            .filter_map(|(address, mac)| {
                let at = self.device_index.by_mac(&self.policy, mac)?;
                Some((address, at.device.id.clone()))
            })
            .collect();
        self.next_lease_expiry = file
            .leases
            .iter()
            .filter_map(|l| l.expires)
            .filter(|&t| t > now)
            .min();
    }

    fn handle(&mut self, request: Request) -> Response {
        let done = |r: Result<String, String>| match r {
            Ok(message) => Response::ok(Reply::Done { message }),
            Err(error) => Response::error(error),
        };
        match request {
            Request::Status => match self.status() {
                Ok(report) => Response::ok(Reply::Status(report)),
                Err(error) => Response::error(error),
            },
            Request::Devices { unknown: false } => Response::ok(Reply::Devices {
                devices: self.devices(),
            }),
            Request::Devices { unknown: true } => match self.unknown_sources() {
                Ok(sources) => Response::ok(Reply::Unknown { sources }),
                Err(error) => Response::error(error),
            },
            Request::Quarantine { device, reason } => {
                let reason = reason.trim();
                if reason.is_empty() {
                    return Response::error("a quarantine needs a reason");
                }
                let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
                done(self.quarantine(&device, &reason, "manual"))
            }
            Request::Release { device } => done(self.release(&device)),
            Request::Bind { device, address } => done(self.bind(&device, address)),
            Request::Unbind { device, address } => done(self.unbind(&device, address)),
            Request::Reload => done(
                self.reload()
                    .map(|generation| format!("policy loaded (generation {generation})")),
            ),
        }
    }

    fn status(&mut self) -> Result<StatusReport, String> {
        let counters = self.datapath.counters().map_err(|e| e.to_string())?;
        let unknown = self.unknown_sources()?.len();
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            policy_dir: self.policy_dir.display().to_string(),
            generation: self.generation,
            mode: self.mode().into(),
            interfaces: self.config.device_ifaces.clone(),
            netns: self.netns.clone(),
            segments: self.policy.segments.len(),
            devices: self.device_count(),
            quarantined: self.state.quarantined.len(),
            bound_addresses: self.bindings.owners(self.is_static()).len(),
            unknown_sources: unknown,
            uptime_seconds: self.started.elapsed().as_secs(),
            packets: counters
                .into_iter()
                .filter(|(_, enforced, audited)| enforced + audited > 0)
                .map(|(reason, packets, audited)| PacketCount {
                    reason: reason.name().into(),
                    verdict: if reason.passes() { "pass" } else { "drop" }.into(),
                    packets,
                    audited,
                })
                .collect(),
        })
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.policy
            .segments
            .iter()
            .flat_map(|s| s.devices.iter().map(move |d| (s, d)))
            .map(|(segment, device)| {
                let quarantine = self
                    .state
                    .quarantined
                    .get(&device.id)
                    .map(|q| QuarantineInfo {
                        reason: q.reason.clone(),
                        since: q.since.clone(),
                        by: q.by.clone(),
                    });
                DeviceInfo {
                    id: device.id.clone(),
                    segment: segment.name.clone(),
                    mac: device.mac.map(|m| m.to_string()),
                    addresses: self.addresses_of(&device.id),
                    state: if quarantine.is_some() {
                        "quarantined"
                    } else {
                        "active"
                    }
                    .into(),
                    quarantine,
                }
            })
            .collect()
    }

    /// The kernel's inventory of sources no device owns, newest first; sources that have
    /// become a device's address since are left out.
    fn unknown_sources(&mut self) -> Result<Vec<UnknownSource>, String> {
        let seen = self.datapath.unknown_sources().map_err(|e| e.to_string())?;
        let owned: BTreeSet<IpAddr> = self
            .device_index
            .static_addresses()
            .chain(self.bindings.owners(self.is_static()).into_keys())
            .collect();
        let clock = MonotonicClock::now();
        let mut sources: Vec<(u64, UnknownSource)> = seen
            .into_iter()
            .map(|(key, seen)| (addr_ip(&key.addr), key.mac, seen))
            .filter(|(address, _, _)| !owned.contains(address))
            .map(|(address, mac, seen)| {
                let at = |ns| humantime::format_rfc3339(clock.wall(ns)).to_string();
                (
                    seen.last_seen_ns,
                    UnknownSource {
                        address,
                        mac: MacAddr(mac).to_string(),
                        first_seen: at(seen.first_seen_ns),
                        last_seen: at(seen.last_seen_ns),
                        packets: seen.packets,
                    },
                )
            })
            .collect();
        sources.sort_by_key(|s| std::cmp::Reverse(s.0));
        Ok(sources.into_iter().map(|(_, s)| s).collect())
    }

    fn log_counters(&mut self) -> anyhow::Result<()> {
        for (reason, enforced, audited) in self.datapath.counters()? {
            if enforced + audited > 0 {
                info!(
                    reason = reason.name(),
                    packets = enforced,
                    audited,
                    "counter"
                );
            }
        }
        let suppressed = self.datapath.events_suppressed()? + self.audit.suppressed();
        info!(events_suppressed = suppressed, "counter");
        Ok(())
    }
}

/// Addresses a device can be bound to: not unspecified, loopback or multicast.
fn check_bindable(address: IpAddr) -> Result<(), String> {
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
        return Err(format!("{address} cannot be a device's address"));
    }
    if let IpAddr::V4(v4) = address {
        if v4.is_broadcast() {
            return Err(format!("{address} cannot be a device's address"));
        }
    }
    Ok(())
}

/// An address as people write it: IPv4-mapped addresses as plain IPv4.
fn addr_ip(addr: &Addr) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(*addr)).to_canonical()
}

/// Turns kernel times (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC at a tick's resolution)
/// into wall-clock times.
struct MonotonicClock {
    wall: SystemTime,
    monotonic_ns: u64,
}

impl MonotonicClock {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        MonotonicClock {
            wall: SystemTime::now(),
            monotonic_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        }
    }

    fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unicast_addresses_are_bindable() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "ff02::1",
        ] {
            assert!(check_bindable(bad.parse().unwrap()).is_err(), "{bad}");
        }
        for good in ["10.20.1.50", "2001:db8::5"] {
            assert!(check_bindable(good.parse().unwrap()).is_ok(), "{good}");
        }
    }
}
