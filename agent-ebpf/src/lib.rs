//! What the kernel and user halves of segward share: the `#[repr(C)]` map keys and values
//! ([`maps`]) and the decision logic ([`verdict`]), which is compiled into the XDP program
//! (lookups are BPF maps) and into the host agent (lookups are in-memory tables), so that
//! the kernel and `segward explain`/tests can never drift apart.
#![no_std]

pub mod maps;
pub mod parse;
pub mod verdict;
