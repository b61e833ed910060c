//! One watched workspace: its plan, its file tree, the fingerprint of every COPY/ADD source
//! set, and which nodes are dirty compared with the baseline (the state last built).
//!
//! Dirty marks are recomputed from scratch after every change, which keeps them exact when an
//! edit is reverted: a node is dirty when its *structural key* (instruction plus the structural
//! keys of what it depends on, no file contents) is not in the baseline — the Dockerfile
//! changed it — or when a source set it reads now has another fingerprint; and everything
//! downstream of a dirty node is dirty too, with the same cause.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
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
#[derive(Debug, Clone, Default)]
struct Baseline {
    structural: HashSet<Hash>,
    fingerprints: HashMap<Hash, Fingerprint>,
}

#[derive(Debug)]
pub struct Workspace {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    rules: IgnoreRules,
    tree: FileTree,
    plan: Result<Plan, String>,
    baseline: Baseline,
    dirty: Vec<DirtyMark>,
    pub last_change: Option<SystemTime>,
    /// Whether a live watcher covers it (false: changes are found by scanning).
    pub watching: bool,
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
    /// Reads, plans and scans a workspace. The baseline is the state found now.
    pub fn open(
        context: &Path,
        dockerfile: &Path,
        cache: &mut StatCache,
    ) -> Result<Self, WatchError> {
        let plan = read_plan(dockerfile)?;
        let mut workspace = Self::load(context, dockerfile, Ok(plan), cache)?;
        workspace.baseline = workspace.current_baseline();
        Ok(workspace)
    }

    fn load(
        context: &Path,
        dockerfile: &Path,
        graph: Result<BuildGraph, String>,
        cache: &mut StatCache,
    ) -> Result<Self, WatchError> {
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
            tree,
            plan,
            baseline: Baseline::default(),
            dirty: Vec::new(),
            last_change: None,
            watching: false,
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
        fresh.baseline = std::mem::take(&mut self.baseline);
        fresh.watching = self.watching;
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
        context::refresh(&self.context, &self.rules, &mut self.tree, paths, cache)?;
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
            Err(WatchError::Dockerfile(message)) => Ok(Err(message)),
            Err(other) => Err(other),
        }
    }

    fn definition_changed(&mut self, cause: &str) {
        self.last_change = Some(SystemTime::now());
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
        let touched = context::refresh(&self.context, &self.rules, &mut self.tree, paths, cache)?;
        Ok(self.absorb(touched))
    }

    /// Rescans everything (the watcher lost events). Returns how many nodes became dirty.
    pub fn rescan(&mut self, cache: &mut StatCache) -> Result<usize, WatchError> {
        let (tree, report) = context::scan(&self.context, &self.rules, cache)?;
        let touched = self.tree.replace_subtree("", tree.into_entries());
        self.last_scan = report;
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
                let cause = touched
                    .iter()
                    .find(|path| source.patterns.iter().any(|p| p.covers(path)));
                if let Some(cause) = cause {
                    let now = self.tree.fingerprint(&source.patterns, &source.excludes);
                    if now != source.current {
                        source.current = now;
                        source.cause = Some(cause.to_string());
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
        let Ok(plan) = &self.plan else {
            self.dirty.clear();
            return;
        };
        let graph = plan.graph.graph();
        let mut cause_of: HashMap<NodeIndex, String> = HashMap::new();
        for source in &plan.sources {
            let key = plan.structural[source.node.index()];
            if self.baseline.fingerprints.get(&key) != Some(&source.current) {
                let cause = source
                    .cause
                    .clone()
                    .unwrap_or_else(|| dockerfile_cause.to_owned());
                cause_of.entry(source.node).or_insert(cause);
            }
        }
        for node in plan.graph.toposort() {
            if !self
                .baseline
                .structural
                .contains(&plan.structural[node.index()])
            {
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
    ) -> Result<Hash, String> {
        let key = (patterns.to_vec(), excludes.to_vec());
        let generation = self.tree.generation();
        if let Some((at, hash)) = self.fingerprints.get(&key)
            && *at == generation
        {
            return Ok(*hash);
        }
        let compiled = patterns
            .iter()
            .map(|p| SourcePattern::new(p).map_err(|e| format!("source {p:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let rules =
            IgnoreRules::parse(&excludes.join("\n"), "--exclude").map_err(|e| e.to_string())?;
        let hash = self.tree.fingerprint(&compiled, &rules).hash;
        self.fingerprints.insert(key, (generation, hash));
        Ok(hash)
    }

    /// Makes the current state the baseline (after a successful build).
    pub fn mark_built(&mut self) {
        self.baseline = self.current_baseline();
        self.dirty.clear();
    }

    fn current_baseline(&self) -> Baseline {
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
        let mut specific = self.dockerfile.as_os_str().to_owned();
        specific.push(".dockerignore");
        path == Path::new(&specific) || path == self.context.join(".dockerignore")
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
                .map(|s| SourcePattern::new(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| WatchError::Dockerfile(format!("{}: {err}", spec.label)))?;
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
    let parsed =
        frontend::parse(&text, &name).map_err(|d| WatchError::Dockerfile(d.to_string()))?;
    plan::lower(&parsed, &PlanOptions::default()).map_err(|e| WatchError::Dockerfile(e.to_string()))
}
