//! segward: a zero-trust micro-segmentation agent for Linux IoT gateways.
//!
//! The data flows through the modules in order: [`policy`] (YAML → model → compiled map
//! entries) → [`datapath`] (maps and programs in the kernel) ← [`daemon`] (runs it all),
//! which learns addresses from [`identity`] sources, takes commands over the [`control`]
//! socket and writes the [`audit`] log.

pub mod audit;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod heap;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod quarantine;
pub mod watch;
