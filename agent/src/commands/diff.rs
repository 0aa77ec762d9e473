//! `segward diff OLD_DIR NEW_DIR`: which (source, destination, port) pairs gain or lose access.

use std::{fmt, path::PathBuf, process::ExitCode};

use serde_json::{json, Value};

use super::write_stdout;
use crate::policy::{
    diff::{diff, mode_name, Change, Party, PolicyDiff},
    load::{load_dir, LoadError},
    model::Policy,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prints one line per change, `+` for reachability gained and `-` for reachability lost:
  + SOURCE → DESTINATION: PORTS
Sources and destinations are segments (the devices that stay in them), devices that were added, \
removed or moved (with their segments), quarantined devices, the gateway, and blocks of outside \
addresses (a CIDR without the narrower ones listed after `except`, with the zones containing \
it). Segment mode changes follow as `~` lines. Paste the output into a ```diff block of a pull \
request comment for colours.

The gateway is judged as such (only `to: gateway` rules reach it: its addresses are not known \
offline); a zone or CIDR rule reaches a device through any of its static addresses.

Exit status: 0 whether or not anything changed (the output says what did), 2 bad usage or an \
unreadable or invalid policy.")]
pub struct DiffArgs {
    /// Policy directory before the change.
    pub old: PathBuf,
    /// Policy directory after the change.
    pub new: PathBuf,
    /// Print the changes as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DiffArgs) -> ExitCode {
    let (old, new) = match (load(&args.old), load(&args.new)) {
        (Some(old), Some(new)) => (old, new),
        _ => return ExitCode::from(2),
    };
    let changes = diff(&old, &new);
    let text = if args.json {
        format!("{}\n", to_json(&changes))
    } else {
        report(&changes, &args.old.display(), &args.new.display())
    };
    if write_stdout(&text) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// The changes as text: a summary line, then one line per change.
fn report(changes: &PolicyDiff, old: &dyn fmt::Display, new: &dyn fmt::Display) -> String {
    if changes.is_empty() {
        return format!("no reachability changes from {old} to {new}\n");
    }
    let modes = changes.modes.len();
    let mut text = format!(
        "reachability changes from {old} to {new}: {} gained, {} lost, {modes} mode {}\n",
        changes.count(Change::Gained),
        changes.count(Change::Lost),
        if modes == 1 { "change" } else { "changes" }
    );
    let reach = changes.reach.iter().map(ToString::to_string);
    for line in reach.chain(changes.modes.iter().map(ToString::to_string)) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Loads one side, reporting why it cannot be used.
fn load(dir: &std::path::Path) -> Option<Policy> {
    match load_dir(dir) {
        Ok(policy) => Some(policy),
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                eprintln!("{d}");
            }
            eprintln!(
                "segward diff: the policy in {} is invalid; see `segward check`",
                dir.display()
            );
            None
        }
        Err(e) => {
            eprintln!("segward diff: {e}");
            None
        }
    }
}

fn to_json(changes: &PolicyDiff) -> Value {
    let reach: Vec<Value> = changes
        .reach
        .iter()
        .map(|r| {
            json!({
                "change": match r.change {
                    Change::Gained => "gained",
                    Change::Lost => "lost",
                },
                "from": party_json(&r.from),
                "to": party_json(&r.to),
                "ports": r.services.specs(),
                "text": r.to_string(),
            })
        })
        .collect();
    let modes: Vec<Value> = changes
        .modes
        .iter()
        .map(|m| json!({"segment": m.segment, "old": mode_name(m.old), "new": mode_name(m.new)}))
        .collect();
    json!({"reach": reach, "modes": modes})
}

fn party_json(party: &Party) -> Value {
    let label = party.to_string();
    match party {
        Party::Segment(name) => json!({"kind": "segment", "segment": name, "label": label}),
        Party::Devices {
            ids,
            old_segment,
            new_segment,
        } => json!({
            "kind": "devices",
            "devices": ids,
            "old_segment": old_segment,
            "new_segment": new_segment,
            "label": label,
        }),
        Party::Quarantined => json!({"kind": "quarantined", "label": label}),
        Party::Gateway => json!({"kind": "gateway", "label": label}),
        Party::Addresses {
            cidr,
            except,
            zones,
        } => json!({
            "kind": "addresses",
            "cidr": cidr.to_string(),
            "except": except.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "zones": zones,
            "label": label,
        }),
    }
}
