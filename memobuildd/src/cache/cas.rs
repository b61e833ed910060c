//! The L2 blob store: content-addressed files under `<root>/cas-v1/sha256/<2 hex>/<64 hex>`.
//!
//! A blob enters only through a [`BlobWriter`]: bytes go to a temp file in `<root>/tmp/`
//! while SHA-256 is computed, and [`BlobWriter::commit`] renames it into place only after the
//! digest is checked. So nothing half-written or mislabelled is ever visible, a crash leaves
//! only temp files (removed at the next start), and two writers of one blob both succeed.
//! Reads verify too ([`Cas::read`]): a blob damaged on disk is reported and removed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::layout::Layout;

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
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CasError + '_ {
    move |source| CasError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Cas {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl Cas {
    pub fn open(layout: &Layout) -> Result<Self, CasError> {
        let cas = Self {
            blobs: layout.cas_dir(),
            tmp: layout.tmp_dir(),
        };
        for dir in [&cas.blobs, &cas.tmp] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(cas)
    }

    /// Where a blob lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join("sha256").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn size(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// A writer for a new blob; nothing is visible until [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter, CasError> {
        let temp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&self.tmp)
            .map_err(io_err(&self.tmp))?;
        Ok(BlobWriter {
            cas: self.clone(),
            temp,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Stores `bytes` (configs, manifests: small blobs). A blob already stored is not
    /// written again: the digest is known before any I/O.
    pub fn put(&self, bytes: &[u8]) -> Result<Blob, CasError> {
        let digest = Digest::of(bytes);
        if self.size(&digest) == Some(bytes.len() as u64) {
            return Ok(Blob {
                digest,
                size: bytes.len() as u64,
            });
        }
        let mut writer = self.writer()?;
        writer.write_all(bytes).map_err(io_err(&self.tmp))?;
        writer.commit(None)
    }

    /// Reads a whole blob and checks its digest. A corrupt blob is removed so that the next
    /// build fetches or rebuilds it instead of failing again.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, CasError> {
        let path = self.path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(CasError::Missing(digest.clone()));
            }
            Err(source) => return Err(CasError::Io { path, source }),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            let _ = std::fs::remove_file(&path);
            return Err(CasError::Mismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Checks a stored blob's digest by streaming it (large layers).
    pub fn verify(&self, digest: &Digest) -> Result<(), CasError> {
        let path = self.path(digest);
        let mut file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CasError::Missing(digest.clone()),
            _ => CasError::Io {
                path: path.clone(),
                source,
            },
        })?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = Digest::from_hasher(hasher);
        if &actual != digest {
            let _ = std::fs::remove_file(&path);
            return Err(CasError::Mismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// A blob being written: hashed as it goes, renamed into the store on commit.
#[derive(Debug)]
pub struct BlobWriter {
    cas: Cas,
    temp: tempfile::NamedTempFile,
    hasher: Sha256,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.temp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
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
        let target = self.cas.path(&digest);
        let parent = target.parent().unwrap_or(&self.cas.blobs);
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        // Durable before visible: a crash after the rename must not leave a torn blob.
        self.temp
            .as_file()
            .sync_data()
            .map_err(io_err(&temp_path))?;
        self.temp.persist(&target).map_err(|err| CasError::Io {
            path: target.clone(),
            source: err.error,
        })?;
        Ok(Blob {
            digest,
            size: self.size,
        })
    }
}

/// Reads a stored blob as a stream (layers are too big to hold in memory).
pub fn open(cas: &Cas, digest: &Digest) -> Result<impl Read + use<>, CasError> {
    let path = cas.path(digest);
    File::open(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CasError::Missing(digest.clone()),
        _ => CasError::Io { path, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Cas) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Cas::open(&Layout::new(dir.path())).expect("cas");
        (dir, cas)
    }

    #[test]
    fn put_read_and_layout() {
        let (dir, cas) = store();
        let blob = cas.put(b"hello").expect("put");
        assert_eq!(
            blob.digest.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(blob.size, 5);
        assert!(
            dir.path()
                .join("cas-v1/sha256/2c")
                .join(blob.digest.hex())
                .is_file()
        );
        assert_eq!(cas.read(&blob.digest).expect("read"), b"hello");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }

    #[test]
    fn a_wrong_expected_digest_is_refused_and_nothing_is_kept() {
        let (dir, cas) = store();
        let mut writer = cas.writer().expect("writer");
        writer.write_all(b"tampered").expect("write");
        let claimed = Digest::of(b"original");
        let err = writer.commit(Some(&claimed)).expect_err("mismatch");
        assert!(err.to_string().contains(claimed.as_str()), "{err}");
        assert!(!cas.contains(&claimed));
        assert!(!cas.contains(&Digest::of(b"tampered")));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp"))
                .expect("tmp")
                .count(),
            0
        );
    }

    #[test]
    fn a_blob_damaged_on_disk_is_reported_and_removed() {
        let (_dir, cas) = store();
        let blob = cas.put(b"layer bytes").expect("put");
        std::fs::write(cas.path(&blob.digest), b"layer bytez").expect("damage");
        assert!(matches!(
            cas.read(&blob.digest),
            Err(CasError::Mismatch { .. })
        ));
        assert!(!cas.contains(&blob.digest));
        let blob = cas.put(b"layer bytes").expect("put again");
        std::fs::write(cas.path(&blob.digest), b"short").expect("truncate");
        assert!(matches!(
            cas.verify(&blob.digest),
            Err(CasError::Mismatch { .. })
        ));
    }

    #[test]
    fn digests_are_validated() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
