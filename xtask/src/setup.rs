//! `cargo xtask setup`: make a fresh machine able to build and test segward. Idempotent;
//! says what it checks and what it does; fails with the fix where it cannot act.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run, step};

/// bpf-linker release whose LLVM feature flags match the nightly we build with.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    step("checking for root");
    if !is_root() {
        bail!(
            "segward's setup and tests need root (apt-get, bpffs, BPF programs, network \
             namespaces). Run as root, e.g. `sudo -E cargo xtask setup`"
        );
    }
    if which("apt-get").is_none() {
        bail!(
            "this is not a Debian-like system (no apt-get). Install by hand: rust-src for the \
             nightly toolchain, LLVM dev packages matching `rustc +nightly -vV`, bpf-linker \
             {BPF_LINKER_VERSION} built against them, iproute2, and mount bpffs on /sys/fs/bpf"
        );
    }

    step("checking the nightly toolchain");
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("no nightly toolchain: install it with `rustup toolchain install nightly`")?;
    let llvm = llvm_major(&version)?;
    println!("    nightly uses LLVM {llvm}");

    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("    rust-src: present");
    } else {
        step("installing rust-src for nightly (build-std needs it)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // iproute2 for the lab; nftables and iptables for the forwarding benchmark, which
    // compares segward with them.
    let mut packages: Vec<String> = ["iproute2", "libzstd-dev", "nftables", "iptables"]
        .map(String::from)
        .to_vec();
    packages.extend([format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")]);
    let missing: Vec<&String> = packages.iter().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("    Debian packages: all present ({})", packages.join(" "));
    } else {
        step(&format!("installing Debian packages: {}", join(&missing)));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let feature = format!("llvm-{llvm}");
    if bpf_linker_installed(&feature) {
        println!("    bpf-linker {BPF_LINKER_VERSION} ({feature}): present");
    } else {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
        ));
        run(cargo()
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")))?;
    }

    step("checking bpffs on /sys/fs/bpf");
    if bpffs_mounted()? {
        println!("    bpffs: mounted");
    } else {
        println!("    mounting bpffs on /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    println!("setup: done");
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "LLVM version: 22.1.4" → 22.
fn llvm_major(rustc_vv: &str) -> Result<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("`rustc +nightly -vV` names no LLVM version")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// cargo records each installed crate's features in ~/.cargo/.crates2.json; a bpf-linker
/// built for another LLVM must be rebuilt, not reused.
fn bpf_linker_installed(feature: &str) -> bool {
    let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    else {
        return false;
    };
    if !home.join("bin/bpf-linker").is_file() {
        return false;
    }
    let Ok(installs) = fs::read_to_string(home.join(".crates2.json")) else {
        return false;
    };
    let prefix = format!("\"bpf-linker {BPF_LINKER_VERSION} ");
    installs
        .split("},")
        .any(|entry| entry.contains(&prefix) && entry.contains(&format!("\"{feature}\"")))
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some("/sys/fs/bpf") && fstype == Some("bpf")
    }))
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}
