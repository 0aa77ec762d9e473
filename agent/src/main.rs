use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use segward::{
    commands,
    daemon::{self, RunOptions},
    datapath,
    policy::load::LoadError,
};

/// Zero-trust micro-segmentation for Linux IoT gateways.
#[derive(Parser)]
#[command(name = "segward", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load the policy, attach to the interfaces, enforce.
    Run {
        /// Directory of segment files.
        #[arg(long)]
        policy: PathBuf,
        /// Device-facing interface (repeat for several).
        #[arg(long = "device-iface", required = true)]
        device_ifaces: Vec<String>,
        /// Let would-be drops pass and count them (whole agent).
        #[arg(long)]
        audit: bool,
        /// Work on the interfaces of this named network namespace (`ip netns`).
        #[arg(long)]
        netns: Option<String>,
        /// Remove programs, links and maps on exit; by default they stay pinned and go on
        /// enforcing until a restarted daemon adopts them.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove the pinned programs, links and maps of a stopped daemon.
    Uninstall {
        /// The network namespace the daemon worked on (`--netns` of `segward run`).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Validate and lint a policy directory.
    Check(commands::check::CheckArgs),
    /// The offline verdict for one new flow, and the rule that decides it.
    Explain(commands::explain::ExplainArgs),
    /// Which (source, destination, port) pairs gain or lose access between two policies.
    Diff(commands::diff::DiffArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            policy,
            device_ifaces,
            audit,
            netns,
            detach_on_exit,
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let opts = RunOptions {
                policy_dir: policy,
                device_ifaces,
                audit,
                netns,
                detach_on_exit,
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("segward: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(daemon::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("segward: {e:#}");
                    if e.downcast_ref::<LoadError>().is_some() {
                        ExitCode::from(2)
                    } else {
                        ExitCode::from(1)
                    }
                }
            }
        }
        Command::Uninstall { netns } => {
            let dir = datapath::pin_dir(daemon::instance_name(netns.as_deref()));
            match datapath::uninstall(&dir) {
                Ok(true) => {
                    println!("removed {}", dir.display());
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("nothing pinned at {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("segward: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check(args) => commands::check::run(args),
        Command::Explain(args) => commands::explain::run(args),
        Command::Diff(args) => commands::diff::run(args),
    }
}
