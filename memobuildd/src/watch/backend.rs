//! Where change events come from: a trait, so the hub's logic is tested without inotify, and
//! its real implementation on notify.
//!
//! Events are not debounced here. A debouncer holds every event back for its window by
//! design, and a build that starts inside that window would miss an edit made just before
//! it. Instead the daemon's change loop takes whatever has queued up in one pass (an editor's
//! write-rename-chmod burst arrives together), and a build first waits for a *cookie* — a
//! file the daemon writes in its own watched directory — to come back through the same
//! inotify queue: events are delivered in order, so every change made before the build has
//! then been applied (the technique Watchman uses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

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

/// The real watcher: inotify (Linux), FSEvents (macOS), ReadDirectoryChanges (Windows).
pub struct NotifyBackend {
    watcher: RecommendedWatcher,
}

impl std::fmt::Debug for NotifyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyBackend")
    }
}

impl NotifyBackend {
    /// Sends every event's paths to `sink`, in the order the kernel reported them.
    pub fn new(sink: UnboundedSender<Change>) -> Result<Self, WatchError> {
        let handler = move |result: notify::Result<notify::Event>| {
            let change = match result {
                Ok(event) if event.need_rescan() => Change::Rescan,
                Ok(event) if changes_content(&event.kind) && !event.paths.is_empty() => {
                    Change::Paths(event.paths)
                }
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(%error, "watcher error; rescanning");
                    Change::Rescan
                }
            };
            // The receiver is gone only while the daemon shuts down.
            let _ = sink.send(change);
        };
        let watcher = notify::recommended_watcher(handler).map_err(WatchError::from_notify)?;
        Ok(Self { watcher })
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

/// Cookies: how a build knows the watcher has caught up with everything before it.
#[derive(Debug)]
pub struct Cookies {
    dir: PathBuf,
    next: AtomicU64,
    waiting: Mutex<HashMap<PathBuf, oneshot::Sender<()>>>,
}

/// A cookie that does not come back within this long means the watcher is not live; the
/// build then goes on with what it has (the workspace is scanned if it is not watched).
const COOKIE_TIMEOUT: Duration = Duration::from_secs(2);

impl Cookies {
    /// `dir` must be watched by the same backend as the workspaces.
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns once every change made before the call has been applied. `applied` must be
    /// called by the change loop after it applies a batch.
    pub async fn sync(&self) {
        let path = self.dir.join(format!(
            "cookie-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let (sender, receiver) = oneshot::channel();
        self.lock().insert(path.clone(), sender);
        if std::fs::write(&path, b"").is_ok() {
            let _ = tokio::time::timeout(COOKIE_TIMEOUT, receiver).await;
        }
        self.lock().remove(&path);
        let _ = std::fs::remove_file(&path);
    }

    /// Whether `path` is one of ours (the change loop does not apply cookies as changes).
    pub fn is_cookie(&self, path: &Path) -> bool {
        path.starts_with(&self.dir)
    }

    /// Wakes the builds waiting for these paths' cookies.
    pub fn applied(&self, paths: &[PathBuf]) {
        let mut waiting = self.lock();
        for path in paths {
            if let Some(sender) = waiting.remove(path) {
                let _ = sender.send(());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, oneshot::Sender<()>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    #[tokio::test]
    async fn a_cookie_round_trip_through_the_real_watcher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sink, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut backend = NotifyBackend::new(sink).expect("watcher");
        let cookies =
            std::sync::Arc::new(Cookies::new(dir.path().join("cookies")).expect("cookies"));
        backend.watch(cookies.dir(), false).expect("watch");
        let loop_cookies = std::sync::Arc::clone(&cookies);
        tokio::spawn(async move {
            while let Some(Change::Paths(paths)) = changes.recv().await {
                loop_cookies.applied(&paths);
            }
        });
        let started = std::time::Instant::now();
        cookies.sync().await;
        assert!(started.elapsed() < COOKIE_TIMEOUT, "the cookie came back");
    }
}
