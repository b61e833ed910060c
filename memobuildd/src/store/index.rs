//! The store's index, `<root>/index-v1.sqlite`: what the blobs and unpacked layers mean and
//! who refers to them.
//!
//! | table | maps |
//! |---|---|
//! | `actions` | node key → when it was recorded and last used (GC's LRU order) |
//! | `action_layers` | node key → the layers it produced, in order (none: an empty diff; several: a COPY split into chunks) |
//! | `images` | tag → manifest digest, config digest, size, creation time (`memobuild images`) |
//! | `image_actions` | tag → the node keys its build used: GC keeps them, so a tagged image rebuilds fully cached |
//! | `resolutions` | image reference + platform → manifest digest and when it was resolved, so a rebuild does not ask the registry again within the TTL (offline rebuilds work) |
//! | `bases` | base image manifest → last use: a GC root like an action, LRU too |
//! | `blobs` | every file of `cas-v1/`: digest → size and bytes on disk |
//! | `unpacked` | every directory of `layers-v1/`: diff-id → bytes on disk |
//!
//! Schema changes that only add tables or indexes keep the file name and bump
//! `PRAGMA user_version`; [`Opened::needs_reconcile`] tells the store to fill new tables
//! from what is on disk. One connection, owned by a mutex: `rusqlite::Connection` is not
//! `Sync`, and every call is short; callers are on blocking threads (see `store`). WAL and
//! `synchronous=NORMAL`: a crash can lose the last transactions, never corrupt.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::blobs::{Blob, Digest};

/// A node key (`engine::keys`), as the action cache stores it.
pub type ActionKey = [u8; 32];

/// The schema this code writes: 2 added `blobs`, `unpacked`, `bases`, `image_actions`.
const SCHEMA_VERSION: i64 = 2;

/// What a filesystem step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionResult {
    /// Bottom first. Empty: the step changed nothing, so the image gets no layer for it;
    /// more than one: a large COPY split into chunks (`engine::copy::Plan::chunks`).
    pub layers: Vec<LayerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub blob: Blob,
    pub diff_id: Digest,
    pub media_type: String,
    /// What keys see of the layer (`image::layer::Layer::content_id`).
    pub content_id: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub manifest: Blob,
    pub config: Digest,
    pub created_unix: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("index {}: {source}", path.display())]
pub struct IndexError {
    path: PathBuf,
    #[source]
    source: rusqlite::Error,
}

impl IndexError {
    /// The file is not a database, or its pages are damaged: only a rebuild helps.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self.source.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    }

    /// SQLite could not grow the file: the disk is full.
    pub fn is_full(&self) -> bool {
        self.source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An index just opened.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) index: Index,
    /// Tables were added since this file was written: fill them from the disk.
    pub(super) needs_reconcile: bool,
}

#[derive(Debug)]
pub(super) struct Index {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// What GC plans with: every root and everything they refer to.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Oldest first.
    pub(super) actions: Vec<(ActionKey, i64)>,
    pub(super) action_layers: HashMap<ActionKey, Vec<(Digest, Digest)>>,
    /// Oldest first.
    pub(super) bases: Vec<(Digest, i64)>,
    pub(super) tags: Vec<ImageRecord>,
    pub(super) tagged_actions: HashSet<ActionKey>,
    pub(super) blobs: HashMap<Digest, u64>,
    pub(super) unpacked: HashMap<Digest, u64>,
    /// The compressed forms made of each layer (by diff-id): blobs that live as long as it.
    pub(super) forms: HashMap<Digest, Vec<Digest>>,
}

/// Counts kept in memory by the store, as they are when it opens.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Totals {
    pub(super) blobs: u64,
    pub(super) blob_bytes: u64,
    pub(super) layers: u64,
    pub(super) layer_bytes: u64,
    pub(super) actions: u64,
    pub(super) tags: u64,
}

impl Index {
    pub(super) fn open(path: &Path) -> Result<Opened, IndexError> {
        let err = |source| IndexError {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(err)?;
        let fresh: bool = conn
            .query_row(
                "SELECT COUNT(*) = 0 FROM sqlite_master WHERE name = 'actions'",
                [],
                |row| row.get(0),
            )
            .map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS actions (
                 key BLOB PRIMARY KEY NOT NULL,
                 created INTEGER NOT NULL, last_used INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS action_layers (
                 key BLOB NOT NULL, position INTEGER NOT NULL,
                 layer_digest TEXT NOT NULL, layer_size INTEGER NOT NULL,
                 diff_id TEXT NOT NULL, media_type TEXT NOT NULL, content_id BLOB,
                 PRIMARY KEY (key, position)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS images (
                 name TEXT PRIMARY KEY NOT NULL,
                 manifest_digest TEXT NOT NULL, manifest_size INTEGER NOT NULL,
                 config_digest TEXT NOT NULL, created INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS resolutions (
                 reference TEXT NOT NULL, platform TEXT NOT NULL,
                 digest TEXT NOT NULL, resolved INTEGER NOT NULL,
                 PRIMARY KEY (reference, platform)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS image_actions (
                 name TEXT NOT NULL, key BLOB NOT NULL, PRIMARY KEY (name, key)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS bases (
                 manifest TEXT PRIMARY KEY NOT NULL, last_used INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS blobs (
                 digest TEXT PRIMARY KEY NOT NULL, size INTEGER NOT NULL, disk INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS unpacked (
                 diff_id TEXT PRIMARY KEY NOT NULL, disk INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS forms (
                 diff_id TEXT NOT NULL, form TEXT NOT NULL,
                 digest TEXT NOT NULL, size INTEGER NOT NULL,
                 PRIMARY KEY (diff_id, form)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS forms_by_digest ON forms (digest);
             CREATE INDEX IF NOT EXISTS action_layers_by_digest ON action_layers (layer_digest);
             CREATE INDEX IF NOT EXISTS action_layers_by_diff_id ON action_layers (diff_id);
             CREATE INDEX IF NOT EXISTS actions_by_last_use ON actions (last_used);
             CREATE INDEX IF NOT EXISTS image_actions_by_key ON image_actions (key);",
        )
        .map_err(err)?;
        migrate_one_layer_actions(&conn).map_err(err)?;
        add_content_ids(&conn).map_err(err)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(err)?;
        Ok(Opened {
            index: Self {
                conn: Mutex::new(conn),
                path: path.to_owned(),
            },
            needs_reconcile: !fresh && version < SCHEMA_VERSION,
        })
    }

    /// Moves the damaged files aside (`<name>.damaged`, replacing an older one) and starts a
    /// fresh index in their place. Returns where the old one went.
    pub(super) fn replace_damaged(&self) -> Result<PathBuf, IndexError> {
        let err = |source| IndexError {
            path: self.path.clone(),
            source,
        };
        let mut conn = self.conn();
        let aside = self.path.with_extension("sqlite.damaged");
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", self.path.display()));
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            let _ = std::fs::remove_file(&to);
            let _ = std::fs::rename(&from, &to);
        }
        let fresh = Self::open(&self.path)?;
        let new_conn = fresh.index.conn.into_inner().map_err(|_| {
            err(rusqlite::Error::InvalidParameterName(
                "index mutex poisoned".into(),
            ))
        })?;
        *conn = new_conn;
        Ok(aside)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, IndexError> {
        work(&mut self.conn()).map_err(|source| IndexError {
            path: self.path.clone(),
            source,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn action(&self, key: &ActionKey) -> Result<Option<ActionResult>, IndexError> {
        self.with(|conn| {
            let touched = conn.execute(
                "UPDATE actions SET last_used = ?2 WHERE key = ?1",
                params![&key[..], now_unix()],
            )?;
            if touched == 0 {
                return Ok(None);
            }
            let mut statement = conn.prepare_cached(
                "SELECT layer_digest, layer_size, diff_id, media_type, content_id
                 FROM action_layers WHERE key = ?1 ORDER BY position",
            )?;
            let rows = statement.query_map(params![&key[..]], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })?;
            let mut layers = Vec::new();
            for row in rows {
                let (digest, size, diff_id, media_type, content_id) = row?;
                // A row that does not parse, or one from before content ids (which keys
                // chain on), is treated as a miss: the step reruns.
                let (Ok(digest), Ok(diff_id), Some(Ok(content_id))) = (
                    Digest::parse(&digest),
                    Digest::parse(&diff_id),
                    content_id.map(<[u8; 32]>::try_from),
                ) else {
                    return Ok(None);
                };
                layers.push(LayerRecord {
                    blob: Blob {
                        digest,
                        size: size as u64,
                    },
                    diff_id,
                    media_type,
                    content_id,
                });
            }
            Ok(Some(ActionResult { layers }))
        })
    }

    /// Records (or replaces) an action; `true` when the key is new.
    pub(super) fn record_action(
        &self,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<bool, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let now = now_unix();
            let existed = tx
                .query_row(
                    "SELECT 1 FROM actions WHERE key = ?1",
                    params![&key[..]],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            tx.execute(
                "INSERT OR REPLACE INTO actions (key, created, last_used) VALUES (?1, ?2, ?2)",
                params![&key[..], now],
            )?;
            tx.execute(
                "DELETE FROM action_layers WHERE key = ?1",
                params![&key[..]],
            )?;
            for (position, layer) in result.layers.iter().enumerate() {
                tx.execute(
                    "INSERT INTO action_layers
                     (key, position, layer_digest, layer_size, diff_id, media_type, content_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        &key[..],
                        position as i64,
                        layer.blob.digest.as_str(),
                        layer.blob.size as i64,
                        layer.diff_id.as_str(),
                        layer.media_type,
                        &layer.content_id[..],
                    ],
                )?;
            }
            tx.commit()?;
            Ok(!existed)
        })
    }

    /// Forgets actions (whose blobs turned out missing or damaged, or that GC collects);
    /// returns how many there were.
    pub(super) fn forget_actions(&self, keys: &[ActionKey]) -> Result<u64, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let mut removed = 0;
            for key in keys {
                removed += tx.execute("DELETE FROM actions WHERE key = ?1", params![&key[..]])?;
                tx.execute(
                    "DELETE FROM action_layers WHERE key = ?1",
                    params![&key[..]],
                )?;
            }
            tx.commit()?;
            Ok(removed as u64)
        })
    }

    /// Keys of the actions one of whose layers is the blob `digest`.
    pub(super) fn actions_naming(&self, digest: &Digest) -> Result<Vec<ActionKey>, IndexError> {
        self.with(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT DISTINCT key FROM action_layers WHERE layer_digest = ?1")?;
            let keys = statement
                .query_map(params![digest.as_str()], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|key| key.map(|k| k.try_into().ok()).transpose())
                .collect::<rusqlite::Result<Vec<ActionKey>>>()?;
            Ok(keys)
        })
    }

    /// Marks actions and base images used now (uses batched in memory by the store).
    pub(super) fn touch(&self, actions: &[ActionKey], bases: &[Digest]) -> Result<(), IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let now = now_unix();
            for key in actions {
                tx.execute(
                    "UPDATE actions SET last_used = ?2 WHERE key = ?1",
                    params![&key[..], now],
                )?;
            }
            for manifest in bases {
                tx.execute(
                    "INSERT OR REPLACE INTO bases (manifest, last_used) VALUES (?1, ?2)",
                    params![manifest.as_str(), now],
                )?;
            }
            tx.commit()
        })
    }

    /// Tags an image and pins the actions its build used; `true` when the name is new.
    pub(super) fn tag(
        &self,
        image: &ImageRecord,
        actions: &[ActionKey],
    ) -> Result<bool, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let existed = tx
                .query_row(
                    "SELECT 1 FROM images WHERE name = ?1",
                    params![image.name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            tx.execute(
                "INSERT OR REPLACE INTO images
                 (name, manifest_digest, manifest_size, config_digest, created)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    image.name,
                    image.manifest.digest.as_str(),
                    image.manifest.size as i64,
                    image.config.as_str(),
                    image.created_unix as i64,
                ],
            )?;
            tx.execute(
                "DELETE FROM image_actions WHERE name = ?1",
                params![image.name],
            )?;
            for key in actions {
                tx.execute(
                    "INSERT OR IGNORE INTO image_actions (name, key) VALUES (?1, ?2)",
                    params![image.name, &key[..]],
                )?;
            }
            tx.commit()?;
            Ok(!existed)
        })
    }

    pub(super) fn untag(&self, name: &str) -> Result<bool, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let removed = tx.execute("DELETE FROM images WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM image_actions WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(removed > 0)
        })
    }

    pub(super) fn images(&self) -> Result<Vec<ImageRecord>, IndexError> {
        self.with(|conn| read_images(conn))
    }

    /// The remembered digest of `reference` for `platform`, if resolved less than `ttl` ago.
    pub(super) fn resolution(
        &self,
        reference: &str,
        platform: &str,
        ttl: Duration,
    ) -> Result<Option<Digest>, IndexError> {
        let row = self.with(|conn| {
            conn.query_row(
                "SELECT digest, resolved FROM resolutions WHERE reference = ?1 AND platform = ?2",
                params![reference, platform],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
            )
            .optional()
        })?;
        Ok(row.and_then(|(digest, resolved)| {
            let age = now_unix().saturating_sub(resolved);
            (age >= 0 && (age as u64) < ttl.as_secs())
                .then(|| Digest::parse(&digest).ok())
                .flatten()
        }))
    }

    pub(super) fn remember_resolution(
        &self,
        reference: &str,
        platform: &str,
        digest: &Digest,
    ) -> Result<(), IndexError> {
        self.remember_resolution_at(reference, platform, digest, now_unix())
    }

    fn remember_resolution_at(
        &self,
        reference: &str,
        platform: &str,
        digest: &Digest,
        resolved: i64,
    ) -> Result<(), IndexError> {
        self.with(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO resolutions (reference, platform, digest, resolved)
                 VALUES (?1, ?2, ?3, ?4)",
                params![reference, platform, digest.as_str(), resolved],
            )
            .map(drop)
        })
    }

    /// Adds a blob's row; `true` when it was not there.
    pub(super) fn insert_blob(
        &self,
        digest: &Digest,
        size: u64,
        disk: u64,
    ) -> Result<bool, IndexError> {
        self.with(|conn| {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO blobs (digest, size, disk) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![digest.as_str(), size as i64, disk as i64])
            .map(|n| n > 0)
        })
    }

    /// Adds an unpacked layer's row; `true` when it was not there.
    pub(super) fn insert_unpacked(&self, diff_id: &Digest, disk: u64) -> Result<bool, IndexError> {
        self.with(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO unpacked (diff_id, disk) VALUES (?1, ?2)",
                params![diff_id.as_str(), disk as i64],
            )
            .map(|n| n > 0)
        })
    }

    /// Removes blob rows; returns the bytes on disk of those that were there.
    pub(super) fn remove_blobs(&self, digests: &[Digest]) -> Result<(u64, u64), IndexError> {
        let removed = self.remove_rows("blobs", "digest", digests)?;
        self.with(|conn| {
            let mut statement = conn.prepare_cached("DELETE FROM forms WHERE digest = ?1")?;
            for digest in digests {
                statement.execute(params![digest.as_str()])?;
            }
            Ok(())
        })?;
        Ok(removed)
    }

    /// The blob holding the layer `diff_id` in `form` (`image::compress::Compression::form`),
    /// if one was made.
    pub(super) fn form(&self, diff_id: &Digest, form: &str) -> Result<Option<Blob>, IndexError> {
        self.with(|conn| {
            let row = conn
                .prepare_cached("SELECT digest, size FROM forms WHERE diff_id = ?1 AND form = ?2")?
                .query_row(params![diff_id.as_str(), form], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()?;
            Ok(row.and_then(|(digest, size)| {
                Some(Blob {
                    digest: Digest::parse(&digest).ok()?,
                    size: size as u64,
                })
            }))
        })
    }

    pub(super) fn record_form(
        &self,
        diff_id: &Digest,
        form: &str,
        blob: &Blob,
    ) -> Result<(), IndexError> {
        self.with(|conn| {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO forms (diff_id, form, digest, size) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                diff_id.as_str(),
                form,
                blob.digest.as_str(),
                blob.size as i64
            ])
            .map(drop)
        })
    }

    /// Removes unpacked-layer rows; returns (rows, bytes on disk) of those that were there.
    pub(super) fn remove_unpacked(&self, diff_ids: &[Digest]) -> Result<(u64, u64), IndexError> {
        self.remove_rows("unpacked", "diff_id", diff_ids)
    }

    fn remove_rows(
        &self,
        table: &str,
        column: &str,
        ids: &[Digest],
    ) -> Result<(u64, u64), IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let (mut rows, mut bytes) = (0, 0);
            {
                let mut statement = tx.prepare(&format!(
                    "DELETE FROM {table} WHERE {column} = ?1 RETURNING disk"
                ))?;
                for id in ids {
                    let disk: Option<i64> = statement
                        .query_row(params![id.as_str()], |row| row.get(0))
                        .optional()?;
                    if let Some(disk) = disk {
                        rows += 1;
                        bytes += disk as u64;
                    }
                }
            }
            tx.commit()?;
            Ok((rows, bytes))
        })
    }

    /// Removes base image rows.
    pub(super) fn forget_bases(&self, manifests: &[Digest]) -> Result<u64, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let mut removed = 0;
            for manifest in manifests {
                removed += tx.execute(
                    "DELETE FROM bases WHERE manifest = ?1",
                    params![manifest.as_str()],
                )?;
            }
            tx.commit()?;
            Ok(removed as u64)
        })
    }

    /// Whether an action names the blob `digest` (`by_diff_id`: the layer `digest`).
    pub(super) fn layer_referenced(
        &self,
        digest: &Digest,
        by_diff_id: bool,
    ) -> Result<bool, IndexError> {
        let sql = if by_diff_id {
            "SELECT 1 FROM action_layers WHERE diff_id = ?1 LIMIT 1"
        } else {
            "SELECT 1 FROM action_layers WHERE layer_digest = ?1 LIMIT 1"
        };
        self.with(|conn| {
            conn.prepare_cached(sql)?
                .query_row(params![digest.as_str()], |_| Ok(()))
                .optional()
                .map(|found| found.is_some())
        })
    }

    /// Whether `digest` is a form of a layer an action names.
    pub(super) fn form_referenced(&self, digest: &Digest) -> Result<bool, IndexError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT 1 FROM forms JOIN action_layers ON action_layers.diff_id = forms.diff_id
                 WHERE forms.digest = ?1 LIMIT 1",
            )?
            .query_row(params![digest.as_str()], |_| Ok(()))
            .optional()
            .map(|found| found.is_some())
        })
    }

    /// The actions tags pin.
    pub(super) fn tagged_actions(&self) -> Result<HashSet<ActionKey>, IndexError> {
        self.with(|conn| read_tagged_actions(conn))
    }

    pub(super) fn totals(&self) -> Result<Totals, IndexError> {
        self.with(|conn| {
            let (blobs, blob_bytes) = conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(disk), 0) FROM blobs",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
            )?;
            let (layers, layer_bytes) = conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(disk), 0) FROM unpacked",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
            )?;
            let actions: i64 = conn.query_row("SELECT COUNT(*) FROM actions", [], |r| r.get(0))?;
            let tags: i64 = conn.query_row("SELECT COUNT(*) FROM images", [], |r| r.get(0))?;
            Ok(Totals {
                blobs: blobs as u64,
                blob_bytes: blob_bytes as u64,
                layers: layers as u64,
                layer_bytes: layer_bytes as u64,
                actions: actions as u64,
                tags: tags as u64,
            })
        })
    }

    /// Everything GC plans with, read in one transaction.
    pub(super) fn snapshot(&self) -> Result<Snapshot, IndexError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let mut snapshot = Snapshot::default();
            {
                let mut statement =
                    tx.prepare("SELECT key, last_used FROM actions ORDER BY last_used, key")?;
                let rows = statement.query_map([], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
                })?;
                for row in rows {
                    let (key, used) = row?;
                    if let Ok(key) = key.try_into() {
                        snapshot.actions.push((key, used));
                    }
                }
                let mut statement =
                    tx.prepare("SELECT key, layer_digest, diff_id FROM action_layers")?;
                let rows = statement.query_map([], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                })?;
                for row in rows {
                    let (key, digest, diff_id) = row?;
                    if let (Ok(key), Ok(digest), Ok(diff_id)) = (
                        ActionKey::try_from(key),
                        Digest::parse(&digest),
                        Digest::parse(&diff_id),
                    ) {
                        snapshot
                            .action_layers
                            .entry(key)
                            .or_default()
                            .push((digest, diff_id));
                    }
                }
                let mut statement =
                    tx.prepare("SELECT manifest, last_used FROM bases ORDER BY last_used")?;
                let rows = statement.query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?;
                for row in rows {
                    let (manifest, used) = row?;
                    if let Ok(manifest) = Digest::parse(&manifest) {
                        snapshot.bases.push((manifest, used));
                    }
                }
                let mut statement = tx.prepare("SELECT diff_id, digest FROM forms")?;
                let rows = statement.query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (diff_id, digest) = row?;
                    if let (Ok(diff_id), Ok(digest)) =
                        (Digest::parse(&diff_id), Digest::parse(&digest))
                    {
                        snapshot.forms.entry(diff_id).or_default().push(digest);
                    }
                }
                snapshot.tags = read_images(&tx)?;
                snapshot.tagged_actions = read_tagged_actions(&tx)?;
                for (table, column, into) in [
                    ("blobs", "digest", &mut snapshot.blobs),
                    ("unpacked", "diff_id", &mut snapshot.unpacked),
                ] {
                    let mut statement =
                        tx.prepare(&format!("SELECT {column}, disk FROM {table}"))?;
                    let rows = statement.query_map([], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                    })?;
                    for row in rows {
                        let (id, disk) = row?;
                        if let Ok(id) = Digest::parse(&id) {
                            into.insert(id, disk as u64);
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(snapshot)
        })
    }

    /// Gives the WAL's pages back to the main file and truncates it (after a GC pass).
    pub(super) fn checkpoint(&self) -> Result<(), IndexError> {
        self.with(|conn| conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
    }

    /// Copies what can still be read from a damaged index into this one: tags whose
    /// manifest `exists`, and resolutions. Returns how many tags came back.
    pub(super) fn salvage_from(&self, damaged: &Path, exists: impl Fn(&Digest) -> bool) -> u64 {
        let Ok(old) = Connection::open_with_flags(damaged, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
            return 0;
        };
        let mut recovered = 0;
        if let Ok(images) = read_images(&old) {
            for image in images.into_iter().filter(|i| exists(&i.manifest.digest)) {
                if self.tag(&image, &[]).is_ok() {
                    recovered += 1;
                }
            }
        }
        let resolutions = old
            .prepare("SELECT reference, platform, digest, resolved FROM resolutions")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                            row.get::<_, i64>(3)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
            });
        for (reference, platform, digest, resolved) in resolutions.unwrap_or_default() {
            if let Ok(digest) = Digest::parse(&digest) {
                let _ = self.remember_resolution_at(&reference, &platform, &digest, resolved);
            }
        }
        recovered
    }
}

#[cfg(test)]
impl Index {
    /// Ages an action, for LRU tests.
    pub(super) fn set_last_used(&self, key: &ActionKey, last_used: i64) {
        self.with(|conn| {
            conn.execute(
                "UPDATE actions SET last_used = ?2 WHERE key = ?1",
                params![&key[..], last_used],
            )
        })
        .expect("age an action");
    }
}

fn read_tagged_actions(conn: &Connection) -> rusqlite::Result<HashSet<ActionKey>> {
    let mut statement = conn.prepare_cached("SELECT DISTINCT key FROM image_actions")?;
    let rows = statement.query_map([], |row| row.get::<_, Vec<u8>>(0))?;
    let mut keys = HashSet::new();
    for row in rows {
        if let Ok(key) = ActionKey::try_from(row?) {
            keys.insert(key);
        }
    }
    Ok(keys)
}

fn read_images(conn: &Connection) -> rusqlite::Result<Vec<ImageRecord>> {
    let mut statement = conn.prepare(
        "SELECT name, manifest_digest, manifest_size, config_digest, created
         FROM images ORDER BY name",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
        ))
    })?;
    let mut images = Vec::new();
    for row in rows {
        let (name, manifest, size, config, created) = row?;
        if let (Ok(manifest), Ok(config)) = (Digest::parse(&manifest), Digest::parse(&config)) {
            images.push(ImageRecord {
                name,
                manifest: Blob {
                    digest: manifest,
                    size: size as u64,
                },
                config,
                created_unix: created as u64,
            });
        }
    }
    Ok(images)
}

/// Indexes written before layers had their own table kept one layer per action in
/// `actions` itself: move those rows over once, so an upgraded daemon keeps its cache.
fn migrate_one_layer_actions(conn: &Connection) -> rusqlite::Result<()> {
    let old_layout: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('actions') WHERE name = 'layer_digest'",
        [],
        |row| row.get(0),
    )?;
    if !old_layout {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN;
         INSERT OR IGNORE INTO action_layers
             (key, position, layer_digest, layer_size, diff_id, media_type)
             SELECT key, 0, layer_digest, layer_size, diff_id, media_type FROM actions
             WHERE layer_digest IS NOT NULL;
         ALTER TABLE actions DROP COLUMN layer_digest;
         ALTER TABLE actions DROP COLUMN layer_size;
         ALTER TABLE actions DROP COLUMN diff_id;
         ALTER TABLE actions DROP COLUMN media_type;
         COMMIT;",
    )
}

/// Layers recorded before content ids existed gain the column; their rows read as misses
/// (their keys, of an older key version, are not asked for again anyway).
fn add_content_ids(conn: &Connection) -> rusqlite::Result<()> {
    let has_it: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('action_layers') WHERE name = 'content_id'",
        [],
        |row| row.get(0),
    )?;
    if has_it {
        return Ok(());
    }
    conn.execute_batch("ALTER TABLE action_layers ADD COLUMN content_id BLOB")
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index-v1.sqlite"))
            .expect("open")
            .index;
        (dir, index)
    }

    fn layer() -> LayerRecord {
        LayerRecord {
            blob: Blob {
                digest: Digest::of(b"gz"),
                size: 2,
            },
            diff_id: Digest::of(b"tar"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            content_id: [7; 32],
        }
    }

    #[test]
    fn actions_round_trip_including_empty_diffs() {
        let (_dir, index) = index();
        assert_eq!(index.action(&[1; 32]).expect("lookup"), None);
        let with_layer = ActionResult {
            layers: vec![layer()],
        };
        assert!(index.record_action(&[1; 32], &with_layer).expect("record"));
        index
            .record_action(&[2; 32], &ActionResult { layers: vec![] })
            .expect("record empty");
        assert_eq!(
            index.action(&[1; 32]).expect("hit"),
            Some(with_layer.clone())
        );
        assert_eq!(
            index.action(&[2; 32]).expect("hit"),
            Some(ActionResult { layers: vec![] })
        );
        let chunked = ActionResult {
            layers: vec![layer(), layer(), layer()],
        };
        index
            .record_action(&[3; 32], &chunked)
            .expect("record chunks");
        assert_eq!(index.action(&[3; 32]).expect("hit"), Some(chunked));
        assert!(
            !index
                .record_action(&[3; 32], &with_layer)
                .expect("re-record")
        );
        assert_eq!(index.action(&[3; 32]).expect("hit"), Some(with_layer));
        assert_eq!(index.totals().expect("totals").actions, 3);
        assert_eq!(
            index
                .actions_naming(&layer().blob.digest)
                .expect("naming")
                .len(),
            2
        );
        assert_eq!(index.forget_actions(&[[1; 32]]).expect("forget"), 1);
        assert_eq!(index.action(&[1; 32]).expect("miss"), None);
    }

    #[test]
    fn an_index_from_before_action_layers_opens_and_chains_on_nothing_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index-v1.sqlite");
        let old = Connection::open(&path).expect("open");
        old.execute_batch(
            "CREATE TABLE actions (
                 key BLOB PRIMARY KEY NOT NULL,
                 layer_digest TEXT, layer_size INTEGER, diff_id TEXT, media_type TEXT,
                 created INTEGER NOT NULL, last_used INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .expect("old schema");
        let layer = layer();
        old.execute(
            "INSERT INTO actions VALUES (?1, ?2, 2, ?3, ?4, 0, 0), (?5, NULL, NULL, NULL, NULL, 0, 0)",
            params![
                &[1u8; 32][..],
                layer.blob.digest.as_str(),
                layer.diff_id.as_str(),
                layer.media_type,
                &[2u8; 32][..]
            ],
        )
        .expect("old rows");
        drop(old);
        for round in 0..2 {
            let opened = Index::open(&path).expect("migrate");
            assert_eq!(opened.needs_reconcile, round == 0, "round {round}");
            let index = opened.index;
            assert_eq!(
                index.action(&[1; 32]).expect("read"),
                None,
                "a layer without its content id cannot be chained on"
            );
            assert_eq!(
                index.action(&[2; 32]).expect("hit"),
                Some(ActionResult { layers: vec![] })
            );
        }
        let index = Index::open(&path).expect("reopen").index;
        let again = ActionResult {
            layers: vec![layer.clone()],
        };
        index.record_action(&[1; 32], &again).expect("record again");
        assert_eq!(index.action(&[1; 32]).expect("hit"), Some(again));
    }

    #[test]
    fn tags_pin_actions_and_resolutions_expire() {
        let (_dir, index) = index();
        let record = ImageRecord {
            name: "app:latest".into(),
            manifest: Blob {
                digest: Digest::of(b"m"),
                size: 1,
            },
            config: Digest::of(b"c"),
            created_unix: 7,
        };
        assert!(index.tag(&record, &[[9; 32]]).expect("tag"));
        assert!(!index.tag(&record, &[[9; 32]]).expect("retag"));
        assert_eq!(index.images().expect("list"), [record]);
        assert!(index.tagged_actions().expect("pinned").contains(&[9; 32]));
        assert!(index.untag("app:latest").expect("untag"));
        assert!(index.tagged_actions().expect("unpinned").is_empty());
        assert!(index.images().expect("list").is_empty());

        let digest = Digest::of(b"manifest");
        index
            .remember_resolution("busybox", "linux/amd64", &digest)
            .expect("remember");
        let hour = Duration::from_secs(3600);
        assert_eq!(
            index.resolution("busybox", "linux/amd64", hour).expect("q"),
            Some(digest)
        );
        assert_eq!(
            index.resolution("busybox", "linux/arm64", hour).expect("q"),
            None
        );
        assert_eq!(
            index
                .resolution("busybox", "linux/amd64", Duration::ZERO)
                .expect("q"),
            None,
            "expired"
        );
    }

    #[test]
    fn blob_and_layer_rows_are_counted_once() {
        let (_dir, index) = index();
        let digest = Digest::of(b"blob");
        assert!(index.insert_blob(&digest, 4, 4096).expect("insert"));
        assert!(!index.insert_blob(&digest, 4, 4096).expect("again"));
        assert!(index.insert_unpacked(&digest, 8192).expect("layer"));
        let totals = index.totals().expect("totals");
        assert_eq!((totals.blobs, totals.blob_bytes), (1, 4096));
        assert_eq!((totals.layers, totals.layer_bytes), (1, 8192));
        assert_eq!(
            index
                .remove_blobs(&[digest.clone(), Digest::of(b"x")])
                .expect("rm"),
            (1, 4096)
        );
        assert_eq!(index.remove_unpacked(&[digest]).expect("rm"), (1, 8192));
    }
}
