//! The Linux watcher: one inotify instance per workspace, read on a thread of its own, that
//! watches a new directory *before* anyone walks it.
//!
//! Why not notify's recursive mode: it reports a created directory first and adds the watch
//! for it only after the whole batch was delivered, so a walk of the new directory that runs
//! in between can miss a file created just then, and nothing ever reports it (seen by the
//! hot-state differential test: a `cp -a` into a watched tree lost files). Here the watch is
//! added on the watcher's thread as the event is read, and the event is passed on only after
//! that: what the daemon's walk misses, the new watch reports.
//!
//! Only changes are subscribed to (create, delete, modify, close-after-write, attributes,
//! moves, the watched directory itself going away); opens and reads are not, so the daemon's
//! own hashing generates no events.

use std::collections::HashMap;
use std::ffi::c_int;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::mpsc::UnboundedSender;

use super::WatchError;
use super::backend::{Change, Lost, WatchBackend, WatcherFactory, WatcherId};

const INOTIFY: Token = Token(0);
const WAKE: Token = Token(1);

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// Makes [`InotifyWatcher`]s that send their events to one sink.
#[derive(Debug, Clone)]
pub struct InotifyFactory {
    sink: UnboundedSender<Change>,
}

impl InotifyFactory {
    pub fn new(sink: UnboundedSender<Change>) -> Self {
        Self { sink }
    }
}

impl WatcherFactory for InotifyFactory {
    fn create(&self, id: WatcherId) -> Result<Box<dyn WatchBackend>, WatchError> {
        InotifyWatcher::start(id, self.sink.clone())
            .map(|watcher| Box::new(watcher) as Box<dyn WatchBackend>)
            .map_err(WatchError::Inotify)
    }
}

/// One directory watched, by watch descriptor number.
struct Watched {
    wd: WatchDescriptor,
    path: PathBuf,
    recursive: bool,
    /// Asked for by the hub (a root), not found below one.
    top: bool,
}

/// What the watcher thread and the hub share.
struct State {
    watches: Watches,
    by_wd: HashMap<c_int, Watched>,
    /// Why this watcher no longer covers everything, if so.
    lost: Option<Lost>,
}

impl State {
    /// Watches `dir`, and with `recursive` every directory below it, each before its
    /// children are listed. Symlinks below `dir` are never followed.
    fn add_tree(&mut self, dir: &Path, recursive: bool) -> Result<(), WatchError> {
        let mut pending = vec![(dir.to_owned(), true)];
        while let Some((dir, top)) = pending.pop() {
            match self.watches.add(&dir, mask()) {
                Ok(wd) => {
                    self.by_wd.insert(
                        wd.get_watch_descriptor_id(),
                        Watched {
                            wd,
                            path: dir.clone(),
                            recursive,
                            top,
                        },
                    );
                }
                // A directory below gone again already: nothing to watch there.
                Err(err)
                    if !top && matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                {
                    continue;
                }
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    return Err(WatchError::WatchLimit);
                }
                Err(source) => return Err(WatchError::Read { path: dir, source }),
            }
            if !recursive {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push((entry.path(), false));
                }
            }
        }
        Ok(())
    }

    /// Stops watching `dir` and everything watched below it.
    fn remove_tree(&mut self, dir: &Path) {
        let gone: Vec<c_int> = self
            .by_wd
            .iter()
            .filter(|(_, w)| w.path.starts_with(dir))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(watched) = self.by_wd.remove(&id) {
                // Already gone in the kernel when the directory was deleted: fine.
                let _ = self.watches.remove(watched.wd);
            }
        }
    }
}

pub(super) struct InotifyWatcher {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InotifyWatcher {
    fn start(id: WatcherId, sink: UnboundedSender<Change>) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let state = Arc::new(Mutex::new(State {
            watches: inotify.watches(),
            by_wd: HashMap::new(),
            lost: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            id,
            inotify,
            poll,
            state: Arc::clone(&state),
            stop: Arc::clone(&stop),
            sink,
        };
        let thread = std::thread::Builder::new()
            .name(format!("watcher-{id}"))
            .spawn(move || reader.run())?;
        Ok(Self {
            state,
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl WatchBackend for InotifyWatcher {
    fn watch(&mut self, dir: &Path, recursive: bool) -> Result<(), WatchError> {
        lock(&self.state).add_tree(dir, recursive)
    }

    fn unwatch(&mut self, dir: &Path) {
        lock(&self.state).remove_tree(dir);
    }

    fn lost(&self) -> Option<Lost> {
        lock(&self.state).lost.clone()
    }
}

impl Drop for InotifyWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watcher's thread: reads events, keeps the watches in step with the tree, and passes
/// the paths on. Closing the inotify instance (when the thread ends) drops every watch.
struct Reader {
    id: WatcherId,
    inotify: Inotify,
    poll: Poll,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    sink: UnboundedSender<Change>,
}

impl Reader {
    fn run(mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.inotify.as_raw_fd();
        if let Err(err) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), INOTIFY, Interest::READABLE)
        {
            tracing::warn!(%err, "watcher cannot poll its inotify instance");
            return;
        }
        let mut events = Events::with_capacity(8);
        let mut buffer = vec![0u8; 64 * 1024];
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(err) = self.poll.poll(&mut events, None) {
                if err.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(%err, "watcher stopped");
                return;
            }
            loop {
                match self.inotify.read_events(&mut buffer) {
                    Ok(batch) => {
                        let change = self.handle(batch);
                        // The receiver is gone only while the daemon shuts down.
                        let _ = self.sink.send(change);
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == ErrorKind::Interrupted => {}
                    Err(err) => {
                        tracing::warn!(%err, "watcher cannot read events; rescanning");
                        let _ = self.sink.send(Change::Rescan { watcher: self.id });
                        return;
                    }
                }
            }
        }
    }

    /// Applies one read's events to the watches and says what changed.
    fn handle(&self, batch: inotify::Events<'_>) -> Change {
        let mut state = lock(&self.state);
        let mut paths = Vec::new();
        for event in batch {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                return Change::Rescan { watcher: self.id };
            }
            let id = event.wd.get_watch_descriptor_id();
            if event.mask.contains(EventMask::IGNORED) {
                // A root deleted (or unmounted): its path may be reused by another directory
                // at once, even with the same inode number, and nothing watches that one.
                if state.by_wd.remove(&id).is_some_and(|w| w.top) {
                    state.lost = Some(Lost::Root);
                }
                continue;
            }
            let Some(watched) = state.by_wd.get(&id) else {
                continue;
            };
            let (recursive, top) = (watched.recursive, watched.top);
            let path = match event.name {
                Some(name) => watched.path.join(name),
                None => watched.path.clone(),
            };
            if top && event.mask.contains(EventMask::MOVE_SELF) {
                // A root renamed away: its watches follow it, not its path.
                state.lost = Some(Lost::Root);
            }
            let is_dir = event.mask.contains(EventMask::ISDIR);
            if is_dir && event.mask.contains(EventMask::MOVED_FROM) {
                // Its watches would go on reporting the old paths.
                state.remove_tree(&path);
            }
            if is_dir
                && recursive
                && event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                && let Err(err) = state.add_tree(&path, true)
            {
                tracing::warn!(path = %path.display(), %err, "a new directory is not watched");
                state.lost = Some(Lost::Incomplete(err.to_string()));
                return Change::Rescan { watcher: self.id };
            }
            paths.push(path);
        }
        Change::Paths {
            watcher: self.id,
            paths,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Collects what a watcher reports until `until` holds (bounded).
    fn collect_until(
        changes: &mut tokio::sync::mpsc::UnboundedReceiver<Change>,
        until: impl Fn(&[PathBuf]) -> bool,
    ) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while !until(&seen) {
            assert!(Instant::now() < deadline, "timed out; saw {seen:?}");
            match changes.try_recv() {
                Ok(Change::Paths { paths, .. }) => seen.extend(paths),
                Ok(Change::Rescan { .. }) => panic!("unexpected rescan"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        seen
    }

    #[test]
    fn a_new_directory_is_watched_before_it_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sink, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = InotifyFactory::new(sink).create(7).expect("watcher");
        watcher.watch(dir.path(), true).expect("watch");
        let new = dir.path().join("new");
        std::fs::create_dir(&new).expect("mkdir");
        collect_until(&mut changes, |seen| seen.contains(&new));
        // Whatever happens in it from the moment it was reported is reported too.
        std::fs::write(new.join("file"), "x").expect("file");
        collect_until(&mut changes, |seen| seen.contains(&new.join("file")));
    }

    #[test]
    fn a_directory_moved_out_stops_reporting_under_its_old_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        let (sink, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = InotifyFactory::new(sink).create(1).expect("watcher");
        watcher.watch(dir.path(), true).expect("watch");
        let away = outside.path().join("sub");
        std::fs::rename(dir.path().join("sub"), &away).expect("move out");
        collect_until(&mut changes, |seen| seen.contains(&dir.path().join("sub")));
        std::fs::write(away.join("stray"), "x").expect("write outside");
        std::fs::write(dir.path().join("marker"), "x").expect("marker");
        let seen = collect_until(&mut changes, |seen| {
            seen.contains(&dir.path().join("marker"))
        });
        assert!(
            !seen.contains(&dir.path().join("sub/stray")),
            "an event outside the tree reported inside it: {seen:?}"
        );
    }

    #[test]
    fn opening_and_reading_files_reports_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f"), "x").expect("f");
        let (sink, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = InotifyFactory::new(sink).create(1).expect("watcher");
        watcher.watch(dir.path(), true).expect("watch");
        for _ in 0..10 {
            std::fs::read(dir.path().join("f")).expect("read");
        }
        std::fs::write(dir.path().join("marker"), "x").expect("marker");
        let seen = collect_until(&mut changes, |seen| {
            seen.contains(&dir.path().join("marker"))
        });
        assert!(!seen.contains(&dir.path().join("f")), "{seen:?}");
    }
}
