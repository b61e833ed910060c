//! Blobs: content-addressed files under `<root>/cas-v1/sha256/<2 hex>/<64 hex>`, one row each
//! in the index's `blobs` table (size on disk, for the budget).
//!
//! A blob enters only through a [`BlobWriter`]: bytes go to a temp file in `<root>/tmp/`
//! while SHA-256 is computed, and [`BlobWriter::commit`] links it into place only after the
//! digest is checked. So nothing half-written or mislabelled is ever visible, a crash leaves
//! only temp files (removed at the next start) or a file without its row (collected by the
//! next GC pass), and two writers of one blob both succeed. Reads verify too
//! ([`Cas::read`], [`Cas::open`]): a blob damaged on disk is reported and repaired — removed,
//! with every action that names it (`Shared::damaged`).
//!
//! A [`Cas`] handed out by a [`Lease`] holds every blob it touches (reads, size checks,
//! writes) in that lease, before touching it, so GC never removes what a build uses.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest as _, Sha256};

use super::index::IndexError;
use super::{Lease, Shared};

/// An OCI content digest, `sha256:<64 lowercase hex>`, validated on construction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Self, CasError> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| CasError::BadDigest(text.to_owned()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(CasError::BadDigest(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored blob: its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("blob {0} is not in the store")]
    Missing(Digest),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CasError + '_ {
    move |source| CasError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The store's blobs, seen by one lease (or by none: reads that need no protection, tests).
#[derive(Debug, Clone)]
pub struct Cas {
    pub(super) shared: Arc<Shared>,
    pub(super) lease: Option<Lease>,
}

impl Cas {
    /// Where a blob lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.shared.blob_path(digest)
    }

    fn hold(&self, digest: &Digest) {
        if let Some(lease) = &self.lease {
            lease.hold_blob(digest);
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.hold(digest);
        self.path(digest).is_file()
    }

    pub fn size(&self, digest: &Digest) -> Option<u64> {
        self.hold(digest);
        std::fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// A writer for a new blob; nothing is visible until [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter, CasError> {
        let tmp = self.shared.layout.tmp_dir();
        let temp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            cas: self.clone(),
            temp,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stores `bytes` (configs, manifests: small blobs). A blob already stored is not
    /// written again, but it is compared first: a damaged copy of the same size is replaced.
    pub fn put(&self, bytes: &[u8]) -> Result<Blob, CasError> {
        let digest = Digest::of(bytes);
        let blob = Blob {
            digest: digest.clone(),
            size: bytes.len() as u64,
        };
        if self.size(&digest) == Some(blob.size) {
            match std::fs::read(self.path(&digest)) {
                Ok(stored) if stored == bytes => return Ok(blob),
                Ok(_) => self.shared.damaged(&digest, self.lease.as_ref()),
                Err(_) => {}
            }
        }
        let mut writer = self.writer()?;
        let tmp = self.shared.layout.tmp_dir();
        writer.write_all(bytes).map_err(io_err(&tmp))?;
        writer.commit(None)
    }

    /// Reads a whole blob and checks its digest. A corrupt blob is removed (with the
    /// actions that name it), so the next build fetches or rebuilds it instead of failing.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, CasError> {
        self.hold(digest);
        let path = self.path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(CasError::Missing(digest.clone()));
            }
            Err(source) => return Err(CasError::Io { path, source }),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            self.shared.damaged(digest, self.lease.as_ref());
            return Err(CasError::Mismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Checks a stored blob's digest by streaming it (large layers).
    pub fn verify(&self, blob: &Blob) -> Result<(), CasError> {
        let mut reader = self.open(blob)?;
        io::copy(&mut reader, &mut io::sink()).map_err(|source| {
            match source.get_ref().and_then(|e| e.downcast_ref::<Damaged>()) {
                Some(damaged) => CasError::Mismatch {
                    expected: blob.digest.clone(),
                    actual: damaged.actual.clone().unwrap_or_else(|| Digest::of(b"")),
                },
                None => CasError::Io {
                    path: self.path(&blob.digest),
                    source,
                },
            }
        })?;
        Ok(())
    }

    /// A blob's bytes as a stream, checked against its digest and size as they are read:
    /// the last read fails instead of returning corrupt data's end (read it to the end).
    /// A damaged blob is repaired as by [`Cas::read`].
    pub fn open(&self, blob: &Blob) -> Result<Verified, CasError> {
        self.hold(&blob.digest);
        let path = self.path(&blob.digest);
        let file = File::open(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CasError::Missing(blob.digest.clone()),
            _ => CasError::Io { path, source },
        })?;
        Ok(Verified {
            inner: file,
            cas: self.clone(),
            blob: blob.clone(),
            hasher: Sha256::new(),
            read: 0,
        })
    }
}

/// A blob being written: hashed as it goes, linked into the store on commit.
#[derive(Debug)]
pub struct BlobWriter {
    cas: Cas,
    temp: tempfile::NamedTempFile,
    hasher: Sha256,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.temp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob visible. With `expected`, a content that hashes otherwise is refused
    /// and discarded (a corrupt download never enters the store).
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<Blob, CasError> {
        let temp_path = self.temp.path().to_owned();
        self.temp.flush().map_err(io_err(&temp_path))?;
        let digest = Digest::from_hasher(self.hasher);
        if let Some(expected) = expected
            && expected != &digest
        {
            return Err(CasError::Mismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        // Held before it is visible: GC must not take a blob between its link and its use.
        self.cas.hold(&digest);
        let shared = &self.cas.shared;
        let target = shared.blob_path(&digest);
        shared.make_shard_dir(&target)?;
        // Durable before visible: a crash after the link must not leave a torn blob.
        self.temp
            .as_file()
            .sync_data()
            .map_err(io_err(&temp_path))?;
        let disk = self
            .temp
            .as_file()
            .metadata()
            .map_err(io_err(&temp_path))?
            .blocks()
            * 512;
        match self.temp.persist_noclobber(&target) {
            Ok(_) => {}
            // Another writer stored the same bytes first: theirs is as good as ours.
            Err(err) if err.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(CasError::Io {
                    path: target,
                    source: err.error,
                });
            }
        }
        shared.record_blob(&digest, self.size, disk)?;
        Ok(Blob {
            digest,
            size: self.size,
        })
    }
}

/// What a [`Verified`] read found wrong, inside the `io::Error` it returns.
#[derive(Debug, thiserror::Error)]
#[error(
    "blob {digest} is damaged ({what}); it was removed and the steps that made it will run again"
)]
pub struct Damaged {
    pub digest: Digest,
    pub what: String,
    pub actual: Option<Digest>,
}

/// A blob's bytes, hashed as they are read (see [`Cas::open`]).
#[derive(Debug)]
pub struct Verified {
    inner: File,
    cas: Cas,
    blob: Blob,
    hasher: Sha256,
    read: u64,
}

impl Verified {
    fn damaged(&self, what: String, actual: Option<Digest>) -> io::Error {
        self.cas
            .shared
            .damaged(&self.blob.digest, self.cas.lease.as_ref());
        io::Error::new(
            io::ErrorKind::InvalidData,
            Damaged {
                digest: self.blob.digest.clone(),
                what,
                actual,
            },
        )
    }
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.blob.size - self.read;
        if left == 0 {
            return Ok(0);
        }
        let max = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if n == 0 {
            return Err(self.damaged(format!("shorter than its {} bytes", self.blob.size), None));
        }
        if self.read == self.blob.size {
            let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
            if actual != self.blob.digest {
                return Err(self.damaged(format!("its content hashes to {actual}"), Some(actual)));
            }
        }
        Ok(n)
    }
}

impl Shared {
    pub(super) fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.layout
            .cas_dir()
            .join("sha256")
            .join(&hex[..2])
            .join(hex)
    }

    /// Creates the shard directory of `target` if needed, counting its size.
    fn make_shard_dir(&self, target: &Path) -> Result<(), CasError> {
        let Some(parent) = target.parent() else {
            return Ok(());
        };
        if parent.is_dir() {
            return Ok(());
        }
        match std::fs::create_dir(parent) {
            Ok(()) => {
                let size = std::fs::metadata(parent).map_or(0, |m| m.blocks() * 512);
                self.counters.dir_bytes.fetch_add(size, Ordering::Relaxed);
                Ok(())
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(source) => Err(CasError::Io {
                path: parent.to_owned(),
                source,
            }),
        }
    }
}
