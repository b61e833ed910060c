//! Where change events come from: a trait, so the hub's logic is tested without inotify, and
//! its real implementation on notify + notify-debouncer-full.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc::UnboundedSender;

use super::WatchError;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These paths (absolute) changed: created, written, removed or renamed.
    Paths(Vec<PathBuf>),
    /// Events were lost (inotify queue overflow): everything must be rescanned.
    Rescan,
}

pub trait WatchBackend: Send {
    /// Starts watching `dir`, with everything below it when `recursive`.
    fn watch(&mut self, dir: &Path, recursive: bool) -> Result<(), WatchError>;
    fn unwatch(&mut self, dir: &Path);
}

/// The real watcher: inotify (Linux), FSEvents (macOS), ReadDirectoryChanges (Windows),
/// debounced so an editor's write-rename-chmod burst arrives as one batch.
pub struct NotifyBackend {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for NotifyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyBackend")
    }
}

impl NotifyBackend {
    /// Sends every debounced batch to `sink`; the daemon's change loop drains it.
    pub fn new(debounce: Duration, sink: UnboundedSender<Change>) -> Result<Self, WatchError> {
        let handler = move |result: DebounceEventResult| {
            let change = match result {
                Ok(events) if events.iter().any(|e| e.need_rescan()) => Change::Rescan,
                Ok(events) => {
                    let mut paths: Vec<PathBuf> = events
                        .into_iter()
                        .filter(|e| changes_content(&e.event.kind))
                        .flat_map(|e| e.event.paths)
                        .collect();
                    paths.sort();
                    paths.dedup();
                    if paths.is_empty() {
                        return;
                    }
                    Change::Paths(paths)
                }
                Err(errors) => {
                    for error in &errors {
                        tracing::warn!(%error, "watcher error; rescanning");
                    }
                    Change::Rescan
                }
            };
            // The receiver is gone only while the daemon shuts down.
            let _ = sink.send(change);
        };
        let debouncer = new_debouncer(debounce, None, handler).map_err(WatchError::from_notify)?;
        Ok(Self { debouncer })
    }
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
        self.debouncer
            .watch(dir, mode)
            .map_err(WatchError::from_notify)
    }

    fn unwatch(&mut self, dir: &Path) {
        if let Err(error) = self.debouncer.unwatch(dir) {
            tracing::debug!(%error, dir = %dir.display(), "unwatch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[test]
    fn reads_are_not_changes_but_writes_are() {
        assert!(!changes_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_content(&EventKind::Modify(ModifyKind::Any)));
        assert!(changes_content(&EventKind::Create(CreateKind::File)));
    }
}
