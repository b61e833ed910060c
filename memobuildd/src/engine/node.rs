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
use super::mounts::absent_paths;
use super::state::{self, DEFAULT_PATH, State};
use super::user;
use super::view::RootView;
use super::{BuildError, BuildSpec, Engine, Progress, Reporter, StepError};
use crate::cache::remote::RemoteTier;
use crate::cache::{Tier as _, Tiered};
use crate::caller::ReadCheck;
use crate::context::{Hash, IgnoreRules};
use crate::exec::{LogStream, Network, RunRequest};
use crate::frontend::{Command, FileCopy, InstructionKind, Run};
use crate::image::layer::{Layer, LayerOptions, write_layer};
use crate::plan::{BuildGraph, NodeIndex, NodeKind};
use crate::store::{ActionResult, Digest, LayerRecord, Lease, blocking};

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
    /// Where keys are looked up: L1 → L2 → L3 (`Engine::tiers`).
    pub(super) tiers: Tiered<ActionResult>,
    /// L3 for this build, which uploads what it executes (`None`: no remote, or off).
    pub(super) remote: Option<RemoteTier>,
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
    /// The content of each ADD URL as this build keyed it, by URL: the step places exactly it.
    pub(super) fetched: Mutex<HashMap<String, Digest>>,
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
                self.filesystem(node, parent, inputs.clone(), key_inputs)
                    .await
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
                    BuildError::Invariant("a context source without a fingerprint")
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
        if let Some(InstructionKind::Add(add)) = &self.graph.node(node).step {
            for url in add.sources.iter().filter(|s| add::is_url(s)) {
                let digest = self.url_content(url, add.checksum.as_deref()).await?;
                let mut hasher = blake3::Hasher::new();
                hasher.update(b"memobuild-add-url-v1\0");
                hasher.update(url.as_bytes());
                hasher.update(b"\0");
                hasher.update(digest.as_str().as_bytes());
                ids.push(Input {
                    id: *hasher.finalize().as_bytes(),
                    from_context: false,
                });
            }
        }
        let inputs = KeyInputs::of(&self.graph, node, &self.contexts[node.index()], parent, ids);
        self.keyed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node, inputs.clone());
        Ok(inputs)
    }

    /// What an ADD URL holds for this build: pinned by `--checksum` (no request), or
    /// revalidated against what it answered last (a conditional GET, or a download and a
    /// hash). Its digest goes into the step's key, so new content reruns the step and what
    /// follows; unchanged content keeps them cached.
    async fn url_content(&self, url: &str, checksum: Option<&str>) -> Result<Digest, BuildError> {
        let digest = match checksum {
            Some(checksum) => add::checksum_digest(checksum)?,
            None => {
                let engine = Arc::clone(&self.engine);
                let (cas, url) = (self.lease.cas(), url.to_owned());
                blocking(move || {
                    let known = engine
                        .urls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get(&url)
                        .cloned()
                        .filter(|known| cas.contains(&known.digest));
                    let fetched = add::revalidate(&cas, &url, known.as_ref())?;
                    engine
                        .urls
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(url, fetched.clone());
                    Ok::<_, BuildError>(fetched.digest)
                })
                .await?
            }
        };
        self.fetched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(url.to_owned(), digest.clone());
        Ok(digest)
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
                source: Box::new(err.into()),
            })
        })
        .await
        .map_err(BuildError::Task)??;
        self.engine.derived.insert(memo, id);
        Ok(id)
    }

    async fn filesystem(
        self: &Arc<Self>,
        node: NodeIndex,
        parent: State,
        inputs: HashMap<NodeIndex, Arc<State>>,
        key_inputs: KeyInputs,
    ) -> Result<State, BuildError> {
        let spec = self.graph.node(node);
        let id = node.index() as u32 + 1;
        let key = key_inputs.key();
        let step = spec
            .step
            .clone()
            .ok_or(BuildError::Invariant("a step without an instruction"))?;
        // `--no-cache` reads no tier, the remote one included.
        let cached = if self.spec.no_cache {
            None
        } else {
            self.find(key).await?
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
                        move |work| {
                            // The work outlives the build that started it: it is the
                            // engine's activity until it ends.
                            let busy = run.engine.activity.busy();
                            async move {
                                let _busy = busy;
                                run.execute(node, key, step, parent_for_step, inputs, work)
                                    .await
                            }
                        },
                    )
                    .await;
                let result = joined.outcome.map_err(unshare)?;
                if joined.started_here {
                    self.executed.fetch_add(1, Ordering::Relaxed);
                    if let Some(remote) = &self.remote {
                        // Queued, not waited for: the upload never delays the build.
                        remote.put(&key, &result).await.map_err(store)?;
                    }
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

    /// A hit from the tiers (a remote one already promoted into L2 with its blobs), checked
    /// as [`Self::usable`] checks it.
    async fn find(self: &Arc<Self>, key: Hash) -> Result<Option<ActionResult>, BuildError> {
        let found = self.tiers.find(&key).await.map_err(store)?;
        if let Some(found) = &found {
            tracing::debug!(tier = found.tier, key = %hex::encode(key), "cache hit");
        }
        let run = Arc::clone(self);
        Ok(blocking(move || run.usable(&key, found.map(|found| found.value))).await)
    }

    /// An L1 or L2 hit, for a chunk of a large COPY (chunks are shared through L3 as part of
    /// their step's result, not one by one). Blocking.
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
        Ok(self.usable(key, found))
    }

    /// `found` if its blobs are really there, held by this build's lease (a missing or
    /// damaged blob makes it a miss, and the record is dropped from L1 and L2). Blocking.
    fn usable(&self, key: &Hash, found: Option<ActionResult>) -> Option<ActionResult> {
        let engine = &self.engine;
        let usable = found.filter(|result| self.lease.claim(key, result));
        match &usable {
            Some(_) => engine.hits.fetch_add(1, Ordering::Relaxed),
            None => {
                engine.l1.remove(key);
                let _ = self.lease.forget_action(key);
                engine.misses.fetch_add(1, Ordering::Relaxed)
            }
        };
        usable
    }

    /// Runs a step as shared work (`flight`): stopped by `work`'s flag, logging to every
    /// build waiting for it, and recording its result under `key` when it succeeds.
    async fn execute(
        self: Arc<Self>,
        node: NodeIndex,
        key: Hash,
        step: InstructionKind,
        parent: State,
        inputs: HashMap<NodeIndex, Arc<State>>,
        work: Arc<Work>,
    ) -> Result<ActionResult, BuildError> {
        // `COPY --from`: the other input that is a stage or an image, not the context.
        let from = keys::other_inputs(&self.graph, node)
            .into_iter()
            .filter(|p| self.graph.node(*p).kind != NodeKind::ContextSource)
            .find_map(|p| inputs.get(&p).cloned());
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
                InstructionKind::Run(spec) => run.run_step(node, spec, &parent, &inputs, &work),
                InstructionKind::Copy(spec) | InstructionKind::Add(spec) => {
                    let is_add = matches!(step, InstructionKind::Add(_));
                    let origin = match from.as_deref() {
                        Some(state) => Origin::Stage(state),
                        None => Origin::Context(tree.as_deref()),
                    };
                    run.copy_step(node, spec, is_add, &parent, origin, &work)
                }
                InstructionKind::Workdir(dir) => run.workdir_step(dir, &parent),
                _ => Err(BuildError::Invariant(
                    "a metadata step executed as a filesystem step",
                )),
            };
            let result = outcome.map_err(|err| match err {
                BuildError::Failed(source) => BuildError::Step {
                    step: label,
                    source,
                },
                BuildError::Full(detail) => BuildError::OutOfSpace {
                    step: label,
                    source: Box::new(
                        run.engine
                            .store
                            .out_of_space(free_before, detail.to_string()),
                    ),
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
        .map_err(BuildError::Task)?
    }

    fn layer_options(&self) -> LayerOptions<'static> {
        LayerOptions {
            source_date_epoch: self.spec.source_date_epoch,
            ..LayerOptions::default()
        }
    }

    /// Unpacks `state`'s layers (once each) and returns their directories, topmost first.
    pub(super) fn lower_dirs(&self, state: &State) -> Result<Vec<PathBuf>, BuildError> {
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
        inputs: &HashMap<NodeIndex, Arc<State>>,
        work: &Work,
    ) -> Result<ActionResult, BuildError> {
        let executor = self
            .engine
            .executor
            .as_ref()
            .map_err(|why| BuildError::NoRuntime(Arc::clone(why)))?
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
        // Held until the step ends: a locked cache mount is this step's alone meanwhile,
        // secrets live in a tmpfs that goes with it.
        let mounts = self.step_mounts(node, run, &scratch, inputs, work)?;
        let targets = MOUNT_POINTS
            .iter()
            .map(|p| format!("/{p}"))
            .chain(mounts.mounts.iter().map(|m| m.target.clone()));
        let absent_mounts = absent_paths(&view, targets);
        // A secret's variable replaces one of the same name, as in BuildKit.
        for var in &mounts.env {
            let name = var.split('=').next().unwrap_or_default();
            env.retain(|e| e.split('=').next() != Some(name));
            env.push(var.clone());
        }
        let request = RunRequest {
            id: self.engine.next_run_id(),
            bundle: mounts.bundle.clone(),
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
            mounts: mounts.mounts.clone(),
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
                other => store(other),
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
        // The planner refused a --chmod that is not octal, at its Dockerfile line.
        let chmod = match copy.chmod.as_deref() {
            Some(text) => Some(
                u32::from_str_radix(text, 8)
                    .map_err(|_| BuildError::Invariant("--chmod checked by the planner"))?,
            ),
            None => None,
        };
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
            // An ADD of URLs alone reads nothing from the context.
            let no_context = crate::context::FileTree::default();
            let tree = tree.unwrap_or(&no_context);
            let readable = self.readable();
            let context = add::Context {
                dir: &self.spec.context,
                tree,
                excludes: &excludes,
                readable: readable.as_ref(),
            };
            let cas = self.lease.cas();
            let mut downloads = HashMap::new();
            for url in copy.sources.iter().filter(|s| add::is_url(s)) {
                let digest = self
                    .fetched
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(url)
                    .cloned()
                    .ok_or(BuildError::Invariant(
                        "an ADD URL without its content digest",
                    ))?;
                add::pinned(&cas, url, &digest)?;
                downloads.insert(url.clone(), cas.path(&digest));
            }
            return self.new_layer("add-", |staging| {
                let checksum = copy.checksum.as_deref();
                add::stage(
                    &spec,
                    checksum,
                    context,
                    &parent_view,
                    staging,
                    self.engine.as_root,
                    &downloads,
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
        let readable = self.readable();
        if !copy.sources.is_empty() || copy.heredocs.is_empty() {
            let from_view;
            let source = match (from, tree) {
                (Some(state), _) => {
                    from_view = RootView::new(self.lower_dirs(state)?);
                    CopySource::Image(&from_view, &excludes)
                }
                (None, Some(tree)) => CopySource::Context {
                    dir: &self.spec.context,
                    tree,
                    excludes: &excludes,
                    readable: readable.as_ref(),
                },
                (None, None) => return Err(BuildError::Invariant("a COPY without a source")),
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
                let writing = |source| {
                    store(StepError::Io {
                        what: "writing heredoc",
                        path: file.clone(),
                        source,
                    })
                };
                std::fs::write(&file, &doc.body).map_err(writing)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
                    .map_err(writing)?;
            }
            let docs_spec = CopySpec {
                sources: copy.heredocs.iter().map(|d| d.name.clone()).collect(),
                ..spec.clone()
            };
            let view = RootView::new(vec![dir]);
            plans.push(
                copy::plan(
                    &docs_spec,
                    CopySource::Image(&view, &IgnoreRules::default()),
                    &parent_view,
                )
                .map_err(store)?,
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

    /// What this build's caller may read of its context (nothing to check for root).
    pub(super) fn readable(&self) -> Option<ReadCheck<'_>> {
        let caller = self.spec.caller.as_ref()?;
        Some(ReadCheck::new(caller, &self.spec.context))
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
            .ok_or(BuildError::Invariant("a chunked COPY without a key"))?;
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

/// Drops what the runtime created only to mount over: the mount-point files and dirs of
/// `absent` (deepest first) that stayed empty.
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
}

/// An error of the store or of a step's writes; one that ran out of space says so.
pub(super) fn store(err: impl Into<StepError>) -> BuildError {
    BuildError::failed(err)
}

fn is_step(kind: NodeKind) -> bool {
    matches!(kind, NodeKind::BaseImage | NodeKind::Filesystem)
}

fn unshare(err: Arc<BuildError>) -> BuildError {
    Arc::try_unwrap(err).unwrap_or_else(|shared| match &*shared {
        BuildError::Cancelled => BuildError::Cancelled,
        _ => BuildError::Shared(shared),
    })
}
