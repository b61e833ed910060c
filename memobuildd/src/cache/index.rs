//! The L2 index, `<root>/index-v1.sqlite`: what the blob store's blobs mean.
//!
//! | table | maps |
//! |---|---|
//! | `actions` | node key → the layer it produced (or none: an empty diff), used for L2 hits |
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
    /// `None`: the step changed nothing, so the image gets no layer for it.
    pub layer: Option<LayerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub blob: Blob,
    pub diff_id: Digest,
    pub media_type: String,
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
                 layer_digest TEXT, layer_size INTEGER, diff_id TEXT, media_type TEXT,
                 created INTEGER NOT NULL, last_used INTEGER NOT NULL
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
        let row = conn
            .query_row(
                "SELECT layer_digest, layer_size, diff_id, media_type FROM actions WHERE key = ?1",
                params![&key[..]],
                |row| {
                    Ok((
                        row.get::<_, Option<String>>(0)?,
                        row.get::<_, Option<i64>>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((digest, size, diff_id, media_type)) = row else {
            return Ok(None);
        };
        let _ = conn.execute(
            "UPDATE actions SET last_used = ?2 WHERE key = ?1",
            params![&key[..], now_unix()],
        );
        let layer = match (digest, size, diff_id, media_type) {
            (Some(digest), Some(size), Some(diff_id), Some(media_type)) => {
                // A row that does not parse is treated as a miss: the step reruns.
                let (Ok(digest), Ok(diff_id)) = (Digest::parse(&digest), Digest::parse(&diff_id))
                else {
                    return Ok(None);
                };
                Some(LayerRecord {
                    blob: Blob {
                        digest,
                        size: size as u64,
                    },
                    diff_id,
                    media_type,
                })
            }
            _ => None,
        };
        Ok(Some(ActionResult { layer }))
    }

    pub fn record_action(&self, key: &[u8; 32], result: &ActionResult) -> Result<(), IndexError> {
        let layer = result.layer.as_ref();
        let now = now_unix();
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO actions
                 (key, layer_digest, layer_size, diff_id, media_type, created, last_used)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![
                    &key[..],
                    layer.map(|l| l.blob.digest.as_str().to_owned()),
                    layer.map(|l| l.blob.size as i64),
                    layer.map(|l| l.diff_id.as_str().to_owned()),
                    layer.map(|l| l.media_type.clone()),
                    now,
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Forgets an action whose blob turned out missing or corrupt.
    pub fn forget_action(&self, key: &[u8; 32]) -> Result<(), IndexError> {
        self.conn()
            .execute("DELETE FROM actions WHERE key = ?1", params![&key[..]])
            .map(drop)
            .map_err(|e| self.err(e))
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
        }
    }

    #[test]
    fn actions_round_trip_including_empty_diffs() {
        let (_dir, index) = index();
        assert_eq!(index.action(&[1; 32]).expect("lookup"), None);
        let with_layer = ActionResult {
            layer: Some(layer()),
        };
        index.record_action(&[1; 32], &with_layer).expect("record");
        index
            .record_action(&[2; 32], &ActionResult { layer: None })
            .expect("record empty");
        assert_eq!(index.action(&[1; 32]).expect("hit"), Some(with_layer));
        assert_eq!(
            index.action(&[2; 32]).expect("hit"),
            Some(ActionResult { layer: None })
        );
        assert_eq!(index.action_count().expect("count"), 2);
        index.forget_action(&[1; 32]).expect("forget");
        assert_eq!(index.action(&[1; 32]).expect("miss"), None);
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
