//! End-to-end tests: real namespaces, veth pairs, traffic and the real `segward` binary.
//!
//! They need root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF) and fail loudly without it; run
//! them via `cargo xtask test`. The fixture lives in `tests/lab/` (see its module docs);
//! add a test module here with `mod name;` and use `crate::lab::Lab`.

#[path = "../lab/mod.rs"]
mod lab;

mod audit;
mod audit_log;
mod conntrack;
mod control;
mod demo;
mod enforcement;
mod events;
mod identity;
mod ipv6;
mod lab_selftest;
mod operability;
mod quarantine;
mod reload;
mod restart;
mod spoofing;
