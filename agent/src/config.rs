//! The daemon's configuration file, `segward.yaml` (SPEC §4), for `segward run -c FILE`.
//!
//! Every key is optional; unknown keys are errors. Like the policy loader, this walks saphyr's
//! marked nodes by hand so that each error names the `file:line:col` of what is wrong. The
//! first error ends the parse: the file is short, and the daemon does not start with it.
//!
//! `log_format` (`human` | `json`) is an addition to the keys of SPEC §4.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::policy::load::{describe, is_null};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The policy directory.
    pub policy: Option<PathBuf>,
    pub device_ifaces: Vec<String>,
    pub uplink_ifaces: Vec<String>,
    /// `mode: audit`: the whole agent reports would-be drops and lets the packets pass.
    pub audit: bool,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Where to serve Prometheus metrics; `None`: not at all.
    pub metrics: Option<SocketAddr>,
    pub audit_log: Option<PathBuf>,
    pub dhcp_leases: Option<PathBuf>,
    pub conntrack: ConntrackTimeouts,
    pub log_format: LogFormat,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            policy: None,
            device_ifaces: Vec::new(),
            uplink_ifaces: Vec::new(),
            audit: false,
            state_dir: PathBuf::from("/var/lib/segward"),
            socket: PathBuf::from("/run/segward/control.sock"),
            metrics: None,
            audit_log: None,
            dhcp_leases: None,
            conntrack: ConntrackTimeouts::default(),
            log_format: LogFormat::default(),
        }
    }
}

/// Idle timeouts of tracked flows; whole seconds from 1 s to 2^32-1 s. `icmp` applies to
/// every protocol other than TCP, SCTP (which share `tcp`) and UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        ConntrackTimeouts {
            tcp: Duration::from_secs(3600),
            udp: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `line` and `column` are 1-based.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and parses the configuration file at `path`.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses `text`, the contents of the file at `path`. Errors name `path`, and relative paths
/// in the file are resolved against its directory.
pub fn parse(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
    let file = File { path, text };
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let marker = e.marker();
        file.error_at(
            marker.line(),
            marker.col(),
            format!("invalid YAML: {}", e.info()),
        )
    })?;
    let mut config = DaemonConfig::default();
    if let Some(extra) = docs.get(1) {
        return Err(file.error(extra, "only one YAML document is allowed here"));
    }
    match docs.first() {
        Some(doc) if !is_null(doc) => file.top(doc, &mut config)?,
        _ => {}
    }
    Ok(config)
}

const KEYS: &[&str] = &[
    "policy",
    "interfaces",
    "mode",
    "state_dir",
    "socket",
    "metrics",
    "audit_log",
    "identity",
    "conntrack",
    "log_format",
];
const INTERFACES_KEYS: &[&str] = &["devices", "uplink"];
const IDENTITY_KEYS: &[&str] = &["dhcp_leases"];
const CONNTRACK_KEYS: &[&str] = &["tcp", "udp", "icmp"];

type Node<'i> = MarkedYaml<'i>;

struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

impl File<'_> {
    /// `line` is 1-based and `col` 0-based, as saphyr counts.
    fn error_at(&self, line: usize, col: usize, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: line.max(1),
            column: col + 1,
            message: message.into(),
        }
    }

    fn error(&self, node: &Node, message: impl Into<String>) -> ConfigError {
        let start = node.span.start;
        self.error_at(start.line(), start.col(), message)
    }

    fn top(&self, doc: &Node, config: &mut DaemonConfig) -> Result<(), ConfigError> {
        for (key, value) in self.mapping(doc, "the configuration", KEYS)? {
            match key {
                "policy" => config.policy = Some(self.path_value(value, key)?),
                "interfaces" => {
                    for (key, value) in self.mapping(value, "interfaces", INTERFACES_KEYS)? {
                        let what = format!("interfaces.{key}");
                        let list = self.interfaces(value, &what, config)?;
                        match key {
                            "devices" => config.device_ifaces = list,
                            _ => config.uplink_ifaces = list,
                        }
                    }
                }
                "mode" => {
                    config.audit = match self.string(value, key)? {
                        "enforce" => false,
                        "audit" => true,
                        other => {
                            return Err(self.error(
                                value,
                                format!("mode must be enforce or audit, found {other:?}"),
                            ))
                        }
                    }
                }
                "state_dir" => config.state_dir = self.path_value(value, key)?,
                "socket" => config.socket = self.path_value(value, key)?,
                "metrics" => config.metrics = Some(self.metrics(value)?),
                "audit_log" => config.audit_log = Some(self.path_value(value, key)?),
                "identity" => {
                    for (_, value) in self.mapping(value, "identity", IDENTITY_KEYS)? {
                        let leases = self.path_value(value, "identity.dhcp_leases")?;
                        config.dhcp_leases = Some(leases);
                    }
                }
                "conntrack" => {
                    for (key, value) in self.mapping(value, "conntrack", CONNTRACK_KEYS)? {
                        let timeout = self.timeout(value, &format!("conntrack.{key}"))?;
                        match key {
                            "tcp" => config.conntrack.tcp = timeout,
                            "udp" => config.conntrack.udp = timeout,
                            _ => config.conntrack.icmp = timeout,
                        }
                    }
                }
                _ => {
                    config.log_format = match self.string(value, key)? {
                        "human" => LogFormat::Human,
                        "json" => LogFormat::Json,
                        other => {
                            return Err(self.error(
                                value,
                                format!("log_format must be human or json, found {other:?}"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The entries of a mapping whose keys must be in `keys`, skipping null values (`key:`
    /// with nothing after it means the default).
    fn mapping<'n, 'i>(
        &self,
        node: &'n Node<'i>,
        what: &str,
        keys: &[&'static str],
    ) -> Result<Vec<(&'static str, &'n Node<'i>)>, ConfigError> {
        let YamlData::Mapping(map) = &node.data else {
            return Err(self.error(
                node,
                format!(
                    "{what} must be a mapping of keys to values, found {}",
                    describe(node)
                ),
            ));
        };
        let mut entries = Vec::new();
        for (key_node, value) in map {
            let YamlData::Value(Scalar::String(key)) = &key_node.data else {
                return Err(self.error(
                    key_node,
                    format!("a key must be a string, found {}", describe(key_node)),
                ));
            };
            let Some(&key) = keys.iter().find(|k| **k == key.as_ref()) else {
                let inside = if what == "the configuration" {
                    String::new()
                } else {
                    format!(" in {what}")
                };
                return Err(self.error(
                    key_node,
                    format!(
                        "unknown key {key:?}{inside} (expected one of: {})",
                        keys.join(", ")
                    ),
                ));
            };
            if !is_null(value) {
                entries.push((key, value));
            }
        }
        Ok(entries)
    }

    fn string<'n>(&self, node: &'n Node, what: &str) -> Result<&'n str, ConfigError> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Ok(s),
            _ => Err(self.error(
                node,
                format!("{what} must be a string, found {}", describe(node)),
            )),
        }
    }

    /// A path; relative paths are resolved against the directory of the configuration file.
    fn path_value(&self, node: &Node, what: &str) -> Result<PathBuf, ConfigError> {
        let text = self.string(node, what)?;
        if text.is_empty() {
            return Err(self.error(node, format!("{what} must not be empty")));
        }
        Ok(match self.path.parent() {
            Some(dir) => dir.join(text),
            None => PathBuf::from(text),
        })
    }

    fn interfaces(
        &self,
        node: &Node,
        what: &str,
        config: &DaemonConfig,
    ) -> Result<Vec<String>, ConfigError> {
        let YamlData::Sequence(items) = &node.data else {
            return Err(self.error(
                node,
                format!(
                    "{what} must be a list of interface names, found {}",
                    describe(node)
                ),
            ));
        };
        let mut names: Vec<String> = Vec::new();
        for item in items {
            let name = self.string(item, &format!("an entry of {what}"))?;
            let valid = (1..=15).contains(&name.len())
                && name != "."
                && name != ".."
                && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
            if !valid {
                return Err(self.error(
                    item,
                    format!(
                        "{what}: invalid interface name {name:?} (1 to 15 bytes, without \"/\", \
                         \":\" or whitespace)"
                    ),
                ));
            }
            let elsewhere = config.device_ifaces.iter().chain(&config.uplink_ifaces);
            if names.iter().chain(elsewhere).any(|n| n == name) {
                return Err(self.error(item, format!("{what}: interface {name:?} is listed twice")));
            }
            names.push(name.to_owned());
        }
        Ok(names)
    }

    fn metrics(&self, node: &Node) -> Result<SocketAddr, ConfigError> {
        let text = match &node.data {
            YamlData::Value(Scalar::String(s)) => s.to_string(),
            _ => self.source_text(node),
        };
        text.parse().map_err(|_| {
            self.error(
                node,
                format!(
                    "metrics: invalid address {text:?} (expected IP:PORT, e.g. 127.0.0.1:9464 \
                     or [::1]:9464)"
                ),
            )
        })
    }

    fn timeout(&self, node: &Node, what: &str) -> Result<Duration, ConfigError> {
        let text = match &node.data {
            YamlData::Value(Scalar::Integer(_)) => {
                let text = self.source_text(node);
                return Err(self.error(
                    node,
                    format!("{what}: {text} needs a unit, e.g. \"{text}s\""),
                ));
            }
            _ => self.string(node, what)?,
        };
        let duration = humantime::parse_duration(text).map_err(|_| {
            self.error(
                node,
                format!("{what}: invalid duration {text:?} (e.g. \"30s\", \"2m\" or \"1h\")"),
            )
        })?;
        if duration.subsec_nanos() != 0 || !(1..=u64::from(u32::MAX)).contains(&duration.as_secs())
        {
            return Err(self.error(
                node,
                format!(
                    "{what}: {text:?} is out of range (a whole number of seconds from 1s to {}s)",
                    u32::MAX
                ),
            ));
        }
        Ok(duration)
    }

    /// A scalar as written in the file.
    fn source_text(&self, node: &Node) -> String {
        let (start, end) = (node.span.start.index(), node.span.end.index());
        self.text
            .chars()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<DaemonConfig, ConfigError> {
        parse(Path::new("/etc/segward/segward.yaml"), text)
    }

    /// The error message for `text`, as `line:col: message` (the path is checked elsewhere).
    fn error(text: &str) -> String {
        let err = parse(Path::new("segward.yaml"), text).unwrap_err();
        let message = err.to_string();
        message
            .strip_prefix("segward.yaml:")
            .unwrap_or_else(|| panic!("{message}"))
            .to_owned()
    }

    #[test]
    fn spec_example() {
        let config = parse_str(
            "policy: /etc/segward/segments
interfaces: {devices: [eth1], uplink: [eth0]}
mode: enforce                       # or audit
state_dir: /var/lib/segward         # quarantine and learned bindings survive restarts
socket: /run/segward/control.sock   # mode 0600, root only
metrics: 127.0.0.1:9464             # Prometheus text format at /metrics; omit to disable
audit_log: /var/log/segward/audit.jsonl
identity: {dhcp_leases: /var/lib/misc/dnsmasq.leases}
conntrack: {tcp: 3600s, udp: 120s, icmp: 30s}
",
        )
        .unwrap();
        assert_eq!(
            config,
            DaemonConfig {
                policy: Some("/etc/segward/segments".into()),
                device_ifaces: vec!["eth1".into()],
                uplink_ifaces: vec!["eth0".into()],
                audit: false,
                state_dir: "/var/lib/segward".into(),
                socket: "/run/segward/control.sock".into(),
                metrics: Some("127.0.0.1:9464".parse().unwrap()),
                audit_log: Some("/var/log/segward/audit.jsonl".into()),
                dhcp_leases: Some("/var/lib/misc/dnsmasq.leases".into()),
                conntrack: ConntrackTimeouts {
                    tcp: Duration::from_secs(3600),
                    udp: Duration::from_secs(120),
                    icmp: Duration::from_secs(30),
                },
                log_format: LogFormat::Human,
            }
        );
    }

    #[test]
    fn other_values() {
        let config = parse_str(
            "mode: audit\n\
             metrics: '[::1]:9464'\n\
             log_format: json\n\
             conntrack:\n  udp: 2m\n  tcp:\n\
             interfaces:\n  devices:\n    - eth1\n    - wlan0\n",
        )
        .unwrap();
        assert!(config.audit);
        assert_eq!(config.metrics, Some("[::1]:9464".parse().unwrap()));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.conntrack.udp, Duration::from_secs(120));
        assert_eq!(config.conntrack.tcp, Duration::from_secs(3600));
        assert_eq!(config.device_ifaces, ["eth1", "wlan0"]);
        assert!(config.uplink_ifaces.is_empty());
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        for text in [
            "",
            "\n",
            "# nothing yet\n",
            "---\n",
            "policy:\nmetrics: ~\n",
        ] {
            assert_eq!(
                parse_str(text).unwrap(),
                DaemonConfig::default(),
                "{text:?}"
            );
        }
        let defaults = DaemonConfig::default();
        assert_eq!(defaults.state_dir, Path::new("/var/lib/segward"));
        assert_eq!(defaults.socket, Path::new("/run/segward/control.sock"));
        assert_eq!(defaults.conntrack.tcp, Duration::from_secs(3600));
        assert_eq!(defaults.conntrack.udp, Duration::from_secs(120));
        assert_eq!(defaults.conntrack.icmp, Duration::from_secs(30));
        assert!(!defaults.audit);
        assert_eq!(defaults.metrics, None);
    }

    #[test]
    fn relative_paths_are_resolved_against_the_config_directory() {
        let config = parse_str(
            "policy: segments\n\
             state_dir: ../state\n\
             socket: /run/s.sock\n\
             audit_log: log/audit.jsonl\n\
             identity: {dhcp_leases: dnsmasq.leases}\n",
        )
        .unwrap();
        assert_eq!(config.policy.unwrap(), Path::new("/etc/segward/segments"));
        assert_eq!(config.state_dir, Path::new("/etc/segward/../state"));
        assert_eq!(config.socket, Path::new("/run/s.sock"));
        assert_eq!(
            config.audit_log.unwrap(),
            Path::new("/etc/segward/log/audit.jsonl")
        );
        assert_eq!(
            config.dhcp_leases.unwrap(),
            Path::new("/etc/segward/dnsmasq.leases")
        );
        // A config file named without a directory: relative to the working directory.
        let config = parse(Path::new("segward.yaml"), "policy: segments\n").unwrap();
        assert_eq!(config.policy.unwrap(), Path::new("segments"));
    }

    #[test]
    fn errors_name_the_place_and_the_problem() {
        let keys = KEYS.join(", ");
        let cases: &[(&str, String)] = &[
            (
                "mode: audit\n\n   # comment\npolcy: /x\n",
                format!("4:1: unknown key \"polcy\" (expected one of: {keys})"),
            ),
            (
                "interfaces:\n  devices: [eth1]\n  uplinks: [eth0]\n",
                "3:3: unknown key \"uplinks\" in interfaces (expected one of: devices, uplink)"
                    .into(),
            ),
            (
                "conntrack: {tcp: 3600s, tpc: 1s}\n",
                "1:25: unknown key \"tpc\" in conntrack (expected one of: tcp, udp, icmp)".into(),
            ),
            (
                "identity:\n  leases: /x\n",
                "2:3: unknown key \"leases\" in identity (expected one of: dhcp_leases)".into(),
            ),
            (
                "conntrack:\n  tcp: 1h\n  udp:    12x\n",
                "3:11: conntrack.udp: invalid duration \"12x\" (e.g. \"30s\", \"2m\" or \"1h\")"
                    .into(),
            ),
            (
                "conntrack: {icmp: 30}\n",
                "1:19: conntrack.icmp: 30 needs a unit, e.g. \"30s\"".into(),
            ),
            (
                "conntrack: {icmp: 500ms}\n",
                format!(
                    "1:19: conntrack.icmp: \"500ms\" is out of range (a whole number of seconds \
                     from 1s to {}s)",
                    u32::MAX
                ),
            ),
            (
                "conntrack: {tcp: 1500ms}\n",
                format!(
                    "1:18: conntrack.tcp: \"1500ms\" is out of range (a whole number of seconds \
                     from 1s to {}s)",
                    u32::MAX
                ),
            ),
            (
                "conntrack: {tcp: 4294967296s}\n",
                format!(
                    "1:18: conntrack.tcp: \"4294967296s\" is out of range (a whole number of \
                     seconds from 1s to {}s)",
                    u32::MAX
                ),
            ),
            (
                "policy: /p\nmode: enforcing\n",
                "2:7: mode must be enforce or audit, found \"enforcing\"".into(),
            ),
            (
                "mode: true\n",
                "1:7: mode must be a string, found true/false".into(),
            ),
            (
                "log_format: text\n",
                "1:13: log_format must be human or json, found \"text\"".into(),
            ),
            (
                "metrics: localhost\n",
                "1:10: metrics: invalid address \"localhost\" (expected IP:PORT, e.g. \
                 127.0.0.1:9464 or [::1]:9464)"
                    .into(),
            ),
            (
                "metrics: 9464\n",
                "1:10: metrics: invalid address \"9464\" (expected IP:PORT, e.g. \
                 127.0.0.1:9464 or [::1]:9464)"
                    .into(),
            ),
            (
                "interfaces: {devices: [eth1, a-very-long-name0]}\n",
                "1:30: interfaces.devices: invalid interface name \"a-very-long-name0\" (1 to 15 \
                 bytes, without \"/\", \":\" or whitespace)"
                    .into(),
            ),
            (
                "interfaces:\n  uplink:\n    - \"eth 0\"\n",
                "3:7: interfaces.uplink: invalid interface name \"eth 0\" (1 to 15 bytes, \
                 without \"/\", \":\" or whitespace)"
                    .into(),
            ),
            (
                "interfaces: {devices: [''], uplink: [eth0]}\n",
                "1:24: interfaces.devices: invalid interface name \"\" (1 to 15 bytes, without \
                 \"/\", \":\" or whitespace)"
                    .into(),
            ),
            (
                "interfaces: {devices: [a/b]}\n",
                "1:24: interfaces.devices: invalid interface name \"a/b\" (1 to 15 bytes, \
                 without \"/\", \":\" or whitespace)"
                    .into(),
            ),
            (
                "interfaces: {devices: [eth1], uplink: [eth0, eth1]}\n",
                "1:46: interfaces.uplink: interface \"eth1\" is listed twice".into(),
            ),
            (
                "interfaces: {devices: eth1}\n",
                "1:23: interfaces.devices must be a list of interface names, found a string".into(),
            ),
            (
                "interfaces: [eth1]\n",
                "1:13: interfaces must be a mapping of keys to values, found a list".into(),
            ),
            ("policy: ''\n", "1:9: policy must not be empty".into()),
            (
                "- policy\n",
                "1:1: the configuration must be a mapping of keys to values, found a list".into(),
            ),
            (
                "policy: /a\npolicy: /b\n",
                "2:1: invalid YAML: duplicated key in mapping".into(),
            ),
            (
                "policy: /a\n---\npolicy: /b\n",
                "3:1: only one YAML document is allowed here".into(),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(&error(text), expected, "for {text:?}");
        }
    }

    #[test]
    fn yaml_syntax_errors_have_a_location() {
        let message = error("policy: /a\ninterfaces: {devices: [eth1}\n");
        assert!(message.starts_with("2:"), "{message}");
        assert!(message.contains("invalid YAML"), "{message}");
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segward.yaml");
        let err = load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        fs::write(&path, "policy: segments\nmode: audits\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2:7: mode must be enforce or audit, found \"audits\"",
                path.display()
            )
        );
        fs::write(&path, "policy: segments\n").unwrap();
        assert_eq!(
            load(&path).unwrap().policy,
            Some(dir.path().join("segments"))
        );
    }
}
