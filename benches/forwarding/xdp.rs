//! Tiny XDP programs, loaded and attached with raw bpf(2) calls: the packet generator (run
//! with BPF_PROG_TEST_RUN in live-frames mode), the XDP floor, and map lookups alone (with
//! the maps they look up). Also GRO on a veth, which makes it take redirected frames
//! without an XDP program of its own.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_PSEUDO_MAP_FD: u8 = 1;
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// One eBPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | src << 4) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

const EXIT: u64 = 0x95;

fn mov_r0(imm: i32) -> u64 {
    insn(0xb7, 0, 0, 0, imm)
}

/// The generator: writes `frame` over the packet (every time: the gateway rewrites
/// forwarded frames in place, and live-frames mode recycles their pages unreset), then
/// redirects it out of `ifindex`, or drops it without one.
pub fn generator(frame: &[u8], ifindex: Option<u32>) -> Vec<u64> {
    assert!(frame.len().is_multiple_of(4), "frames are written in words");
    let tail = match ifindex {
        Some(ifindex) => vec![
            insn(0xb7, 1, 0, 0, ifindex as i32),    // r1 = ifindex
            insn(0xb7, 2, 0, 0, 0),                 // r2 = flags
            insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT), // r0 = bpf_redirect(r1, r2)
            EXIT,
        ],
        None => vec![mov_r0(XDP_DROP), EXIT],
    };
    let words = frame.len() / 4;
    let mut prog = vec![
        insn(0x61, 2, 1, 0, 0),                           // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),                           // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                           // r4 = r2
        insn(0x07, 4, 0, 0, frame.len() as i32),          // r4 += length
        insn(0x2d, 4, 3, (words + tail.len()) as i16, 0), // if r4 > r3: drop
    ];
    for (k, word) in frame.chunks(4).enumerate() {
        let word = i32::from_le_bytes(word.try_into().expect("4 bytes"));
        prog.push(insn(0x62, 2, 0, (4 * k) as i16, word)); // *(u32 *)(r2 + 4k) = word
    }
    prog.extend(tail);
    prog.extend([mov_r0(XDP_DROP), EXIT]);
    prog
}

/// The floor: drops UDP frames to `port` (read at the offset of an untagged, option-less
/// IPv4/UDP frame), passes everything else. A bounds check and one load, no maps.
pub fn floor(port: u16) -> Vec<u64> {
    // The port as a little-endian load of its network-order bytes yields it.
    let port = i32::from(u16::from_le_bytes(port.to_be_bytes()));
    vec![
        insn(0x61, 2, 1, 0, 0),    // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),    // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),    // r4 = r2
        insn(0x07, 4, 0, 0, 38),   // r4 += 38 (Ethernet, IPv4, UDP ports)
        insn(0x2d, 4, 3, 2, 0),    // if r4 > r3: pass
        insn(0x69, 5, 2, 36, 0),   // r5 = UDP destination port
        insn(0x15, 5, 0, 2, port), // if r5 == port: drop
        mov_r0(XDP_PASS),
        EXIT,
        mov_r0(XDP_DROP),
        EXIT,
    ]
}

fn bpf_call(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr prefix of its length, alive for the call, and what it
    // points at is kept alive by the caller for the call too.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// A bpf(2) command that returns a new descriptor.
fn bpf(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = bpf_call(cmd, attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map of `map_type` (`BPF_MAP_TYPE_*`) for `max_entries` entries.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd> {
    let attr: Vec<u8> = [map_type, key_size, value_size, max_entries, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    bpf(BPF_MAP_CREATE, &attr).with_context(|| format!("creating a map of type {map_type}"))
}

/// Writes `value` under `key` in `map`.
pub fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let attr = words(&[
        map.as_raw_fd() as u64,
        key.as_ptr() as u64,
        value.as_ptr() as u64,
        0,
    ]);
    bpf_call(BPF_MAP_UPDATE_ELEM, &attr).context("writing a map entry")?;
    Ok(())
}

/// Looks `key` up in `map` `times` times, then passes: what a lookup costs, over the
/// floor. The lookups are as the verifier makes segward's (inlined for hash maps, a call
/// into the map's lookup).
pub fn lookups(map: &OwnedFd, key: &[u8], times: usize) -> Vec<u64> {
    assert!(key.len().is_multiple_of(4), "keys are written in words");
    let len = key.len() as i16;
    let mut prog: Vec<u64> = key
        .chunks(4)
        .enumerate()
        .map(|(k, word)| {
            let word = i32::from_le_bytes(word.try_into().expect("4 bytes"));
            insn(0x62, 10, 0, 4 * k as i16 - len, word) // *(u32 *)(r10 - len + 4k) = word
        })
        .collect();
    for _ in 0..times {
        prog.extend([
            insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()), // r1 = map
            0,
            insn(0xbf, 2, 10, 0, 0),                       // r2 = r10
            insn(0x07, 2, 0, 0, -i32::from(len)),          // r2 -= len
            insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = lookup(r1, r2)
        ]);
    }
    prog.extend([mov_r0(XDP_PASS), EXIT]);
    prog
}

fn words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// Loads an XDP program.
pub fn load(insns: &[u64]) -> Result<OwnedFd> {
    load_typed(BPF_PROG_TYPE_XDP, insns)
}

/// Loads a program of type `prog_type` (`BPF_PROG_TYPE_*`).
pub fn load_typed(prog_type: u32, insns: &[u64]) -> Result<OwnedFd> {
    let license = c"GPL";
    let attr = words(&[
        u64::from(prog_type) | (insns.len() as u64) << 32,
        insns.as_ptr() as u64,
        license.as_ptr() as u64,
    ]);
    bpf(BPF_PROG_LOAD, &attr).with_context(|| format!("loading a program of type {prog_type}"))
}

/// A program that only returns `verdict`: two instructions.
pub fn constant(verdict: i32) -> Vec<u64> {
    vec![mov_r0(verdict), EXIT]
}

/// The index of `iface` in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// Attaches `prog` to `iface` of the calling thread's network namespace (native mode);
/// it stays attached while the returned link lives.
pub fn attach(prog: &OwnedFd, iface: &str) -> Result<OwnedFd> {
    let attr = words(&[
        u64::from(prog.as_raw_fd() as u32) | u64::from(ifindex(iface)?) << 32,
        u64::from(BPF_XDP),
    ]);
    bpf(BPF_LINK_CREATE, &attr).with_context(|| format!("attaching an XDP program to {iface}"))
}

/// Runs the generator `prog` on `frame` `count` times in live-frames mode, on `cpu`, from
/// the calling thread (whose network namespace the redirect resolves in). Returns the
/// thread's CPU time in ns, which includes the softirq work the frames cause on its CPU,
/// and the wall time.
pub fn generate(prog: &OwnedFd, frame: &[u8], count: u64, cpu: usize) -> Result<(u64, Duration)> {
    let repeat = u32::try_from(count).context("too many packets for one generator run")?;
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu < 1024.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pins the calling thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        bail!(
            "pinning the generator to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    // The highest priority, so that other jobs on a shared machine interrupt a run as
    // little as possible (the thread ends with the run).
    // SAFETY: gettid and setpriority on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -20) } != 0 {
        bail!(
            "raising the generator's priority: {}",
            std::io::Error::last_os_error()
        );
    }
    let attr = words(&[
        u64::from(prog.as_raw_fd() as u32),
        frame.len() as u64, // data_size_in, data_size_out
        frame.as_ptr() as u64,
        0, // data_out
        u64::from(repeat),
        0, // ctx sizes
        0, // ctx_in
        0, // ctx_out
        BPF_F_TEST_XDP_LIVE_FRAMES,
        0, // batch_size: the kernel's default
    ]);
    let cpu_time = || {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let (cpu_before, started) = (cpu_time(), Instant::now());
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_PROG_TEST_RUN; `frame` outlives
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_ptr(), attr.len()) };
    let (cpu_after, wall) = (cpu_time(), started.elapsed());
    if r < 0 {
        bail!("running the generator: {}", std::io::Error::last_os_error());
    }
    Ok((cpu_after - cpu_before, wall))
}

/// Turns GRO on for `iface` of the calling thread's network namespace (the ethtool
/// ioctl): a veth with GRO polls its queue like a NIC driver, so it accepts frames that an
/// XDP program redirects into its peer and builds their skbs itself.
pub fn enable_gro(iface: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _rest: [u8; 16],
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_SGRO,
        data: 1,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _rest: [0; 16],
    };
    if iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} is too long");
    }
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a plain datagram socket, owned at once.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        bail!(
            "socket for the ethtool ioctl: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel just gave us this descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    // SAFETY: `req` and `value` are valid for the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        bail!(
            "turning GRO on for {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
