//! An image's blobs as an OCI image layout in a tar, and the same with Docker's
//! `manifest.json` for `docker load`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

use serde_json::json;

use crate::image::entry::{Entry, Kind, TarSink};
use crate::image::oci::{ImageConfig, canonical_json, index_json};
use crate::image::{ImageError, ImageParts, LayerOptions};
use crate::store::{Blob, Cas};

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// An OCI image layout as a tar (`oci-archive:` for skopeo; umoci after extraction).
pub fn write_oci_archive(
    cas: &Cas,
    image: &ImageParts,
    ref_name: Option<&str>,
    out: impl Write,
) -> Result<(), ImageError> {
    let files = oci_layout(cas, image, ref_name)?;
    write_archive(cas, files, out)
}

/// What `docker load` reads: its `manifest.json` beside an OCI layout, as `docker save`
/// writes since Docker 25. Layers stay gzip-compressed; `docker load` decompresses them.
pub fn write_docker_archive(
    cas: &Cas,
    image: &ImageParts,
    repo_tags: &[String],
    out: impl Write,
) -> Result<(), ImageError> {
    let mut files = oci_layout(cas, image, repo_tags.first().map(String::as_str))?;
    let layers: Vec<String> = image.layers.iter().map(|l| blob_path(&l.blob)).collect();
    let manifest = json!([{
        "Config": blob_path(&image.config),
        "RepoTags": repo_tags,
        "Layers": layers,
    }]);
    files.insert(
        "manifest.json".to_owned(),
        Content::Bytes(canonical_json(&manifest)),
    );
    write_archive(cas, files, out)
}

/// A file of an archive being written, by path.
enum Content {
    Dir,
    Bytes(Vec<u8>),
    Blob(Blob),
}

fn blob_path(blob: &Blob) -> String {
    format!("blobs/sha256/{}", blob.digest.hex())
}

fn oci_layout(
    cas: &Cas,
    image: &ImageParts,
    ref_name: Option<&str>,
) -> Result<BTreeMap<String, Content>, ImageError> {
    let config = ImageConfig::parse(&cas.read(&image.config.digest)?)?;
    let index = index_json(&image.manifest, image.media, &config.platform(), ref_name);
    let mut files = BTreeMap::new();
    files.insert("oci-layout".to_owned(), Content::Bytes(OCI_LAYOUT.to_vec()));
    files.insert("index.json".to_owned(), Content::Bytes(index));
    files.insert("blobs".to_owned(), Content::Dir);
    files.insert("blobs/sha256".to_owned(), Content::Dir);
    let blobs = [&image.manifest, &image.config]
        .into_iter()
        .chain(image.layers.iter().map(|layer| &layer.blob));
    for blob in blobs {
        files.insert(blob_path(blob), Content::Blob(blob.clone()));
    }
    Ok(files)
}

/// Writes `files` in path order, owned by root, mtime 0.
fn write_archive(
    cas: &Cas,
    files: BTreeMap<String, Content>,
    out: impl Write,
) -> Result<(), ImageError> {
    let opts = LayerOptions::default();
    let mut sink = TarSink::new(out, &opts);
    for (path, content) in files {
        let mut entry = Entry {
            path: PathBuf::from(path),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            xattrs: Vec::new(),
        };
        match content {
            Content::Dir => {
                entry.kind = Kind::Dir;
                entry.mode = 0o755;
                sink.append(&entry, io::empty())?;
            }
            Content::Bytes(bytes) => {
                entry.size = bytes.len() as u64;
                sink.append(&entry, bytes.as_slice())?;
            }
            Content::Blob(blob) => {
                entry.size = blob.size;
                sink.append(&entry, cas.open(&blob)?)?;
            }
        }
    }
    sink.finish().map_err(ImageError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::export::tests::sample_image;
    use crate::image::testutil::store;

    fn archive_paths(archive: &[u8]) -> Vec<String> {
        let mut tar = tar::Archive::new(archive);
        let entries = tar.entries().expect("entries");
        entries
            .map(|entry| {
                let entry = entry.expect("entry");
                String::from_utf8_lossy(&entry.path_bytes()).into_owned()
            })
            .collect()
    }

    #[test]
    fn oci_archives_are_deterministic_and_blobs_verified() {
        let (_root, cas) = store();
        let image = sample_image(&cas);
        let write = || {
            let mut out = Vec::new();
            write_oci_archive(&cas, &image, Some("latest"), &mut out).map(|()| out)
        };
        let archive = write().expect("archive");
        assert_eq!(write().expect("again"), archive);
        let paths = archive_paths(&archive);
        assert_eq!(paths.len(), 2 + 4 + 2, "{paths:?}");
        assert_eq!(&paths[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(&paths[6..], ["index.json", "oci-layout"]);

        let layer = &image.layers[0].blob;
        let mut damaged = std::fs::read(cas.path(&layer.digest)).expect("read");
        damaged[100] ^= 1;
        std::fs::write(cas.path(&layer.digest), damaged).expect("damage");
        let err = write().expect_err("corrupt blob");
        assert!(err.to_string().contains(layer.digest.as_str()), "{err}");
    }

    #[test]
    fn docker_archives_carry_manifest_json() {
        let (_root, cas) = store();
        let image = sample_image(&cas);
        let mut archive = Vec::new();
        let tags = ["app:latest".to_owned(), "app:v1".to_owned()];
        write_docker_archive(&cas, &image, &tags, &mut archive).expect("archive");
        let paths = archive_paths(&archive);
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut manifest = Vec::new();
        for entry in tar.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            if entry.path_bytes().as_ref() == b"manifest.json" {
                entry.read_to_end(&mut manifest).expect("read");
            }
        }
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
        let image_entry = &manifest[0];
        assert_eq!(image_entry["RepoTags"], json!(tags));
        let config = image_entry["Config"].as_str().expect("config");
        assert_eq!(
            config,
            format!("blobs/sha256/{}", image.config.digest.hex())
        );
        let layers = image_entry["Layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 2);
        for path in layers
            .iter()
            .map(|l| l.as_str().expect("str"))
            .chain([config])
        {
            assert!(
                paths.iter().any(|p| p == path),
                "{path} missing from {paths:?}"
            );
        }
        assert!(paths.iter().any(|p| p == "index.json"));
    }
}
