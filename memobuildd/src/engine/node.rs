//! One build in progress: a task per node, each waiting for its parents, then taking its
//! result from the cache or executing it.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt as _;
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
use super::explain::{self, Circumstances, Position, StepInputs};
use super::flight::Work;
use super::keys::{self, BaseImage, ExecContext, Input, KeyInputs};
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

/// Mount points the runtime creates when the image lacks them and that BuildKit removes
/// again when they stayed empty. (It keeps /proc, /sys and /dev, and /etc/hostname is no
/// mount there: what a RUN writes to it is kept.)
const MOUNT_POINTS: &[&str] = &["etc/hosts", "etc/resolv.conf"];
/// Versions the ids of what a `COPY --from` copies (`BuildRun::copied_files_id`).
const COPIED_FILES_VERSION: &[u8] = b"memobuild-copied-files-v1\0";
/// Versions the keys of COPY chunks (`BuildRun::chunked_copy`).
const CHUNK_KEY_VERSION: &[u8] = b"memobuild-copy-chunk-v1\0";
/// Log lines kept to explain a failed RUN.
const FAILURE_TAIL: usize = 20;

type Outcome = Option<Result<Arc<State>, Arc<BuildError>>>;

pub(super) struct BuildRun {
    pub(super) engine: Arc<Engine>,
    pub(super) spec: BuildSpec,
    pub(super) graph: Arc<BuildGraph>,
    /// USER, WORKDIR and SHELL in effect at each node (by index).
    pub(super) contexts: Vec<ExecContext>,
    /// The snapshot's fingerprint of each context-source node.
    pub(super) fingerprints: HashMap<NodeIndex, Hash>,
    /// What each filesystem step's key was made of, as it was computed.
    pub(super) keyed: Mutex<HashMap<NodeIndex, KeyInputs>>,
    /// The same, from the previous build of this workspace and target: what a step that
    /// runs again is compared with to say why.
    pub(super) previous: Option<Arc<Vec<StepInputs>>>,
    /// Each filesystem step's place in its stage, to find it in the previous build.
    pub(super) positions: HashMap<NodeIndex, Position>,
    pub(super) bases: HashMap<String, BaseImage>,
    /// The build's snapshot of its context (`None`: the Dockerfile reads nothing from it).
    pub(super) context: Option<Arc<crate::context::FileTree>>,
    pub(super) reporter: Arc<dyn Reporter>,
    pub(super) cancel: Arc<AtomicBool>,
    /// Holds everything this build uses in the store.
    pub(super) lease: Lease,
    pub(super) created: String,
    pub(super) cached: AtomicU64,
    pub(super) executed: AtomicU64,
}

impl BuildRun {
    /// Why a step that missed the cache runs, compared with the previous build.
    fn why(&self, node: NodeIndex, inputs: &KeyInputs) -> String {
        let Some(position) = self.positions.get(&node) else {
            return "not in cache".into();
        };
        let label = &self.graph.node(node).label;
        let changed_file = self.engine.hub.dirty_cause(&self.spec.context, label);
        let step = StepInputs {
            position: *position,
            inputs: inputs.clone(),
        };
        explain::reason(
            self.previous.as_deref().map(Vec::as_slice),
            &step,
            Circumstances {
                no_cache: self.spec.no_cache,
                build_args: &self.spec.build_args,
                changed_file: changed_file.as_deref(),
            },
        )
    }

    /// This build's steps as the next build of the same target will compare with them.
    pub(super) fn step_inputs(&self) -> Vec<StepInputs> {
        let keyed = self
            .keyed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keyed
            .iter()
            .filter_map(|(node, inputs)| {
                Some(StepInputs {
                    position: *self.positions.get(node)?,
                    inputs: inputs.clone(),
                })
            })
            .collect()
    }

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
                // A stage built FROM another stage starts afresh from its result (the
                // export keeps the stage's image as it is, ONBUILD triggers included).
                (Some(state), Some(NodeKind::Stage)) if spec.kind != NodeKind::Export => {
                    state.for_new_stage()
                }
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
                let key_inputs = self.key_inputs(node, &parent, inputs).await?;
                // `COPY --from`: the other input that is a stage or an image, not the context.
                let other = keys::other_inputs(&self.graph, node)
                    .into_iter()
                    .filter(|p| self.graph.node(*p).kind != NodeKind::ContextSource)
                    .find_map(|p| inputs.get(&p).cloned());
                self.filesystem(node, parent, other, key_inputs).await
            }
        }
    }

    /// What `node`'s key is made of: its parent's result, and what it reads from the
    /// context (fingerprints) and from other stages (the copied files for `COPY --from`, the
    /// whole state otherwise).
    async fn key_inputs(
        self: &Arc<Self>,
        node: NodeIndex,
        parent: &State,
        inputs: &HashMap<NodeIndex, Arc<State>>,
    ) -> Result<KeyInputs, BuildError> {
        let mut ids = Vec::new();
        for other in keys::other_inputs(&self.graph, node) {
            if self.graph.node(other).kind == NodeKind::ContextSource {
                let id = self.fingerprints.get(&other).copied().ok_or_else(|| {
                    BuildError::Store("a context source without a fingerprint".into())
                })?;
                ids.push(Input {
                    id,
                    from_context: true,
                });
                continue;
            }
            let Some(state) = inputs.get(&other) else {
                continue;
            };
            let id = match &self.graph.node(node).step {
                Some(InstructionKind::Copy(copy) | InstructionKind::Add(copy))
                    if copy.from.is_some() =>
                {
                    self.copied_files_id(node, copy, state).await?
                }
                _ => keys::state_id(state),
            };
            ids.push(Input {
                id,
                from_context: false,
            });
        }
        let inputs = KeyInputs::of(&self.graph, node, &self.contexts[node.index()], parent, ids);
        self.keyed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node, inputs.clone());
        Ok(inputs)
    }

    /// The id of exactly the files a `COPY --from` copies out of `from`: paths, types, modes,
    /// owners and contents. Remembered per source state, so a build that changes nothing reads
    /// no layer to find it.
    async fn copied_files_id(
        self: &Arc<Self>,
        node: NodeIndex,
        copy: &FileCopy,
        from: &State,
    ) -> Result<Hash, BuildError> {
        let memo = {
            let mut hasher = blake3::Hasher::new();
            hasher.update(COPIED_FILES_VERSION);
            hasher.update(&keys::state_id(from));
            hasher.update(&(copy.sources.len() as u64).to_le_bytes());
            for source in &copy.sources {
                hasher.update(&(source.len() as u64).to_le_bytes());
                hasher.update(source.as_bytes());
            }
            *hasher.finalize().as_bytes()
        };
        if let Some(id) = self.engine.derived.get(&memo) {
            return Ok(id);
        }
        let run = Arc::clone(self);
        let from = from.clone();
        let sources = copy.sources.clone();
        let label = self.graph.node(node).label.clone();
        let id = tokio::task::spawn_blocking(move || {
            let view = RootView::new(run.lower_dirs(&from)?);
            copy::source_id(&sources, &view).map_err(|err| BuildError::Step {
                step: label,
                message: err.to_string(),
            })
        })
        .await
        .map_err(store)??;
        self.engine.derived.insert(memo, id);
        Ok(id)
    }

    async fn filesystem(
        self: &Arc<Self>,
        node: NodeIndex,
        parent: State,
        from: Option<Arc<State>>,
        key_inputs: KeyInputs,
    ) -> Result<State, BuildError> {
        let spec = self.graph.node(node);
        let id = node.index() as u32 + 1;
        let key = key_inputs.key();
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
                self.report_prebuilt(id, &key, false);
                self.cached.fetch_add(1, Ordering::Relaxed);
                result
            }
            None => {
                let started = Instant::now();
                self.reporter.report(Progress::Started { node: id });
                self.reporter.report(Progress::Reason {
                    node: id,
                    reason: self.why(node, &key_inputs),
                });
                let run = Arc::clone(self);
                let parent_for_step = parent.clone();
                let joined = self
                    .engine
                    .flights
                    .join(
                        key,
                        Arc::clone(&self.reporter),
                        id,
                        &self.cancel,
                        !self.spec.background,
                        move |work| async move {
                            run.execute(node, key, step, parent_for_step, from, work)
                                .await
                        },
                    )
                    .await;
                let result = joined.outcome.map_err(unshare)?;
                if joined.started_here {
                    self.executed.fetch_add(1, Ordering::Relaxed);
                    self.reporter.report(Progress::Done {
                        node: id,
                        duration: started.elapsed(),
                    });
                } else {
                    // Another build computed it while this one waited: for this build it is
                    // as good as cached, and held as a cached result is.
                    let (lease, claimed) = (self.lease.clone(), result.clone());
                    blocking(move || lease.claim(&key, &claimed)).await;
                    self.cached.fetch_add(1, Ordering::Relaxed);
                    self.reporter.report(Progress::Cached { node: id });
                    self.report_prebuilt(id, &key, true);
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
                content_id: l.content_id,
            })
            .collect();
        state.push_layers(layers, &spec.label, &self.created);
        Ok(state)
    }

    /// Tells a user's build that a step it did not execute was a prebuild's work.
    fn report_prebuilt(&self, node: u32, key: &Hash, joined: bool) {
        if self.spec.background {
            return;
        }
        if let Some(finished) = self.engine.prebuilt.get(key) {
            self.reporter.report(Progress::Prebuilt {
                node,
                ago: finished.elapsed(),
                joined,
            });
        }
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

    /// Runs a step as shared work (`flight`): stopped by `work`'s flag, logging to every
    /// build waiting for it, and recording its result under `key` when it succeeds.
    async fn execute(
        self: Arc<Self>,
        node: NodeIndex,
        key: Hash,
        step: InstructionKind,
        parent: State,
        from: Option<Arc<State>>,
        work: Arc<Work>,
    ) -> Result<ActionResult, BuildError> {
        let background = self.spec.background;
        let _permit = self
            .engine
            .permits
            .acquire(|| !background || work.is_foreground())
            .await
            .ok_or(BuildError::Cancelled)?;
        let tree = match &step {
            // The build's snapshot; a COPY of heredocs alone reads none.
            InstructionKind::Copy(c) | InstructionKind::Add(c)
                if c.from.is_none() && !c.sources.is_empty() =>
            {
                self.context.clone()
            }
            _ => None,
        };
        let run = Arc::clone(&self);
        tokio::task::spawn_blocking(move || {
            let label = run.graph.node(node).label.clone();
            let free_before = run.engine.store.free_space();
            let outcome = match &step {
                InstructionKind::Run(spec) => run.run_step(node, spec, &parent, &work),
                InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
                    let is_add = matches!(step, InstructionKind::Add(_));
                    let origin = match from.as_deref() {
                        Some(state) => Origin::Stage(state),
                        None => Origin::Context(tree.as_deref()),
                    };
                    run.copy_step(node, spec, is_add, &parent, origin, &work)
                }
                InstructionKind::Workdir(dir) => run.workdir_step(dir, &parent),
                other => Err(BuildError::Store(format!(
                    "{} is not a filesystem step",
                    other.keyword()
                ))),
            };
            let result = outcome.map_err(|err| match err {
                BuildError::Store(message) => BuildError::Step {
                    step: label,
                    message,
                },
                BuildError::Full(detail) => BuildError::OutOfSpace {
                    step: label,
                    source: Box::new(run.engine.store.out_of_space(free_before, detail)),
                },
                other => other,
            })?;
            run.lease.record_action(&key, &result).map_err(store)?;
            run.engine.l1.insert(key, result.clone());
            if run.spec.background {
                run.engine.prebuilt.insert(key, Instant::now());
            }
            Ok(result)
        })
        .await
        .map_err(store)?
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
        work: &Work,
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
        let cwd = crate::context::dockerignore::clean(&parent.workdir());
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
            // A user waiting for the step before it started makes it theirs.
            background: self.spec.background && !work.is_foreground(),
        };
        let tail = Mutex::new(VecDeque::with_capacity(FAILURE_TAIL));
        let mut logs = |stream: LogStream, line: &[u8]| {
            let mut kept = tail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if kept.len() == FAILURE_TAIL {
                kept.pop_front();
            }
            kept.push_back(String::from_utf8_lossy(line).into_owned());
            work.log(stream, line);
        };
        let code = executor
            .run(&request, &mut logs, work.cancel_flag())
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
        origin: Origin<'_>,
        work: &Work,
    ) -> Result<ActionResult, BuildError> {
        let (from, tree) = match origin {
            Origin::Stage(state) => (Some(state), None),
            Origin::Context(tree) => (None, tree),
        };
        let parent_view = RootView::new(self.lower_dirs(parent)?);
        let chown = copy
            .chown
            .as_deref()
            .map(|spec| user::chown(spec, &parent_view))
            .transpose()
            .map_err(store)?;
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
        // `COPY <<EOF`: each heredoc is a 0644 file named after it (BuildKit's mkfile), copied
        // like any source; with other sources or several heredocs the destination is a
        // directory.
        let spec = if copy.sources.len() + copy.heredocs.len() > 1 && !spec.dest.ends_with('/') {
            CopySpec {
                dest: format!("{}/", spec.dest),
                ..spec
            }
        } else {
            spec
        };
        let mut plans = Vec::new();
        if !copy.sources.is_empty() || copy.heredocs.is_empty() {
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
            plans.push(copy::plan(&spec, source, &parent_view).map_err(store)?);
        }
        let _docs = if copy.heredocs.is_empty() {
            None
        } else {
            let dir = self.scratch("heredoc-")?;
            let cleanup = RemoveOnDrop(dir.clone());
            for doc in &copy.heredocs {
                let file = dir.join(&doc.name);
                std::fs::write(&file, &doc.body).map_err(store)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
                    .map_err(store)?;
            }
            let docs_spec = CopySpec {
                sources: copy.heredocs.iter().map(|d| d.name.clone()).collect(),
                ..spec.clone()
            };
            let view = RootView::new(vec![dir]);
            plans.push(
                copy::plan(&docs_spec, CopySource::Image(&view), &parent_view).map_err(store)?,
            );
            Some(cleanup)
        };
        if let [plan] = plans.as_slice()
            && copy.heredocs.is_empty()
            && let Some(chunks) = plan.chunks(self.engine.options.copy_chunk_bytes)
        {
            return self.chunked_copy(node, plan, &chunks, &spec, &parent_view, work);
        }
        self.new_layer("copy-", |staging| {
            for plan in &plans {
                plan.apply(&spec, &parent_view, staging, self.engine.as_root)
                    .map_err(store)?;
            }
            Ok(())
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
        work: &Work,
    ) -> Result<ActionResult, BuildError> {
        let base = self
            .keyed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&node)
            .map(KeyInputs::key_without_context)
            .ok_or_else(|| BuildError::Store("a chunked COPY without a key".into()))?;
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
        let summary = format!(
            "{} layer chunks: {} reused, {} written ({} MB)\n",
            chunks.len(),
            chunks.len() - missing.len(),
            missing.len(),
            rewritten.div_ceil(1 << 20)
        );
        work.log(LogStream::Stdout, summary.as_bytes());
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

    /// WORKDIR makes its directory as BuildKit's mkdir with parents does: directories the
    /// image has stay as they are; the new ones belong to the USER (by `--chown`'s rule).
    fn workdir_step(&self, dir: &str, parent: &State) -> Result<ActionResult, BuildError> {
        let path = state::absolute_workdir(&parent.workdir(), dir);
        let view = RootView::new(self.lower_dirs(parent)?);
        let resolved = view.resolve(Path::new(&path), true);
        if view.lookup(&resolved).is_some() {
            return Ok(ActionResult { layers: vec![] });
        }
        let owner = match parent.config.config.user.as_deref() {
            None | Some("") => (0, 0),
            Some(spec) => user::chown(spec, &view).map_err(store)?,
        };
        self.new_layer("workdir-", |staging| {
            copy::create_dirs(&resolved, owner, &view, staging, self.engine.as_root).map_err(store)
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
                content_id: layer.content_id,
            }],
        })
    }

    fn scratch(&self, prefix: &str) -> Result<PathBuf, BuildError> {
        self.engine.store.scratch(prefix).map_err(store)
    }
}

/// Where a COPY/ADD reads its sources.
enum Origin<'a> {
    /// `--from`: another stage or an image.
    Stage(&'a State),
    /// The build's snapshot of its context (`None` for heredocs alone).
    Context(Option<&'a crate::context::FileTree>),
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
