//! Reading a context directory: a parallel walk (one rayon task per directory) that applies
//! `.dockerignore` as it goes, then parallel BLAKE3 of the files the stat cache cannot vouch for.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use super::ContextError;
use super::dockerignore::IgnoreRules;
use super::tree::{Entry, EntryKind, Hash, StatKey};

/// Files at least this big are memory-mapped and hashed with several threads; smaller ones
/// are read whole, one file per rayon task, which is where many-small-files contexts win.
const MMAP_THRESHOLD: u64 = 1 << 20;

/// One walked path before hashing.
#[derive(Debug)]
pub(crate) struct Walked {
    pub(crate) path: Box<str>,
    pub(crate) entry: Entry,
}

#[derive(Default)]
struct Collected {
    kept: Vec<Walked>,
    /// Excluded directories that were walked for exceptions; re-added if anything under
    /// them is kept, since a kept path needs its parents.
    excluded_dirs: Vec<Walked>,
    errors: Vec<ContextError>,
}

/// Walks the directory `start` (context-relative, `""` for the whole context) of the context
/// at `root`, returning every kept entry (files unhashed) keyed by relative path, `start`
/// itself included unless it is excluded and nothing below it is kept.
pub(crate) fn walk(
    root: &Path,
    start: &str,
    rules: &IgnoreRules,
) -> Result<BTreeMap<Box<str>, Entry>, ContextError> {
    let start_abs = absolute(root, start);
    let meta = std::fs::metadata(&start_abs).map_err(|source| ContextError::Io {
        path: start_abs.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ContextError::NotADirectory(start_abs));
    }
    let collected = Mutex::new(Collected::default());
    rayon::scope(|scope| walk_dir(scope, &start_abs, start.to_owned(), rules, &collected));
    let mut collected = collected
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(err) = collected.errors.pop() {
        return Err(err);
    }
    let mut entries: BTreeMap<Box<str>, Entry> = collected
        .kept
        .into_iter()
        .map(|w| (w.path, w.entry))
        .collect();
    for dir in collected.excluded_dirs {
        let prefix = format!("{}/", dir.path);
        if entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .next()
            .is_some_and(|(p, _)| p.starts_with(&prefix))
        {
            entries.insert(dir.path, dir.entry);
        }
    }
    // An excluded directory walked only for exceptions is kept only if one matched below it.
    if start.is_empty() || !rules.is_excluded(start) || !entries.is_empty() {
        entries.insert(start.into(), entry_from(&meta, None));
    }
    Ok(entries)
}

fn walk_dir<'s>(
    scope: &rayon::Scope<'s>,
    abs: &Path,
    rel: String,
    rules: &'s IgnoreRules,
    collected: &'s Mutex<Collected>,
) {
    let fail = |err| lock(collected).errors.push(err);
    let reader = match std::fs::read_dir(abs) {
        Ok(reader) => reader,
        Err(source) => {
            return fail(ContextError::Io {
                path: abs.to_owned(),
                source,
            });
        }
    };
    let mut kept = Vec::new();
    let mut excluded_dirs = Vec::new();
    for dirent in reader {
        let dirent = match dirent {
            Ok(d) => d,
            Err(source) => {
                return fail(ContextError::Io {
                    path: abs.to_owned(),
                    source,
                });
            }
        };
        let name = dirent.file_name();
        let Some(name) = name.to_str() else {
            return fail(ContextError::NonUtf8Path(dirent.path()));
        };
        let child_rel = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let child_abs = dirent.path();
        // lstat: a symlink is recorded as a link and never followed.
        let meta = match dirent.metadata() {
            Ok(m) => m,
            // Deleted between readdir and stat: it is simply not part of this scan.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return fail(ContextError::Io {
                    path: child_abs,
                    source,
                });
            }
        };
        let excluded = rules.is_excluded(&child_rel);
        let is_dir = meta.file_type().is_dir();
        if excluded && !(is_dir && rules.may_reinclude_below()) {
            continue;
        }
        let link_target = if meta.file_type().is_symlink() {
            match std::fs::read_link(&child_abs) {
                Ok(target) => Some(target.to_string_lossy().into_owned().into_boxed_str()),
                Err(source) => {
                    return fail(ContextError::Io {
                        path: child_abs,
                        source,
                    });
                }
            }
        } else {
            None
        };
        let walked = Walked {
            path: child_rel.clone().into_boxed_str(),
            entry: entry_from(&meta, link_target),
        };
        if excluded {
            excluded_dirs.push(walked);
        } else {
            kept.push(walked);
        }
        if is_dir {
            scope.spawn(move |scope| walk_dir(scope, &child_abs, child_rel, rules, collected));
        }
    }
    let mut all = lock(collected);
    all.kept.extend(kept);
    all.excluded_dirs.extend(excluded_dirs);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn entry_from(meta: &Metadata, link_target: Option<Box<str>>) -> Entry {
    let kind = EntryKind::of(meta.file_type());
    let hash = match &link_target {
        Some(target) => *blake3::hash(target.as_bytes()).as_bytes(),
        None => [0; 32],
    };
    Entry {
        kind,
        mode: meta.mode() & 0o7777,
        size: if kind == EntryKind::File {
            meta.size()
        } else {
            0
        },
        link_target,
        hash,
        stat: stat_key(meta),
    }
}

pub(crate) fn stat_key(meta: &Metadata) -> StatKey {
    StatKey {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        mode: meta.mode(),
    }
}

/// Hashes the given files in parallel; each result pairs a path with its hash or the error
/// reading it (the caller decides what a vanished file means).
pub(crate) fn hash_files(
    root: &Path,
    files: Vec<(Box<str>, u64)>,
) -> Vec<(Box<str>, std::io::Result<Hash>)> {
    files
        .into_par_iter()
        .map(|(rel, size)| {
            let hash = hash_file(&absolute(root, &rel), size);
            (rel, hash)
        })
        .collect()
}

/// BLAKE3 of a file's content.
pub(crate) fn hash_file(path: &Path, size_hint: u64) -> std::io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    if size_hint >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| -> std::io::Result<()> {
            buf.clear();
            std::fs::File::open(path)?.read_to_end(buf)?;
            hasher.update(buf);
            Ok(())
        })?;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Joins a context root and a relative tree path.
pub(crate) fn absolute(root: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(rel)
    }
}
