//! The audit log (SPEC §5): every event goes to the daemon's log through `tracing` (target
//! `segward::audit`) and, when `audit_log` is configured, as one JSON object per line to
//! that file.
//!
//! Per-packet events (`deny`, `audit_deny`, `unknown_device`, `spoof`) are rate-limited per
//! device (else per source address) so that a flood cannot flood the log; what the limit
//! keeps out is counted. The file is opened `O_APPEND`, reopened on SIGHUP and also by
//! itself when logrotate has moved it away. Write errors (a full disk) never stop the daemon:
//! they are reported once through `tracing` and counted.

use std::{
    collections::HashMap,
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer};
use tracing::{info, warn, Level};

/// The kinds of audit events, named as in SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Deny,
    AuditDeny,
    UnknownDevice,
    Spoof,
    Quarantine,
    Release,
    Bind,
    Unbind,
    PolicyLoaded,
    PolicyRejected,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        EventKind::Deny,
        EventKind::AuditDeny,
        EventKind::UnknownDevice,
        EventKind::Spoof,
        EventKind::Quarantine,
        EventKind::Release,
        EventKind::Bind,
        EventKind::Unbind,
        EventKind::PolicyLoaded,
        EventKind::PolicyRejected,
    ];

    /// Whether the event is about one packet (and so rate-limited).
    pub fn is_per_packet(self) -> bool {
        matches!(
            self,
            EventKind::Deny | EventKind::AuditDeny | EventKind::UnknownDevice | EventKind::Spoof
        )
    }

    /// The name in the log's `event` field.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Deny => "deny",
            EventKind::AuditDeny => "audit_deny",
            EventKind::UnknownDevice => "unknown_device",
            EventKind::Spoof => "spoof",
            EventKind::Quarantine => "quarantine",
            EventKind::Release => "release",
            EventKind::Bind => "bind",
            EventKind::Unbind => "unbind",
            EventKind::PolicyLoaded => "policy_loaded",
            EventKind::PolicyRejected => "policy_rejected",
        }
    }
}

/// One line of the audit log. Fields that do not apply are left out of the JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    /// Serialized as RFC 3339 in UTC with milliseconds: `2026-11-23T10:00:00.123Z`.
    #[serde(serialize_with = "serialize_ts")]
    pub ts: SystemTime,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, or the protocol number: see [`proto_name`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The deciding rule as `file:line`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `bind` / `unbind`: the address that changed hands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// `bind` / `unbind`: `lease` or `bind`; `quarantine`: `manual`, `trigger:denied_flows`
    /// or `trigger:fanout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `policy_loaded`: the new policy generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// `policy_rejected`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Builder-style setters: `AuditEvent::new(EventKind::Bind).device("temp-001").address(a)`.
macro_rules! setters {
    ($($field:ident: $ty:ty),* $(,)?) => {$(
        pub fn $field(mut self, value: impl Into<$ty>) -> Self {
            self.$field = Some(value.into());
            self
        }
    )*};
}

impl AuditEvent {
    /// An event of `event` kind happening now, with no other field set.
    pub fn new(event: EventKind) -> Self {
        AuditEvent {
            ts: SystemTime::now(),
            event,
            device: None,
            segment: None,
            src: None,
            dst: None,
            proto: None,
            dport: None,
            reason: None,
            rule: None,
            mac: None,
            address: None,
            source: None,
            generation: None,
            error: None,
        }
    }

    setters! {
        device: String, segment: String, src: IpAddr, dst: IpAddr, proto: String, dport: u16,
        reason: String, rule: String, mac: String, address: IpAddr, source: String,
        generation: u64, error: String,
    }
}

/// An IP protocol number as the log names it: `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, or the
/// number.
pub fn proto_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// RFC 3339 with milliseconds; times that RFC 3339 cannot write (before 1970, after 9999)
/// are clamped so that formatting never fails.
fn rfc3339(ts: SystemTime) -> humantime::Rfc3339Timestamp {
    const LAST: Duration = Duration::from_secs(253_402_300_799); // 9999-12-31T23:59:59Z
    let ts = match ts.duration_since(UNIX_EPOCH) {
        Err(_) => UNIX_EPOCH,
        Ok(d) if d > LAST => UNIX_EPOCH + LAST,
        Ok(_) => ts,
    };
    humantime::format_rfc3339_millis(ts)
}

fn serialize_ts<S: Serializer>(ts: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&rfc3339(*ts))
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("creating the directory of the audit log {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("opening the audit log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
}

/// The length of a rate-limit window.
const WINDOW: Duration = Duration::from_secs(1);
/// How often at most the file's path is compared with the open file (rotation check).
const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// Rate-limit windows kept before old ones are dropped; past that (more keys with a live
/// window than this), new keys share one window.
const MAX_KEYS: usize = 4096;
/// How often at most the windows are swept when the map is full.
const PRUNE_INTERVAL: Duration = Duration::from_millis(100);

/// The audit log: `tracing`, and a JSON-lines file if one is configured.
#[derive(Debug)]
pub struct AuditLog {
    file: Option<LogFile>,
    limiter: RateLimiter,
    suppressed: u64,
}

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: File,
    /// (dev, ino) of the open file.
    id: (u64, u64),
    last_check: Instant,
    /// Events that could not be written to the file since start.
    write_errors: u64,
    /// Writing fails at the moment (reported once until it works again).
    failing: bool,
    /// A failed write left part of a line: start the next one on a new line.
    torn: bool,
}

impl AuditLog {
    /// `path` None: events only go to tracing. Some: also appended as JSON lines to the file
    /// (parent directories created, the file created with mode 0640, opened `O_APPEND`).
    /// `per_device_per_second` bounds the per-packet events written per device (or per
    /// source address when there is no device) in any one-second window; 0 writes none.
    pub fn open(path: Option<&Path>, per_device_per_second: u32) -> Result<Self, AuditError> {
        let file = path.map(LogFile::open).transpose()?;
        Ok(AuditLog {
            file,
            limiter: RateLimiter::new(per_device_per_second),
            suppressed: 0,
        })
    }

    /// Writes one event: always to tracing (target `segward::audit`, the fields as
    /// key=value; level warn for `policy_rejected`, info for the rest), and as a JSON line to
    /// the file. Per-packet events over the rate limit are not written but counted (see
    /// [`AuditLog::suppressed`]). Returns whether the event was written: false when the rate
    /// limit kept it out or the file could not be written.
    pub fn record(&mut self, event: AuditEvent) -> bool {
        self.record_at(event, Instant::now())
    }

    /// [`AuditLog::record`] with the clock as a parameter (for the rate limit and the
    /// rotation check).
    pub(crate) fn record_at(&mut self, event: AuditEvent, now: Instant) -> bool {
        if event.event.is_per_packet() && !self.limiter.admit(&event, now) {
            self.suppressed += 1;
            return false;
        }
        trace(&event);
        match &mut self.file {
            Some(file) => file.write(&event, now),
            None => true,
        }
    }

    /// Events kept from the log by the rate limit since start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Events that went to tracing but could not be written to the file since start.
    pub fn write_errors(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.write_errors)
    }

    /// The file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Reopens the file (after logrotate moved it): call on SIGHUP. It is also done by
    /// itself, when the path no longer names the open file (checked at most once a second).
    /// When opening fails, the old file stays in use.
    pub fn reopen(&mut self) -> Result<(), AuditError> {
        match &mut self.file {
            Some(file) => file.reopen(Instant::now()),
            None => Ok(()),
        }
    }
}

/// The event through tracing, as one line of key=value fields; unset fields are left out.
fn trace(e: &AuditEvent) {
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: "segward::audit",
                $level,
                event = e.event.name(),
                device = e.device.as_deref(),
                segment = e.segment.as_deref(),
                src = e.src.map(tracing::field::display),
                dst = e.dst.map(tracing::field::display),
                proto = e.proto.as_deref(),
                dport = e.dport,
                reason = e.reason.as_deref(),
                rule = e.rule.as_deref(),
                mac = e.mac.as_deref(),
                address = e.address.map(tracing::field::display),
                source = e.source.as_deref(),
                generation = e.generation,
                error = e.error.as_deref(),
                "{}",
                e.event.name()
            )
        };
    }
    if e.event == EventKind::PolicyRejected {
        emit!(Level::WARN);
    } else {
        emit!(Level::INFO);
    }
}

impl LogFile {
    fn open(path: &Path) -> Result<Self, AuditError> {
        let (file, id) = open_append(path)?;
        Ok(LogFile {
            path: path.to_owned(),
            file,
            id,
            last_check: Instant::now(),
            write_errors: 0,
            failing: false,
            torn: false,
        })
    }

    fn reopen(&mut self, now: Instant) -> Result<(), AuditError> {
        let (file, id) = open_append(&self.path)?;
        self.file = file;
        self.id = id;
        self.last_check = now;
        // A torn line stays in the old file.
        self.torn = false;
        Ok(())
    }

    /// Whether the path names another file than the open one (or none).
    fn moved(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(meta) => (meta.dev(), meta.ino()) != self.id,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    fn write(&mut self, event: &AuditEvent, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_check) >= ROTATION_CHECK {
            self.last_check = now;
            if self.moved() {
                if let Err(error) = self.reopen(now) {
                    // Keep writing to the old file; say so once.
                    self.fail(&error);
                }
            }
        }
        let mut line = Vec::with_capacity(256);
        if self.torn {
            line.push(b'\n');
        }
        if let Err(error) = serde_json::to_writer(&mut line, event) {
            self.fail(&error);
            return false;
        }
        line.push(b'\n');
        match write_fully(&mut self.file, &line) {
            Ok(()) => {
                self.torn = false;
                if self.failing {
                    self.failing = false;
                    info!(
                        path = %self.path.display(),
                        lost = self.write_errors,
                        "writing the audit log again"
                    );
                }
                true
            }
            Err((error, written)) => {
                self.torn |= written > 0;
                self.fail(&error);
                false
            }
        }
    }

    /// Counts an event the file did not get; the first of a run of failures is reported.
    fn fail(&mut self, error: &dyn std::fmt::Display) {
        self.write_errors += 1;
        if !self.failing {
            self.failing = true;
            warn!(
                path = %self.path.display(),
                error = %error,
                "cannot write the audit log; events go on only to the daemon's log until it works again"
            );
        }
    }
}

/// Opens `path` for appending, creating it (mode 0640) and its directories if missing.
fn open_append(path: &Path) -> Result<(File, (u64, u64)), AuditError> {
    let open_error = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| AuditError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let file = match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(file) => {
            // Exactly 0640 whatever the umask.
            file.set_permissions(std::fs::Permissions::from_mode(0o640))
                .map_err(open_error)?;
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(open_error)?,
        Err(e) => return Err(open_error(e)),
    };
    let meta = file.metadata().map_err(open_error)?;
    Ok((file, (meta.dev(), meta.ino())))
}

/// `write_all` that tells how much was written before an error.
fn write_fully(file: &mut File, mut buf: &[u8]) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while !buf.is_empty() {
        match file.write(buf) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => {
                written += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, written)),
        }
    }
    Ok(())
}

/// Fixed one-second windows per key, with a bounded number of keys.
#[derive(Debug)]
struct RateLimiter {
    limit: u32,
    windows: HashMap<RateKey, Window>,
    last_prune: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Device(String),
    Addr(IpAddr),
    /// Neither device nor source address.
    Anonymous,
    /// Every new key while the map is full of live windows.
    Overflow,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl RateLimiter {
    fn new(limit: u32) -> Self {
        RateLimiter {
            limit,
            windows: HashMap::new(),
            last_prune: None,
        }
    }

    /// Whether the event fits in its key's window (and takes a place in it).
    fn admit(&mut self, event: &AuditEvent, now: Instant) -> bool {
        let mut key = match (&event.device, event.src) {
            (Some(device), _) => RateKey::Device(device.clone()),
            (None, Some(src)) => RateKey::Addr(src),
            (None, None) => RateKey::Anonymous,
        };
        if self.windows.len() >= MAX_KEYS && !self.windows.contains_key(&key) {
            self.prune(now);
            if self.windows.len() >= MAX_KEYS {
                key = RateKey::Overflow;
            }
        }
        let window = self.windows.entry(key).or_insert(Window {
            start: now,
            count: 0,
        });
        if now.saturating_duration_since(window.start) >= WINDOW {
            *window = Window {
                start: now,
                count: 0,
            };
        }
        if window.count < self.limit {
            window.count += 1;
            true
        } else {
            false
        }
    }

    /// Drops the windows that have ended (at most every [`PRUNE_INTERVAL`]).
    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|last| now.saturating_duration_since(last) < PRUNE_INTERVAL)
        {
            return;
        }
        self.last_prune = Some(now);
        self.windows
            .retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        net::{Ipv4Addr, Ipv6Addr},
    };

    use serde_json::Value;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    fn keys(line: &Value) -> BTreeSet<&str> {
        line.as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn deny(device: &str) -> AuditEvent {
        AuditEvent::new(EventKind::Deny)
            .device(device)
            .src(ip("10.20.1.11"))
            .dst(ip("198.51.100.10"))
            .proto("udp")
            .dport(9999u16)
            .reason("default_deny")
    }

    /// One event of every kind, with the fields that apply to it, and those field names.
    fn one_of_each() -> Vec<(AuditEvent, &'static [&'static str])> {
        use EventKind::*;
        let flow = |kind| {
            AuditEvent::new(kind)
                .device("temp-001")
                .segment("sensors")
                .src(ip("10.20.1.11"))
                .dst(ip("2001:db8::10"))
                .proto(proto_name(6))
                .dport(8883u16)
                .reason("default_deny")
        };
        const FLOW: &[&str] = &[
            "ts", "event", "device", "segment", "src", "dst", "proto", "dport", "reason",
        ];
        vec![
            (flow(Deny), FLOW),
            (
                flow(AuditDeny).rule("segments/sensors.yaml:12"),
                &[
                    "ts", "event", "device", "segment", "src", "dst", "proto", "dport", "reason",
                    "rule",
                ],
            ),
            (
                AuditEvent::new(UnknownDevice)
                    .src(ip("10.20.7.7"))
                    .dst(ip("198.51.100.10"))
                    .proto(proto_name(17))
                    .dport(123u16)
                    .reason("unknown_device"),
                &["ts", "event", "src", "dst", "proto", "dport", "reason"],
            ),
            (
                AuditEvent::new(Spoof)
                    .device("temp-001")
                    .segment("sensors")
                    .src(ip("10.20.1.11"))
                    .mac("02:00:00:00:66:66")
                    .proto(proto_name(1))
                    .reason("spoof"),
                &[
                    "ts", "event", "device", "segment", "src", "mac", "proto", "reason",
                ],
            ),
            (
                AuditEvent::new(Quarantine)
                    .device("temp-001")
                    .segment("sensors")
                    .reason("more than 20 denied flows in 10s")
                    .source("trigger:denied_flows"),
                &["ts", "event", "device", "segment", "reason", "source"],
            ),
            (
                AuditEvent::new(Release)
                    .device("temp-001")
                    .segment("sensors"),
                &["ts", "event", "device", "segment"],
            ),
            (
                AuditEvent::new(Bind)
                    .device("temp-002")
                    .segment("sensors")
                    .address(ip("10.20.1.12"))
                    .mac("02:00:00:00:10:02")
                    .source("lease"),
                &[
                    "ts", "event", "device", "segment", "address", "mac", "source",
                ],
            ),
            (
                AuditEvent::new(Unbind)
                    .device("temp-002")
                    .address(ip("10.20.1.12"))
                    .source("bind"),
                &["ts", "event", "device", "address", "source"],
            ),
            (
                AuditEvent::new(PolicyLoaded).generation(7u64),
                &["ts", "event", "generation"],
            ),
            (
                AuditEvent::new(PolicyRejected)
                    .error("segments/sensors.yaml:14:9: unknown target \"mqtt-brokr\""),
                &["ts", "event", "error"],
            ),
        ]
    }

    #[test]
    fn every_kind_is_written_with_its_name_and_only_the_fields_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(Some(&path), 20).unwrap();
        let events = one_of_each();
        assert_eq!(
            events.iter().map(|(e, _)| e.event).collect::<Vec<_>>(),
            EventKind::ALL,
            "one event of every kind"
        );
        for (event, _) in &events {
            assert!(log.record(event.clone()));
        }
        let written = lines(&path);
        assert_eq!(written.len(), events.len());
        for ((event, fields), line) in events.iter().zip(&written) {
            assert_eq!(line["event"], event.event.name());
            assert_eq!(
                keys(line),
                fields.iter().copied().collect(),
                "{}",
                event.event.name()
            );
            let ts = line["ts"].as_str().unwrap();
            humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("ts {ts:?}: {e}"));
        }
        assert_eq!(written[0]["src"], "10.20.1.11");
        assert_eq!(written[0]["dst"], "2001:db8::10");
        assert_eq!(written[0]["proto"], "tcp");
        assert_eq!(written[0]["dport"], 8883);
        assert_eq!(written[1]["rule"], "segments/sensors.yaml:12");
        assert_eq!(written[6]["address"], "10.20.1.12");
        assert_eq!(written[8]["generation"], 7);
    }

    #[test]
    fn names_match_the_serialized_names() {
        for kind in EventKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
            assert_eq!(
                kind.is_per_packet(),
                ["deny", "audit_deny", "unknown_device", "spoof"].contains(&kind.name())
            );
        }
    }

    #[test]
    fn ts_is_rfc3339_utc_with_millis() {
        let mut event = AuditEvent::new(EventKind::Release);
        event.ts = humantime::parse_rfc3339("2026-11-23T10:00:00.123456Z").unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["ts"], "2026-11-23T10:00:00.123Z");
        // Times RFC 3339 cannot write are clamped, never a panic or an error.
        event.ts = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(
            serde_json::to_value(&event).unwrap()["ts"],
            "1970-01-01T00:00:00.000Z"
        );
        event.ts = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(
            serde_json::to_value(&event).unwrap()["ts"],
            "9999-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn proto_names() {
        assert_eq!(proto_name(1), "icmp");
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(58), "icmpv6");
        assert_eq!(proto_name(132), "sctp");
        assert_eq!(proto_name(47), "47");
    }

    #[test]
    fn per_packet_events_are_rate_limited_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let limit = 20;
        let mut log = AuditLog::open(Some(&path), limit).unwrap();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);

        let written = (0..1000)
            .filter(|i| log.record_at(deny("temp-001"), at(*i)))
            .count();
        assert_eq!(written, limit as usize);
        assert_eq!(log.suppressed(), 1000 - u64::from(limit));

        // Another device, and sources without a device, have their own windows.
        assert!(log.record_at(deny("temp-002"), at(999)));
        let unknown = AuditEvent::new(EventKind::UnknownDevice).src(ip("10.20.7.7"));
        assert!(log.record_at(unknown.clone(), at(999)));
        // Events that are not about one packet are never limited.
        for _ in 0..100 {
            assert!(log.record_at(
                AuditEvent::new(EventKind::Quarantine)
                    .device("temp-001")
                    .source("manual"),
                at(999)
            ));
            assert!(log.record_at(
                AuditEvent::new(EventKind::PolicyLoaded).generation(2u64),
                at(999)
            ));
        }
        // Every per-packet kind counts against the same device's window.
        assert!(!log.record_at(
            AuditEvent::new(EventKind::Spoof).device("temp-001"),
            at(999)
        ));
        assert_eq!(log.suppressed(), 1000 - u64::from(limit) + 1);

        // A new window lets the device's events through again.
        let again = (0..50)
            .filter(|_| log.record_at(deny("temp-001"), at(1000)))
            .count();
        assert_eq!(again, limit as usize);

        let lines = lines(&path);
        let count = |pred: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| pred(l)).count();
        assert_eq!(
            count(&|l| l["event"] == "deny" && l["device"] == "temp-001"),
            2 * limit as usize
        );
        assert_eq!(count(&|l| l["device"] == "temp-002"), 1);
        assert_eq!(count(&|l| l["event"] == "unknown_device"), 1);
        assert_eq!(count(&|l| l["event"] == "quarantine"), 100);
        assert_eq!(count(&|l| l["event"] == "policy_loaded"), 100);
        assert_eq!(count(&|l| l["event"] == "spoof"), 0);
    }

    #[test]
    fn the_rate_limit_state_stays_bounded_under_a_flood_of_sources() {
        let mut log = AuditLog::open(None, 1).unwrap();
        let t0 = Instant::now();
        let unknown = |n: u32| {
            AuditEvent::new(EventKind::UnknownDevice)
                .src(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
        };
        let written = (0..100_000)
            .filter(|&n| log.record_at(unknown(n), t0))
            .count();
        assert!(log.limiter.windows.len() <= MAX_KEYS + 1);
        // The first sources got their own window, the rest share one.
        assert_eq!(written, MAX_KEYS + 1);
        assert_eq!(log.suppressed(), 100_000 - written as u64);

        // Once those windows have ended, new sources get their own again.
        let t1 = t0 + WINDOW;
        let written = (100_000..100_100)
            .filter(|&n| log.record_at(unknown(n), t1))
            .count();
        assert_eq!(written, 100);
        assert!(log.limiter.windows.len() <= MAX_KEYS + 1);
    }

    #[test]
    fn a_zero_limit_writes_no_per_packet_events() {
        let mut log = AuditLog::open(None, 0).unwrap();
        assert!(!log.record(deny("temp-001")));
        assert!(log.record(AuditEvent::new(EventKind::Release).device("temp-001")));
        assert_eq!(log.suppressed(), 1);
    }

    #[test]
    fn the_file_is_created_with_its_directories_and_mode_0640() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/log/segward/audit.jsonl");
        let log = AuditLog::open(Some(&path), 20).unwrap();
        assert_eq!(log.path(), Some(path.as_path()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{mode:o}");
    }

    #[test]
    fn an_existing_file_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"event\":\"old\"}\n").unwrap();
        let mut log = AuditLog::open(Some(&path), 20).unwrap();
        assert!(log.record(AuditEvent::new(EventKind::PolicyLoaded).generation(1u64)));
        let lines = lines(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "old");
        assert_eq!(lines[1]["event"], "policy_loaded");
    }

    #[test]
    fn reopen_after_rotation_writes_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let mut log = AuditLog::open(Some(&path), 20).unwrap();
        let t0 = Instant::now();
        assert!(log.record_at(
            AuditEvent::new(EventKind::PolicyLoaded).generation(1u64),
            t0
        ));

        // SIGHUP after logrotate moved the file.
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen().unwrap();
        assert!(log.record_at(
            AuditEvent::new(EventKind::PolicyLoaded).generation(2u64),
            t0
        ));
        assert_eq!(lines(&rotated).len(), 1);
        assert_eq!(lines(&path)[0]["generation"], 2);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{mode:o}");

        // No SIGHUP: noticed within a second.
        std::fs::rename(&path, &rotated).unwrap();
        let t1 = t0 + Duration::from_millis(100);
        assert!(log.record_at(
            AuditEvent::new(EventKind::PolicyLoaded).generation(3u64),
            t1
        ));
        let t2 = t1 + ROTATION_CHECK;
        assert!(log.record_at(
            AuditEvent::new(EventKind::PolicyLoaded).generation(4u64),
            t2
        ));
        let generations = |p: &Path| {
            lines(p)
                .iter()
                .map(|l| l["generation"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(generations(&rotated), [2, 3]);
        assert_eq!(generations(&path), [4]);

        // Moved away and replaced by another file (logrotate's `create`).
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::write(&path, "").unwrap();
        let t3 = t2 + ROTATION_CHECK;
        assert!(log.record_at(
            AuditEvent::new(EventKind::PolicyLoaded).generation(5u64),
            t3
        ));
        assert_eq!(generations(&path), [5]);
    }

    #[test]
    fn without_a_file_events_only_go_to_tracing() {
        let mut log = AuditLog::open(None, 20).unwrap();
        assert!(log.record(deny("temp-001")));
        assert!(log.reopen().is_ok());
        assert_eq!(log.path(), None);
        assert_eq!(log.write_errors(), 0);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let path = blocker.join("audit.jsonl");
        let error = AuditLog::open(Some(&path), 20).unwrap_err().to_string();
        assert!(error.contains(&blocker.display().to_string()), "{error}");
    }

    /// Everything tracing prints on this thread while `f` runs, as the daemon's subscriber
    /// formats it. One global subscriber, writing to a per-thread capture: a scoped one
    /// (`with_default`) races with other threads over the callsites' cached interest.
    fn traced(f: impl FnOnce()) -> String {
        thread_local! {
            static CAPTURE: std::cell::RefCell<Option<Vec<u8>>> =
                const { std::cell::RefCell::new(None) };
        }
        struct ThreadCapture;
        impl io::Write for ThreadCapture {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                CAPTURE.with_borrow_mut(|c| {
                    if let Some(c) = c {
                        c.extend_from_slice(buf);
                    }
                });
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadCapture)
                .with_ansi(false)
                .with_max_level(Level::INFO)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in the lib tests");
        });
        CAPTURE.set(Some(Vec::new()));
        f();
        let bytes = CAPTURE.take().unwrap_or_default();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn tracing_gets_one_line_of_the_fields_that_are_set() {
        let output = traced(|| {
            let mut log = AuditLog::open(None, 20).unwrap();
            log.record(deny("temp-001"));
            log.record(AuditEvent::new(EventKind::UnknownDevice).src(ip("10.20.7.7")));
            log.record(AuditEvent::new(EventKind::PolicyRejected).error("bad"));
            log.record(
                AuditEvent::new(EventKind::Bind)
                    .device("temp-002")
                    .address(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            );
        });
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 4, "{output}");
        // What the e2e tests and people grepping the daemon's log look for.
        let deny = lines[0];
        for field in [
            "INFO",
            "segward::audit",
            "event=\"deny\"",
            "device=\"temp-001\"",
            "src=10.20.1.11",
            "dst=198.51.100.10",
            "proto=\"udp\"",
            "dport=9999",
            "reason=\"default_deny\"",
        ] {
            assert!(deny.contains(field), "{field} in {deny}");
        }
        assert!(!deny.contains("segment="), "{deny}");
        assert!(
            lines[1].contains("event=\"unknown_device\""),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("src=10.20.7.7"), "{}", lines[1]);
        assert!(!lines[1].contains("device="), "{}", lines[1]);
        assert!(lines[2].contains("WARN"), "{}", lines[2]);
        assert!(lines[2].contains("error=\"bad\""), "{}", lines[2]);
        assert!(lines[3].contains("address=::1"), "{}", lines[3]);
    }

    #[test]
    fn write_errors_are_reported_once_and_counted() {
        let path = Path::new("/dev/full");
        if !path.exists() {
            return;
        }
        let mut results = Vec::new();
        let output = traced(|| {
            let mut log = AuditLog::open(Some(path), 20).unwrap();
            for generation in 0..5u64 {
                results.push(
                    log.record(AuditEvent::new(EventKind::PolicyLoaded).generation(generation)),
                );
            }
            assert_eq!(log.write_errors(), 5);
        });
        assert_eq!(results, [false; 5]);
        let warnings = output.lines().filter(|l| l.contains("WARN")).count();
        assert_eq!(warnings, 1, "{output}");
        assert_eq!(
            output.matches("event=\"policy_loaded\"").count(),
            5,
            "{output}"
        );
    }

    #[test]
    fn a_torn_line_does_not_join_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(Some(&path), 20).unwrap();
        // As if a write had stopped half-way.
        log.file.as_mut().unwrap().file.write_all(b"{\"ev").unwrap();
        log.file.as_mut().unwrap().torn = true;
        assert!(log.record(AuditEvent::new(EventKind::Release).device("temp-001")));
        let text = std::fs::read_to_string(&path).unwrap();
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "release");
    }
}
