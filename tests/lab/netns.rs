//! Low-level network-namespace plumbing: `ip` invocations, running code inside a
//! namespace (a thread that `setns()`-es into `/run/netns/<name>`), sysctls, and the
//! reaping of namespaces that crashed earlier runs left behind.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::sync::{Mutex, Once};
use std::thread::JoinHandle;

use nix::sched::CloneFlags;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Every namespace a lab creates is named `sw<pid>x<counter>-<role>`.
pub const NAME_PREFIX: &str = "sw";

/// Serialises `ip netns add/del` within this process: the first `ip netns add` of a
/// machine turns /run/netns into a shared mount, and two racing first calls could stack
/// two mounts on it.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Runs `ip ARGS...`; Err carries the command line and ip's stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        format!(
            "cannot run `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip netns exec NS ARGS...`, output captured.
pub fn exec(ns: &str, args: &[&str]) -> Output {
    assert!(!args.is_empty(), "exec: empty command");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip netns exec {ns} {}`: {e}", args.join(" ")))
}

pub fn add(ns: &str) -> Result<(), String> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ip(&["netns", "add", ns])
}

/// Deletes a namespace (its veths go with it once nothing holds it any more). Processes
/// that still live in it (something a test started there and leaked) are killed first,
/// by pid, so that the namespace and its interfaces really disappear.
pub fn del(ns: &str) -> Result<(), String> {
    kill_processes_in(ns);
    remove_pins(ns)?;
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return Ok(());
    }
    ip(&["netns", "del", ns])
}

/// A segward daemon run with `--netns NS` pins its programs, links and maps in
/// /sys/fs/bpf/segward/NS, where they outlive it on purpose; the namespace's owner removes
/// them with the namespace.
fn remove_pins(ns: &str) -> Result<(), String> {
    let dir = Path::new("/sys/fs/bpf/segward").join(ns);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove pins {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn kill_processes_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != me && p > 1)
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// True if a namespace of that name exists.
pub fn exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// All namespace names under /run/netns.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// `sw<pid>x<counter>-...` -> pid. None for any other name, so that we never touch
/// namespaces that are not ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, role) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) || role.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Deletes our own namespaces left behind by processes that no longer exist, and — once
/// per process, before this process has created any — those that carry our own pid
/// (left by an earlier process that had the same pid).
pub fn reap_stale() {
    static OWN_PID_ONCE: Once = Once::new();
    let me = std::process::id();
    OWN_PID_ONCE.call_once(|| reap(|pid| pid == me));
    reap(|pid| pid != me && !Path::new(&format!("/proc/{pid}")).exists());
}

fn reap(doomed: impl Fn(u32) -> bool) {
    for name in list() {
        if owner_pid(&name).is_some_and(&doomed) {
            if let Err(e) = del(&name) {
                eprintln!("lab: could not delete stale namespace {name}: {e}");
            }
        }
    }
}

fn enter(ns: &str) -> Result<(), String> {
    let path = Path::new(NETNS_DIR).join(ns);
    let fd = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns({}) failed: {e}", path.display()))
}

/// Runs `f` on a fresh thread that lives in network namespace `ns` and returns its
/// result; a panic in `f` is propagated to the caller. Sockets created by `f` stay in
/// `ns` even when they are used from other threads afterwards.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns:{ns}"))
            .spawn_scoped(s, move || {
                enter(ns).unwrap_or_else(|e| panic!("{e}"));
                f()
            })
            .expect("cannot spawn a thread");
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Starts a long-lived thread in namespace `ns`. `setup` runs first (in the namespace) and
/// its result is handed back to the caller; if it fails, the thread ends and the error is
/// returned. Otherwise `body(state)` runs on in the background.
pub fn spawn_in<S, R, B>(
    ns: &str,
    name: &str,
    setup: impl FnOnce() -> Result<(S, R), String> + Send + 'static,
    body: B,
) -> Result<(R, JoinHandle<()>), String>
where
    S: 'static,
    R: Send + 'static,
    B: FnOnce(S) + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let ns_owned = ns.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("{name}@{ns}"))
        .spawn(move || {
            let state = match enter(&ns_owned).and_then(|()| setup()) {
                Ok((state, reply)) => {
                    let _ = tx.send(Ok(reply));
                    state
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            body(state)
        })
        .map_err(|e| format!("cannot spawn a thread: {e}"))?;
    match rx.recv() {
        Ok(Ok(reply)) => Ok((reply, handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => Err(format!("{name}: thread ended before it was ready")),
        },
    }
}

/// Writes a sysctl of the namespace the calling thread is in (`/proc/sys/net` shows the
/// caller's network namespace). Key in dotted form, e.g. `net.ipv4.conf.all.rp_filter`.
pub fn sysctl(key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| format!("sysctl {key}={value}: {e}"))
}
