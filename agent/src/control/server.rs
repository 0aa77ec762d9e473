//! The daemon's side of the control socket.
//!
//! [`bind`] makes the socket (mode 0600, never wider, not even for a moment);
//! [`ControlListener::serve`] accepts connections, checks that the peer is root, reads
//! requests line by line and hands each valid one to the daemon as a [`Call`]: the request
//! and a oneshot for its response. What is not a valid request is answered here and never
//! reaches the daemon.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::protocol::{Request, Response, MAX_MESSAGE_BYTES};

/// One request for the daemon, with where its response goes.
pub type Call = (Request, oneshot::Sender<Response>);

/// How long a client may take to send one request (counted from the previous response).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read one response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the check for a live daemon on an existing socket waits for its connect.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

pub const SHUTTING_DOWN: &str = "the daemon is shutting down";
pub const NOT_ROOT: &str = "permission denied: the control socket is for root";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "control socket {} is in use: another segward daemon answers on it",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "control socket {} exists and is not a socket; not replacing it",
        path.display()
    )]
    NotASocket { path: PathBuf },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ControlError + 'a {
    move |source| ControlError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A bound control socket. Dropping it removes the socket file (if it is still this one).
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file, to remove only our own on drop.
    identity: (u64, u64),
    own_uid: u32,
}

/// Makes the control socket at `path`: creates its directory (mode 0755) if missing, refuses
/// if a daemon answers on an existing socket, replaces a stale one.
///
/// The socket is bound in a private (0700) directory next to `path`, set to 0600 and then
/// renamed into place, so it never appears with a wider mode and the process umask (shared
/// by all threads) is left alone.
pub async fn bind(path: &Path) -> Result<ControlListener, ControlError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(io_error("create the directory", parent))?;

    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::time::timeout(LIVENESS_TIMEOUT, UnixStream::connect(path)).await {
                // A daemon that answers, or one too busy to accept within the timeout.
                Ok(Ok(_)) | Err(_) => {
                    return Err(ControlError::InUse {
                        path: path.to_owned(),
                    })
                }
                // Stale: left by a daemon that is gone. The rename below replaces it.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing a stale control socket");
                }
                Ok(Err(e)) => return Err(io_error("check the existing socket", path)(e)),
            }
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
    }

    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let private = parent.join(format!(
        ".segward-bind-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    // Left over from a crashed daemon that had the same pid.
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_error("create the directory", &private))?;
    let temporary = private.join("s");
    let bound = bind_private(&temporary, path);
    let _ = fs::remove_file(&temporary);
    let _ = fs::remove_dir(&private);
    let listener = bound?;

    let meta = fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    listener
        .set_nonblocking(true)
        .map_err(io_error("set up", path))?;
    let listener = UnixListener::from_std(listener).map_err(io_error("set up", path))?;
    Ok(ControlListener {
        listener,
        path: path.to_owned(),
        identity: (meta.dev(), meta.ino()),
        // SAFETY: geteuid has no preconditions and cannot fail.
        own_uid: unsafe { libc::geteuid() },
    })
}

fn bind_private(
    temporary: &Path,
    path: &Path,
) -> Result<std::os::unix::net::UnixListener, ControlError> {
    let listener = std::os::unix::net::UnixListener::bind(temporary)
        .map_err(io_error("bind the control socket", path))?;
    fs::set_permissions(temporary, fs::Permissions::from_mode(0o600))
        .map_err(io_error("set the mode of", path))?;
    fs::rename(temporary, path).map_err(io_error("move the control socket to", path))?;
    Ok(listener)
}

impl ControlListener {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the future is dropped (which also closes the connections
    /// being served): one task per connection, each valid request sent on `calls`.
    pub async fn serve(self, calls: mpsc::Sender<Call>) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(stream, calls.clone(), self.own_uid));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "control socket: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Only the socket this listener made: a daemon that took over the path keeps its own.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Whether a peer with `peer_uid` may use the socket of a daemon running as `own_uid`:
/// root, or the daemon's own user (so that a daemon run by a user in tests works for them).
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

async fn serve_connection(stream: UnixStream, calls: mpsc::Sender<Call>, own_uid: u32) {
    let peer = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    match peer {
        Ok(peer) if peer_allowed(peer.uid(), own_uid) => {}
        Ok(peer) => {
            tracing::warn!(uid = peer.uid(), pid = ?peer.pid(), "control socket: refused a peer that is not root");
            let _ = write_response(&mut write, &Response::error(NOT_ROOT)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read the peer's credentials");
            let _ = write_response(
                &mut write,
                &Response::error(format!("cannot check the peer's credentials: {e}")),
            )
            .await;
            return;
        }
    }

    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let response = match read_line(&mut reader, &mut line).await {
            Line::Eof | Line::Failed => return,
            Line::Idle => return,
            Line::TimedOut => {
                let message = format!(
                    "request timed out: no complete line within {}s",
                    READ_TIMEOUT.as_secs()
                );
                let _ = write_response(&mut write, &Response::error(message)).await;
                return;
            }
            Line::TooLong => {
                // The rest of the line is not read: the connection ends here.
                let message = format!("message too long (limit {MAX_MESSAGE_BYTES} bytes)");
                let _ = write_response(&mut write, &Response::error(message)).await;
                return;
            }
            Line::Complete if line.trim_ascii().is_empty() => continue,
            Line::Complete => match Request::parse(&line) {
                Ok(request) => call(&calls, request).await,
                Err(message) => Response::error(message),
            },
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

enum Line {
    /// A request line (without its newline) is in the buffer.
    Complete,
    /// The client closed the connection between requests.
    Eof,
    /// No byte of a next request within the timeout.
    Idle,
    /// Part of a request, and not the rest within the timeout.
    TimedOut,
    /// More than MAX_MESSAGE_BYTES without a newline.
    TooLong,
    Failed,
}

/// Reads one line of at most MAX_MESSAGE_BYTES (plus its newline) into `line`; never buffers
/// more than that.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> Line {
    let limit = MAX_MESSAGE_BYTES as u64 + 1;
    let read = tokio::time::timeout(
        READ_TIMEOUT,
        (&mut *reader).take(limit).read_until(b'\n', line),
    )
    .await;
    match read {
        Err(_) if line.is_empty() => Line::Idle,
        Err(_) => Line::TimedOut,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control socket: read failed");
            Line::Failed
        }
        Ok(Ok(0)) => Line::Eof,
        Ok(Ok(_)) if line.last() == Some(&b'\n') => {
            line.pop();
            Line::Complete
        }
        Ok(Ok(n)) if n as u64 >= limit => Line::TooLong,
        // The last request, without a newline before the end of the stream.
        Ok(Ok(_)) => Line::Complete,
    }
}

async fn call(calls: &mpsc::Sender<Call>, request: Request) -> Response {
    let (respond, response) = oneshot::channel();
    if calls.send((request, respond)).await.is_err() {
        return Response::error(SHUTTING_DOWN);
    }
    response
        .await
        .unwrap_or_else(|_| Response::error(SHUTTING_DOWN))
}

async fn write_response<W: AsyncWrite + Unpin>(
    write: &mut W,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&line)).await {
        Ok(written) => written,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixStream as StdStream,
    };

    use super::*;
    use crate::control::protocol::Reply;

    /// A bound socket in a fresh directory, served on a task; the receiver gets the calls.
    async fn served() -> (tempfile::TempDir, PathBuf, mpsc::Receiver<Call>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let listener = bind(&path).await.unwrap();
        let (calls, receiver) = mpsc::channel(8);
        tokio::spawn(listener.serve(calls));
        (dir, path, receiver)
    }

    /// Sends `lines` (raw bytes) on one connection and reads `answers` response lines, on a
    /// blocking thread like the CLI does.
    async fn exchange(path: &Path, bytes: Vec<u8>, answers: usize) -> Vec<Response> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let stream = StdStream::connect(&path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            // Written from another thread: the server may stop reading (a too-long line)
            // before all is written.
            let writer = stream.try_clone().unwrap();
            let writing = std::thread::spawn(move || {
                let _ = (&writer).write_all(&bytes);
            });
            let mut reader = BufReader::new(&stream);
            let mut responses = Vec::new();
            for _ in 0..answers {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                assert!(line.ends_with('\n'), "incomplete line {line:?}");
                responses.push(serde_json::from_str(&line).unwrap());
            }
            writing.join().unwrap();
            responses
        })
        .await
        .unwrap()
    }

    fn error_of(response: &Response) -> &str {
        assert!(!response.ok, "{response:?}");
        assert_eq!(response.reply, None);
        response.error.as_deref().unwrap()
    }

    #[tokio::test]
    async fn a_request_reaches_the_daemon_and_its_response_comes_back() {
        let (_dir, path, mut receiver) = served().await;
        let daemon = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, respond)) = receiver.recv().await {
                let message = format!("done {}", request.command());
                seen.push(request);
                respond.send(Response::ok(Reply::Done { message })).unwrap();
                if seen.len() == 2 {
                    return seen;
                }
            }
            seen
        });
        let responses = exchange(
            &path,
            b"{\"command\":\"bind\",\"device\":\"temp-001\",\"address\":\"10.20.1.11\"}\n\n\
              {\"command\":\"reload\"}\n"
                .to_vec(),
            2,
        )
        .await;
        assert_eq!(
            responses,
            [
                Response::ok(Reply::Done {
                    message: "done bind".into()
                }),
                Response::ok(Reply::Done {
                    message: "done reload".into()
                }),
            ]
        );
        assert_eq!(
            daemon.await.unwrap(),
            [
                Request::Bind {
                    device: "temp-001".into(),
                    address: "10.20.1.11".parse().unwrap()
                },
                Request::Reload
            ]
        );
    }

    #[tokio::test]
    async fn bad_requests_are_answered_here_and_never_reach_the_daemon() {
        let (_dir, path, mut receiver) = served().await;
        let responses = exchange(
            &path,
            b"garbage\n\
              {\"command\":\"frobnicate\"}\n\
              {\"command\":\"bind\",\"device\":\"temp-001\",\"address\":\"10.20.1.300\"}\n\
              \xff\xfe\n\
              {\"command\":\"release\"}\n"
                .to_vec(),
            5,
        )
        .await;
        let errors: Vec<&str> = responses.iter().map(error_of).collect();
        assert!(errors[0].starts_with("bad request: not JSON"), "{errors:?}");
        assert!(
            errors[1].starts_with("bad request: unknown command \"frobnicate\""),
            "{errors:?}"
        );
        assert_eq!(errors[2], "bad request: bind: invalid IP address syntax");
        assert!(
            errors[3].starts_with("bad request: not UTF-8"),
            "{errors:?}"
        );
        assert_eq!(errors[4], "bad request: release: missing field `device`");
        assert!(
            receiver.try_recv().is_err(),
            "a bad request reached the daemon"
        );
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_refused_and_ends_the_connection() {
        let (_dir, path, mut receiver) = served().await;
        // A valid request, padded with spaces to 1 MiB: it must not be read, let alone sent.
        let mut bytes = br#"{"command":"reload"}"#.to_vec();
        bytes.resize(1024 * 1024, b' ');
        bytes.extend_from_slice(b"\n{\"command\":\"status\"}\n");
        let responses = exchange(&path, bytes, 1).await;
        assert_eq!(
            error_of(&responses[0]),
            "message too long (limit 65536 bytes)"
        );
        assert!(
            receiver.try_recv().is_err(),
            "a long line reached the daemon"
        );

        // Exactly at the limit is fine.
        let mut bytes = br#"{"command":"reload"}"#.to_vec();
        bytes.resize(MAX_MESSAGE_BYTES, b' ');
        bytes.push(b'\n');
        let path2 = path.clone();
        let client = tokio::spawn(async move { exchange(&path2, bytes, 1).await });
        let (request, respond) = receiver.recv().await.unwrap();
        assert_eq!(request, Request::Reload);
        respond.send(Response::error("busy")).unwrap();
        assert_eq!(client.await.unwrap(), [Response::error("busy")]);
    }

    #[tokio::test]
    async fn a_daemon_that_is_gone_is_reported() {
        let (_dir, path, receiver) = served().await;
        drop(receiver);
        let responses = exchange(&path, b"{\"command\":\"status\"}\n".to_vec(), 1).await;
        assert_eq!(error_of(&responses[0]), SHUTTING_DOWN);

        // And one that drops the call unanswered.
        let (_dir, path, mut receiver) = served().await;
        tokio::spawn(async move {
            while let Some(call) = receiver.recv().await {
                drop(call);
            }
        });
        let responses = exchange(&path, b"{\"command\":\"status\"}\n".to_vec(), 1).await;
        assert_eq!(error_of(&responses[0]), SHUTTING_DOWN);
    }

    #[tokio::test]
    async fn the_socket_is_0600_in_a_created_0755_directory_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/segward/control.sock");
        let listener = bind(&path).await.unwrap();
        assert_eq!(listener.path(), path);
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let parent = fs::metadata(path.parent().unwrap()).unwrap();
        // 0755, or less if the umask takes more away; never writable by others.
        assert_eq!(parent.permissions().mode() & 0o7777 & !0o755, 0);
        assert_eq!(parent.permissions().mode() & 0o700, 0o700);
        // Nothing is left of the private directory the socket was bound in.
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["control.sock"]);
        drop(listener);
        assert!(!path.exists(), "the socket file outlived its listener");
    }

    #[tokio::test]
    async fn a_live_socket_is_in_use_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");

        let first = bind(&path).await.unwrap();
        match bind(&path).await {
            Err(ControlError::InUse { path: p }) => assert_eq!(p, path),
            other => panic!("expected InUse, got {other:?}"),
        }
        // The failed attempt left the first daemon's socket alone.
        assert!(StdStream::connect(&path).is_ok());
        drop(first);

        // A socket file whose daemon is gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(StdStream::connect(&path).is_err());
        let listener = bind(&path).await.unwrap();
        assert!(StdStream::connect(&path).is_ok());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Dropping a listener whose file was replaced by another's leaves the other's alone.
        fs::remove_file(&path).unwrap();
        let second = bind(&path).await.unwrap();
        drop(listener);
        assert!(path.exists());
        assert!(StdStream::connect(&path).is_ok());
        drop(second);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn something_else_at_the_path_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind(&path).await,
            Err(ControlError::NotASocket { .. })
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn only_root_and_the_daemons_own_user_may_talk() {
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
        assert!(!peer_allowed(1000, 0));
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
    }

    /// A real peer that is not root, when the tests run as root: a thread drops to uid
    /// 65534 with the raw setuid syscall, which (unlike libc's setuid) changes only the
    /// calling thread's credentials.
    #[tokio::test]
    async fn a_peer_that_is_not_root_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to connect as another user");
            return;
        }
        let (_dir, path, mut receiver) = served().await;
        let as_nobody = |socket: PathBuf| async move {
            tokio::task::spawn_blocking(move || {
                std::thread::spawn(move || {
                    // SAFETY: a raw syscall with an integer argument; it affects this thread
                    // only, and the thread ends after the call.
                    if unsafe { libc::syscall(libc::SYS_setuid, 65534) } != 0 {
                        return None;
                    }
                    Some(crate::control::client::call(&socket, &Request::Status))
                })
                .join()
                .unwrap()
            })
            .await
            .unwrap()
        };
        // The 0600 mode keeps other users out first of all ...
        let Some(denied) = as_nobody(path.clone()).await else {
            eprintln!("skipped: cannot setuid in this environment");
            return;
        };
        assert!(
            matches!(
                denied,
                Err(crate::control::client::ClientError::PermissionDenied { .. })
            ),
            "{denied:?}"
        );
        // ... and with the mode opened up, the credential check does.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let refused = as_nobody(path.clone()).await.unwrap().unwrap();
        assert_eq!(refused, Response::error(NOT_ROOT));
        assert!(
            receiver.try_recv().is_err(),
            "a non-root request reached the daemon"
        );
    }
}
