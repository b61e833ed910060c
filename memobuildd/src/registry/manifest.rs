//! The parts of manifests and indexes that pulling needs, for both the OCI and the Docker
//! schema-2 spellings (same shape, different media types), and platform selection.

use serde::Deserialize;

use crate::store::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What we ask a registry for, in the `Accept` header.
pub(super) const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Layer media types whose content we can unpack.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

pub use crate::image::oci::Platform;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    #[serde(deserialize_with = "digest")]
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

fn digest<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
    let text = String::deserialize(d)?;
    Digest::parse(&text).map_err(serde::de::Error::custom)
}

/// A manifest or an index, told apart by media type (or, when a lax OCI document leaves
/// it out, by whether it lists manifests).
#[derive(Debug)]
pub(super) enum Document {
    Manifest {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index {
        manifests: Vec<Descriptor>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Why a manifest or index cannot be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum DocumentError {
    #[error("not a manifest: {0}")]
    Json(#[from] serde_json::Error),
    #[error("schema version {0} is not supported (only 2)")]
    Schema(u32),
    #[error("media type {0} is not an image manifest or index")]
    MediaType(String),
    #[error("the manifest has no config")]
    NoConfig,
    #[error("layer {digest} has media type {media_type}, which cannot be unpacked")]
    LayerType { digest: Digest, media_type: String },
}

impl Document {
    pub(super) fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        let raw: Raw = serde_json::from_slice(bytes)?;
        if raw.schema_version != 2 {
            return Err(DocumentError::Schema(raw.schema_version));
        }
        let media_type = match (raw.media_type, &raw.manifests) {
            (Some(media_type), _) => media_type,
            (None, Some(_)) => OCI_INDEX.to_owned(),
            (None, None) => OCI_MANIFEST.to_owned(),
        };
        match media_type.as_str() {
            OCI_INDEX | DOCKER_LIST => Ok(Self::Index {
                manifests: raw.manifests.unwrap_or_default(),
            }),
            OCI_MANIFEST | DOCKER_MANIFEST => {
                let config = raw.config.ok_or(DocumentError::NoConfig)?;
                if let Some(layer) = raw
                    .layers
                    .iter()
                    .find(|l| !LAYER_TYPES.contains(&l.media_type.as_str()))
                {
                    return Err(DocumentError::LayerType {
                        digest: layer.digest.clone(),
                        media_type: layer.media_type.clone(),
                    });
                }
                Ok(Self::Manifest {
                    media_type,
                    config,
                    layers: raw.layers,
                })
            }
            _ => Err(DocumentError::MediaType(media_type)),
        }
    }
}

/// The first index entry that serves `wanted`, or every platform the index offers.
pub(super) fn select<'a>(
    manifests: &'a [Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor, Vec<Platform>> {
    manifests
        .iter()
        .find(|m| m.platform.as_ref().is_some_and(|p| wanted.accepts(p)))
        .ok_or_else(|| {
            manifests
                .iter()
                .filter_map(|m| m.platform.clone())
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn index(media_type: &str) -> String {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": digest(1), "size": 10,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": digest(2), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
                {"mediaType": OCI_MANIFEST, "digest": digest(3), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": OCI_MANIFEST, "digest": digest(4), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": digest(5), "size": 10,
                 "platform": {"os": "unknown", "architecture": "unknown"}},
            ]
        })
        .to_string()
    }

    fn platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn platform_selection_from_an_index() {
        for media_type in [OCI_INDEX, DOCKER_LIST] {
            let Document::Index { manifests } =
                Document::parse(index(media_type).as_bytes()).expect("parse")
            else {
                panic!("not an index");
            };
            let pick = |p: Platform| select(&manifests, &p).map(|d| d.digest.to_string());
            assert_eq!(pick(platform("linux", "amd64", None)), Ok(digest(1)));
            assert_eq!(pick(platform("linux", "arm", Some("v7"))), Ok(digest(3)));
            assert_eq!(pick(platform("linux", "arm", None)), Ok(digest(2)));
            assert_eq!(pick(platform("linux", "arm64", None)), Ok(digest(4)));
            assert_eq!(pick(platform("linux", "arm64", Some("v8"))), Ok(digest(4)));
            let available = pick(platform("windows", "amd64", None)).expect_err("no match");
            assert_eq!(available.len(), 5);
            assert_eq!(available[2].to_string(), "linux/arm/v7");
        }
    }

    #[test]
    fn manifests_of_both_spellings_and_their_layer_types() {
        let manifest = |media_type: Option<&str>, layer_type: &str| {
            let mut doc = serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": "x", "digest": digest(9), "size": 2},
                "layers": [{"mediaType": layer_type, "digest": digest(8), "size": 3}],
            });
            if let Some(media_type) = media_type {
                doc["mediaType"] = media_type.into();
            }
            Document::parse(doc.to_string().as_bytes())
        };
        for (media_type, layer_type) in [
            (
                Some(DOCKER_MANIFEST),
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
            (
                Some(OCI_MANIFEST),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            (None, "application/vnd.oci.image.layer.v1.tar"),
        ] {
            let Document::Manifest {
                media_type: got, ..
            } = manifest(media_type, layer_type).expect("manifest")
            else {
                panic!("not a manifest");
            };
            assert_eq!(got, media_type.unwrap_or(OCI_MANIFEST));
        }
        let err = manifest(
            Some(DOCKER_MANIFEST),
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        )
        .expect_err("foreign layer");
        assert!(err.to_string().contains(&digest(8)), "{err}");
        let schema1 = r#"{"schemaVersion": 1, "name": "x", "fsLayers": []}"#;
        assert!(matches!(
            Document::parse(schema1.as_bytes()),
            Err(DocumentError::Schema(1))
        ));
    }

    #[test]
    fn host_platform_is_linux() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert!(host.accepts(&host));
    }
}
