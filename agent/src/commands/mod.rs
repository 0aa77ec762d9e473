//! The offline commands (no daemon needed): each module owns its arguments and output.

pub mod check;
pub mod diff;
pub mod explain;
