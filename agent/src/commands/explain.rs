//! `segward explain DIR --from … --to … --port …`: the offline verdict for one new flow.

use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Policy directory.
    pub dir: PathBuf,
    /// Source: a device id or an address.
    #[arg(long)]
    pub from: String,
    /// Destination: a device id, an address, or `gateway`.
    #[arg(long)]
    pub to: String,
    /// `N/tcp`, `N/udp`, `N/sctp`, `icmp` or `icmpv6`.
    #[arg(long)]
    pub port: String,
    /// Judge the source as quarantined.
    #[arg(long)]
    pub quarantined: bool,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: ExplainArgs) -> ExitCode {
    eprintln!("segward explain: not implemented yet");
    ExitCode::from(2)
}
