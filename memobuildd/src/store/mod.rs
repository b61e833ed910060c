//! The L2 store: everything on disk that builds produce and GC manages — blobs, the action
//! index, unpacked layers, image tags and tag resolutions — behind one type, [`Store`].
//!
//! ```text
//! <root>/
//!   cas-v1/sha256/ab/<hex>   blobs by digest: layers, configs, manifests (blobs)
//!   index-v1.sqlite          actions, tags, resolutions, base images, blob and layer rows (index)
//!   index-v1.sqlite.damaged  the last index found damaged, moved aside when it was rebuilt
//!   layers-v1/<id>/          unpacked layers by diff-id, the lowerdirs of RUN mounts (layers)
//!   cachemounts-v1/<id>/     RUN --mount=type=cache directories, kept across builds (cachemounts)
//!   tmp/                     blobs being written, step scratch, GC's trash; emptied at start
//! ```
//!
//! **Threads.** Every method of [`Store`], [`Lease`] and [`Cas`] blocks (SQLite, fsync,
//! hashing, file walks): async code calls them through [`blocking`] (tokio's blocking pool),
//! never inline. GC runs on the store's own thread (`memobuild-gc`), woken after builds,
//! at start, on a full disk and every [`GC_INTERVAL`]; a manual `memobuild gc` runs its pass
//! on a blocking thread, one pass at a time.
//!
//! **Invariants** (tests in `store::tests` and `tests/e2e/gc.rs`):
//! - everything the index names exists: rows go first, files after (a crash between the
//!   two leaves an orphan file, which the next pass removes); a file appears before its row;
//! - GC never removes a leased or tagged thing, or anything they refer to: a tag pins its
//!   manifest, config, layers (blobs and unpacked) and the actions its build used;
//! - a blob that fails verification is removed with every action that names it, so the
//!   step runs again instead of failing again (`Shared::damaged`);
//! - a damaged index is moved aside with an error in the log and rebuilt from the disk
//!   (tags salvaged where readable); the daemon starts anyway;
//! - the counters behind `cache stats` and `status` are kept as things come and go: no
//!   request walks the disk.
//!
//! Comes after `registry` (pulls write blobs here) and `image` (layers are written here);
//! `engine` and `server` use it; `snapshot` mounts its unpacked layers.

mod blobs;
mod cachemounts;
mod forms;
mod gc;
mod index;
mod layers;
mod lease;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

pub use blobs::{Blob, BlobWriter, Cas, CasError, Damaged, Digest, Verified};
pub use cachemounts::{CacheMount, CacheOwner, Sharing};
pub use gc::{GcOptions, GcRecord, GcReport, Trigger};
pub use index::{ActionKey, ActionResult, ImageRecord, IndexError, LayerRecord};
pub use layers::layer_id;
pub use lease::Lease;

use crate::image::layer::Layer;
use crate::layout::Layout;
use index::Index;

/// How often the GC thread looks whether anything expired or the store outgrew its budget.
pub const GC_INTERVAL: Duration = Duration::from_secs(600);
/// How long an automatic pass may run before it leaves the rest to the next one.
pub const DEFAULT_PASS_LIMIT: Duration = Duration::from_secs(10);
/// The budget's floor, as BuildKit's default: 10% of the filesystem, at least this.
pub const MIN_DEFAULT_KEEP_BYTES: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unpacking layer {digest}: {message}")]
    Unpack { digest: Digest, message: String },
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl StoreError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// Whether `err`, or an error under it, says the disk (or SQLite's file) is full.
pub fn is_out_of_space(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        if let Some(index) = err.downcast_ref::<IndexError>()
            && index.is_full()
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// A step that ran out of space in the store: what it is, and what the store did about it.
#[derive(Debug, thiserror::Error)]
#[error(
    "no space left in the store {root} ({free} free of {size} on its filesystem): the step \
     needed more than the {free_before} free when it started ({detail}); garbage collection \
     was started to make room — build again, or give the store more space"
)]
pub struct OutOfSpace {
    pub root: PathBuf,
    pub size: Bytes,
    pub free: Bytes,
    pub free_before: Bytes,
    pub detail: String,
}

/// A byte count that displays as `12.3 MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&memobuild_protocol::units::format_bytes(self.0))
    }
}

/// The store's policy.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The budget; `None`: 10% of the filesystem holding the root, at least 2 GiB.
    pub keep_bytes: Option<u64>,
    /// Things unused longer than this go at the next pass, budget or not.
    pub keep_duration: Option<Duration>,
    /// How long an automatic pass may run; what is left waits for the next one.
    pub pass_limit: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            keep_bytes: None,
            keep_duration: None,
            pass_limit: DEFAULT_PASS_LIMIT,
        }
    }
}

/// Counts and sizes, kept as things come and go.
#[derive(Debug, Default)]
struct Counters {
    blobs: AtomicU64,
    blob_bytes: AtomicU64,
    layers: AtomicU64,
    layer_bytes: AtomicU64,
    /// The directories holding blobs and layers.
    dir_bytes: AtomicU64,
    actions: AtomicU64,
    tags: AtomicU64,
}

/// What `cache stats` and `status` show.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub layers: u64,
    pub layer_bytes: u64,
    pub index_bytes: u64,
    /// Directories, and what GC removed that is still being unlinked.
    pub other_bytes: u64,
    pub actions: u64,
    pub tags: u64,
    pub leases: u64,
    /// `RUN --mount=type=cache` directories, and their bytes on disk.
    pub cache_mounts: u64,
    pub cache_mount_bytes: u64,
    /// Everything under the root that GC manages.
    pub total_bytes: u64,
    pub keep_bytes: u64,
    pub keep_duration: Option<Duration>,
    pub last_gc: Option<GcRecord>,
    pub gc_running: bool,
}

/// Uses of actions and base images not yet written to the index (batched: a hit from L1
/// must not cost a SQLite write).
#[derive(Debug, Default)]
struct Touched {
    actions: std::collections::HashSet<ActionKey>,
    bases: std::collections::HashSet<Digest>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// This, for the parts that hand out `Cas` handles (GC reads manifests through one).
    me: std::sync::Weak<Shared>,
    layout: Layout,
    index: Index,
    counters: Counters,
    leases: Mutex<lease::Leases>,
    /// Held (shared) by whatever adds a reference to the index — an action, a tag, a base —
    /// and (exclusive) by GC while it decides and removes, so nothing becomes referenced
    /// between GC's check and its removal.
    refs: RwLock<()>,
    /// Moves after every reference added (once committed), so GC knows when its snapshot
    /// of references is still complete.
    refs_epoch: AtomicU64,
    touched: Mutex<Touched>,
    cache_mounts: cachemounts::CacheMounts,
    keep_bytes: u64,
    keep_duration: Option<Duration>,
    pass_limit: Duration,
    gc: gc::Control,
    /// Serialises index repairs: failures seen while one runs are not repaired twice.
    repairing: Mutex<()>,
}

/// The L2 store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// Runs blocking store work off the async runtime's threads. A panic there is a bug and is
/// passed on.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()))
}

impl Store {
    /// Opens (or creates) the store under the root, repairing a damaged index, and starts
    /// its GC thread. Does not run a pass: [`Store::start_gc`] does, once the daemon is up.
    pub fn open(layout: &Layout, options: StoreOptions) -> Result<Self, StoreError> {
        for dir in [
            layout.cas_dir().join("sha256"),
            layout.layers_dir(),
            layout.tmp_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(StoreError::io("creating", &dir))?;
        }
        let (index, needs_reconcile, damaged) = match Index::open(&layout.index_db()) {
            Ok(opened) => (opened.index, opened.needs_reconcile, None),
            Err(err) if err.is_corrupt() => {
                tracing::error!(
                    index = %layout.index_db().display(),
                    %err,
                    "THE STORE'S INDEX IS DAMAGED: moving it aside and rebuilding it from the disk; \
                     tags are salvaged where readable, the other cached steps will run again"
                );
                let aside = move_aside(&layout.index_db());
                let opened = Index::open(&layout.index_db())?;
                (opened.index, true, Some(aside))
            }
            Err(err) => return Err(err.into()),
        };
        let cache_mounts = cachemounts::CacheMounts::load(&layout.cache_mounts_dir())?;
        let keep_bytes = options
            .keep_bytes
            .unwrap_or_else(|| default_keep_bytes(layout.root()));
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            layout: layout.clone(),
            index,
            counters: Counters::default(),
            leases: Mutex::new(lease::Leases::default()),
            refs: RwLock::new(()),
            refs_epoch: AtomicU64::new(0),
            touched: Mutex::new(Touched::default()),
            cache_mounts,
            keep_bytes,
            keep_duration: options.keep_duration,
            pass_limit: options.pass_limit,
            gc: gc::Control::default(),
            repairing: Mutex::new(()),
        });
        if let Some(aside) = &damaged {
            let tags = shared
                .index
                .salvage_from(aside, |digest| shared.blob_path(digest).is_file());
            tracing::warn!(tags, "salvaged tags from the damaged index");
        }
        let loaded = if needs_reconcile {
            shared.reconcile().and_then(|()| shared.load_counters())
        } else {
            shared.load_counters()
        };
        match loaded {
            Ok(()) => {}
            // Pages past the schema are damaged: found here rather than by the first build.
            Err(StoreError::Index(err)) if err.is_corrupt() => shared.repair_index(&err),
            Err(err) => return Err(err),
        }
        gc::spawn_thread(&shared);
        Ok(Self { shared })
    }

    /// A new lease, for one build, push or export.
    pub fn lease(&self) -> Lease {
        Lease::new(Arc::clone(&self.shared))
    }

    /// The blob store without a lease: for reads nothing else depends on, and tests.
    /// (A blob written through it is unprotected until something refers to it.)
    pub fn cas(&self) -> Cas {
        Cas {
            shared: Arc::clone(&self.shared),
            lease: None,
        }
    }

    pub fn root(&self) -> &Path {
        self.shared.layout.root()
    }

    /// Where unpacked layers live (`snapshot` mounts them from here by [`layer_id`]).
    pub fn layers_dir(&self) -> PathBuf {
        self.shared.layout.layers_dir()
    }

    /// Where scratch files live (the store's filesystem, so renames into it are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.shared.layout.tmp_dir()
    }

    /// A fresh scratch directory under `tmp/`.
    pub fn scratch(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        self.shared.scratch(prefix)
    }

    /// Empties `tmp/`: what a killed daemon was writing. Called at start, before any build.
    pub fn clear_tmp(&self) {
        self.shared.clear_tmp();
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.shared.ix(|index| index.images())
    }

    /// Tags an image built under `lease`; the tag pins what that build used.
    pub fn tag(&self, lease: &Lease, image: &ImageRecord) -> Result<(), StoreError> {
        let _refs = self
            .shared
            .refs
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let new = self.shared.ix(|index| index.tag(image, &lease.actions()))?;
        self.shared.refs_epoch.fetch_add(1, Ordering::Release);
        if new {
            self.shared.counters.tags.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes a tag; `false` when there was none. Its blobs are left to GC.
    pub fn untag(&self, name: &str) -> Result<bool, StoreError> {
        let removed = self.shared.ix(|index| index.untag(name))?;
        if removed {
            self.shared.counters.tags.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// The remembered digest of `reference` for `platform`, if resolved less than `ttl` ago.
    pub fn resolution(
        &self,
        reference: &str,
        platform: &str,
        ttl: Duration,
    ) -> Result<Option<Digest>, StoreError> {
        self.shared
            .ix(|index| index.resolution(reference, platform, ttl))
    }

    pub fn remember_resolution(
        &self,
        reference: &str,
        platform: &str,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        self.shared
            .ix(|index| index.remember_resolution(reference, platform, digest))
    }

    /// Counts and sizes, from memory (and three `stat`s of the index files).
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let index_bytes = self.shared.index_bytes();
        let (blob_bytes, layer_bytes, other_bytes) = (
            load(&c.blob_bytes),
            load(&c.layer_bytes),
            load(&c.dir_bytes),
        );
        let (cache_mounts, cache_mount_bytes) = self.shared.cache_mounts.totals();
        StoreStats {
            blobs: load(&c.blobs),
            blob_bytes,
            layers: load(&c.layers),
            layer_bytes,
            index_bytes,
            other_bytes,
            actions: load(&c.actions),
            tags: load(&c.tags),
            leases: self
                .shared
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .count() as u64,
            cache_mounts,
            cache_mount_bytes,
            total_bytes: blob_bytes + layer_bytes + index_bytes + other_bytes + cache_mount_bytes,
            keep_bytes: self.shared.keep_bytes,
            keep_duration: self.shared.keep_duration,
            last_gc: self.shared.gc.last(),
            gc_running: self.shared.gc.running(),
        }
    }

    /// The configured policy as pass options (for a manual `memobuild gc` to adjust).
    pub fn policy(&self) -> GcOptions {
        GcOptions {
            keep_bytes: self.shared.keep_bytes,
            keep_duration: self.shared.keep_duration,
            all: false,
            cache_mounts_only: false,
            dry_run: false,
            time_limit: None,
        }
    }

    /// Takes cache mount `id` for one RUN step (see [`CacheMount`]); `Ok(None)`: `cancel`
    /// was set while a locked mount was busy.
    pub fn cache_mount(
        &self,
        id: &str,
        sharing: Sharing,
        owner: CacheOwner,
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<CacheMount>, StoreError> {
        self.shared.cache_mount(id, sharing, owner, cancel)
    }

    /// Runs one GC pass now, on this thread (after any pass already running).
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport, StoreError> {
        gc::pass(&self.shared, options, Trigger::Manual)
    }

    /// Asks the GC thread for a pass if the store is over its budget (after a build).
    pub fn check_budget(&self) {
        if self.shared.total_bytes() > self.shared.keep_bytes {
            self.shared.gc.wake(Trigger::OverBudget);
        }
    }

    /// Asks the GC thread for the pass every daemon start gets: orphans of a crash go, and
    /// the store is brought within its budget.
    pub fn start_gc(&self) {
        self.shared.gc.wake(Trigger::Start);
    }

    /// Free bytes on the store's filesystem.
    pub fn free_space(&self) -> u64 {
        filesystem(self.root()).map_or(0, |fs| fs.free)
    }

    /// Explains a step that ran out of space and starts a pass that makes room: the
    /// filesystem back to at least a tenth free, and twice what the step had when it
    /// started.
    pub fn out_of_space(&self, free_before: u64, detail: String) -> OutOfSpace {
        let fs = filesystem(self.root()).unwrap_or_default();
        let wanted = (fs.size / 10).max(free_before.saturating_mul(2));
        tracing::warn!(
            root = %self.root().display(),
            free = fs.free,
            wanted,
            "the store's filesystem is full; collecting garbage"
        );
        self.shared.gc.wake(Trigger::OutOfSpace { wanted });
        OutOfSpace {
            root: self.root().to_owned(),
            size: Bytes(fs.size),
            free: Bytes(fs.free),
            free_before: Bytes(free_before),
            detail,
        }
    }

    /// Audits the store without changing it: every blob file hashes to its name, and
    /// everything the index names is there.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        let snapshot = self.shared.ix(|index| index.snapshot())?;
        let mut found = Verification::default();
        for (digest, path) in gc::blob_files(&self.shared.layout) {
            found.blobs_checked += 1;
            if hash_file(&path).is_none_or(|actual| actual != digest) {
                found.corrupt.push(digest);
            }
        }
        let named_blobs = snapshot
            .blobs
            .keys()
            .chain(snapshot.action_layers.values().flatten().map(|(d, _)| d))
            .chain(snapshot.tags.iter().map(|t| &t.manifest.digest));
        for digest in named_blobs {
            if !self.shared.blob_path(digest).is_file() {
                found.missing.push(format!("blob {digest}"));
            }
        }
        for diff_id in snapshot.unpacked.keys() {
            if !self.shared.layer_path(diff_id).is_dir() {
                found.missing.push(format!("unpacked layer {diff_id}"));
            }
        }
        found.missing.sort();
        found.missing.dedup();
        Ok(found)
    }
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    pub blobs_checked: u64,
    /// Blob files whose content hashes to another digest than their name.
    pub corrupt: Vec<Digest>,
    /// Blobs and layers the index names that are not on disk.
    pub missing: Vec<String>,
}

fn hash_file(path: &Path) -> Option<Digest> {
    use sha2::Digest as _;
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).ok()? {
            0 => return Some(Digest::from_hasher(hasher)),
            n => hasher.update(&buf[..n]),
        }
    }
}

impl Shared {
    fn arc(&self) -> Arc<Shared> {
        // `me` only fails to upgrade while the last handle is being dropped, and nothing
        // runs store work then.
        self.me
            .upgrade()
            .unwrap_or_else(|| unreachable!("store used while dropped"))
    }

    /// Everything under the root that GC manages, in bytes on disk.
    fn total_bytes(&self) -> u64 {
        let c = &self.counters;
        c.blob_bytes.load(Ordering::Relaxed)
            + c.layer_bytes.load(Ordering::Relaxed)
            + c.dir_bytes.load(Ordering::Relaxed)
            + self.gc.trash_bytes()
            + self.index_bytes()
            + self.cache_mounts.totals().1
    }

    fn use_base(&self, manifest: &Digest) -> Result<(), StoreError> {
        let _refs = self.refs.read().unwrap_or_else(PoisonError::into_inner);
        self.ix(|index| index.touch(&[], std::slice::from_ref(manifest)))?;
        self.refs_epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Runs an index call; a damaged index found on the way is rebuilt before the error is
    /// returned, so the next call works (the error names the index, for whoever reports it).
    fn ix<T>(&self, call: impl FnOnce(&Index) -> Result<T, IndexError>) -> Result<T, StoreError> {
        match call(&self.index) {
            Ok(value) => Ok(value),
            Err(err) if err.is_corrupt() => {
                self.repair_index(&err);
                Err(err.into())
            }
            Err(err) => Err(err.into()),
        }
    }

    fn repair_index(&self, err: &IndexError) {
        // Not under `refs`: the failing call may hold it (recording an action, a GC pass).
        let Ok(_one) = self.repairing.try_lock() else {
            return;
        };
        tracing::error!(
            index = %self.index.path().display(),
            %err,
            "THE STORE'S INDEX IS DAMAGED: moving it aside and rebuilding it from the disk; \
             tags are salvaged where readable, the other cached steps will run again"
        );
        let outcome = self.index.replace_damaged().map(|aside| {
            let tags = self
                .index
                .salvage_from(&aside, |digest| self.blob_path(digest).is_file());
            tracing::warn!(tags, aside = %aside.display(), "salvaged tags from the damaged index");
        });
        let rebuilt = outcome
            .map_err(StoreError::from)
            .and_then(|()| self.reconcile())
            .and_then(|()| self.load_counters());
        if let Err(err) = rebuilt {
            tracing::error!(%err, "rebuilding the index failed");
        }
    }

    fn load_counters(&self) -> Result<(), StoreError> {
        let totals = self.index.totals()?;
        let c = &self.counters;
        c.blobs.store(totals.blobs, Ordering::Relaxed);
        c.blob_bytes.store(totals.blob_bytes, Ordering::Relaxed);
        c.layers.store(totals.layers, Ordering::Relaxed);
        c.layer_bytes.store(totals.layer_bytes, Ordering::Relaxed);
        c.actions.store(totals.actions, Ordering::Relaxed);
        c.tags.store(totals.tags, Ordering::Relaxed);
        c.dir_bytes.store(self.dir_bytes(), Ordering::Relaxed);
        Ok(())
    }

    /// The directories that hold blobs and layers (the shards at most 256).
    fn dir_bytes(&self) -> u64 {
        let size = |path: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
        };
        let sha = self.layout.cas_dir().join("sha256");
        let shards: u64 = std::fs::read_dir(&sha)
            .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
            .unwrap_or(0);
        shards + size(&sha) + size(&self.layout.cas_dir()) + size(&self.layout.layers_dir())
    }

    fn index_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let db = self.layout.index_db();
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Makes the index agree with the disk: a row for every blob and unpacked layer there,
    /// none for what is not. After a schema upgrade and an index rebuild.
    fn reconcile(&self) -> Result<(), StoreError> {
        let snapshot = self.index.snapshot()?;
        let mut gone_blobs = Vec::new();
        for digest in snapshot.blobs.keys() {
            if !self.blob_path(digest).is_file() {
                gone_blobs.push(digest.clone());
            }
        }
        self.index.remove_blobs(&gone_blobs)?;
        for (digest, path) in gc::blob_files(&self.layout) {
            use std::os::unix::fs::MetadataExt;
            if let Ok(meta) = std::fs::metadata(&path) {
                self.index
                    .insert_blob(&digest, meta.len(), meta.blocks() * 512)?;
            }
        }
        let mut gone_layers = Vec::new();
        for diff_id in snapshot.unpacked.keys() {
            if !self.layer_path(diff_id).is_dir() {
                gone_layers.push(diff_id.clone());
            }
        }
        self.index.remove_unpacked(&gone_layers)?;
        // Unpacked layers are named by a prefix of their diff-id: the full one comes from
        // the actions and images that name it; a directory nothing names is left for GC.
        let known: std::collections::HashMap<String, Digest> = snapshot
            .action_layers
            .values()
            .flatten()
            .map(|(_, diff_id)| (layer_id(diff_id), diff_id.clone()))
            .chain(
                gc::image_layers(self, &snapshot)
                    .into_iter()
                    .map(|diff_id| (layer_id(&diff_id), diff_id)),
            )
            .collect();
        for entry in std::fs::read_dir(self.layout.layers_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(diff_id) = known.get(&name)
                && !snapshot.unpacked.contains_key(diff_id)
            {
                self.index
                    .insert_unpacked(diff_id, layers::disk_usage(&entry.path()))?;
            }
        }
        Ok(())
    }

    fn record_blob(&self, digest: &Digest, size: u64, disk: u64) -> Result<(), CasError> {
        let inserted = match self.ix(|index| index.insert_blob(digest, size, disk)) {
            Ok(inserted) => inserted,
            Err(StoreError::Index(err)) => return Err(err.into()),
            Err(_) => false,
        };
        if inserted {
            self.counters.blobs.fetch_add(1, Ordering::Relaxed);
            self.counters.blob_bytes.fetch_add(disk, Ordering::Relaxed);
        }
        Ok(())
    }

    fn record_layer(&self, diff_id: &Digest, dir: &Path) -> Result<(), StoreError> {
        let disk = layers::disk_usage(dir);
        if self.ix(|index| index.insert_unpacked(diff_id, disk))? {
            self.counters.layers.fetch_add(1, Ordering::Relaxed);
            self.counters.layer_bytes.fetch_add(disk, Ordering::Relaxed);
        }
        Ok(())
    }

    fn record_action(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        let _refs = self.refs.read().unwrap_or_else(PoisonError::into_inner);
        let new = self.ix(|index| index.record_action(key, result))?;
        self.refs_epoch.fetch_add(1, Ordering::Release);
        if new {
            self.counters.actions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn forget_actions(&self, keys: &[ActionKey]) -> Result<(), StoreError> {
        let removed = self.ix(|index| index.forget_actions(keys))?;
        self.counters.actions.fetch_sub(removed, Ordering::Relaxed);
        Ok(())
    }

    /// A blob failed verification: it goes, and so does every action that names it, so the
    /// steps that made it run again instead of failing again. Never fails: a repair that
    /// cannot finish leaves a miss, which is safe.
    fn damaged(&self, digest: &Digest, found_by: Option<&Lease>) {
        tracing::warn!(
            %digest,
            "blob failed verification: removing it and every cached step that names it"
        );
        if let Some(lease) = found_by {
            lease.mark_damaged();
        }
        if let Ok(keys) = self.ix(|index| index.actions_naming(digest)) {
            let _ = self.forget_actions(&keys);
        }
        if let Ok((rows, bytes)) = self.ix(|index| index.remove_blobs(std::slice::from_ref(digest)))
        {
            self.counters.blobs.fetch_sub(rows, Ordering::Relaxed);
            self.counters.blob_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(self.blob_path(digest));
    }

    /// Actions and base images a released lease used: written at the next pass.
    fn used(
        &self,
        actions: impl IntoIterator<Item = ActionKey>,
        bases: impl IntoIterator<Item = Digest>,
    ) {
        let mut touched = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
        touched.actions.extend(actions);
        touched.bases.extend(bases);
    }

    fn flush_touched(&self) -> Result<(), StoreError> {
        let touched =
            std::mem::take(&mut *self.touched.lock().unwrap_or_else(PoisonError::into_inner));
        let actions: Vec<ActionKey> = touched.actions.into_iter().collect();
        let bases: Vec<Digest> = touched.bases.into_iter().collect();
        self.ix(|index| index.touch(&actions, &bases))
    }
}

impl From<&LayerRecord> for Layer {
    fn from(record: &LayerRecord) -> Self {
        Self {
            blob: record.blob.clone(),
            diff_id: record.diff_id.clone(),
            media_type: record.media_type.clone(),
            content_id: record.content_id,
        }
    }
}

/// Renames a damaged index (and its WAL) aside, replacing an older one.
fn move_aside(db: &Path) -> PathBuf {
    let aside = db.with_extension("sqlite.damaged");
    for suffix in ["", "-wal", "-shm"] {
        let to = PathBuf::from(format!("{}{suffix}", aside.display()));
        let _ = std::fs::remove_file(&to);
        let _ = std::fs::rename(format!("{}{suffix}", db.display()), &to);
    }
    aside
}

#[derive(Debug, Default, Clone, Copy)]
struct Filesystem {
    size: u64,
    free: u64,
}

fn filesystem(path: &Path) -> Option<Filesystem> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid out-pointer for statvfs.
    #[expect(unsafe_code, reason = "statvfs has no safe std wrapper")]
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    #[expect(unsafe_code, reason = "reading what statvfs wrote")]
    let stat = unsafe { stat.assume_init() };
    let unit = stat.f_frsize;
    Some(Filesystem {
        size: stat.f_blocks * unit,
        free: stat.f_bavail * unit,
    })
}

/// 10% of the filesystem holding `root`, at least [`MIN_DEFAULT_KEEP_BYTES`] (BuildKit's rule).
pub fn default_keep_bytes(root: &Path) -> u64 {
    filesystem(root).map_or(MIN_DEFAULT_KEEP_BYTES, |fs| {
        (fs.size / 10).max(MIN_DEFAULT_KEEP_BYTES)
    })
}
