//! Where change events come from: a trait, so the hub's logic is tested without inotify, and
//! its real implementation on notify.
//!
//! Every workspace gets a watcher of its own (one inotify instance), numbered by a
//! [`WatcherId`] that tags its events. Re-arming a workspace whose root was replaced drops its
//! instance and makes a fresh one: the kernel then frees every old watch at once, and nothing
//! the old instance still had pending (notify drops the watches of a deleted directory only
//! after it has delivered the whole batch) can touch the new watches. An event is always
//! applied by path, so a stale one costs a re-hash, never a wrong tree.
//!
//! Events are not debounced here. A debouncer holds every event back for its window by
//! design, and a build that starts inside that window would miss an edit made just before
//! it. Instead the daemon's change loop takes whatever has queued up in one pass (an editor's
//! write-rename-chmod burst arrives together), and a build first waits for a *cookie* — a
//! file the daemon writes in its own directory, which every workspace's watcher also watches
//! — to come back through the workspace's own inotify queue: events are delivered in order,
//! so every change made before the build has then been applied (the technique Watchman uses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use super::WatchError;

/// Which watcher instance saw an event.
pub type WatcherId = u64;

/// What a watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These paths (absolute) changed: created, written, removed or renamed.
    Paths {
        watcher: WatcherId,
        paths: Vec<PathBuf>,
    },
    /// Events were lost (inotify queue overflow): what this watcher covers must be rescanned.
    Rescan { watcher: WatcherId },
}

pub trait WatchBackend: Send {
    /// Starts watching `dir`, with everything below it when `recursive`.
    fn watch(&mut self, dir: &Path, recursive: bool) -> Result<(), WatchError>;
    fn unwatch(&mut self, dir: &Path);
    /// Whether this watcher stopped covering all it was asked to, and why.
    fn lost(&self) -> Option<Lost> {
        None
    }
}

/// How a watcher stopped covering its workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// A directory it was asked to watch was deleted or moved away: whatever is at that path
    /// now needs a new watcher.
    Root,
    /// Part of the tree could not be watched as it grew (the watch limit).
    Incomplete(String),
}

/// Makes one watcher per workspace.
pub trait WatcherFactory: Send + Sync {
    fn create(&self, id: WatcherId) -> Result<Box<dyn WatchBackend>, WatchError>;
}

/// Cookies: how a build knows a workspace's watcher has caught up with everything before it.
#[derive(Debug)]
pub struct Cookies {
    dir: PathBuf,
    next: AtomicU64,
    /// Per cookie, the watcher whose delivery of it proves the catch-up.
    waiting: Mutex<HashMap<PathBuf, (WatcherId, oneshot::Sender<()>)>>,
}

/// A cookie that does not come back within this long means the watcher is not live; the
/// build then goes on with what it has (the workspace is scanned if it is not watched).
const COOKIE_TIMEOUT: Duration = Duration::from_secs(2);

impl Cookies {
    /// `dir` is watched by every workspace's watcher.
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

    /// Returns once every change `watcher` saw before the call has been applied. `applied`
    /// must be called by the change loop after it applies a batch.
    pub async fn sync(&self, watcher: WatcherId) {
        let path = self.dir.join(format!(
            "cookie-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let (sender, receiver) = oneshot::channel();
        self.lock().insert(path.clone(), (watcher, sender));
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

    /// Wakes the builds waiting for these paths' cookies from `watcher`.
    pub fn applied(&self, watcher: WatcherId, paths: &[PathBuf]) {
        let mut waiting = self.lock();
        for path in paths {
            if waiting
                .get(path)
                .is_some_and(|(wanted, _)| *wanted == watcher)
                && let Some((_, sender)) = waiting.remove(path)
            {
                let _ = sender.send(());
            }
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (WatcherId, oneshot::Sender<()>)>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cookie_round_trip_through_the_real_watcher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sink, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let factory = super::super::platform_watchers(sink);
        let cookies =
            std::sync::Arc::new(Cookies::new(dir.path().join("cookies")).expect("cookies"));
        let mut backends = Vec::new();
        for id in [1, 2] {
            let mut backend = factory.create(id).expect("watcher");
            backend.watch(cookies.dir(), false).expect("watch");
            backends.push(backend);
        }
        let loop_cookies = std::sync::Arc::clone(&cookies);
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let loop_seen = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(Change::Paths { watcher, paths }) = changes.recv().await {
                loop_seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(watcher);
                loop_cookies.applied(watcher, &paths);
            }
        });
        let started = std::time::Instant::now();
        cookies.sync(2).await;
        assert!(started.elapsed() < COOKIE_TIMEOUT, "the cookie came back");
        let seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        assert!(seen.contains(&2), "watcher 2 delivered it: {seen:?}");
    }
}
