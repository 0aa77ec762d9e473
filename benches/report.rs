//! What a benchmark section found, and BENCHMARKS.md.

use std::{fmt::Write as _, fs, process::Command};

/// A benchmark's findings: tables, the targets it checks, and notes on method.
pub struct Section {
    pub title: &'static str,
    /// How it was measured, in a few sentences (Markdown).
    pub method: String,
    pub tables: Vec<Table>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(caption: impl Into<String>, header: &[&str]) -> Table {
        Table {
            caption: caption.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let mut out = format!("**{}**\n\n", self.caption);
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out += &line(&self.header);
        out += &format!("|{}\n", "---|".repeat(self.header.len()));
        for row in &self.rows {
            out += &line(row);
        }
        out
    }
}

pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Target {
    /// `measured ≤ limit`, both in `unit`.
    pub fn at_most(what: impl Into<String>, measured: f64, limit: f64, unit: &str) -> Target {
        Target {
            what: what.into(),
            target: format!("≤ {} {unit}", number(limit)),
            measured: format!("{} {unit}", number(measured)),
            met: measured <= limit,
        }
    }
}

/// A number with as many digits as it deserves.
pub fn number(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Median of `xs` (sorted in place).
pub fn median(xs: &mut [f64]) -> f64 {
    percentile(xs, 50.0)
}

/// The `p`th percentile of `xs` (sorted in place), nearest rank.
pub fn percentile(xs: &mut [f64], p: f64) -> f64 {
    assert!(!xs.is_empty(), "percentile of no samples");
    xs.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

/// The machine, as BENCHMARKS.md names it.
pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{} GiB", kb.div_ceil(1 << 20)));
    let virt = Command::new("systemd-detect-virt")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!(", {}", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {memory} RAM{virt}; Linux {kernel}")
}

/// The whole report as Markdown.
pub fn markdown(sections: &[Section], quick: bool, elapsed_s: f64) -> String {
    let mut out = String::from("# segward benchmarks\n\n");
    out += "Written by `cargo xtask bench` (SPEC targets from issue 7). ";
    if quick {
        out += "**Quick mode** (`--quick`): smaller repeats and scales, to keep the benchmark \
                working in CI; its numbers are not the ones to quote.\n\n";
    } else {
        out += "Numbers below are from one run; ratios are between measurements of that run.\n\n";
    }
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(out, "- Run took {elapsed_s:.0} s\n");
    out += "## Targets\n\n| section | what | target | measured | met |\n|---|---|---|---|---|\n";
    for s in sections {
        for t in &s.targets {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                s.title,
                t.what,
                t.target,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
    }
    for s in sections {
        let _ = write!(out, "\n## {}\n\n{}\n\n", s.title, s.method.trim());
        for t in &s.tables {
            out += &t.markdown();
            out += "\n";
        }
        for n in &s.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}
