//! `segward check DIR [--strict] [--json]`: validate and lint a policy directory.

use std::{path::PathBuf, process::ExitCode};

use crate::policy::load::{load_dir, LoadError};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy directory (searched recursively for *.yaml / *.yml).
    pub dir: PathBuf,
    /// Make warnings fail.
    #[arg(long)]
    pub strict: bool,
    /// Print the diagnostics as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CheckArgs) -> ExitCode {
    match load_dir(&args.dir) {
        Ok(_) => ExitCode::SUCCESS,
        Err(LoadError::Invalid(diagnostics)) => {
            for d in diagnostics {
                println!("{d}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("segward: {e}");
            ExitCode::from(2)
        }
    }
}
