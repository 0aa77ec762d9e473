//! The control socket (SPEC §3, §4): the daemon serves it, the CLI commands use it.
//!
//! [`protocol`] is the wire format (one JSON object per line each way), [`server`] the
//! daemon's listener that turns valid requests into [`server::Call`]s, [`client`] the
//! blocking call the CLI makes.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{call, socket_path, ClientError};
pub use protocol::{Reply, Request, Response};
pub use server::{bind, Call, ControlError, ControlListener};
