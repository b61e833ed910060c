//! Extracting a layer into a directory, safely.
//!
//! Every entry lands inside `dest` or is refused with its name: no absolute paths, no `..`,
//! and a symlink met on the way to an entry is resolved inside `dest` (an absolute target
//! means `dest`'s root, as in the container) — one that climbs out of it refuses the entry.
//! The last component is never followed: whatever is there is replaced. Hard link targets
//! are resolved the same way.
//!
//! Modes (setuid, setgid, sticky included), symlink targets, mtimes and extended attributes
//! are kept; ownership too when running as root (otherwise files stay the caller's).

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::ImageError;
use super::entry::{Entry, Kind, Whiteout, read_entry, whiteout};
use super::sys::{self, Node};

/// What to do with a layer's OCI whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Make them overlayfs whiteouts (0:0 character devices, `trusted.overlay.opaque=y`) so
    /// that `dest` can serve as a lowerdir. Needs root.
    Overlay,
    /// Delete what earlier layers unpacked into `dest`: merging layers into one root.
    Apply,
    /// Extract them as the plain files they are: ADD of a local archive, as Docker does.
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries extracted, whiteouts included.
    pub entries: u64,
    /// File data bytes written.
    pub bytes: u64,
}

impl std::ops::AddAssign for UnpackStats {
    fn add_assign(&mut self, other: Self) {
        self.entries += other.entries;
        self.bytes += other.bytes;
    }
}

/// Extracts a gzip-compressed or plain layer tar into `dest` (which must exist).
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    whiteouts: Whiteouts,
) -> Result<UnpackStats, ImageError> {
    let mut archive = tar::Archive::new(decompress(reader)?);
    let mut unpacker = Unpacker {
        dest,
        whiteouts,
        as_root: sys::is_root(),
        created: HashSet::new(),
        dirs: Vec::new(),
        stats: UnpackStats::default(),
    };
    for item in archive.entries().map_err(ImageError::Read)? {
        let mut item = item.map_err(ImageError::Read)?;
        if let Some(entry) = read_entry(&mut item)? {
            unpacker.extract(&entry, &mut item)?;
        }
    }
    // Read to the very end so that gzip's CRC and a verifying reader see every byte.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(ImageError::Read)?;
    unpacker.finish()
}

/// The layer's bytes as a tar stream, whatever its compression (told by its magic number).
pub(crate) fn decompress<'r>(mut reader: impl Read + 'r) -> Result<Box<dyn Read + 'r>, ImageError> {
    let mut magic = [0u8; 4];
    let mut len = 0;
    while len < magic.len() {
        match reader.read(&mut magic[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(ImageError::Read(err)),
        }
    }
    let stream = io::Cursor::new(magic).take(len as u64).chain(reader);
    match magic[..len] {
        [0x1f, 0x8b, ..] => Ok(Box::new(MultiGzDecoder::new(stream))),
        // A pure-Rust decoder: registries serve zstd layers, and no C is built for them.
        [0x28, 0xb5, 0x2f, 0xfd] => ruzstd::decoding::StreamingDecoder::new(stream)
            .map(|decoder| Box::new(decoder) as Box<dyn Read + 'r>)
            .map_err(|err| ImageError::Read(io::Error::other(err.to_string()))),
        _ => Ok(Box::new(stream)),
    }
}

struct Unpacker<'d> {
    dest: &'d Path,
    whiteouts: Whiteouts,
    as_root: bool,
    /// What this layer put in `dest`, which its own opaque markers must not hide (only
    /// kept when applying whiteouts).
    created: HashSet<PathBuf>,
    /// Directories get their mode and mtime last: writing inside changes the mtime, and a
    /// read-only mode would stop us writing inside.
    dirs: Vec<(PathBuf, u32, i64)>,
    stats: UnpackStats,
}

impl Unpacker<'_> {
    fn extract(&mut self, entry: &Entry, data: &mut impl Read) -> Result<(), ImageError> {
        self.stats.entries += 1;
        if self.whiteouts != Whiteouts::Keep
            && let Some(whiteout) = whiteout(&entry.path)
        {
            return self.whiteout(whiteout, entry);
        }
        let path = &entry.path;
        let target = self.place(path)?;
        let io = |err| ImageError::EntryIo {
            entry: path.display().to_string(),
            source: err,
        };
        let keep_dir = entry.kind == Kind::Dir
            && fs::symlink_metadata(&target).is_ok_and(|meta| meta.is_dir());
        if !keep_dir {
            remove(&target).map_err(io)?;
        }
        match &entry.kind {
            Kind::File => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io)?;
                self.stats.bytes += io::copy(data, &mut file).map_err(io)?;
            }
            Kind::Dir if keep_dir => {}
            Kind::Dir => fs::DirBuilder::new()
                .mode(0o700)
                .create(&target)
                .map_err(io)?,
            Kind::Symlink(link) => std::os::unix::fs::symlink(link, &target).map_err(io)?,
            Kind::HardLink(link) => {
                let source = self
                    .find(link)?
                    .filter(|source| source.symlink_metadata().is_ok())
                    .ok_or_else(|| {
                        ImageError::entry(path, format!("hard link to missing {}", link.display()))
                    })?;
                fs::hard_link(source, &target).map_err(io)?;
                // The link shares its target's inode, metadata included.
                self.mark_created(path);
                return Ok(());
            }
            Kind::Fifo => sys::mknod(&target, Node::Fifo, entry.mode, 0, 0).map_err(io)?,
            Kind::Char { major, minor } => {
                sys::mknod(&target, Node::Char, entry.mode, *major, *minor).map_err(io)?;
            }
            Kind::Block { major, minor } => {
                sys::mknod(&target, Node::Block, entry.mode, *major, *minor).map_err(io)?;
            }
        }
        self.set_metadata(entry, &target).map_err(io)?;
        self.mark_created(path);
        Ok(())
    }

    fn mark_created(&mut self, path: &Path) {
        if self.whiteouts == Whiteouts::Apply {
            self.created.insert(path.to_owned());
        }
    }

    fn set_metadata(&mut self, entry: &Entry, target: &Path) -> io::Result<()> {
        if self.as_root {
            // Before chmod: chown clears setuid and setgid.
            let id = |id: u64| u32::try_from(id).map_err(|_| io::ErrorKind::InvalidData);
            std::os::unix::fs::lchown(target, Some(id(entry.uid)?), Some(id(entry.gid)?))?;
        }
        // After chown, which clears security.capability. Best effort: a filesystem without
        // xattrs, or a caller without the privilege for `trusted.` or `security.`, keeps the
        // file without them, as Docker does.
        for (name, value) in &entry.xattrs {
            match sys::lsetxattr(target, name, value) {
                Err(err) if matches!(err.raw_os_error(), Some(libc::EPERM | libc::ENOTSUP)) => {}
                result => result?,
            }
        }
        match entry.kind {
            Kind::Dir => self.dirs.push((target.to_owned(), entry.mode, entry.mtime)),
            Kind::Symlink(_) => sys::set_mtime_nofollow(target, entry.mtime)?,
            _ => {
                fs::set_permissions(target, fs::Permissions::from_mode(entry.mode))?;
                sys::set_mtime_nofollow(target, entry.mtime)?;
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, whiteout: Whiteout<'_>, entry: &Entry) -> Result<(), ImageError> {
        let io = ImageError::entry_io(&entry.path);
        match (self.whiteouts, whiteout) {
            (Whiteouts::Overlay, Whiteout::Remove(hidden)) => {
                let target = self.place(&hidden)?;
                remove(&target).map_err(ImageError::entry_io(&entry.path))?;
                sys::mknod(&target, Node::Char, 0, 0, 0).map_err(io)?;
            }
            (Whiteouts::Overlay, Whiteout::Opaque(dir)) => {
                let target = self.place(dir)?;
                if !fs::symlink_metadata(&target).is_ok_and(|meta| meta.is_dir()) {
                    remove(&target).map_err(ImageError::entry_io(&entry.path))?;
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&target)
                        .map_err(ImageError::entry_io(&entry.path))?;
                }
                sys::lsetxattr(&target, "trusted.overlay.opaque", b"y").map_err(io)?;
            }
            (Whiteouts::Apply, Whiteout::Remove(hidden)) => {
                if let Some(target) = self.find(&hidden)? {
                    remove(&target).map_err(io)?;
                }
            }
            (Whiteouts::Keep, _) => unreachable!("kept whiteouts are extracted as files"),
            (Whiteouts::Apply, Whiteout::Opaque(dir)) => {
                let Some(target) = self.find(dir)? else {
                    return Ok(());
                };
                // Never list through a symlink: its children are not this tree's.
                if !fs::symlink_metadata(&target).is_ok_and(|meta| meta.is_dir()) {
                    return Ok(());
                }
                let children = fs::read_dir(&target).map_err(ImageError::entry_io(&entry.path))?;
                for child in children {
                    let child = child.map_err(ImageError::entry_io(&entry.path))?;
                    if !self.created.contains(&dir.join(child.file_name())) {
                        remove(&child.path()).map_err(ImageError::entry_io(&entry.path))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Where `rel` goes under `dest`, missing parent directories created.
    fn place(&self, rel: &Path) -> Result<PathBuf, ImageError> {
        let placed = self.resolve(rel, true)?;
        Ok(placed.expect("resolve with create makes every parent"))
    }

    /// Where `rel` is under `dest`; `None` when a parent directory is missing.
    fn find(&self, rel: &Path) -> Result<Option<PathBuf>, ImageError> {
        self.resolve(rel, false)
    }

    /// Where `rel` lives under `dest`: its parents resolved inside `dest` (symlinks followed,
    /// missing directories created when `create`, else `None`), its last component as is.
    fn resolve(&self, rel: &Path, create: bool) -> Result<Option<PathBuf>, ImageError> {
        // The root itself: a top-level opaque marker hides everything below.
        if rel.as_os_str().is_empty() {
            return Ok(Some(self.dest.to_owned()));
        }
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(ImageError::entry(rel, "empty path"));
        };
        let escapes =
            || ImageError::entry(rel, "a symlink in its path points outside the destination");
        let mut real = self.dest.to_path_buf();
        let mut depth = 0usize;
        let mut todo: VecDeque<OsString> = parent.iter().map(OsStr::to_owned).collect();
        let mut hops = 0;
        while let Some(part) = todo.pop_front() {
            if part == ".." {
                if depth == 0 {
                    return Err(escapes());
                }
                real.pop();
                depth -= 1;
                continue;
            }
            real.push(&part);
            match fs::symlink_metadata(&real) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(ImageError::entry(rel, "too many levels of symlinks"));
                    }
                    let link = fs::read_link(&real).map_err(ImageError::entry_io(rel))?;
                    real.pop();
                    if link.is_absolute() {
                        real = self.dest.to_path_buf();
                        depth = 0;
                    }
                    for component in link.components().rev() {
                        match component {
                            Component::Normal(part) => todo.push_front(part.to_owned()),
                            Component::ParentDir => todo.push_front("..".into()),
                            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Ok(meta) if meta.is_dir() => depth += 1,
                Ok(_) => return Err(ImageError::entry(rel, "a parent is not a directory")),
                Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&real)
                        .map_err(ImageError::entry_io(rel))?;
                    depth += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(ImageError::entry_io(rel)(err)),
            }
        }
        Ok(Some(real.join(name)))
    }

    fn finish(self) -> Result<UnpackStats, ImageError> {
        for (dir, mode, mtime) in &self.dirs {
            // A later entry of the same layer may have replaced it (never follow a symlink
            // put in its place).
            if !fs::symlink_metadata(dir).is_ok_and(|meta| meta.is_dir()) {
                continue;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
                .and_then(|()| sys::set_mtime_nofollow(dir, *mtime))
                .map_err(ImageError::io(dir))?;
        }
        Ok(self.stats)
    }
}

/// Removes whatever is at `path` (a directory with its contents); nothing there is fine.
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    use super::*;
    use crate::image::testutil::{list_dir, raw_tar};

    #[test]
    fn entries_that_would_escape_are_refused() {
        type Case<'a> = (&'a str, &'a [(&'a str, tar::EntryType, &'a str, &'a [u8])]);
        let cases: &[Case<'_>] = &[
            ("../evil", &[("../evil", F, "", b"x")]),
            (
                "a/../../evil",
                &[("a/", D, "", b""), ("a/../../evil", F, "", b"x")],
            ),
            ("/evil", &[("/evil", F, "", b"x")]),
            (
                "link/evil",
                &[("link", S, "../../..", b""), ("link/evil", F, "", b"x")],
            ),
            (
                "up/evil",
                &[("up", S, "/..", b""), ("up/evil", F, "", b"x")],
            ),
            ("hard", &[("hard", H, "../outside", b"")]),
        ];
        for (bad, entries) in cases {
            let parent = tempfile::tempdir().expect("tempdir");
            let dest = parent.path().join("dest");
            fs::create_dir(&dest).expect("dest");
            let tar = raw_tar(entries);
            let err = unpack(tar.as_slice(), &dest, Whiteouts::Apply).expect_err(bad);
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
            let outside: Vec<_> = list_dir(parent.path())
                .into_keys()
                .filter(|path| path != "dest" && !path.starts_with("dest/"))
                .collect();
            assert!(outside.is_empty(), "{bad}: wrote {outside:?}");
        }
    }

    #[test]
    fn symlinks_on_the_way_resolve_inside_dest() {
        let dest = tempfile::tempdir().expect("dest");
        let tar = raw_tar(&[
            ("etc/", D, "", b""),
            ("abs", S, "/etc", b""),
            ("abs/a", F, "", b"a"),
            ("rel", S, "etc/../etc", b""),
            ("rel/b", F, "", b"b"),
            ("rel/hard", H, "abs/a", b""),
        ]);
        let stats = unpack(tar.as_slice(), dest.path(), Whiteouts::Apply).expect("unpack");
        assert_eq!(
            stats,
            UnpackStats {
                entries: 6,
                bytes: 2
            }
        );
        assert_eq!(fs::read(dest.path().join("etc/a")).expect("a"), b"a");
        assert_eq!(fs::read(dest.path().join("etc/b")).expect("b"), b"b");
        assert_eq!(fs::read(dest.path().join("etc/hard")).expect("hard"), b"a");
        assert_eq!(
            fs::read_link(dest.path().join("abs")).expect("link"),
            Path::new("/etc")
        );
    }

    #[test]
    fn applied_whiteouts_delete_and_directories_come_back() {
        let dest = tempfile::tempdir().expect("dest");
        let layers = [
            raw_tar(&[
                ("a/", D, "", b""),
                ("a/keep", F, "", b"keep"),
                ("a/gone", F, "", b"gone"),
                ("d/", D, "", b""),
                ("d/old", F, "", b"old"),
                ("d/sub/", D, "", b""),
                ("e/", D, "", b""),
                ("e/x", F, "", b"x"),
            ]),
            raw_tar(&[
                ("a/.wh.gone", F, "", b""),
                ("d/", D, "", b""),
                ("d/-new", F, "", b"sorts before the marker"),
                ("d/.wh..wh..opq", F, "", b""),
                (".wh.e", F, "", b""),
            ]),
            raw_tar(&[("e/", D, "", b""), ("e/y", F, "", b"y")]),
        ];
        for layer in &layers {
            unpack(layer.as_slice(), dest.path(), Whiteouts::Apply).expect("unpack");
        }
        let paths: Vec<String> = list_dir(dest.path()).into_keys().collect();
        assert_eq!(paths, ["a", "a/keep", "d", "d/-new", "e", "e/y"]);
    }

    #[test]
    fn a_top_level_opaque_marker_hides_every_earlier_layer() {
        let dest = tempfile::tempdir().expect("dest");
        let layers = [
            raw_tar(&[("x/", D, "", b""), ("x/old", F, "", b"old")]),
            raw_tar(&[
                ("a", F, "", b"a"),
                (".wh..wh..opq", F, "", b""),
                ("y", F, "", b"y"),
            ]),
        ];
        for layer in &layers {
            unpack(layer.as_slice(), dest.path(), Whiteouts::Apply).expect("unpack");
        }
        let paths: Vec<String> = list_dir(dest.path()).into_keys().collect();
        assert_eq!(paths, ["a", "y"]);
    }

    #[test]
    fn whiteouts_never_act_through_symlinks() {
        let parent = tempfile::tempdir().expect("tempdir");
        let victim = parent.path().join("outside/victim");
        fs::create_dir_all(victim.parent().expect("parent")).expect("mkdir");
        fs::write(&victim, "keep").expect("victim");
        let dest = parent.path().join("dest");
        fs::create_dir(&dest).expect("dest");
        let outside = victim.parent().expect("parent").display().to_string();
        let layers = [
            raw_tar(&[("a", S, &outside, b""), ("b", S, &outside, b"")]),
            raw_tar(&[("a/.wh..wh..opq", F, "", b""), (".wh.b", F, "", b"")]),
        ];
        for layer in &layers {
            unpack(layer.as_slice(), &dest, Whiteouts::Apply).expect("unpack");
        }
        assert_eq!(fs::read(&victim).expect("victim survives"), b"keep");
        assert!(fs::symlink_metadata(dest.join("a")).is_ok_and(|m| m.is_symlink()));
        assert!(
            fs::symlink_metadata(dest.join("b")).is_err(),
            "the link itself is removed"
        );
    }

    #[test]
    fn gzip_and_zstd_are_detected() {
        let tar = raw_tar(&[("f", F, "", b"data")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).expect("gzip");
        let dest = tempfile::tempdir().expect("dest");
        let gz = gz.finish().expect("gzip");
        unpack(gz.as_slice(), dest.path(), Whiteouts::Apply).expect("gzip layer");
        assert_eq!(fs::read(dest.path().join("f")).expect("f"), b"data");
        let zstd = ruzstd::encoding::compress_to_vec(
            tar.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let dest = tempfile::tempdir().expect("dest");
        unpack(zstd.as_slice(), dest.path(), Whiteouts::Apply).expect("zstd layer");
        assert_eq!(fs::read(dest.path().join("f")).expect("f"), b"data");
    }
}
