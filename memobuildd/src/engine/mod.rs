//! The scheduler: a build request becomes a plan, every node gets a key, keys are looked up
//! in the cache, and only the nodes that miss are executed — independent stages in parallel.
//!
//! Flow of [`Engine::build`]: parse and plan the Dockerfile (`frontend`, `plan`), resolve and
//! pull base images (`registry`, remembering tag → digest for a TTL so a rebuild stays
//! offline), fingerprint context sources from the hot workspace (`watch`/`context`), compute
//! keys ([`keys`]), then run one task per node: a node waits for its parents, looks its key
//! up through the cache tiers (L1 memory → L2 store → L3 remote, `cache::Tiered`; a remote
//! hit brings its layers into the store), and on a miss executes — COPY/ADD/WORKDIR without a
//! container ([`copy`]), RUN in the OCI runtime over an overlay snapshot (`snapshot`, `exec`)
//! — records the layer, and queues its upload to L3 (background, never waited for). Metadata steps only change the config ([`state`]). The export node's
//! state becomes the image (`image`). Progress goes to a [`Reporter`]; only the client draws.
//!
//! Invariants: keys never include paths, roots, hostnames or times; a node whose key hits
//! is not executed; two builds that need the same key at once compute it once.

pub mod add;
pub mod copy;
pub mod explain;
mod flight;
pub mod keys;
mod mounts;
mod node;
mod priority;
mod remote;
pub mod state;
#[cfg(test)]
mod testutil;
pub mod user;
pub mod view;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{Instrument, info_span};

use crate::cache::L1;
use crate::cache::remote::{L3, RemoteMode};
use crate::caller::AccessError;
use crate::context::Hash;
use crate::exec::ExecError;
use crate::exec::{Executor, LogStream, Network};
use crate::frontend::{self, Diagnostic};
use crate::image::ImageParts;
use crate::image::oci::{ImageConfig, MediaTypes, Platform, manifest_json};
use crate::image::{Compression, ImageError};
use crate::layout::Layout;
use crate::plan::{self, BuildGraph, NodeIndex, NodeKind, PlanError, PlanOptions};
use crate::registry::{Reference, ReferenceError, Registry, RegistryError};
use crate::snapshot::Snapshotter;
use crate::store::{CasError, Lease, Store, StoreError, blocking};
use crate::watch::{Baseline, BuildSnapshot, Hub, SourceSet, WatchError};

pub use mounts::Secrets;
use state::State;

/// What happened to a node, as the client's progress display needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Queued {
        node: u32,
        name: String,
    },
    Cached {
        node: u32,
    },
    Started {
        node: u32,
    },
    /// Why a started step runs (`explain`).
    Reason {
        node: u32,
        reason: String,
    },
    Log {
        node: u32,
        stream: LogStream,
        line: Vec<u8>,
    },
    Done {
        node: u32,
        duration: Duration,
    },
    Failed {
        node: u32,
        message: String,
    },
    /// About the build, not one step (the remote cache failing, an entry ignored).
    Warning {
        message: String,
    },
    /// The step's result came from a prebuild, finished `ago` before this build needed it
    /// (`joined`: this build waited for the prebuild's running step).
    Prebuilt {
        node: u32,
        ago: Duration,
        joined: bool,
    },
}

/// Receives progress. The server forwards it to the client; tests collect it.
pub trait Reporter: Send + Sync {
    fn report(&self, event: Progress);
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Dockerfile(Box<Diagnostic>),
    #[error(transparent)]
    Plan(Box<PlanError>),
    #[error("base image {reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("base image {reference}: {source}")]
    BaseImage {
        reference: String,
        #[source]
        source: ImageError,
    },
    /// A step failed; `step` is its label (`COPY a /b`), with its Dockerfile line.
    #[error("{step}: {source}")]
    Step {
        step: String,
        #[source]
        source: Box<StepError>,
    },
    #[error("{step} failed: exit code {code}\n{tail}")]
    RunFailed {
        step: String,
        code: i32,
        tail: String,
    },
    #[error("RUN steps need {0}; this daemon can still build Dockerfiles without RUN")]
    NoRuntime(Arc<ExecError>),
    #[error("{0}")]
    Context(Box<WatchError>),
    /// The caller could not read a file the build reads.
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("build cancelled")]
    Cancelled,
    /// What a step's work failed with, before [`BuildError::Step`] names the step.
    #[error(transparent)]
    Failed(Box<StepError>),
    /// A write into the store ran out of space; a step's becomes [`BuildError::OutOfSpace`].
    #[error("no space left in the store: {0}")]
    Full(Box<StepError>),
    #[error("{step}: {source}")]
    OutOfSpace {
        step: String,
        #[source]
        source: Box<crate::store::OutOfSpace>,
    },
    /// A bug: something the planner guarantees was not so.
    #[error("internal error: {0}")]
    Invariant(&'static str),
    #[error("build task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The error of a step this build shared with others (`flight`).
    #[error(transparent)]
    Shared(Arc<BuildError>),
}

/// Why a step's work failed, by the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
    #[error(transparent)]
    Add(#[from] add::AddError),
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Ignore(#[from] crate::context::dockerignore::IgnoreError),
    #[error(transparent)]
    Mount(#[from] mounts::StepMountError),
    #[error(transparent)]
    Tier(#[from] crate::cache::TierError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<Diagnostic> for BuildError {
    fn from(diagnostic: Diagnostic) -> Self {
        Self::Dockerfile(Box::new(diagnostic))
    }
}

impl From<PlanError> for BuildError {
    fn from(err: PlanError) -> Self {
        Self::Plan(Box::new(err))
    }
}

impl BuildError {
    /// A step's failure; one that ran out of disk says so.
    pub(crate) fn failed(err: impl Into<StepError>) -> Self {
        let err = err.into();
        if crate::store::is_out_of_space(&err) {
            Self::Full(Box::new(err))
        } else {
            Self::Failed(Box::new(err))
        }
    }
}

/// `?` on what a step's work fails with.
macro_rules! step_failures {
    ($($source:ty),*) => {$(
        impl From<$source> for BuildError {
            fn from(err: $source) -> Self {
                Self::failed(err)
            }
        }
    )*};
}

step_failures!(
    copy::CopyError,
    add::AddError,
    user::UserError,
    ExecError,
    crate::snapshot::SnapshotError,
    StoreError,
    CasError,
    crate::context::dockerignore::IgnoreError
);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("no image {0} in the store (see `memobuild images`)")]
    NoSuchImage(String),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Registry(Box<RegistryError>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store: {0}")]
    Image(#[from] ImageError),
    #[error("push task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// How an export or a push sends an image: its layers' compression (`force`: also converting
/// layers already compressed otherwise, as buildx's `force-compression`) and the manifest's
/// media-type family.
#[derive(Debug, Clone, Copy)]
pub struct ImageForm {
    pub compression: Compression,
    pub force: bool,
    pub media: MediaTypes,
}

/// `image` (as stored: layers MemoBuild wrote are plain tars) in `form`: each layer's form
/// from the store (made once, then kept; several at a time), a manifest naming them.
/// Blocks: call it from a blocking thread.
pub fn image_as(
    lease: &Lease,
    image: &ImageParts,
    form: &ImageForm,
) -> Result<ImageParts, crate::store::StoreError> {
    use rayon::prelude::*;
    let layers = image
        .layers
        .par_iter()
        .map(|layer| lease.layer_as(layer, form.compression, form.force))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = lease
        .cas()
        .put(&manifest_json(form.media, &image.config, &layers))?;
    Ok(ImageParts {
        manifest,
        config: image.config.clone(),
        layers,
        media: form.media,
    })
}

/// Refuses a build whose COPY/ADD sources hold a path its caller could not read. Checked
/// before any cache look-up: a result cached by a build of someone who could read it is
/// never handed to someone who could not. Blocking.
fn caller_may_read(
    caller: &crate::caller::Caller,
    context: &std::path::Path,
    tree: &crate::context::FileTree,
    sources: &[SourceSet],
) -> Result<(), BuildError> {
    use crate::context::{IgnoreRules, SourcePattern};
    let check = crate::caller::ReadCheck::new(caller, context);
    for (patterns, excludes) in sources {
        // The hub compiled these already: a bad one failed the snapshot.
        let compiled: Vec<SourcePattern> = patterns
            .iter()
            .filter_map(|p| SourcePattern::new(p).ok())
            .collect();
        let rules = IgnoreRules::parse(&excludes.join("\n"), "--exclude").unwrap_or_default();
        for path in tree.read_paths(&compiled, &rules) {
            check.check(&context.join(path))?;
        }
    }
    Ok(())
}

/// `app` → `app:latest`, as Docker names images.
pub fn normalize_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// L1's size and the cache's hits and misses since the daemon started.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheUsage {
    pub l1_entries: u64,
    pub l1_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

/// A build request, paths resolved and the Dockerfile read by the caller.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    pub dockerfile_text: String,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub pull: bool,
    pub network: Network,
    pub source_date_epoch: Option<i64>,
    /// `--secret`s, for RUN steps to mount; never in a key, a layer or a log.
    pub secrets: Secrets,
    /// `--ssh` agents by id: sockets RUN steps mount.
    pub ssh: Vec<(String, PathBuf)>,
    /// This build's use of L3 (`None`: the daemon's mode); it can only narrow the daemon's.
    pub remote_cache: Option<RemoteMode>,
    /// Whom the build reads the context for; `None`: the daemon's own user or root.
    pub caller: Option<crate::caller::Caller>,
    /// A prebuild: its steps yield to users' (`priority`), its containers run at low CPU and
    /// I/O priority, and what it executes is remembered as prebuilt.
    pub background: bool,
}

/// A finished build: the image in the store, and what it took. Its lease keeps the image
/// from GC until the outputs are written and it is tagged.
#[derive(Debug, Clone)]
pub struct Built {
    pub lease: Lease,
    pub image: ImageParts,
    pub config: ImageConfig,
    pub steps: u64,
    pub cached: u64,
    pub executed: u64,
    pub duration: Duration,
    /// The context as this build read it: the workspace's baseline once the build is done.
    pub baseline: Option<Baseline>,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Filesystem steps executing at once (across stages and builds).
    pub max_parallel: usize,
    /// How long a tag → digest resolution is trusted without asking the registry.
    pub resolve_ttl: Duration,
    /// Memory for L1 (node key → result).
    pub l1_bytes: u64,
    /// Target size of the chunks a large COPY's layer is split into; 0: never split.
    pub copy_chunk_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_parallel: 2,
            resolve_ttl: Duration::from_secs(24 * 3600),
            l1_bytes: 16 << 20,
            copy_chunk_bytes: crate::config::DEFAULT_COPY_CHUNK_BYTES,
        }
    }
}

/// Remembered `COPY --from` file ids: 64 bytes each with moka's bookkeeping, a few MB.
const DERIVED_ENTRIES: u64 = 16_384;

pub struct Engine {
    layout: Layout,
    store: Store,
    l1: L1,
    /// The shared remote cache, when configured and not off.
    remote: Option<L3>,
    hits: AtomicU64,
    misses: AtomicU64,
    snapshotter: Arc<dyn Snapshotter>,
    /// `Err(why)` when this daemon cannot run containers.
    executor: Result<Arc<dyn Executor>, Arc<ExecError>>,
    registry: Registry,
    hub: Arc<Hub>,
    platform: Platform,
    options: EngineOptions,
    permits: priority::StepPermits,
    /// Steps prebuilds executed, and when they finished: a user's build that finds one says
    /// so. Bounded like `derived`.
    prebuilt: moka::sync::Cache<Hash, Instant>,
    /// What `COPY --from` copies, by source state and sources (`node::copied_files_id`).
    derived: moka::sync::Cache<Hash, Hash>,
    /// The last build of each target, for "why did this step run".
    history: explain::History,
    /// Steps being computed right now, so concurrent builds share the work.
    flights: flight::Flights,
    /// Images exported by this daemon, by content without timestamps: a rebuild that
    /// changes nothing hands back the same image instead of writing a new one
    /// (docker/buildx#107 is what happens otherwise).
    exported: Mutex<HashMap<Hash, ImageParts>>,
    run_ids: AtomicU64,
    as_root: bool,
    /// Repositories this daemon pulled from or pushed to, by registry: candidates for
    /// cross-repository blob mounts, so a shared base layer is not uploaded again.
    known_repos: Mutex<HashMap<String, Vec<String>>>,
    activity: Activity,
    /// What each ADD URL answered last, for the next build's conditional request.
    urls: Mutex<HashMap<String, add::Fetched>>,
}

/// What the engine is doing, so that a shutdown can stop all of it and wait for its end.
#[derive(Debug)]
struct Activity {
    /// Set by [`Engine::stop_builds`]: a build starting from then on is cancelled at once.
    stopping: AtomicBool,
    /// The cancel flags of the builds running now.
    builds: Mutex<Vec<std::sync::Weak<AtomicBool>>>,
    /// Builds and shared steps that have not ended (their blocking work included).
    busy: tokio::sync::watch::Sender<usize>,
}

/// Counts as busy while it lives.
struct Busy(tokio::sync::watch::Sender<usize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Activity {
    fn busy(&self) -> Busy {
        self.busy.send_modify(|n| *n += 1);
        Busy(self.busy.clone())
    }

    /// A build starts: it is listed for [`Engine::stop_builds`] (and cancelled right away
    /// if that already happened).
    fn build(&self, cancel: &Arc<AtomicBool>) -> Busy {
        let busy = self.busy();
        let mut builds = self
            .builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        builds.retain(|flag| flag.strong_count() > 0);
        builds.push(Arc::downgrade(cancel));
        if self.stopping.load(Ordering::SeqCst) {
            cancel.store(true, Ordering::SeqCst);
        }
        busy
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("root", &self.layout.root())
            .finish_non_exhaustive()
    }
}

/// The parts an engine is made of; the daemon passes real ones, tests may pass fakes.
#[derive(Debug)]
pub struct EngineParts {
    pub layout: Layout,
    pub store: Store,
    pub snapshotter: Arc<dyn Snapshotter>,
    pub executor: Result<Arc<dyn Executor>, Arc<ExecError>>,
    pub registry: Registry,
    pub hub: Arc<Hub>,
    pub options: EngineOptions,
    pub remote: Option<L3>,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Self {
        Self {
            permits: priority::StepPermits::new(parts.options.max_parallel),
            prebuilt: moka::sync::Cache::new(DERIVED_ENTRIES),
            layout: parts.layout,
            store: parts.store,
            l1: L1::new(parts.options.l1_bytes),
            remote: parts.remote,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            snapshotter: parts.snapshotter,
            executor: parts.executor,
            registry: parts.registry,
            hub: parts.hub,
            platform: Platform::host(),
            options: parts.options,
            derived: moka::sync::Cache::new(DERIVED_ENTRIES),
            history: explain::History::default(),
            flights: flight::Flights::default(),
            exported: Mutex::new(HashMap::new()),
            run_ids: AtomicU64::new(0),
            as_root: crate::passwd::effective_uid() == 0,
            known_repos: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
            activity: Activity {
                stopping: AtomicBool::new(false),
                builds: Mutex::new(Vec::new()),
                busy: tokio::sync::watch::Sender::new(0),
            },
        }
    }

    /// Cancels every running build, and every build that starts from now on: their
    /// containers are killed, mounts and scratch directories removed. [`Engine::idle`] says
    /// when that is done.
    pub fn stop_builds(&self) {
        self.activity.stopping.store(true, Ordering::SeqCst);
        let builds = self
            .activity
            .builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for flag in builds.iter().filter_map(std::sync::Weak::upgrade) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Waits until no build and no shared step is running, blocking work included.
    pub async fn idle(&self) {
        let mut busy = self.activity.busy.subscribe();
        let _ = busy.wait_for(|n| *n == 0).await;
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The remote cache tier, if this daemon has one.
    pub fn remote(&self) -> Option<&L3> {
        self.remote.as_ref()
    }

    /// Pushes the stored image `name` to `destination` (default: its own name), its layers in
    /// `compression` (a base image's layers keep theirs unless `force_compression`).
    pub async fn push(
        &self,
        name: &str,
        destination: Option<&str>,
        compression: Compression,
        force_compression: bool,
        progress: &(dyn Fn(crate::registry::PushEvent) + Send + Sync),
    ) -> Result<crate::registry::PushReport, PushError> {
        let stored = normalize_tag(name);
        let target = Reference::parse(destination.unwrap_or(&stored))?;
        // The push holds what it uploads: an `rmi` and a GC meanwhile take nothing from it.
        let lease = self.store.lease();
        // The image as pushed: its layers compressed (once per layer and form, then kept).
        let image = {
            let (store, lease) = (self.store.clone(), lease.clone());
            blocking(move || {
                let record = store
                    .images()?
                    .into_iter()
                    .find(|image| image.name == stored)
                    .ok_or_else(|| PushError::NoSuchImage(stored.clone()))?;
                let parts = ImageParts::read(&lease.cas(), &record.manifest)?;
                let form = ImageForm {
                    compression,
                    force: force_compression,
                    media: MediaTypes::Oci,
                };
                Ok::<_, PushError>(image_as(&lease, &parts, &form)?)
            })
            .await?
        };
        let manifest_bytes = {
            let lease = lease.clone();
            let digest = image.manifest.digest.clone();
            blocking(move || lease.cas().read(&digest))
                .await
                .map_err(StoreError::from)?
        };
        let mount_from = self
            .known_repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(target.registry())
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|repo| repo != target.repository())
            .collect();
        let image = crate::registry::PushImage {
            manifest_bytes,
            manifest_media_type: MediaTypes::Oci.manifest().to_owned(),
            config: image.config,
            layers: image.layers.into_iter().map(|l| l.blob).collect(),
            mount_from,
        };
        let report = self
            .registry
            .push(&lease.cas(), &image, &target, progress)
            .await
            .map_err(|e| PushError::Registry(Box::new(e)))?;
        self.remember_repository(&target);
        Ok(report)
    }

    fn remember_repository(&self, reference: &Reference) {
        let mut known = self
            .known_repos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let repos = known.entry(reference.registry().to_owned()).or_default();
        if !repos.iter().any(|r| r == reference.repository()) {
            repos.push(reference.repository().to_owned());
        }
    }

    /// What L1 holds and how the cache served (the store's own figures: [`Store::stats`]).
    pub fn cache_usage(&self) -> CacheUsage {
        let (l1_entries, l1_bytes) = self.l1.usage();
        CacheUsage {
            l1_entries,
            l1_bytes,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Removes what a daemon killed mid-build left behind: mounts, containers, scratch
    /// directories. Called at start, before anything else uses the store.
    pub fn recover(&self) {
        let stale = crate::snapshot::unmount_all_under(self.layout.root());
        if !stale.is_empty() {
            tracing::warn!(
                mounts = stale.len(),
                "unmounted what a previous daemon left mounted"
            );
        }
        if let Ok(executor) = &self.executor {
            executor.clean_up();
        }
        self.store.clear_tmp();
    }

    /// Builds `spec`. Dropping the future, or setting `cancel`, stops it; containers, mounts
    /// and scratch directories are cleaned up either way.
    pub async fn build(
        self: &Arc<Self>,
        spec: BuildSpec,
        reporter: Arc<dyn Reporter>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Built, BuildError> {
        let started = Instant::now();
        let _busy = self.activity.build(&cancel);
        // Everything this build uses or makes is held until its outputs are written.
        let lease = self.store.lease();
        let dockerfile = frontend::parse(
            &spec.dockerfile_text,
            &spec.dockerfile.display().to_string(),
        )?;
        let options = PlanOptions {
            target: spec.target.clone(),
            build_args: spec.build_args.clone(),
        };
        // Plan once to learn the base images, fetch their configs, then plan with their ENV.
        let first = plan::lower(&dockerfile, &options)?;
        let bases = self.base_images(&first, spec.pull, &lease).await?;
        let graph = {
            let base_env = |image: &str, _platform: Option<&str>| -> plan::BaseInfo {
                let Some(base) = bases.get(image) else {
                    return plan::BaseInfo::default();
                };
                let config = &base.state.config.config;
                plan::BaseInfo {
                    env: config
                        .env
                        .iter()
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    on_build: config.on_build.clone(),
                }
            };
            Arc::new(plan::lower_with_base_env(&dockerfile, &options, &base_env)?)
        };
        let (fingerprints, snapshot) = match self.snapshot(&spec, &graph).await? {
            Some((fingerprints, snapshot)) => (fingerprints, Some(snapshot)),
            None => (HashMap::new(), None),
        };
        let target: explain::Target = (
            spec.context.clone(),
            spec.dockerfile.clone(),
            spec.target.clone(),
        );
        let (tiers, remote) = self.tiers(spec.remote_cache, &lease);
        let warnings = remote
            .as_ref()
            .map(|tier| remote::Warnings::start(tier.l3(), Arc::clone(&reporter)));
        let run = Arc::new(node::BuildRun {
            engine: Arc::clone(self),
            tiers,
            remote,
            contexts: keys::exec_contexts(&graph, &bases),
            fingerprints,
            keyed: Mutex::new(HashMap::new()),
            previous: self.history.last(&target),
            positions: explain::positions(&graph),
            spec,
            graph: Arc::clone(&graph),
            bases,
            context: snapshot.as_ref().map(|s| Arc::clone(&s.tree)),
            reporter,
            cancel,
            fetched: Mutex::new(HashMap::new()),
            lease: lease.clone(),
            created: state::timestamp(None),
            cached: AtomicU64::new(0),
            executed: AtomicU64::new(0),
        });
        let final_state = run.execute_all().await;
        if let Some(warnings) = warnings {
            warnings.finish().await;
        }
        let final_state = final_state?;
        self.history.record(target, run.step_inputs());
        let image = {
            let (engine, lease, state) = (Arc::clone(self), lease.clone(), final_state.clone());
            let epoch = run.spec.source_date_epoch;
            blocking(move || engine.export(&state, epoch, &lease)).await?
        };
        Ok(Built {
            lease,
            image,
            config: final_state.config.clone(),
            steps: run.step_count(),
            cached: run.cached.load(Ordering::Relaxed),
            executed: run.executed.load(Ordering::Relaxed),
            duration: started.elapsed(),
            baseline: snapshot.map(|s| s.baseline),
        })
    }

    /// Resolves and pulls every base image the plan names (once each).
    async fn base_images(
        &self,
        graph: &BuildGraph,
        pull: bool,
        lease: &Lease,
    ) -> Result<HashMap<String, keys::BaseImage>, BuildError> {
        let mut images: Vec<String> = graph.nodes().filter_map(|(_, n)| n.image.clone()).collect();
        images.sort();
        images.dedup();
        let mut bases = HashMap::new();
        for image in images {
            let base = self
                .base_image(&image, pull, lease)
                .instrument(info_span!("base_image", %image))
                .await?;
            bases.insert(image, base);
        }
        Ok(bases)
    }

    async fn base_image(
        &self,
        image: &str,
        pull: bool,
        lease: &Lease,
    ) -> Result<keys::BaseImage, BuildError> {
        let registry_err = |source| BuildError::Registry {
            reference: image.to_owned(),
            source: Box::new(source),
        };
        let reference = Reference::parse(image).map_err(|err| registry_err(err.into()))?;
        let platform = self.platform.to_string();
        let full = reference.to_string();
        // A digest pins the image; a tag resolved less than a TTL ago is trusted as is, so a
        // rebuild neither waits on nor needs the registry.
        let remembered = match reference.digest() {
            Some(digest) => Some(digest.clone()),
            None if pull => None,
            None => {
                let (store, full, platform) = (self.store.clone(), full.clone(), platform.clone());
                let ttl = self.options.resolve_ttl;
                blocking(move || store.resolution(&full, &platform, ttl)).await?
            }
        };
        let present = match &remembered {
            Some(digest) => {
                let (cas, digest) = (lease.cas(), digest.clone());
                blocking(move || cas.contains(&digest)).await
            }
            None => false,
        };
        let pinned = match remembered {
            Some(digest) if present => reference.with_digest(digest),
            _ => {
                let resolved = self
                    .registry
                    .resolve(&reference, &self.platform)
                    .await
                    .map_err(registry_err)?;
                let (store, digest) = (self.store.clone(), resolved.manifest_digest.clone());
                blocking(move || store.remember_resolution(&full, &platform, &digest)).await?;
                reference.with_digest(resolved.manifest_digest)
            }
        };
        self.remember_repository(&reference);
        let manifest_digest = pinned
            .digest()
            .cloned()
            .ok_or(BuildError::Invariant("a pinned reference has a digest"))?;
        let read_local = || {
            let (cas, digest) = (lease.cas(), manifest_digest.clone());
            blocking(move || keys::BaseImage::from_cas(&cas, &digest))
        };
        let base = match read_local().await {
            Ok(base) => base,
            Err(_) => {
                self.registry
                    .pull(&lease.cas(), &pinned, &self.platform)
                    .await
                    .map_err(registry_err)?;
                read_local().await.map_err(|source| BuildError::BaseImage {
                    reference: image.to_owned(),
                    source,
                })?
            }
        };
        // A base image is a GC root of its own (LRU), so an offline rebuild finds it.
        let (held, layers) = (lease.clone(), base.state.layers.clone());
        blocking(move || held.use_base(&manifest_digest, &layers)).await?;
        Ok(base)
    }

    /// The build's one snapshot of its context, from the workspace kept hot by the watcher
    /// (registered on first build), and from it the fingerprints of the context-source
    /// nodes. `None` when the Dockerfile reads nothing from the context.
    async fn snapshot(
        &self,
        spec: &BuildSpec,
        graph: &BuildGraph,
    ) -> Result<Option<(HashMap<NodeIndex, Hash>, BuildSnapshot)>, BuildError> {
        let (nodes, sources): (Vec<NodeIndex>, Vec<SourceSet>) = graph
            .toposort()
            .into_iter()
            .filter(|n| graph.node(*n).kind == NodeKind::ContextSource)
            .map(|n| {
                let node = graph.node(n);
                (n, (node.sources.clone(), node.excludes.clone()))
            })
            .unzip();
        if sources.is_empty() {
            return Ok(None);
        }
        let hub = Arc::clone(&self.hub);
        let (context, dockerfile) = (spec.context.clone(), spec.dockerfile.clone());
        let caller = spec.caller.clone();
        let snapshot = blocking(move || {
            let snapshot = hub
                .snapshot(&context, &dockerfile, &sources)
                .map_err(|source| BuildError::Context(Box::new(source)))?;
            if let Some(caller) = &caller {
                caller_may_read(caller, &context, &snapshot.tree, &sources)?;
            }
            Ok::<_, BuildError>(snapshot)
        })
        .await?;
        let fingerprints = nodes
            .into_iter()
            .zip(snapshot.fingerprints.iter().copied())
            .collect();
        Ok(Some((fingerprints, snapshot)))
    }

    /// Writes the config and manifest of `state` into the store (unless the same image, but
    /// for its timestamps, was exported before and is still whole there). Blocking.
    fn export(
        &self,
        state: &State,
        source_date_epoch: Option<i64>,
        lease: &Lease,
    ) -> Result<ImageParts, BuildError> {
        let content = {
            let mut timeless = state.config.clone();
            timeless.created = None;
            for history in &mut timeless.history {
                history.created = None;
            }
            let mut hasher = blake3::Hasher::new();
            hasher.update(&timeless.to_json());
            hasher.update(&source_date_epoch.unwrap_or(-1).to_le_bytes());
            *hasher.finalize().as_bytes()
        };
        let mut exported = self
            .exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cas = lease.cas();
        // The memo is checked against the store: its documents verified (they are small),
        // its layers present with their sizes. A damaged one is repaired, and written anew.
        if let Some(parts) = exported.get(&content)
            && cas.read(&parts.manifest.digest).is_ok()
            && cas.read(&parts.config.digest).is_ok()
            && parts
                .layers
                .iter()
                .all(|l| cas.size(&l.blob.digest) == Some(l.blob.size))
        {
            return Ok(parts.clone());
        }
        let mut config = state.config.clone();
        config.created = Some(state::timestamp(source_date_epoch));
        if source_date_epoch.is_some() {
            for history in &mut config.history {
                history.created = config.created.clone();
            }
        }
        let config_blob = cas.put(&config.to_json())?;
        let media = MediaTypes::Oci;
        let manifest = cas.put(&manifest_json(media, &config_blob, &state.layers))?;
        let parts = ImageParts {
            manifest,
            config: config_blob,
            layers: state.layers.clone(),
            media,
        };
        exported.insert(content, parts.clone());
        Ok(parts)
    }

    fn next_run_id(&self) -> String {
        format!(
            "mb-{}-{}",
            std::process::id(),
            self.run_ids.fetch_add(1, Ordering::Relaxed)
        )
    }
}
