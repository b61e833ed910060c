//! The watcher of platforms other than Linux: notify's recommended backend (FSEvents on
//! macOS, ReadDirectoryChanges on Windows), one per workspace. Linux uses `watch::inotify`.

use std::path::Path;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::WatchError;
use super::backend::{Change, WatchBackend, WatcherFactory, WatcherId};

/// The real watchers: inotify (Linux), FSEvents (macOS), ReadDirectoryChanges (Windows),
/// each sending its tagged events to one sink, in the order the kernel reported them.
#[derive(Debug, Clone)]
pub struct NotifyFactory {
    sink: UnboundedSender<Change>,
}

impl NotifyFactory {
    pub fn new(sink: UnboundedSender<Change>) -> Self {
        Self { sink }
    }
}

impl WatcherFactory for NotifyFactory {
    fn create(&self, watcher: WatcherId) -> Result<Box<dyn WatchBackend>, WatchError> {
        let sink = self.sink.clone();
        let handler = move |result: notify::Result<notify::Event>| {
            let change = match result {
                Ok(event) if event.need_rescan() => Change::Rescan { watcher },
                Ok(event) if changes_content(&event.kind) && !event.paths.is_empty() => {
                    Change::Paths {
                        watcher,
                        paths: event.paths,
                    }
                }
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(%error, "watcher error; rescanning");
                    Change::Rescan { watcher }
                }
            };
            // The receiver is gone only while the daemon shuts down.
            let _ = sink.send(change);
        };
        let watcher = notify::recommended_watcher(handler).map_err(WatchError::from_notify)?;
        Ok(Box::new(NotifyBackend { watcher }))
    }
}

struct NotifyBackend {
    watcher: RecommendedWatcher,
}

/// Opening and reading a file is not a change. Without this filter the daemon's own hashing
/// would report every file it reads as changed, and re-hash it, forever.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl WatchBackend for NotifyBackend {
    fn watch(&mut self, dir: &Path, recursive: bool) -> Result<(), WatchError> {
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        self.watcher
            .watch(dir, mode)
            .map_err(WatchError::from_notify)
    }

    fn unwatch(&mut self, dir: &Path) {
        if let Err(error) = self.watcher.unwatch(dir) {
            tracing::debug!(%error, dir = %dir.display(), "unwatch");
        }
    }
}

impl WatchError {
    fn from_notify(error: notify::Error) -> Self {
        match error.kind {
            notify::ErrorKind::MaxFilesWatch => Self::WatchLimit,
            _ => Self::Watcher(error.to_string()),
        }
    }
}
