//! The store: sharded files under the `--dir`, the only module that touches them.
//!
//! ```text
//! DIR/
//!   cas/ab/abcdef…   blobs, named by the SHA-256 of their bytes (64 hex), sharded by the first two
//!   cas/ab/.tmp-…    an upload in progress, beside its final name; removed at start
//!   ac/ab/abcdef…    action results (serialized REAPI ActionResult), named by their action's digest
//!   index.sqlite     the index (see `index`), rebuilt from the files if lost
//!   analytics.sqlite build reports (see `analytics`)
//! ```
//!
//! The main type is [`Store`]. An entry enters only through a [`BlobWriter`]: bytes go to a
//! temp file in the entry's own shard directory (so the rename stays inside one directory:
//! no filesystem-wide cross-directory rename lock, and creates spread over 512 directory
//! locks instead of one) while SHA-256 is computed, and [`BlobWriter::commit`] renames it into place only
//! when the digest and size match — nothing half-written or mislabelled is ever visible, a
//! killed server leaves only temp files, and two uploads of one blob both succeed. Entries
//! beyond the byte budget are evicted, least recently used first, on the eviction thread.
//! Everything here blocks: async callers go through [`Store::put_bytes`], [`Store::upload`],
//! [`Store::get_bytes`] and [`Store::read_stream`], which run it on blocking threads. The
//! request handlers (`grpc`, `http`) come next.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use super::digest::{Digest, Hash, Key, Kind};
use super::index::{Index, IndexError, Meta};

/// Names of uploads in progress start with this (never a hex digit).
const TEMP_PREFIX: &str = ".tmp-";

/// Bytes per chunk of a streamed read.
pub const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no space left for {key} ({})", path.display())]
    NoSpace { key: Key, path: PathBuf },
    #[error("upload of {expected} does not match its digest: its bytes are {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("{key} is {size} bytes or more, over the limit of {limit}")]
    TooLarge { key: Key, size: u64, limit: u64 },
    #[error("upload of {0} ended before it was finished; nothing was stored")]
    Incomplete(Key),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("a store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StoreError {
    fn io(path: &Path, key: Option<Key>) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| match (source.raw_os_error(), key) {
            (Some(libc::ENOSPC | libc::EDQUOT), Some(key)) => Self::NoSpace {
                key,
                path: path.to_owned(),
            },
            _ => Self::Io {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// Eviction counters, read by `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct Evictions {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
}

/// The sharded files, their index and the byte budget.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    index: Index,
    max_size: u64,
    /// Wakes the eviction thread; a full channel means a wake-up is already pending.
    evict: Mutex<mpsc::SyncSender<()>>,
    pub evictions: Evictions,
    temp_seq: AtomicU64,
}

/// Sizes of what is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes: u64,
    pub cas_entries: u64,
    pub ac_entries: u64,
}

impl Store {
    /// Opens the store at `dir` (creating it), removes abandoned uploads and reconciles the
    /// index with the files: a file the index does not know (or knows with another size) is
    /// hashed and kept only if it matches its name; a row without a file is dropped.
    pub fn open(dir: &Path, max_size: u64) -> Result<Arc<Self>, StoreError> {
        for kind in [Kind::Cas, Kind::Ac] {
            for shard in 0..=255u8 {
                let path = dir.join(kind.dir()).join(hex::encode([shard]));
                std::fs::create_dir_all(&path).map_err(StoreError::io(&path, None))?;
            }
        }
        let (index, loaded) = Index::open(&dir.join("index.sqlite"))?;
        let map = reconcile(dir, &loaded)?;
        index.persist_all(&map);
        index.install(map);

        let (tx, rx) = mpsc::sync_channel(1);
        let store = Arc::new(Self {
            dir: dir.to_owned(),
            index,
            max_size,
            evict: Mutex::new(tx),
            evictions: Evictions::default(),
            temp_seq: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("cache-evict".to_owned())
            .spawn(move || eviction_thread(&weak, &rx))
            .map_err(StoreError::io(dir, None))?;
        store.wake_eviction();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn path(&self, key: &Key) -> PathBuf {
        entry_path(&self.dir, key)
    }

    pub fn stats(&self) -> Stats {
        let entries = self.index.lock();
        let cas_entries = entries.map.keys().filter(|k| k.kind == Kind::Cas).count() as u64;
        Stats {
            bytes: entries.bytes,
            cas_entries,
            ac_entries: entries.map.len() as u64 - cas_entries,
        }
    }

    pub fn meta(&self, key: &Key) -> Option<Meta> {
        self.index.get(key)
    }

    /// Marks `keys` used now (a hit when `hit`) and says which are present; a size, when
    /// given, must match too. The empty blob is always present.
    pub fn touch(&self, keys: &[(Key, Option<u64>)], hit: bool) -> Vec<bool> {
        let mut present = self.index.touch(keys, hit);
        for (found, (key, size)) in present.iter_mut().zip(keys) {
            if key.kind == Kind::Cas && key.hash == Hash::EMPTY && size.is_none_or(|s| s == 0) {
                *found = true;
            }
        }
        present
    }

    /// Starts writing `key`. For a blob, `expected` is its digest and is checked at commit;
    /// an action result has no digest of its own and is bounded by `limit` alone.
    pub fn writer(
        self: &Arc<Self>,
        key: Key,
        expected: Option<Digest>,
        limit: u64,
    ) -> Result<BlobWriter, StoreError> {
        let limit = expected.map_or(limit, |d| d.size).min(self.max_size);
        if let Some(digest) = expected
            && digest.size > self.max_size
        {
            return Err(StoreError::TooLarge {
                key,
                size: digest.size,
                limit: self.max_size,
            });
        }
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .path(&key)
            .with_file_name(format!("{TEMP_PREFIX}{}-{seq}", std::process::id()));
        let file = File::create(&temp).map_err(StoreError::io(&temp, Some(key)))?;
        Ok(BlobWriter {
            store: Arc::clone(self),
            key,
            expected,
            limit,
            temp,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            committed: false,
        })
    }

    /// Writes a whole entry at once (small uploads, action results).
    pub fn put(
        self: &Arc<Self>,
        key: Key,
        expected: Option<Digest>,
        limit: u64,
        bytes: &[u8],
    ) -> Result<u64, StoreError> {
        if expected.is_some_and(|d| d.is_empty_blob()) && bytes.is_empty() {
            return Ok(0);
        }
        let mut writer = self.writer(key, expected, limit)?;
        writer.write(bytes)?;
        writer.commit()
    }

    /// Opens an entry for reading, with its size; `None` when it is not stored.
    pub fn open_entry(&self, key: &Key) -> Result<Option<(File, u64)>, StoreError> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(StoreError::io(&path, None))?.len();
                Ok(Some((file, size)))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // Evicted or never stored: make sure the index agrees.
                let mut entries = self.index.lock();
                if !path.exists() {
                    self.index.remove_locked(&mut entries, key);
                }
                Ok(None)
            }
            Err(err) => Err(StoreError::io(&path, None)(err)),
        }
    }

    /// Reads a whole entry; `None` when it is not stored (the empty blob always is).
    pub fn read(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        if key.kind == Kind::Cas && key.hash == Hash::EMPTY {
            return Ok(Some(Vec::new()));
        }
        let Some((mut file, size)) = self.open_entry(key)? else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut bytes)
            .map_err(StoreError::io(&self.path(key), None))?;
        Ok(Some(bytes))
    }

    /// Commits a verified temp file: rename and index update under the index lock, so an
    /// eviction of the same key cannot interleave between them.
    fn install(&self, key: Key, temp: &Path, size: u64) -> Result<(), StoreError> {
        let path = self.path(&key);
        let over = {
            let mut entries = self.index.lock();
            std::fs::rename(temp, &path).map_err(StoreError::io(&path, Some(key)))?;
            self.index.put_locked(&mut entries, key, size);
            entries.bytes > self.max_size
        };
        if over {
            self.wake_eviction();
        }
        Ok(())
    }

    fn wake_eviction(&self) {
        let evict = self
            .evict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = evict.try_send(());
    }

    /// Removes least recently used entries until the store is at most 90% of its budget
    /// (the slack keeps a store at its limit from evicting on every upload).
    pub fn evict(&self) {
        let target = self.max_size - self.max_size / 10;
        let mut candidates: Vec<(i64, Key)> = {
            let entries = self.index.lock();
            if entries.bytes <= self.max_size {
                return;
            }
            entries.map.iter().map(|(k, m)| (m.accessed, *k)).collect()
        };
        candidates.sort_unstable();
        for (accessed, key) in candidates {
            let mut entries = self.index.lock();
            if entries.bytes <= target {
                break;
            }
            // Used since the snapshot: no longer the oldest.
            if entries.map.get(&key).is_none_or(|m| m.accessed != accessed) {
                continue;
            }
            let path = self.path(&key);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot evict");
                    continue;
                }
            }
            if let Some(meta) = self.index.remove_locked(&mut entries, &key) {
                self.evictions.entries.fetch_add(1, Ordering::Relaxed);
                self.evictions.bytes.fetch_add(meta.size, Ordering::Relaxed);
                tracing::debug!(%key, size = meta.size, "evicted");
            }
        }
    }

    /// Waits until the index is on disk (tests, shutdown).
    pub fn flush(&self) {
        self.index.flush();
    }

    /// [`Store::put`] on a blocking thread.
    pub async fn put_bytes(
        self: &Arc<Self>,
        key: Key,
        expected: Option<Digest>,
        limit: u64,
        bytes: Bytes,
    ) -> Result<u64, StoreError> {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.put(key, expected, limit, &bytes)).await?
    }

    /// [`Store::read`] on a blocking thread.
    pub async fn get_bytes(self: &Arc<Self>, key: Key) -> Result<Option<Bytes>, StoreError> {
        let store = Arc::clone(self);
        Ok(tokio::task::spawn_blocking(move || store.read(&key))
            .await??
            .map(Bytes::from))
    }

    /// Streams `key` from `offset` (at most `limit` bytes, 0 = to the end) in chunks, read on
    /// a blocking thread that stops when the receiver goes away. `None`: not stored.
    pub async fn read_stream(
        self: &Arc<Self>,
        key: Key,
        offset: u64,
        limit: u64,
    ) -> Result<Option<ReadStream>, StoreError> {
        let store = Arc::clone(self);
        let opened = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let Some((mut file, size)) = store.open_entry(&key)? else {
                return Ok(None);
            };
            let path = store.path(&key);
            file.seek(SeekFrom::Start(offset.min(size)))
                .map_err(StoreError::io(&path, None))?;
            Ok(Some((file, size, path)))
        })
        .await??;
        let Some((file, size, path)) = opened else {
            return Ok(None);
        };
        let remaining = size.saturating_sub(offset);
        let remaining = if limit == 0 {
            remaining
        } else {
            remaining.min(limit)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || stream_file(file, remaining, &path, &tx));
        Ok(Some(ReadStream {
            size,
            len: remaining,
            chunks: rx,
        }))
    }

    /// An upload fed chunk by chunk from async code, written on a blocking thread.
    pub fn upload(self: &Arc<Self>, key: Key, expected: Option<Digest>, limit: u64) -> Upload {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(4);
        let store = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let mut writer = store.writer(key, expected, limit)?;
            while let Some(chunk) = rx.blocking_recv() {
                match chunk {
                    Chunk::Data(bytes) => writer.write(&bytes)?,
                    Chunk::Finish => return writer.commit(),
                }
            }
            // The sender went away unfinished (a client that disconnected): the writer's
            // drop removes the temp file.
            Err(StoreError::Incomplete(key))
        });
        Upload {
            key,
            tx: Some(tx),
            task: Some(task),
        }
    }
}

/// A read in progress: the entry's size, how many bytes will come, and the chunks.
#[derive(Debug)]
pub struct ReadStream {
    pub size: u64,
    pub len: u64,
    pub chunks: tokio::sync::mpsc::Receiver<Result<Bytes, StoreError>>,
}

fn stream_file(
    mut file: File,
    mut remaining: u64,
    path: &Path,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, StoreError>>,
) {
    while remaining > 0 {
        let want = usize::try_from(remaining)
            .unwrap_or(READ_CHUNK)
            .min(READ_CHUNK);
        let mut buf = vec![0; want];
        let result = file
            .read_exact(&mut buf)
            .map(|()| Bytes::from(buf))
            .map_err(StoreError::io(path, None));
        let failed = result.is_err();
        if tx.blocking_send(result).is_err() || failed {
            return;
        }
        remaining -= want as u64;
    }
}

#[derive(Debug)]
enum Chunk {
    Data(Bytes),
    Finish,
}

/// The async side of an upload (see [`Store::upload`]). Dropped without [`Upload::finish`],
/// nothing is stored.
#[derive(Debug)]
pub struct Upload {
    key: Key,
    tx: Option<tokio::sync::mpsc::Sender<Chunk>>,
    task: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
}

impl Upload {
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Chunk::Data(bytes)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer stopped early (too large, disk full): its error says why.
            let key = self.key;
            Err(self
                .outcome()
                .await
                .err()
                .unwrap_or(StoreError::Incomplete(key)))
        }
    }

    /// Ends the upload: the bytes are verified and the entry committed. Returns its size.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        if let Some(tx) = &self.tx {
            // A closed channel means the writer already failed; `outcome` reports why.
            let _ = tx.send(Chunk::Finish).await;
        }
        self.outcome().await
    }

    async fn outcome(&mut self) -> Result<u64, StoreError> {
        self.tx = None;
        match self.task.take() {
            Some(task) => task.await?,
            None => Err(StoreError::Incomplete(self.key)),
        }
    }
}

/// An entry being written to a temp file; see the module doc.
#[derive(Debug)]
pub struct BlobWriter {
    store: Arc<Store>,
    key: Key,
    expected: Option<Digest>,
    limit: u64,
    temp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    /// Renamed into place: no temp file left to remove.
    committed: bool,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let total = self.written + bytes.len() as u64;
        if total > self.limit {
            return Err(match self.expected {
                Some(expected) => StoreError::Mismatch {
                    expected,
                    actual: Digest {
                        hash: Hash::from_hasher(self.hasher.clone()),
                        size: total,
                    },
                },
                None => StoreError::TooLarge {
                    key: self.key,
                    size: total,
                    limit: self.limit,
                },
            });
        }
        self.hasher.update(bytes);
        let file = self.file.as_mut().expect("writer open until commit");
        file.write_all(bytes)
            .map_err(StoreError::io(&self.temp, Some(self.key)))?;
        self.written = total;
        Ok(())
    }

    /// Verifies the digest and renames the file into place; returns the size.
    pub fn commit(mut self) -> Result<u64, StoreError> {
        let actual = Digest {
            hash: Hash::from_hasher(std::mem::take(&mut self.hasher)),
            size: self.written,
        };
        if let Some(expected) = self.expected
            && expected != actual
        {
            return Err(StoreError::Mismatch { expected, actual });
        }
        // Closing before the rename: a reader never sees a file still being written to.
        drop(self.file.take());
        self.store.install(self.key, &self.temp, self.written)?;
        self.committed = true;
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn entry_path(dir: &Path, key: &Key) -> PathBuf {
    let hex = key.hash.hex();
    dir.join(key.kind.dir()).join(&hex[..2]).join(hex)
}

/// The reconcile at start (see [`Store::open`]).
fn reconcile(dir: &Path, loaded: &HashMap<Key, Meta>) -> Result<HashMap<Key, Meta>, StoreError> {
    let mut found = Vec::new();
    for kind in [Kind::Cas, Kind::Ac] {
        for shard in 0..=255u8 {
            let shard_dir = dir.join(kind.dir()).join(hex::encode([shard]));
            let entries =
                std::fs::read_dir(&shard_dir).map_err(StoreError::io(&shard_dir, None))?;
            for entry in entries {
                let entry = entry.map_err(StoreError::io(&shard_dir, None))?;
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    // An upload the last run did not finish.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let hash = entry.file_name().to_str().and_then(Hash::parse_hex);
                match (hash, entry.metadata()) {
                    (Some(hash), Ok(meta))
                        if meta.is_file() && hash.hex()[..2] == hex::encode([shard]) =>
                    {
                        let mtime = meta
                            .modified()
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
                        found.push((Key { kind, hash }, meta.len(), mtime, path));
                    }
                    _ => {
                        tracing::warn!(path = %path.display(), "not a store entry: removed");
                        let _ =
                            std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
                    }
                }
            }
        }
    }
    let known = found.len();
    let checked: Vec<Option<(Key, Meta)>> = found
        .into_par_iter()
        .map(|(key, size, mtime, path)| {
            if let Some(meta) = loaded.get(&key).filter(|m| m.size == size) {
                return Some((key, *meta));
            }
            // Unknown to the index (lost, or the server died between rename and index write):
            // a blob stays only if its bytes match its name.
            if key.kind == Kind::Cas && !file_matches(&path, &key.hash) {
                tracing::warn!(path = %path.display(), "blob does not match its digest: removed");
                let _ = std::fs::remove_file(&path);
                return None;
            }
            Some((
                key,
                Meta {
                    size,
                    created: mtime,
                    accessed: mtime,
                    hits: 0,
                },
            ))
        })
        .collect();
    let map: HashMap<Key, Meta> = checked.into_iter().flatten().collect();
    tracing::info!(
        files = known,
        kept = map.len(),
        indexed = loaded.len(),
        "store reconciled with its index"
    );
    Ok(map)
}

fn file_matches(path: &Path, hash: &Hash) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Hash::from_hasher(hasher) == *hash,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return false,
        }
    }
}

fn eviction_thread(store: &Weak<Store>, wake: &mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        let Some(store) = store.upgrade() else {
            return;
        };
        store.evict();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("cas"))
            .expect("cas")
            .flat_map(|shard| std::fs::read_dir(shard.expect("shard").path()).expect("shard"))
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TEMP_PREFIX)
            })
            .count()
    }

    fn blob(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn a_blob_is_visible_only_when_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 30).expect("open");
        let bytes = blob(1000, 1);
        let digest = Digest::of(&bytes);
        let key = Key::cas(digest.hash);

        let mut writer = store.writer(key, Some(digest), 0).expect("writer");
        writer.write(&bytes[..500]).expect("half");
        assert!(!entry_path(dir.path(), &key).exists());
        assert_eq!(store.touch(&[(key, None)], false), [false]);
        assert_eq!(temp_files(dir.path()), 1);
        drop(writer);
        assert_eq!(temp_files(dir.path()), 0);

        let mut wrong = bytes.clone();
        wrong[10] ^= 1;
        let err = store
            .put(key, Some(digest), 0, &wrong)
            .expect_err("mismatch");
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        let err = store
            .put(key, Some(digest), 0, &bytes[..999])
            .expect_err("short");
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        assert_eq!(store.read(&key).expect("read"), None);

        assert_eq!(store.put(key, Some(digest), 0, &bytes).expect("put"), 1000);
        assert_eq!(store.read(&key).expect("read"), Some(bytes));
        assert_eq!(store.stats().bytes, 1000);
        assert_eq!(
            store.touch(&[(key, Some(1000)), (key, Some(7))], false),
            [true, false]
        );
    }

    #[test]
    fn eviction_keeps_the_store_under_its_budget_dropping_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10_000).expect("open");
        let mut keys = Vec::new();
        for seed in 0..20u8 {
            let bytes = blob(1000, seed);
            let digest = Digest::of(&bytes);
            store
                .put(Key::cas(digest.hash), Some(digest), 0, &bytes)
                .expect("put");
            keys.push(Key::cas(digest.hash));
            // Distinct access times, and the first blob kept in use.
            std::thread::sleep(std::time::Duration::from_millis(2));
            store.touch(&[(keys[0], None)], true);
        }
        store.evict();
        let stats = store.stats();
        assert!(stats.bytes <= 10_000, "{stats:?}");
        assert!(store.meta(&keys[0]).is_some(), "the blob in use survives");
        assert!(store.meta(&keys[1]).is_none(), "the oldest unused one goes");
        assert!(store.evictions.entries.load(Ordering::Relaxed) >= 10);
        for key in &keys {
            assert_eq!(
                store.meta(key).is_some(),
                entry_path(dir.path(), key).exists()
            );
        }
    }

    #[test]
    fn reopening_rebuilds_a_lost_index_and_drops_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = blob(5000, 7);
        let digest = Digest::of(&good);
        {
            let store = Store::open(dir.path(), 1 << 30).expect("open");
            store
                .put(Key::cas(digest.hash), Some(digest), 0, &good)
                .expect("put");
            store
                .put(Key::ac(Hash([9; 32])), None, 100, b"result")
                .expect("ac");
            store.flush();
        }
        std::fs::remove_file(dir.path().join("index.sqlite")).expect("lose the index");
        let _ = std::fs::remove_file(dir.path().join("index.sqlite-wal"));
        // A file whose bytes do not match its name, as a crashed writer without our
        // verify-then-rename could have left.
        let bad = Key::cas(Hash::of(b"other"));
        std::fs::write(entry_path(dir.path(), &bad), b"not other").expect("plant");
        let leftover = entry_path(dir.path(), &bad).with_file_name(".tmp-1-1");
        std::fs::write(leftover, b"partial").expect("plant temp");

        let store = Store::open(dir.path(), 1 << 30).expect("reopen");
        assert_eq!(
            store.stats(),
            Stats {
                bytes: 5000 + 6,
                cas_entries: 1,
                ac_entries: 1
            }
        );
        assert!(!entry_path(dir.path(), &bad).exists());
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn an_abandoned_upload_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 30).expect("open");
        let bytes = blob(3 * READ_CHUNK, 3);
        let digest = Digest::of(&bytes);
        let key = Key::cas(digest.hash);
        let mut upload = store.upload(key, Some(digest), 0);
        upload
            .write(Bytes::copy_from_slice(&bytes[..READ_CHUNK]))
            .await
            .expect("write");
        drop(upload);
        store.flush();
        assert!(store.meta(&key).is_none());

        let mut upload = store.upload(key, Some(digest), 0);
        for chunk in bytes.chunks(READ_CHUNK) {
            upload
                .write(Bytes::copy_from_slice(chunk))
                .await
                .expect("write");
        }
        assert_eq!(upload.finish().await.expect("finish"), bytes.len() as u64);
        let mut read = store
            .read_stream(key, 10, 0)
            .await
            .expect("read")
            .expect("found");
        let mut back = Vec::new();
        while let Some(chunk) = read.chunks.recv().await {
            back.extend_from_slice(&chunk.expect("chunk"));
        }
        assert_eq!(back, bytes[10..]);
    }
}
