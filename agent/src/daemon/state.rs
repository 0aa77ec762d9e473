//! What the daemon must not forget across restarts (SPEC §4 `state_dir`): quarantines, the
//! addresses bound with `segward bind`, and the lease bindings last applied (the lease file
//! is read again at start; what changed while no daemon ran is applied and recorded then).
//!
//! One JSON file, replaced atomically (written beside, synced, renamed) before a change is
//! acknowledged, so a `kill -9` at any moment leaves the old or the new state, never half.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// A quarantine in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// `manual`, `trigger:denied_flows` or `trigger:fanout`.
    pub by: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    #[serde(default)]
    pub quarantined: BTreeMap<String, QuarantineRecord>,
    /// Address → device, from `segward bind`.
    #[serde(default)]
    pub binds: BTreeMap<IpAddr, String>,
    /// Address → device, from the lease file when it was last read.
    #[serde(default)]
    pub leases: BTreeMap<IpAddr, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a segward state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

const FILE: &str = "state.json";

/// The state file of `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the state kept in `dir`; none kept yet is the empty state. A file that cannot be
/// read is an error: starting without its quarantines would release them silently.
pub fn load(dir: &Path) -> Result<State, StateError> {
    let path = path(dir);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| StateError::Parse { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

/// Replaces the state kept in `dir` with `state`, atomically and durably.
pub fn save(dir: &Path, state: &State) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::Dir {
            path: dir.into(),
            source,
        })?;
    let path = path(dir);
    let staging = dir.join(format!("{FILE}.new"));
    let write_err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staging)
        .map_err(write_err)?;
    let mut bytes = serde_json::to_vec_pretty(state).expect("the state serializes");
    bytes.push(b'\n');
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    fs::rename(&staging, &path).map_err(write_err)?;
    // The rename is durable once the directory is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("nested");
        assert_eq!(load(&dir).unwrap(), State::default());
        let mut state = State::default();
        state.quarantined.insert(
            "cam-01".into(),
            QuarantineRecord {
                reason: "scanning".into(),
                since: "2026-11-23T10:00:00Z".into(),
                by: "trigger:denied_flows".into(),
            },
        );
        state
            .binds
            .insert("10.20.1.50".parse().unwrap(), "temp-002".into());
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        assert!(!dir.join("state.json.new").exists());
    }

    #[test]
    fn a_damaged_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state.json"), "{\"quarantined\": 3}").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("state.json is not a segward state file"),
            "{err}"
        );
    }
}
