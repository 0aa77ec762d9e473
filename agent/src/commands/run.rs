//! `segward run`: the daemon's command line. Flags override the configuration file
//! (`-c segward.yaml`), which overrides the defaults of SPEC §4.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, ValueEnum};

use crate::{
    config::{self, DaemonConfig, LogFormat},
    daemon::{self, RunOptions},
    policy::load::LoadError,
};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The configuration file (SPEC §4); flags given here override it.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Directory of segment files.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Device-facing interface (repeat for several).
    #[arg(long = "device-iface")]
    device_ifaces: Vec<String>,
    /// Uplink interface (repeat for several).
    #[arg(long = "uplink-iface")]
    uplink_ifaces: Vec<String>,
    /// Let would-be drops pass and count them (whole agent).
    #[arg(long)]
    audit: bool,
    /// Work on the interfaces of this named network namespace (`ip netns`).
    #[arg(long)]
    netns: Option<String>,
    /// Remove programs, links and maps on exit; by default they stay pinned and go on
    /// enforcing until a restarted daemon adopts them.
    #[arg(long)]
    detach_on_exit: bool,
    /// Where quarantines and bound addresses are kept across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The JSON-lines audit log.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// A dnsmasq lease file to learn device addresses from.
    #[arg(long)]
    dhcp_leases: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

impl RunArgs {
    /// The configuration in force: the file's, then the flags over it.
    fn config(self) -> Result<(DaemonConfig, Option<String>, bool), config::ConfigError> {
        let mut c = match &self.config {
            Some(path) => config::load(path)?,
            None => DaemonConfig::default(),
        };
        let set = |slot: &mut Option<PathBuf>, flag: Option<PathBuf>| {
            if flag.is_some() {
                *slot = flag;
            }
        };
        set(&mut c.policy, self.policy);
        set(&mut c.audit_log, self.audit_log);
        set(&mut c.dhcp_leases, self.dhcp_leases);
        if !self.device_ifaces.is_empty() {
            c.device_ifaces = self.device_ifaces;
        }
        if !self.uplink_ifaces.is_empty() {
            c.uplink_ifaces = self.uplink_ifaces;
        }
        c.audit |= self.audit;
        if let Some(dir) = self.state_dir {
            c.state_dir = dir;
        }
        if let Some(socket) = self.socket {
            c.socket = socket;
        }
        if self.metrics.is_some() {
            c.metrics = self.metrics;
        }
        if let Some(format) = self.log_format {
            c.log_format = match format {
                LogFormatArg::Human => LogFormat::Human,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        Ok((c, self.netns, self.detach_on_exit))
    }
}

pub fn run(args: RunArgs) -> ExitCode {
    let (config, netns, detach_on_exit) = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("segward: {e}");
            return ExitCode::from(2);
        }
    };
    if config.policy.is_none() || config.device_ifaces.is_empty() {
        eprintln!(
            "segward: run needs a policy directory and at least one device interface \
             (--policy DIR --device-iface IF, or `policy:` and `interfaces: {{devices: [...]}}` in -c FILE)"
        );
        return ExitCode::from(2);
    }
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("segward: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = RunOptions {
        config,
        netns,
        detach_on_exit,
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segward: {}", error_text(&e));
            if e.downcast_ref::<LoadError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// An error and its causes, each once: most error types here already name their cause in
/// their own message, which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
