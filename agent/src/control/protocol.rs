//! The control socket's messages: one JSON object per line each way.
//!
//! A client sends a [`Request`] line (`{"command":"bind","device":"temp-001","address":"10.20.1.11"}`)
//! and reads one [`Response`] line for it; several requests may follow on one connection.
//! Requests are strict (unknown commands and fields are errors); replies are read leniently
//! (fields a newer daemon adds are ignored) so that an older CLI keeps working.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The longest request line the daemon reads, without its newline.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The longest response line a client reads: a device list of a large site is bigger than a
/// request ever is.
pub const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/segward/control.sock";
/// The environment variable that names the socket for the CLI.
pub const SOCKET_ENV: &str = "SEGWARD_SOCKET";

/// What a client asks the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Daemon state: policy generation, interfaces, mode, counts.
    Status,
    /// The devices with their addresses and state; `unknown`: the sources that no device owns.
    Devices {
        #[serde(default)]
        unknown: bool,
    },
    /// Quarantine a device by hand.
    Quarantine { device: String, reason: String },
    /// End a device's quarantine.
    Release { device: String },
    /// Bind an address to a device (an external identity system learned it).
    Bind { device: String, address: IpAddr },
    /// Take a bound address away from a device.
    Unbind { device: String, address: IpAddr },
    /// Reload the policy directory now.
    Reload,
}

/// Every `command` a [`Request`] can name, in declaration order.
pub const COMMANDS: &[&str] = &[
    "status",
    "devices",
    "quarantine",
    "release",
    "bind",
    "unbind",
    "reload",
];

impl Request {
    /// The `command` this request is sent as.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Devices { .. } => "devices",
            Request::Quarantine { .. } => "quarantine",
            Request::Release { .. } => "release",
            Request::Bind { .. } => "bind",
            Request::Unbind { .. } => "unbind",
            Request::Reload => "reload",
        }
    }

    /// Reads one request line, with an error message that says what is wrong with it.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let text =
            std::str::from_utf8(line).map_err(|e| format!("bad request: not UTF-8 ({e})"))?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("bad request: not JSON: {e}"))?;
        let command = match value.as_object().map(|o| o.get("command")) {
            None => return Err("bad request: expected a JSON object with a \"command\"".into()),
            Some(None) => return Err("bad request: missing \"command\"".into()),
            Some(Some(serde_json::Value::String(command))) => command.clone(),
            Some(Some(other)) => {
                return Err(format!(
                    "bad request: \"command\" must be a string, not {other}"
                ))
            }
        };
        if !COMMANDS.contains(&command.as_str()) {
            return Err(format!(
                "bad request: unknown command {command:?} (expected one of {})",
                COMMANDS.join(", ")
            ));
        }
        let request: Request = serde_json::from_value(value.clone())
            .map_err(|e| format!("bad request: {command}: {e}"))?;
        // serde ignores extra fields of the variants that have none (`status`, `reload`):
        // any field that the request does not write back is one it did not read.
        let known = serde_json::to_value(&request).map_err(|e| e.to_string())?;
        let unknown = value
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .find(|key| known.get(key.as_str()).is_none());
        match unknown {
            Some(key) => Err(format!("bad request: {command}: unknown field `{key}`")),
            None => Ok(request),
        }
    }
}

/// The daemon's answer to one request: `ok` with a `reply`, or not `ok` with an `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reply: Option<Reply>,
}

impl Response {
    pub fn ok(reply: Reply) -> Response {
        Response {
            ok: true,
            error: None,
            reply: Some(reply),
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            reply: None,
        }
    }

    /// The reply of a successful response, else the daemon's error message.
    pub fn into_result(self) -> Result<Option<Reply>, String> {
        if self.ok {
            Ok(self.reply)
        } else {
            Err(self
                .error
                .unwrap_or_else(|| "the daemon reported an error without a message".into()))
        }
    }
}

/// The successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// For `status`.
    Status(StatusReport),
    /// For `devices`.
    Devices { devices: Vec<DeviceInfo> },
    /// For `devices` with `unknown`.
    Unknown { sources: Vec<UnknownSource> },
    /// For quarantine, release, bind, unbind and reload: what was done.
    Done { message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub policy_dir: String,
    pub generation: u64,
    /// `enforce` or `audit`.
    pub mode: String,
    pub interfaces: Vec<String>,
    pub netns: Option<String>,
    pub segments: usize,
    pub devices: usize,
    pub quarantined: usize,
    pub bound_addresses: usize,
    pub unknown_sources: usize,
    pub uptime_seconds: u64,
    pub packets: Vec<PacketCount>,
}

/// One `segward_packets_total` counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PacketCount {
    pub reason: String,
    /// `pass` or `drop`.
    pub verdict: String,
    pub packets: u64,
    /// Of `packets`, those that passed only because of audit mode.
    pub audited: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub segment: String,
    pub mac: Option<String>,
    pub addresses: Vec<BoundAddress>,
    /// `active` or `quarantined`.
    pub state: String,
    pub quarantine: Option<QuarantineInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundAddress {
    pub address: IpAddr,
    /// `static`, `lease` or `bind`.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineInfo {
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// `manual`, `trigger:denied_flows` or `trigger:fanout`.
    pub by: String,
}

/// A source address seen on a device-facing interface that no device owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnknownSource {
    pub address: IpAddr,
    pub mac: String,
    /// RFC 3339.
    pub first_seen: String,
    /// RFC 3339.
    pub last_seen: String,
    pub packets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Devices { unknown: true },
            Request::Quarantine {
                device: "temp-001".into(),
                reason: "scanning \"the\" plant\n".into(),
            },
            Request::Release {
                device: "temp-001".into(),
            },
            Request::Bind {
                device: "temp-001".into(),
                address: "10.20.1.11".parse().unwrap(),
            },
            Request::Unbind {
                device: "temp-001".into(),
                address: "2001:db8::11".parse().unwrap(),
            },
            Request::Reload,
        ]
    }

    #[test]
    fn every_request_round_trips_on_one_line_and_names_a_listed_command() {
        let requests = all_requests();
        let names: Vec<&str> = requests.iter().map(Request::command).collect();
        assert_eq!(names, COMMANDS);
        for request in requests {
            let line = serde_json::to_string(&request).unwrap();
            assert!(!line.contains('\n'), "{line}");
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value["command"], request.command(), "{line}");
            assert_eq!(Request::parse(line.as_bytes()), Ok(request));
        }
    }

    #[test]
    fn exact_request_json() {
        let bind = Request::Bind {
            device: "temp-001".into(),
            address: "10.20.1.11".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&bind).unwrap(),
            r#"{"command":"bind","device":"temp-001","address":"10.20.1.11"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Devices { unknown: false }).unwrap(),
            r#"{"command":"devices","unknown":false}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Quarantine {
                device: "cam-3".into(),
                reason: "port scan".into()
            })
            .unwrap(),
            r#"{"command":"quarantine","device":"cam-3","reason":"port scan"}"#
        );
    }

    #[test]
    fn optional_fields_default() {
        assert_eq!(
            Request::parse(br#"{"command":"devices"}"#),
            Ok(Request::Devices { unknown: false })
        );
        assert_eq!(
            Request::parse(b" {\"command\":\"reload\"}\r"),
            Ok(Request::Reload)
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"hello", "bad request: not JSON: "),
            (b"\xff\xfe{}", "bad request: not UTF-8"),
            (b"[1,2]", "expected a JSON object with a \"command\""),
            (br#"{"device":"x"}"#, "missing \"command\""),
            (br#"{"command":7}"#, "\"command\" must be a string, not 7"),
            (
                br#"{"command":"frobnicate"}"#,
                "bad request: unknown command \"frobnicate\" (expected one of status, devices,",
            ),
            (
                br#"{"command":"bind","device":"temp-001","address":"10.20.1.300"}"#,
                "bad request: bind: invalid IP address syntax",
            ),
            (
                br#"{"command":"bind","device":"temp-001"}"#,
                "bad request: bind: missing field `address`",
            ),
            (
                br#"{"command":"quarantine","device":"temp-001"}"#,
                "missing field `reason`",
            ),
            (
                br#"{"command":"release","device":"temp-001","force":true}"#,
                "bad request: release: unknown field `force`",
            ),
            (
                br#"{"command":"devices","unknown":"yes"}"#,
                "bad request: devices: invalid type: string \"yes\", expected a boolean",
            ),
        ];
        for (line, expected) in cases {
            let error = Request::parse(line).unwrap_err();
            assert!(
                error.contains(expected),
                "{}: got {error:?}, expected it to contain {expected:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn unit_commands_reject_extra_fields() {
        // deny_unknown_fields must hold for the variants without fields too: a typo in an
        // argument should never be silently dropped.
        assert_eq!(
            Request::parse(br#"{"command":"reload","policy":"/tmp/x"}"#),
            Err("bad request: reload: unknown field `policy`".into())
        );
        assert_eq!(
            Request::parse(br#"{"command":"status","verbose":true}"#),
            Err("bad request: status: unknown field `verbose`".into())
        );
    }

    #[test]
    fn responses_round_trip() {
        let status = StatusReport {
            version: "0.1.0".into(),
            policy_dir: "/etc/segward/segments".into(),
            generation: 7,
            mode: "enforce".into(),
            interfaces: vec!["eth1".into(), "eth0".into()],
            netns: Some("lab".into()),
            segments: 3,
            devices: 12,
            quarantined: 1,
            bound_addresses: 14,
            unknown_sources: 2,
            uptime_seconds: 3723,
            packets: vec![PacketCount {
                reason: "allow".into(),
                verdict: "pass".into(),
                packets: 1000,
                audited: 3,
            }],
        };
        let devices = vec![DeviceInfo {
            id: "temp-001".into(),
            segment: "sensors".into(),
            mac: Some("02:00:00:00:10:01".into()),
            addresses: vec![BoundAddress {
                address: "10.20.1.11".parse().unwrap(),
                source: "static".into(),
            }],
            state: "quarantined".into(),
            quarantine: Some(QuarantineInfo {
                reason: "port scan".into(),
                since: "2024-05-01T12:00:00Z".into(),
                by: "trigger:fanout".into(),
            }),
        }];
        let sources = vec![UnknownSource {
            address: "fe80::1".parse().unwrap(),
            mac: "02:00:00:00:99:99".into(),
            first_seen: "2024-05-01T12:00:00Z".into(),
            last_seen: "2024-05-01T12:05:00Z".into(),
            packets: 42,
        }];
        for response in [
            Response::ok(Reply::Status(status)),
            Response::ok(Reply::Devices { devices }),
            Response::ok(Reply::Unknown { sources }),
            Response::ok(Reply::Done {
                message: "bound 10.20.1.11 to temp-001".into(),
            }),
            Response::error("no device \"temp-009\""),
        ] {
            let line = serde_json::to_string(&response).unwrap();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(
                serde_json::from_str::<Response>(&line).unwrap(),
                response,
                "{line}"
            );
        }
    }

    #[test]
    fn exact_response_json() {
        assert_eq!(
            serde_json::to_string(&Response::ok(Reply::Done {
                message: "reloaded".into()
            }))
            .unwrap(),
            r#"{"ok":true,"reply":{"result":"done","message":"reloaded"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error("no such device")).unwrap(),
            r#"{"ok":false,"error":"no such device"}"#
        );
        assert_eq!(
            Response::error("no such device").into_result(),
            Err("no such device".to_string())
        );
    }

    #[test]
    fn replies_from_a_newer_daemon_with_more_fields_still_read() {
        let line =
            r#"{"ok":true,"reply":{"result":"done","message":"ok","took_ms":3},"trace":"x"}"#;
        assert_eq!(
            serde_json::from_str::<Response>(line).unwrap(),
            Response::ok(Reply::Done {
                message: "ok".into()
            })
        );
    }
}
