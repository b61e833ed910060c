//! Exporters: an image in the CAS to an OCI archive, a `docker load` archive, or one root
//! filesystem (a tar or a directory). Every blob is verified as it is read, and the same
//! image always gives the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::ImageError;
use super::entry::{Entry, Kind, Links, TarSink, Whiteout, read_entry, whiteout};
use super::layer::{Layer, LayerOptions, path_bytes};
use super::oci::{ImageConfig, Manifest, MediaTypes, canonical_json, index_json};
use super::unpack::{UnpackStats, Whiteouts, decompress, unpack};
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
                sink.append(&entry, open_blob(cas, &blob)?)?;
            }
        }
    }
    sink.finish().map_err(ImageError::Write)?;
    Ok(())
}

/// A blob's bytes, checked against its digest and size as they are read: the last read
/// fails instead of returning corrupt data's end (and the store repairs the damage). Read
/// it to the end ([`unpack()`] does).
pub fn open_blob(cas: &Cas, blob: &Blob) -> Result<impl Read + use<>, ImageError> {
    Ok(cas.open(blob)?)
}

/// Merges `layers` (bottom first) into one root filesystem in `dest`, whiteouts applied;
/// ownership is kept when running as root.
pub fn write_rootfs_dir(
    cas: &Cas,
    layers: &[Blob],
    dest: &Path,
) -> Result<UnpackStats, ImageError> {
    let mut stats = UnpackStats::default();
    for blob in layers {
        stats += unpack(open_blob(cas, blob)?, dest, Whiteouts::Apply)?;
    }
    Ok(stats)
}

/// Merges `layers` (bottom first) into one root-filesystem tar, whiteouts applied, entries
/// sorted by path, ownership and modes from the layers — no root needed, nothing chowned.
/// `opts` apply as to a layer: mtime clamp, skipped paths, ownership overrides.
///
/// Each layer is decompressed once into an anonymous temp file (in `$TMPDIR`) and indexed;
/// the surviving entries are then copied from those files in path order.
pub fn write_rootfs_tar(
    cas: &Cas,
    layers: &[Blob],
    opts: &LayerOptions<'_>,
    out: impl Write,
) -> Result<(), ImageError> {
    let mut tars = Vec::with_capacity(layers.len());
    let mut tree = Tree::default();
    for (layer, blob) in layers.iter().enumerate() {
        let mut tar = tempfile::tempfile().map_err(ImageError::io(std::env::temp_dir()))?;
        io::copy(&mut decompress(open_blob(cas, blob)?)?, &mut tar).map_err(|source| {
            ImageError::Blob {
                digest: blob.digest.clone(),
                source,
            }
        })?;
        tar.seek(SeekFrom::Start(0)).map_err(ImageError::Read)?;
        tree.add_layer(layer, &tar, opts)?;
        tars.push(tar);
    }

    let mut sink = TarSink::new(out, opts);
    let mut links = Links::new();
    for node in tree.nodes.into_values() {
        let Some(data) = node.data else {
            sink.append(&node.entry, io::empty())?;
            continue;
        };
        // Every path of a file is written with the file's own metadata.
        let mut entry = data.entry;
        entry.path = node.entry.path;
        if links.link(data.id, &mut entry) {
            sink.append(&entry, io::empty())?;
            continue;
        }
        let mut tar = &tars[data.id.layer];
        tar.seek(SeekFrom::Start(data.id.offset))
            .map_err(ImageError::Read)?;
        sink.append(&entry, tar.take(entry.size))?;
    }
    sink.finish().map_err(ImageError::Write)?;
    Ok(())
}

/// A file's data: where it starts in which layer's tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct InodeId {
    layer: usize,
    offset: u64,
}

#[derive(Debug, Clone)]
struct FileData {
    id: InodeId,
    /// The file's own entry: what every path linked to it is written with.
    entry: Entry,
}

#[derive(Debug)]
struct Node {
    entry: Entry,
    /// For files and hard links: the data they show.
    data: Option<FileData>,
    layer: usize,
}

/// The merged tree so far, by path bytes (the order the output is written in).
#[derive(Debug, Default)]
struct Tree {
    nodes: BTreeMap<Vec<u8>, Node>,
}

impl Tree {
    fn add_layer(
        &mut self,
        layer: usize,
        tar: &File,
        opts: &LayerOptions<'_>,
    ) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(tar);
        for item in archive.entries_with_seek().map_err(ImageError::Read)? {
            let mut item = item.map_err(ImageError::Read)?;
            if item.header().entry_type().is_gnu_sparse() {
                let path = String::from_utf8_lossy(&item.path_bytes()).into_owned();
                let reason = "GNU sparse files cannot be merged into a root filesystem tar";
                return Err(ImageError::Entry {
                    entry: path,
                    reason: reason.to_owned(),
                });
            }
            let offset = item.raw_file_position();
            let Some(entry) = read_entry(&mut item)? else {
                continue;
            };
            if opts.skips(&entry.path) {
                continue;
            }
            match whiteout(&entry.path) {
                Some(Whiteout::Remove(hidden)) => self.remove(&hidden),
                Some(Whiteout::Opaque(dir)) => self.remove_below(dir, |node| node.layer != layer),
                None => self.insert(layer, offset, entry)?,
            }
        }
        Ok(())
    }

    fn insert(&mut self, layer: usize, offset: u64, entry: Entry) -> Result<(), ImageError> {
        let data = match &entry.kind {
            Kind::File => Some(FileData {
                id: InodeId { layer, offset },
                entry: entry.clone(),
            }),
            Kind::HardLink(target) => {
                let linked = self
                    .nodes
                    .get(path_bytes(target))
                    .and_then(|node| node.data.clone())
                    .ok_or_else(|| {
                        ImageError::entry(
                            &entry.path,
                            format!(
                                "hard link to {}, not a file of the layers so far",
                                target.display()
                            ),
                        )
                    })?;
                Some(linked)
            }
            _ => None,
        };
        // Anything but a directory replacing a directory takes its contents with it.
        if entry.kind != Kind::Dir {
            self.remove_below(&entry.path, |_| true);
        }
        let key = path_bytes(&entry.path).to_vec();
        self.nodes.insert(key, Node { entry, data, layer });
        Ok(())
    }

    fn remove(&mut self, path: &Path) {
        self.nodes.remove(path_bytes(path));
        self.remove_below(path, |_| true);
    }

    fn remove_below(&mut self, dir: &Path, doomed: impl Fn(&Node) -> bool) {
        let mut prefix = path_bytes(dir).to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let below: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .filter(|(_, node)| doomed(node))
            .map(|(key, _)| key.clone())
            .collect();
        for key in below {
            self.nodes.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use tar::EntryType::{Directory as D, Regular as F};

    use super::*;
    use crate::image::layer::write_layer;
    use crate::image::oci::{Platform, manifest_json};
    use crate::image::testutil::{
        Listing, list_dir, list_tar, raw_tar, require_tool, sample_tree, store,
    };
    use crate::image::{ImageConfig, sys};
    use crate::store::Digest;

    /// Two layers: the sample tree, then one that deletes a hard-linked file (its other
    /// name keeps the data), hides `tmp` behind an opaque marker, replaces `bin/su` and
    /// adds a file.
    fn sample_image(cas: &Cas) -> ImageParts {
        let tree = tempfile::tempdir().expect("tree");
        sample_tree(tree.path(), 1_700_000_000);
        let first = write_layer(cas, tree.path(), &LayerOptions::default())
            .expect("write")
            .expect("layer");
        let tar = raw_tar(&[
            ("bin/su", F, "", b"replaced"),
            ("etc/.wh.conf", F, "", b""),
            ("new/", D, "", b""),
            ("new/file", F, "", b"new"),
            ("tmp/", D, "", b""),
            ("tmp/.wh..wh..opq", F, "", b""),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).expect("gzip");
        let second = Layer {
            blob: cas.put(&gz.finish().expect("gzip")).expect("put"),
            diff_id: Digest::of(&tar),
            media_type: MediaTypes::Oci.layer_gzip().to_owned(),
            content_id: [2; 32],
        };
        let layers = vec![first, second];
        let host = Platform::host();
        let config = ImageConfig {
            architecture: host.architecture,
            os: host.os,
            variant: host.variant,
            diff_ids: layers.iter().map(|layer| layer.diff_id.clone()).collect(),
            ..ImageConfig::default()
        };
        let config = cas.put(&config.to_json()).expect("config");
        let manifest = cas
            .put(&manifest_json(MediaTypes::Oci, &config, &layers))
            .expect("manifest");
        ImageParts {
            manifest,
            config,
            layers,
            media: MediaTypes::Oci,
        }
    }

    fn blobs(image: &ImageParts) -> Vec<Blob> {
        image
            .layers
            .iter()
            .map(|layer| layer.blob.clone())
            .collect()
    }

    fn rootfs_tar(cas: &Cas, image: &ImageParts) -> Vec<u8> {
        let mut out = Vec::new();
        write_rootfs_tar(cas, &blobs(image), &LayerOptions::default(), &mut out)
            .expect("rootfs tar");
        out
    }

    /// Without root, unpacked files belong to the caller: compare all but ownership.
    fn comparable(listing: Listing, keep_owners: bool) -> Listing {
        let strip = |line: String| {
            let mut fields: Vec<&str> = line.split(' ').collect();
            fields[2] = "-";
            fields.join(" ")
        };
        listing
            .into_iter()
            .map(|(path, line)| (path, if keep_owners { line } else { strip(line) }))
            .collect()
    }

    #[test]
    fn the_rootfs_tar_is_the_merged_tree() {
        let (_root, cas) = store();
        let image = sample_image(&cas);
        let tar = rootfs_tar(&cas, &image);
        assert_eq!(rootfs_tar(&cas, &image), tar, "deterministic");
        let listing = list_tar(tar.as_slice());
        assert!(!listing.contains_key("etc/conf") && !listing.contains_key("tmp/fifo"));
        assert!(
            listing["etc/conf.hard"].starts_with("file 640 "),
            "{listing:?}"
        );
        assert!(listing.contains_key("tmp") && listing.contains_key("new/file"));

        let dest = tempfile::tempdir().expect("dest");
        write_rootfs_dir(&cas, &blobs(&image), dest.path()).expect("rootfs dir");
        let as_root = sys::is_root();
        assert_eq!(
            comparable(list_dir(dest.path()), as_root),
            comparable(listing, as_root)
        );
    }

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
        let dest = tempfile::tempdir().expect("dest");
        write_rootfs_dir(&cas, &blobs(&image), dest.path()).expect_err("corrupt layer");
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

    #[test]
    fn umoci_and_skopeo_accept_our_archives() {
        let test = "umoci_and_skopeo_accept_our_archives";
        if !require_tool("umoci", test) || !require_tool("skopeo", test) {
            return;
        }
        let (_root, cas) = store();
        let image = sample_image(&cas);
        let work = tempfile::tempdir().expect("work");
        let file = work.path().join("image.tar");
        let out = File::create(&file).expect("create");
        write_oci_archive(&cas, &image, Some("latest"), out).expect("archive");

        let run = |command: &mut Command| {
            let output = command.output().expect("run");
            assert!(
                output.status.success(),
                "{command:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        };
        let inspect = run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", file.display())));
        let inspect: serde_json::Value = serde_json::from_slice(&inspect).expect("json");
        assert_eq!(
            inspect["Layers"].as_array().map(Vec::len),
            Some(2),
            "{inspect}"
        );
        // A copy reads every blob and checks its digest.
        run(Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci-archive:{}", file.display()))
            .arg(format!("dir:{}", work.path().join("copy").display())));

        let docker = work.path().join("docker.tar");
        let tags = ["memobuild/test:latest".to_owned()];
        write_docker_archive(&cas, &image, &tags, File::create(&docker).expect("create"))
            .expect("docker archive");
        let inspect = run(Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}", docker.display())));
        let inspect: serde_json::Value = serde_json::from_slice(&inspect).expect("json");
        assert_eq!(
            inspect["Layers"].as_array().map(Vec::len),
            Some(2),
            "{inspect}"
        );

        let layout = work.path().join("layout");
        std::fs::create_dir(&layout).expect("mkdir");
        run(Command::new("tar")
            .arg("-xf")
            .arg(&file)
            .arg("-C")
            .arg(&layout));
        let bundle = work.path().join("bundle");
        let as_root = sys::is_root();
        let mut umoci = Command::new("umoci");
        umoci.arg("unpack");
        if !as_root {
            umoci.arg("--rootless");
        }
        run(umoci
            .arg("--image")
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle));
        let rootfs = rootfs_tar(&cas, &image);
        let ours = comparable(list_tar(rootfs.as_slice()), as_root);
        assert_eq!(comparable(list_dir(&bundle.join("rootfs")), as_root), ours);

        // GNU tar reads our headers (PAX names, links, xattrs) the same way.
        let gnu = work.path().join("gnu");
        std::fs::create_dir(&gnu).expect("mkdir");
        std::fs::write(work.path().join("rootfs.tar"), &rootfs).expect("write");
        run(Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(work.path().join("rootfs.tar"))
            .arg("-C")
            .arg(&gnu));
        assert_eq!(comparable(list_dir(&gnu), as_root), ours);
    }
}
