//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | bench`.

mod demo_task;
mod setup;

// The demo's story and the lab it runs in, shared with the e2e tests (tests/e2e/demo.rs).
#[path = "../../tests/demo/mod.rs"]
mod demo;
#[path = "../../tests/lab/mod.rs"]
mod lab;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

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
    /// Set up, build segward, then play the smart-factory story in network namespaces
    /// with real traffic: telemetry allowed, a sensor denied, a scanning camera quarantined
    /// automatically and released. Cleans up after itself (also on Ctrl-C).
    Demo,
    /// Set up, then measure the datapath per packet, forwarding through a lab gateway
    /// against nftables and iptables, and the control plane at 100k devices; writes
    /// BENCHMARKS.md with the machine it ran on and which targets were met.
    Bench {
        /// Smaller sizes and repeats (under 2 minutes; `cargo xtask test` runs it so the
        /// benchmark keeps working). Writes target/BENCHMARKS-quick.md.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => {
            setup::setup()?;
            build_ebpf()
        }
        Task::Test => test(),
        Task::Demo => demo_task::demo(),
        Task::Bench { quick } => {
            setup::setup()?;
            bench(quick)
        }
    }
}

/// Runs the benchmark (benches/main.rs) in the release profile.
fn bench(quick: bool) -> Result<()> {
    let (what, out) = if quick {
        ("the benchmark, quick mode", "target/BENCHMARKS-quick.md")
    } else {
        ("the benchmark (a few minutes)", "BENCHMARKS.md")
    };
    step(what);
    // cargo runs a benchmark in its package's directory: name the file from the root.
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(out);
    let mut cmd = cargo();
    cmd.args([
        "bench",
        "--package",
        "segward",
        "--bench",
        "segward",
        "--",
        "--out",
    ])
    .arg(&out);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
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
    // One run: host unit tests, CLI tests, the loader fuzz test, the kernel tests
    // (BPF_PROG_TEST_RUN tables, differential) and the end-to-end tests. None share kernel
    // state: each loads its own programs and maps, each lab has its own namespaces and pins.
    step("all tests: unit, CLI, fuzz, kernel (BPF_PROG_TEST_RUN), end to end (netns + veth)");
    let (passed, failed) = run_tests(cargo().args(["test", "--workspace"]))?;
    // One total for the whole run, as the closing line (cargo's last line is that of the
    // last test binary, often the doc tests' "0 passed").
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    // The benchmark must keep working too; its numbers are for BENCHMARKS.md, not here.
    bench(true)
}

/// Runs a `cargo test` command, echoing its output and summing its "test result" lines.
fn run_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                result
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{cmd:?} failed with {status}");
    }
    Ok((passed, failed))
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
