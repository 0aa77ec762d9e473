//! `cargo xtask demo`: set up, build segward, then play the smart-factory story of
//! `tests/demo/` (in the lab of `tests/lab/`), cleaning up also on Ctrl-C.

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _},
    path::PathBuf,
    process::Stdio,
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::{cargo, demo, setup, step};

pub fn demo() -> Result<()> {
    setup::setup()?;
    step("building segward: cargo build -p segward (agent/build.rs builds the XDP object and embeds it)");
    let bin = build_segward()?;
    println!("    {}", bin.display());
    // The lab runs this binary (`segward_bin` in tests/lab/daemon.rs). Nothing else runs
    // yet: setting the environment is safe here.
    std::env::set_var("SEGWARD_BIN", &bin);
    stop_on_signals()?;

    step("the demo (under 20 s; Ctrl-C stops it and cleans up)");
    let terminal = std::io::stdout().is_terminal();
    let options = demo::Options {
        color: terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        // On a terminal, a moment to read each line; in CI, no waiting.
        pace: if terminal {
            Duration::from_millis(400)
        } else {
            Duration::ZERO
        },
    };
    match demo::run(&options) {
        Ok(summary) if summary.as_told() => Ok(()),
        Ok(summary) => bail!(
            "the demo did not go as told: {}",
            summary.surprises.join("; ")
        ),
        Err(demo::Interrupted) => std::process::exit(130),
    }
}

/// `cargo build -p segward`; the path of the binary it built (from cargo's JSON messages,
/// so that CARGO_TARGET_DIR and the like are followed).
fn build_segward() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "segward",
        "--bin",
        "segward",
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo build's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "segward" {
            if let Some(exe) = msg["executable"].as_str() {
                executable = Some(PathBuf::from(exe));
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    executable.context("cargo build named no segward executable")
}

extern "C" fn interrupted(_: libc::c_int) {
    // An atomic store is all a signal handler may do here; the demo checks it between steps.
    demo::INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the demo at its next step instead of killing
/// it, so that it deletes its namespaces and pins. A command of the lab that the terminal's
/// SIGINT killed as well makes the demo panic: that panic is not shown (the demo reports
/// the interruption instead).
fn stop_on_signals() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(interrupted),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handling {signal}"))?;
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !demo::INTERRUPTED.load(Ordering::SeqCst) {
            default_hook(info);
        }
    }));
    Ok(())
}
