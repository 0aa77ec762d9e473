//! The kernel half, from the agent's side: load the embedded programs, attach them, and
//! install compiled policies into their maps one whole generation at a time.
//!
//! Fail closed, stay attached: a daemon's maps and links are pinned under
//! `/sys/fs/bpf/segward/<instance>/`, so enforcement and tracked flows go on while the daemon
//! is stopped or dead, and a restarted daemon adopts them: it reuses the pinned maps and
//! swaps its programs into the pinned links in place (`bpf_link_update`), so there is never a
//! moment without a program and never a second attachment.

use agent_ebpf::{
    maps::{
        device_iface_slot, Addr, AddrKey, Config, DatagramEntry, DatagramKey, Endpoint, Event,
        FlowEntry, FlowKey, PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, UnknownKey,
        UnknownPending, UnknownSeen, ZoneIdentity, ZoneKey, ZoneLengths, ALL_MAPS, CONFIG_AUDIT,
        CONFIG_REPORT_NEW_FLOWS, DEVICE_IFACE_SLOT_COUNT, MAP_CONFIG, MAP_CONNTRACK, MAP_COUNTERS,
        MAP_DEVICE_IFACES, MAP_DEVICE_IFACE_SLOTS, MAP_ENDPOINTS, MAP_EVENTS, MAP_FRAGMENTS,
        MAP_POLICY, MAP_SEGMENTS, MAP_UNKNOWN_PENDING, MAP_UNKNOWN_SOURCES, MAP_ZONE_LENGTHS,
        MAP_ZONE_PREFIXES, MAX_SEGMENTS, NO_DEVICE_IFACE, PROG_FROM_DEVICE, PROG_TO_DEVICE,
    },
    verdict::{Reason, COUNTER_EVENTS_SUPPRESSED, REASON_COUNT},
};
use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader, Pod,
};

use crate::{
    netns::{Netns, NetnsError},
    policy::compile::{CompiledPolicy, EntryChanges},
};

/// What an install wrote and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct Installed {
    /// Entries written into the idle generation before the flip.
    pub written: usize,
    /// Until the flip: from then on, every packet is judged by the new policy.
    pub in_force: Duration,
    /// Until the old generation was in line with the new one too.
    pub total: Duration,
}

/// What an install writes into a generation slot.
enum Contents<'a> {
    /// The changes to the policy the slot holds.
    Changes(&'a EntryChanges),
    /// A whole policy, into a slot of unknown contents.
    All(&'a CompiledPolicy),
}

/// The XDP object this binary was built with (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/segward-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("attaching to interface {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("map {map}: a second descriptor: {source}")]
    Dup {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("no policy is installed yet")]
    NoPolicy,
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(std::io::Error),
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("mounting bpffs on {BPFFS}: {0}")]
    Mount(nix::Error),
}

/// Where the BPF filesystem lives.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The pin directory of one gateway instance: the named netns it works on, or `host`.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS).join("segward").join(instance)
}

/// Removes a pinned instance: its links detach and its maps are freed once no process
/// holds them (so stop the daemon first). Missing is fine.
pub fn uninstall(dir: &Path) -> Result<bool, DatapathError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DatapathError::Pin {
            path: dir.into(),
            source,
        }),
    }
}

/// Mounts bpffs on /sys/fs/bpf unless it is there already.
fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().take(3).collect();
        f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(DatapathError::Mount)
}

/// Drop events from the kernel, in the order they were sent.
pub struct EventStream(RingBuf<MapData>);

impl EventStream {
    /// The next event waiting, if any (never blocks; poll the fd for readiness).
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let item = self.0.next()?;
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote an `Event` (plain data) at the start of the item.
                return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
    }
}

impl std::os::fd::AsRawFd for EventStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Which program a [`TestRun`] exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP ingress on a device-facing interface.
    FromDevice,
    /// tc egress on a device-facing interface; the frame came in on `ingress_ifindex` (0:
    /// sent by the gateway itself).
    ToDevice { ingress_ifindex: u32 },
}

#[derive(Clone, Copy, Debug)]
pub struct TestRun<'a> {
    pub hook: Hook,
    pub frame: &'a [u8],
    pub repeat: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunResult {
    /// The program's return value (XDP action or tc action).
    pub action: u32,
    /// Mean time per run, as the kernel measured it.
    pub duration_ns: u32,
}

impl TestRunResult {
    /// Whether the verdict lets the frame through (XDP_PASS or TC_ACT_OK).
    pub fn passes(&self, hook: Hook) -> bool {
        match hook {
            Hook::FromDevice => self.action == 2,
            Hook::ToDevice { .. } => self.action == 0,
        }
    }
}

/// A `struct __sk_buff` with only `ingress_ifindex` set (the kernel accepts that field).
fn skb_context(ingress_ifindex: u32) -> Vec<u8> {
    // struct __sk_buff is 192 bytes; ingress_ifindex is its 10th u32 (offset 36).
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// The BPF_PROG_TEST_RUN command, which aya does not wrap. Public for the benchmarks, which
/// run a trivial program of their own beside segward's as the floor.
pub mod test_run {
    use std::{
        io,
        os::fd::{AsRawFd, BorrowedFd},
    };

    use super::TestRunResult;

    const BPF_PROG_TEST_RUN: libc::c_long = 10;

    /// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }

    /// Runs program `prog` on `frame` (with context `ctx`, empty for none) `repeat` times.
    pub fn run(
        prog: BorrowedFd<'_>,
        frame: &[u8],
        ctx: &[u8],
        repeat: u32,
    ) -> io::Result<TestRunResult> {
        // The program may grow the frame (it does not today); leave room for that.
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestAttr {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: if ctx.is_empty() {
                0
            } else {
                ctx.as_ptr() as u64
            },
            ..TestAttr::default()
        };
        // SAFETY: attr points at valid buffers of the sizes given, for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestAttr,
                std::mem::size_of::<TestAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TestRunResult {
            action: attr.retval,
            duration_ns: attr.duration,
        })
    }
}

/// Per-reason packet counts, summed over CPUs: `[reason] = (enforced, audited)`.
pub type Counters = Vec<(Reason, u64, u64)>;

pub struct Datapath {
    ebpf: Ebpf,
    config: Config,
    live: Option<CompiledPolicy>,
    /// Whether the idle generation holds exactly the live policy's entries.
    mirrored: bool,
    /// The pin directory, for a daemon's datapath; none for a throw-away one (tests).
    pins: Option<PathBuf>,
}

impl Datapath {
    /// Loads the programs with maps of their own, gone when this value is dropped.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(&mut EbpfLoader::new(), None)
    }

    /// Loads the programs with their maps pinned in `dir`, reusing maps pinned there by an
    /// earlier daemon (with their policy, tracked flows and counters).
    pub fn load_pinned(dir: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs()?;
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|source| DatapathError::Pin { path, source })?;
        }
        let map_paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|&name| (name, dir.join("maps").join(name)))
            .collect();
        let legacy = legacy::take(&dir.join("maps"))?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut datapath = Self::load_with(&mut loader, Some(dir.to_path_buf()))?;
        legacy.restore(&mut datapath)?;
        Ok(datapath)
    }

    /// Loads the programs into the kernel (the verifier runs here).
    fn load_with(
        loader: &mut EbpfLoader<'_>,
        pins: Option<PathBuf>,
    ) -> Result<Self, DatapathError> {
        let mut ebpf = loader.load(OBJECT)?;
        let from_device: &mut Xdp = ebpf
            .program_mut(PROG_FROM_DEVICE)
            .ok_or(DatapathError::Missing(PROG_FROM_DEVICE))?
            .try_into()?;
        from_device.load()?;
        let to_device: &mut SchedClassifier = ebpf
            .program_mut(PROG_TO_DEVICE)
            .ok_or(DatapathError::Missing(PROG_TO_DEVICE))?
            .try_into()?;
        to_device.load()?;
        let mut datapath = Datapath {
            ebpf,
            config: Config::default(),
            live: None,
            mirrored: false,
            pins,
        };
        // An adopted CONFIG says which generation is live; a new one is all zeroes.
        let adopted = datapath.read_config()?;
        if adopted.timeout_tcp != 0 {
            datapath.config = Config {
                epoch: epoch_for(adopted.epoch, adopted.generation),
                ..adopted
            };
        }
        Ok(datapath)
    }

    fn read_config(&self) -> Result<Config, DatapathError> {
        let map = self
            .ebpf
            .map(MAP_CONFIG)
            .ok_or(DatapathError::Missing(MAP_CONFIG))?;
        let config: Array<&MapData, Config> = Array::try_from(map).map_err(map_err(MAP_CONFIG))?;
        config.get(&0, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Attaches to a device-facing interface of `netns`: XDP ingress judges what devices
    /// send, tc egress what is sent to them. Returns its index.
    pub fn attach_device_iface(
        &mut self,
        netns: &Netns,
        iface: &str,
    ) -> Result<u32, DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            iface: iface.into(),
            source,
        };
        let ifindex = netns
            .run(|| nix::net::if_::if_nametoindex(iface))?
            .map_err(|e| {
                attach_err(ProgramError::UnknownInterface {
                    name: format!("{iface} ({e})"),
                })
            })?;
        self.add_device_ifindex(ifindex)?;

        let pins = self.pins.as_ref().map(|dir| dir.join("links"));
        let pin = |hook: &str| {
            pins.as_ref()
                .map(|dir| dir.join(link_pin_name(hook, iface)))
        };
        let (xdp_pin, tc_pin) = (pin("xdp"), pin("tc"));

        let from_device: &mut Xdp = self
            .ebpf
            .program_mut(PROG_FROM_DEVICE)
            .ok_or(DatapathError::Missing(PROG_FROM_DEVICE))?
            .try_into()?;
        let adopted = adopt(xdp_pin.as_deref(), |link| {
            Ok(from_device.attach_to_link(link.try_into()?)?)
        })?;
        if adopted.is_none() {
            let id = netns
                .run(|| {
                    // Native mode where the driver has it (veth does), else generic.
                    from_device
                        .attach_to_if_index(ifindex, XdpMode::Driver)
                        .or_else(|_| from_device.attach_to_if_index(ifindex, XdpMode::Skb))
                })?
                .map_err(attach_err)?;
            if let Some(path) = &xdp_pin {
                pin_link(from_device.take_link(id)?.try_into()?, path)?;
            }
        }

        let to_device: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TO_DEVICE)
            .ok_or(DatapathError::Missing(PROG_TO_DEVICE))?
            .try_into()?;
        let adopted = adopt(tc_pin.as_deref(), |link| {
            Ok(to_device.attach_to_link(link.try_into()?)?)
        })?;
        if adopted.is_none() {
            let id = netns
                .run(|| to_device.attach(iface, TcAttachType::Egress))?
                .map_err(attach_err)?;
            if let Some(path) = &tc_pin {
                pin_link(to_device.take_link(id)?.try_into()?, path)?;
            }
        }
        Ok(ifindex)
    }

    /// Detaches pinned links of interfaces that are no longer configured.
    pub fn detach_other_ifaces(&mut self, keep: &[String]) -> Result<Vec<String>, DatapathError> {
        let Some(dir) = self.pins.as_ref().map(|d| d.join("links")) else {
            return Ok(Vec::new());
        };
        let entries = fs::read_dir(&dir).map_err(|source| DatapathError::Pin {
            path: dir.clone(),
            source,
        })?;
        let mut detached = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep
                .iter()
                .any(|iface| name.ends_with(&format!("-{}", pin_safe(iface))))
            {
                // Unpinning drops the last reference to the link: it detaches.
                fs::remove_file(entry.path()).map_err(|source| DatapathError::Pin {
                    path: entry.path(),
                    source,
                })?;
                detached.push(name);
            }
        }
        Ok(detached)
    }

    /// Marks `ifindex` as device-facing (attaching does too, and nothing else), so that
    /// the tc hook passes what came in on it as judged at XDP already. Tests use it to
    /// judge such frames with [`Datapath::test_run`] (`Hook::ToDevice { ingress_ifindex }`)
    /// without a real interface.
    pub fn add_device_ifindex(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.hash::<u32, u32>(MAP_DEVICE_IFACES)?
            .insert(ifindex, 1, 0)
            .map_err(map_err(MAP_DEVICE_IFACES))?;
        self.write_device_iface_slots()
    }

    /// Forgets every device-facing interface but `keep` (a restarted daemon's, whose pins
    /// may hold interfaces no longer configured: their index may come to name another).
    pub fn keep_device_ifindexes(&mut self, keep: &[u32]) -> Result<(), DatapathError> {
        let mut ifaces = self.hash::<u32, u32>(MAP_DEVICE_IFACES)?;
        let known = ifaces
            .keys()
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(MAP_DEVICE_IFACES))?;
        for ifindex in known.into_iter().filter(|i| !keep.contains(i)) {
            ifaces
                .remove(&ifindex)
                .map_err(map_err(MAP_DEVICE_IFACES))?;
        }
        self.write_device_iface_slots()
    }

    /// Writes `DEVICE_IFACE_SLOTS` from `DEVICE_IFACES`.
    fn write_device_iface_slots(&mut self) -> Result<(), DatapathError> {
        let ifindexes = self
            .hash::<u32, u32>(MAP_DEVICE_IFACES)?
            .keys()
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(MAP_DEVICE_IFACES))?;
        let mut slots = self.array_mut::<u32>(MAP_DEVICE_IFACE_SLOTS)?;
        for (slot, value) in device_iface_slots(&ifindexes).into_iter().enumerate() {
            slots
                .set(slot as u32, value, 0)
                .map_err(map_err(MAP_DEVICE_IFACE_SLOTS))?;
        }
        Ok(())
    }

    /// Whole-agent audit mode (SPEC §2.6).
    pub fn set_audit(&mut self, audit: bool) -> Result<(), DatapathError> {
        self.set_flag(CONFIG_AUDIT, audit)
    }

    /// Whether the kernel reports each new flow a device opens (for the fan-out trigger).
    pub fn set_report_new_flows(&mut self, report: bool) -> Result<(), DatapathError> {
        self.set_flag(CONFIG_REPORT_NEW_FLOWS, report)
    }

    fn set_flag(&mut self, flag: u8, on: bool) -> Result<(), DatapathError> {
        let flags = if on {
            self.config.flags | flag
        } else {
            self.config.flags & !flag
        };
        self.change_settings(|config| config.flags = flags)
    }

    /// Idle timeouts of tracked flows, seconds: TCP/SCTP, UDP, everything else.
    pub fn set_timeouts(&mut self, tcp: u32, udp: u32, other: u32) -> Result<(), DatapathError> {
        self.change_settings(|config| {
            config.timeout_tcp = tcp;
            config.timeout_udp = udp;
            config.timeout_other = other;
        })
    }

    /// Writes settings that `change` changes, in a new epoch: what the programs kept for
    /// flows (checked entries, kept drops) was decided under the old ones. Nothing is
    /// written if nothing changes; nothing is changed if the write fails.
    fn change_settings(&mut self, change: impl FnOnce(&mut Config)) -> Result<(), DatapathError> {
        let mut config = self.config;
        change(&mut config);
        if config == self.config {
            return Ok(());
        }
        self.write_config_in_new_epoch(config)
    }

    /// Starts a new epoch: every tracked flow is checked anew at its next packet, and
    /// what the programs keep of flows (their entries' copies, kept drops) is dropped. For
    /// after flows were deleted behind the programs' backs ([`FlowCutter`]).
    pub fn start_epoch(&mut self) -> Result<(), DatapathError> {
        self.write_config_in_new_epoch(self.config)
    }

    /// Writes `config` in the epoch after this one; on failure, nothing changes.
    fn write_config_in_new_epoch(&mut self, mut config: Config) -> Result<(), DatapathError> {
        config.epoch = epoch_for(self.config.epoch, config.generation);
        let old = std::mem::replace(&mut self.config, config);
        self.write_config().inspect_err(|_| self.config = old)
    }

    /// A handle on the tracked-flow maps that deletes flows, for another thread: walking
    /// a full flow table takes long enough to be kept off the daemon's loop.
    pub fn flow_cutter(&self) -> Result<FlowCutter, DatapathError> {
        let own = |name: &'static str| -> Result<Map, DatapathError> {
            let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
            let Map::LruHashMap(data) = map else {
                return Err(DatapathError::Missing(name));
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::Dup { map: name, source })?;
            Ok(Map::LruHashMap(
                MapData::from_fd(fd).map_err(map_err(name))?,
            ))
        };
        Ok(FlowCutter {
            conntrack: HashMap::try_from(own(MAP_CONNTRACK)?).map_err(map_err(MAP_CONNTRACK))?,
            fragments: HashMap::try_from(own(MAP_FRAGMENTS)?).map_err(map_err(MAP_FRAGMENTS))?,
        })
    }

    /// Entries in the flow table (live or idle but not yet evicted), against its capacity
    /// `MAX_TRACKED_FLOWS`: a flow's reply entry, and its opener entry once it is answered.
    /// Keys only: a scrape walks the whole table on the daemon's loop.
    pub fn flow_entries(&mut self) -> Result<usize, DatapathError> {
        Ok(self
            .hash::<FlowKey, FlowEntry>(MAP_CONNTRACK)?
            .keys()
            .filter(Result::is_ok)
            .count())
    }

    /// The inventory of sources that no device owns, as the kernel saw them.
    pub fn unknown_sources(&mut self) -> Result<Vec<(UnknownKey, UnknownSeen)>, DatapathError> {
        let mut sources: std::collections::BTreeMap<UnknownKey, UnknownSeen> = self
            .hash::<UnknownKey, UnknownSeen>(MAP_UNKNOWN_SOURCES)?
            .iter()
            .filter_map(Result::ok)
            .collect();
        // Each CPU's packets of its last source that the programs have not added yet.
        let pending = self.per_cpu_array::<UnknownPending>(MAP_UNKNOWN_PENDING)?;
        for last in pending
            .get(&0, 0)
            .map_err(map_err(MAP_UNKNOWN_PENDING))?
            .iter()
            .filter(|last| last.packets > 0)
        {
            let seen = sources.entry(last.key).or_insert(UnknownSeen {
                first_seen_ns: last.last_seen_ns,
                ..UnknownSeen::default()
            });
            seen.packets += last.packets;
            seen.last_seen_ns = seen.last_seen_ns.max(last.last_seen_ns);
        }
        Ok(sources.into_iter().collect())
    }

    /// Installs `policy` atomically: writes it into the idle generation, flips the live
    /// generation in one store, then brings the old generation in line with the new one.
    /// Both slots hold the live policy between installs, so after the first one only the
    /// entries that differ are written.
    pub fn install(&mut self, policy: CompiledPolicy) -> Result<Installed, DatapathError> {
        let changes = match &self.live {
            Some(live) if self.mirrored => Some(EntryChanges::between(live, &policy)),
            _ => None,
        };
        let (flipped, result) = self.switch(match &changes {
            Some(changes) => Contents::Changes(changes),
            None => Contents::All(&policy),
        });
        if flipped {
            self.live = Some(policy);
        }
        result
    }

    /// Installs the live policy with `changes` (say, one device's endpoints after a lease
    /// or a quarantine) the way [`Datapath::install`] does: atomically, writing only them.
    pub fn patch(&mut self, changes: &EntryChanges) -> Result<Installed, DatapathError> {
        let mut live = self.live.take().ok_or(DatapathError::NoPolicy)?;
        if !self.mirrored {
            // After a failed install: rewrite it all (rare, so the copy does not matter).
            self.live = Some(live.clone());
            live.apply(changes);
            return self.install(live);
        }
        let (flipped, result) = self.switch(Contents::Changes(changes));
        if flipped {
            live.apply(changes);
        }
        self.live = Some(live);
        result
    }

    /// Writes `contents` into the idle generation, flips, then writes them into the old
    /// one; says whether it flipped (the new policy is in force even if writing the old
    /// slot failed afterwards).
    fn switch(&mut self, contents: Contents<'_>) -> (bool, Result<Installed, DatapathError>) {
        let started = Instant::now();
        let old = self.config.generation & 1;
        let next = old ^ 1;
        // Until both slots hold the new policy, the idle one is not known to mirror it.
        self.mirrored = false;
        let written = match self.write(&contents, next) {
            Ok(written) => written,
            Err(e) => return (false, Err(e)),
        };
        let epoch = self.config.epoch;
        self.config.generation = next;
        // Flows checked under the old epoch are checked again (maps.rs, `FlowEntry`).
        self.config.epoch = epoch_for(epoch, next);
        if let Err(e) = self.write_config() {
            self.config.generation = old;
            self.config.epoch = epoch;
            return (false, Err(e));
        }
        let in_force = started.elapsed();
        if let Err(e) = self.write(&contents, old) {
            return (true, Err(e));
        }
        self.mirrored = true;
        let total = started.elapsed();
        (
            true,
            Ok(Installed {
                written,
                in_force,
                total,
            }),
        )
    }

    /// Writes `contents` into slot `generation`; returns how many entries it wrote.
    fn write(&mut self, contents: &Contents<'_>, generation: u8) -> Result<usize, DatapathError> {
        match contents {
            Contents::Changes(changes) => {
                self.write_changes(changes, generation)?;
                Ok(changes.len())
            }
            Contents::All(policy) => {
                // Whatever is in the slot (an earlier daemon's generation, a half-written
                // one) must go.
                self.clear_generation(generation)?;
                let all = EntryChanges::between(&CompiledPolicy::default(), policy);
                self.write_changes(&all, generation)?;
                Ok(all.len())
            }
        }
    }
    /// How many instructions the verifier walked to accept each program (it stops at 1M):
    /// the headroom left for new code paths.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        [PROG_FROM_DEVICE, PROG_TO_DEVICE]
            .into_iter()
            .map(|name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::Missing(name))?;
                let info = program.info()?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }

    /// Runs one of the programs on `frame` in the kernel (BPF_PROG_TEST_RUN), `repeat` times,
    /// against the live maps. For the tc hook, `ingress_ifindex` is where the frame came in.
    pub fn test_run(&self, run: TestRun<'_>) -> Result<TestRunResult, DatapathError> {
        let (name, ctx) = match run.hook {
            Hook::FromDevice => (PROG_FROM_DEVICE, Vec::new()),
            Hook::ToDevice { ingress_ifindex } => (PROG_TO_DEVICE, skb_context(ingress_ifindex)),
        };
        let program = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?;
        let fd = match program {
            aya::programs::Program::Xdp(p) => p.fd()?,
            aya::programs::Program::SchedClassifier(p) => p.fd()?,
            _ => return Err(DatapathError::Missing(name)),
        };
        test_run::run(fd.as_fd(), run.frame, &ctx, run.repeat).map_err(DatapathError::TestRun)
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                Ok((
                    r,
                    self.counter(r as u32)?,
                    self.counter(r as u32 + REASON_COUNT)?,
                ))
            })
            .collect()
    }

    /// Events the kernel's per-source rate limit kept from the daemon.
    pub fn events_suppressed(&self) -> Result<u64, DatapathError> {
        self.counter(COUNTER_EVENTS_SUPPRESSED)
    }

    /// One slot of the per-CPU counters, summed over CPUs.
    fn counter(&self, slot: u32) -> Result<u64, DatapathError> {
        Ok(self
            .per_cpu_array::<u64>(MAP_COUNTERS)?
            .get(&slot, 0)
            .map_err(map_err(MAP_COUNTERS))?
            .iter()
            .sum())
    }

    /// The ring buffer of drop events (taken once, by the daemon's event loop).
    pub fn take_events(&mut self) -> Result<EventStream, DatapathError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(DatapathError::Missing(MAP_EVENTS))?;
        Ok(EventStream(
            RingBuf::try_from(map).map_err(map_err(MAP_EVENTS))?,
        ))
    }

    /// The policy in force, if this datapath installed one.
    pub fn live(&self) -> Option<&CompiledPolicy> {
        self.live.as_ref()
    }

    fn write_config(&mut self) -> Result<(), DatapathError> {
        let config = self.config;
        self.array_mut::<Config>(MAP_CONFIG)?
            .set(0, config, 0)
            .map_err(map_err(MAP_CONFIG))
    }

    /// Writes `changes` into `generation`. Removing an entry that is not there (never
    /// written) is not an error.
    fn write_changes(
        &mut self,
        changes: &EntryChanges,
        generation: u8,
    ) -> Result<(), DatapathError> {
        self.write_batch(
            MAP_ENDPOINTS,
            changes
                .endpoints
                .iter()
                .map(|(k, v)| (AddrKey { generation, ..*k }, *v)),
        )?;
        self.write_segments(
            changes
                .segments
                .iter()
                .map(|(k, v)| (SegmentKey { generation, ..*k }, *v)),
        )?;
        self.write_batch(
            MAP_POLICY,
            changes
                .policy
                .iter()
                .map(|(k, v)| (PolicyKey { generation, ..*k }, *v)),
        )?;
        self.write_batch(
            MAP_ZONE_PREFIXES,
            changes
                .zones
                .iter()
                .map(|(k, v)| (ZoneKey { generation, ..*k }, *v)),
        )?;
        if let Some(lengths) = &changes.zone_lengths {
            self.set_zone_lengths(generation, lengths)?;
        }
        Ok(())
    }

    /// Writes `changes` (a key and its new value, or `None`: remove it) into hash map
    /// `name`, with one bpf(2) call for the updates and one for the removals, not one per
    /// entry: at 100k devices an install is some 100k entries per generation slot, and a
    /// syscall each was most of its time.
    fn write_batch<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        changes: impl Iterator<Item = (K, Option<V>)>,
    ) -> Result<(), DatapathError> {
        // Typed first: checks that K and V are the map's key and value.
        self.hash::<K, V>(name)?;
        let Some(Map::HashMap(map)) = self.ebpf.map(name) else {
            return Err(DatapathError::Missing(name));
        };
        let fd = map.fd().as_fd().as_raw_fd();
        let (mut keys, mut values, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for (k, v) in changes {
            match v {
                Some(v) => {
                    keys.push(k);
                    values.push(v);
                }
                None => removed.push(k),
            }
        }
        update_batch(name, fd, &keys, &values)?;
        let batch_err = |source| DatapathError::Map {
            map: name,
            source: MapError::SyscallError(source),
        };
        let mut done = 0;
        while done < removed.len() {
            match batch::<K, V>(BPF_MAP_DELETE_BATCH, fd, &removed[done..], None) {
                Ok(n) => done += n,
                // Removing an entry that is not there (never written) is not an error:
                // the call stopped at it, having removed `processed` before it.
                Err(BatchError {
                    processed,
                    source: e,
                }) if e.io_error.raw_os_error() == Some(libc::ENOENT) => done += processed + 1,
                Err(BatchError { source, .. }) => return Err(batch_err(source)),
            }
        }
        Ok(())
    }

    /// Writes `changes` (a segment and its new policy, or `None`: it is gone) into the
    /// array `SEGMENTS`, whose slot of a gone segment is zeroed, with one bpf(2) call.
    fn write_segments(
        &mut self,
        changes: impl Iterator<Item = (SegmentKey, Option<SegmentPolicy>)>,
    ) -> Result<(), DatapathError> {
        let (mut slots, mut values) = (Vec::new(), Vec::new());
        for (key, policy) in changes {
            let slot = key.slot().ok_or(DatapathError::Map {
                map: MAP_SEGMENTS,
                source: MapError::OutOfBounds {
                    index: u32::from(key.segment),
                    max_entries: MAX_SEGMENTS,
                },
            })?;
            slots.push(slot);
            values.push(policy.unwrap_or_default());
        }
        // Typed first: checks that the map holds SegmentPolicy values.
        self.array_mut::<SegmentPolicy>(MAP_SEGMENTS)?;
        let Some(Map::Array(map)) = self.ebpf.map(MAP_SEGMENTS) else {
            return Err(DatapathError::Missing(MAP_SEGMENTS));
        };
        update_batch(MAP_SEGMENTS, map.fd().as_fd().as_raw_fd(), &slots, &values)
    }

    /// Removes every entry of `generation`, whatever wrote it.
    fn clear_generation(&mut self, generation: u8) -> Result<(), DatapathError> {
        self.remove_keys_where::<AddrKey, Endpoint>(MAP_ENDPOINTS, |k| k.generation == generation)?;
        self.write_segments((0..MAX_SEGMENTS as u16).map(|segment| {
            let key = SegmentKey {
                generation,
                _pad: 0,
                segment,
            };
            (key, None)
        }))?;
        self.remove_keys_where::<PolicyKey, PolicyValue>(MAP_POLICY, |k| {
            k.generation == generation
        })?;
        self.remove_keys_where::<ZoneKey, ZoneIdentity>(MAP_ZONE_PREFIXES, |k| {
            k.generation == generation
        })?;
        self.set_zone_lengths(generation, &ZoneLengths::default())
    }

    /// Removes the entries of hash map `name` whose keys `doomed` picks: a walk over the
    /// keys, then one batch (a restarted daemon's first install clears a whole slot).
    fn remove_keys_where<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
        doomed: impl Fn(&K) -> bool,
    ) -> Result<(), DatapathError> {
        let keys: Vec<K> = self
            .hash::<K, V>(name)?
            .keys()
            .filter_map(Result::ok)
            .filter(|k| doomed(k))
            .collect();
        self.write_batch::<K, V>(name, keys.into_iter().map(|k| (k, None)))
    }

    fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        self.map_mut(name)
    }

    fn array_mut<V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<Array<&mut MapData, V>, DatapathError> {
        self.map_mut(name)
    }

    /// Map `name`, as the typed map `T` (which checks its kind and sizes).
    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing(name))?;
        T::try_from(map).map_err(map_err(name))
    }

    fn per_cpu_array<V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<&MapData, V>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        PerCpuArray::try_from(map).map_err(map_err(name))
    }

    fn set_zone_lengths(
        &mut self,
        generation: u8,
        lengths: &ZoneLengths,
    ) -> Result<(), DatapathError> {
        self.array_mut::<ZoneLengths>(MAP_ZONE_LENGTHS)?
            .set(u32::from(generation), lengths, 0)
            .map_err(map_err(MAP_ZONE_LENGTHS))
    }
}

/// Deletes tracked flows (SPEC §2 rule 3, §2.7); see [`Datapath::flow_cutter`].
pub struct FlowCutter {
    conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    fragments: HashMap<MapData, DatagramKey, DatagramEntry>,
}

impl FlowCutter {
    /// Deletes the tracked flows opened by or to one of `devices`, and those with an end
    /// at one of `addrs`; also such datagrams. Returns the number of flows.
    pub fn cut(&mut self, devices: &[u32], addrs: &[Addr]) -> usize {
        let involved = |device: u32, src: &Addr, dst: &Addr| {
            devices.contains(&device) || addrs.contains(src) || addrs.contains(dst)
        };
        remove_where(&mut self.fragments, |k, e| {
            involved(e.device, &k.src, &k.dst)
        });
        remove_where(&mut self.conntrack, |k, e| {
            involved(e.device, &k.src, &k.dst)
        })
    }
}

/// Removes the entries of `map` that `doomed` picks; how many it removed. Entries gone
/// already (expired, evicted) count as removed.
fn remove_where<T: std::borrow::BorrowMut<MapData>, K: Pod, V: Pod>(
    map: &mut HashMap<T, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
) -> usize {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| doomed(k, v))
        .map(|(k, _)| k)
        .collect();
    for key in &keys {
        let _ = map.remove(key);
    }
    keys.len()
}

/// Swaps a program into the link pinned at `path`, if there is one that still works.
/// `Ok(None)`: nothing to adopt (no pin, or a pin of a link whose interface is gone, which
/// is removed).
fn adopt<T>(
    path: Option<&Path>,
    attach: impl FnOnce(FdLink) -> Result<T, DatapathError>,
) -> Result<Option<T>, DatapathError> {
    let Some(path) = path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let stale = |source| DatapathError::Pin {
        path: path.into(),
        source,
    };
    match PinnedLink::from_pin(path) {
        Ok(pinned) => match attach(FdLink::from(pinned)) {
            Ok(id) => Ok(Some(id)),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "pinned link not adoptable; attaching anew");
                fs::remove_file(path).map_err(stale)?;
                Ok(None)
            }
        },
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "unreadable pinned link; attaching anew");
            fs::remove_file(path).map_err(stale)?;
            Ok(None)
        }
    }
}

/// The pin of an interface's link: `<hook>-<iface>`. bpffs refuses `.` in names, which
/// interface names may have (`eth0.100`), so `%` and `.` are percent-encoded.
fn link_pin_name(hook: &str, iface: &str) -> String {
    format!("{hook}-{}", pin_safe(iface))
}

fn pin_safe(name: &str) -> String {
    name.replace('%', "%25").replace('.', "%2e")
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    link.pin(path).map(drop).map_err(|e| DatapathError::Pin {
        path: path.into(),
        source: std::io::Error::other(e),
    })
}

/// The first epoch after `epoch` whose parity is `generation`: the programs read the live
/// generation off the epoch, so that one 4-byte load gives both, and no packet can pair the
/// new epoch with the old generation (a `CONFIG` update is a copy, not atomic). Never 0:
/// entries not yet checked have 0.
fn epoch_for(epoch: u32, generation: u8) -> u32 {
    let next = epoch.wrapping_add(1);
    let next = if next & 1 == u32::from(generation & 1) {
        next
    } else {
        next.wrapping_add(1)
    };
    // 0 is even: the next even epoch.
    if next == 0 {
        2
    } else {
        next
    }
}

/// The `DEVICE_IFACE_SLOTS` values for the device-facing interfaces `ifindexes`: each
/// slot holds the one that maps there, or 0 (ask `DEVICE_IFACES`) if several do.
fn device_iface_slots(ifindexes: &[u32]) -> Vec<u32> {
    let mut slots = vec![NO_DEVICE_IFACE; DEVICE_IFACE_SLOT_COUNT as usize];
    for &ifindex in ifindexes {
        let slot = &mut slots[device_iface_slot(ifindex) as usize];
        *slot = if *slot == NO_DEVICE_IFACE { ifindex } else { 0 };
    }
    slots
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Pinned maps in the layout of an earlier release, which the verifier would refuse for
/// this one's programs: taken over into the new layout, so that an upgrade keeps the live
/// generation and the tracked flows as a restart does.
mod legacy {
    use super::*;

    /// `Config` before its epoch.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct ConfigV1 {
        generation: u8,
        flags: u8,
        _pad: [u8; 2],
        timeout_tcp: u32,
        timeout_udp: u32,
        timeout_other: u32,
    }

    /// `FlowEntry` before epochs and opener entries.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct FlowEntryV1 {
        last_seen_ns: u64,
        device: u32,
        flags: u32,
    }

    // SAFETY: plain `repr(C)` data without padding, as the kernel stored it.
    unsafe impl Pod for ConfigV1 {}
    unsafe impl Pod for FlowEntryV1 {}

    /// The LPM trie that zones were before `ZONE_PREFIXES`: nothing to take over.
    const ZONES_V1: &str = "ZONES";

    /// What [`take`] read from the old pins.
    #[derive(Default)]
    pub(super) struct Legacy {
        config: Option<Config>,
        flows: Vec<(FlowKey, FlowEntry)>,
    }

    /// Reads the maps pinned in `dir` in an old layout, and unpins them (the load then
    /// creates them anew).
    pub(super) fn take(dir: &Path) -> Result<Legacy, DatapathError> {
        let mut legacy = Legacy::default();
        let config_pin = dir.join(MAP_CONFIG);
        if value_size(&config_pin) == Some(size_of::<ConfigV1>()) {
            let old: Array<MapData, ConfigV1> =
                Array::try_from(Map::Array(open(&config_pin)?)).map_err(map_err(MAP_CONFIG))?;
            let old = old.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
            legacy.config = Some(Config {
                generation: old.generation,
                flags: old.flags,
                _pad: [0; 2],
                timeout_tcp: old.timeout_tcp,
                timeout_udp: old.timeout_udp,
                timeout_other: old.timeout_other,
                epoch: epoch_for(0, old.generation),
            });
            unpin(&config_pin)?;
        }
        let flows_pin = dir.join(MAP_CONNTRACK);
        if value_size(&flows_pin) == Some(size_of::<FlowEntryV1>()) {
            let old: HashMap<MapData, FlowKey, FlowEntryV1> =
                HashMap::try_from(Map::LruHashMap(open(&flows_pin)?))
                    .map_err(map_err(MAP_CONNTRACK))?;
            // Not yet checked in any epoch: each flow's next packet is judged in full.
            legacy.flows = old
                .iter()
                .filter_map(Result::ok)
                .map(|(key, old)| {
                    let entry = FlowEntry {
                        last_seen_ns: old.last_seen_ns,
                        device: old.device,
                        flags: old.flags as u16,
                        ..FlowEntry::default()
                    };
                    (key, entry)
                })
                .collect();
            unpin(&flows_pin)?;
        }
        // SEGMENTS was a hash before it was an array. Nothing to take over: the daemon
        // installs its policy into both generations before its programs replace the old
        // ones, which keep the old map until then.
        let segments_pin = dir.join(MAP_SEGMENTS);
        let segments_type = aya::maps::MapInfo::from_pin(&segments_pin).map(|i| i.map_type());
        if let Ok(Ok(aya::maps::MapType::Hash)) = segments_type {
            unpin(&segments_pin)?;
        }
        let zones_pin = dir.join(ZONES_V1);
        if zones_pin.exists() {
            unpin(&zones_pin)?;
        }
        Ok(legacy)
    }

    impl Legacy {
        /// Writes what was taken into the new maps of `datapath`.
        pub(super) fn restore(self, datapath: &mut Datapath) -> Result<(), DatapathError> {
            if let Some(config) = self.config {
                tracing::info!("pinned CONFIG taken over from an earlier release's layout");
                datapath.config = config;
                datapath.write_config()?;
            }
            if !self.flows.is_empty() {
                tracing::info!(
                    flows = self.flows.len(),
                    "pinned CONNTRACK taken over from an earlier release's layout"
                );
                let mut flows = datapath.hash::<FlowKey, FlowEntry>(MAP_CONNTRACK)?;
                for (key, entry) in self.flows {
                    flows
                        .insert(key, entry, 0)
                        .map_err(map_err(MAP_CONNTRACK))?;
                }
            }
            Ok(())
        }
    }

    fn value_size(pin: &Path) -> Option<usize> {
        let info = aya::maps::MapInfo::from_pin(pin).ok()?;
        Some(info.value_size() as usize)
    }

    fn open(pin: &Path) -> Result<MapData, DatapathError> {
        MapData::from_pin(pin).map_err(|e| DatapathError::Pin {
            path: pin.to_path_buf(),
            source: std::io::Error::other(e),
        })
    }

    fn unpin(pin: &Path) -> Result<(), DatapathError> {
        fs::remove_file(pin).map_err(|source| DatapathError::Pin {
            path: pin.to_path_buf(),
            source,
        })
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// A batch call that failed after `processed` elements.
struct BatchError {
    processed: usize,
    source: aya::sys::SyscallError,
}

/// Writes `values` under `keys` into map `name` (descriptor `fd`), in as few bpf(2) calls
/// as the kernel takes.
fn update_batch<K: Pod, V: Pod>(
    name: &'static str,
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: &[V],
) -> Result<(), DatapathError> {
    let mut done = 0;
    while done < keys.len() {
        done += batch(
            BPF_MAP_UPDATE_BATCH,
            fd,
            &keys[done..],
            Some(&values[done..]),
        )
        .map_err(|e| DatapathError::Map {
            map: name,
            source: MapError::SyscallError(e.source),
        })?;
    }
    Ok(())
}

/// One BPF_MAP_UPDATE_BATCH (with `values`) or BPF_MAP_DELETE_BATCH of `keys` on the map
/// `fd`; how many elements it processed (the kernel may stop early, as for a signal).
fn batch<K: Pod, V: Pod>(
    cmd: libc::c_long,
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<usize, BatchError> {
    // bpf_attr's batch member: in_batch, out_batch, keys, values, count, map_fd,
    // elem_flags, flags.
    let mut attr = [0u64; 7];
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.map_or(0, |v| v.as_ptr() as u64);
    attr[4] = u64::from(keys.len() as u32) | (fd as u64) << 32;
    // SAFETY: `attr` is a valid bpf_attr prefix for the command; `keys` and `values` are
    // arrays of `count` plain-data keys and values of the map's sizes (checked by the typed
    // map the caller made), alive for the call; the kernel writes only `count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let processed = (attr[4] & u64::from(u32::MAX)) as usize;
    if r < 0 {
        return Err(BatchError {
            processed,
            source: aya::sys::SyscallError {
                call: "bpf_map_batch",
                io_error: std::io::Error::last_os_error(),
            },
        });
    }
    Ok(processed)
}

#[cfg(test)]
mod tests {
    use super::epoch_for;

    #[test]
    fn an_epoch_says_its_generation_and_is_never_0() {
        // (epoch now, generation next, the epoch after): an install flips the parity, a
        // change of settings keeps it; both wrap around past 0.
        let cases = [
            (2, 1, 3),
            (3, 1, 5),
            (3, 0, 4),
            (2, 0, 4),
            (u32::MAX, 0, 2),
            (u32::MAX, 1, 1),
            (u32::MAX - 1, 0, 2),
            (u32::MAX - 1, 1, u32::MAX),
            (0, 0, 2),
            (0, 1, 1),
        ];
        for (epoch, generation, expected) in cases {
            let next = epoch_for(epoch, generation);
            assert_eq!(
                next, expected,
                "after epoch {epoch}, for generation {generation}"
            );
            assert_eq!(next & 1, u32::from(generation), "the parity of {next}");
        }
    }
}
