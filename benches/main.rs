//! `cargo xtask bench`: what segward costs per packet and per control-plane operation, at
//! scale, against the targets of issue 7; writes BENCHMARKS.md.
//!
//! Sections, each in its own module:
//! 1. [`datapath_cost`]: BPF_PROG_TEST_RUN per packet class and policy scale, against a
//!    trivial XDP_PASS program;
//! 2. [`forwarding`]: real traffic through the lab's gateway namespace, segward against no
//!    filtering, nftables sets and linear iptables rules;
//! 3. [`control_plane`]: loading, reloading, identity changes and quarantines with the real
//!    daemon at 100k devices.
//!
//! `--quick` runs every section at reduced sizes and repeats (CI runs it so the benchmark
//! cannot rot); `--out FILE` says where the report goes.

mod control_plane;
mod datapath_cost;
mod forwarding;
mod report;
mod scale;

// Frames as the datapath tests build them.
#[path = "../agent/tests/common/mod.rs"]
mod frames;
#[path = "../tests/lab/mod.rs"]
mod lab;

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context as _, Result};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub quick: bool,
}

type SectionFn = fn(&Options) -> Result<report::Section>;

fn main() -> Result<()> {
    let mut options = Options { quick: false };
    let mut out = PathBuf::from("BENCHMARKS.md");
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--out" => out = args.next().context("--out needs a file")?.into(),
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            section if !section.starts_with('-') => only.push(section.to_owned()),
            other => bail!("unknown argument {other:?} (known: --quick, --out FILE, SECTION…)"),
        }
    }
    lab::require_root();
    let sections: [(&str, SectionFn); 3] = [
        ("datapath", datapath_cost::run),
        ("forwarding", forwarding::run),
        ("control-plane", control_plane::run),
    ];
    let started = Instant::now();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (name, run) in sections {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        println!("==> bench: {name}");
        let t = Instant::now();
        match run(&options) {
            Ok(section) => {
                for target in &section.targets {
                    println!(
                        "    {} {}: {} (target {})",
                        if target.met { "met   " } else { "MISSED" },
                        target.what,
                        target.measured,
                        target.target
                    );
                }
                done.push(section);
            }
            Err(e) => {
                println!("    FAILED: {e:#}");
                failed.push(name);
            }
        }
        println!("    ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let text = report::markdown(&done, options.quick, started.elapsed().as_secs_f64());
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("==> report written to {}", out.display());
    if !failed.is_empty() {
        bail!("benchmark sections failed: {}", failed.join(", "));
    }
    Ok(())
}
