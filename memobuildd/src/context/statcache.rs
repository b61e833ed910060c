//! The persisted stat cache: (device, inode, size, mtime, ctime, mode) → content hash, so a
//! restarted daemon re-reads only files whose metadata moved.
//!
//! Metadata is a filter, never the truth: the watcher re-hashes any path it reports changed,
//! whatever its metadata says (moby/buildkit#4817 is what happens otherwise). `ctime` is in the
//! key because no user call can set it, so `touch -r` after an edit cannot fake a match. And a
//! file whose ctime is not safely older than the scan is not remembered ("racily clean", as
//! git calls it): it could change again within the same clock tick, invisibly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};
use tracing::warn;

use super::ContextError;
use super::tree::{Hash, StatKey};

/// How much older than the scan a file's ctime must be for its hash to be remembered.
/// Covers coarse filesystem timestamps (ext4's come from a clock ticking every few ms).
const RACY_MARGIN_NS: i64 = 50_000_000;

#[derive(Debug)]
pub struct StatCache {
    conn: Connection,
    path: PathBuf,
    known: HashMap<(u64, u64), (StatKey, Hash)>,
    pending: Vec<(StatKey, Hash)>,
}

impl StatCache {
    /// Opens (or creates) the cache at `path` and loads it. A file that is not a readable
    /// cache is moved aside and replaced: losing the cache costs re-hashing, nothing more.
    pub fn open(path: &Path) -> Result<Self, ContextError> {
        match Self::try_open(path) {
            Ok(cache) => Ok(cache),
            Err(err) if path.exists() => {
                let aside = path.with_extension("sqlite.corrupt");
                warn!(path = %path.display(), %err, aside = %aside.display(), "stat cache unreadable; starting a fresh one");
                std::fs::rename(path, &aside).map_err(|source| ContextError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                Self::try_open(path)
            }
            Err(err) => Err(err),
        }
    }

    fn try_open(path: &Path) -> Result<Self, ContextError> {
        let db = |source| ContextError::Database {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS stat_cache (
                 dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, mode INTEGER NOT NULL,
                 hash BLOB NOT NULL,
                 PRIMARY KEY (dev, ino)
             ) WITHOUT ROWID;",
        )
        .map_err(db)?;
        let mut known = HashMap::new();
        {
            let mut rows = conn
                .prepare("SELECT dev, ino, size, mtime_ns, ctime_ns, mode, hash FROM stat_cache")
                .map_err(db)?;
            let mut rows = rows.query([]).map_err(db)?;
            while let Some(row) = rows.next().map_err(db)? {
                let hash: Vec<u8> = row.get(6).map_err(db)?;
                let Ok(hash) = Hash::try_from(hash.as_slice()) else {
                    continue;
                };
                let stat = StatKey {
                    dev: row.get::<_, i64>(0).map_err(db)? as u64,
                    ino: row.get::<_, i64>(1).map_err(db)? as u64,
                    size: row.get::<_, i64>(2).map_err(db)? as u64,
                    mtime_ns: row.get(3).map_err(db)?,
                    ctime_ns: row.get(4).map_err(db)?,
                    mode: row.get(5).map_err(db)?,
                };
                known.insert((stat.dev, stat.ino), (stat, hash));
            }
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
            known,
            pending: Vec::new(),
        })
    }

    /// The remembered hash of a file whose metadata is exactly `stat`.
    pub fn lookup(&self, stat: &StatKey) -> Option<Hash> {
        self.known
            .get(&(stat.dev, stat.ino))
            .filter(|(known, _)| known == stat)
            .map(|(_, hash)| *hash)
    }

    /// Remembers a hash computed during a scan that started at `scan_start_ns` (Unix ns).
    pub fn remember(&mut self, stat: StatKey, hash: Hash, scan_start_ns: i64) {
        if stat.ctime_ns > scan_start_ns - RACY_MARGIN_NS
            || stat.mtime_ns > scan_start_ns - RACY_MARGIN_NS
        {
            // Too fresh to vouch for; forget any older record so it is re-hashed next time.
            self.known.remove(&(stat.dev, stat.ino));
            return;
        }
        if self.lookup(&stat) == Some(hash) {
            return;
        }
        self.known.insert((stat.dev, stat.ino), (stat, hash));
        self.pending.push((stat, hash));
    }

    /// Writes what was remembered since the last flush, in one transaction.
    pub fn flush(&mut self) -> Result<(), ContextError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let db = |source| ContextError::Database {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO stat_cache (dev, ino, size, mtime_ns, ctime_ns, mode, hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(db)?;
            for (stat, hash) in &self.pending {
                insert
                    .execute(params![
                        stat.dev as i64,
                        stat.ino as i64,
                        stat.size as i64,
                        stat.mtime_ns,
                        stat.ctime_ns,
                        stat.mode,
                        &hash[..],
                    ])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        self.pending.clear();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ino: u64, ctime_ns: i64) -> StatKey {
        StatKey {
            dev: 1,
            ino,
            size: 10,
            mtime_ns: ctime_ns,
            ctime_ns,
            mode: 0o100644,
        }
    }

    const NOW: i64 = 1_000_000_000_000;

    #[test]
    fn remembers_across_reopen_and_checks_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("context-v1.sqlite");
        {
            let mut cache = StatCache::open(&path).expect("open");
            cache.remember(stat(7, NOW - 10_000_000_000), [7; 32], NOW);
            cache.flush().expect("flush");
        }
        let cache = StatCache::open(&path).expect("reopen");
        assert_eq!(cache.lookup(&stat(7, NOW - 10_000_000_000)), Some([7; 32]));
        let mut moved = stat(7, NOW - 10_000_000_000);
        moved.ctime_ns += 1;
        assert_eq!(
            cache.lookup(&moved),
            None,
            "a ctime change defeats the cache"
        );
        let mut resized = stat(7, NOW - 10_000_000_000);
        resized.size = 11;
        assert_eq!(cache.lookup(&resized), None);
    }

    #[test]
    fn racily_fresh_files_are_not_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = StatCache::open(&dir.path().join("c.sqlite")).expect("open");
        cache.remember(stat(1, NOW - 1_000), [1; 32], NOW);
        assert_eq!(cache.lookup(&stat(1, NOW - 1_000)), None);
        assert!(cache.pending.is_empty());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("context-v1.sqlite");
        std::fs::write(&path, b"this is not a database, just junk bytes ........").expect("junk");
        let cache = StatCache::open(&path).expect("recovers");
        assert!(cache.is_empty());
        assert!(dir.path().join("context-v1.sqlite.corrupt").exists());
    }
}
