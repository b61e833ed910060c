//! The L2 index, `<root>/index-v1.sqlite`: what the blob store's blobs mean.
//!
//! | table | maps |
//! |---|---|
//! | `actions` | node key → when it was recorded and last used |
//! | `action_layers` | node key → the layers it produced, in order (none: an empty diff; several: a COPY split into chunks) |
//! | `images` | tag → manifest digest, config digest, size, creation time (`memobuild images`) |
//! | `resolutions` | image reference + platform → manifest digest and when it was resolved, so a rebuild does not ask the registry again within the TTL (offline rebuilds work) |
//!
//! One connection, owned by a mutex: `rusqlite::Connection` is not `Sync`, and every call is
//! short. WAL and `synchronous=NORMAL`: a crash can lose the last transactions, never corrupt.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::cas::{Blob, Digest};

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

#[derive(Debug)]
pub struct Index {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let err = |source| IndexError {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
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
             ) WITHOUT ROWID;",
        )
        .map_err(err)?;
        migrate_one_layer_actions(&conn).map_err(err)?;
        add_content_ids(&conn).map_err(err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn err(&self, source: rusqlite::Error) -> IndexError {
        IndexError {
            path: self.path.clone(),
            source,
        }
    }

    pub fn action(&self, key: &[u8; 32]) -> Result<Option<ActionResult>, IndexError> {
        let conn = self.conn();
        let touched = conn
            .execute(
                "UPDATE actions SET last_used = ?2 WHERE key = ?1",
                params![&key[..], now_unix()],
            )
            .map_err(|e| self.err(e))?;
        if touched == 0 {
            return Ok(None);
        }
        let mut statement = conn
            .prepare_cached(
                "SELECT layer_digest, layer_size, diff_id, media_type, content_id
                 FROM action_layers WHERE key = ?1 ORDER BY position",
            )
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map(params![&key[..]], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<Vec<u8>>>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut layers = Vec::new();
        for row in rows {
            let (digest, size, diff_id, media_type, content_id) = row.map_err(|e| self.err(e))?;
            // A row that does not parse is treated as a miss: the step reruns.
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
    }

    pub fn record_action(&self, key: &[u8; 32], result: &ActionResult) -> Result<(), IndexError> {
        let mut conn = self.conn();
        let write = |tx: &rusqlite::Transaction<'_>| -> rusqlite::Result<()> {
            let now = now_unix();
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
            Ok(())
        };
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        write(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Forgets an action whose blob turned out missing or corrupt.
    pub fn forget_action(&self, key: &[u8; 32]) -> Result<(), IndexError> {
        let conn = self.conn();
        for table in ["actions", "action_layers"] {
            conn.execute(
                &format!("DELETE FROM {table} WHERE key = ?1"),
                params![&key[..]],
            )
            .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub fn action_count(&self) -> Result<u64, IndexError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM actions", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    pub fn tag(&self, image: &ImageRecord) -> Result<(), IndexError> {
        self.conn()
            .execute(
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
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn untag(&self, name: &str) -> Result<bool, IndexError> {
        self.conn()
            .execute("DELETE FROM images WHERE name = ?1", params![name])
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, IndexError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare(
                "SELECT name, manifest_digest, manifest_size, config_digest, created
                 FROM images ORDER BY name",
            )
            .map_err(|e| self.err(e))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut images = Vec::new();
        for row in rows {
            let (name, manifest, size, config, created) = row.map_err(|e| self.err(e))?;
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

    /// The remembered digest of `reference` for `platform`, if resolved less than `ttl` ago.
    pub fn resolution(
        &self,
        reference: &str,
        platform: &str,
        ttl: Duration,
    ) -> Result<Option<Digest>, IndexError> {
        let row = self
            .conn()
            .query_row(
                "SELECT digest, resolved FROM resolutions WHERE reference = ?1 AND platform = ?2",
                params![reference, platform],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(digest, resolved)| {
            let age = now_unix().saturating_sub(resolved);
            (age >= 0 && (age as u64) < ttl.as_secs())
                .then(|| Digest::parse(&digest).ok())
                .flatten()
        }))
    }

    pub fn remember_resolution(
        &self,
        reference: &str,
        platform: &str,
        digest: &Digest,
    ) -> Result<(), IndexError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO resolutions (reference, platform, digest, resolved)
                 VALUES (?1, ?2, ?3, ?4)",
                params![reference, platform, digest.as_str(), now_unix()],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }
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

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index-v1.sqlite")).expect("open");
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
        index.record_action(&[1; 32], &with_layer).expect("record");
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
        index
            .record_action(&[3; 32], &with_layer)
            .expect("re-record");
        assert_eq!(index.action(&[3; 32]).expect("hit"), Some(with_layer));
        assert_eq!(index.action_count().expect("count"), 3);
        index.forget_action(&[1; 32]).expect("forget");
        assert_eq!(index.action(&[1; 32]).expect("miss"), None);
    }

    #[test]
    fn an_index_from_before_content_ids_opens_and_its_layers_read_as_misses() {
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
        let index = Index::open(&path).expect("migrate");
        assert_eq!(
            index.action(&[1; 32]).expect("read"),
            None,
            "a layer without its content id cannot be chained on"
        );
        assert_eq!(
            index.action(&[2; 32]).expect("hit"),
            Some(ActionResult { layers: vec![] })
        );
        let again = ActionResult {
            layers: vec![layer.clone()],
        };
        index.record_action(&[1; 32], &again).expect("record again");
        drop(index);
        let reopened = Index::open(&path).expect("reopen");
        assert_eq!(reopened.action(&[1; 32]).expect("hit"), Some(again));
    }

    #[test]
    fn tags_and_resolutions() {
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
        index.tag(&record).expect("tag");
        assert_eq!(index.images().expect("list"), [record]);
        assert!(index.untag("app:latest").expect("untag"));
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
}
