//! One tar entry in both directions: [`TarSink`] writes the headers of every tar this module
//! makes (layers, root filesystems, archives) and [`read_entry`] reads the ones it is given
//! (layers to unpack or merge), so the two agree on paths, whiteouts and PAX records.
//!
//! Headers are built field by field: ustar with explicit mode (setuid, setgid and sticky
//! kept — `tar::HeaderMode::Deterministic` would drop them), uid, gid and mtime, empty user
//! and group names, and a PAX record for whatever ustar cannot hold (long names and link
//! targets, big ids and sizes).

use std::collections::{HashMap, hash_map};
use std::ffi::OsStr;
use std::hash::Hash;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::{EntryType, Header};

use super::ImageError;
use super::layer::LayerOptions;

/// The OCI whiteout prefix: `.wh.x` deletes `x` of the layers below.
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// The OCI opaque marker: the directory holding it hides everything below it.
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The PAX record prefix of extended attributes (GNU tar, Go, containerd).
const XATTR_RECORD: &str = "SCHILY.xattr.";

/// Whether an extended attribute belongs in a layer: overlayfs' bookkeeping (`origin`,
/// `impure`, `opaque`, …) is the snapshotter's, and SELinux labels are the host's.
pub(crate) fn carries_xattr(name: &str) -> bool {
    !name.starts_with("trusted.overlay.")
        && !name.starts_with("user.overlay.")
        && name != "security.selinux"
}

// The largest numbers ustar's octal fields hold; beyond them a PAX record carries the value.
const MAX_USTAR_ID: u64 = 0o7777777;
const MAX_USTAR_SIZE: u64 = 0o77777777777;
const MAX_USTAR_NAME: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    /// A hard link to an earlier entry of the same tar, by its path.
    HardLink(PathBuf),
    Fifo,
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
}

/// A tar entry's metadata. `path` is relative, with only normal components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) path: PathBuf,
    pub(crate) kind: Kind,
    /// Permission bits with setuid, setgid and sticky.
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) mtime: i64,
    /// Data bytes; only files have any.
    pub(crate) size: u64,
    /// Extended attributes (`security.capability`, …), by name.
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// An empty regular file, as whiteouts and opaque markers are written.
    pub(crate) fn marker(path: PathBuf, mtime: i64) -> Self {
        Self {
            path,
            kind: Kind::File,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime,
            size: 0,
            xattrs: Vec::new(),
        }
    }
}

/// What a whiteout entry asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Whiteout<'p> {
    /// Delete this path of the layers below.
    Remove(PathBuf),
    /// Hide everything the layers below put in this directory.
    Opaque(&'p Path),
}

pub(crate) fn whiteout(path: &Path) -> Option<Whiteout<'_>> {
    let name = path.file_name()?.as_bytes();
    let parent = path.parent().unwrap_or(Path::new(""));
    if name == OPAQUE_MARKER.as_bytes() {
        return Some(Whiteout::Opaque(parent));
    }
    let hidden = name.strip_prefix(WHITEOUT_PREFIX.as_bytes())?;
    // `.wh.`, `.wh..` and `.wh...` name no sibling; they stay the odd files they are.
    if matches!(hidden, b"" | b"." | b"..") {
        return None;
    }
    Some(Whiteout::Remove(parent.join(OsStr::from_bytes(hidden))))
}

/// Hard links inside one tar: the first path written for an inode carries its data, the
/// later ones become links to it.
#[derive(Debug)]
pub(crate) struct Links<K> {
    first: HashMap<K, PathBuf>,
}

impl<K: Hash + Eq> Links<K> {
    pub(crate) fn new() -> Self {
        Self {
            first: HashMap::new(),
        }
    }

    /// Makes `entry` a link when its inode was written before (true: no data to write);
    /// otherwise remembers its path as the inode's first.
    pub(crate) fn link(&mut self, inode: K, entry: &mut Entry) -> bool {
        match self.first.entry(inode) {
            hash_map::Entry::Occupied(first) => {
                entry.kind = Kind::HardLink(first.get().clone());
                entry.size = 0;
                true
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert(entry.path.clone());
                false
            }
        }
    }
}

/// Writes entries into a tar, applying the caller's ownership and mtime rules.
pub(crate) struct TarSink<'o, W: Write> {
    builder: tar::Builder<W>,
    opts: &'o LayerOptions<'o>,
    /// The content id being computed (see [`TarSink::with_content_id`]).
    content: Option<blake3::Hasher>,
}

/// Versions content ids.
const CONTENT_ID_DOMAIN: &[u8] = b"memobuild-layer-content-v1\0";

impl<W: Write> std::fmt::Debug for TarSink<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarSink").field("opts", &self.opts).finish()
    }
}

impl<'o, W: Write> TarSink<'o, W> {
    pub(crate) fn new(out: W, opts: &'o LayerOptions<'o>) -> Self {
        Self {
            builder: tar::Builder::new(out),
            opts,
            content: None,
        }
    }

    /// Also computes the tar's *content id*: BLAKE3 over every header and PAX record with
    /// the mtime set to 0, and every byte of data. Two tars that differ only in timestamps
    /// (a RUN that ran again and wrote the same files) have the same content id; keys chain
    /// on it, so what comes after such a step stays cached.
    pub(crate) fn with_content_id(mut self) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(CONTENT_ID_DOMAIN);
        self.content = Some(hasher);
        self
    }

    /// The content id of what was appended so far, if it is being computed.
    pub(crate) fn content_id(&self) -> Option<[u8; 32]> {
        self.content.as_ref().map(|h| *h.finalize().as_bytes())
    }

    /// Appends `entry`; `data` must hold exactly `entry.size` bytes.
    pub(crate) fn append(&mut self, entry: &Entry, data: impl Read) -> Result<(), ImageError> {
        let (header, pax) = self.header(entry);
        let io = ImageError::entry_io(&entry.path);
        if let Some(content) = &mut self.content {
            for (key, value) in &pax {
                for field in [key.as_bytes(), value.as_slice()] {
                    content.update(&(field.len() as u64).to_le_bytes());
                    content.update(field);
                }
            }
            let mut timeless = header.clone();
            timeless.set_mtime(0);
            timeless.set_cksum();
            content.update(timeless.as_bytes());
        }
        if !pax.is_empty() {
            let records = pax
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_slice()));
            if let Err(err) = self.builder.append_pax_extensions(records) {
                return Err(io(err));
            }
        }
        let data = Exact {
            inner: ContentReader {
                inner: data,
                content: self.content.as_mut(),
            },
            left: entry.size,
        };
        self.builder.append(&header, data).map_err(io)
    }

    /// Writes the end-of-archive blocks and hands back the output.
    pub(crate) fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }

    fn header(&self, entry: &Entry) -> (Header, Vec<(String, Vec<u8>)>) {
        let mut header = Header::new_ustar();
        let mut pax = Vec::new();
        let (entry_type, link) = match &entry.kind {
            Kind::File => (EntryType::Regular, None),
            Kind::Dir => (EntryType::Directory, None),
            Kind::Symlink(target) => (EntryType::Symlink, Some(target)),
            Kind::HardLink(target) => (EntryType::Link, Some(target)),
            Kind::Fifo => (EntryType::Fifo, None),
            Kind::Char { .. } => (EntryType::Char, None),
            Kind::Block { .. } => (EntryType::Block, None),
        };
        header.set_entry_type(entry_type);

        let mut name = entry.path.as_os_str().as_bytes().to_vec();
        if entry.kind == Kind::Dir {
            name.push(b'/');
        }
        if header.set_path(OsStr::from_bytes(&name)).is_err() {
            set_truncated(&mut header.as_old_mut().name, &name);
            pax.push(("path".to_owned(), name));
        }
        if let Some(target) = link {
            let target = target.as_os_str().as_bytes();
            if target.len() > MAX_USTAR_NAME || header.set_link_name_literal(target).is_err() {
                set_truncated(&mut header.as_old_mut().linkname, target);
                pax.push(("linkpath".to_owned(), target.to_vec()));
            }
        }

        let (uid, gid) = match self.opts.owner.and_then(|owner| owner(&entry.path)) {
            Some((uid, gid)) => (u64::from(uid), u64::from(gid)),
            None => (entry.uid, entry.gid),
        };
        for (key, value) in [("uid", uid), ("gid", gid)] {
            if value > MAX_USTAR_ID {
                pax.push((key.to_owned(), value.to_string().into_bytes()));
            }
        }
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mode(entry.mode & 0o7777);
        let mtime = match self.opts.source_date_epoch {
            Some(epoch) => entry.mtime.min(epoch),
            None => entry.mtime,
        };
        header.set_mtime(u64::try_from(mtime).unwrap_or(0));
        header.set_size(entry.size);
        if entry.size > MAX_USTAR_SIZE {
            pax.push(("size".to_owned(), entry.size.to_string().into_bytes()));
        }
        for (name, value) in &entry.xattrs {
            pax.push((format!("{XATTR_RECORD}{name}"), value.clone()));
        }
        if let Kind::Char { major, minor } | Kind::Block { major, minor } = entry.kind {
            // Infallible on a ustar header.
            let _ = header.set_device_major(major);
            let _ = header.set_device_minor(minor);
        }
        header.set_cksum();
        (header, pax)
    }
}

/// The start of a name too long for its field; readers take the whole one from PAX.
fn set_truncated(field: &mut [u8], name: &[u8]) {
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
}

/// Feeds what it reads to the content id, when one is computed.
struct ContentReader<'h, R> {
    inner: R,
    content: Option<&'h mut blake3::Hasher>,
}

impl<R: Read> Read for ContentReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(content) = &mut self.content {
            content.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A reader that yields exactly `left` bytes or fails: a file that shrank while being read
/// must not produce a tar whose header and data disagree.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads one entry's metadata, with PAX records applied and its path checked: relative,
/// no `..` (`./` prefixes are dropped). `Ok(None)` for what carries no file: the root
/// directory itself and PAX global headers.
pub(crate) fn read_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<Entry>, ImageError> {
    let path = clean_path(&entry.path_bytes())?;
    let Some(kind) = kind_of(entry, &path)? else {
        return Ok(None);
    };
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let header = entry.header();
    let io = |source| ImageError::EntryIo {
        entry: path.display().to_string(),
        source,
    };
    let mtime = header.mtime().map_err(io)?;
    let mut read = Entry {
        mode: header.mode().map_err(io)? & 0o7777,
        uid: header.uid().map_err(io)?,
        gid: header.gid().map_err(io)?,
        mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        size: if kind == Kind::File { entry.size() } else { 0 },
        xattrs: Vec::new(),
        kind,
        path,
    };
    apply_pax(entry, &mut read)?;
    Ok(Some(read))
}

/// The entry's kind; `None` for PAX global headers, which describe no file.
fn kind_of<R: Read>(entry: &tar::Entry<'_, R>, path: &Path) -> Result<Option<Kind>, ImageError> {
    let header = entry.header();
    let link = || entry.link_name_bytes().unwrap_or_default().into_owned();
    let device = || {
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        (major, minor)
    };
    Ok(Some(match header.entry_type() {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
        EntryType::Directory => Kind::Dir,
        EntryType::Symlink => Kind::Symlink(PathBuf::from(OsStr::from_bytes(&link()))),
        EntryType::Link => {
            let target = link();
            Kind::HardLink(clean_path(&target).map_err(|_| {
                let target = String::from_utf8_lossy(&target);
                ImageError::entry(
                    path,
                    format!("hard link target {target:?} leaves the layer"),
                )
            })?)
        }
        EntryType::Fifo => Kind::Fifo,
        EntryType::Char => {
            let (major, minor) = device();
            Kind::Char { major, minor }
        }
        EntryType::Block => {
            let (major, minor) = device();
            Kind::Block { major, minor }
        }
        EntryType::XGlobalHeader => return Ok(None),
        other => {
            let reason = format!("unsupported tar entry type {other:?}");
            return Err(ImageError::entry(path, reason));
        }
    }))
}

/// Applies the entry's PAX records beyond path, link and size (which `tar` applies itself).
fn apply_pax<R: Read>(entry: &mut tar::Entry<'_, R>, read: &mut Entry) -> Result<(), ImageError> {
    let Some(records) = entry
        .pax_extensions()
        .map_err(ImageError::entry_io(&read.path))?
    else {
        return Ok(());
    };
    for record in records {
        let record = record.map_err(ImageError::entry_io(&read.path))?;
        let value = || std::str::from_utf8(record.value_bytes()).ok();
        match record.key() {
            Ok("uid") => read.uid = parse_pax(value(), &read.path, "uid")?,
            Ok("gid") => read.gid = parse_pax(value(), &read.path, "gid")?,
            // Fractional seconds exist; tar headers here carry whole ones.
            Ok("mtime") => {
                let whole = value().map(|v| v.split('.').next().unwrap_or(v));
                read.mtime = parse_pax(whole, &read.path, "mtime")?;
            }
            Ok(key) => {
                if let Some(name) = key.strip_prefix(XATTR_RECORD) {
                    read.xattrs
                        .push((name.to_owned(), record.value_bytes().to_vec()));
                }
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn parse_pax<T: std::str::FromStr>(
    value: Option<&str>,
    path: &Path,
    key: &str,
) -> Result<T, ImageError> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ImageError::entry(path, format!("bad PAX {key} record")))
}

/// An archive path made safe to join under a destination, or refused.
pub(crate) fn clean_path(raw: &[u8]) -> Result<PathBuf, ImageError> {
    let path = Path::new(OsStr::from_bytes(raw));
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(ImageError::entry(path, "absolute path"));
            }
            Component::ParentDir => {
                return Err(ImageError::entry(path, "path leaves the layer with `..`"));
            }
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_are_recognised() {
        assert_eq!(
            whiteout(Path::new("a/b/.wh.c")),
            Some(Whiteout::Remove(PathBuf::from("a/b/c")))
        );
        assert_eq!(
            whiteout(Path::new("a/.wh..wh..opq")),
            Some(Whiteout::Opaque(Path::new("a")))
        );
        assert_eq!(
            whiteout(Path::new(".wh.top")),
            Some(Whiteout::Remove("top".into()))
        );
        assert_eq!(whiteout(Path::new("a/wh.c")), None);
        assert_eq!(whiteout(Path::new("a/.wh..")), None);
        assert_eq!(whiteout(Path::new(".wh...")), None);
    }

    #[test]
    fn paths_are_cleaned_or_refused() {
        assert_eq!(
            clean_path(b"./etc/passwd").expect("clean"),
            Path::new("etc/passwd")
        );
        assert_eq!(clean_path(b"./").expect("root"), Path::new(""));
        assert!(clean_path(b"/etc/passwd").is_err());
        assert!(clean_path(b"a/../../evil").is_err());
    }
}
