//! One watched workspace: its plan, its file tree, the fingerprint of every COPY/ADD source
//! set, and which nodes are dirty compared with the baseline (the state last built; none
//! until the first build).
//!
//! The tree is shared copy-on-write ([`Arc`]): a build takes one snapshot of it for its keys
//! and for the bytes its COPY steps write, and a change that arrives while the build runs
//! edits a private copy, never the snapshot.
//!
//! Dirty marks are recomputed from scratch after every change, which keeps them exact when an
//! edit is reverted: a node is dirty when its *structural key* (instruction plus the structural
//! keys of what it depends on, no file contents) is not in the baseline — the Dockerfile
//! changed it — or when a source set it reads now has another fingerprint; and everything
//! downstream of a dirty node is dirty too, with the same cause.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use petgraph::Direction;
use petgraph::graph::NodeIndex;

use super::WatchError;
use crate::context::{
    self, FileTree, Fingerprint, Hash, IgnoreRules, ScanReport, SourcePattern, StatCache,
};
use crate::frontend;
use crate::plan::{self, BuildGraph, NodeKind, PlanOptions};

/// A node marked dirty and the context path (or Dockerfile) that made it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMark {
    pub node: u32,
    pub label: String,
    pub cause: String,
}

#[derive(Debug)]
struct TrackedSource {
    node: NodeIndex,
    patterns: Vec<SourcePattern>,
    excludes: IgnoreRules,
    current: Fingerprint,
    /// The last changed path that moved this fingerprint.
    cause: Option<String>,
}

/// What was last built: structural keys of the nodes, fingerprints of the source nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baseline {
    structural: HashSet<Hash>,
    fingerprints: HashMap<Hash, Fingerprint>,
}

/// Versions [`Baseline::to_bytes`].
const BASELINE_FORMAT: &[u8] = b"memobuild-baseline-v1\0";

impl Baseline {
    /// A compact encoding, persisted with the workspace so a restarted daemon still knows
    /// what was last built.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = BASELINE_FORMAT.to_vec();
        let mut structural: Vec<&Hash> = self.structural.iter().collect();
        structural.sort_unstable();
        out.extend((structural.len() as u64).to_le_bytes());
        for key in structural {
            out.extend(key);
        }
        let mut fingerprints: Vec<(&Hash, &Fingerprint)> = self.fingerprints.iter().collect();
        fingerprints.sort_unstable_by_key(|(key, _)| **key);
        out.extend((fingerprints.len() as u64).to_le_bytes());
        for (key, fingerprint) in fingerprints {
            out.extend(key);
            out.extend(fingerprint.hash);
            out.extend(fingerprint.entries.to_le_bytes());
        }
        out
    }

    /// `None` for bytes of another format or damaged ones: the workspace then counts as
    /// never built, which is the truth as far as anyone can tell.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut rest = bytes.strip_prefix(BASELINE_FORMAT)?;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(head)
        };
        let count = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().unwrap_or([0xff; 8]));
        let hash = |bytes: &[u8]| -> Option<Hash> { bytes.try_into().ok() };
        let mut baseline = Self::default();
        for _ in 0..count(take(8)?) {
            baseline.structural.insert(hash(take(32)?)?);
        }
        for _ in 0..count(take(8)?) {
            let key = hash(take(32)?)?;
            let fingerprint = Fingerprint {
                hash: hash(take(32)?)?,
                entries: count(take(8)?),
            };
            baseline.fingerprints.insert(key, fingerprint);
        }
        rest.is_empty().then_some(baseline)
    }
}

/// Which directory a path names right now: a deleted and recreated root, one swapped in by a
/// rename, or a symlink pointed elsewhere has another identity although its path is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirIdentity {
    dev: u64,
    ino: u64,
    /// Inode numbers are reused at once (a root deleted and recreated often gets its old
    /// number back); the birth time, where the filesystem keeps one, tells them apart.
    born: Option<SystemTime>,
}

impl DirIdentity {
    /// Follows symlinks, as the walk of the context does for its root.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            born: meta.created().ok(),
        })
    }
}

#[derive(Debug)]
pub struct Workspace {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    rules: IgnoreRules,
    tree: Arc<FileTree>,
    plan: Result<Plan, String>,
    baseline: Option<Baseline>,
    dirty: Vec<DirtyMark>,
    pub last_change: Option<SystemTime>,
    /// Counts the changes that can change what a build makes: a source set's fingerprint or
    /// the build definition (what starts a prebuild).
    pub revision: u64,
    /// Whether a live watcher covers it (false: changes are found by scanning).
    pub watching: bool,
    /// Why the watcher does not cover it, while it does not.
    pub degraded: Option<String>,
    /// The root directory as last scanned; `None` while it does not exist.
    pub root: Option<DirIdentity>,
    /// The directory holding the Dockerfile, when that is outside the context.
    definition_dir: Option<DirIdentity>,
    pub last_scan: ScanReport,
    /// Fingerprints builds asked for, by (patterns, excludes), with the tree generation they
    /// were computed at: a rebuild with nothing changed does not walk the tree again.
    fingerprints: HashMap<(Vec<String>, Vec<String>), (u64, Hash)>,
}

#[derive(Debug)]
struct Plan {
    graph: BuildGraph,
    structural: Vec<Hash>,
    sources: Vec<TrackedSource>,
}

impl Workspace {
    /// Reads, plans and scans a workspace. `baseline` is what was last built of it, if it
    /// ever was.
    pub fn open(
        context: &Path,
        dockerfile: &Path,
        baseline: Option<Baseline>,
        cache: &mut StatCache,
    ) -> Result<Self, WatchError> {
        let plan = read_plan(dockerfile)?;
        let mut workspace = Self::load(context, dockerfile, Ok(plan), cache)?;
        workspace.baseline = baseline;
        let dockerfile_name = workspace.dockerfile_name();
        workspace.recompute_dirty(&dockerfile_name);
        Ok(workspace)
    }

    fn load(
        context: &Path,
        dockerfile: &Path,
        graph: Result<BuildGraph, String>,
        cache: &mut StatCache,
    ) -> Result<Self, WatchError> {
        let root = DirIdentity::of(context).map_err(|source| WatchError::Read {
            path: context.to_owned(),
            source,
        })?;
        let rules = context::ignore_rules(context, dockerfile)?;
        let (tree, last_scan) = context::scan(context, &rules, cache)?;
        let plan = match graph {
            Ok(graph) => Ok(Plan::new(graph, &tree)?),
            Err(message) => Err(message),
        };
        Ok(Self {
            context: context.to_owned(),
            dockerfile: dockerfile.to_owned(),
            rules,
            tree: Arc::new(tree),
            plan,
            baseline: None,
            dirty: Vec::new(),
            last_change: None,
            revision: 0,
            watching: false,
            degraded: None,
            root: Some(root),
            definition_dir: definition_dir_outside(context, dockerfile)
                .and_then(|dir| DirIdentity::of(&dir).ok()),
            last_scan,
            fingerprints: HashMap::new(),
        })
    }

    /// Re-reads the Dockerfile and ignore rules and rescans, keeping the baseline, so what
    /// the edit changed shows up as dirty. A Dockerfile that no longer parses is reported,
    /// not fatal: the workspace stays watched.
    pub fn reload(&mut self, cause: &str, cache: &mut StatCache) -> Result<(), WatchError> {
        let graph = self.read_graph()?;
        let mut fresh = Self::load(&self.context, &self.dockerfile, graph, cache)?;
        fresh.baseline = self.baseline.take();
        fresh.watching = self.watching;
        fresh.degraded = self.degraded.take();
        *self = fresh;
        self.definition_changed(cause);
        Ok(())
    }

    /// The Dockerfile changed and the ignore rules did not: applies `paths` (context-relative,
    /// the Dockerfile among them when it is in the context) and re-plans against the tree as
    /// it is. A CMD edit in a 50,000-file workspace then costs a re-plan, not a rescan (and
    /// not a second tree in memory while the first is dropped).
    pub fn replan(
        &mut self,
        cause: &str,
        paths: &[String],
        cache: &mut StatCache,
    ) -> Result<(), WatchError> {
        context::refresh(
            &self.context,
            &self.rules,
            Arc::make_mut(&mut self.tree),
            paths,
            cache,
        )?;
        self.plan = match self.read_graph()? {
            Ok(graph) => Ok(Plan::new(graph, &self.tree)?),
            Err(message) => Err(message),
        };
        self.definition_changed(cause);
        Ok(())
    }

    /// The Dockerfile's graph, or why it has none (a parse error is the workspace's state,
    /// not a failure).
    fn read_graph(&self) -> Result<Result<BuildGraph, String>, WatchError> {
        match read_plan(&self.dockerfile) {
            Ok(graph) => Ok(Ok(graph)),
            Err(err @ (WatchError::Dockerfile(_) | WatchError::Plan(_))) => {
                Ok(Err(err.to_string()))
            }
            Err(other) => Err(other),
        }
    }

    fn definition_changed(&mut self, cause: &str) {
        self.last_change = Some(SystemTime::now());
        self.revision += 1;
        if let Ok(plan) = &mut self.plan {
            for source in &mut plan.sources {
                source.cause = Some(cause.to_owned());
            }
        }
        self.recompute_dirty(cause);
    }

    /// Applies changes at `paths` (context-relative). Returns how many nodes became dirty.
    pub fn refresh(
        &mut self,
        paths: &[String],
        cache: &mut StatCache,
    ) -> Result<usize, WatchError> {
        let touched = context::refresh(
            &self.context,
            &self.rules,
            Arc::make_mut(&mut self.tree),
            paths,
            cache,
        )?;
        Ok(self.absorb(touched))
    }

    /// Records whether arming a watcher worked, passing the watcher on.
    pub fn set_armed<T>(&mut self, armed: Result<T, WatchError>) -> Option<T> {
        match armed {
            Ok(watcher) => {
                self.watching = true;
                self.degraded = None;
                Some(watcher)
            }
            Err(err) => {
                tracing::warn!(context = %self.context.display(), %err, "not watching live");
                self.watching = false;
                self.degraded = Some(err.to_string());
                None
            }
        }
    }

    /// Whether the root, or the directory of an outside Dockerfile, is not the directory
    /// last scanned (deleted, recreated, renamed over, re-pointed symlink) or has vanished.
    pub fn identity_changed(&self) -> bool {
        let root = DirIdentity::of(&self.context).ok();
        let definition_dir = definition_dir_outside(&self.context, &self.dockerfile)
            .and_then(|dir| DirIdentity::of(&dir).ok());
        root != self.root || definition_dir != self.definition_dir
    }

    /// Starts over after the directories were replaced: ignore rules, Dockerfile, tree,
    /// keeping the baseline so what differs from the last build shows as dirty. Returns how
    /// many nodes became dirty.
    pub fn reload_all(&mut self, cache: &mut StatCache) -> Result<usize, WatchError> {
        let before = self.dirty.len();
        self.definition_dir = definition_dir_outside(&self.context, &self.dockerfile)
            .and_then(|dir| DirIdentity::of(&dir).ok());
        self.rescan(cache)?;
        if self.root.is_some() {
            self.plan = match self.read_graph()? {
                Ok(graph) => Ok(Plan::new(graph, &self.tree)?),
                Err(message) => Err(message),
            };
            let cause = self.dockerfile_name();
            self.definition_changed(&cause);
        }
        Ok(self.dirty.len().saturating_sub(before))
    }

    /// Rescans everything (the watcher lost events, or the root was replaced). Returns how
    /// many nodes became dirty. A root that is gone leaves an empty tree, and says so.
    pub fn rescan(&mut self, cache: &mut StatCache) -> Result<usize, WatchError> {
        let root = match DirIdentity::of(&self.context) {
            Ok(root) => root,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.root = None;
                let touched = Arc::make_mut(&mut self.tree).replace_subtree("", Default::default());
                return Ok(self.absorb(touched));
            }
            Err(source) => {
                return Err(WatchError::Read {
                    path: self.context.clone(),
                    source,
                });
            }
        };
        // The ignore file may have gone or come with the root.
        self.rules = context::ignore_rules(&self.context, &self.dockerfile)?;
        let (tree, report) = context::scan(&self.context, &self.rules, cache)?;
        let touched = Arc::make_mut(&mut self.tree).replace_subtree("", tree.into_entries());
        self.last_scan = report;
        self.root = Some(root);
        Ok(self.absorb(touched))
    }

    fn absorb(&mut self, touched: Vec<Box<str>>) -> usize {
        if touched.is_empty() {
            return 0;
        }
        self.last_change = Some(SystemTime::now());
        let before = self.dirty.len();
        if let Ok(plan) = &mut self.plan {
            for source in &mut plan.sources {
                let mut covered = touched
                    .iter()
                    .map(|path| &**path)
                    .filter(|path| source.patterns.iter().any(|p| p.covers(path)));
                let first = covered.clone().next();
                // An editor's atomic save writes a temp file and renames it over the one the
                // user saved: name the file that is there now, not the temp that came and went.
                let cause = covered.find(|path| self.tree.get(path).is_some()).or(first);
                if let Some(cause) = cause {
                    let now = self.tree.fingerprint(&source.patterns, &source.excludes);
                    if now != source.current {
                        source.current = now;
                        source.cause = Some(cause.to_string());
                        self.revision += 1;
                    }
                }
            }
        }
        let dockerfile = self.dockerfile_name();
        self.recompute_dirty(&dockerfile);
        self.dirty.len().saturating_sub(before)
    }

    fn dockerfile_name(&self) -> String {
        self.dockerfile
            .strip_prefix(&self.context)
            .unwrap_or(&self.dockerfile)
            .display()
            .to_string()
    }

    fn recompute_dirty(&mut self, dockerfile_cause: &str) {
        let (Ok(plan), Some(baseline)) = (&self.plan, &self.baseline) else {
            self.dirty.clear();
            return;
        };
        let graph = plan.graph.graph();
        let mut cause_of: HashMap<NodeIndex, String> = HashMap::new();
        for source in &plan.sources {
            let key = plan.structural[source.node.index()];
            if baseline.fingerprints.get(&key) != Some(&source.current) {
                let cause = source
                    .cause
                    .clone()
                    .unwrap_or_else(|| dockerfile_cause.to_owned());
                cause_of.entry(source.node).or_insert(cause);
            }
        }
        for node in plan.graph.toposort() {
            if !baseline.structural.contains(&plan.structural[node.index()]) {
                cause_of
                    .entry(node)
                    .or_insert_with(|| dockerfile_cause.to_owned());
            }
            // Creation order is topological, so parents are settled before children.
            if !cause_of.contains_key(&node)
                && let Some(cause) = graph
                    .neighbors_directed(node, Direction::Incoming)
                    .find_map(|parent| cause_of.get(&parent).cloned())
            {
                cause_of.insert(node, cause);
            }
        }
        self.dirty = plan
            .graph
            .toposort()
            .into_iter()
            .filter(|node| {
                matches!(
                    plan.graph.node(*node).kind,
                    NodeKind::Filesystem | NodeKind::Metadata
                )
            })
            .filter_map(|node| {
                Some(DirtyMark {
                    node: node.index() as u32,
                    label: plan.graph.node(node).label.clone(),
                    cause: cause_of.get(&node)?.clone(),
                })
            })
            .collect();
    }

    /// The fingerprint of a source set (`patterns`, `--exclude` patterns) in the current tree.
    pub fn fingerprint(
        &mut self,
        patterns: &[String],
        excludes: &[String],
    ) -> Result<Hash, WatchError> {
        let key = (patterns.to_vec(), excludes.to_vec());
        let generation = self.tree.generation();
        if let Some((at, hash)) = self.fingerprints.get(&key)
            && *at == generation
        {
            return Ok(*hash);
        }
        let compiled = patterns
            .iter()
            .map(|p| {
                SourcePattern::new(p).map_err(|source| WatchError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rules = IgnoreRules::parse(&excludes.join("\n"), "--exclude")?;
        let hash = self.tree.fingerprint(&compiled, &rules).hash;
        self.fingerprints.insert(key, (generation, hash));
        Ok(hash)
    }

    /// Makes `built` — the state a build took its snapshot of — the baseline. Edits made
    /// since that snapshot stay dirty: the build did not see them.
    pub fn mark_built(&mut self, built: Baseline) {
        self.baseline = Some(built);
        let dockerfile = self.dockerfile_name();
        self.recompute_dirty(&dockerfile);
    }

    /// What was last built, if anything was.
    pub fn baseline(&self) -> Option<&Baseline> {
        self.baseline.as_ref()
    }

    /// The state as it is now, as a build would record it.
    pub fn current_baseline(&self) -> Baseline {
        let Ok(plan) = &self.plan else {
            return Baseline::default();
        };
        Baseline {
            structural: plan.structural.iter().copied().collect(),
            fingerprints: plan
                .sources
                .iter()
                .map(|s| (plan.structural[s.node.index()], s.current))
                .collect(),
        }
    }

    pub fn dirty(&self) -> &[DirtyMark] {
        &self.dirty
    }

    pub fn tree(&self) -> &FileTree {
        &self.tree
    }

    /// The tree as it is now, shared: what one build reads however the workspace changes
    /// while it runs.
    pub fn snapshot(&self) -> Arc<FileTree> {
        Arc::clone(&self.tree)
    }

    /// Why the Dockerfile cannot be planned right now, if it cannot.
    pub fn plan_error(&self) -> Option<&str> {
        self.plan.as_ref().err().map(String::as_str)
    }

    /// Whether `path` is one of the files whose change means re-planning.
    pub fn is_build_definition(&self, path: &Path) -> bool {
        path == self.dockerfile || self.is_ignore_file(path)
    }

    /// Whether `path` is a file the ignore rules may come from.
    pub fn is_ignore_file(&self, path: &Path) -> bool {
        is_ignore_file(&self.context, &self.dockerfile, path)
    }
}

/// Whether `path` is a file the ignore rules of this context and Dockerfile may come from.
pub(super) fn is_ignore_file(context: &Path, dockerfile: &Path, path: &Path) -> bool {
    let mut specific = dockerfile.as_os_str().to_owned();
    specific.push(".dockerignore");
    path == Path::new(&specific) || path == context.join(".dockerignore")
}

/// The directory holding the Dockerfile when it lies outside the context (it is watched
/// on its own then).
pub(super) fn definition_dir_outside(context: &Path, dockerfile: &Path) -> Option<PathBuf> {
    if dockerfile.starts_with(context) {
        None
    } else {
        dockerfile.parent().map(Path::to_owned)
    }
}

impl Plan {
    fn new(graph: BuildGraph, tree: &FileTree) -> Result<Self, WatchError> {
        let structural = structural_keys(&graph);
        let mut sources = Vec::new();
        for node in graph.toposort() {
            let spec = graph.node(node);
            if spec.kind != NodeKind::ContextSource {
                continue;
            }
            let patterns = spec
                .sources
                .iter()
                .map(|s| {
                    SourcePattern::new(s).map_err(|source| WatchError::Pattern {
                        pattern: s.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let excludes = IgnoreRules::parse(&spec.excludes.join("\n"), "--exclude")?;
            let current = tree.fingerprint(&patterns, &excludes);
            sources.push(TrackedSource {
                node,
                patterns,
                excludes,
                current,
                cause: None,
            });
        }
        Ok(Self {
            graph,
            structural,
            sources,
        })
    }
}

/// Per node: BLAKE3 of its kind, instruction and its parents' structural keys.
fn structural_keys(graph: &BuildGraph) -> Vec<Hash> {
    let inner = graph.graph();
    let mut keys = vec![[0u8; 32]; inner.node_count()];
    for node in graph.toposort() {
        let spec = graph.node(node);
        let mut hasher = blake3::Hasher::new();
        hasher.update(spec.kind.as_str().as_bytes());
        hasher.update(&[0]);
        hasher.update(spec.instruction.as_bytes());
        let mut parents: Vec<Hash> = inner
            .neighbors_directed(node, Direction::Incoming)
            .map(|p| keys[p.index()])
            .collect();
        parents.sort_unstable();
        for parent in parents {
            hasher.update(&parent);
        }
        keys[node.index()] = *hasher.finalize().as_bytes();
    }
    keys
}

fn read_plan(dockerfile: &Path) -> Result<BuildGraph, WatchError> {
    let text = std::fs::read_to_string(dockerfile).map_err(|source| WatchError::Read {
        path: dockerfile.to_owned(),
        source,
    })?;
    let name = dockerfile.display().to_string();
    let parsed = frontend::parse(&text, &name).map_err(|d| WatchError::Dockerfile(Box::new(d)))?;
    plan::lower(&parsed, &PlanOptions::default()).map_err(|e| WatchError::Plan(Box::new(e)))
}
