//! The kernel half, from the agent's side: load the embedded XDP program, attach it, and
//! install compiled policies into its maps one whole generation at a time.

use agent_ebpf::{
    maps::{
        AddrKey, Config, Endpoint, PolicyKey, PolicyValue, SegmentKey, SegmentPolicy, ZoneIdentity,
        CONFIG_AUDIT, MAP_CONFIG, MAP_COUNTERS, MAP_DEVICE_IFACES, MAP_ENDPOINTS, MAP_POLICY,
        MAP_SEGMENTS, MAP_ZONES, PROG_FROM_DEVICE, PROG_TO_DEVICE,
    },
    verdict::{Reason, REASON_COUNT},
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfError, Pod,
};

use crate::{
    netns::{Netns, NetnsError},
    policy::compile::CompiledPolicy,
};

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
}

/// Per-reason packet counts, summed over CPUs: `[reason] = (enforced, audited)`.
pub type Counters = Vec<(Reason, u64, u64)>;

pub struct Datapath {
    ebpf: Ebpf,
    config: Config,
    live: Option<CompiledPolicy>,
}

impl Datapath {
    /// Loads the programs into the kernel (the verifier runs here).
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
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
        Ok(Datapath {
            ebpf,
            config: Config::default(),
            live: None,
        })
    }

    /// Attaches to a device-facing interface of `netns`: XDP ingress judges what devices
    /// send, tc egress what is sent to them.
    pub fn attach_device_iface(&mut self, netns: &Netns, iface: &str) -> Result<(), DatapathError> {
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
        let mut ifaces: HashMap<&mut MapData, u32, u32> = self.hash(MAP_DEVICE_IFACES)?;
        ifaces
            .insert(ifindex, 1, 0)
            .map_err(map_err(MAP_DEVICE_IFACES))?;

        let from_device: &mut Xdp = self
            .ebpf
            .program_mut(PROG_FROM_DEVICE)
            .ok_or(DatapathError::Missing(PROG_FROM_DEVICE))?
            .try_into()?;
        netns
            .run(|| {
                // Native mode where the driver has it (veth does), else generic.
                from_device
                    .attach_to_if_index(ifindex, XdpMode::Driver)
                    .or_else(|_| from_device.attach_to_if_index(ifindex, XdpMode::Skb))
                    .map(drop)
            })?
            .map_err(attach_err)?;
        let to_device: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_TO_DEVICE)
            .ok_or(DatapathError::Missing(PROG_TO_DEVICE))?
            .try_into()?;
        netns
            .run(|| to_device.attach(iface, TcAttachType::Egress).map(drop))?
            .map_err(attach_err)
    }

    /// Whole-agent audit mode (SPEC §2.6).
    pub fn set_audit(&mut self, audit: bool) -> Result<(), DatapathError> {
        self.config.flags = if audit { CONFIG_AUDIT } else { 0 };
        self.write_config()
    }

    /// Installs `policy` atomically: writes it into the idle generation, flips the live
    /// generation in one store, then removes the old generation's entries.
    pub fn install(&mut self, policy: CompiledPolicy) -> Result<(), DatapathError> {
        let next = (self.config.generation ^ 1) & 1;
        if self.live.is_none() {
            // First install after load: nothing may be left in the idle slot.
            self.clear_generation(next)?;
        }
        self.write_generation(&policy, next)?;
        let old = self.config.generation;
        self.config.generation = next;
        self.write_config()?;
        if let Some(previous) = self.live.replace(policy) {
            self.remove_generation(&previous, old)?;
        }
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let map = self
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or(DatapathError::Missing(MAP_COUNTERS))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(MAP_COUNTERS))?;
        let sum = |index: u32| -> Result<u64, DatapathError> {
            Ok(counters
                .get(&index, 0)
                .map_err(map_err(MAP_COUNTERS))?
                .iter()
                .sum())
        };
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, sum(r as u32)?, sum(r as u32 + REASON_COUNT)?)))
            .collect()
    }

    fn write_config(&mut self) -> Result<(), DatapathError> {
        let mut config: Array<&mut MapData, Config> = Array::try_from(
            self.ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(DatapathError::Missing(MAP_CONFIG))?,
        )
        .map_err(map_err(MAP_CONFIG))?;
        config.set(0, self.config, 0).map_err(map_err(MAP_CONFIG))
    }

    fn write_generation(
        &mut self,
        p: &CompiledPolicy,
        generation: u8,
    ) -> Result<(), DatapathError> {
        let mut endpoints = self.hash::<AddrKey, Endpoint>(MAP_ENDPOINTS)?;
        for (k, v) in &p.endpoints {
            let k = AddrKey { generation, ..*k };
            endpoints.insert(k, v, 0).map_err(map_err(MAP_ENDPOINTS))?;
        }
        let mut segments = self.hash::<SegmentKey, SegmentPolicy>(MAP_SEGMENTS)?;
        for (k, v) in &p.segments {
            let k = SegmentKey { generation, ..*k };
            segments.insert(k, v, 0).map_err(map_err(MAP_SEGMENTS))?;
        }
        let mut policy = self.hash::<PolicyKey, PolicyValue>(MAP_POLICY)?;
        for (k, v) in &p.policy {
            let k = PolicyKey { generation, ..*k };
            policy.insert(k, v, 0).map_err(map_err(MAP_POLICY))?;
        }
        let mut zones = self.zones()?;
        for ((bits, k), v) in &p.zones {
            let k = Key::new(*bits, AddrKey { generation, ..*k });
            zones.insert(&k, v, 0).map_err(map_err(MAP_ZONES))?;
        }
        Ok(())
    }

    fn remove_generation(
        &mut self,
        p: &CompiledPolicy,
        generation: u8,
    ) -> Result<(), DatapathError> {
        // Entries are removed by key; a missing one (never written) is not an error.
        let mut endpoints = self.hash::<AddrKey, Endpoint>(MAP_ENDPOINTS)?;
        for k in p.endpoints.keys() {
            let _ = endpoints.remove(&AddrKey { generation, ..*k });
        }
        let mut segments = self.hash::<SegmentKey, SegmentPolicy>(MAP_SEGMENTS)?;
        for k in p.segments.keys() {
            let _ = segments.remove(&SegmentKey { generation, ..*k });
        }
        let mut policy = self.hash::<PolicyKey, PolicyValue>(MAP_POLICY)?;
        for k in p.policy.keys() {
            let _ = policy.remove(&PolicyKey { generation, ..*k });
        }
        let mut zones = self.zones()?;
        for (bits, k) in p.zones.keys() {
            let _ = zones.remove(&Key::new(*bits, AddrKey { generation, ..*k }));
        }
        Ok(())
    }

    /// Removes every entry of `generation`, whatever wrote it.
    fn clear_generation(&mut self, generation: u8) -> Result<(), DatapathError> {
        fn clear<K: Pod, V: Pod>(
            map: &mut HashMap<&mut MapData, K, V>,
            name: &'static str,
            in_generation: impl Fn(&K) -> bool,
        ) -> Result<(), DatapathError> {
            let stale: Vec<K> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| in_generation(k))
                .collect();
            for k in stale {
                map.remove(&k).map_err(map_err(name))?;
            }
            Ok(())
        }
        clear(
            &mut self.hash::<AddrKey, Endpoint>(MAP_ENDPOINTS)?,
            MAP_ENDPOINTS,
            |k| k.generation == generation,
        )?;
        clear(
            &mut self.hash::<SegmentKey, SegmentPolicy>(MAP_SEGMENTS)?,
            MAP_SEGMENTS,
            |k| k.generation == generation,
        )?;
        clear(
            &mut self.hash::<PolicyKey, PolicyValue>(MAP_POLICY)?,
            MAP_POLICY,
            |k| k.generation == generation,
        )?;
        let mut zones = self.zones()?;
        let stale: Vec<Key<AddrKey>> = zones
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in stale {
            zones.remove(&k).map_err(map_err(MAP_ZONES))?;
        }
        Ok(())
    }

    fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing(name))?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    fn zones(&mut self) -> Result<LpmTrie<&mut MapData, AddrKey, ZoneIdentity>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(MAP_ZONES)
            .ok_or(DatapathError::Missing(MAP_ZONES))?;
        LpmTrie::try_from(map).map_err(map_err(MAP_ZONES))
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}
