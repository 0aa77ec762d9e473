//! The real `segward` binary as a child process: started, waited for until it says it is
//! `enforcing`, its output captured (and dumped when a test panics), stopped on drop.

use std::io::{BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Path of the `segward` binary: the one cargo built for this test run; in a program that
/// is not one of segward's tests (`cargo xtask demo` includes the lab), `$SEGWARD_BIN`.
pub fn segward_bin() -> &'static str {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_segward") {
        return bin;
    }
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("SEGWARD_BIN")
            .unwrap_or_else(|_| panic!("lab: set SEGWARD_BIN to the segward binary to run"))
    })
}

/// Runs `segward ARGS...` (a CLI command such as `check`, `explain`, `status`) to
/// completion in the host namespaces and returns its output.
pub fn segward(args: &[&str]) -> Output {
    Command::new(segward_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", segward_bin(), args.join(" ")))
}

/// How long `start` waits for the daemon to report `enforcing`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long drop/stop waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Captured {
    stdout: String,
    stderr: String,
    /// Both streams, line by line in arrival order.
    combined: String,
    open_streams: u8,
}

struct Logs {
    captured: Mutex<Captured>,
    changed: Condvar,
}

/// A running daemon. Dropping it sends SIGTERM, waits up to 5 s, then SIGKILL; if the
/// test is panicking at that point, the daemon's output is printed to stderr (libtest
/// shows it with the failure).
///
/// The lifetime ties a daemon started by `Lab::start_segward` to its lab, so the daemon is
/// always stopped before the lab's namespaces go away.
pub struct Daemon<'lab> {
    child: Child,
    label: String,
    logs: Arc<Logs>,
    status: Option<ExitStatus>,
    /// stop()/kill9() was called: an exit is expected.
    exit_requested: bool,
    dumped: bool,
    _lab: PhantomData<&'lab ()>,
}

/// True if `line` contains `word` as a whole word (case-insensitive).
fn has_word(line: &str, word: &str) -> bool {
    line.split(|c: char| !c.is_alphanumeric() && c != '_')
        .any(|w| w.eq_ignore_ascii_case(word))
}

impl Daemon<'static> {
    /// Spawns `cmd` (stdout/stderr captured, stdin null) and waits up to `ready_timeout`
    /// for a line containing the word `enforcing` (stderr is where segward logs; stdout is
    /// accepted too). Panics with the captured output if the process exits first or the
    /// timeout passes (the process is then killed).
    ///
    /// The child gets PR_SET_PDEATHSIG(SIGKILL), so it dies if the test process does. That
    /// signal follows the *thread* that spawned it: call this from the test's own thread
    /// (as `Lab::start_segward` does), not from a short-lived helper thread.
    pub fn start(mut cmd: Command, ready_timeout: Duration) -> Daemon<'static> {
        let label = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies without running our Drop, take the daemon
                // with it instead of leaving it behind.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let logs = Arc::new(Logs {
            captured: Mutex::new(Captured {
                open_streams: 2,
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        spawn_reader(stdout, logs.clone(), false);
        spawn_reader(stderr, logs.clone(), true);
        let mut daemon = Daemon {
            child,
            label,
            logs,
            status: None,
            exit_requested: false,
            dumped: false,
            _lab: PhantomData,
        };
        daemon.wait_ready(ready_timeout);
        daemon
    }
}

fn spawn_reader(stream: impl Read + Send + 'static, logs: Arc<Logs>, is_stderr: bool) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut line = String::from_utf8_lossy(&buf).into_owned();
                    if !line.ends_with('\n') {
                        line.push('\n');
                    }
                    let mut c = logs.captured.lock().unwrap();
                    if is_stderr {
                        c.stderr.push_str(&line);
                    } else {
                        c.stdout.push_str(&line);
                    }
                    c.combined.push_str(&line);
                    drop(c);
                    logs.changed.notify_all();
                }
            }
        }
        logs.captured.lock().unwrap().open_streams -= 1;
        logs.changed.notify_all();
    });
}

impl Daemon<'_> {
    fn wait_ready(&mut self, timeout: Duration) {
        let found = self.wait_until(timeout, |c| {
            c.stderr
                .lines()
                .chain(c.stdout.lines())
                .any(|l| has_word(l, "enforcing"))
        });
        if found {
            return;
        }
        let why = match self.try_status() {
            Some(status) => format!("exited ({status}) before it reported `enforcing`"),
            None => {
                self.kill9();
                format!("did not report `enforcing` within {timeout:?} (killed)")
            }
        };
        self.dumped = true;
        panic!(
            "segward {why}\ncommand: {}\n{}",
            self.label,
            self.transcript()
        );
    }

    /// Waits until `pred` holds for the captured output, the process exits and its
    /// streams close, or `timeout` passes. Returns whether `pred` held.
    fn wait_until(&mut self, timeout: Duration, pred: impl Fn(&Captured) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut exited_at = None;
        loop {
            let c = self.logs.captured.lock().unwrap();
            if pred(&c) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let drained = c.open_streams == 0;
            drop(c);
            if exited_at.is_none() && self.try_status().is_some() {
                exited_at = Some(now);
            }
            // Exited: give the readers a moment to drain the pipes (a grandchild could
            // hold them open forever), then give up.
            if exited_at.is_some_and(|t| drained || now - t > Duration::from_millis(500)) {
                let c = self.logs.captured.lock().unwrap();
                return pred(&c);
            }
            let c = self.logs.captured.lock().unwrap();
            let slice = (deadline - now).min(Duration::from_millis(50));
            drop(self.logs.changed.wait_timeout(c, slice).unwrap());
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// A field (`packets`, `audited`, `events_suppressed`) of a `counter` line the daemon
    /// logs when it stops; `reason` picks the line (`None`: the line without a reason).
    pub fn logged_counter(&self, reason: Option<&str>, field: &str) -> Option<u64> {
        let output = self.output_so_far();
        let line = output.lines().find(|l| {
            l.contains(" counter")
                && match reason {
                    Some(r) => l.contains(&format!("reason=\"{r}\"")),
                    None => l.contains(&format!("{field}=")),
                }
        })?;
        line.split(&format!("{field}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Everything the daemon printed so far (stdout and stderr, in arrival order).
    pub fn output_so_far(&self) -> String {
        self.logs.captured.lock().unwrap().combined.clone()
    }
    pub fn stdout_so_far(&self) -> String {
        self.logs.captured.lock().unwrap().stdout.clone()
    }
    pub fn stderr_so_far(&self) -> String {
        self.logs.captured.lock().unwrap().stderr.clone()
    }

    /// Waits up to `timeout` for an output line (either stream) containing `needle`.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.combined.lines().any(|l| l.contains(needle)))
    }

    /// SIGKILL (a crash, as far as the daemon can tell) and reap. Idempotent.
    pub fn kill9(&mut self) -> ExitStatus {
        self.exit_requested = true;
        if let Some(s) = self.try_status() {
            return s;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for segward");
        self.status = Some(status);
        status
    }

    /// SIGTERM, wait up to 5 s for a clean exit, else SIGKILL. Returns the exit status
    /// (check `.success()` / `.code()` to assert a graceful shutdown). Idempotent.
    pub fn stop(&mut self) -> ExitStatus {
        self.exit_requested = true;
        if let Some(s) = self.try_status() {
            return s;
        }
        // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lab: segward ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL");
        self.kill9()
    }

    fn transcript(&self) -> String {
        format!(
            "---- segward output (pid {}) ----\n{}---- end of segward output ----",
            self.child.id(),
            self.output_so_far()
        )
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let died_unasked = !self.exit_requested && self.try_status().is_some();
        let status = self.stop();
        if self.dumped {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "segward ({}) exit status: {status}\n{}",
                self.label,
                self.transcript()
            );
        } else if died_unasked {
            eprintln!(
                "lab: note: segward exited on its own during the test ({status})\n{}",
                self.transcript()
            );
        }
    }
}
