//! Section 3 (placeholder until written).
use anyhow::{bail, Result};

use crate::{report::Section, Options};

pub fn run(_options: &Options) -> Result<Section> {
    bail!("not written yet")
}
