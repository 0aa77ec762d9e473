//! The segward XDP program. Built only for the BPF target (`cargo xtask build-ebpf`, or
//! the agent's build script); on the host this binary is empty so the workspace builds.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod datapath;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
