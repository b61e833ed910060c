//! One build in progress: a task per node, each waiting for its parents, then taking its
//! result from the cache or executing it.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use petgraph::Direction;
use rayon::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, info_span};

use super::add;
use super::copy::{self, CopySource, CopySpec};
use super::keys::{BaseImage, Keys};
use super::state::{self, DEFAULT_PATH, State};
use super::user;
use super::view::RootView;
use super::{BuildError, BuildSpec, Engine, Progress, Reporter};
use crate::context::{Hash, IgnoreRules};
use crate::exec::{LogStream, Network, RunRequest};
use crate::frontend::{Command, FileCopy, InstructionKind, Run};
use crate::image::layer::{Layer, LayerOptions, write_layer};
use crate::plan::{BuildGraph, NodeIndex, NodeKind};
use crate::store::{ActionResult, LayerRecord, Lease, blocking};

/// Paths the runtime creates as mount points when the image lacks them; they never belong
/// in a layer.
const MOUNT_POINTS: &[&str] = &[
    "proc",
    "sys",
    "dev",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/hostname",
];
/// Versions the keys of COPY chunks (`BuildRun::chunked_copy`).
const CHUNK_KEY_VERSION: &[u8] = b"memobuild-copy-chunk-v1\0";
/// Log lines kept to explain a failed RUN.
const FAILURE_TAIL: usize = 20;

type Outcome = Option<Result<Arc<State>, Arc<BuildError>>>;

pub(super) struct BuildRun {
    pub(super) engine: Arc<Engine>,
    pub(super) spec: BuildSpec,
    pub(super) graph: Arc<BuildGraph>,
    pub(super) keys: Keys,
    pub(super) bases: HashMap<String, BaseImage>,
    pub(super) reporter: Arc<dyn Reporter>,
    pub(super) cancel: Arc<AtomicBool>,
    /// Holds everything this build uses in the store.
    pub(super) lease: Lease,
    pub(super) created: String,
    pub(super) cached: AtomicU64,
    pub(super) executed: AtomicU64,
}

impl BuildRun {
    /// Steps as the user counts them: base images and filesystem steps.
    pub(super) fn step_count(&self) -> u64 {
        self.graph.nodes().filter(|(_, n)| is_step(n.kind)).count() as u64
    }

    pub(super) async fn execute_all(self: &Arc<Self>) -> Result<State, BuildError> {
        let order = self.graph.toposort();
        let count = self.graph.graph().node_count();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| watch::channel::<Outcome>(None)).unzip();
        self.queue_names();
        let mut senders: Vec<Option<watch::Sender<Outcome>>> =
            senders.into_iter().map(Some).collect();
        let mut tasks = JoinSet::new();
        // The error to report: the first that is not a cancellation its siblings saw
        // because of it (so a store error is not reported as "build cancelled").
        let first_error: Arc<Mutex<Option<Arc<BuildError>>>> = Arc::default();
        for node in order {
            let parents: Vec<(NodeIndex, watch::Receiver<Outcome>)> = self
                .graph
                .graph()
                .neighbors_directed(node, Direction::Incoming)
                .map(|p| (p, receivers[p.index()].clone()))
                .collect();
            let Some(sender) = senders[node.index()].take() else {
                continue;
            };
            let run = Arc::clone(self);
            let first_error = Arc::clone(&first_error);
            let span =
                info_span!("node", id = node.index() + 1, label = %self.graph.node(node).label);
            tasks.spawn(
                async move {
                    let outcome = run.node_task(node, parents).await;
                    if let Err(err) = &outcome {
                        if !matches!(**err, BuildError::Cancelled) {
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert_with(|| Arc::clone(err));
                        }
                        // The first failure stops the rest of the build.
                        run.cancel.store(true, Ordering::Relaxed);
                    }
                    let _ = sender.send(Some(outcome));
                }
                .instrument(span),
            );
        }
        // Every task finishes (cleaning up after itself) before the result is read.
        while tasks.join_next().await.is_some() {}
        let export = receivers[self.graph.export().index()].borrow().clone();
        let first_error = first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match (export, first_error) {
            (Some(Ok(state)), _) => Ok((*state).clone()),
            (_, Some(err)) | (Some(Err(err)), None) => Err(unshare(err)),
            (None, None) => Err(BuildError::Cancelled),
        }
    }

    fn queue_names(&self) {
        let mut position: HashMap<u32, (usize, usize)> = HashMap::new();
        for stage in self.graph.stages() {
            let total = self
                .graph
                .nodes()
                .filter(|(_, n)| n.stage == Some(stage.index) && is_step(n.kind))
                .count();
            position.insert(stage.index, (0, total));
        }
        for node in self.graph.toposort() {
            let spec = self.graph.node(node);
            if !is_step(spec.kind) {
                continue;
            }
            let name = match spec
                .stage
                .and_then(|s| position.get_mut(&s).map(|p| (s, p)))
            {
                Some((stage, (done, total))) => {
                    *done += 1;
                    let stage_name = self
                        .graph
                        .stages()
                        .iter()
                        .find(|st| st.index == stage)
                        .and_then(|st| st.name.clone())
                        .unwrap_or_else(|| format!("stage-{stage}"));
                    format!("[{stage_name} {done}/{total}] {}", spec.label)
                }
                None => format!("[internal] load {}", spec.label),
            };
            self.reporter.report(Progress::Queued {
                node: node.index() as u32 + 1,
                name,
            });
        }
    }

    async fn node_task(
        self: &Arc<Self>,
        node: NodeIndex,
        parents: Vec<(NodeIndex, watch::Receiver<Outcome>)>,
    ) -> Result<Arc<State>, Arc<BuildError>> {
        let mut inputs = HashMap::new();
        for (parent, mut receiver) in parents {
            let outcome = receiver
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Arc::new(BuildError::Cancelled))?
                .clone();
            match outcome {
                Some(Ok(state)) => {
                    inputs.insert(parent, state);
                }
                Some(Err(err)) => return Err(err),
                None => return Err(Arc::new(BuildError::Cancelled)),
            }
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Arc::new(BuildError::Cancelled));
        }
        let id = node.index() as u32 + 1;
        let result = self.node(node, &inputs).await;
        if let Err(err) = &result
            && is_step(self.graph.node(node).kind)
            && !matches!(err, BuildError::Cancelled)
        {
            self.reporter.report(Progress::Failed {
                node: id,
                message: err.to_string(),
            });
        }
        result.map(Arc::new).map_err(Arc::new)
    }

    /// The state after `node`, given its parents' states.
    async fn node(
        self: &Arc<Self>,
        node: NodeIndex,
        inputs: &HashMap<NodeIndex, Arc<State>>,
    ) -> Result<State, BuildError> {
        let spec = self.graph.node(node);
        let id = node.index() as u32 + 1;
        let parent_state = || -> State {
            let parent = spec.parent.and_then(|p| inputs.get(&p));
            match (parent, spec.parent.map(|p| self.graph.node(p).kind)) {
                // A stage built FROM another stage starts afresh from its result.
                (Some(state), Some(NodeKind::Stage)) => state.for_new_stage(),
                (Some(state), _) => (**state).clone(),
                (None, _) => State::scratch(&self.engine.platform),
            }
        };
        match spec.kind {
            NodeKind::BaseImage => {
                self.reporter.report(Progress::Cached { node: id });
                Ok(
                    match spec.image.as_deref().and_then(|i| self.bases.get(i)) {
                        Some(base) => base.state.for_new_stage(),
                        None => State::scratch(&self.engine.platform),
                    },
                )
            }
            NodeKind::ContextSource => Ok(State::scratch(&self.engine.platform)),
            NodeKind::Stage | NodeKind::Export => Ok(parent_state()),
            NodeKind::Metadata => {
                let mut state = parent_state();
                if let Some(step) = &spec.step {
                    state.apply_metadata(step, &spec.label, &self.created);
                }
                Ok(state)
            }
            NodeKind::Filesystem => {
                let parent = parent_state();
                // `COPY --from`: the other input that is a stage or an image, not the context.
                let other = self
                    .graph
                    .graph()
                    .neighbors_directed(node, Direction::Incoming)
                    .filter(|p| Some(*p) != spec.parent)
                    .filter(|p| self.graph.node(*p).kind != NodeKind::ContextSource)
                    .find_map(|p| inputs.get(&p).cloned());
                self.filesystem(node, parent, other).await
            }
        }
    }

    async fn filesystem(
        self: &Arc<Self>,
        node: NodeIndex,
        parent: State,
        from: Option<Arc<State>>,
    ) -> Result<State, BuildError> {
        let spec = self.graph.node(node);
        let id = node.index() as u32 + 1;
        let key = self.keys.of[node.index()];
        let step = spec
            .step
            .clone()
            .ok_or_else(|| BuildError::Store("a step without an instruction".into()))?;
        let cached = if self.spec.no_cache {
            None
        } else {
            let run = Arc::clone(self);
            blocking(move || run.lookup(&key)).await?
        };
        let result = match cached {
            Some(result) => {
                self.reporter.report(Progress::Cached { node: id });
                self.cached.fetch_add(1, Ordering::Relaxed);
                result
            }
            None => {
                let started = Instant::now();
                self.reporter.report(Progress::Started { node: id });
                let run = Arc::clone(self);
                let parent_for_step = parent.clone();
                let (result, ran_here) = self
                    .engine
                    .once(key, async move {
                        run.execute(node, step.clone(), parent_for_step, from).await
                    })
                    .await;
                let result = result.map_err(unshare)?;
                if ran_here {
                    let (lease, recorded) = (self.lease.clone(), result.clone());
                    blocking(move || lease.record_action(&key, &recorded))
                        .await
                        .map_err(store)?;
                    self.engine.l1.insert(key, result.clone());
                    self.executed.fetch_add(1, Ordering::Relaxed);
                    self.reporter.report(Progress::Done {
                        node: id,
                        duration: started.elapsed(),
                    });
                } else {
                    // Another build computed it while this one waited: for this build it is
                    // as good as cached.
                    self.cached.fetch_add(1, Ordering::Relaxed);
                    self.reporter.report(Progress::Cached { node: id });
                }
                result
            }
        };
        let mut state = parent;
        if let Some(InstructionKind::Workdir(dir)) = &spec.step {
            state.config.config.working_dir = Some(state::absolute_workdir(&state.workdir(), dir));
        }
        let layers = result
            .layers
            .into_iter()
            .map(|l| Layer {
                blob: l.blob,
                diff_id: l.diff_id,
                media_type: l.media_type,
            })
            .collect();
        state.push_layers(layers, &spec.label, &self.created);
        Ok(state)
    }

    /// An L1 or L2 hit whose blobs are really there, held by this build's lease (a missing
    /// or damaged blob makes it a miss, and the record is dropped from both tiers). Blocking.
    fn lookup(&self, key: &Hash) -> Result<Option<ActionResult>, BuildError> {
        let engine = &self.engine;
        let found = match engine.l1.get(key) {
            Some(result) => Some(result),
            None => {
                let l2 = self.lease.action(key).map_err(store)?;
                if let Some(result) = &l2 {
                    engine.l1.insert(*key, result.clone());
                }
                l2
            }
        };
        let usable = found.filter(|result| self.lease.claim(key, result));
        match &usable {
            Some(_) => engine.hits.fetch_add(1, Ordering::Relaxed),
            None => {
                engine.l1.remove(key);
                let _ = self.lease.forget_action(key);
                engine.misses.fetch_add(1, Ordering::Relaxed)
            }
        };
        Ok(usable)
    }

    async fn execute(
        self: Arc<Self>,
        node: NodeIndex,
        step: InstructionKind,
        parent: State,
        from: Option<Arc<State>>,
    ) -> Result<ActionResult, BuildError> {
        let _permit = self
            .engine
            .permits
            .acquire()
            .await
            .map_err(|_| BuildError::Cancelled)?;
        let tree = match &step {
            InstructionKind::Copy(c) | InstructionKind::Add(c) if c.from.is_none() => {
                Some(self.context_tree()?)
            }
            _ => None,
        };
        let run = Arc::clone(&self);
        tokio::task::spawn_blocking(move || {
            let label = run.graph.node(node).label.clone();
            let free_before = run.engine.store.free_space();
            let outcome = match &step {
                InstructionKind::Run(spec) => run.run_step(node, spec, &parent),
                InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
                    let is_add = matches!(step, InstructionKind::Add(_));
                    run.copy_step(node, spec, is_add, &parent, from.as_deref(), tree.as_ref())
                }
                InstructionKind::Workdir(dir) => run.workdir_step(dir, &parent),
                other => Err(BuildError::Store(format!(
                    "{} is not a filesystem step",
                    other.keyword()
                ))),
            };
            outcome.map_err(|err| match err {
                BuildError::Store(message) => BuildError::Step {
                    step: label,
                    message,
                },
                BuildError::Full(detail) => BuildError::OutOfSpace {
                    step: label,
                    source: Box::new(run.engine.store.out_of_space(free_before, detail)),
                },
                other => other,
            })
        })
        .await
        .map_err(store)?
    }

    fn context_tree(&self) -> Result<crate::context::FileTree, BuildError> {
        self.engine
            .hub
            .with_workspace(&self.spec.context, |ws| ws.tree().clone())
            .ok_or_else(|| BuildError::Store("the build context is not watched".into()))
    }

    fn layer_options(&self) -> LayerOptions<'static> {
        LayerOptions {
            source_date_epoch: self.spec.source_date_epoch,
            ..LayerOptions::default()
        }
    }

    /// Unpacks `state`'s layers (once each) and returns their directories, topmost first.
    fn lower_dirs(&self, state: &State) -> Result<Vec<PathBuf>, BuildError> {
        state
            .layers
            .iter()
            .rev()
            .map(|layer| self.lease.unpacked(layer).map_err(store))
            .collect()
    }

    fn run_step(
        &self,
        node: NodeIndex,
        run: &Run,
        parent: &State,
    ) -> Result<ActionResult, BuildError> {
        let executor = self
            .engine
            .executor
            .as_ref()
            .map_err(|why| BuildError::NoRuntime(why.clone()))?
            .clone();
        let spec = self.graph.node(node);
        let lowers = self.lower_dirs(parent)?;
        let view = RootView::new(lowers.clone());
        let ids: Vec<String> = lowers
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        let scratch = self.scratch("run-")?;
        let _cleanup = RemoveOnDrop(scratch.clone());
        let active = self
            .engine
            .snapshotter
            .prepare(&ids, &scratch)
            .map_err(store)?;
        let who = user::resolve(parent.config.config.user.as_deref().unwrap_or(""), &view)
            .map_err(store)?;
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(format!("HOME={}", who.home));
        }
        let cwd = parent.workdir();
        // Docker creates a missing WORKDIR for RUN; so does the layer, as it does there.
        let _ = std::fs::create_dir_all(active.rootfs().join(cwd.trim_start_matches('/')));
        let absent_mounts: Vec<String> = MOUNT_POINTS
            .iter()
            .filter(|p| view.lookup(&Path::new("/").join(p)).is_none())
            .map(|p| (*p).to_owned())
            .collect();
        let request = RunRequest {
            id: self.engine.next_run_id(),
            bundle: scratch.join("bundle"),
            rootfs: active.rootfs().to_owned(),
            args: run_argv(run, parent),
            env,
            cwd,
            user: who.process,
            network: match run.network.as_deref() {
                Some("none") => Network::None,
                Some("host") => Network::Host,
                _ => self.spec.network,
            },
        };
        let id = node.index() as u32 + 1;
        let tail = Mutex::new(VecDeque::with_capacity(FAILURE_TAIL));
        let mut logs = |stream: LogStream, line: &[u8]| {
            let mut kept = tail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.len() == FAILURE_TAIL {
                kept.pop_front();
            }
            kept.push_back(String::from_utf8_lossy(line).into_owned());
            self.reporter.report(Progress::Log {
                node: id,
                stream,
                line: line.to_vec(),
            });
        };
        let code = executor
            .run(&request, &mut logs, &self.cancel)
            .map_err(|e| match e {
                crate::exec::ExecError::Cancelled => BuildError::Cancelled,
                other => BuildError::Store(other.to_string()),
            })?;
        let upper = active.unmount().map_err(store)?;
        if code != 0 {
            let tail = tail.into_inner().unwrap_or_default();
            return Err(BuildError::RunFailed {
                step: spec.label.clone(),
                code,
                tail: Vec::from(tail).join("\n"),
            });
        }
        remove_mount_points(&upper, &absent_mounts);
        self.finish_layer(&upper)
    }

    fn copy_step(
        &self,
        node: NodeIndex,
        copy: &FileCopy,
        is_add: bool,
        parent: &State,
        from: Option<&State>,
        tree: Option<&crate::context::FileTree>,
    ) -> Result<ActionResult, BuildError> {
        let parent_view = RootView::new(self.lower_dirs(parent)?);
        let chown = match copy.chown.as_deref() {
            Some(spec) => {
                let who = user::resolve(spec, &parent_view).map_err(store)?;
                Some((who.process.uid, who.process.gid))
            }
            None => None,
        };
        let chmod =
            match copy.chmod.as_deref() {
                Some(text) => Some(u32::from_str_radix(text, 8).map_err(|_| {
                    BuildError::Store(format!("--chmod={text} is not an octal mode"))
                })?),
                None => None,
            };
        if !is_add && copy.sources.iter().any(|s| s.contains("://")) {
            return Err(BuildError::Store(
                "COPY can not fetch a URL; use ADD".into(),
            ));
        }
        let spec = CopySpec {
            sources: copy.sources.clone(),
            dest: copy.dest.clone(),
            workdir: parent.workdir(),
            chown,
            chmod,
        };
        let excludes = IgnoreRules::parse(&copy.exclude.join("\n"), "--exclude").map_err(store)?;
        // ADD: archives are extracted and URLs downloaded (engine::add); it has no --from.
        if is_add {
            let tree = tree.ok_or_else(|| BuildError::Store("no build context for ADD".into()))?;
            let context = add::Context {
                dir: &self.spec.context,
                tree,
                excludes: &excludes,
            };
            return self.new_layer("add-", |staging| {
                let checksum = copy.checksum.as_deref();
                add::stage(
                    &spec,
                    checksum,
                    context,
                    &parent_view,
                    staging,
                    self.engine.as_root,
                )
                .map_err(store)
            });
        }
        let from_view;
        let source = match (from, tree) {
            (Some(state), _) => {
                from_view = RootView::new(self.lower_dirs(state)?);
                CopySource::Image(&from_view)
            }
            (None, Some(tree)) => CopySource::Context {
                dir: &self.spec.context,
                tree,
                excludes: &excludes,
            },
            (None, None) => return Err(BuildError::Store("no source for COPY".into())),
        };
        let plan = copy::plan(&spec, source, &parent_view).map_err(store)?;
        if let Some(chunks) = plan.chunks(self.engine.options.copy_chunk_bytes) {
            return self.chunked_copy(node, &plan, &chunks, &spec, &parent_view);
        }
        self.new_layer("copy-", |staging| {
            plan.apply(&spec, &parent_view, staging, self.engine.as_root)
                .map(drop)
                .map_err(store)
        })
    }

    /// A large COPY as one layer per chunk. Each chunk has its own key — the step's key
    /// without its sources, and the chunk's own files — so after an edit every other chunk
    /// is a cache hit and only the edited one is copied, tarred and compressed again.
    fn chunked_copy(
        &self,
        node: NodeIndex,
        plan: &copy::Plan,
        chunks: &[copy::Chunk],
        spec: &CopySpec,
        parent_view: &RootView,
    ) -> Result<ActionResult, BuildError> {
        let base = self.keys.without_context[node.index()];
        let keyed: Vec<(Hash, &copy::Chunk)> = chunks
            .iter()
            .map(|chunk| {
                let mut hasher = blake3::Hasher::new();
                hasher.update(CHUNK_KEY_VERSION);
                hasher.update(&base);
                hasher.update(&chunk.fingerprint);
                (*hasher.finalize().as_bytes(), chunk)
            })
            .collect();
        let cached: Vec<Option<ActionResult>> = keyed
            .iter()
            .map(|(key, _)| self.lookup(key))
            .collect::<Result<_, _>>()?;
        let missing: Vec<usize> = (0..keyed.len()).filter(|&i| cached[i].is_none()).collect();
        // Chunks are independent: write them on every core (a cold build of a big COPY).
        let written: Vec<(usize, ActionResult)> = missing
            .par_iter()
            .map(|&i| {
                let (key, chunk) = keyed[i];
                let result = self.new_layer("chunk-", |staging| {
                    plan.apply_chunk(chunk, spec, parent_view, staging, self.engine.as_root)
                        .map(drop)
                        .map_err(store)
                })?;
                self.lease.record_action(&key, &result).map_err(store)?;
                self.engine.l1.insert(key, result.clone());
                Ok((i, result))
            })
            .collect::<Result<_, BuildError>>()?;
        let rewritten: u64 = missing.iter().map(|&i| keyed[i].1.bytes).sum();
        self.reporter.report(Progress::Log {
            node: node.index() as u32 + 1,
            stream: LogStream::Stdout,
            line: format!(
                "{} layer chunks: {} reused, {} written ({} MB)\n",
                chunks.len(),
                chunks.len() - missing.len(),
                missing.len(),
                rewritten.div_ceil(1 << 20)
            )
            .into_bytes(),
        });
        let mut results = cached;
        for (i, result) in written {
            results[i] = Some(result);
        }
        Ok(ActionResult {
            layers: results
                .into_iter()
                .flatten()
                .flat_map(|result| result.layers)
                .collect(),
        })
    }

    fn workdir_step(&self, dir: &str, parent: &State) -> Result<ActionResult, BuildError> {
        let path = state::absolute_workdir(&parent.workdir(), dir);
        let view = RootView::new(self.lower_dirs(parent)?);
        if view.lookup(&view.resolve(Path::new(&path), true)).is_some() {
            return Ok(ActionResult { layers: vec![] });
        }
        let who = user::resolve(parent.config.config.user.as_deref().unwrap_or(""), &view)
            .map_err(store)?;
        self.new_layer("workdir-", |staging| {
            let target = staging.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&target).map_err(store)?;
            if self.engine.as_root {
                std::os::unix::fs::chown(&target, Some(who.process.uid), Some(who.process.gid))
                    .map_err(store)?;
            }
            Ok(())
        })
    }

    /// Fills a fresh scratch directory with `fill` and writes it as a layer; the directory
    /// becomes the layer's unpacked form, or is removed however this ends.
    fn new_layer(
        &self,
        prefix: &str,
        fill: impl FnOnce(&Path) -> Result<(), BuildError>,
    ) -> Result<ActionResult, BuildError> {
        let staging = self.scratch(prefix)?;
        let _cleanup = RemoveOnDrop(staging.clone());
        fill(&staging)?;
        self.finish_layer(&staging)
    }

    /// Writes `dir` as a layer and keeps `dir` as its unpacked form.
    fn finish_layer(&self, dir: &Path) -> Result<ActionResult, BuildError> {
        let owner = |_: &Path| Some((0, 0));
        let options = if self.engine.as_root {
            self.layer_options()
        } else {
            LayerOptions {
                owner: Some(&owner),
                ..self.layer_options()
            }
        };
        let layer = write_layer(&self.lease.cas(), dir, &options).map_err(store)?;
        let Some(layer) = layer else {
            return Ok(ActionResult { layers: vec![] });
        };
        self.lease.adopt(&layer.diff_id, dir).map_err(store)?;
        Ok(ActionResult {
            layers: vec![LayerRecord {
                blob: layer.blob,
                diff_id: layer.diff_id,
                media_type: layer.media_type,
            }],
        })
    }

    fn scratch(&self, prefix: &str) -> Result<PathBuf, BuildError> {
        self.engine.store.scratch(prefix).map_err(store)
    }
}

impl Engine {
    /// Runs `work` for `key` unless another build is already computing it; then waits for
    /// that one's result instead. The flag says whether `work` ran here.
    pub(super) async fn once(
        &self,
        key: Hash,
        work: impl std::future::Future<Output = Result<ActionResult, BuildError>>,
    ) -> (Result<ActionResult, Arc<BuildError>>, bool) {
        let waiting = {
            let mut inflight = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match inflight.get(&key) {
                Some(receiver) => Err(receiver.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    inflight.insert(key, receiver);
                    Ok(sender)
                }
            }
        };
        match waiting {
            Err(mut receiver) => {
                let shared = match receiver.wait_for(Option::is_some).await {
                    Ok(outcome) => outcome
                        .clone()
                        .unwrap_or_else(|| Err(Arc::new(BuildError::Cancelled))),
                    // The build computing it went away (cancelled): so does this one's wait.
                    Err(_) => Err(Arc::new(BuildError::Cancelled)),
                };
                (shared, false)
            }
            Ok(sender) => {
                let _forget = ForgetInflight { engine: self, key };
                let outcome = work.await.map_err(Arc::new);
                let _ = sender.send(Some(outcome.clone()));
                (outcome, true)
            }
        }
    }
}

/// Removes the in-flight entry however the computation ends (also when it is cancelled).
struct ForgetInflight<'a> {
    engine: &'a Engine,
    key: Hash,
}

impl Drop for ForgetInflight<'_> {
    fn drop(&mut self) {
        self.engine
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Removes a scratch directory when the step ends, unless it was adopted (renamed away).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn run_argv(run: &Run, parent: &State) -> Vec<String> {
    // `RUN <<EOF` makes the heredoc body the script.
    if let (Command::Shell(line), Some(doc)) = (&run.command, run.heredocs.first())
        && line.trim_start().starts_with("<<")
    {
        let mut argv = parent.shell();
        argv.push(doc.body.clone());
        return argv;
    }
    parent.argv(&run.command)
}

/// Drops what the runtime created only to mount over: empty mount-point files and dirs
/// (and `etc` if it exists only because of them).
fn remove_mount_points(upper: &Path, absent: &[String]) {
    for path in absent {
        let host = upper.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        let empty = if meta.is_dir() {
            std::fs::read_dir(&host).is_ok_and(|mut d| d.next().is_none())
        } else {
            meta.len() == 0
        };
        if empty {
            let _ = if meta.is_dir() {
                std::fs::remove_dir(&host)
            } else {
                std::fs::remove_file(&host)
            };
        }
    }
    if absent.iter().any(|p| p.starts_with("etc/")) {
        let _ = std::fs::remove_dir(upper.join("etc"));
    }
}

/// An error of the store or of a step's writes; one that ran out of space says so.
fn store(err: impl std::error::Error + 'static) -> BuildError {
    if crate::store::is_out_of_space(&err) {
        BuildError::Full(err.to_string())
    } else {
        BuildError::Store(err.to_string())
    }
}

fn is_step(kind: NodeKind) -> bool {
    matches!(kind, NodeKind::BaseImage | NodeKind::Filesystem)
}

fn unshare(err: Arc<BuildError>) -> BuildError {
    Arc::try_unwrap(err).unwrap_or_else(|shared| match &*shared {
        BuildError::Cancelled => BuildError::Cancelled,
        BuildError::NoRuntime(why) => BuildError::NoRuntime(why.clone()),
        BuildError::Step { step, message } => BuildError::Step {
            step: step.clone(),
            message: message.clone(),
        },
        BuildError::RunFailed { step, code, tail } => BuildError::RunFailed {
            step: step.clone(),
            code: *code,
            tail: tail.clone(),
        },
        other => BuildError::Step {
            step: "build".into(),
            message: other.to_string(),
        },
    })
}
