//! Following the daemon's audit log (JSON lines) while the story runs: each `poll` reads
//! the lines written since the last one.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;

/// One audit event, with the fields the demo shows.
#[derive(Clone, Debug)]
pub struct Event {
    pub ts: Option<SystemTime>,
    pub event: String,
    pub device: Option<String>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: Option<String>,
    pub dport: Option<u16>,
    pub reason: Option<String>,
    pub source: Option<String>,
    pub generation: Option<u64>,
    pub raw: Value,
}

impl Event {
    fn parse(line: &str) -> Result<Event, String> {
        let raw: Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
        let text = |key: &str| raw.get(key).and_then(Value::as_str).map(str::to_owned);
        let event = text("event").ok_or_else(|| format!("no \"event\": {line}"))?;
        Ok(Event {
            ts: text("ts").and_then(|ts| humantime::parse_rfc3339(&ts).ok()),
            device: text("device"),
            src: text("src").and_then(|a| a.parse().ok()),
            dst: text("dst").and_then(|a| a.parse().ok()),
            proto: text("proto"),
            dport: raw
                .get("dport")
                .and_then(Value::as_u64)
                .and_then(|p| p.try_into().ok()),
            reason: text("reason"),
            source: text("source"),
            generation: raw.get("generation").and_then(Value::as_u64),
            event,
            raw,
        })
    }
}

/// Reads an audit log as it grows.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    /// The start of a line whose end is not written yet.
    partial: Vec<u8>,
    /// Lines that were not audit events (shown as surprises).
    pub bad_lines: Vec<String>,
}

impl Tail {
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
            bad_lines: Vec::new(),
        }
    }

    /// The events written since the last call (none while the file does not exist).
    pub fn poll(&mut self) -> Vec<Event> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut new).is_err() {
            return Vec::new();
        }
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let mut events = Vec::new();
        for line in String::from_utf8_lossy(&complete).lines() {
            if line.trim().is_empty() {
                continue;
            }
            match Event::parse(line) {
                Ok(e) => events.push(e),
                Err(e) => self.bad_lines.push(e),
            }
        }
        events
    }
}
