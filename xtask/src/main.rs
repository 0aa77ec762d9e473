//! Project tasks: `cargo xtask setup | build-ebpf | test | demo`.

mod setup;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (toolchain parts, LLVM, bpf-linker, bpffs).
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/segward-xdp).
    BuildEbpf,
    /// Set up, build, then run every test: host unit tests and the privileged kernel and
    /// end-to-end tests.
    Test,
    /// The virtual smart-factory lab.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => {
            setup::setup()?;
            build_ebpf()
        }
        Task::Test => test(),
        Task::Demo => {
            println!(
                "cargo xtask demo: not yet — the virtual lab lands with the operability work."
            );
            Ok(())
        }
    }
}

fn build_ebpf() -> Result<()> {
    step("building the eBPF object");
    run(cargo()
        .args([
            "+nightly",
            "build",
            "--package",
            "agent-ebpf",
            "--bin",
            "segward-xdp",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        // The host's flags (e.g. from a wrapper) must not leak into the BPF build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    println!("    target/bpfel-unknown-none/release/segward-xdp");
    Ok(())
}

fn test() -> Result<()> {
    setup::setup()?;
    step("building segward (the XDP object is built and embedded by agent/build.rs)");
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    step("host unit tests");
    run(cargo().args(["test", "--workspace", "--lib", "--bins"]))?;
    step("end-to-end tests: network namespaces, veth, the real segward binary");
    run(cargo().args(["test", "--package", "segward", "--test", "e2e"]))?;
    println!("xtask test: all passed");
    Ok(())
}

/// `cargo` without rustup's toolchain override, so `+nightly` works in nested calls.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

pub(crate) fn step(what: &str) {
    println!("==> {what}");
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
