//! The OCI image model: image config, manifest, index, platform — and their canonical JSON.
//!
//! Our own serde types rather than `oci-spec`: its maps are `HashMap`s and its builders make
//! every field optional, so we would convert to our shape and to sorted JSON anyway; what we
//! need is a page of types whose field names are the spec's. Output goes through
//! `canonical_json` (sorted keys, no whitespace, empty fields omitted as Docker and BuildKit
//! omit them), so the same config always has the same digest. Parsing accepts both OCI and
//! Docker schema-2 documents, including the `null`s Docker writes for empty lists.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{Error as _, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};

use super::{ImageError, Layer};
use crate::store::{Blob, Digest};

/// Where an image runs, with Go's names (`linux/amd64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this daemon runs on, as registries name it.
    pub fn host() -> Self {
        let os = match std::env::consts::OS {
            "macos" => "darwin",
            os => os,
        };
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            arch => (arch, None),
        };
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Whether an index entry for `offered` serves a request for `self`. An unset variant
    /// on either side matches any, and arm64's only variant, v8, is often left out.
    pub fn accepts(&self, offered: &Platform) -> bool {
        let variant = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_owned),
        };
        self.os == offered.os
            && self.architecture == offered.architecture
            && match (variant(self), variant(offered)) {
                (Some(wanted), Some(got)) => wanted == got,
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

/// An image config (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    // Always written, even empty, as Docker and BuildKit do.
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: RuntimeConfig,
    /// The uncompressed digests of the layers, bottom first (`rootfs.diff_ids`).
    #[serde(rename = "rootfs", with = "rootfs")]
    pub diff_ids: Vec<Digest>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<History>,
}

/// What a container of the image starts with (the config's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    #[serde(
        default,
        deserialize_with = "empty_as_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub user: Option<String>,
    /// `80/tcp`, `53/udp`.
    #[serde(
        default,
        with = "object_set",
        skip_serializing_if = "BTreeSet::is_empty"
    )]
    pub exposed_ports: BTreeSet<String>,
    /// `KEY=value`, in order.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        default,
        with = "object_set",
        skip_serializing_if = "BTreeSet::is_empty"
    )]
    pub volumes: BTreeSet<String>,
    #[serde(
        default,
        deserialize_with = "empty_as_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "empty_as_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub on_build: Vec<String>,
}

/// Docker's `HEALTHCHECK`; durations in nanoseconds, as Docker stores them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// One step of the image's history; `empty_layer` steps made no layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "image config",
            source,
        })
    }

    /// Canonical JSON: the same config always gives the same bytes, hence the same digest.
    pub fn to_json(&self) -> Vec<u8> {
        canonical_json(self)
    }

    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// The media types of one family. OCI is the default; Docker's schema 2 is for registries and
/// tools that predate OCI.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MediaTypes {
    #[default]
    Oci,
    Docker,
}

const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
// Docker never registered a plain-tar layer type of its own; this is what moby writes.
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

impl MediaTypes {
    pub const fn manifest(self) -> &'static str {
        match self {
            Self::Oci => "application/vnd.oci.image.manifest.v1+json",
            Self::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }

    /// An OCI index or a Docker manifest list.
    pub const fn index(self) -> &'static str {
        match self {
            Self::Oci => "application/vnd.oci.image.index.v1+json",
            Self::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }

    pub const fn config(self) -> &'static str {
        match self {
            Self::Oci => "application/vnd.oci.image.config.v1+json",
            Self::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }

    pub const fn layer_gzip(self) -> &'static str {
        match self {
            Self::Oci => OCI_LAYER_GZIP,
            Self::Docker => DOCKER_LAYER_GZIP,
        }
    }

    pub const fn layer_tar(self) -> &'static str {
        match self {
            Self::Oci => OCI_LAYER_TAR,
            Self::Docker => DOCKER_LAYER_TAR,
        }
    }

    /// A layer's media type in this family; types with no equivalent (zstd in Docker's)
    /// are kept, as Docker itself does.
    pub fn layer_like(self, media_type: &str) -> &str {
        match media_type {
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => self.layer_gzip(),
            OCI_LAYER_TAR | DOCKER_LAYER_TAR => self.layer_tar(),
            other => other,
        }
    }
}

/// A manifest naming `config` and `layers`, bottom layer first.
pub fn manifest_json(media: MediaTypes, config: &Blob, layers: &[Layer]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|layer| descriptor(media.layer_like(&layer.media_type), &layer.blob))
        .collect();
    canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": media.manifest(),
        "config": descriptor(media.config(), config),
        "layers": layers,
    }))
}

/// The `index.json` of an OCI layout holding one manifest.
pub fn index_json(
    manifest: &Blob,
    media: MediaTypes,
    platform: &Platform,
    ref_name: Option<&str>,
) -> Vec<u8> {
    let mut entry = descriptor(media.manifest(), manifest);
    entry["platform"] = json!(platform);
    if let Some(name) = ref_name {
        entry["annotations"] = json!({ "org.opencontainers.image.ref.name": name });
    }
    canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": MediaTypes::Oci.index(),
        "manifests": [entry],
    }))
}

fn descriptor(media_type: &str, blob: &Blob) -> Value {
    json!({ "mediaType": media_type, "digest": blob.digest.as_str(), "size": blob.size })
}

/// A reference to a blob, as manifests and indexes hold them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    #[serde(with = "digest_string")]
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image manifest (OCI or Docker schema 2) as pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An OCI index or Docker manifest list as pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// Both documents in one shape, so that each parser can say what it got instead.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: u32,
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default, deserialize_with = "null_as_default")]
    layers: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
}

impl Document {
    fn parse(bytes: &[u8], what: &'static str) -> Result<Self, ImageError> {
        let doc: Self =
            serde_json::from_slice(bytes).map_err(|source| ImageError::Json { what, source })?;
        if doc.schema_version != 2 {
            return Err(ImageError::Invalid {
                what,
                reason: format!("schemaVersion {} (only 2 is supported)", doc.schema_version),
            });
        }
        Ok(doc)
    }
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        const WHAT: &str = "image manifest";
        let doc = Document::parse(bytes, WHAT)?;
        let media_type = doc
            .media_type
            .unwrap_or_else(|| MediaTypes::Oci.manifest().to_owned());
        let known = [MediaTypes::Oci, MediaTypes::Docker].map(MediaTypes::manifest);
        let (true, Some(config)) = (known.contains(&media_type.as_str()), doc.config) else {
            return Err(ImageError::Invalid {
                what: WHAT,
                reason: format!("a {media_type} document with no config is not an image manifest"),
            });
        };
        Ok(Self {
            media_type,
            config,
            layers: doc.layers,
        })
    }
}

impl Index {
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        const WHAT: &str = "image index";
        let doc = Document::parse(bytes, WHAT)?;
        let media_type = doc
            .media_type
            .unwrap_or_else(|| MediaTypes::Oci.index().to_owned());
        let known = [MediaTypes::Oci, MediaTypes::Docker].map(MediaTypes::index);
        let (true, Some(manifests)) = (known.contains(&media_type.as_str()), doc.manifests) else {
            return Err(ImageError::Invalid {
                what: WHAT,
                reason: format!("a {media_type} document with no manifests is not an index"),
            });
        };
        Ok(Self {
            media_type,
            manifests,
        })
    }

    /// The manifest for `platform`: the first that serves it, preferring an exact variant.
    /// Attestations (platform `unknown/unknown`) never match.
    pub fn select(&self, platform: &Platform) -> Option<Descriptor> {
        self.manifests
            .iter()
            .filter(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(p)))
            .min_by_key(|d| d.platform.as_ref().map(|p| p.variant != platform.variant))
            .cloned()
    }
}

/// JSON with object keys sorted and no whitespace. Done here rather than trusting serde_json's
/// map order, which a `preserve_order` feature anywhere in the build would silently change.
pub(crate) fn canonical_json(value: &impl Serialize) -> Vec<u8> {
    let value = serde_json::to_value(value).expect("model types have string keys only");
    let mut out = Vec::new();
    write_canonical(&value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    serde_json::to_writer(out, value).expect("writing JSON to a Vec cannot fail");
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Docker writes `"User": ""` for "not set".
fn empty_as_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.filter(|s| !s.is_empty()))
}

/// A set written as an object of empty objects (`"ExposedPorts": {"80/tcp": {}}`), Go's way.
mod object_set {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        set: &BTreeSet<String>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(set.iter().map(|key| (key, BTreeMap::<(), ()>::new())))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeSet<String>, D::Error> {
        let map: Option<BTreeMap<String, IgnoredAny>> = Option::deserialize(deserializer)?;
        Ok(map.unwrap_or_default().into_keys().collect())
    }
}

mod rootfs {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct RootFs {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default, deserialize_with = "null_as_default")]
        diff_ids: Vec<String>,
    }

    pub(super) fn serialize<S: Serializer>(
        diff_ids: &[Digest],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        RootFs {
            kind: "layers".to_owned(),
            diff_ids: diff_ids.iter().map(Digest::to_string).collect(),
        }
        .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Digest>, D::Error> {
        let rootfs = RootFs::deserialize(deserializer)?;
        if rootfs.kind != "layers" {
            return Err(D::Error::custom(format!(
                "rootfs type {:?}, expected \"layers\"",
                rootfs.kind
            )));
        }
        rootfs
            .diff_ids
            .iter()
            .map(|id| Digest::parse(id).map_err(D::Error::custom))
            .collect()
    }
}

mod digest_string {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        digest: &Digest,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(digest.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Digest, D::Error> {
        Digest::parse(&String::deserialize(deserializer)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn full_config() -> ImageConfig {
        ImageConfig {
            architecture: "arm".into(),
            os: "linux".into(),
            variant: Some("v7".into()),
            created: Some("2026-01-02T03:04:05Z".into()),
            config: RuntimeConfig {
                user: Some("app:app".into()),
                exposed_ports: ["80/tcp".into(), "53/udp".into()].into(),
                env: vec!["PATH=/usr/bin:/bin".into(), "A=<&>".into()],
                entrypoint: Some(vec!["/entry".into()]),
                cmd: Some(vec![]),
                volumes: ["/data".into()].into(),
                working_dir: Some("/srv".into()),
                labels: [("b".into(), "2".into()), ("a".into(), "1".into())].into(),
                stop_signal: Some("SIGQUIT".into()),
                healthcheck: Some(Healthcheck {
                    test: vec!["CMD".into(), "true".into()],
                    interval: Some(30_000_000_000),
                    timeout: None,
                    start_period: Some(1),
                    start_interval: Some(2),
                    retries: Some(3),
                }),
                shell: Some(vec!["/bin/sh".into(), "-c".into()]),
                on_build: vec!["RUN true".into()],
            },
            diff_ids: vec![digest(1), digest(2)],
            history: vec![
                History {
                    created_by: Some("COPY . /srv".into()),
                    ..History::default()
                },
                History {
                    comment: Some("metadata".into()),
                    empty_layer: true,
                    ..History::default()
                },
            ],
        }
    }

    #[test]
    fn config_round_trips_through_canonical_json() {
        let config = full_config();
        let json = config.to_json();
        assert_eq!(ImageConfig::parse(&json).expect("parse"), config);
        let text = String::from_utf8(json).expect("utf-8");
        assert!(
            !text.contains(": ") && !text.contains(", ") && !text.contains('\n'),
            "{text}"
        );
        assert!(
            text.starts_with(r#"{"architecture":"arm","config":{"Cmd":[],"Entrypoint""#),
            "{text}"
        );
        assert!(
            text.contains(r#""ExposedPorts":{"53/udp":{},"80/tcp":{}}"#),
            "{text}"
        );
        assert!(text.contains(r#""rootfs":{"diff_ids":["sha256:"#), "{text}");
        assert!(text.contains(r#"{"created_by":"COPY . /srv"}"#), "{text}");
    }

    #[test]
    fn empty_fields_are_omitted_and_insertion_order_does_not_matter() {
        let empty = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..ImageConfig::default()
        };
        assert_eq!(
            String::from_utf8(empty.to_json()).expect("utf-8"),
            r#"{"architecture":"amd64","config":{},"os":"linux","rootfs":{"diff_ids":[],"type":"layers"}}"#
        );

        let mut a = full_config();
        let mut b = full_config();
        a.config.labels.clear();
        b.config.labels.clear();
        for (key, value) in [("z", "1"), ("m", "2"), ("a", "3")] {
            a.config.labels.insert(key.into(), value.into());
        }
        for (key, value) in [("a", "3"), ("z", "1"), ("m", "2")] {
            b.config.labels.insert(key.into(), value.into());
        }
        b.config.exposed_ports = ["53/udp".into(), "80/tcp".into()]
            .into_iter()
            .rev()
            .collect();
        assert_eq!(a.to_json(), b.to_json());
        assert_eq!(Digest::of(&a.to_json()), Digest::of(&b.to_json()));
    }

    /// Shaped like `docker inspect`'s view of a Docker Hub image config, nulls and all.
    const DOCKER_HUB_CONFIG: &str = r##"{
      "architecture": "amd64",
      "config": {
        "Hostname": "",
        "Domainname": "",
        "User": "",
        "AttachStdin": false,
        "ExposedPorts": {"80/tcp": {}},
        "Tty": false,
        "Env": [
          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "NGINX_VERSION=1.27.3"
        ],
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Image": "",
        "Volumes": null,
        "WorkingDir": "",
        "Entrypoint": ["/docker-entrypoint.sh"],
        "OnBuild": null,
        "Labels": {"maintainer": "NGINX Docker Maintainers \u003cdocker-maint@nginx.com\u003e"},
        "StopSignal": "SIGQUIT",
        "Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"], "Interval": 30000000000, "Retries": 3}
      },
      "container": "3f3e4a2b",
      "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) CMD [\"nginx\"]"]},
      "created": "2024-11-26T18:42:08Z",
      "docker_version": "20.10.23",
      "history": [
        {"created": "2024-11-11T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:1a2b in / "},
        {"created": "2024-11-11T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"bash\"]", "empty_layer": true},
        {"created": "2024-11-26T18:42:08Z", "created_by": "RUN /bin/sh -c set -x && apt-get update # buildkit", "comment": "buildkit.dockerfile.v0"}
      ],
      "os": "linux",
      "rootfs": {
        "type": "layers",
        "diff_ids": [
          "sha256:c0f1022b22a9f9b4b1d0e54c3b6a6d3a8f2f4b1e1b9d1e5d2c9e0a3f4b5c6d7e",
          "sha256:1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988"
        ]
      }
    }"##;

    #[test]
    fn a_docker_hub_config_parses() {
        let config = ImageConfig::parse(DOCKER_HUB_CONFIG.as_bytes()).expect("parse");
        assert_eq!(config.platform().to_string(), "linux/amd64");
        assert_eq!(config.config.user, None);
        assert_eq!(config.config.working_dir, None);
        assert!(config.config.volumes.is_empty() && config.config.on_build.is_empty());
        assert_eq!(config.config.exposed_ports, ["80/tcp".to_owned()].into());
        assert_eq!(config.config.cmd.as_ref().map(Vec::len), Some(3));
        assert_eq!(
            config.config.labels["maintainer"],
            "NGINX Docker Maintainers <docker-maint@nginx.com>"
        );
        let health = config.config.healthcheck.as_ref().expect("healthcheck");
        assert_eq!(
            (health.interval, health.retries, health.timeout),
            (Some(30_000_000_000), Some(3), None)
        );
        assert_eq!(config.diff_ids.len(), 2);
        assert_eq!(config.history.len(), 3);
        assert!(config.history[1].empty_layer);
        assert_eq!(
            config.history[2].comment.as_deref(),
            Some("buildkit.dockerfile.v0")
        );
        assert_eq!(
            ImageConfig::parse(&config.to_json()).expect("reparse"),
            config
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(ImageConfig::parse(b"{").is_err());
        let bad_digest = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["md5:x"]}}"#;
        assert!(ImageConfig::parse(bad_digest).is_err());
    }

    fn blob(n: u8, size: u64) -> Blob {
        Blob {
            digest: digest(n),
            size,
        }
    }

    #[test]
    fn manifests_and_indexes_round_trip() {
        let layers = [
            Layer {
                blob: blob(3, 30),
                diff_id: digest(4),
                media_type: MediaTypes::Oci.layer_gzip().into(),
                content_id: [4; 32],
            },
            Layer {
                blob: blob(5, 50),
                diff_id: digest(6),
                media_type: MediaTypes::Oci.layer_tar().into(),
                content_id: [6; 32],
            },
        ];
        for media in [MediaTypes::Oci, MediaTypes::Docker] {
            let json = manifest_json(media, &blob(1, 10), &layers);
            let manifest = Manifest::parse(&json).expect("parse");
            assert_eq!(manifest.media_type, media.manifest());
            assert_eq!(manifest.config.media_type, media.config());
            assert_eq!(manifest.config.digest, digest(1));
            assert_eq!(manifest.layers[0].media_type, media.layer_gzip());
            assert_eq!(manifest.layers[1].media_type, media.layer_tar());
            assert_eq!(manifest.layers[1].size, 50);
            assert!(Index::parse(&json).is_err(), "a manifest is not an index");
        }
        let json = index_json(&blob(7, 70), MediaTypes::Oci, &Platform::host(), Some("v1"));
        let text = String::from_utf8(json.clone()).expect("utf-8");
        assert!(text.contains(r#""annotations":{"org.opencontainers.image.ref.name":"v1"}"#));
        let index = Index::parse(&json).expect("index");
        assert_eq!(
            index.select(&Platform::host()).expect("host").digest,
            digest(7)
        );
        assert!(
            Manifest::parse(&json).is_err(),
            "an index is not a manifest"
        );
    }

    #[test]
    fn a_manifest_list_selects_by_platform() {
        let entry = |n: u8, arch: &str, variant: Option<&str>| {
            json!({
                "mediaType": MediaTypes::Docker.manifest(),
                "digest": digest(n).as_str(),
                "size": 100,
                "platform": {"architecture": arch, "os": if arch == "unknown" { "unknown" } else { "linux" }, "variant": variant}
            })
        };
        let list = json!({
            "schemaVersion": 2,
            "mediaType": MediaTypes::Docker.index(),
            "manifests": [
                entry(1, "amd64", None),
                entry(2, "arm", Some("v6")),
                entry(3, "arm", Some("v7")),
                entry(4, "arm64", None),
                entry(5, "unknown", None),
            ]
        });
        let index = Index::parse(&serde_json::to_vec(&list).expect("json")).expect("parse");
        let pick = |os: &str, arch: &str, variant: Option<&str>| {
            let platform = Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            };
            index.select(&platform).map(|d| d.digest)
        };
        assert_eq!(pick("linux", "amd64", None), Some(digest(1)));
        assert_eq!(pick("linux", "arm", Some("v7")), Some(digest(3)));
        assert_eq!(pick("linux", "arm64", Some("v8")), Some(digest(4)));
        assert_eq!(pick("linux", "s390x", None), None);
        assert_eq!(pick("windows", "amd64", None), None);
    }

    #[test]
    fn host_platform_uses_go_names() {
        let host = Platform::host();
        assert!(!["x86_64", "aarch64"].contains(&host.architecture.as_str()));
        assert_eq!(host.to_string().split('/').next(), Some(host.os.as_str()));
        let arm = Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: Some("v7".into()),
        };
        assert_eq!(arm.to_string(), "linux/arm/v7");
    }
}
