//! Unpacked layers, each once, shared by every image that has it: `<root>/layers-v1/<id>/`,
//! named by the layer's diff-id (its uncompressed content), in overlay format (whiteouts as
//! 0:0 char devices, opaque xattrs) so it can be a lowerdir. One row each in the index's
//! `unpacked` table, with its size on disk measured once when it arrives.
//!
//! A layer directory appears by rename only when complete — unpacked into `tmp/` from its
//! blob (verified as it is read), or adopted from a step's finished upper/staging directory
//! — so a crash never leaves a half-unpacked layer that later mounts would trust.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::blobs::Digest;
use super::{Shared, StoreError};
use crate::image::layer::Layer;
use crate::image::unpack::{Whiteouts, unpack};

/// The short name a layer has in the store and in mount options: overlayfs takes all lower
/// directories in one mount option of at most a page, so 100+ layer images need short names.
pub fn layer_id(diff_id: &Digest) -> String {
    diff_id.hex()[..16].to_owned()
}

impl Shared {
    pub(super) fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layout.layers_dir().join(layer_id(diff_id))
    }

    /// A fresh directory under `tmp/` for staging a step's output.
    pub(super) fn scratch(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        let tmp = self.layout.tmp_dir();
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&tmp)
            .map_err(StoreError::io("creating a scratch directory in", &tmp))?;
        Ok(dir.keep())
    }

    /// Makes sure `layer` is unpacked from its blob; returns its directory. The caller holds
    /// the blob and the diff-id in a lease.
    pub(super) fn unpack_layer(
        &self,
        cas: &super::Cas,
        layer: &Layer,
    ) -> Result<PathBuf, StoreError> {
        let target = self.layer_path(&layer.diff_id);
        if target.is_dir() {
            return Ok(target);
        }
        let staging = self.scratch("unpack-")?;
        let unpacked = cas
            .open(&layer.blob)
            .map_err(|e| e.to_string())
            .and_then(|reader| {
                unpack(reader, &staging, Whiteouts::Overlay).map_err(|e| e.to_string())
            });
        if let Err(message) = unpacked {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(StoreError::Unpack {
                digest: layer.blob.digest.clone(),
                message,
            });
        }
        self.adopt_layer(&layer.diff_id, &staging)
    }

    /// Moves a finished directory into the store as the unpacked form of `diff_id`. If the
    /// layer is already there (another build made the same one), the copy is dropped.
    pub(super) fn adopt_layer(&self, diff_id: &Digest, dir: &Path) -> Result<PathBuf, StoreError> {
        let target = self.layer_path(diff_id);
        match std::fs::rename(dir, &target) {
            Ok(()) => {}
            Err(_) if target.is_dir() => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(source) => {
                return Err(StoreError::Io {
                    what: "storing layer",
                    path: target,
                    source,
                });
            }
        }
        self.record_layer(diff_id, &target)?;
        Ok(target)
    }

    /// Removes everything under `tmp/` (crash recovery at start: nothing in it is
    /// referenced). The trash thread unlinks it: a killed GC pass may have left thousands
    /// of entries, and the daemon must not wait for them to announce it is ready.
    pub(super) fn clear_tmp(&self) {
        if let Ok(entries) = std::fs::read_dir(self.layout.tmp_dir()) {
            for entry in entries.flatten() {
                self.gc.discard(entry.path(), 0);
            }
        }
    }
}

/// Bytes a tree takes on disk, as `du` counts them (blocks; hard links once).
pub(super) fn disk_usage(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Removes a file or a directory tree, whichever `path` is.
pub(super) fn remove_any(path: &Path) {
    let _ = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
}
