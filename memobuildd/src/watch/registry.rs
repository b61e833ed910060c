//! Watched workspaces persisted in the context database, with what was last built of each,
//! so a restarted daemon picks them up and still tells dirty from clean from never built.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::WatchError;
use super::recipe::BuildRecipe;
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
    /// Prebuild turned on or off for it; `None`: the daemon's default.
    pub(super) prebuild: Option<bool>,
    /// [`BuildRecipe::to_bytes`] of its last build request.
    pub(super) recipe: Option<Vec<u8>>,
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
        // Databases from before a column was kept gain it (empty until set).
        for (column, kind) in [
            ("baseline", "BLOB"),
            ("prebuild", "INTEGER"),
            ("recipe", "BLOB"),
        ] {
            let has = conn
                .query_row(
                    "SELECT 1 FROM pragma_table_info('workspaces') WHERE name = ?1",
                    [column],
                    |_| Ok(()),
                )
                .optional()
                .map_err(WatchError::Registry)?
                .is_some();
            if !has {
                conn.execute_batch(&format!(
                    "ALTER TABLE workspaces ADD COLUMN {column} {kind}"
                ))
                .map_err(WatchError::Registry)?;
            }
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
                "INSERT INTO workspaces (context, dockerfile, baseline) VALUES (?1, ?2, ?3)
                 ON CONFLICT (context) DO UPDATE
                 SET dockerfile = excluded.dockerfile, baseline = excluded.baseline",
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

    pub(super) fn set_prebuild(&self, context: &Path, on: Option<bool>) -> Result<(), WatchError> {
        self.conn
            .execute(
                "UPDATE workspaces SET prebuild = ?2 WHERE context = ?1",
                params![context.to_string_lossy(), on],
            )
            .map(drop)
            .map_err(WatchError::Registry)
    }

    pub(super) fn set_recipe(
        &self,
        context: &Path,
        recipe: &BuildRecipe,
    ) -> Result<(), WatchError> {
        self.conn
            .execute(
                "UPDATE workspaces SET recipe = ?2 WHERE context = ?1",
                params![context.to_string_lossy(), recipe.to_bytes()],
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
            .prepare(
                "SELECT context, dockerfile, baseline, prebuild, recipe FROM workspaces
                 ORDER BY context",
            )
            .map_err(WatchError::Registry)?;
        let rows = statement
            .query_map([], |row| {
                Ok(Registered {
                    context: PathBuf::from(row.get::<_, String>(0)?),
                    dockerfile: PathBuf::from(row.get::<_, String>(1)?),
                    baseline: row.get(2)?,
                    prebuild: row.get(3)?,
                    recipe: row.get(4)?,
                })
            })
            .map_err(WatchError::Registry)?;
        rows.collect::<Result<_, _>>().map_err(WatchError::Registry)
    }
}
