//! Section 2: real traffic through the lab's gateway (placeholder until written).
use anyhow::{bail, Result};

use crate::{report::Section, Options};

pub fn run(_options: &Options) -> Result<Section> {
    bail!("not written yet")
}
