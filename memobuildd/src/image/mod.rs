//! Images: the OCI model, layer tars, compression and unpacking.
//!
//! This stage owns everything about the bytes of an image and nothing about how a build got
//! there:
//!
//! - [`oci`]: [`ImageConfig`], manifests and indexes — canonical JSON in, canonical JSON out, so
//!   one config always has one digest.
//! - [`layer`]: [`write_layer`] turns a directory (an overlayfs upper dir or a staged tree) into
//!   a deterministic, compressed layer [`Layer`] in the [`Cas`](crate::store::Cas), hashing the
//!   tar (diff-id) and the gzip (digest) in one pass.
//! - [`mod@unpack`]: [`unpack()`] extracts a layer into a directory, either as an overlayfs lowerdir
//!   ([`Whiteouts::Overlay`]) or merged into a root filesystem ([`Whiteouts::Apply`]), never
//!   writing outside it.
//! - [`parts`]: [`ImageParts`], an image in the store by its blobs.
//!
//! The `snapshot` and `exec` stages hand this module directories; the `engine` assembles the
//! config and manifest from what it returns, and `export` writes images out in the formats
//! clients ask for.

pub mod compress;
pub(crate) mod entry;
pub mod layer;
pub mod oci;
pub mod parts;
pub(crate) mod sys;
#[cfg(test)]
pub(crate) mod testutil;
pub mod unpack;

use std::path::PathBuf;

use crate::store::{CasError, Digest};

pub use compress::Compression;
pub use layer::{Layer, LayerOptions, Owner, write_layer};
pub use oci::{
    Descriptor, Healthcheck, History, ImageConfig, Index, Manifest, MediaTypes, Platform,
    RuntimeConfig, index_json, manifest_json,
};
pub use parts::ImageParts;
pub use unpack::{UnpackStats, Whiteouts, unpack};

/// What can go wrong with an image's bytes; each variant names what it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error("blob {digest}: {source}")]
    Blob {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("reading a layer: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
    #[error("invalid {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A layer entry that would escape the destination, or that cannot be represented.
    #[error("layer entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },
    #[error("layer entry {entry:?}: {source}")]
    EntryIo {
        entry: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    fn entry_io(entry: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::EntryIo {
            entry: entry.display().to_string(),
            source,
        }
    }

    pub(crate) fn entry(entry: &std::path::Path, reason: impl Into<String>) -> Self {
        Self::Entry {
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }
}
