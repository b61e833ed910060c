//! Watched workspaces persisted in the context database, so a restarted daemon picks them up.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::WatchError;

#[derive(Debug)]
pub(super) struct Registry {
    conn: Connection,
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
        Ok(Self { conn })
    }

    pub(super) fn add(&self, context: &Path, dockerfile: &Path) -> Result<(), WatchError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO workspaces (context, dockerfile) VALUES (?1, ?2)",
                params![context.to_string_lossy(), dockerfile.to_string_lossy()],
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

    /// (context, dockerfile) of every registered workspace.
    pub(super) fn all(&self) -> Result<Vec<(PathBuf, PathBuf)>, WatchError> {
        let mut statement = self
            .conn
            .prepare("SELECT context, dockerfile FROM workspaces ORDER BY context")
            .map_err(WatchError::Registry)?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    PathBuf::from(row.get::<_, String>(0)?),
                    PathBuf::from(row.get::<_, String>(1)?),
                ))
            })
            .map_err(WatchError::Registry)?;
        rows.collect::<Result<_, _>>().map_err(WatchError::Registry)
    }
}
