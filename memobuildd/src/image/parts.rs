//! [`ImageParts`]: an image as the store holds it — manifest, config and layers by digest.

use super::ImageError;
use super::layer::Layer;
use super::oci::{ImageConfig, Manifest, MediaTypes};
use crate::store::{Blob, Cas};

/// An image whose blobs are all in the CAS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageParts {
    pub manifest: Blob,
    pub config: Blob,
    /// Bottom first, as the manifest lists them.
    pub layers: Vec<Layer>,
    /// The family the manifest was written in.
    pub media: MediaTypes,
}

impl ImageParts {
    /// An image in the store, by its manifest: the manifest and config read (verified), its
    /// layers named by digest and diff-id.
    pub fn read(cas: &Cas, manifest: &Blob) -> Result<Self, ImageError> {
        let parsed = Manifest::parse(&cas.read(&manifest.digest)?)?;
        let config = ImageConfig::parse(&cas.read(&parsed.config.digest)?)?;
        if config.diff_ids.len() != parsed.layers.len() {
            return Err(ImageError::Invalid {
                what: "image",
                reason: format!(
                    "{} lists {} layers but its config {} diff ids",
                    manifest.digest,
                    parsed.layers.len(),
                    config.diff_ids.len()
                ),
            });
        }
        let layers = parsed
            .layers
            .iter()
            .zip(config.diff_ids)
            .map(|(descriptor, diff_id)| Layer {
                blob: Blob {
                    digest: descriptor.digest.clone(),
                    size: descriptor.size,
                },
                content_id: super::layer::content_id_of_diff_id(&diff_id),
                diff_id,
                media_type: descriptor.media_type.clone(),
            })
            .collect();
        let media = if parsed.media_type == MediaTypes::Docker.manifest() {
            MediaTypes::Docker
        } else {
            MediaTypes::Oci
        };
        Ok(Self {
            manifest: manifest.clone(),
            config: Blob {
                digest: parsed.config.digest,
                size: parsed.config.size,
            },
            layers,
            media,
        })
    }
}
