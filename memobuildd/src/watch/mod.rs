//! Keeping workspaces hot: the registry of watched workspaces, the watcher that reports
//! changes, and the dirty marks those changes leave on each build graph — all at change time,
//! so a build request finds the answer already computed.
//!
//! The main type is [`Hub`]: `watch`/`unwatch` register workspaces (persisted, restored at
//! start), [`Hub::changed`] takes paths from the watcher or from `memobuild notify`, and
//! [`Hub::rescan`] recovers from lost events. Each [`Workspace`] re-fingerprints only the
//! source sets a change touches. Comes after `context` and `plan`; the engine reads it.
//!
//! Methods block (file I/O, hashing, SQLite): the server calls them via `spawn_blocking`.

mod backend;
mod registry;
mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};

pub use backend::{Change, Cookies, NotifyBackend, WatchBackend};
pub use workspace::{DirtyMark, Workspace};

use crate::context::{ContextError, StatCache};
use crate::layout::Layout;
use registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Ignore(#[from] crate::context::IgnoreError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Dockerfile(String),
    #[error(
        "the inotify watch limit is reached (fs.inotify.max_user_watches); changes will be \
         found by scanning at build time instead"
    )]
    WatchLimit,
    #[error("watcher: {0}")]
    Watcher(String),
    #[error("workspace registry: {0}")]
    Registry(#[source] rusqlite::Error),
    #[error("no watched workspace at {}", .0.display())]
    NotWatched(PathBuf),
}

impl WatchError {
    fn from_notify(error: notify::Error) -> Self {
        match error.kind {
            notify::ErrorKind::MaxFilesWatch => Self::WatchLimit,
            _ => Self::Watcher(error.to_string()),
        }
    }
}

/// The outcome of reported changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeOutcome {
    /// Paths that lie in a watched workspace.
    pub matched: u64,
    /// Nodes newly marked dirty.
    pub dirtied: u64,
}

pub struct Hub {
    workspaces: Mutex<BTreeMap<PathBuf, Workspace>>,
    stat_cache: Mutex<StatCache>,
    registry: Mutex<Registry>,
    backend: Mutex<Box<dyn WatchBackend>>,
    cookies: Cookies,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    pub fn open(layout: &Layout, mut backend: Box<dyn WatchBackend>) -> Result<Self, WatchError> {
        let cookies = Cookies::new(layout.cookies_dir()).map_err(|source| WatchError::Read {
            path: layout.cookies_dir(),
            source,
        })?;
        if let Err(err) = backend.watch(cookies.dir(), false) {
            warn!(%err, "builds cannot sync with the watcher");
        }
        Ok(Self {
            workspaces: Mutex::new(BTreeMap::new()),
            stat_cache: Mutex::new(StatCache::open(&layout.context_db())?),
            registry: Mutex::new(Registry::open(&layout.context_db())?),
            backend: Mutex::new(backend),
            cookies,
        })
    }

    /// How a build waits for the watcher to catch up (see [`Cookies`]).
    pub fn cookies(&self) -> &Cookies {
        &self.cookies
    }

    /// Watches the workspaces registered before the daemon restarted. One that cannot be
    /// opened any more is reported and skipped, never fatal.
    pub fn restore(&self) {
        let registered = match lock(&self.registry).all() {
            Ok(all) => all,
            Err(err) => {
                warn!(%err, "cannot read the workspace registry");
                return;
            }
        };
        for (context, dockerfile) in registered {
            match self.start_watching(&context, &dockerfile) {
                Ok(ws) => info!(
                    context = %context.display(),
                    files = ws.files,
                    hashed = ws.hashed_files,
                    "workspace restored"
                ),
                Err(err) => warn!(context = %context.display(), %err, "cannot restore workspace"),
            }
        }
    }

    /// Registers (or re-registers) a workspace and starts watching it.
    pub fn watch(&self, context: &Path, dockerfile: &Path) -> Result<WorkspaceReport, WatchError> {
        let report = self.start_watching(context, dockerfile)?;
        lock(&self.registry).add(context, dockerfile)?;
        Ok(report)
    }

    fn start_watching(
        &self,
        context: &Path,
        dockerfile: &Path,
    ) -> Result<WorkspaceReport, WatchError> {
        // Scanning can take a while: do it without holding the workspace map.
        let mut workspace = Workspace::open(context, dockerfile, &mut lock(&self.stat_cache))?;
        workspace.watching = {
            let mut backend = lock(&self.backend);
            let watched = backend
                .watch(context, true)
                .and_then(|()| match dockerfile.parent() {
                    Some(dir) if !dockerfile.starts_with(context) => backend.watch(dir, false),
                    _ => Ok(()),
                });
            match watched {
                Ok(()) => true,
                Err(err) => {
                    warn!(context = %context.display(), %err, "not watching live");
                    false
                }
            }
        };
        let report = WorkspaceReport::of(&workspace);
        lock(&self.workspaces).insert(context.to_owned(), workspace);
        Ok(report)
    }

    pub fn unwatch(&self, context: &Path) -> Result<(), WatchError> {
        let removed = lock(&self.workspaces).remove(context);
        let Some(workspace) = removed else {
            return Err(WatchError::NotWatched(context.to_owned()));
        };
        let mut backend = lock(&self.backend);
        backend.unwatch(context);
        if let Some(dir) = workspace.dockerfile.parent()
            && !workspace.dockerfile.starts_with(context)
        {
            backend.unwatch(dir);
        }
        lock(&self.registry).remove(context)
    }

    /// Paths (absolute) changed: update every workspace that holds one. A changed
    /// Dockerfile or ignore file re-plans that workspace.
    pub fn changed(&self, paths: &[PathBuf]) -> ChangeOutcome {
        let mut outcome = ChangeOutcome::default();
        let mut workspaces = lock(&self.workspaces);
        let mut cache = lock(&self.stat_cache);
        for workspace in workspaces.values_mut() {
            let mine: Vec<&PathBuf> = paths
                .iter()
                .filter(|p| p.starts_with(&workspace.context) || workspace.is_build_definition(p))
                .collect();
            if mine.is_empty() {
                continue;
            }
            outcome.matched += mine.len() as u64;
            let relative: Vec<String> = mine
                .iter()
                .filter_map(|p| p.strip_prefix(&workspace.context).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let result = match mine.iter().find(|p| workspace.is_build_definition(p)) {
                Some(definition) => {
                    let cause = definition
                        .strip_prefix(&workspace.context)
                        .unwrap_or(definition)
                        .display()
                        .to_string();
                    let before = workspace.dirty().len();
                    // New ignore rules can change what the whole tree holds; a new
                    // Dockerfile only changes what is read from it.
                    let applied = if mine.iter().any(|p| workspace.is_ignore_file(p)) {
                        workspace.reload(&cause, &mut cache)
                    } else {
                        workspace.replan(&cause, &relative, &mut cache)
                    };
                    applied.map(|()| workspace.dirty().len().saturating_sub(before))
                }
                None => workspace.refresh(&relative, &mut cache),
            };
            match result {
                Ok(dirtied) => outcome.dirtied += dirtied as u64,
                Err(err) => {
                    warn!(context = %workspace.context.display(), %err, "cannot apply change")
                }
            }
        }
        outcome
    }

    /// Rescans every workspace (the watcher lost events).
    pub fn rescan(&self) -> ChangeOutcome {
        let mut outcome = ChangeOutcome::default();
        let mut workspaces = lock(&self.workspaces);
        let mut cache = lock(&self.stat_cache);
        for workspace in workspaces.values_mut() {
            match workspace.rescan(&mut cache) {
                Ok(dirtied) => outcome.dirtied += dirtied as u64,
                Err(err) => warn!(context = %workspace.context.display(), %err, "rescan failed"),
            }
        }
        outcome
    }

    /// Brings a workspace up to date before a build reads it. A live watcher has already
    /// done so (the build synced with it); one the watcher cannot follow (inotify limit)
    /// is rescanned, through the stat cache.
    pub fn ensure_current(&self, context: &Path) -> Result<(), WatchError> {
        let mut workspaces = lock(&self.workspaces);
        if let Some(workspace) = workspaces.get_mut(context)
            && !workspace.watching
        {
            workspace.rescan(&mut lock(&self.stat_cache))?;
        }
        Ok(())
    }

    pub fn reports(&self) -> Vec<WorkspaceReport> {
        lock(&self.workspaces)
            .values()
            .map(WorkspaceReport::of)
            .collect()
    }

    /// Runs `f` on a watched workspace (the engine's entry point).
    pub fn with_workspace<T>(
        &self,
        context: &Path,
        f: impl FnOnce(&mut Workspace) -> T,
    ) -> Option<T> {
        lock(&self.workspaces).get_mut(context).map(f)
    }
}

/// A workspace as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceReport {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    pub files: u64,
    pub bytes: u64,
    pub last_change: Option<std::time::SystemTime>,
    pub watching: bool,
    pub hashed_files: u64,
    pub dirty: Vec<DirtyMark>,
    pub error: Option<String>,
}

impl WorkspaceReport {
    fn of(workspace: &Workspace) -> Self {
        let (files, bytes) = workspace.tree().file_stats();
        Self {
            context: workspace.context.clone(),
            dockerfile: workspace.dockerfile.clone(),
            files,
            bytes,
            last_change: workspace.last_change,
            watching: workspace.watching,
            hashed_files: workspace.last_scan.hashed_files,
            dirty: workspace.dirty().to_vec(),
            error: workspace.plan_error().map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests;
