//! Unpacked layers, each once, shared by every image that has it: `<root>/layers-v1/<id>/`
//! in overlay format (whiteouts as 0:0 char devices, opaque xattrs) so it can be a lowerdir.
//!
//! A layer directory appears by rename only when complete — unpacked into `tmp/` from the
//! CAS, or adopted from a step's finished upper/staging directory — so a crash never leaves a
//! half-unpacked layer that later mounts would trust.

use std::path::{Path, PathBuf};

use crate::cache::{Cas, Digest};
use crate::image::layer::Layer;
use crate::image::unpack::{Whiteouts, unpack};

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
}

#[derive(Debug, Clone)]
pub struct LayerStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl LayerStore {
    pub fn open(dir: PathBuf, tmp: PathBuf) -> Result<Self, StoreError> {
        for path in [&dir, &tmp] {
            std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
                what: "creating",
                path: path.clone(),
                source,
            })?;
        }
        Ok(Self { dir, tmp })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The short name a layer has in the store and in mount options.
    pub fn id(diff_id: &Digest) -> String {
        diff_id.hex()[..16].to_owned()
    }

    pub fn path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(Self::id(diff_id))
    }

    /// A fresh directory under `tmp/` for staging a step's output.
    pub fn scratch(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.tmp)
            .map_err(|source| StoreError::Io {
                what: "creating a scratch directory in",
                path: self.tmp.clone(),
                source,
            })?;
        Ok(dir.keep())
    }

    /// Makes sure `layer` is unpacked; returns its directory.
    pub fn ensure(&self, cas: &Cas, layer: &Layer) -> Result<PathBuf, StoreError> {
        let target = self.path(&layer.diff_id);
        if target.is_dir() {
            return Ok(target);
        }
        let staging = self.scratch("unpack-")?;
        let unpacked = crate::cache::cas::open(cas, &layer.blob.digest)
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
        self.adopt(&layer.diff_id, &staging)
    }

    /// Moves a finished directory into the store as the unpacked form of `diff_id`. If the
    /// layer is already there (another build made the same one), the copy is dropped.
    pub fn adopt(&self, diff_id: &Digest, dir: &Path) -> Result<PathBuf, StoreError> {
        let target = self.path(diff_id);
        match std::fs::rename(dir, &target) {
            Ok(()) => Ok(target),
            Err(_) if target.is_dir() => {
                let _ = std::fs::remove_dir_all(dir);
                Ok(target)
            }
            Err(source) => Err(StoreError::Io {
                what: "storing layer",
                path: target,
                source,
            }),
        }
    }

    /// Empties `tmp/` (crash recovery at start: nothing in it is referenced).
    pub fn clear_scratch(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.tmp) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}
