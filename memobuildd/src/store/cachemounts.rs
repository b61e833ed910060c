//! Cache mounts (`RUN --mount=type=cache`): directories that RUN steps share across builds
//! and daemon restarts, named by the mount's id. Their content is in no layer and no key:
//! a step that hits the cache never sees them, one that runs finds what earlier runs left.
//!
//! ```text
//! <root>/cachemounts-v1/<32 hex of BLAKE3(id)>/
//!   data/   what the step sees at the mount's target
//!   meta    id, bytes, last use (unix seconds): written when a step lets go of it
//! ```
//!
//! Who uses a mount is kept in memory ([`CacheMounts`]): a shared user waits for no one, a
//! locked one for every other user, a private one gets a fresh scratch directory when the
//! mount is in use. GC removes only mounts nobody uses, under the same lock.
//! Sizes are measured when a step lets go (on its blocking thread), so `cache stats` never
//! walks a cache.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::index::now_unix;
use super::layers::remove_any;
use super::{Shared, StoreError};

/// How a step shares a cache mount with other steps running at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// Owner and mode a new cache directory gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOwner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    bytes: u64,
    last_used: i64,
    users: u32,
    exclusive: bool,
}

/// The mounts on disk and who uses them now.
#[derive(Debug, Default)]
pub(super) struct CacheMounts {
    entries: Mutex<HashMap<String, Entry>>,
    released: Condvar,
}

/// What [`CacheMounts::remove_unused`] took away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Removed {
    pub mounts: u64,
    pub bytes: u64,
}

impl CacheMounts {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads what earlier daemons left under `dir`; a directory without a readable `meta`
    /// (a crash before its first release) is removed.
    pub(super) fn load(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io("creating", dir))?;
        let mut entries = HashMap::new();
        for found in std::fs::read_dir(dir)
            .map_err(StoreError::io("reading", dir))?
            .flatten()
        {
            let name = found.file_name().to_string_lossy().into_owned();
            match read_meta(&found.path().join("meta")) {
                Some(entry) if entry_name(&entry.id) == name => {
                    entries.insert(name, entry);
                }
                _ => remove_any(&found.path()),
            }
        }
        Ok(Self {
            entries: Mutex::new(entries),
            released: Condvar::new(),
        })
    }

    /// (mounts, bytes on disk) of every cache mount.
    pub(super) fn totals(&self) -> (u64, u64) {
        let entries = self.lock();
        (
            entries.len() as u64,
            entries.values().map(|e| e.bytes).sum(),
        )
    }

    /// Removes the mounts nobody uses that `chosen` picks (by last use, oldest first), while
    /// `more` says to go on; returns what went. Their directories go to the trash thread.
    pub(super) fn remove_unused(
        &self,
        shared: &Shared,
        mut chosen: impl FnMut(i64, u64) -> bool,
        dry_run: bool,
    ) -> Removed {
        let mut entries = self.lock();
        let mut idle: Vec<(String, i64, u64)> = entries
            .iter()
            .filter(|(_, e)| e.users == 0 && !e.exclusive)
            .map(|(name, e)| (name.clone(), e.last_used, e.bytes))
            .collect();
        idle.sort_by_key(|(_, last_used, _)| *last_used);
        let mut removed = Removed::default();
        for (name, last_used, bytes) in idle {
            if !chosen(last_used, bytes) {
                break;
            }
            removed.mounts += 1;
            removed.bytes += bytes;
            if dry_run {
                continue;
            }
            entries.remove(&name);
            let dir = shared.layout.cache_mounts_dir().join(&name);
            match shared.scratch("cachemount-") {
                Ok(trash) if std::fs::rename(&dir, trash.join("mount")).is_ok() => {
                    shared.gc.trashed(bytes);
                    shared.gc.discard(trash, bytes);
                }
                _ => remove_any(&dir),
            }
        }
        removed
    }
}

/// A cache mount held by one step: its directory, released (size measured, use recorded)
/// when dropped.
#[derive(Debug)]
pub struct CacheMount {
    shared: Arc<Shared>,
    name: String,
    path: PathBuf,
    /// A private step's own directory when the mount was busy: removed when dropped.
    private: Option<PathBuf>,
}

impl CacheMount {
    /// The directory to mount at the target.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheMount {
    fn drop(&mut self) {
        if let Some(dir) = &self.private {
            remove_any(dir);
            return;
        }
        let bytes = disk_usage(&self.path);
        let mounts = &self.shared.cache_mounts;
        let mut entries = mounts.lock();
        if let Some(entry) = entries.get_mut(&self.name) {
            entry.users = entry.users.saturating_sub(1);
            entry.exclusive = false;
            entry.bytes = bytes;
            entry.last_used = now_unix();
            let meta = self
                .shared
                .layout
                .cache_mounts_dir()
                .join(&self.name)
                .join("meta");
            if let Err(err) = write_meta(&meta, entry) {
                tracing::warn!(%err, "could not record a cache mount's use");
            }
        }
        drop(entries);
        mounts.released.notify_all();
    }
}

impl Shared {
    /// Takes cache mount `id` for one step, creating it (owned and moded as `owner` says)
    /// the first time. A locked step waits for every other user; `Ok(None)`: `cancel` was
    /// set while it waited.
    pub(super) fn cache_mount(
        &self,
        id: &str,
        sharing: Sharing,
        owner: CacheOwner,
        cancel: &AtomicBool,
    ) -> Result<Option<CacheMount>, StoreError> {
        let name = entry_name(id);
        let dir = self.layout.cache_mounts_dir().join(&name);
        let data = dir.join("data");
        let mounts = &self.cache_mounts;
        let mut entries = mounts.lock();
        loop {
            let busy = entries
                .get(&name)
                .map(|e| (e.exclusive, e.users > 0))
                .unwrap_or_default();
            let waits = match sharing {
                Sharing::Shared => busy.0,
                Sharing::Locked => busy.0 || busy.1,
                Sharing::Private if busy.0 || busy.1 => {
                    drop(entries);
                    let own = self.scratch("cachemount-")?;
                    create(&own.join("data"), owner)?;
                    return Ok(Some(CacheMount {
                        shared: self.arc(),
                        name,
                        path: own.join("data"),
                        private: Some(own),
                    }));
                }
                Sharing::Private => false,
            };
            if !waits {
                break;
            }
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            entries = mounts
                .released
                .wait_timeout(entries, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if !entries.contains_key(&name) {
            create(&data, owner)?;
            let entry = Entry {
                id: id.to_owned(),
                bytes: 0,
                last_used: now_unix(),
                users: 0,
                exclusive: false,
            };
            write_meta(&dir.join("meta"), &entry)?;
            entries.insert(name.clone(), entry);
        }
        let entry = entries.get_mut(&name).expect("inserted above");
        entry.users += 1;
        entry.exclusive = sharing != Sharing::Shared;
        Ok(Some(CacheMount {
            shared: self.arc(),
            name,
            path: data,
            private: None,
        }))
    }
}

/// A mount's directory name: ids are free text (`/root/.cache`, `apt-$TARGETARCH`).
fn entry_name(id: &str) -> String {
    let hash = blake3::hash(id.as_bytes()).to_hex();
    hash[..32].to_owned()
}

fn create(data: &Path, owner: CacheOwner) -> Result<(), StoreError> {
    std::fs::create_dir_all(data).map_err(StoreError::io("creating", data))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(owner.mode))
        .map_err(StoreError::io("setting the mode of", data))?;
    // As root (the daemon runs steps as root) ownership can be given; otherwise the
    // directory is the daemon's, which is who runs the steps.
    let _ = std::os::unix::fs::chown(data, Some(owner.uid), Some(owner.gid));
    Ok(())
}

fn write_meta(path: &Path, entry: &Entry) -> Result<(), StoreError> {
    let text = format!("{}\n{}\n{}\n", entry.id, entry.bytes, entry.last_used);
    let temp = path.with_extension("new");
    std::fs::write(&temp, text).map_err(StoreError::io("writing", &temp))?;
    std::fs::rename(&temp, path).map_err(StoreError::io("renaming", path))
}

fn read_meta(path: &Path) -> Option<Entry> {
    let text = std::fs::read_to_string(path).ok()?;
    // The id may hold anything but a newline (ids come from one Dockerfile line).
    let mut lines = text.lines();
    let (id, bytes, last_used) = (lines.next()?, lines.next()?, lines.next()?);
    Some(Entry {
        id: id.to_owned(),
        bytes: bytes.parse().ok()?,
        last_used: last_used.parse().ok()?,
        users: 0,
        exclusive: false,
    })
}

/// Bytes on disk under `dir` (blocks, as `du`), each hard-linked file once.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::store::{GcOptions, Store, StoreOptions};

    const OWNER: CacheOwner = CacheOwner {
        uid: 0,
        gid: 0,
        mode: 0o755,
    };

    /// `cache prune --filter type=exec.cachemount`: the cache mounts, nothing else.
    fn prune(store: &Store) -> u64 {
        let report = store
            .gc(&GcOptions {
                keep_bytes: 0,
                keep_duration: None,
                all: true,
                cache_mounts_only: true,
                dry_run: false,
                time_limit: None,
            })
            .unwrap();
        report.removed_cache_mounts
    }

    #[test]
    fn a_cache_mount_outlives_the_store_and_gc_takes_it_only_when_idle() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let never = AtomicBool::new(false);
        {
            let store = Store::open(&layout, StoreOptions::default()).unwrap();
            let mount = store
                .cache_mount("/root/.cache", Sharing::Shared, OWNER, &never)
                .unwrap()
                .unwrap();
            std::fs::write(mount.path().join("kept"), vec![1u8; 10_000]).unwrap();
            assert_eq!(prune(&store), 0, "a mount in use stays");
        }
        let store = Store::open(&layout, StoreOptions::default()).unwrap();
        let stats = store.stats();
        assert_eq!(stats.cache_mounts, 1);
        assert!(stats.cache_mount_bytes >= 10_000, "{stats:?}");
        let mount = store
            .cache_mount("/root/.cache", Sharing::Locked, OWNER, &never)
            .unwrap()
            .unwrap();
        assert!(mount.path().join("kept").is_file());
        drop(mount);
        assert_eq!(prune(&store), 1);
        assert_eq!(store.stats().cache_mounts, 0);
        assert!(
            std::fs::read_dir(layout.cache_mounts_dir())
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn locked_users_take_turns_and_private_ones_get_their_own() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(&Layout::new(root.path()), StoreOptions::default()).unwrap();
        let never = AtomicBool::new(false);
        let first = store
            .cache_mount("apt", Sharing::Locked, OWNER, &never)
            .unwrap()
            .unwrap();
        let private = store
            .cache_mount("apt", Sharing::Private, OWNER, &never)
            .unwrap()
            .unwrap();
        assert_ne!(private.path(), first.path());
        let cancel = AtomicBool::new(true);
        assert!(
            store
                .cache_mount("apt", Sharing::Locked, OWNER, &cancel)
                .unwrap()
                .is_none(),
            "a locked user waits (and gives up when cancelled)"
        );
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let never = AtomicBool::new(false);
                let started = std::time::Instant::now();
                let mount = store
                    .cache_mount("apt", Sharing::Locked, OWNER, &never)
                    .unwrap()
                    .unwrap();
                (started.elapsed(), mount.path().to_owned())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let path = first.path().to_owned();
        drop(first);
        let (waited, got) = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert_eq!(got, path);
    }
}
