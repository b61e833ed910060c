//! Leases, as containerd has them: whatever a running build, prebuild, export or push uses
//! is held by its [`Lease`] — blobs, unpacked layers, actions, base images — and GC never
//! removes a held thing. A lease is taken before the thing is checked or written, and GC
//! checks leases and removes under one lock, so a thing is either seen held or already gone.
//! Dropping the last clone of a lease releases it; what it used counts as used now for LRU.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use super::blobs::{Cas, Digest};
use super::index::{ActionKey, ActionResult};
use super::{Shared, StoreError};
use crate::image::layer::Layer;

/// What all live leases hold.
#[derive(Debug, Default)]
pub(super) struct Leases {
    next: u64,
    held: HashMap<u64, Held>,
}

#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) blobs: HashSet<Digest>,
    pub(super) layers: HashSet<Digest>,
    pub(super) actions: HashSet<ActionKey>,
    pub(super) bases: HashSet<Digest>,
}

impl Leases {
    pub(super) fn holds_blob(&self, digest: &Digest) -> bool {
        self.held.values().any(|h| h.blobs.contains(digest))
    }

    pub(super) fn holds_layer(&self, diff_id: &Digest) -> bool {
        self.held.values().any(|h| h.layers.contains(diff_id))
    }

    pub(super) fn holds_layer_id(&self, id: &str) -> bool {
        self.held.values().any(|h| {
            h.layers
                .iter()
                .any(|diff_id| super::layer_id(diff_id) == id)
        })
    }

    pub(super) fn holds_action(&self, key: &ActionKey) -> bool {
        self.held.values().any(|h| h.actions.contains(key))
    }

    pub(super) fn holds_base(&self, manifest: &Digest) -> bool {
        self.held.values().any(|h| h.bases.contains(manifest))
    }

    pub(super) fn count(&self) -> usize {
        self.held.len()
    }
}

/// A hold on what one build, push or export uses; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    id: u64,
    shared: Arc<Shared>,
    /// A blob this lease read was damaged (and has been repaired).
    saw_damage: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let held = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .remove(&self.id);
        if let Some(held) = held {
            self.shared.used(held.actions, held.bases);
        }
    }
}

impl Lease {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        let id = {
            let mut leases = shared.leases.lock().unwrap_or_else(PoisonError::into_inner);
            leases.next += 1;
            let id = leases.next;
            leases.held.insert(id, Held::default());
            id
        };
        Self(Arc::new(Inner {
            id,
            shared,
            saw_damage: AtomicBool::new(false),
        }))
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.0.shared
    }

    fn with_held(&self, change: impl FnOnce(&mut Held)) {
        let mut leases = self
            .0
            .shared
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = leases.held.get_mut(&self.0.id) {
            change(held);
        }
    }

    pub(super) fn hold_blob(&self, digest: &Digest) {
        self.with_held(|held| {
            held.blobs.insert(digest.clone());
        });
    }

    fn hold_layers(&self, layers: &[Layer]) {
        self.with_held(|held| {
            for layer in layers {
                held.blobs.insert(layer.blob.digest.clone());
                held.layers.insert(layer.diff_id.clone());
            }
        });
    }

    pub(super) fn mark_damaged(&self) {
        self.0.saw_damage.store(true, Ordering::Relaxed);
    }

    /// Whether a blob this lease read turned out damaged (it was removed, with the actions
    /// naming it): doing the work again will rebuild it.
    pub fn saw_damage(&self) -> bool {
        self.0.saw_damage.load(Ordering::Relaxed)
    }

    /// The blob store, every blob it touches held by this lease.
    pub fn cas(&self) -> Cas {
        Cas {
            shared: Arc::clone(&self.0.shared),
            lease: Some(self.clone()),
        }
    }

    /// The action cache's entry for `key` (marked used), unless it is not there.
    pub fn action(&self, key: &ActionKey) -> Result<Option<ActionResult>, StoreError> {
        self.0.shared.ix(|index| index.action(key))
    }

    /// Holds what a cached result needs and checks it is all there: every blob present with
    /// its size (a blob of another size is damaged: removed, with the actions naming it).
    /// `false`: the result cannot be used, and the step must run again.
    pub fn claim(&self, key: &ActionKey, result: &ActionResult) -> bool {
        let layers: Vec<Layer> = result.layers.iter().map(Layer::from).collect();
        self.hold_layers(&layers);
        self.with_held(|held| {
            held.actions.insert(*key);
        });
        let shared = &self.0.shared;
        result.layers.iter().all(|layer| {
            match std::fs::metadata(shared.blob_path(&layer.blob.digest)) {
                Ok(meta) if meta.len() == layer.blob.size => true,
                Ok(_) => {
                    shared.damaged(&layer.blob.digest, Some(self));
                    false
                }
                Err(_) => false,
            }
        })
    }

    /// Records what a step produced (held already: this lease wrote it).
    pub fn record_action(&self, key: &ActionKey, result: &ActionResult) -> Result<(), StoreError> {
        self.with_held(|held| {
            held.actions.insert(*key);
        });
        self.0.shared.record_action(key, result)
    }

    /// Drops the action cache's entry for `key` (its blobs are gone).
    pub fn forget_action(&self, key: &ActionKey) -> Result<(), StoreError> {
        self.0.shared.forget_actions(&[*key])
    }

    /// Holds a base image (its manifest, config and layers) and makes it a GC root, used
    /// now.
    /// (Its manifest and config were read through [`Lease::cas`], which held them.)
    pub fn use_base(&self, manifest: &Digest, layers: &[Layer]) -> Result<(), StoreError> {
        self.hold_layers(layers);
        self.with_held(|held| {
            held.bases.insert(manifest.clone());
        });
        self.0.shared.use_base(manifest)
    }

    /// Holds an image's blobs: its manifest, config and layers.
    pub fn hold_image(&self, manifest: &Digest, config: &Digest, layers: &[Layer]) {
        self.hold_layers(layers);
        self.hold_blob(manifest);
        self.hold_blob(config);
    }

    /// The unpacked directory of `layer` (unpacked from its blob if needed).
    pub fn unpacked(&self, layer: &Layer) -> Result<PathBuf, StoreError> {
        self.hold_layers(std::slice::from_ref(layer));
        self.0.shared.unpack_layer(&self.cas(), layer)
    }

    /// Moves a finished step directory into the store as the unpacked form of `diff_id`.
    pub fn adopt(&self, diff_id: &Digest, dir: &Path) -> Result<PathBuf, StoreError> {
        self.with_held(|held| {
            held.layers.insert(diff_id.clone());
        });
        self.0.shared.adopt_layer(diff_id, dir)
    }

    /// Action keys this lease used, for a tag to pin.
    pub fn actions(&self) -> Vec<ActionKey> {
        let mut keys = Vec::new();
        self.with_held(|held| keys.extend(held.actions.iter().copied()));
        keys
    }
}
