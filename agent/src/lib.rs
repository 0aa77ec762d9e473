//! segward: a zero-trust micro-segmentation agent for Linux IoT gateways.
//!
//! The data flows through the modules in order: [`policy`] (YAML → model → compiled map
//! entries) → [`datapath`] (maps and programs in the kernel) ← [`daemon`] (runs it all).

pub mod commands;
pub mod daemon;
pub mod datapath;
pub mod netns;
pub mod policy;
