use std::process::ExitCode;

use clap::{Parser, Subcommand};
use segward::{commands, daemon, datapath};

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
    Run(commands::run::RunArgs),
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
    /// Daemon state: policy generation, interfaces, mode, counts.
    Status(commands::control::StatusArgs),
    /// Devices with their addresses, segment and state; --unknown: sources that no device owns.
    Devices(commands::control::DevicesArgs),
    /// Quarantine a device by hand.
    Quarantine(commands::control::QuarantineArgs),
    /// End a device's quarantine.
    Release(commands::control::ReleaseArgs),
    /// Bind an address to a device (for an external identity system).
    Bind(commands::control::BindArgs),
    /// Take a bound address away from a device.
    Unbind(commands::control::UnbindArgs),
    /// Reload the policy directory now.
    Reload(commands::control::ReloadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => commands::run::run(args),
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
        Command::Status(args) => commands::control::status(args),
        Command::Devices(args) => commands::control::devices(args),
        Command::Quarantine(args) => commands::control::quarantine(args),
        Command::Release(args) => commands::control::release(args),
        Command::Bind(args) => commands::control::bind(args),
        Command::Unbind(args) => commands::control::unbind(args),
        Command::Reload(args) => commands::control::reload(args),
    }
}
