//! Workspace fingerprints: what is in a build context, exactly, by content.
//!
//! [`scan`] walks a context in parallel, applies its `.dockerignore` ([`IgnoreRules`]), and
//! hashes files with BLAKE3, skipping those the persisted [`StatCache`] vouches for. The result
//! is a [`FileTree`]: entries with content hashes, directories hashed as a Merkle tree, and
//! [`FileTree::fingerprint`] for the exact set of files one COPY/ADD reads.
//!
//! Comes after `plan` (which says what each node reads); feeds `watch` (which keeps trees
//! current) and the cache keys.

pub mod dockerignore;
pub mod statcache;
pub mod tree;
mod walk;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use dockerignore::{IgnoreError, IgnoreRules};
pub use statcache::StatCache;
pub use tree::{Entry, EntryKind, FileTree, Fingerprint, Hash, SourcePattern};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build context {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0}: file names must be UTF-8")]
    NonUtf8Path(PathBuf),
    #[error("stat cache {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Ignore(#[from] IgnoreError),
}

/// What a scan did, for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    /// Files whose content was read (stat cache misses).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub elapsed: Duration,
}

/// Reads the ignore rules for a build: `<Dockerfile>.dockerignore` next to the Dockerfile
/// takes precedence over `<context>/.dockerignore`, as in BuildKit.
pub fn ignore_rules(context: &Path, dockerfile: &Path) -> Result<IgnoreRules, ContextError> {
    let mut specific = dockerfile.as_os_str().to_owned();
    specific.push(".dockerignore");
    for candidate in [PathBuf::from(specific), context.join(".dockerignore")] {
        match std::fs::read_to_string(&candidate) {
            Ok(text) => return Ok(IgnoreRules::parse(&text, &candidate.display().to_string())?),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ContextError::Io {
                    path: candidate,
                    source,
                });
            }
        }
    }
    Ok(IgnoreRules::default())
}

/// Scans `context` into a [`FileTree`], hashing only what `cache` cannot vouch for.
pub fn scan(
    context: &Path,
    rules: &IgnoreRules,
    cache: &mut StatCache,
) -> Result<(FileTree, ScanReport), ContextError> {
    let started = Instant::now();
    let scan_start_ns = unix_now_ns();
    let mut entries = walk::walk(context, rules)?;
    let mut report = ScanReport {
        entries: entries.len() as u64,
        ..ScanReport::default()
    };
    let mut to_hash = Vec::new();
    for (path, entry) in entries.iter_mut() {
        if entry.kind != EntryKind::File {
            continue;
        }
        report.files += 1;
        report.bytes += entry.size;
        match cache.lookup(&entry.stat) {
            Some(hash) => entry.hash = hash,
            None => to_hash.push((path.clone(), entry.size)),
        }
    }
    report.hashed_files = to_hash.len() as u64;
    report.hashed_bytes = to_hash.iter().map(|(_, size)| size).sum();
    for (path, result) in walk::hash_files(context, to_hash) {
        match result {
            Ok(hash) => {
                if let Some(entry) = entries.get_mut(&path) {
                    entry.hash = hash;
                    cache.remember(entry.stat, hash, scan_start_ns);
                }
            }
            // Deleted since the walk saw it: not part of this scan.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                entries.remove(&path);
            }
            Err(source) => {
                return Err(ContextError::Io {
                    path: walk::absolute(context, &path),
                    source,
                });
            }
        }
    }
    cache.flush()?;
    report.elapsed = started.elapsed();
    Ok((FileTree::from_entries(entries), report))
}

/// Nanoseconds since the Unix epoch, the unit of file timestamps.
pub(crate) fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
