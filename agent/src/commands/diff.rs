//! `segward diff OLD_DIR NEW_DIR`: which (source, destination, port) pairs gain or lose access.

use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    pub old: PathBuf,
    pub new: PathBuf,
    /// Print the changes as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: DiffArgs) -> ExitCode {
    eprintln!("segward diff: not implemented yet");
    ExitCode::from(2)
}
