//! Exporters: a built image out of the store in the format an `-o` output asks for, written
//! to a sink. The formats are an OCI image layout and a `docker load` archive (each a tar of
//! the image's blobs, in [`archive`]) and the root filesystem as one tar ([`rootfs`]); the
//! sink is any [`Write`]: in the daemon, [`Chunks`], which hands the bytes to the connection
//! that streams them to the client (`server::build`); in tests, a `Vec` or a file.
//!
//! Nothing here writes a path outside the store: the client writes every output itself —
//! a file, or for `type=local` and `tar=false` a directory it unpacks the tar into — so it
//! lands where, and as whom, the caller could write. Blobs are verified as they are read (a
//! damaged one fails the export and is repaired by the store), and the same image always
//! gives the same bytes.
//!
//! The stage before is `engine` (a built image and its lease); the next is `server`.

mod archive;
mod rootfs;
mod sink;

use std::io::Write;
use std::path::Path;

pub use archive::{write_docker_archive, write_oci_archive};
pub use rootfs::write_rootfs_tar;
pub use sink::{CHUNK_BYTES, Chunks};

use crate::engine::{ImageForm, image_as, normalize_tag};
use crate::image::oci::MediaTypes;
use crate::image::{Compression, ImageError, ImageParts, LayerOptions};
use crate::store::{Lease, StoreError};

/// What an output is made of.
#[derive(Debug, Clone, Copy)]
pub enum Format {
    /// An OCI image layout in a tar, its layers in this form.
    Oci(ImageForm),
    /// A `docker load` archive: Docker's media types and gzip layers, as `docker save`.
    Docker,
    /// The merged root filesystem in one tar (`type=tar`, and `type=local` unpacked by the
    /// client).
    RootfsTar,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("preparing the image's layers: {0}")]
    Layers(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Writes `image` as `format` to `out`. `tags` name the image inside OCI and Docker archives;
/// `scratch` (under the store's root) holds the rootfs merge's temp files. Blocks: call it
/// from a blocking thread. The lease holds every blob read, and any layer form made now.
pub fn write(
    lease: &Lease,
    image: &ImageParts,
    format: Format,
    tags: &[String],
    scratch: &Path,
    mut out: impl Write,
) -> Result<(), ExportError> {
    let cas = &lease.cas();
    match format {
        Format::Oci(form) => {
            let image = image_as(lease, image, &form)?;
            write_oci_archive(cas, &image, tags.first().map(String::as_str), &mut out)?;
        }
        Format::Docker => {
            let tags: Vec<String> = tags.iter().map(|t| normalize_tag(t)).collect();
            let docker = ImageForm {
                compression: Compression::Gzip,
                force: false,
                media: MediaTypes::Docker,
            };
            let image = image_as(lease, image, &docker)?;
            write_docker_archive(cas, &image, &tags, &mut out)?;
        }
        Format::RootfsTar => {
            let blobs: Vec<_> = image.layers.iter().map(|l| l.blob.clone()).collect();
            write_rootfs_tar(cas, &blobs, &LayerOptions::default(), scratch, &mut out)?;
        }
    }
    out.flush().map_err(ImageError::Write)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs::File;
    use std::io;
    use std::process::Command;

    use tar::EntryType::{Directory as D, Regular as F};

    use super::rootfs::tests::{comparable, rootfs_tar};
    use super::*;
    use crate::image::layer::write_layer;
    use crate::image::oci::{Platform, manifest_json};
    use crate::image::testutil::{list_dir, list_tar, raw_tar, require_tool, sample_tree};
    use crate::image::{ImageConfig, Layer, sys};
    use crate::layout::Layout;
    use crate::store::{Blob, Cas, Digest, Store, StoreOptions};

    /// Two layers: the sample tree, then one that deletes a hard-linked file (its other
    /// name keeps the data), hides `tmp` behind an opaque marker, replaces `bin/su` and
    /// adds a file.
    pub(crate) fn sample_image(cas: &Cas) -> ImageParts {
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

    pub(crate) fn blobs(image: &ImageParts) -> Vec<Blob> {
        image
            .layers
            .iter()
            .map(|layer| layer.blob.clone())
            .collect()
    }

    fn export(lease: &Lease, image: &ImageParts, format: Format) -> Vec<u8> {
        let scratch = tempfile::tempdir().expect("scratch");
        let mut out = Vec::new();
        write(
            lease,
            image,
            format,
            &["app".into()],
            scratch.path(),
            &mut out,
        )
        .expect("export");
        assert_eq!(
            std::fs::read_dir(scratch.path()).expect("scratch").count(),
            0,
            "nothing left in scratch"
        );
        out
    }

    /// Every format twice over: the same bytes each time, the OCI layout's layers in the
    /// asked form (made once, then reused), and what goes through a [`Chunks`] sink arrives
    /// whole and in order.
    #[test]
    fn every_format_is_deterministic_and_arrives_whole_through_chunks() {
        let root = tempfile::tempdir().expect("root");
        let store = Store::open(&Layout::new(root.path()), StoreOptions::default()).expect("store");
        let lease = store.lease();
        let image = sample_image(&lease.cas());
        let zstd = Format::Oci(ImageForm {
            compression: Compression::Zstd { level: 3 },
            force: true,
            media: MediaTypes::Oci,
        });
        for format in [Format::Docker, Format::RootfsTar, zstd] {
            let once = export(&lease, &image, format);
            assert_eq!(export(&lease, &image, format), once, "{format:?}");

            let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(chunk) = receiver.blocking_recv() {
                    assert!(chunk.len() <= CHUNK_BYTES);
                    got.extend_from_slice(&chunk);
                }
                got
            });
            let scratch = tempfile::tempdir().expect("scratch");
            let mut chunks = Chunks::new(sender);
            write(
                &lease,
                &image,
                format,
                &["app".into()],
                scratch.path(),
                &mut chunks,
            )
            .expect("export through chunks");
            drop(chunks);
            assert!(reader.join().expect("reader") == once, "{format:?}");
        }
        let tar = export(&lease, &image, Format::RootfsTar);
        assert_eq!(tar, rootfs_tar(&lease.cas(), &blobs(&image)));
    }

    #[test]
    fn umoci_and_skopeo_accept_our_archives() {
        let test = "umoci_and_skopeo_accept_our_archives";
        if !require_tool("umoci", test) || !require_tool("skopeo", test) {
            return;
        }
        let (_root, cas) = crate::image::testutil::store();
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
        let rootfs = rootfs_tar(&cas, &blobs(&image));
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
