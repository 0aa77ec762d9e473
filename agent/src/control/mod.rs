//! The control socket (SPEC §3, §4): the daemon serves it, the CLI commands use it.
