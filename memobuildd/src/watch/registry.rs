//! Watched workspaces persisted in the context database, with what was last built of each,
//! so a restarted daemon picks them up and still tells dirty from clean from never built.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::WatchError;
use super::workspace::Baseline;

#[derive(Debug)]
pub(super) struct Registry {
    conn: Connection,
}

/// One registered workspace.
#[derive(Debug)]
pub(super) struct Registered {
    pub(super) context: PathBuf,
    pub(super) dockerfile: PathBuf,
    /// [`Baseline::to_bytes`] of its last build, if it was built.
    pub(super) baseline: Option<Vec<u8>>,
}

impl Registry {
    pub(super) fn open(path: &Path) -> Result<Self, WatchError> {
        let conn = Connection::open(path).map_err(WatchError::Registry)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS workspaces (
                 context TEXT PRIMARY KEY NOT NULL,
                 dockerfile TEXT NOT NULL
             );",
        )
        .map_err(WatchError::Registry)?;
        // Databases from before baselines were kept gain the column (their workspaces read
        // as never built until their next build).
        let has_baseline = conn
            .query_row(
                "SELECT 1 FROM pragma_table_info('workspaces') WHERE name = 'baseline'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map_err(WatchError::Registry)?
            .is_some();
        if !has_baseline {
            conn.execute_batch("ALTER TABLE workspaces ADD COLUMN baseline BLOB")
                .map_err(WatchError::Registry)?;
        }
        Ok(Self { conn })
    }

    pub(super) fn add(
        &self,
        context: &Path,
        dockerfile: &Path,
        baseline: Option<&Baseline>,
    ) -> Result<(), WatchError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO workspaces (context, dockerfile, baseline)
                 VALUES (?1, ?2, ?3)",
                params![
                    context.to_string_lossy(),
                    dockerfile.to_string_lossy(),
                    baseline.map(Baseline::to_bytes)
                ],
            )
            .map(drop)
            .map_err(WatchError::Registry)
    }

    pub(super) fn set_baseline(&self, context: &Path, built: &Baseline) -> Result<(), WatchError> {
        self.conn
            .execute(
                "UPDATE workspaces SET baseline = ?2 WHERE context = ?1",
                params![context.to_string_lossy(), built.to_bytes()],
            )
            .map(drop)
            .map_err(WatchError::Registry)
    }

    pub(super) fn remove(&self, context: &Path) -> Result<(), WatchError> {
        self.conn
            .execute(
                "DELETE FROM workspaces WHERE context = ?1",
                params![context.to_string_lossy()],
            )
            .map(drop)
            .map_err(WatchError::Registry)
    }

    pub(super) fn all(&self) -> Result<Vec<Registered>, WatchError> {
        let mut statement = self
            .conn
            .prepare("SELECT context, dockerfile, baseline FROM workspaces ORDER BY context")
            .map_err(WatchError::Registry)?;
        let rows = statement
            .query_map([], |row| {
                Ok(Registered {
                    context: PathBuf::from(row.get::<_, String>(0)?),
                    dockerfile: PathBuf::from(row.get::<_, String>(1)?),
                    baseline: row.get(2)?,
                })
            })
            .map_err(WatchError::Registry)?;
        rows.collect::<Result<_, _>>().map_err(WatchError::Registry)
    }
}
