//! Deterministic layers: a directory in, a plain tar in the store out (its blob digest is its
//! diff-id; compressed forms are made lazily, `image::compress`).
//!
//! The directory is an overlayfs upper dir (its whiteouts — 0:0 character devices and
//! `overlay.opaque` directories — become OCI `.wh.` entries) or a staged tree. The same tree
//! always gives the same bytes: entries sorted by path, headers built field by field
//! (`entry::TarSink`), mtimes optionally clamped to `SOURCE_DATE_EPOCH`, no user or group names.
//! The tar's SHA-256 (the diff-id, checked by the [`BlobWriter`](crate::store::BlobWriter) that
//! stores it) and its content id are computed in the one pass that streams the layer in.
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

use super::entry::{Entry, Kind, Links, OPAQUE_MARKER, TarSink, WHITEOUT_PREFIX, carries_xattr};
use super::oci::MediaTypes;
use super::{ImageError, sys};
use crate::store::{Blob, Cas, Digest};

/// How a tree becomes tar entries; shared by layers and root-filesystem tars.
#[derive(Default)]
pub struct LayerOptions<'a> {
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
    /// The stored blob: the plain tar for a layer MemoBuild wrote (then its digest is the
    /// diff-id), the blob as pulled for a base image's. Exports and pushes use a compressed
    /// form of it (`store::Lease::layer_as`).
    pub blob: Blob,
    /// SHA-256 of the uncompressed tar: what the image config names.
    pub diff_id: Digest,
    /// The OCI layer media type of `blob`.
    pub media_type: String,
    /// What cache keys see of this layer: for one MemoBuild wrote, its tar's content id
    /// (timestamps left out, `entry::TarSink::with_content_id`); for one it pulled, a hash of
    /// its diff-id ([`content_id_of_diff_id`]).
    pub content_id: [u8; 32],
}

/// The content id of a layer known only by its diff-id (a base image's).
pub fn content_id_of_diff_id(diff_id: &Digest) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"memobuild-layer-diff-id-v1\0");
    hasher.update(diff_id.as_str().as_bytes());
    *hasher.finalize().as_bytes()
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
    // Two threads: this one reads files, frames the tar and takes its content id; the other
    // takes its SHA-256 (the diff-id) and writes it. Nothing compresses on the way from an
    // edit to the next step: compressed forms are made when an export or push needs them.
    let (content_id, blob) = std::thread::scope(|scope| {
        let (handoff, received) = Handoff::new();
        let storing = scope.spawn(move || {
            let mut blob = blob;
            for buffer in received {
                blob.write_all(&buffer)?;
            }
            Ok::<_, io::Error>(blob)
        });
        let framed = frame_tar(dir, entries, opts, handoff);
        // The writer's own error (a full disk, say) explains a failed hand-off best.
        let stored = storing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (framed, stored) {
            (Ok(content_id), Ok(blob)) => Ok((content_id, blob)),
            (_, Err(err)) => Err(ImageError::io(dir)(err)),
            (Err(err), Ok(_)) => Err(err),
        }
    })?;
    let blob = blob
        .into_inner()
        .map_err(|err| ImageError::io(dir)(err.into_error()))?;
    let blob = blob.commit(None)?;
    Ok(Some(Layer {
        diff_id: blob.digest.clone(),
        blob,
        media_type: MediaTypes::Oci.layer_tar().to_owned(),
        content_id,
    }))
}

/// Streams the entries as a tar into `tar`; returns its content id. Ends the stream on
/// success and on failure alike (dropping `tar` closes the hand-off).
fn frame_tar(
    dir: &Path,
    entries: Vec<Scanned>,
    opts: &LayerOptions<'_>,
    tar: Handoff,
) -> Result<[u8; 32], ImageError> {
    let mut sink = TarSink::new(tar, opts).with_content_id();
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
    let content_id = sink.content_id().unwrap_or_default();
    let handoff = sink.finish().map_err(ImageError::io(dir))?;
    handoff.finish().map_err(ImageError::io(dir))?;
    Ok(content_id)
}

/// Hands a byte stream to another thread in large buffers.
struct Handoff {
    to: std::sync::mpsc::SyncSender<Vec<u8>>,
    buffer: Vec<u8>,
}

/// Bytes per hand-off, and hand-offs in flight: enough to keep both threads busy.
const HANDOFF_BYTES: usize = 256 << 10;
const HANDOFFS_IN_FLIGHT: usize = 4;

impl Handoff {
    fn new() -> (Self, std::sync::mpsc::Receiver<Vec<u8>>) {
        let (to, from) = std::sync::mpsc::sync_channel(HANDOFFS_IN_FLIGHT);
        let buffer = Vec::with_capacity(HANDOFF_BYTES);
        (Self { to, buffer }, from)
    }

    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(HANDOFF_BYTES));
        self.to
            .send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the compressor stopped"))
    }

    /// Sends what is left; the receiver sees the end of the stream once `self` is dropped.
    fn finish(mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            self.send()
        }
    }
}

impl Write for Handoff {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= HANDOFF_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
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
        list_tar(cas.open(&layer.blob).expect("open"))
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
        assert_eq!(first.media_type, MediaTypes::Oci.layer_tar());
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut cas.open(&first.blob).expect("open"), &mut raw).expect("read");
        assert_eq!(
            (Digest::of(&raw), &first.blob.digest),
            (first.diff_id.clone(), &first.diff_id),
            "the blob is the tar: its digest is the diff-id"
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
        let blob = cas.open(&layer.blob).expect("open");
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
        let blob = cas.open(&layer.blob).expect("open");
        unpack(blob, dest.path(), Whiteouts::Overlay).expect("unpack");
        assert_eq!(list_dir(dest.path()), list_dir(up));
        let opaque = sys::lgetxattr(&dest.path().join("opq"), "trusted.overlay.opaque");
        assert_eq!(opaque.expect("xattr").as_deref(), Some(&b"y"[..]));
        assert_eq!(write(&cas, dest.path(), &LayerOptions::default()), layer);
    }
}
