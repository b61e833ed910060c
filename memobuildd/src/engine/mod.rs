//! The scheduler: a build request becomes a plan, every node gets a key, keys are looked up
//! in the cache, and only the nodes that miss are executed — independent stages in parallel.
//!
//! Flow of [`Engine::build`]: parse and plan the Dockerfile (`frontend`, `plan`), resolve and
//! pull base images (`registry`, remembering tag → digest for a TTL so a rebuild stays
//! offline), fingerprint context sources from the hot workspace (`watch`/`context`), compute
//! keys ([`keys`]), then run one task per node: a node waits for its parents, looks its key
//! up (L2 action cache), and on a miss executes — COPY/ADD/WORKDIR without a container
//! ([`copy`]), RUN in the OCI runtime over an overlay snapshot (`snapshot`, `exec`) — and
//! records the layer. Metadata steps only change the config ([`state`]). The export node's
//! state becomes the image (`image`). Progress goes to a [`Reporter`]; only the client draws.
//!
//! Invariants: keys never include paths, roots, hostnames or times; a node whose key hits
//! is not executed; two builds that need the same key at once compute it once.

pub mod add;
pub mod copy;
pub mod explain;
mod flight;
pub mod keys;
mod node;
mod priority;
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
use crate::context::Hash;
use crate::exec::{Executor, LogStream, Network};
use crate::frontend::{self, Diagnostic};
use crate::image::export::ImageParts;
use crate::image::oci::{ImageConfig, MediaTypes, Platform, manifest_json};
use crate::image::{Compression, ImageError};
use crate::layout::Layout;
use crate::plan::{self, BuildGraph, NodeIndex, NodeKind, PlanError, PlanOptions};
use crate::registry::{Reference, Registry, RegistryError};
use crate::snapshot::Snapshotter;
use crate::store::{Lease, Store, blocking};
use crate::watch::{Baseline, BuildSnapshot, Hub, SourceSet, WatchError};
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
    #[error("{step}: {message}")]
    Step { step: String, message: String },
    #[error("{step} failed: exit code {code}\n{tail}")]
    RunFailed {
        step: String,
        code: i32,
        tail: String,
    },
    #[error("RUN steps need {0}; this daemon can still build Dockerfiles without RUN")]
    NoRuntime(String),
    #[error("{0}")]
    Context(Box<WatchError>),
    #[error("build cancelled")]
    Cancelled,
    #[error("store: {0}")]
    Store(String),
    /// A write into the store ran out of space (the error as it came); a step's becomes
    /// [`BuildError::OutOfSpace`].
    #[error("no space left in the store: {0}")]
    Full(String),
    #[error("{step}: {source}")]
    OutOfSpace {
        step: String,
        #[source]
        source: Box<crate::store::OutOfSpace>,
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

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("no image {0} in the store (see `memobuild images`)")]
    NoSuchImage(String),
    #[error("{0}")]
    Reference(String),
    #[error(transparent)]
    Registry(Box<RegistryError>),
    #[error("store: {0}")]
    Store(String),
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
    hits: AtomicU64,
    misses: AtomicU64,
    snapshotter: Arc<dyn Snapshotter>,
    /// `Err(why)` when this daemon cannot run containers.
    executor: Result<Arc<dyn Executor>, String>,
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
    pub executor: Result<Arc<dyn Executor>, String>,
    pub registry: Registry,
    pub hub: Arc<Hub>,
    pub options: EngineOptions,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Self {
        Self {
            permits: priority::StepPermits::new(parts.options.max_parallel),
            prebuilt: moka::sync::Cache::new(DERIVED_ENTRIES),
            layout: parts.layout,
            store: parts.store,
            l1: L1::new(parts.options.l1_bytes),
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
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pushes the stored image `name` to `destination` (default: its own name).
    pub async fn push(
        &self,
        name: &str,
        destination: Option<&str>,
        compression: Compression,
        progress: &(dyn Fn(crate::registry::PushEvent) + Send + Sync),
    ) -> Result<crate::registry::PushReport, PushError> {
        let stored = normalize_tag(name);
        let target = Reference::parse(destination.unwrap_or(&stored))
            .map_err(|e| PushError::Reference(e.to_string()))?;
        // The push holds what it uploads: an `rmi` and a GC meanwhile take nothing from it.
        let lease = self.store.lease();
        // The image as pushed: its layers compressed (once per layer and form, then kept).
        let image = {
            let (store, lease) = (self.store.clone(), lease.clone());
            blocking(move || {
                let record = store
                    .images()
                    .map_err(|e| PushError::Store(e.to_string()))?
                    .into_iter()
                    .find(|image| image.name == stored)
                    .ok_or_else(|| PushError::NoSuchImage(stored.clone()))?;
                let parts = ImageParts::read(&lease.cas(), &record.manifest)
                    .map_err(|e| PushError::Store(e.to_string()))?;
                let form = ImageForm {
                    compression,
                    force: false,
                    media: MediaTypes::Oci,
                };
                image_as(&lease, &parts, &form).map_err(|e| PushError::Store(e.to_string()))
            })
            .await?
        };
        let manifest_bytes = {
            let lease = lease.clone();
            let digest = image.manifest.digest.clone();
            blocking(move || lease.cas().read(&digest))
                .await
                .map_err(|e| PushError::Store(e.to_string()))?
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
        let run = Arc::new(node::BuildRun {
            engine: Arc::clone(self),
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
            lease: lease.clone(),
            created: state::timestamp(None),
            cached: AtomicU64::new(0),
            executed: AtomicU64::new(0),
        });
        let final_state = run.execute_all().await?;
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
        let reference = Reference::parse(image).map_err(|err| BuildError::Step {
            step: format!("FROM {image}"),
            message: err.to_string(),
        })?;
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
                blocking(move || store.resolution(&full, &platform, ttl))
                    .await
                    .map_err(|e| BuildError::Store(e.to_string()))?
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
                blocking(move || store.remember_resolution(&full, &platform, &digest))
                    .await
                    .map_err(|e| BuildError::Store(e.to_string()))?;
                reference.with_digest(resolved.manifest_digest)
            }
        };
        self.remember_repository(&reference);
        let manifest_digest = pinned
            .digest()
            .cloned()
            .ok_or_else(|| BuildError::Store("a pinned reference has a digest".into()))?;
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
        blocking(move || held.use_base(&manifest_digest, &layers))
            .await
            .map_err(|e| BuildError::Store(e.to_string()))?;
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
        let context = spec.context.clone();
        let dockerfile = spec.dockerfile.clone();
        let snapshot =
            tokio::task::spawn_blocking(move || hub.snapshot(&context, &dockerfile, &sources))
                .await
                .map_err(|e| BuildError::Store(e.to_string()))?
                .map_err(|source| BuildError::Context(Box::new(source)))?;
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
        let store = |e: crate::store::CasError| BuildError::Store(e.to_string());
        let config_blob = cas.put(&config.to_json()).map_err(store)?;
        let media = MediaTypes::Oci;
        let manifest = cas
            .put(&manifest_json(media, &config_blob, &state.layers))
            .map_err(store)?;
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
