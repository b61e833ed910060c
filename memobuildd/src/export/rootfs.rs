//! An image's root filesystem as one tar: its layers merged, whiteouts applied.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::image::entry::{Entry, Kind, Links, TarSink, Whiteout, read_entry, whiteout};
use crate::image::layer::path_bytes;
use crate::image::unpack::decompress;
use crate::image::{ImageError, LayerOptions};
use crate::store::{Blob, Cas};

/// Merges `layers` (bottom first) into one root-filesystem tar, whiteouts applied, entries
/// sorted by path, ownership and modes from the layers — no root needed, nothing chowned.
/// `opts` apply as to a layer: mtime clamp, skipped paths, ownership overrides.
///
/// Each layer is indexed, then the surviving entries are copied in path order. A layer the
/// store holds as a plain tar (every layer MemoBuild wrote) is read in place, after a read
/// that verifies its digest; a compressed one (a base image's) is decompressed once into an
/// anonymous temp file in `scratch` (the store's `tmp/`: the daemon writes nothing outside
/// its root), so an export needs no disk beyond the compressed layers' tars.
pub fn write_rootfs_tar(
    cas: &Cas,
    layers: &[Blob],
    opts: &LayerOptions<'_>,
    scratch: &Path,
    out: impl Write,
) -> Result<(), ImageError> {
    let mut tars = Vec::with_capacity(layers.len());
    let mut tree = Tree::default();
    for (layer, blob) in layers.iter().enumerate() {
        let blob_error = |source| ImageError::Blob {
            digest: blob.digest.clone(),
            source,
        };
        let mut stream = decompress(cas.open(blob)?)?;
        let tar = if is_plain_tar(cas, blob)? {
            io::copy(&mut stream, &mut io::sink()).map_err(blob_error)?;
            File::open(cas.path(&blob.digest)).map_err(ImageError::Read)?
        } else {
            let mut tar = tempfile::tempfile_in(scratch).map_err(ImageError::io(scratch))?;
            io::copy(&mut stream, &mut tar).map_err(blob_error)?;
            tar.seek(SeekFrom::Start(0)).map_err(ImageError::Read)?;
            tar
        };
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

/// Whether `blob` is stored as an uncompressed tar (no gzip or zstd magic number).
fn is_plain_tar(cas: &Cas, blob: &Blob) -> Result<bool, ImageError> {
    let mut magic = [0u8; 4];
    let mut file = File::open(cas.path(&blob.digest)).map_err(ImageError::Read)?;
    let len = file.read(&mut magic).map_err(ImageError::Read)?;
    Ok(!matches!(
        magic[..len],
        [0x1f, 0x8b, ..] | [0x28, 0xb5, 0x2f, 0xfd]
    ))
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
pub(crate) mod tests {
    use super::*;
    use crate::export::tests::{blobs, sample_image};
    use crate::image::testutil::{Listing, list_dir, list_tar, store};
    use crate::image::{Whiteouts, sys, unpack};

    pub(crate) fn rootfs_tar(cas: &Cas, layers: &[Blob]) -> Vec<u8> {
        let mut out = Vec::new();
        let scratch = tempfile::tempdir().expect("scratch");
        write_rootfs_tar(
            cas,
            layers,
            &LayerOptions::default(),
            scratch.path(),
            &mut out,
        )
        .expect("rootfs tar");
        out
    }

    /// Without root, unpacked files belong to the caller: compare all but ownership.
    pub(crate) fn comparable(listing: Listing, keep_owners: bool) -> Listing {
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
        let tar = rootfs_tar(&cas, &blobs(&image));
        assert_eq!(rootfs_tar(&cas, &blobs(&image)), tar, "deterministic");
        let listing = list_tar(tar.as_slice());
        assert!(!listing.contains_key("etc/conf") && !listing.contains_key("tmp/fifo"));
        assert!(
            listing["etc/conf.hard"].starts_with("file 640 "),
            "{listing:?}"
        );
        assert!(listing.contains_key("tmp") && listing.contains_key("new/file"));

        // The same tree as the layers applied one by one, as a runtime would.
        let dest = tempfile::tempdir().expect("dest");
        for blob in blobs(&image) {
            unpack(
                cas.open(&blob).expect("open"),
                dest.path(),
                Whiteouts::Apply,
            )
            .expect("unpack");
        }
        let as_root = sys::is_root();
        assert_eq!(
            comparable(list_dir(dest.path()), as_root),
            comparable(listing, as_root)
        );
    }

    #[test]
    fn a_corrupt_layer_fails_the_rootfs_tar() {
        let (_root, cas) = store();
        let image = sample_image(&cas);
        let layer = &image.layers[0].blob;
        let mut damaged = std::fs::read(cas.path(&layer.digest)).expect("read");
        damaged[100] ^= 1;
        std::fs::write(cas.path(&layer.digest), damaged).expect("damage");
        let scratch = tempfile::tempdir().expect("scratch");
        let err = write_rootfs_tar(
            &cas,
            &blobs(&image),
            &LayerOptions::default(),
            scratch.path(),
            io::sink(),
        )
        .expect_err("corrupt layer");
        assert!(err.to_string().contains(layer.digest.as_str()), "{err}");
    }
}
