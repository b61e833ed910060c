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
#[cfg(target_os = "linux")]
mod inotify;
#[cfg(not(target_os = "linux"))]
mod notify;
mod recipe;
mod registry;
mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};

pub use backend::{Change, Cookies, Lost, WatchBackend, WatcherFactory, WatcherId};
#[cfg(target_os = "linux")]
pub use inotify::InotifyFactory;
#[cfg(not(target_os = "linux"))]
pub use notify::NotifyFactory;

/// The watchers of this platform.
#[cfg(target_os = "linux")]
pub fn platform_watchers(
    sink: tokio::sync::mpsc::UnboundedSender<Change>,
) -> Box<dyn WatcherFactory> {
    Box::new(InotifyFactory::new(sink))
}

/// The watchers of this platform.
#[cfg(not(target_os = "linux"))]
pub fn platform_watchers(
    sink: tokio::sync::mpsc::UnboundedSender<Change>,
) -> Box<dyn WatcherFactory> {
    Box::new(NotifyFactory::new(sink))
}
pub use recipe::BuildRecipe;
pub use workspace::{Baseline, DirIdentity, DirtyMark, Workspace};

use crate::context::{ContextError, FileTree, Hash, StatCache};
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
    Dockerfile(Box<crate::frontend::Diagnostic>),
    #[error(transparent)]
    Plan(Box<crate::plan::PlanError>),
    #[error(
        "the inotify watch limit is reached (fs.inotify.max_user_watches); changes will be \
         found by scanning at build time instead"
    )]
    WatchLimit,
    #[cfg(not(target_os = "linux"))]
    #[error("watcher: {0}")]
    Watcher(String),
    #[error("watcher: {0}")]
    Inotify(#[source] std::io::Error),
    #[error("the watcher stopped covering the whole workspace: {0}")]
    Lost(String),
    #[error("workspace registry: {0}")]
    Registry(#[source] rusqlite::Error),
    #[error("no watched workspace at {}", .0.display())]
    NotWatched(PathBuf),
    #[error("build context {} does not exist (it was deleted or moved away)", .0.display())]
    ContextGone(PathBuf),
    #[error("COPY/ADD source {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

/// The outcome of reported changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeOutcome {
    /// Paths that lie in a watched workspace.
    pub matched: u64,
    /// Nodes newly marked dirty.
    pub dirtied: u64,
    /// Workspaces where something a build reads changed (a source set's content, the
    /// Dockerfile): the ones a prebuild should rebuild.
    pub changed: Vec<PathBuf>,
}

/// A workspace's prebuild settings, kept with it across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrebuildSetting {
    /// Turned on or off for this workspace; `None`: the daemon's default.
    pub enabled: Option<bool>,
    /// The last build a user asked for: what a prebuild repeats.
    pub recipe: Option<BuildRecipe>,
}

pub struct Hub {
    /// Held only to find a workspace: scanning one never blocks status or another one.
    workspaces: Mutex<BTreeMap<PathBuf, Arc<Slot>>>,
    /// Taken while a workspace is registered and while changes are applied: a workspace is
    /// armed before it is scanned, and the events that arrive meanwhile wait here until its
    /// slot exists, so none is dropped for want of a workspace to apply it to.
    registering: Mutex<()>,
    stat_cache: Mutex<StatCache>,
    registry: Mutex<Registry>,
    watchers: Box<dyn WatcherFactory>,
    next_watcher: AtomicU64,
    cookies: Cookies,
}

/// A workspace's own watcher; dropping it drops all of its watches.
struct Armed {
    id: WatcherId,
    backend: Box<dyn WatchBackend>,
}

/// One workspace and the report status reads, which is published after every change so a
/// status request never waits for a scan.
struct Slot {
    context: PathBuf,
    dockerfile: PathBuf,
    workspace: Mutex<Workspace>,
    report: Mutex<WorkspaceReport>,
    /// `None` while no watcher covers it (watch limit, context gone).
    watcher: Mutex<Option<Armed>>,
    prebuild: Mutex<PrebuildSetting>,
}

impl Slot {
    fn new(workspace: Workspace, watcher: Option<Armed>, prebuild: PrebuildSetting) -> Self {
        Self {
            prebuild: Mutex::new(prebuild),
            context: workspace.context.clone(),
            dockerfile: workspace.dockerfile.clone(),
            report: Mutex::new(WorkspaceReport::of(&workspace)),
            workspace: Mutex::new(workspace),
            watcher: Mutex::new(watcher),
        }
    }

    /// Runs `f` on the workspace, then publishes its report.
    fn update<T>(&self, f: impl FnOnce(&mut Workspace) -> T) -> T {
        self.update_seeing_changes(f).0
    }

    /// [`Slot::update`], also telling whether something a build reads changed meanwhile.
    fn update_seeing_changes<T>(&self, f: impl FnOnce(&mut Workspace) -> T) -> (T, bool) {
        let mut workspace = lock(&self.workspace);
        let before = workspace.revision;
        let out = f(&mut workspace);
        *lock(&self.report) = WorkspaceReport::of(&workspace);
        (out, workspace.revision != before)
    }

    fn watcher_id(&self) -> Option<WatcherId> {
        lock(&self.watcher).as_ref().map(|armed| armed.id)
    }

    fn is_build_definition(&self, path: &Path) -> bool {
        path == self.dockerfile || workspace::is_ignore_file(&self.context, &self.dockerfile, path)
    }
}

/// What one build reads of a workspace, fixed when the build starts: the fingerprints that go
/// into its keys and the tree its COPY steps copy from are the same content, whatever changes
/// on disk while it runs.
#[derive(Debug, Clone)]
pub struct BuildSnapshot {
    pub tree: Arc<FileTree>,
    /// One per requested source set, in request order.
    pub fingerprints: Vec<Hash>,
    /// The workspace's state as of the snapshot: the baseline once the build succeeds.
    pub baseline: Baseline,
}

/// A COPY/ADD source set: its source patterns and its `--exclude` patterns.
pub type SourceSet = (Vec<String>, Vec<String>);

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    pub fn open(layout: &Layout, watchers: Box<dyn WatcherFactory>) -> Result<Self, WatchError> {
        let cookies = Cookies::new(layout.cookies_dir()).map_err(|source| WatchError::Read {
            path: layout.cookies_dir(),
            source,
        })?;
        Ok(Self {
            workspaces: Mutex::new(BTreeMap::new()),
            registering: Mutex::new(()),
            stat_cache: Mutex::new(StatCache::open(&layout.context_db())?),
            registry: Mutex::new(Registry::open(&layout.context_db())?),
            watchers,
            next_watcher: AtomicU64::new(1),
            cookies,
        })
    }

    /// How a build waits for the watcher to catch up (see [`Cookies`]).
    pub fn cookies(&self) -> &Cookies {
        &self.cookies
    }

    /// Watches the workspaces registered before the daemon restarted, with what was last
    /// built of each. One that cannot be opened any more is reported and skipped, never fatal.
    pub fn restore(&self) {
        let registered = match lock(&self.registry).all() {
            Ok(all) => all,
            Err(err) => {
                warn!(%err, "cannot read the workspace registry");
                return;
            }
        };
        for entry in registered {
            let baseline = entry.baseline.as_deref().and_then(Baseline::from_bytes);
            let prebuild = PrebuildSetting {
                enabled: entry.prebuild,
                recipe: entry.recipe.as_deref().and_then(BuildRecipe::from_bytes),
            };
            match self.start_watching(&entry.context, &entry.dockerfile, baseline, prebuild) {
                Ok(ws) => info!(
                    context = %entry.context.display(),
                    files = ws.files,
                    hashed = ws.hashed_files,
                    "workspace restored"
                ),
                Err(err) => {
                    warn!(context = %entry.context.display(), %err, "cannot restore workspace")
                }
            }
        }
    }

    /// Registers (or re-registers) a workspace and starts watching it.
    pub fn watch(&self, context: &Path, dockerfile: &Path) -> Result<WorkspaceReport, WatchError> {
        let old = self.slot(context);
        let baseline = old
            .as_ref()
            .and_then(|slot| lock(&slot.workspace).baseline().cloned());
        let prebuild = old
            .map(|slot| lock(&slot.prebuild).clone())
            .unwrap_or_default();
        let report = self.start_watching(context, dockerfile, baseline.clone(), prebuild)?;
        lock(&self.registry).add(context, dockerfile, baseline.as_ref())?;
        Ok(report)
    }

    fn start_watching(
        &self,
        context: &Path,
        dockerfile: &Path,
        baseline: Option<Baseline>,
        prebuild: PrebuildSetting,
    ) -> Result<WorkspaceReport, WatchError> {
        let _registering = lock(&self.registering);
        // Its watcher goes with it.
        lock(&self.workspaces).remove(context);
        // Watched before scanned: an edit during the scan is either seen by it or queued.
        let armed = self.arm(context, dockerfile);
        let mut workspace =
            Workspace::open(context, dockerfile, baseline, &mut lock(&self.stat_cache))?;
        let armed = workspace.set_armed(armed);
        let slot = Arc::new(Slot::new(workspace, armed, prebuild));
        let report = lock(&slot.report).clone();
        lock(&self.workspaces).insert(context.to_owned(), slot);
        Ok(report)
    }

    /// A fresh watcher for a workspace: the cookies directory, the context (recursively),
    /// and the directory of a Dockerfile that lies outside the context.
    fn arm(&self, context: &Path, dockerfile: &Path) -> Result<Armed, WatchError> {
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let mut backend = self.watchers.create(id)?;
        backend.watch(self.cookies.dir(), false)?;
        backend.watch(context, true)?;
        if let Some(dir) = workspace::definition_dir_outside(context, dockerfile) {
            backend.watch(&dir, false)?;
        }
        Ok(Armed { id, backend })
    }

    pub fn unwatch(&self, context: &Path) -> Result<(), WatchError> {
        let removed = lock(&self.workspaces).remove(context);
        if removed.is_none() {
            return Err(WatchError::NotWatched(context.to_owned()));
        }
        lock(&self.registry).remove(context)
    }

    fn slot(&self, context: &Path) -> Option<Arc<Slot>> {
        lock(&self.workspaces).get(context).cloned()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.workspaces).values().cloned().collect()
    }

    pub fn is_watched(&self, context: &Path) -> bool {
        lock(&self.workspaces).contains_key(context)
    }

    /// Paths (absolute) changed: update every workspace that holds one. A changed
    /// Dockerfile or ignore file re-plans that workspace; the root itself reported (deleted,
    /// moved, replaced) re-arms its watches and rescans it.
    pub fn changed(&self, paths: &[PathBuf]) -> ChangeOutcome {
        let _registering = lock(&self.registering);
        let mut outcome = ChangeOutcome::default();
        for slot in self.slots() {
            let mine: Vec<&PathBuf> = paths
                .iter()
                .filter(|p| p.starts_with(&slot.context) || slot.is_build_definition(p))
                .collect();
            if mine.is_empty() {
                continue;
            }
            outcome.matched += mine.len() as u64;
            let (result, changed) = slot.update_seeing_changes(|workspace| {
                let mut cache = lock(&self.stat_cache);
                if mine.iter().any(|p| **p == workspace.context) {
                    return self.resync(&slot, workspace, &mut cache, true);
                }
                apply_paths(workspace, &mine, &mut cache)
            });
            if changed {
                outcome.changed.push(slot.context.clone());
            }
            match result {
                Ok(dirtied) => outcome.dirtied += dirtied as u64,
                Err(err) => {
                    warn!(context = %slot.context.display(), %err, "cannot apply change")
                }
            }
        }
        outcome
    }

    /// Rescans the workspaces `watcher` covers (it lost events), or all of them.
    pub fn rescan(&self, watcher: Option<WatcherId>) -> ChangeOutcome {
        let _registering = lock(&self.registering);
        let mut outcome = ChangeOutcome::default();
        for slot in self.slots() {
            if watcher.is_some() && slot.watcher_id() != watcher {
                continue;
            }
            let (result, changed) = slot.update_seeing_changes(|workspace| {
                let mut cache = lock(&self.stat_cache);
                self.resync(&slot, workspace, &mut cache, true)
            });
            if changed {
                outcome.changed.push(slot.context.clone());
            }
            match result {
                Ok(dirtied) => outcome.dirtied += dirtied as u64,
                Err(err) => warn!(context = %slot.context.display(), %err, "rescan failed"),
            }
        }
        outcome
    }

    /// Checks that the workspace's directories are the ones it watches; if the root (or the
    /// directory holding an outside Dockerfile) was replaced, re-arms the watches and
    /// rescans. `force` rescans anyway. A workspace the watcher does not cover is rescanned
    /// too, through the stat cache.
    fn resync(
        &self,
        slot: &Slot,
        workspace: &mut Workspace,
        cache: &mut StatCache,
        force: bool,
    ) -> Result<usize, WatchError> {
        let lost = lock(&slot.watcher)
            .as_ref()
            .and_then(|armed| armed.backend.lost());
        if lost == Some(Lost::Root) || workspace.identity_changed() {
            info!(context = %workspace.context.display(), "workspace directory replaced; rescanning");
            let mut watcher = lock(&slot.watcher);
            // The old instance goes first, with every watch it had.
            *watcher = None;
            *watcher = workspace.set_armed(self.arm(&workspace.context, &workspace.dockerfile));
            drop(watcher);
            return workspace.reload_all(cache);
        }
        if let Some(Lost::Incomplete(why)) = lost {
            // Part of the tree is not watched any more: scan per build from now on.
            *lock(&slot.watcher) = None;
            workspace.set_armed::<()>(Err(WatchError::Lost(why)));
        }
        if force || !workspace.watching {
            return workspace.rescan(cache);
        }
        Ok(0)
    }

    /// Brings a workspace up to date before a build reads it: a live watcher has already
    /// done so (the build synced with it); a replaced root or one the watcher cannot follow
    /// (inotify limit) is rescanned. Fails when the context directory does not exist.
    pub fn ensure_current(&self, context: &Path) -> Result<(), WatchError> {
        let slot = self
            .slot(context)
            .ok_or_else(|| WatchError::NotWatched(context.to_owned()))?;
        slot.update(|workspace| {
            let mut cache = lock(&self.stat_cache);
            self.resync(&slot, workspace, &mut cache, false)?;
            match workspace.root {
                Some(_) => Ok(()),
                None => Err(WatchError::ContextGone(context.to_owned())),
            }
        })
    }

    /// Returns once the watcher of `context` has delivered, and the change loop applied,
    /// every change made before the call. Without a live watcher there is nothing to wait
    /// for: the build's snapshot scans instead.
    pub async fn sync(&self, context: &Path) {
        let watcher = self.slot(context).and_then(|slot| slot.watcher_id());
        if let Some(watcher) = watcher {
            self.cookies.sync(watcher).await;
        }
    }

    /// The snapshot one build reads (registering the workspace if it is new): brought up to
    /// date, then fixed. `sources` are the build's COPY/ADD source sets.
    pub fn snapshot(
        &self,
        context: &Path,
        dockerfile: &Path,
        sources: &[SourceSet],
    ) -> Result<BuildSnapshot, WatchError> {
        if !self.is_watched(context) {
            self.watch(context, dockerfile)?;
        }
        self.ensure_current(context)?;
        let slot = self
            .slot(context)
            .ok_or_else(|| WatchError::NotWatched(context.to_owned()))?;
        let mut workspace = lock(&slot.workspace);
        let fingerprints = sources
            .iter()
            .map(|(patterns, excludes)| workspace.fingerprint(patterns, excludes))
            .collect::<Result<_, _>>()?;
        Ok(BuildSnapshot {
            tree: workspace.snapshot(),
            fingerprints,
            baseline: workspace.current_baseline(),
        })
    }

    /// A build of `context` from `built` succeeded: that is the new baseline (kept across
    /// restarts). Does nothing if the workspace is no longer watched.
    pub fn mark_built(&self, context: &Path, built: &Baseline) {
        let Some(slot) = self.slot(context) else {
            return;
        };
        slot.update(|workspace| workspace.mark_built(built.clone()));
        if let Err(err) = lock(&self.registry).set_baseline(context, built) {
            warn!(context = %context.display(), %err, "cannot persist what was built");
        }
    }

    /// Turns prebuild on or off for a watched workspace (`None`: the daemon's default); kept
    /// across restarts.
    pub fn set_prebuild(&self, context: &Path, enabled: Option<bool>) -> Result<(), WatchError> {
        let slot = self
            .slot(context)
            .ok_or_else(|| WatchError::NotWatched(context.to_owned()))?;
        lock(&slot.prebuild).enabled = enabled;
        lock(&self.registry).set_prebuild(context, enabled)
    }

    /// Remembers the build a user asked for, for prebuilds to repeat (kept across restarts).
    /// Does nothing if the workspace is no longer watched.
    pub fn remember_build(&self, context: &Path, recipe: &BuildRecipe) {
        let Some(slot) = self.slot(context) else {
            return;
        };
        let mut setting = lock(&slot.prebuild);
        if setting.recipe.as_ref() == Some(recipe) {
            return;
        }
        setting.recipe = Some(recipe.clone());
        drop(setting);
        if let Err(err) = lock(&self.registry).set_recipe(context, recipe) {
            warn!(context = %context.display(), %err, "cannot persist the build to repeat");
        }
    }

    /// A watched workspace's prebuild settings.
    pub fn prebuild_setting(&self, context: &Path) -> Option<PrebuildSetting> {
        Some(lock(&self.slot(context)?.prebuild).clone())
    }

    /// The context file whose change made the step `label` of `context` dirty, if the
    /// watcher saw one (for "why did this step run").
    pub fn dirty_cause(&self, context: &Path, label: &str) -> Option<String> {
        let slot = self.slot(context)?;
        let report = lock(&slot.report);
        report
            .dirty
            .iter()
            .find(|mark| mark.label == label)
            .map(|mark| mark.cause.clone())
    }

    /// What status shows; never waits for a scan in progress.
    pub fn reports(&self) -> Vec<WorkspaceReport> {
        self.slots()
            .iter()
            .map(|slot| lock(&slot.report).clone())
            .collect()
    }
}

/// Applies changed paths of one workspace: a build definition re-plans it (an ignore file
/// rescans it), anything else refreshes those paths.
fn apply_paths(
    workspace: &mut Workspace,
    paths: &[&PathBuf],
    cache: &mut StatCache,
) -> Result<usize, WatchError> {
    let relative: Vec<String> = paths
        .iter()
        .filter_map(|p| p.strip_prefix(&workspace.context).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let Some(definition) = paths.iter().find(|p| workspace.is_build_definition(p)) else {
        return workspace.refresh(&relative, cache);
    };
    let cause = definition
        .strip_prefix(&workspace.context)
        .unwrap_or(definition)
        .display()
        .to_string();
    let before = workspace.dirty().len();
    // New ignore rules can change what the whole tree holds; a new Dockerfile only changes
    // what is read from it.
    if paths.iter().any(|p| workspace.is_ignore_file(p)) {
        workspace.reload(&cause, cache)?;
    } else {
        workspace.replan(&cause, &relative, cache)?;
    }
    Ok(workspace.dirty().len().saturating_sub(before))
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
    /// Why the watcher does not cover it (builds then scan it), while it does not.
    pub degraded: Option<String>,
    /// Whether it was ever built: without a baseline, nothing can be called dirty or clean.
    pub built: bool,
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
            degraded: match workspace.root {
                None => Some("the context directory does not exist".into()),
                Some(_) => workspace.degraded.clone(),
            },
            built: workspace.baseline().is_some(),
            hashed_files: workspace.last_scan.hashed_files,
            dirty: workspace.dirty().to_vec(),
            error: workspace.plan_error().map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests;
