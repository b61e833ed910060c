//! Deterministic layers: a directory in, a compressed tar in the CAS out.
//!
//! The directory is an overlayfs upper dir (its whiteouts — 0:0 character devices and
//! `overlay.opaque` directories — become OCI `.wh.` entries) or a staged tree. The same tree
//! always gives the same bytes: entries sorted by path, headers built field by field
//! (`entry::TarSink`), mtimes optionally clamped to `SOURCE_DATE_EPOCH`, no user or group names.
//! The tar's SHA-256 (the diff-id) and the compressed SHA-256 (the digest) are computed in the
//! one pass that streams the layer into a [`BlobWriter`](crate::store::BlobWriter).
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

use sha2::{Digest as _, Sha256};

use super::entry::{Entry, Kind, Links, OPAQUE_MARKER, TarSink, WHITEOUT_PREFIX, carries_xattr};
use super::oci::MediaTypes;
use super::{ImageError, sys};
use crate::store::{Blob, Cas, Digest};

/// zlib level 1 for the blocks worth compressing. Measured on 210 MB of mixed files (2-core
/// shared machine, release): level 6 (Docker's and containerd's choice) compresses at
/// ~130 MB/s to 29% of the tar, level 1 at ~260 MB/s to 34%. Compression sits on the critical
/// path of every edit-and-rebuild (a profile of a 100 MB COPY showed deflate at two thirds of
/// the step), which is the loop MemoBuild exists to make fast; 16% larger blobs on push are the
/// price.
///
/// Level 1 (zlib-rs's `deflate_quick`) codes literals with deflate's fixed Huffman table, so it
/// gains only from repeats: on incompressible data (archives, jars, media) it runs at ~93 MB/s
/// and grows the data by 5.5%. [`gzip::GzipWriter`] stores such blocks instead. Measured
/// (release, 8 KiB writes, same machine): 256 MiB of random bytes now go at ~800 MB/s and grow
/// by 0.01%; 256 MiB of source text at 318 MB/s instead of 334 (the byte histogram costs 5%),
/// to the same size; a 1.25 GB tar of /usr/lib, /usr/share and crate archives at 213 MB/s
/// instead of 193, and 0.6% smaller.
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
    // Two threads, two hash chains: this one reads files, frames the tar and takes its
    // SHA-256 (the diff-id); the other compresses, takes the blob's SHA-256 and writes it.
    let (diff_id, content_id, blob) = std::thread::scope(|scope| {
        let (handoff, received) = Handoff::new();
        let compression = opts.compression;
        let compressing = scope.spawn(move || {
            let mut compressor = Compressor::new(blob, compression);
            for buffer in received {
                compressor.write_all(&buffer)?;
            }
            compressor.finish()
        });
        let framed = frame_tar(dir, entries, opts, HashingWriter::new(handoff));
        // The compressor's own error (a full disk, say) explains a failed hand-off best.
        let compressed = compressing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (framed, compressed) {
            (Ok((diff_id, content_id)), Ok(blob)) => Ok((diff_id, content_id, blob)),
            (_, Err(err)) => Err(ImageError::io(dir)(err)),
            (Err(err), Ok(_)) => Err(err),
        }
    })?;
    let blob = blob
        .into_inner()
        .map_err(|err| ImageError::io(dir)(err.into_error()))?;
    let blob = blob.commit(None)?;
    let media_type = match opts.compression {
        Compression::Gzip => MediaTypes::Oci.layer_gzip(),
        Compression::None => MediaTypes::Oci.layer_tar(),
    };
    Ok(Some(Layer {
        blob,
        diff_id,
        media_type: media_type.to_owned(),
        content_id,
    }))
}

/// Streams the entries as a tar into `tar`; returns the tar's SHA-256 and its content id.
/// Ends the stream on success and on failure alike (dropping `tar` closes the hand-off).
fn frame_tar(
    dir: &Path,
    entries: Vec<Scanned>,
    opts: &LayerOptions<'_>,
    tar: HashingWriter<Handoff>,
) -> Result<(Digest, [u8; 32]), ImageError> {
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
    let (handoff, diff_id) = sink.finish().map_err(ImageError::io(dir))?.finish();
    handoff.finish().map_err(ImageError::io(dir))?;
    Ok((diff_id, content_id))
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

/// The compression stage of a tar being written.
pub(crate) enum Compressor<W: Write> {
    Gzip(Box<gzip::GzipWriter<W>>),
    None(W),
}

impl<W: Write> Compressor<W> {
    pub(crate) fn new(out: W, compression: Compression) -> Self {
        match compression {
            Compression::Gzip => Self::Gzip(Box::new(gzip::GzipWriter::new(out))),
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

/// A gzip writer that stores what level 1 cannot shrink.
mod gzip {
    use std::io::{self, Write};
    use std::mem;

    use flate2::{Compress, Compression, Crc, FlushCompress, Status};

    use super::GZIP_LEVEL;

    /// Input is judged, then stored or compressed, a block of this many bytes at a time: enough
    /// for a steady byte histogram and a negligible stored-block framing (15 bytes per block),
    /// few enough to follow a tar from a text file to an archive.
    const BLOCK: usize = 128 << 10;

    /// Order-0 entropy, in bits per byte, from which a block is stored rather than compressed
    /// at [`GZIP_LEVEL`]. Level 1 gains nothing from skewed byte frequencies (its literals use
    /// deflate's fixed Huffman table), so entropy only tells structured data from packed data,
    /// and the cut sits where level 1 stops paying. Measured per block on a 1.25 GB tar of
    /// /usr/lib, /usr/share and cargo's crate cache: level 1 shrank blocks at 7.75-7.80 bits by
    /// 9%, at 7.90-7.95 by 2%, grew those at 7.96-7.98 by 2% and those from 7.99 (archives) by
    /// 5%. Of the cuts tried from 7.0 to 7.99, 7.95 gave the smallest total but for 7.96 (0.01%
    /// smaller): 0.62% smaller than level 1 on every block. A cut at 7.76 (where an ideal byte
    /// code would save under 3%) would store blocks level 1 shrinks by 9%. Random bytes measure
    /// 7.998 in a full block; a random tail under ~4 KiB measures below the cut and is
    /// compressed, at the cost of a few bytes.
    ///
    /// The entropy is taken over the block's literals: bytes that repeat their predecessor
    /// are left out, because level 1 codes runs as cheap matches. A tar of small packed files
    /// is ~96% random bytes and ~4% zero runs (headers and padding): its order-0 entropy
    /// (7.92) looks compressible, yet level 1 makes it ~2% bigger at a tenth of the speed.
    const STORE_ENTROPY: f64 = 7.95;

    /// The share of a block in runs (bytes equal to their predecessor) from which level 1
    /// is worth its cost with random literals: runs shrink to almost nothing while each
    /// literal costs 5.5% extra (fixed Huffman codes average 8.44 bits). Under 8% runs,
    /// level 1 saves under 3% at a tenth of storing's speed; a tar of 20 KiB random files
    /// has ~3.5%.
    const RUN_SHARE_TO_DEFLATE: f64 = 0.08;

    /// The most a stored deflate block holds: its LEN field has 16 bits (RFC 1951 §3.2.4).
    const STORED_MAX: usize = u16::MAX as usize;

    /// The gzip member header (RFC 1952) `flate2::write::GzEncoder` writes at level 1: deflate,
    /// no flags, no name, mtime 0 (the bytes depend on the content only), XFL 4 ("fastest"),
    /// OS 255 ("unknown").
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

    /// One gzip member whose deflate stream holds, block by block, zlib's compressed blocks or
    /// stored ones. The output depends only on the bytes written, not on how they were split
    /// into writes: blocks always start at the same offsets.
    ///
    /// Stored blocks are framed here rather than by zlib at level 0: with the zlib-rs backend,
    /// `Compress::set_level` fails with a stream error once any input has gone in (it hands
    /// zlib-rs's `params` no output buffer for the flush a change of level needs).
    pub(crate) struct GzipWriter<W: Write> {
        out: W,
        deflate: Compress,
        crc: Crc,
        /// Input short of a block, or a full block waiting for the next write or `finish`.
        pending: Vec<u8>,
        /// Output not yet handed to `out`; handed over a block's worth at a time.
        buf: Vec<u8>,
        /// `deflate` took input since its last full flush, so a stored block cannot follow yet.
        deflating: bool,
    }

    impl<W: Write> GzipWriter<W> {
        pub(crate) fn new(out: W) -> Self {
            // Room for a block's worth plus one stored block, so `buf` never grows.
            let mut buf = Vec::with_capacity(2 * BLOCK);
            buf.extend_from_slice(&HEADER);
            Self {
                out,
                deflate: Compress::new(Compression::new(GZIP_LEVEL), false),
                crc: Crc::new(),
                pending: Vec::with_capacity(BLOCK),
                buf,
                deflating: false,
            }
        }

        /// Writes what is pending, the end of the deflate stream and the trailer.
        pub(crate) fn finish(mut self) -> io::Result<W> {
            self.write_pending()?;
            self.deflate(&[], FlushCompress::Finish)?;
            self.buf.extend_from_slice(&self.crc.sum().to_le_bytes());
            // ISIZE: the input's length modulo 2^32.
            self.buf.extend_from_slice(&self.crc.amount().to_le_bytes());
            self.out.write_all(&self.buf)?;
            Ok(self.out)
        }

        fn write_pending(&mut self) -> io::Result<()> {
            if self.pending.is_empty() {
                return Ok(());
            }
            let block = mem::take(&mut self.pending);
            let written = self.write_block(&block);
            self.pending = block;
            self.pending.clear();
            written
        }

        fn write_block(&mut self, block: &[u8]) -> io::Result<()> {
            self.crc.update(block);
            if !worth_storing(block) {
                self.deflating = true;
                return self.deflate(block, FlushCompress::None);
            }
            if self.deflating {
                // Byte-aligns the stream and drops zlib's history: what it compresses next
                // must not refer back across stored bytes it never saw.
                self.deflate(&[], FlushCompress::Full)?;
                self.deflating = false;
            }
            for chunk in block.chunks(STORED_MAX) {
                self.drain()?;
                let len = u16::try_from(chunk.len()).expect("a chunk holds at most STORED_MAX");
                // BFINAL 0 and BTYPE 00 (stored), then padding to the byte boundary.
                self.buf.push(0);
                self.buf.extend_from_slice(&len.to_le_bytes());
                self.buf.extend_from_slice(&(!len).to_le_bytes());
                self.buf.extend_from_slice(chunk);
            }
            Ok(())
        }

        /// Runs zlib until it has taken all of `input` and, for a flush, written all it owes.
        fn deflate(&mut self, mut input: &[u8], flush: FlushCompress) -> io::Result<()> {
            loop {
                self.drain()?;
                let before = self.deflate.total_in();
                let status = self
                    .deflate
                    .compress_vec(input, &mut self.buf, flush)
                    .map_err(io::Error::other)?;
                let taken = usize::try_from(self.deflate.total_in() - before)
                    .expect("zlib takes at most the input it was given");
                input = &input[taken..];
                let done = match flush {
                    FlushCompress::None => input.is_empty(),
                    FlushCompress::Finish => status == Status::StreamEnd,
                    // A flush is complete once zlib leaves output room unused.
                    _ => self.buf.len() < self.buf.capacity(),
                };
                if done {
                    return Ok(());
                }
            }
        }

        /// Hands `out` what has piled up once it is a block's worth, which leaves at least a
        /// block of room in `buf`.
        fn drain(&mut self) -> io::Result<()> {
            if self.buf.len() >= BLOCK {
                self.out.write_all(&self.buf)?;
                self.buf.clear();
            }
            Ok(())
        }
    }

    impl<W: Write> Write for GzipWriter<W> {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            // A full block is compressed by the next call, so that an error from it comes from
            // a call that took none of its `data`, as `Write::write` promises.
            if self.pending.len() == BLOCK {
                self.write_pending()?;
            }
            if self.pending.is_empty() && data.len() >= BLOCK {
                // Straight from the caller's buffer, saving a copy.
                self.write_block(&data[..BLOCK])?;
                return Ok(BLOCK);
            }
            let taken = data.len().min(BLOCK - self.pending.len());
            self.pending.extend_from_slice(&data[..taken]);
            Ok(taken)
        }

        // Input short of a block stays pending: compressing it now would make the output
        // depend on when flush was called.
        fn flush(&mut self) -> io::Result<()> {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
            self.out.flush()
        }
    }

    /// Whether level 1 would not shrink `block` enough to pay: random literals, few runs.
    fn worth_storing(block: &[u8]) -> bool {
        let (literals, runs) = literal_counts(block);
        let run_share = runs as f64 / block.len().max(1) as f64;
        run_share < RUN_SHARE_TO_DEFLATE && entropy(&literals) >= STORE_ENTROPY
    }

    /// Byte counts of the bytes that do not repeat their predecessor (approximately), and how
    /// many do.
    fn literal_counts(block: &[u8]) -> ([u32; 256], u64) {
        // Four tables, so that a run of one byte does not make each increment wait for the
        // previous one to land in the same counter.
        let mut counts = [[0u32; 256]; 4];
        let (quads, rest) = block.as_chunks::<4>();
        for &[a, b, c, d] in quads {
            counts[0][usize::from(a)] += 1;
            counts[1][usize::from(b)] += 1;
            counts[2][usize::from(c)] += 1;
            counts[3][usize::from(d)] += 1;
        }
        for &byte in rest {
            counts[0][usize::from(byte)] += 1;
        }
        let mut literals = [0u32; 256];
        for (byte, count) in literals.iter_mut().enumerate() {
            *count = counts.iter().map(|table| table[byte]).sum();
        }
        // Counted without a branch per byte, so it vectorizes. The runs are taken from the
        // most common byte: in the blocks this decides on (packed files in a tar) they are
        // the zeros of headers and padding, which are that byte.
        let pairs = block.iter().zip(block.iter().skip(1));
        let runs: u32 = pairs.map(|(a, b)| u32::from(a == b)).sum();
        if let Some(top) = literals.iter_mut().max() {
            *top -= runs.min(*top);
        }
        (literals, u64::from(runs))
    }

    /// Order-0 entropy of a byte histogram, in bits per byte.
    fn entropy(counts: &[u32; 256]) -> f64 {
        let len = counts.iter().map(|&c| f64::from(c)).sum::<f64>();
        counts
            .iter()
            .filter(|&&count| count > 0)
            .map(|&count| {
                let p = f64::from(count) / len;
                -p * p.log2()
            })
            .sum()
    }

    #[cfg(test)]
    mod tests {
        use std::io::Read;
        use std::process::Command;

        use super::*;

        fn random(len: usize, mut seed: u64) -> Vec<u8> {
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                // xorshift64
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                out.extend_from_slice(&seed.to_le_bytes());
            }
            out.truncate(len);
            out
        }

        /// Lines of words drawn from a small vocabulary: compresses well, like source code.
        fn text(len: usize, seed: u64) -> Vec<u8> {
            const WORDS: [&str; 16] = [
                "layer",
                "the",
                "build",
                "cache",
                "of",
                "and",
                "snapshot",
                "fn",
                "let",
                "mut",
                "digest",
                "to",
                "io::Result",
                "Ok(())",
                "{",
                "}",
            ];
            let mut out = Vec::with_capacity(len + 16);
            for (i, pick) in random(len, seed).into_iter().enumerate() {
                if out.len() >= len {
                    break;
                }
                out.extend_from_slice(WORDS[usize::from(pick % 16)].as_bytes());
                out.push(if i % 9 == 8 { b'\n' } else { b' ' });
            }
            out.truncate(len);
            out
        }

        /// 200 KB of random bytes, 200 KB of text, and so on: both kinds of block, both ways
        /// round.
        fn mixed(len: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(len);
            for part in 0u64.. {
                if out.len() >= len {
                    break;
                }
                let kind = if part % 2 == 0 { random } else { text };
                out.extend_from_slice(&kind(200_000, part + 1));
            }
            out.truncate(len);
            out
        }

        /// Whole blocks of random bytes and text in turn: the stream switches both ways.
        fn alternating() -> Vec<u8> {
            [
                random(BLOCK, 3),
                text(BLOCK, 3),
                random(BLOCK, 4),
                text(BLOCK, 4),
            ]
            .concat()
        }

        /// Gzips `data` written in pieces whose sizes cycle through `sizes`.
        fn gzip(data: &[u8], sizes: &[usize]) -> Vec<u8> {
            let mut writer = GzipWriter::new(Vec::new());
            let mut rest = data;
            for &size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at(size.min(rest.len()));
                writer.write_all(piece).expect("write");
                rest = tail;
            }
            writer.finish().expect("finish")
        }

        fn gunzip(gz: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(gz)
                .read_to_end(&mut out)
                .expect("a valid gzip stream");
            out
        }

        #[test]
        fn round_trips() {
            let cases = [
                ("empty", Vec::new()),
                ("one byte", vec![42]),
                ("a block", random(BLOCK, 7)),
                ("a block and a byte", random(BLOCK + 1, 7)),
                ("random", random(1_000_000, 7)),
                ("text", text(1_000_000, 7)),
                ("mixed", mixed(1_000_000)),
                ("alternating", alternating()),
            ];
            for (name, data) in cases {
                let gz = gzip(&data, &[usize::MAX]);
                assert_eq!(gunzip(&gz), data, "{name}");
                let mut multi = Vec::new();
                flate2::read::MultiGzDecoder::new(&gz[..])
                    .read_to_end(&mut multi)
                    .expect("a valid gzip stream");
                assert_eq!(multi, data, "{name}");
            }
        }

        #[test]
        fn the_output_does_not_depend_on_how_writes_are_split() {
            let data = mixed(1_000_000);
            let whole = gzip(&data, &[usize::MAX]);
            for sizes in [&[1][..], &[7], &[BLOCK - 1], &[1, 7, BLOCK - 1, 300_000]] {
                assert!(gzip(&data, sizes) == whole, "{sizes:?}");
            }
        }

        #[test]
        fn the_header_and_an_empty_stream_are_what_gz_encoder_writes() {
            let level = flate2::Compression::new(GZIP_LEVEL);
            let encoder = flate2::write::GzEncoder::new(Vec::new(), level);
            assert_eq!(gzip(&[], &[1]), encoder.finish().expect("finish"));
            assert_eq!(gzip(&text(1000, 3), &[1])[..10], HEADER);
        }

        #[test]
        fn random_blocks_are_stored_and_text_is_compressed() {
            let data = random(1_000_000, 11);
            let gz = gzip(&data, &[usize::MAX]);
            assert!(gz.len() <= data.len() + data.len() / 1000, "{}", gz.len());
            let data = text(1_000_000, 11);
            let gz = gzip(&data, &[usize::MAX]);
            assert!(gz.len() < data.len() * 4 / 10, "{}", gz.len());
            // Random blocks stored, text blocks compressed.
            let gz = gzip(&alternating(), &[usize::MAX]);
            assert!(gz.len() < 2 * BLOCK + 2 * BLOCK * 4 / 10, "{}", gz.len());
            // Switches mid-block too: smaller than level 1 throughout, which grows random data.
            let data = mixed(1_000_000);
            let gz = gzip(&data, &[usize::MAX]);
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
            encoder.write_all(&data).expect("write");
            let level_1 = encoder.finish().expect("finish").len();
            assert!(gz.len() < level_1, "{} vs {level_1}", gz.len());
        }

        #[test]
        fn gnu_gzip_reads_the_output() {
            let data = [mixed(1_000_000), alternating()].concat();
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), gzip(&data, &[usize::MAX])).expect("write");
            let gzip = |arg| {
                let output = Command::new("gzip")
                    .arg(arg)
                    .arg(file.path())
                    .output()
                    .expect("run gzip (in every Debian base system)");
                assert!(output.status.success(), "gzip {arg}: {output:?}");
                output.stdout
            };
            gzip("-t");
            assert!(gzip("-dc") == data);
        }

        #[test]
        fn entropy_spans_zero_to_eight_bits() {
            let of = |block: &[u8]| entropy(&literal_counts(block).0);
            assert_eq!(of(&[7; 1000]), 0.0);
            assert!((of(&[0, 1, 0, 1, 0, 1, 0, 1]) - 1.0).abs() < 1e-9);
            let all: Vec<u8> = (0..=255).collect();
            assert!((of(&all.repeat(4)) - 8.0).abs() < 1e-9);
            assert!(of(&random(BLOCK, 5)) > STORE_ENTROPY);
            assert!(of(&text(BLOCK, 5)) < STORE_ENTROPY);
            assert!(worth_storing(&random(BLOCK, 5)));
            assert!(!worth_storing(&text(BLOCK, 5)));
        }

        #[test]
        fn a_tar_of_small_random_files_is_stored_and_one_with_more_padding_deflated() {
            // 20 KiB random files, each after a 512-byte header of zeros but a name.
            let tar_like = |file: usize| {
                let mut block = Vec::new();
                let mut seed = 9;
                while block.len() < BLOCK {
                    let mut header = vec![0u8; 512];
                    header[..8].copy_from_slice(b"src/file");
                    block.extend_from_slice(&header);
                    block.extend_from_slice(&random(file, seed));
                    seed += 1;
                }
                block.truncate(BLOCK);
                block
            };
            let packed = tar_like(20 << 10);
            assert!(worth_storing(&packed));
            let level1 = {
                let mut deflate = Compress::new(Compression::new(GZIP_LEVEL), false);
                let mut out = Vec::with_capacity(2 * BLOCK);
                deflate
                    .compress_vec(&packed, &mut out, FlushCompress::Finish)
                    .expect("deflate");
                out.len()
            };
            assert!(level1 > packed.len(), "level 1 would grow it: {level1}");
            // 2 KiB files: a fifth of the block is header zeros, which level 1 removes.
            assert!(!worth_storing(&tar_like(2 << 10)));
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
        assert_eq!(first.media_type, MediaTypes::Oci.layer_gzip());
        assert_ne!(first.blob.digest, first.diff_id);
        let tar = cas.open(&first.blob).expect("open");
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
        let blob = cas.open(&layer.blob).expect("open");
        unpack(blob, dest.path(), Whiteouts::Overlay).expect("unpack");
        assert_eq!(list_dir(dest.path()), list_dir(up));
        let opaque = sys::lgetxattr(&dest.path().join("opq"), "trusted.overlay.opaque");
        assert_eq!(opaque.expect("xattr").as_deref(), Some(&b"y"[..]));
        assert_eq!(write(&cas, dest.path(), &LayerOptions::default()), layer);
    }
}
