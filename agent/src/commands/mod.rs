//! The commands: each module owns its arguments and output. `check`, `explain` and `diff`
//! work offline; `run` is the daemon; `control` holds the commands that talk to it.

pub mod check;
pub mod control;
pub mod diff;
pub mod explain;
pub mod run;

use std::io::{self, Write as _};

/// Writes `text` to stdout; `false` if it could not be. A reader that has gone away
/// (`segward diff … | head`) just ends the output, where `println!` would panic.
pub(crate) fn write_stdout(text: &str) -> bool {
    match io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("segward: cannot write the output: {e}");
            false
        }
    }
}
