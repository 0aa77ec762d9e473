//! Watching files that others change: the policy directory (a GitOps checkout, updated by
//! `git pull`, git-sync or Flux in bursts and by renames) and the DHCP lease file.
//! Changes are debounced: a burst becomes one notification once it has been quiet for a
//! moment, so that a reader sees the end state, not a half-written checkout.

use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// A running watch; changes stop being reported when it is dropped.
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    pub changes: mpsc::Receiver<()>,
}

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    pub source: notify::Error,
}

/// Watches each directory of `dirs` (with its subdirectories where the flag says so):
/// `changes` gets a message once a burst of changes to paths that `relevant` accepts has
/// been quiet for `quiet`. Lost events count as changes. Several bursts before the
/// receiver looks are one message.
pub fn watch(
    dirs: &[(&Path, bool)],
    quiet: Duration,
    relevant: impl Fn(&Path) -> bool + Send + 'static,
) -> Result<Watch, WatchError> {
    let first = dirs
        .first()
        .map_or(PathBuf::new(), |(d, _)| d.to_path_buf());
    let watch_error = |source| WatchError {
        path: first.clone(),
        source,
    };
    let (raw_tx, raw_rx) = std_mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let matters = match event {
            // Lost events (queue overflow, ...): anything may have changed.
            Err(_) => true,
            Ok(event) if event.need_rescan() => true,
            // Opening and reading, also by our own reads, changes nothing.
            Ok(notify::Event {
                kind: EventKind::Access(_),
                ..
            }) => false,
            Ok(event) => event.paths.iter().any(|p| relevant(p)),
        };
        if matters {
            let _ = raw_tx.send(());
        }
    })
    .map_err(watch_error)?;
    for &(dir, recursive) in dirs {
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        watcher.watch(dir, mode).map_err(|source| WatchError {
            path: dir.to_path_buf(),
            source,
        })?;
    }

    let (tx, changes) = mpsc::channel(1);
    // Debounce on a thread of its own, so that no runtime is needed here. It ends when the
    // watcher (and with it `raw_tx`) is dropped, or when the receiver is.
    std::thread::Builder::new()
        .name("segward-watch".into())
        .spawn(move || {
            while raw_rx.recv().is_ok() {
                loop {
                    match raw_rx.recv_timeout(quiet) {
                        Ok(()) => continue,
                        Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // Full: a message is already waiting, which covers this change too.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })
        .map_err(|e| watch_error(notify::Error::io(e)))?;
    Ok(Watch {
        _watcher: watcher,
        changes,
    })
}
