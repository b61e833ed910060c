//! Deterministic layers: a directory in, a compressed tar in the CAS out.
//!
//! The directory is an overlayfs upper dir (its whiteouts — 0:0 character devices and
//! `overlay.opaque` directories — become OCI `.wh.` entries) or a staged tree. The same tree
//! always gives the same bytes: entries sorted by path, headers built field by field
//! (`entry::TarSink`), mtimes optionally clamped to `SOURCE_DATE_EPOCH`, no user or group names.
//! The tar's SHA-256 (the diff-id) and the compressed SHA-256 (the digest) are computed in the
//! one pass that streams the layer into a [`BlobWriter`](crate::cache::BlobWriter).
//!
//! Upper dirs must come from mounts without `redirect_dir` and `metacopy`: their xattrs are
//! not read here.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};

use super::entry::{Entry, Kind, Links, OPAQUE_MARKER, TarSink, WHITEOUT_PREFIX, carries_xattr};
use super::oci::MediaTypes;
use super::{ImageError, sys};
use crate::cache::{Blob, Cas, Digest};

/// zlib level 1. Measured on 210 MB of mixed files (2-core shared machine, release): level 6
/// (Docker's and containerd's choice) compresses at ~130 MB/s to 29% of the tar, level 1 at
/// ~260 MB/s to 34%. Compression sits on the critical path of every edit-and-rebuild (a
/// profile of a 100 MB COPY showed deflate at two thirds of the step), which is the loop
/// MemoBuild exists to make fast; 16% larger blobs on push are the price.
const GZIP_LEVEL: u32 = 1;

/// How a layer's tar is compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

/// How a tree becomes tar entries; shared by layers and root-filesystem tars.
#[derive(Default)]
pub struct LayerOptions<'a> {
    pub compression: Compression,
    /// Every entry's mtime is clamped to at most this (seconds since the epoch).
    pub source_date_epoch: Option<i64>,
    /// Relative paths left out with everything below them: mount points the runtime made in
    /// an upper dir (`etc/hosts`, `proc`, `dev`, `sys`).
    pub skip: Vec<String>,
    /// Ownership by relative path, overriding the file's (a daemon that is not root cannot
    /// chown its staged files); `None` from it keeps the file's.
    pub owner: Option<&'a Owner<'a>>,
}

/// Maps a path relative to the layer root to the `(uid, gid)` to record for it.
pub type Owner<'a> = dyn Fn(&Path) -> Option<(u32, u32)> + 'a;

impl fmt::Debug for LayerOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerOptions")
            .field("compression", &self.compression)
            .field("source_date_epoch", &self.source_date_epoch)
            .field("skip", &self.skip)
            .field("owner", &self.owner.map(|_| "fn"))
            .finish()
    }
}

impl LayerOptions<'_> {
    pub(crate) fn skips(&self, path: &Path) -> bool {
        self.skip
            .iter()
            .any(|skip| path.starts_with(skip.trim_start_matches('/')))
    }
}

/// A layer in the CAS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layer {
    /// The compressed blob: what manifests name and registries store.
    pub blob: Blob,
    /// SHA-256 of the uncompressed tar: what the image config names.
    pub diff_id: Digest,
    /// The OCI layer media type of `blob`.
    pub media_type: String,
}

/// Writes the tree under `dir` as a layer; `None` when there is nothing in it.
pub fn write_layer(
    cas: &Cas,
    dir: &Path,
    opts: &LayerOptions<'_>,
) -> Result<Option<Layer>, ImageError> {
    let mut entries = scan(dir, opts)?;
    if entries.is_empty() {
        return Ok(None);
    }
    entries.sort_by(|a, b| path_bytes(&a.entry.path).cmp(path_bytes(&b.entry.path)));

    let blob = BufWriter::with_capacity(1 << 18, cas.writer()?);
    let tar = HashingWriter::new(Compressor::new(blob, opts.compression));
    let mut sink = TarSink::new(tar, opts);
    let mut links = Links::new();
    for Scanned { mut entry, inode } in entries {
        let linked = inode.is_some_and(|inode| links.link(inode, &mut entry));
        // Links, whiteout markers and empty files have no data to read.
        if entry.kind != Kind::File || entry.size == 0 || linked {
            sink.append(&entry, io::empty())?;
            continue;
        }
        let path = dir.join(&entry.path);
        let file = File::open(&path).map_err(ImageError::io(&path))?;
        sink.append(&entry, file)?;
    }

    let finish = |source| ImageError::Io {
        path: dir.to_owned(),
        source,
    };
    let (compressed, diff_id) = sink.finish().map_err(&finish)?.finish();
    let blob = compressed.finish().map_err(&finish)?;
    let blob = blob.into_inner().map_err(|err| finish(err.into_error()))?;
    let blob = blob.commit(None)?;
    let media_type = match opts.compression {
        Compression::Gzip => MediaTypes::Oci.layer_gzip(),
        Compression::None => MediaTypes::Oci.layer_tar(),
    };
    Ok(Some(Layer {
        blob,
        diff_id,
        media_type: media_type.to_owned(),
    }))
}

pub(crate) fn path_bytes(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

struct Scanned {
    entry: Entry,
    /// (dev, ino) of a file with more than one link.
    inode: Option<(u64, u64)>,
}

/// Every entry under `root` (not `root` itself), whiteouts converted, skipped paths left out.
fn scan(root: &Path, opts: &LayerOptions<'_>) -> Result<Vec<Scanned>, ImageError> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel_dir) = dirs.pop() {
        let dir = root.join(&rel_dir);
        for item in fs::read_dir(&dir).map_err(ImageError::io(&dir))? {
            let item = item.map_err(ImageError::io(&dir))?;
            let rel = rel_dir.join(item.file_name());
            if opts.skips(&rel) {
                continue;
            }
            if let Some(kind) = scan_one(&item.path(), rel.clone(), &mut out)?
                && kind == Kind::Dir
            {
                dirs.push(rel);
            }
        }
    }
    Ok(out)
}

/// Adds what one file contributes: its entry, or the OCI whiteout an overlay whiteout stands
/// for, and the opaque marker of an opaque directory. Returns the entry's kind, `None` for
/// what a layer leaves out: sockets belong to a running process (containerd agrees).
fn scan_one(path: &Path, rel: PathBuf, out: &mut Vec<Scanned>) -> Result<Option<Kind>, ImageError> {
    let meta = fs::symlink_metadata(path).map_err(ImageError::io(path))?;
    let file_type = meta.file_type();
    let marker = |path| Scanned {
        entry: Entry::marker(path, meta.mtime()),
        inode: None,
    };
    if file_type.is_char_device() && meta.rdev() == 0 {
        let mut name = OsString::from(WHITEOUT_PREFIX);
        name.push(rel.file_name().unwrap_or_default());
        out.push(marker(rel.with_file_name(name)));
        return Ok(None);
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() {
        Kind::File
    } else if file_type.is_symlink() {
        Kind::Symlink(fs::read_link(path).map_err(ImageError::io(path))?)
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else if file_type.is_char_device() {
        Kind::Char { major, minor }
    } else if file_type.is_block_device() {
        Kind::Block { major, minor }
    } else {
        return Ok(None);
    };
    if kind == Kind::Dir && is_opaque(path)? {
        out.push(marker(rel.join(OPAQUE_MARKER)));
    }
    let is_file = kind == Kind::File;
    out.push(Scanned {
        entry: Entry {
            path: rel,
            kind: kind.clone(),
            mode: meta.mode() & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            mtime: meta.mtime(),
            size: if is_file { meta.len() } else { 0 },
            xattrs: xattrs(path)?,
        },
        inode: (is_file && meta.nlink() > 1).then(|| (meta.dev(), meta.ino())),
    });
    Ok(Some(kind))
}

/// The extended attributes a layer carries for `path`, sorted by name.
fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut names = sys::llistxattr(path).map_err(ImageError::io(path))?;
    names.retain(|name| carries_xattr(name));
    names.sort();
    let mut xattrs = Vec::with_capacity(names.len());
    for name in names {
        // Gone since listed: nothing to carry.
        if let Some(value) = sys::lgetxattr(path, &name).map_err(ImageError::io(path))? {
            xattrs.push((name, value));
        }
    }
    Ok(xattrs)
}

/// Whether overlayfs marked this upper directory opaque (root: `trusted.`, rootless
/// `userxattr` mounts: `user.`).
fn is_opaque(path: &Path) -> Result<bool, ImageError> {
    for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
        if sys::lgetxattr(path, name)
            .map_err(ImageError::io(path))?
            .as_deref()
            == Some(b"y")
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The compression stage of a tar being written.
pub(crate) enum Compressor<W: Write> {
    Gzip(Box<GzEncoder<W>>),
    None(W),
}

impl<W: Write> Compressor<W> {
    pub(crate) fn new(out: W, compression: Compression) -> Self {
        match compression {
            Compression::Gzip => {
                let level = flate2::Compression::new(GZIP_LEVEL);
                Self::Gzip(Box::new(GzEncoder::new(out, level)))
            }
            Compression::None => Self::None(out),
        }
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Self::Gzip(encoder) => encoder.finish(),
            Self::None(out) => Ok(out),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Gzip(encoder) => encoder.write(buf),
            Self::None(out) => out.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Gzip(encoder) => encoder.flush(),
            Self::None(out) => out.flush(),
        }
    }
}

/// Hashes what passes through: the diff-id of the tar on its way to the compressor.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(self) -> (W, Digest) {
        (self.inner, digest_of(self.hasher))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn digest_of(hasher: Sha256) -> Digest {
    Digest::parse(&format!("sha256:{}", hex::encode(hasher.finalize())))
        .expect("a SHA-256 hex string is a valid digest")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::cas;
    use crate::image::testutil::{
        LONG_NAME, list_dir, list_tar, mtime, require_root, sample_tree, set_mtimes, store,
    };
    use crate::image::unpack::{Whiteouts, unpack};

    fn write(cas: &Cas, dir: &Path, opts: &LayerOptions<'_>) -> Layer {
        write_layer(cas, dir, opts)
            .expect("write")
            .expect("a layer")
    }

    fn tar_of(cas: &Cas, layer: &Layer) -> Listing {
        list_tar(cas::open(cas, &layer.blob.digest).expect("open"))
    }

    use crate::image::testutil::Listing;

    #[test]
    fn the_same_tree_gives_the_same_layer() {
        let (_root, cas) = store();
        let tree = tempfile::tempdir().expect("tree");
        sample_tree(tree.path(), 1_700_000_000);
        let opts = LayerOptions::default();
        let first = write(&cas, tree.path(), &opts);
        assert_eq!(write(&cas, tree.path(), &opts), first);
        assert_eq!(first.media_type, MediaTypes::Oci.layer_gzip());
        assert_ne!(first.blob.digest, first.diff_id);
        let tar = cas::open(&cas, &first.blob.digest).expect("open");
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(tar), &mut raw).expect("gunzip");
        assert_eq!(
            Digest::of(&raw),
            first.diff_id,
            "diff-id is the tar's digest"
        );
        let pax_path = format!(" path=deep/{}\n", "n".repeat(150));
        assert!(
            raw.windows(pax_path.len())
                .any(|w| w == pax_path.as_bytes()),
            "a PAX record carries the long name"
        );

        // Newer mtimes clamped to the same epoch give the same layer; unclamped they do not.
        let clamped = LayerOptions {
            source_date_epoch: Some(1_600_000_000),
            ..LayerOptions::default()
        };
        let before = write(&cas, tree.path(), &clamped);
        set_mtimes(tree.path(), 1_800_000_000);
        assert_eq!(write(&cas, tree.path(), &clamped), before);
        assert_ne!(write(&cas, tree.path(), &opts), first);
    }

    #[test]
    fn modes_links_and_special_files_survive_a_round_trip() {
        let (_root, cas) = store();
        let tree = tempfile::tempdir().expect("tree");
        sample_tree(tree.path(), 1_700_000_000);
        let layer = write(&cas, tree.path(), &LayerOptions::default());
        let expected = list_dir(tree.path());
        assert!(expected["bin/su"].starts_with("file 4755 "), "{expected:?}");
        assert!(
            expected["etc/conf"].ends_with(" user.memobuild=6b657074"),
            "{expected:?}"
        );
        if sys::is_root() {
            let tool = &expected["bin/tool"];
            assert!(tool.contains(" security.capability=01000002"), "{tool}");
        }
        assert!(expected.contains_key("empty") && expected.contains_key("tmp/fifo"));
        assert_eq!(tar_of(&cas, &layer), expected);

        let dest = tempfile::tempdir().expect("dest");
        let blob = cas::open(&cas, &layer.blob.digest).expect("open");
        let stats = unpack(blob, dest.path(), Whiteouts::Apply).expect("unpack");
        assert_eq!(list_dir(dest.path()), expected);
        assert_eq!(stats.entries, expected.len() as u64);
        for path in ["bin/su", "tmp", "etc/conf.link", "empty"] {
            assert_eq!(mtime(&dest.path().join(path)), 1_700_000_000, "{path}");
        }
        let meta = |path: &str| std::fs::metadata(dest.path().join(path)).expect("stat");
        assert_eq!(
            meta("etc/conf").ino(),
            meta("etc/conf.hard").ino(),
            "still one inode"
        );
        assert!(
            dest.path()
                .join("deep")
                .join(LONG_NAME)
                .join(LONG_NAME)
                .join("file")
                .is_file()
        );
        assert!(dest.path().join("deep").join("n".repeat(150)).is_file());
    }

    #[test]
    fn owners_can_be_overridden_beyond_ustar_ids() {
        let (_root, cas) = store();
        let tree = tempfile::tempdir().expect("tree");
        sample_tree(tree.path(), 1_700_000_000);
        let owner = |path: &Path| (path == Path::new("bin/su")).then_some((3_000_000, 4_000_000));
        let opts = LayerOptions {
            compression: Compression::None,
            owner: Some(&owner),
            ..LayerOptions::default()
        };
        let layer = write(&cas, tree.path(), &opts);
        assert_eq!(layer.media_type, MediaTypes::Oci.layer_tar());
        assert_eq!(layer.blob.digest, layer.diff_id);
        let listing = tar_of(&cas, &layer);
        assert!(
            listing["bin/su"].starts_with("file 4755 3000000:4000000 "),
            "{listing:?}"
        );
        let mine = format!(" {}:", unsafe_free_uid(tree.path()));
        assert!(listing["bin/tool"].contains(&mine), "{listing:?}");
    }

    fn unsafe_free_uid(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").uid()
    }

    #[test]
    fn nothing_to_write_makes_no_layer() {
        let (_root, cas) = store();
        let tree = tempfile::tempdir().expect("tree");
        let opts = LayerOptions {
            skip: vec!["proc".into(), "/etc/hosts".into()],
            ..LayerOptions::default()
        };
        assert_eq!(write_layer(&cas, tree.path(), &opts).expect("write"), None);
        std::fs::create_dir_all(tree.path().join("proc/1")).expect("mkdir");
        assert_eq!(write_layer(&cas, tree.path(), &opts).expect("write"), None);
        std::fs::create_dir(tree.path().join("etc")).expect("mkdir");
        std::fs::write(tree.path().join("etc/hosts"), "127.0.0.1 x").expect("hosts");
        std::fs::write(tree.path().join("etc/hostsx"), "kept").expect("hostsx");
        let listing = tar_of(&cas, &write(&cas, tree.path(), &opts));
        assert_eq!(listing.keys().collect::<Vec<_>>(), ["etc", "etc/hostsx"]);
    }

    #[test]
    fn overlay_whiteouts_become_oci_whiteouts_and_back() {
        if !require_root("overlay_whiteouts_become_oci_whiteouts_and_back") {
            return;
        }
        let (_root, cas) = store();
        let upper = tempfile::tempdir().expect("upper");
        let up = upper.path();
        sys::mknod(&up.join("gone"), sys::Node::Char, 0, 0, 0).expect("whiteout");
        std::fs::create_dir(up.join("opq")).expect("mkdir");
        std::fs::write(up.join("opq/new"), "new").expect("write");
        sys::lsetxattr(&up.join("opq"), "trusted.overlay.opaque", b"y").expect("xattr");
        let layer = write(&cas, up, &LayerOptions::default());
        let listing = tar_of(&cas, &layer);
        assert_eq!(
            listing.keys().collect::<Vec<_>>(),
            [".wh.gone", "opq", "opq/.wh..wh..opq", "opq/new"]
        );
        assert!(
            listing[".wh.gone"].starts_with("file 0 0:0 0 "),
            "{listing:?}"
        );

        let dest = tempfile::tempdir().expect("dest");
        let blob = cas::open(&cas, &layer.blob.digest).expect("open");
        unpack(blob, dest.path(), Whiteouts::Overlay).expect("unpack");
        assert_eq!(list_dir(dest.path()), list_dir(up));
        let opaque = sys::lgetxattr(&dest.path().join("opq"), "trusted.overlay.opaque");
        assert_eq!(opaque.expect("xattr").as_deref(), Some(&b"y"[..]));
        assert_eq!(write(&cas, dest.path(), &LayerOptions::default()), layer);
    }
}
