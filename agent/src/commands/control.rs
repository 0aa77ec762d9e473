//! The daemon commands (`status`, `devices`, `quarantine`, `release`, `bind`, `unbind`,
//! `reload`): each sends one request over the control socket and prints the reply.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use super::write_stdout;
use crate::control::{
    client::{self, ClientError},
    protocol::{DeviceInfo, Reply, Request, StatusReport, UnknownSource, SOCKET_ENV},
};

const EXIT_HELP: &str = "\
Exit status: 0 success, 1 the daemon refused the request (the reason is on stderr), 2 bad usage, \
3 the daemon cannot be reached.";

/// What every daemon command takes.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket [default: /run/segward/control.sock].
    #[arg(long, value_name = "PATH", env = SOCKET_ENV)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct StatusArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct DevicesArgs {
    /// List the source addresses seen that no device owns instead.
    #[arg(long)]
    pub unknown: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct QuarantineArgs {
    /// The device id.
    pub device: String,
    /// Why (recorded in the audit log and shown by `segward devices`).
    #[arg(long, value_parser = non_empty)]
    pub reason: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct ReleaseArgs {
    /// The device id.
    pub device: String,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// For `bind` and `unbind`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct AddressArgs {
    /// The device id.
    pub device: String,
    /// An IPv4 or IPv6 address.
    #[arg(value_name = "ADDR")]
    pub address: IpAddr,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

pub type BindArgs = AddressArgs;
pub type UnbindArgs = AddressArgs;

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_HELP)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(text.to_owned())
    }
}

pub fn status(args: StatusArgs) -> ExitCode {
    execute(&args.daemon, Request::Status)
}

pub fn devices(args: DevicesArgs) -> ExitCode {
    execute(
        &args.daemon,
        Request::Devices {
            unknown: args.unknown,
        },
    )
}

pub fn quarantine(args: QuarantineArgs) -> ExitCode {
    execute(
        &args.daemon,
        Request::Quarantine {
            device: args.device,
            reason: args.reason,
        },
    )
}

pub fn release(args: ReleaseArgs) -> ExitCode {
    execute(
        &args.daemon,
        Request::Release {
            device: args.device,
        },
    )
}

pub fn bind(args: BindArgs) -> ExitCode {
    execute(
        &args.daemon,
        Request::Bind {
            device: args.device,
            address: args.address,
        },
    )
}

pub fn unbind(args: UnbindArgs) -> ExitCode {
    execute(
        &args.daemon,
        Request::Unbind {
            device: args.device,
            address: args.address,
        },
    )
}

pub fn reload(args: ReloadArgs) -> ExitCode {
    execute(&args.daemon, Request::Reload)
}

/// Sends `request`, prints the reply, and turns the outcome into the exit status.
fn execute(daemon: &DaemonArgs, request: Request) -> ExitCode {
    let socket = client::socket_path(daemon.socket.clone());
    let response = match client::call(&socket, &request) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("segward: {e}");
            return ExitCode::from(exit_code(&e));
        }
    };
    let reply = match response.into_result() {
        Ok(reply) => reply,
        Err(message) => {
            eprintln!("segward: {message}");
            // A refused peer cannot use the daemon, as if the socket's mode had stopped it.
            let refused = message == crate::control::server::NOT_ROOT;
            return ExitCode::from(if refused { 3 } else { 1 });
        }
    };
    let text = if daemon.json {
        let json = serde_json::to_string_pretty(&reply).expect("replies serialize");
        format!("{json}\n")
    } else {
        reply.as_ref().map(render).unwrap_or_default()
    };
    if write_stdout(&text) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn exit_code(error: &ClientError) -> u8 {
    match error {
        ClientError::RequestTooLong { .. } => 2,
        ClientError::Unreachable { .. }
        | ClientError::PermissionDenied { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io { .. }
        | ClientError::Protocol(_) => 3,
    }
}

/// A reply as text for people.
fn render(reply: &Reply) -> String {
    match reply {
        Reply::Status(status) => render_status(status),
        Reply::Devices { devices } => render_devices(devices),
        Reply::Unknown { sources } => render_unknown(sources),
        Reply::Done { message } => format!("{}\n", clean(message)),
    }
}

fn render_status(status: &StatusReport) -> String {
    let interfaces = if status.interfaces.is_empty() {
        "-".to_owned()
    } else {
        status.interfaces.join(", ")
    };
    let uptime = humantime::format_duration(Duration::from_secs(status.uptime_seconds));
    let mut fields = vec![
        ("version", status.version.clone()),
        ("policy", status.policy_dir.clone()),
        ("generation", status.generation.to_string()),
        ("mode", status.mode.clone()),
        ("interfaces", interfaces),
    ];
    if let Some(netns) = &status.netns {
        fields.push(("netns", netns.clone()));
    }
    fields.extend([
        ("segments", status.segments.to_string()),
        ("devices", status.devices.to_string()),
        ("quarantined", status.quarantined.to_string()),
        ("bound addresses", status.bound_addresses.to_string()),
        ("unknown sources", status.unknown_sources.to_string()),
        ("uptime", uptime.to_string()),
    ]);
    let width = fields
        .iter()
        .map(|(key, _)| key.len() + 1)
        .max()
        .unwrap_or(0);
    let mut text: String = fields
        .iter()
        .map(|(key, value)| format!("{:<width$} {}\n", format!("{key}:"), clean(value)))
        .collect();
    if !status.packets.is_empty() {
        text.push('\n');
        text.push_str(&table(
            &[
                Column::left("REASON"),
                Column::left("VERDICT"),
                Column::right("PACKETS"),
                Column::right("AUDITED"),
            ],
            status.packets.iter().map(|count| {
                vec![
                    count.reason.clone(),
                    count.verdict.clone(),
                    count.packets.to_string(),
                    count.audited.to_string(),
                ]
            }),
        ));
    }
    text
}

fn render_devices(devices: &[DeviceInfo]) -> String {
    if devices.is_empty() {
        return "no devices\n".into();
    }
    let mut text = table(
        &[
            Column::left("ID"),
            Column::left("SEGMENT"),
            Column::left("STATE"),
            Column::left("ADDRESSES"),
            Column::left("MAC"),
        ],
        devices.iter().map(|device| {
            let addresses = device
                .addresses
                .iter()
                .map(|a| format!("{}({})", a.address, a.source))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                device.id.clone(),
                device.segment.clone(),
                device.state.clone(),
                or_dash(addresses),
                or_dash(device.mac.clone().unwrap_or_default()),
            ]
        }),
    );
    let quarantined: Vec<String> = devices
        .iter()
        .filter_map(|device| {
            let q = device.quarantine.as_ref()?;
            Some(format!(
                "{}: quarantined since {} by {}: {}\n",
                clean(&device.id),
                clean(&q.since),
                clean(&q.by),
                clean(&q.reason)
            ))
        })
        .collect();
    if !quarantined.is_empty() {
        text.push('\n');
        text.extend(quarantined);
    }
    text
}

fn render_unknown(sources: &[UnknownSource]) -> String {
    if sources.is_empty() {
        return "no unknown sources\n".into();
    }
    table(
        &[
            Column::left("ADDRESS"),
            Column::left("MAC"),
            Column::right("PACKETS"),
            Column::left("FIRST SEEN"),
            Column::left("LAST SEEN"),
        ],
        sources.iter().map(|source| {
            vec![
                source.address.to_string(),
                source.mac.clone(),
                source.packets.to_string(),
                source.first_seen.clone(),
                source.last_seen.clone(),
            ]
        }),
    )
}

fn or_dash(text: String) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

/// Text from the daemon with control characters escaped, so that a reason with a newline
/// or a terminal escape cannot break the layout or the terminal.
fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

struct Column {
    title: &'static str,
    right: bool,
}

impl Column {
    fn left(title: &'static str) -> Column {
        Column {
            title,
            right: false,
        }
    }

    fn right(title: &'static str) -> Column {
        Column { title, right: true }
    }
}

/// Columns two spaces apart, each as wide as its widest cell; no trailing spaces.
fn table(columns: &[Column], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .map(|row| row.iter().map(|cell| clean(cell)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([column.title.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let titles = columns.iter().map(|c| c.title.to_owned()).collect();
    let mut text = String::new();
    for row in std::iter::once(titles).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(columns)
            .zip(&widths)
            .map(|((cell, column), &width)| {
                if column.right {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{BoundAddress, PacketCount, QuarantineInfo};

    #[test]
    fn status_is_aligned_key_value_lines_and_a_counter_table() {
        let status = StatusReport {
            version: "0.1.0".into(),
            policy_dir: "/etc/segward/segments".into(),
            generation: 7,
            mode: "audit".into(),
            interfaces: vec!["eth1".into(), "eth0".into()],
            netns: None,
            segments: 3,
            devices: 12,
            quarantined: 1,
            bound_addresses: 14,
            unknown_sources: 2,
            uptime_seconds: 3723,
            packets: vec![
                PacketCount {
                    reason: "allow".into(),
                    verdict: "pass".into(),
                    packets: 123456,
                    audited: 0,
                },
                PacketCount {
                    reason: "default_deny".into(),
                    verdict: "drop".into(),
                    packets: 9,
                    audited: 9,
                },
            ],
        };
        assert_eq!(
            render(&Reply::Status(status)),
            "\
version:         0.1.0
policy:          /etc/segward/segments
generation:      7
mode:            audit
interfaces:      eth1, eth0
segments:        3
devices:         12
quarantined:     1
bound addresses: 14
unknown sources: 2
uptime:          1h 2m 3s

REASON        VERDICT  PACKETS  AUDITED
allow         pass      123456        0
default_deny  drop           9        9
"
        );
    }

    #[test]
    fn devices_are_a_table_with_the_quarantines_below() {
        let devices = vec![
            DeviceInfo {
                id: "temp-001".into(),
                segment: "sensors".into(),
                mac: Some("02:00:00:00:10:01".into()),
                addresses: vec![
                    BoundAddress {
                        address: "10.20.1.11".parse().unwrap(),
                        source: "static".into(),
                    },
                    BoundAddress {
                        address: "2001:db8::11".parse().unwrap(),
                        source: "lease".into(),
                    },
                ],
                state: "active".into(),
                quarantine: None,
            },
            DeviceInfo {
                id: "cam-3".into(),
                segment: "cameras".into(),
                mac: None,
                addresses: vec![],
                state: "quarantined".into(),
                quarantine: Some(QuarantineInfo {
                    reason: "port scan\x1b[2J".into(),
                    since: "2024-05-01T12:00:00Z".into(),
                    by: "manual".into(),
                }),
            },
        ];
        assert_eq!(
            render(&Reply::Devices { devices }),
            "\
ID        SEGMENT  STATE        ADDRESSES                               MAC
temp-001  sensors  active       10.20.1.11(static),2001:db8::11(lease)  02:00:00:00:10:01
cam-3     cameras  quarantined  -                                       -

cam-3: quarantined since 2024-05-01T12:00:00Z by manual: port scan\\u{1b}[2J
"
        );
        assert_eq!(render(&Reply::Devices { devices: vec![] }), "no devices\n");
    }

    #[test]
    fn unknown_sources_are_a_table() {
        let sources = vec![UnknownSource {
            address: "10.20.1.99".parse().unwrap(),
            mac: "02:00:00:00:99:99".into(),
            first_seen: "2024-05-01T12:00:00Z".into(),
            last_seen: "2024-05-01T12:05:00Z".into(),
            packets: 42,
        }];
        assert_eq!(
            render(&Reply::Unknown { sources }),
            "\
ADDRESS     MAC                PACKETS  FIRST SEEN            LAST SEEN
10.20.1.99  02:00:00:00:99:99       42  2024-05-01T12:00:00Z  2024-05-01T12:05:00Z
"
        );
        assert_eq!(
            render(&Reply::Unknown { sources: vec![] }),
            "no unknown sources\n"
        );
        assert_eq!(
            render(&Reply::Done {
                message: "released cam-3".into()
            }),
            "released cam-3\n"
        );
    }

    #[test]
    fn an_unreachable_daemon_is_exit_3_and_an_oversized_request_exit_2() {
        let unreachable = client::call(
            std::path::Path::new("/nonexistent/segward.sock"),
            &Request::Status,
        )
        .unwrap_err();
        assert_eq!(exit_code(&unreachable), 3);
        assert_eq!(exit_code(&ClientError::RequestTooLong { len: 1 << 20 }), 2);
    }
}
