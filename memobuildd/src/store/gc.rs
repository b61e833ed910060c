//! Garbage collection: LRU within a byte budget, never what a lease or a tag holds.
//!
//! A pass ([`pass`]) plans on a snapshot of the index, then acts in bounded chunks:
//! 1. **plan** — roots are tags (manifest → config + layers, and the actions their builds
//!    used), leases, and the actions and base images still kept. Each unpinned action and
//!    base image is a candidate, oldest use first; those unused longer than
//!    `keep_duration` (or all, with `--all`) go, then the oldest until the store fits
//!    `keep_bytes`, counting what each frees once nothing else refers to it;
//! 2. **forget** — the chosen actions and base images lose their rows;
//! 3. **sweep** — every blob and unpacked layer nothing refers to any more, and every file
//!    or directory without a row (what a crash left), is removed: rows first, then the file
//!    is renamed into `tmp/` and deleted there, so the index never names a missing file.
//!
//! Steps 2 and 3 run under the store's `refs` lock (nothing can start referring to a thing
//! between GC's check and its removal) and the lease table's lock (a build either holds a
//! thing before GC looks, or finds it gone), one chunk at a time so builds interleave.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak, mpsc};
use std::time::{Duration, Instant};

use super::blobs::Digest;
use super::index::{ActionKey, Snapshot, now_unix};
use super::layers::{layer_id, remove_any};
use super::{Cas, GC_INTERVAL, Shared, StoreError};
use crate::image::oci::{ImageConfig, Manifest};
use crate::layout::Layout;

/// Rows removed per locked step: small enough that a build waiting for the lock waits
/// milliseconds.
const CHUNK: usize = 256;

/// Why a pass ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The daemon started.
    Start,
    /// A build left the store over its budget.
    OverBudget,
    /// A write failed for lack of space; make `wanted` bytes free on the filesystem.
    OutOfSpace { wanted: u64 },
    /// The periodic look.
    Interval,
    /// `memobuild gc` / `memobuild cache prune`.
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::OverBudget => "over-budget",
            Self::OutOfSpace { .. } => "disk-full",
            Self::Interval => "interval",
            Self::Manual => "manual",
        }
    }
}

/// What one pass may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    /// Shrink the store to at most this many bytes (LRU).
    pub keep_bytes: u64,
    /// Remove what was unused for longer than this, whatever the size.
    pub keep_duration: Option<Duration>,
    /// Remove every action, base image and cache mount no tag, lease or step holds.
    pub all: bool,
    /// Consider cache mounts only (`cache prune --filter type=exec.cachemount`).
    pub cache_mounts_only: bool,
    /// Plan only: say what would go.
    pub dry_run: bool,
    /// Stop after this long; the next pass goes on.
    pub time_limit: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed_actions: u64,
    pub removed_bases: u64,
    pub removed_blobs: u64,
    pub removed_layers: u64,
    pub removed_cache_mounts: u64,
    pub freed_bytes: u64,
    /// What GC manages after the pass.
    pub kept_bytes: u64,
    pub dry_run: bool,
    /// `false`: the time limit stopped the pass before it was done.
    pub complete: bool,
    pub duration: Duration,
}

/// The last pass, for `cache stats`.
#[derive(Debug, Clone)]
pub struct GcRecord {
    pub report: GcReport,
    pub trigger: Trigger,
    pub finished_unix: u64,
}

/// The GC thread's mailbox, the trash thread's, and the last pass.
#[derive(Debug, Default)]
pub(super) struct Control {
    wake: Mutex<Option<mpsc::Sender<Trigger>>>,
    trash: Mutex<Option<mpsc::Sender<(PathBuf, u64)>>>,
    /// Bytes renamed into the trash and not yet unlinked: still on disk, still counted.
    trash_bytes: Arc<AtomicU64>,
    last: Mutex<Option<GcRecord>>,
    running: AtomicBool,
    pass: Mutex<()>,
    passes: AtomicU64,
}

impl Control {
    pub(super) fn wake(&self, trigger: Trigger) {
        if let Some(sender) = &*self.wake.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = sender.send(trigger);
        }
    }

    pub(super) fn last(&self) -> Option<GcRecord> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A pass runs, or its trash is still being deleted.
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed) || self.trash_bytes() > 0
    }

    pub(super) fn trash_bytes(&self) -> u64 {
        self.trash_bytes.load(Ordering::Relaxed)
    }

    /// Counts bytes renamed into the trash: still on disk until [`Control::discard`]ed.
    pub(super) fn trashed(&self, bytes: u64) {
        self.trash_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Hands a directory of removed things (counted by [`Control::trashed`]) to the trash
    /// thread, or, without one, deletes it here.
    pub(super) fn discard(&self, dir: PathBuf, bytes: u64) {
        let queued = match &*self.trash.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(sender) => sender.send((dir, bytes)).map_err(|e| e.0),
            None => Err((dir, bytes)),
        };
        if let Err((dir, bytes)) = queued {
            remove_any(&dir);
            self.trash_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    pub(super) fn pass_lock(&self) -> MutexGuard<'_, ()> {
        self.pass.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts the store's GC thread and its trash thread. They end when the store is dropped.
pub(super) fn spawn_thread(shared: &Arc<Shared>) {
    let (discard, discarded) = mpsc::channel::<(PathBuf, u64)>();
    let pending = Arc::clone(&shared.gc.trash_bytes);
    let trash = std::thread::Builder::new()
        .name("memobuild-trash".into())
        .spawn(move || {
            for (dir, bytes) in discarded {
                remove_any(&dir);
                pending.fetch_sub(bytes, Ordering::Relaxed);
            }
        });
    match trash {
        Ok(_) => {
            *shared
                .gc
                .trash
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(discard);
        }
        Err(err) => tracing::warn!(%err, "no trash thread: GC passes delete as they go"),
    }
    let (sender, receiver) = mpsc::channel();
    *shared
        .gc
        .wake
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(sender);
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("memobuild-gc".into())
        .spawn(move || {
            loop {
                let trigger = match receiver.recv_timeout(GC_INTERVAL) {
                    Ok(trigger) => trigger,
                    Err(mpsc::RecvTimeoutError::Timeout) => Trigger::Interval,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                // Triggers that queued up during a pass are served by one more pass.
                let trigger = receiver.try_iter().fold(trigger, strongest);
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                automatic(&shared, trigger);
            }
        });
    if let Err(err) = spawned {
        tracing::error!(%err, "could not start the GC thread; only `memobuild gc` collects");
    }
}

fn strongest(a: Trigger, b: Trigger) -> Trigger {
    match (a, b) {
        (Trigger::OutOfSpace { wanted: x }, Trigger::OutOfSpace { wanted: y }) => {
            Trigger::OutOfSpace { wanted: x.max(y) }
        }
        (space @ Trigger::OutOfSpace { .. }, _) | (_, space @ Trigger::OutOfSpace { .. }) => space,
        (Trigger::Start, _) | (_, Trigger::Start) => Trigger::Start,
        (other, _) => other,
    }
}

fn automatic(shared: &Shared, trigger: Trigger) {
    let total = shared.total_bytes();
    let mut options = GcOptions {
        keep_bytes: shared.keep_bytes,
        keep_duration: shared.keep_duration,
        all: false,
        cache_mounts_only: false,
        dry_run: false,
        time_limit: Some(shared.pass_limit),
    };
    match trigger {
        Trigger::OverBudget if total <= shared.keep_bytes => return,
        // The periodic look has work only when something can expire.
        Trigger::Interval if total <= shared.keep_bytes && shared.keep_duration.is_none() => {
            return;
        }
        Trigger::OutOfSpace { wanted } => {
            let free = super::filesystem(shared.layout.root()).map_or(0, |fs| fs.free);
            options.keep_bytes = options
                .keep_bytes
                .min(total.saturating_sub(wanted.saturating_sub(free)));
        }
        _ => {}
    }
    tracing::debug!(
        trigger = trigger.as_str(),
        total,
        budget = options.keep_bytes,
        "garbage collection starts"
    );
    match pass(shared, &options, trigger) {
        Ok(report) => tracing::info!(
            trigger = trigger.as_str(),
            freed = report.freed_bytes,
            kept = report.kept_bytes,
            actions = report.removed_actions,
            blobs = report.removed_blobs,
            layers = report.removed_layers,
            complete = report.complete,
            elapsed = ?report.duration,
            "garbage collection"
        ),
        Err(err) => tracing::warn!(trigger = trigger.as_str(), %err, "garbage collection failed"),
    }
}

/// What one root keeps: blobs by digest, unpacked layers by diff-id.
#[derive(Debug, Default, Clone)]
pub(super) struct Closure {
    blobs: HashSet<Digest>,
    layers: HashSet<Digest>,
}

impl Closure {
    fn extend(&mut self, other: &Closure) {
        self.blobs.extend(other.blobs.iter().cloned());
        self.layers.extend(other.layers.iter().cloned());
    }

    /// Adds the compressed forms made of its layers (`store::forms`): they live as long as
    /// their layer.
    fn with_forms(mut self, forms: &HashMap<Digest, Vec<Digest>>) -> Self {
        for diff_id in &self.layers {
            self.blobs
                .extend(forms.get(diff_id).into_iter().flatten().cloned());
        }
        self
    }
}

/// An image's blobs and layers, read from its manifest and config (content-addressed, so
/// remembered for the pass). What cannot be read keeps what is known.
fn image_closure(cas: &Cas, manifest: &Digest, cache: &mut HashMap<Digest, Closure>) -> Closure {
    if let Some(closure) = cache.get(manifest) {
        return closure.clone();
    }
    let mut closure = Closure::default();
    closure.blobs.insert(manifest.clone());
    if let Some(parsed) = cas
        .read(manifest)
        .ok()
        .and_then(|b| Manifest::parse(&b).ok())
    {
        closure.blobs.insert(parsed.config.digest.clone());
        closure
            .blobs
            .extend(parsed.layers.iter().map(|l| l.digest.clone()));
        if let Some(config) = cas
            .read(&parsed.config.digest)
            .ok()
            .and_then(|b| ImageConfig::parse(&b).ok())
        {
            closure.layers.extend(config.diff_ids);
        }
    }
    cache.insert(manifest.clone(), closure.clone());
    closure
}

/// Diff-ids of every tagged image and base image (to name unpacked directories).
pub(super) fn image_layers(shared: &Shared, snapshot: &Snapshot) -> HashSet<Digest> {
    let cas = unleased(shared);
    let mut cache = HashMap::new();
    let manifests = snapshot
        .tags
        .iter()
        .map(|t| &t.manifest.digest)
        .chain(snapshot.bases.iter().map(|(m, _)| m));
    let mut layers = HashSet::new();
    for manifest in manifests {
        layers.extend(image_closure(&cas, manifest, &mut cache).layers);
    }
    layers
}

fn unleased(shared: &Shared) -> Cas {
    Cas {
        shared: shared.arc(),
        lease: None,
    }
}

/// Every blob file under `cas-v1/sha256/`, by digest.
pub(super) fn blob_files(layout: &Layout) -> Vec<(Digest, PathBuf)> {
    let mut files = Vec::new();
    let shards = std::fs::read_dir(layout.cas_dir().join("sha256"))
        .into_iter()
        .flatten();
    for shard in shards.flatten() {
        for file in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name();
            if let Ok(digest) = Digest::parse(&format!("sha256:{}", name.to_string_lossy())) {
                files.push((digest, file.path()));
            }
        }
    }
    files
}

/// One candidate root: an action or a base image, with what it refers to.
struct Candidate {
    action: Option<ActionKey>,
    base: Option<Digest>,
    last_used: i64,
    closure: Closure,
}

struct Plan {
    actions: Vec<ActionKey>,
    bases: Vec<Digest>,
    /// Estimated.
    freed: u64,
    blobs: u64,
    layers: u64,
}

/// Runs one pass; one at a time.
pub(super) fn pass(
    shared: &Shared,
    options: &GcOptions,
    trigger: Trigger,
) -> Result<GcReport, StoreError> {
    let _one = shared.gc.pass_lock();
    shared.gc.running.store(true, Ordering::Relaxed);
    let _running = ClearOnDrop(&shared.gc.running);
    let started = Instant::now();
    let deadline = options.time_limit.map(|limit| started + limit);
    let out_of_time = || deadline.is_some_and(|d| Instant::now() >= d);
    shared.flush_touched()?;
    let before = shared.total_bytes();
    let snapshot = shared.ix(|index| index.snapshot())?;
    let plan = if options.cache_mounts_only {
        Plan {
            actions: Vec::new(),
            bases: Vec::new(),
            freed: 0,
            blobs: 0,
            layers: 0,
        }
    } else {
        plan(shared, &snapshot, options, before)
    };
    let mut report = GcReport {
        dry_run: options.dry_run,
        complete: true,
        ..GcReport::default()
    };
    if options.dry_run {
        report.removed_actions = plan.actions.len() as u64;
        report.removed_bases = plan.bases.len() as u64;
        report.removed_blobs = plan.blobs;
        report.removed_layers = plan.layers;
        let mounts = cache_mounts(shared, options, before.saturating_sub(plan.freed));
        report.removed_cache_mounts = mounts.mounts;
        report.freed_bytes = plan.freed + mounts.bytes;
        report.kept_bytes = before.saturating_sub(report.freed_bytes);
        report.duration = started.elapsed();
        return Ok(report);
    }

    for chunk in plan.actions.chunks(CHUNK) {
        let _refs = shared.refs.write().unwrap_or_else(PoisonError::into_inner);
        let leases = shared.leases.lock().unwrap_or_else(PoisonError::into_inner);
        // Tags may have come since the plan: ask again, under the lock.
        let tagged = shared.ix(|index| index.tagged_actions())?;
        let keys: Vec<ActionKey> = chunk
            .iter()
            .filter(|key| !leases.holds_action(key) && !tagged.contains(*key))
            .copied()
            .collect();
        let removed = shared.ix(|index| index.forget_actions(&keys))?;
        shared
            .counters
            .actions
            .fetch_sub(removed, Ordering::Relaxed);
        report.removed_actions += removed;
        drop(leases);
        if out_of_time() {
            report.complete = false;
            break;
        }
    }
    if report.complete {
        let leases = shared.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let bases: Vec<Digest> = plan
            .bases
            .iter()
            .filter(|m| !leases.holds_base(m))
            .cloned()
            .collect();
        drop(leases);
        report.removed_bases = shared.ix(|index| index.forget_bases(&bases))?;
    }
    if report.complete && !options.cache_mounts_only {
        report.complete = sweep(shared, &mut report, &out_of_time)?;
    }
    if report.complete {
        let now = shared.total_bytes().saturating_sub(shared.gc.trash_bytes());
        let mounts = cache_mounts(shared, options, now);
        report.removed_cache_mounts = mounts.mounts;
        report.freed_bytes += mounts.bytes;
    }
    let _ = shared.ix(|index| index.checkpoint());
    // What the store keeps: what the trash thread is still unlinking is freed already.
    report.kept_bytes = shared.total_bytes().saturating_sub(shared.gc.trash_bytes());
    report.duration = started.elapsed();
    shared.gc.passes.fetch_add(1, Ordering::Relaxed);
    *shared
        .gc
        .last
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(GcRecord {
        report: report.clone(),
        trigger,
        finished_unix: now_unix().max(0) as u64,
    });
    Ok(report)
}

/// Removes the cache mounts no step uses that the pass's options pick: all, the expired,
/// then the least recently used while the store (`total` bytes now) is over its budget.
fn cache_mounts(
    shared: &Shared,
    options: &GcOptions,
    mut total: u64,
) -> super::cachemounts::Removed {
    let expired_before = options
        .keep_duration
        .map(|keep| now_unix() - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
    let chosen = |last_used: i64, bytes: u64| {
        let go = options.all
            || expired_before.is_some_and(|t| last_used < t)
            || total > options.keep_bytes;
        if go {
            total = total.saturating_sub(bytes);
        }
        go
    };
    shared
        .cache_mounts
        .remove_unused(shared, chosen, options.dry_run)
}

struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Chooses the actions and base images that go, and estimates what that frees.
fn plan(shared: &Shared, snapshot: &Snapshot, options: &GcOptions, before: u64) -> Plan {
    let cas = unleased(shared);
    let mut cache = HashMap::new();
    let mut pinned = Closure::default();
    for tag in &snapshot.tags {
        pinned.blobs.insert(tag.config.clone());
        pinned.extend(&image_closure(&cas, &tag.manifest.digest, &mut cache));
    }
    let leases = shared.leases.lock().unwrap_or_else(PoisonError::into_inner);
    let mut candidates: Vec<Candidate> = Vec::new();
    for (key, last_used) in &snapshot.actions {
        let mut closure = Closure::default();
        for (digest, diff_id) in snapshot.action_layers.get(key).into_iter().flatten() {
            closure.blobs.insert(digest.clone());
            closure.layers.insert(diff_id.clone());
        }
        let closure = closure.with_forms(&snapshot.forms);
        if snapshot.tagged_actions.contains(key) || leases.holds_action(key) {
            pinned.extend(&closure);
            continue;
        }
        candidates.push(Candidate {
            action: Some(*key),
            base: None,
            last_used: *last_used,
            closure,
        });
    }
    for (manifest, last_used) in &snapshot.bases {
        let closure = image_closure(&cas, manifest, &mut cache).with_forms(&snapshot.forms);
        if leases.holds_base(manifest) {
            pinned.extend(&closure);
            continue;
        }
        candidates.push(Candidate {
            action: None,
            base: Some(manifest.clone()),
            last_used: *last_used,
            closure,
        });
    }
    drop(leases);
    let pinned = pinned.with_forms(&snapshot.forms);
    candidates.sort_by_key(|c| c.last_used);

    let mut blob_refs: HashMap<&Digest, u32> = HashMap::new();
    let mut layer_refs: HashMap<&Digest, u32> = HashMap::new();
    for candidate in &candidates {
        for digest in &candidate.closure.blobs {
            *blob_refs.entry(digest).or_default() += 1;
        }
        for diff_id in &candidate.closure.layers {
            *layer_refs.entry(diff_id).or_default() += 1;
        }
    }
    let mut plan = Plan {
        actions: Vec::new(),
        bases: Vec::new(),
        freed: 0,
        blobs: 0,
        layers: 0,
    };
    // What nothing refers to already goes at the sweep.
    for (digest, disk) in &snapshot.blobs {
        if !blob_refs.contains_key(digest) && !pinned.blobs.contains(digest) {
            plan.freed += disk;
            plan.blobs += 1;
        }
    }
    for (diff_id, disk) in &snapshot.unpacked {
        if !layer_refs.contains_key(diff_id) && !pinned.layers.contains(diff_id) {
            plan.freed += disk;
            plan.layers += 1;
        }
    }
    let expired_before = options
        .keep_duration
        .map(|keep| now_unix() - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
    for candidate in &candidates {
        let expired = options.all || expired_before.is_some_and(|t| candidate.last_used < t);
        if !expired && before.saturating_sub(plan.freed) <= options.keep_bytes {
            break;
        }
        for digest in &candidate.closure.blobs {
            let count = blob_refs.entry(digest).or_default();
            *count = count.saturating_sub(1);
            if *count == 0 && !pinned.blobs.contains(digest) {
                plan.freed += snapshot.blobs.get(digest).copied().unwrap_or(0);
                plan.blobs += u64::from(snapshot.blobs.contains_key(digest));
            }
        }
        for diff_id in &candidate.closure.layers {
            let count = layer_refs.entry(diff_id).or_default();
            *count = count.saturating_sub(1);
            if *count == 0 && !pinned.layers.contains(diff_id) {
                plan.freed += snapshot.unpacked.get(diff_id).copied().unwrap_or(0);
                plan.layers += u64::from(snapshot.unpacked.contains_key(diff_id));
            }
        }
        match (&candidate.action, &candidate.base) {
            (Some(key), _) => plan.actions.push(*key),
            (None, Some(manifest)) => plan.bases.push(manifest.clone()),
            (None, None) => {}
        }
    }
    plan
}

/// Removes what nothing refers to; `false` when the time limit stopped it.
fn sweep(
    shared: &Shared,
    report: &mut GcReport,
    out_of_time: &dyn Fn() -> bool,
) -> Result<bool, StoreError> {
    // References added after this (an action, a tag) move the epoch: then each candidate is
    // asked about again under the lock; otherwise the snapshot still says it all.
    let epoch = shared.refs_epoch.load(Ordering::Acquire);
    let snapshot = shared.ix(|index| index.snapshot())?;
    let referenced_blobs: HashSet<&Digest> = snapshot
        .action_layers
        .values()
        .flatten()
        .flat_map(|(digest, diff_id)| {
            std::iter::once(digest).chain(snapshot.forms.get(diff_id).into_iter().flatten())
        })
        .collect();
    let referenced_layers: HashSet<&Digest> = snapshot
        .action_layers
        .values()
        .flatten()
        .map(|(_, diff_id)| diff_id)
        .collect();
    let mut blobs: Vec<Digest> = snapshot
        .blobs
        .keys()
        .filter(|d| !referenced_blobs.contains(d))
        .cloned()
        .collect();
    let layers: Vec<Digest> = snapshot
        .unpacked
        .keys()
        .filter(|d| !referenced_layers.contains(d))
        .cloned()
        .collect();
    // Files without rows: what a crash left between a rename and its row (or a GC's row
    // removal and its rename). Their rows are made below if something refers to them.
    let orphan_blobs: Vec<Digest> = blob_files(&shared.layout)
        .into_iter()
        .map(|(digest, _)| digest)
        .filter(|digest| !snapshot.blobs.contains_key(digest))
        .collect();
    let named_layers: HashSet<String> = snapshot.unpacked.keys().map(layer_id).collect();
    let orphan_layers: Vec<PathBuf> = std::fs::read_dir(shared.layout.layers_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !named_layers.contains(&*e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    blobs.extend(orphan_blobs);

    let mut cache = HashMap::new();
    let cas = unleased(shared);
    let mut trashed = Vec::new();
    let rounds = blobs
        .len()
        .max(layers.len())
        .max(orphan_layers.len())
        .div_ceil(CHUNK);
    for round in 0..rounds {
        let chunk_start = round * CHUNK;
        let range = |len: usize| chunk_start.min(len)..(chunk_start + CHUNK).min(len);
        let trash = shared.layout.tmp_dir().join(format!(
            "gc-{}-{}-{round}",
            std::process::id(),
            shared.gc.passes.load(Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&trash)
            .map_err(StoreError::io("creating GC's trash in", &trash))?;
        let mut round_bytes = 0;
        {
            let _refs = shared.refs.write().unwrap_or_else(PoisonError::into_inner);
            let leases = shared.leases.lock().unwrap_or_else(PoisonError::into_inner);
            // Tags and base images may have come since the snapshot: ask again, under the lock.
            let mut pinned = Closure::default();
            for tag in shared.ix(|index| index.images())? {
                pinned.blobs.insert(tag.config.clone());
                pinned.extend(&image_closure(&cas, &tag.manifest.digest, &mut cache));
            }
            for (manifest, _) in &snapshot.bases {
                pinned.extend(&image_closure(&cas, manifest, &mut cache));
            }
            let pinned = pinned.with_forms(&snapshot.forms);
            let unchanged = shared.refs_epoch.load(Ordering::Acquire) == epoch;
            let mut gone_blobs = Vec::new();
            for digest in &blobs[range(blobs.len())] {
                let keep = leases.holds_blob(digest)
                    || pinned.blobs.contains(digest)
                    || (!unchanged
                        && shared.ix(|index| {
                            Ok(index.layer_referenced(digest, false)?
                                || index.form_referenced(digest)?)
                        })?);
                if !keep {
                    gone_blobs.push(digest.clone());
                } else if !snapshot.blobs.contains_key(digest) {
                    adopt_blob(shared, digest)?;
                }
            }
            let (rows, bytes) = shared.ix(|index| index.remove_blobs(&gone_blobs))?;
            shared.counters.blobs.fetch_sub(rows, Ordering::Relaxed);
            shared
                .counters
                .blob_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            round_bytes += bytes;
            for digest in &gone_blobs {
                let path = shared.blob_path(digest);
                if !snapshot.blobs.contains_key(digest) {
                    round_bytes += disk_of(&path);
                }
                if std::fs::rename(&path, trash.join(digest.hex())).is_ok() {
                    report.removed_blobs += 1;
                }
            }
            let mut gone_layers = Vec::new();
            for diff_id in &layers[range(layers.len())] {
                let keep = leases.holds_layer(diff_id)
                    || pinned.layers.contains(diff_id)
                    || (!unchanged && shared.ix(|index| index.layer_referenced(diff_id, true))?);
                if !keep {
                    gone_layers.push(diff_id.clone());
                }
            }
            let (rows, bytes) = shared.ix(|index| index.remove_unpacked(&gone_layers))?;
            shared.counters.layers.fetch_sub(rows, Ordering::Relaxed);
            shared
                .counters
                .layer_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            round_bytes += bytes;
            for diff_id in &gone_layers {
                let id = layer_id(diff_id);
                if std::fs::rename(shared.layer_path(diff_id), trash.join(&id)).is_ok() {
                    report.removed_layers += 1;
                }
            }
            // A directory without a row is kept while a lease holds it (its row is on the
            // way) and given a row when a root names it.
            let named: HashMap<String, &Digest> = pinned
                .layers
                .iter()
                .chain(snapshot.action_layers.values().flatten().map(|(_, d)| d))
                .map(|diff_id| (layer_id(diff_id), diff_id))
                .collect();
            for path in &orphan_layers[range(orphan_layers.len())] {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let Some(name) = name else { continue };
                if let Some(diff_id) = named.get(&name) {
                    shared.record_layer(diff_id, path)?;
                    continue;
                }
                if leases.holds_layer_id(&name) {
                    continue;
                }
                round_bytes += super::layers::disk_usage(path);
                if std::fs::rename(path, trash.join(&name)).is_ok() {
                    report.removed_layers += 1;
                }
            }
        }
        report.freed_bytes += round_bytes;
        // Unlinking is the slow part (milliseconds a file on a busy disk): the trash thread
        // does it once the pass is over (not competing with its renames), so a pass holds
        // nothing up; the bytes count as the store's until gone.
        shared.gc.trashed(round_bytes);
        trashed.push((trash, round_bytes));
        if out_of_time() {
            break;
        }
    }
    let complete = trashed.len() == rounds;
    for (dir, bytes) in trashed {
        shared.gc.discard(dir, bytes);
    }
    Ok(complete)
}

fn disk_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// A blob file something refers to but that has no row: give it one.
fn adopt_blob(shared: &Shared, digest: &Digest) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let path = shared.blob_path(digest);
    if let Ok(meta) = std::fs::metadata(&path) {
        shared
            .record_blob(digest, meta.len(), meta.blocks() * 512)
            .map_err(StoreError::from)?;
    }
    Ok(())
}
