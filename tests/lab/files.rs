//! The daemon's files and socket as a test sees them: the dnsmasq lease file it learns
//! addresses from, the JSON-lines audit log it writes, and its control commands' `--json`
//! replies.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{IpLike, Lab};

/// How often `wait_until` looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

impl Lab {
    /// Where the lab keeps its dnsmasq lease file (for `segward run --dhcp-leases`).
    pub fn lease_file(&self) -> PathBuf {
        self.dir().join("dnsmasq.leases")
    }

    /// Rewrites the lease file in place (truncate, then write), as dnsmasq does: one lease
    /// per `(device, address)`, on that device's MAC, expiring in an hour. IPv6 leases are
    /// written as DHCPv6 leases (after the server's `duid` line) whose client DUID is a
    /// DUID-LL of the device's MAC.
    pub fn write_leases(&self, leases: &[(&str, &str)]) {
        self.write_leases_expiring(leases, Duration::from_secs(3600));
    }

    /// `write_leases` with leases that expire `after` from now (rounded up to a second).
    pub fn write_leases_expiring(&self, leases: &[(&str, &str)], after: Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970");
        let expiry = (now + after).as_secs() + 1;
        let (v4, v6): (Vec<_>, Vec<_>) = leases
            .iter()
            .map(|(device, addr)| (*device, addr.to_ip()))
            .partition(|(_, addr)| addr.is_ipv4());
        let mut text = String::new();
        for (device, addr) in v4 {
            text += &format!("{expiry} {} {addr} {device} *\n", self.device_mac(device));
        }
        if !v6.is_empty() {
            text += "duid 00:01:00:01:2c:5a:3b:1e:02:5a:00:9a:ff:ff\n";
        }
        for (iaid, (device, addr)) in v6.into_iter().enumerate() {
            let duid = format!("00:03:00:01:{}", self.device_mac(device));
            text += &format!("{expiry} {} {addr} {device} {duid}\n", iaid + 1);
        }
        std::fs::write(self.lease_file(), text).expect("lab: writing the lease file");
    }

    /// Where the lab's daemon writes its audit log (for `segward run --audit-log`).
    pub fn audit_log(&self) -> PathBuf {
        self.dir().join("audit.jsonl")
    }

    /// Every event of the audit log so far (complete lines); panics on a line that is not a
    /// JSON object.
    pub fn audit_events(&self) -> Vec<Value> {
        let text = match std::fs::read_to_string(self.audit_log()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("lab: reading the audit log: {e}"),
        };
        // A line still being written (no newline yet) is left for the next read.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("audit log line is not JSON ({e}): {line:?}"));
                assert!(value.is_object(), "audit log line is not an object: {line}");
                value
            })
            .collect()
    }

    /// Waits up to `timeout` for an audit event that `pred` accepts, and returns it.
    pub fn wait_for_audit(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        wait_until(timeout, || {
            self.audit_events().into_iter().find(|e| pred(e))
        })
    }

    /// `segward ARGS... --json` against the lab's daemon: panics (with its stderr) unless it
    /// exits 0, returns the parsed reply.
    #[track_caller]
    pub fn control_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.control(&all);
        assert!(
            out.status.success(),
            "`segward {}` failed ({}): {}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`segward {}` printed no JSON ({e}): {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The daemon's view of one device (`segward devices --json`).
    #[track_caller]
    pub fn device_info(&self, device: &str) -> Value {
        let reply = self.control_json(&["devices"]);
        reply["devices"]
            .as_array()
            .unwrap_or_else(|| panic!("`devices --json` has no device list: {reply}"))
            .iter()
            .find(|d| d["id"] == device)
            .cloned()
            .unwrap_or_else(|| panic!("`devices --json` does not list {device}: {reply}"))
    }

    /// The addresses the daemon has for `device`, as `address(source)` strings, sorted.
    #[track_caller]
    pub fn bound_addresses(&self, device: &str) -> Vec<String> {
        let info = self.device_info(device);
        let mut out: Vec<String> = info["addresses"]
            .as_array()
            .unwrap_or_else(|| panic!("no addresses in {info}"))
            .iter()
            .map(|a| {
                format!(
                    "{}({})",
                    a["address"].as_str().unwrap_or("?"),
                    a["source"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out.sort();
        out
    }
}
