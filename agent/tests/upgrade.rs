//! A gateway upgraded from the release before flow epochs: its pinned CONFIG and CONNTRACK
//! have the old value layouts, and its SEGMENTS is a hash, which this release's programs
//! would fail verification against. The new daemon takes them over: the live generation
//! and the tracked flows stay, and SEGMENTS is made anew (every install rewrites it).

mod common;

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use agent_ebpf::maps::{
    Config, FlowEntry, FlowKey, SegmentPolicy, FLOW_QUARANTINED, GENERATIONS, MAP_CONFIG,
    MAP_CONNTRACK, MAP_SEGMENTS, MAX_SEGMENTS, MAX_TRACKED_FLOWS,
};
use aya::maps::{Array, HashMap, Map, MapData};
use segward::datapath::Datapath;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// bpf(2) with `attr` (a bpf_attr prefix); the descriptor it returns, if any.
fn bpf(cmd: libc::c_long, attr: &[u8]) -> i64 {
    // SAFETY: `attr` is a bpf_attr prefix of its length; the pointers in it are alive.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    assert!(
        r >= 0,
        "bpf({cmd}) failed: {}",
        std::io::Error::last_os_error()
    );
    r
}

/// Creates a map and pins it at `path`; `entries` are written into it.
fn pin_old_map(
    path: &Path,
    map_type: u32,
    key: usize,
    value: usize,
    max: u32,
    entries: &[(&[u8], &[u8])],
) {
    let attr: Vec<u8> = [map_type, key as u32, value as u32, max, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    // SAFETY: BPF_MAP_CREATE returns a new descriptor.
    let map = unsafe { OwnedFd::from_raw_fd(bpf(BPF_MAP_CREATE, &attr) as i32) };
    for (k, v) in entries {
        assert_eq!((k.len(), v.len()), (key, value), "entry sizes");
        let mut attr = (map.as_raw_fd() as u64).to_ne_bytes().to_vec();
        for word in [k.as_ptr() as u64, v.as_ptr() as u64, 0] {
            attr.extend(word.to_ne_bytes());
        }
        bpf(BPF_MAP_UPDATE_ELEM, &attr);
    }
    let pathname = CString::new(path.as_os_str().as_bytes()).expect("a pin path");
    let mut attr = (pathname.as_ptr() as u64).to_ne_bytes().to_vec();
    attr.extend((map.as_raw_fd() as u64).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &attr);
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

#[test]
fn pins_of_the_release_before_flow_epochs_are_taken_over() {
    common::require_root();
    let dir = tempfile::Builder::new()
        .prefix("segward-upgrade-")
        .tempdir_in(segward::datapath::BPFFS)
        .expect("a directory on bpffs (cargo xtask setup mounts it)");
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).expect("maps directory");

    // CONFIG as it was: generation 1 live, audit on, timeouts 600/60/10.
    let old_config = [&[1u8, 1, 0, 0][..], &words(&[600, 60, 10])].concat();
    pin_old_map(
        &maps.join(MAP_CONFIG),
        BPF_MAP_TYPE_ARRAY,
        4,
        16,
        1,
        &[(&0u32.to_ne_bytes(), &old_config)],
    );
    // One tracked flow of device 7, opened under quarantine.
    let key = FlowKey::new([1; 16], [2; 16], 443, 40000, 6);
    // SAFETY: FlowKey is plain repr(C) data without uninitialised bytes (explicit padding).
    let key_bytes = unsafe {
        std::slice::from_raw_parts((&key as *const FlowKey).cast::<u8>(), size_of::<FlowKey>())
    };
    let old_entry = [&123_456_789u64.to_ne_bytes()[..], &words(&[7, 1])].concat();
    pin_old_map(
        &maps.join(MAP_CONNTRACK),
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<FlowKey>(),
        16,
        MAX_TRACKED_FLOWS,
        &[(key_bytes, &old_entry)],
    );
    // SEGMENTS as a hash: generation 1's segment 0, with some allow prefix.
    pin_old_map(
        &maps.join(MAP_SEGMENTS),
        BPF_MAP_TYPE_HASH,
        4,
        size_of::<SegmentPolicy>(),
        MAX_SEGMENTS * GENERATIONS,
        &[(&[1, 0, 0, 0], &words(&[1 << 16, 0, 0]))],
    );
    // The zones map from before ZONE_PREFIXES, which nothing uses any more.
    pin_old_map(&maps.join("ZONES"), BPF_MAP_TYPE_ARRAY, 4, 4, 1, &[]);

    let mut datapath = Datapath::load_pinned(dir.path())
        .unwrap_or_else(|e| panic!("the new release refused the old pins: {e}"));
    assert_eq!(datapath.flow_entries().expect("counting flows"), 1);
    drop(datapath);

    let config: Array<MapData, Config> = Array::try_from(Map::Array(
        MapData::from_pin(maps.join(MAP_CONFIG)).expect("the new CONFIG pin"),
    ))
    .expect("CONFIG in the new layout");
    let config = config.get(&0, 0).expect("CONFIG's entry");
    assert_eq!(
        (
            config.generation,
            config.flags,
            config.timeout_tcp,
            config.timeout_udp,
            config.timeout_other
        ),
        (1, 1, 600, 60, 10),
        "the live generation, flags and timeouts carry over"
    );
    assert_ne!(config.epoch, 0, "a taken-over CONFIG has an epoch");

    let flows: HashMap<MapData, FlowKey, FlowEntry> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(maps.join(MAP_CONNTRACK)).expect("the new CONNTRACK pin"),
    ))
    .expect("CONNTRACK in the new layout");
    let entry = flows.get(&key, 0).expect("the tracked flow carries over");
    assert_eq!(
        (entry.last_seen_ns, entry.device, entry.flags, entry.epoch),
        (123_456_789, 7, FLOW_QUARANTINED, 0),
        "the flow keeps its time, device and quarantine mark, and is checked anew"
    );
    assert!(!maps.join("ZONES").exists(), "the orphan zones pin is gone");
    let segments = aya::maps::MapInfo::from_pin(maps.join(MAP_SEGMENTS))
        .expect("the new SEGMENTS pin")
        .map_type()
        .expect("a known map type");
    assert!(
        matches!(segments, aya::maps::MapType::Array),
        "SEGMENTS is an array now, not {segments:?}"
    );
}
