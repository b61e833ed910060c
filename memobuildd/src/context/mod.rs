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
    for candidate in ignore_files(context, dockerfile) {
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

/// The ignore files a build may read, in precedence order.
pub fn ignore_files(context: &Path, dockerfile: &Path) -> [PathBuf; 2] {
    let mut specific = dockerfile.as_os_str().to_owned();
    specific.push(".dockerignore");
    [PathBuf::from(specific), context.join(".dockerignore")]
}

/// Scans `context` into a [`FileTree`], hashing only what `cache` cannot vouch for.
pub fn scan(
    context: &Path,
    rules: &IgnoreRules,
    cache: &mut StatCache,
) -> Result<(FileTree, ScanReport), ContextError> {
    let started = Instant::now();
    let scan_start_ns = unix_now_ns();
    let mut entries = walk::walk(context, "", rules)?;
    let mut report = ScanReport {
        entries: entries.len() as u64,
        ..ScanReport::default()
    };
    for entry in entries.values().filter(|e| e.kind == EntryKind::File) {
        report.files += 1;
        report.bytes += entry.size;
    }
    (report.hashed_files, report.hashed_bytes) =
        hash_entries(context, &mut entries, cache, scan_start_ns, false)?;
    cache.flush()?;
    report.elapsed = started.elapsed();
    Ok((FileTree::from_entries(entries), report))
}

/// Brings `tree` up to date after changes were reported at `paths` (context-relative).
/// Reported files are re-hashed whatever their metadata says; a reported directory is walked
/// again (its files through the stat cache). Returns the paths whose content changed.
pub fn refresh(
    context: &Path,
    rules: &IgnoreRules,
    tree: &mut FileTree,
    paths: &[String],
    cache: &mut StatCache,
) -> Result<Vec<Box<str>>, ContextError> {
    let scan_start_ns = unix_now_ns();
    let mut touched = Vec::new();
    for rel in paths {
        let abs = walk::absolute(context, rel);
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                touched.extend(tree.replace_subtree(rel, Default::default()));
                continue;
            }
            Err(source) => return Err(ContextError::Io { path: abs, source }),
        };
        let is_dir = meta.is_dir();
        if rules.is_excluded(rel) && !(is_dir && rules.may_reinclude_below()) {
            touched.extend(tree.replace_subtree(rel, Default::default()));
            continue;
        }
        let replacement = if is_dir {
            let mut entries = walk::walk(context, rel, rules)?;
            hash_entries(context, &mut entries, cache, scan_start_ns, false)?;
            entries
        } else {
            let target = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&abs).map_err(|source| ContextError::Io {
                    path: abs.clone(),
                    source,
                })?;
                Some(target.to_string_lossy().into_owned().into_boxed_str())
            } else {
                None
            };
            let mut entries = std::collections::BTreeMap::new();
            entries.insert(rel.as_str().into(), walk::entry_from(&meta, target));
            hash_entries(context, &mut entries, cache, scan_start_ns, true)?;
            entries
        };
        let kept = !replacement.is_empty();
        touched.extend(tree.replace_subtree(rel, replacement));
        if kept {
            add_missing_parents(context, tree, rel, &mut touched);
        }
    }
    cache.flush()?;
    Ok(touched)
}

/// A path that appeared needs its parent directories in the tree too.
fn add_missing_parents(
    context: &Path,
    tree: &mut FileTree,
    rel: &str,
    touched: &mut Vec<Box<str>>,
) {
    let mut parent = tree::parent(rel);
    while !parent.is_empty() && tree.get(parent).is_none() {
        if let Ok(meta) = std::fs::symlink_metadata(walk::absolute(context, parent))
            && tree.insert_if_absent(parent, walk::entry_from(&meta, None))
        {
            touched.push(parent.into());
        }
        parent = tree::parent(parent);
    }
}

/// Fills in file hashes: from the stat cache unless `force`, else by reading the files.
/// Files that vanished meanwhile are dropped.
fn hash_entries(
    context: &Path,
    entries: &mut std::collections::BTreeMap<Box<str>, Entry>,
    cache: &mut StatCache,
    scan_start_ns: i64,
    force: bool,
) -> Result<(u64, u64), ContextError> {
    let mut to_hash = Vec::new();
    for (path, entry) in entries.iter_mut() {
        if entry.kind != EntryKind::File {
            continue;
        }
        match cache.lookup(&entry.stat).filter(|_| !force) {
            Some(hash) => entry.hash = hash,
            None => to_hash.push((path.clone(), entry.size)),
        }
    }
    let hashed = (
        to_hash.len() as u64,
        to_hash.iter().map(|(_, size)| size).sum::<u64>(),
    );
    for (path, result) in walk::hash_files(context, to_hash) {
        match result {
            Ok(hash) => {
                if let Some(entry) = entries.get_mut(&path) {
                    entry.hash = hash;
                    cache.remember(entry.stat, hash, scan_start_ns);
                }
            }
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
    Ok(hashed)
}

/// Nanoseconds since the Unix epoch, the unit of file timestamps.
pub(crate) fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
