//! The CLI's side of the control socket: one blocking request and its response.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{
    Request, Response, DEFAULT_SOCKET, MAX_MESSAGE_BYTES, MAX_REPLY_BYTES, SOCKET_ENV,
};

/// How long one read or write on the socket may block.
pub const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no segward daemon at {}: {source} (is `segward run` running?)", path.display())]
    Unreachable { path: PathBuf, source: io::Error },
    #[error("permission denied on {}: the control socket is for root", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("the daemon at {} did not answer within {}s", path.display(), TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("talking to the daemon at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("request too long: {len} bytes (limit {MAX_MESSAGE_BYTES} bytes)")]
    RequestTooLong { len: usize },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// The socket to use: `flag` (`--socket`), else `$SEGWARD_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.filter(|p| !p.as_os_str().is_empty())
        .or_else(|| {
            std::env::var_os(SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Sends `request` to the daemon at `socket` and returns its response (which may be an
/// error the daemon reported: see [`Response::into_result`]).
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(ClientError::RequestTooLong { len: line.len() });
    }
    line.push(b'\n');

    let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: socket.to_owned(),
        },
        _ => ClientError::Unreachable {
            path: socket.to_owned(),
            source,
        },
    })?;
    let failed = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: socket.to_owned(),
        },
        _ => ClientError::Io {
            path: socket.to_owned(),
            source,
        },
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;

    let written = (&stream).write_all(&line);
    if let Err(e) = &written {
        // A daemon that refuses a request closes the connection after answering: read why.
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(failed(written.unwrap_err()));
        }
    }

    let mut answer = Vec::new();
    let read = BufReader::new(&stream)
        .take(MAX_REPLY_BYTES as u64 + 1)
        .read_until(b'\n', &mut answer);
    match read {
        Ok(_) if answer.last() == Some(&b'\n') => {}
        Ok(_) if answer.len() > MAX_REPLY_BYTES => {
            return Err(ClientError::Protocol(format!(
                "the response is longer than {MAX_REPLY_BYTES} bytes"
            )))
        }
        Ok(_) if answer.is_empty() => {
            return Err(match written {
                Err(e) => failed(e),
                Ok(()) => ClientError::Protocol(
                    "the daemon closed the connection without answering".into(),
                ),
            })
        }
        Ok(_) => {
            return Err(ClientError::Protocol(
                "the daemon closed the connection in the middle of its answer".into(),
            ))
        }
        Err(e) => return Err(failed(e)),
    }
    serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::control::{
        protocol::Reply,
        server::{self, Call},
    };

    #[test]
    fn no_daemon_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("control.sock");
        match call(&missing, &Request::Status) {
            Err(e @ ClientError::Unreachable { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with("no segward daemon at "), "{text}");
                assert!(text.ends_with("(is `segward run` running?)"), "{text}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        // A stale socket file: nobody listens.
        drop(UnixListener::bind(&missing).unwrap());
        assert!(matches!(
            call(&missing, &Request::Status),
            Err(ClientError::Unreachable { .. })
        ));
    }

    #[test]
    fn a_daemon_that_hangs_up_or_talks_nonsense_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let daemon = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            drop(stream);
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"ok\":\"maybe\"}\n").unwrap();
            line
        });
        let hung_up = call(&path, &Request::Reload);
        assert!(
            matches!(&hung_up, Err(ClientError::Protocol(m)) if m.contains("without answering")),
            "{hung_up:?}"
        );
        let nonsense = call(&path, &Request::Reload);
        assert!(
            matches!(nonsense, Err(ClientError::Protocol(_))),
            "{nonsense:?}"
        );
        assert_eq!(daemon.join().unwrap(), "{\"command\":\"reload\"}\n");
    }

    #[test]
    fn an_oversized_request_is_not_sent() {
        let error = call(
            Path::new("/nonexistent/control.sock"),
            &Request::Quarantine {
                device: "temp-001".into(),
                reason: "x".repeat(MAX_MESSAGE_BYTES),
            },
        );
        assert!(
            matches!(error, Err(ClientError::RequestTooLong { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn the_socket_flag_wins() {
        assert_eq!(
            socket_path(Some("/tmp/s.sock".into())),
            PathBuf::from("/tmp/s.sock")
        );
        // The environment is left alone (tests run in parallel); without it, the default.
        if std::env::var_os(SOCKET_ENV).is_none() {
            assert_eq!(socket_path(None), PathBuf::from(DEFAULT_SOCKET));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_through_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = server::bind(&path).await.unwrap();
        let (calls, mut receiver) = tokio::sync::mpsc::channel::<Call>(1);
        tokio::spawn(listener.serve(calls));
        tokio::spawn(async move {
            while let Some((request, respond)) = receiver.recv().await {
                let response = match request {
                    Request::Release { device } => Response::ok(Reply::Done {
                        message: format!("released {device}"),
                    }),
                    other => Response::error(format!("not here: {}", other.command())),
                };
                let _ = respond.send(response);
            }
        });
        let answers = tokio::task::spawn_blocking(move || {
            (
                call(
                    &path,
                    &Request::Release {
                        device: "cam-3".into(),
                    },
                )
                .unwrap(),
                call(&path, &Request::Reload).unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(
            answers.0.into_result(),
            Ok(Some(Reply::Done {
                message: "released cam-3".into()
            }))
        );
        assert_eq!(answers.1.into_result(), Err("not here: reload".into()));
    }
}
