//! The index: what the store holds, its size, when it was created and last used, and how
//! often it was hit. [`Index`] answers from memory (a map behind one mutex: look-ups on the
//! request path never wait for the disk) and persists every change to `index.sqlite` (WAL)
//! on its own writer thread, batched in transactions. The files are the truth: at start the
//! index is reconciled with them (`store::Store::open`), and rebuilt from them if it was lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};

use super::digest::{Hash, Key, Kind};

/// What the index knows of one entry. Times are Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    pub created: i64,
    pub accessed: i64,
    pub hits: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("starting the index writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Changes on their way to SQLite.
#[derive(Debug)]
enum Op {
    Put(Key, Meta),
    Touch { key: Key, accessed: i64, hits: u64 },
    Remove(Key),
    Flush(mpsc::SyncSender<()>),
}

#[derive(Debug, Default)]
pub struct Entries {
    pub map: HashMap<Key, Meta>,
    pub bytes: u64,
}

/// The in-memory index and the channel to its SQLite writer.
#[derive(Debug)]
pub struct Index {
    entries: Mutex<Entries>,
    writer: mpsc::Sender<Op>,
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How often, at most, the writer commits.
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
    CREATE TABLE IF NOT EXISTS entries (
        kind INTEGER NOT NULL,
        hash BLOB NOT NULL,
        size INTEGER NOT NULL,
        created INTEGER NOT NULL,
        accessed INTEGER NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (kind, hash)
    ) WITHOUT ROWID;
";

impl Index {
    /// Opens (or creates) the SQLite index at `path` and loads it. A database that cannot be
    /// read is moved aside and started afresh: the caller then rebuilds it from the files.
    pub fn open(path: &Path) -> Result<(Self, HashMap<Key, Meta>), IndexError> {
        let sqlite_err = |source| IndexError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let (conn, loaded) = match open_and_load(path) {
            Ok(done) => done,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "index unreadable: rebuilding it from the files");
                for suffix in ["", "-wal", "-shm"] {
                    let mut name = path.as_os_str().to_owned();
                    name.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(name));
                }
                open_and_load(path).map_err(sqlite_err)?
            }
        };
        let (tx, rx) = mpsc::channel();
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("cache-index".to_owned())
            .spawn(move || writer(conn, &rx, &thread_path))
            .map_err(IndexError::Thread)?;
        Ok((
            Self {
                entries: Mutex::new(Entries::default()),
                writer: tx,
            },
            loaded,
        ))
    }

    /// Installs the reconciled entries (at start, before serving).
    pub fn install(&self, map: HashMap<Key, Meta>) {
        let mut entries = self.lock();
        entries.bytes = map.values().map(|m| m.size).sum();
        entries.map = map;
    }

    pub fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves the map consistent (every update is one
        // insert or remove), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, op: Op) {
        // The writer only stops with the process; a send error means it died, and the
        // next start reconciles the index with the files anyway.
        let _ = self.writer.send(op);
    }

    pub fn get(&self, key: &Key) -> Option<Meta> {
        self.lock().map.get(key).copied()
    }

    /// Records a stored entry, under the lock the caller holds while renaming it into place.
    pub fn put_locked(&self, entries: &mut Entries, key: Key, size: u64) {
        let now = now_millis();
        let meta = match entries.map.get(&key) {
            Some(old) => Meta {
                size,
                created: old.created,
                accessed: now,
                hits: old.hits,
            },
            None => Meta {
                size,
                created: now,
                accessed: now,
                hits: 0,
            },
        };
        if let Some(old) = entries.map.insert(key, meta) {
            entries.bytes -= old.size;
        }
        entries.bytes += size;
        self.send(Op::Put(key, meta));
    }

    /// Marks entries as used now; `hit` also counts a hit. Returns which were present (with
    /// the size the caller expects, when it gives one).
    pub fn touch(&self, keys: &[(Key, Option<u64>)], hit: bool) -> Vec<bool> {
        let now = now_millis();
        let mut ops = Vec::new();
        let present = {
            let mut entries = self.lock();
            keys.iter()
                .map(|(key, size)| match entries.map.get_mut(key) {
                    Some(meta) if size.is_none_or(|s| s == meta.size) => {
                        meta.accessed = now;
                        if hit {
                            meta.hits += 1;
                        }
                        ops.push(Op::Touch {
                            key: *key,
                            accessed: now,
                            hits: meta.hits,
                        });
                        true
                    }
                    _ => false,
                })
                .collect()
        };
        for op in ops {
            self.send(op);
        }
        present
    }

    /// Forgets an entry, under the lock the caller holds while removing its file.
    pub fn remove_locked(&self, entries: &mut Entries, key: &Key) -> Option<Meta> {
        let old = entries.map.remove(key)?;
        entries.bytes -= old.size;
        self.send(Op::Remove(*key));
        Some(old)
    }

    /// Waits until every change made so far is in SQLite.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Op::Flush(tx));
        let _ = rx.recv();
    }

    /// Replaces the whole SQLite table with `map` (after a reconcile at start).
    pub fn persist_all(&self, map: &HashMap<Key, Meta>) {
        for (key, meta) in map {
            self.send(Op::Put(*key, *meta));
        }
        self.flush();
    }
}

fn open_and_load(path: &Path) -> rusqlite::Result<(Connection, HashMap<Key, Meta>)> {
    let conn = Connection::open(path)?;
    conn.execute_batch(SCHEMA)?;
    let mut map = HashMap::new();
    {
        let mut stmt =
            conn.prepare("SELECT kind, hash, size, created, accessed, hits FROM entries")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })?;
        for row in rows {
            let (kind, hash, size, created, accessed, hits) = row?;
            let (Some(kind), Ok(hash)) = (Kind::from_code(kind), <[u8; 32]>::try_from(hash)) else {
                continue;
            };
            map.insert(
                Key {
                    kind,
                    hash: Hash(hash),
                },
                Meta {
                    size: u64::try_from(size).unwrap_or(0),
                    created,
                    accessed,
                    hits: u64::try_from(hits).unwrap_or(0),
                },
            );
        }
    }
    // Rows of entries whose files are gone are dropped by the reconcile; start clean.
    conn.execute("DELETE FROM entries", [])?;
    Ok((conn, map))
}

/// The writer thread: applies every queued change in one transaction per wake-up, so a burst
/// of touches costs one commit, and repeated touches of one entry one update.
fn writer(mut conn: Connection, rx: &mpsc::Receiver<Op>, path: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
            if batch.len() >= 10_000 {
                break;
            }
        }
        let mut waiters = Vec::new();
        if let Err(err) = apply(&mut conn, batch, &mut waiters) {
            // A full disk fails the commit; the files stay the truth and the next start
            // reconciles, so the server keeps serving.
            tracing::warn!(path = %path.display(), error = %err, "index write failed");
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
        // Let changes gather: under load one transaction and one wake-up per interval,
        // instead of one per request.
        std::thread::sleep(WRITE_INTERVAL);
    }
}

fn apply(
    conn: &mut Connection,
    batch: Vec<Op>,
    waiters: &mut Vec<mpsc::SyncSender<()>>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO entries (kind, hash, size, created, accessed, hits) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (kind, hash) DO UPDATE SET size = ?3, accessed = ?5, hits = ?6",
        )?;
        let mut touch = tx.prepare_cached(
            "UPDATE entries SET accessed = ?3, hits = ?4 WHERE kind = ?1 AND hash = ?2",
        )?;
        let mut remove = tx.prepare_cached("DELETE FROM entries WHERE kind = ?1 AND hash = ?2")?;
        // Only the last touch of an entry since its last put or remove matters; those are
        // applied at the end (a put or remove drops the touches before it).
        let mut touches: HashMap<Key, (i64, u64)> = HashMap::new();
        for op in batch {
            match op {
                Op::Put(key, meta) => {
                    touches.remove(&key);
                    put.execute(params![
                        key.kind.code(),
                        &key.hash.0[..],
                        i64::try_from(meta.size).unwrap_or(i64::MAX),
                        meta.created,
                        meta.accessed,
                        i64::try_from(meta.hits).unwrap_or(i64::MAX),
                    ])?;
                }
                Op::Touch {
                    key,
                    accessed,
                    hits,
                } => {
                    touch.execute(params![
                        key.kind.code(),
                        &key.hash.0[..],
                        accessed,
                        i64::try_from(hits).unwrap_or(i64::MAX),
                    ])?;
                }
                Op::Remove(key) => {
                    touches.remove(&key);
                    remove.execute(params![key.kind.code(), &key.hash.0[..]])?;
                }
                Op::Flush(waiter) => waiters.push(waiter),
            }
        }
        for (key, (accessed, hits)) in touches {
            touch.execute(params![
                key.kind.code(),
                &key.hash.0[..],
                accessed,
                i64::try_from(hits).unwrap_or(i64::MAX),
            ])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::cas(Hash([byte; 32]))
    }

    #[test]
    fn changes_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        {
            let (index, loaded) = Index::open(&path).expect("open");
            assert!(loaded.is_empty());
            let mut entries = index.lock();
            index.put_locked(&mut entries, key(1), 10);
            index.put_locked(&mut entries, key(2), 20);
            index.remove_locked(&mut entries, &key(2));
            assert_eq!(entries.bytes, 10);
            drop(entries);
            assert_eq!(
                index.touch(&[(key(1), Some(10)), (key(2), None)], true),
                [true, false]
            );
            assert_eq!(index.touch(&[(key(1), Some(11))], true), [false]);
            index.flush();
        }
        let (_index, loaded) = Index::open(&path).expect("reopen");
        assert_eq!(loaded.len(), 1);
        let meta = loaded[&key(1)];
        assert_eq!((meta.size, meta.hits), (10, 1));
    }

    #[test]
    fn an_unreadable_database_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.sqlite");
        std::fs::write(
            &path,
            b"this is not a database, just some bytes long enough",
        )
        .expect("write");
        let (_index, loaded) = Index::open(&path).expect("replaced");
        assert!(loaded.is_empty());
    }
}
