//! COPY (and ADD of local files) with Docker's meaning, producing the step's layer as a
//! directory of exactly the paths it adds — no container involved.
//!
//! The rules, as in Docker and BuildKit: a source directory copies its *contents*; a wildcard
//! matching nothing copies nothing; several sources, a wildcard or a trailing `/` make the
//! destination a directory, and so does a destination that already is a directory in the
//! parent image; a relative destination is relative to WORKDIR; destinations resolve through
//! the parent image's symlinks; missing parents are created (owned by `--chown` if given);
//! a symlink a source names (also through a wildcard) is followed inside the context or
//! source image, symlinks inside a copied directory are copied as links; hard links among
//! the copied files stay hard links; FIFOs and sockets of a source image are skipped (as
//! BuildKit's copier does); `--chown` and `--chmod` apply to everything copied. The
//! directory a directory's contents go to is made 0755 (or `--chmod`), as BuildKit makes it.
//! Parent directories that exist in the parent image are recreated with their own mode and
//! owner, so the layer does not change them.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::view::RootView;
use crate::caller::{AccessError, ReadCheck};
use crate::context::dockerignore::clean;
use crate::context::{EntryKind, FileTree, Hash, IgnoreRules, SourcePattern};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("COPY source {0:?} not found in the build context")]
    NotInContext(String),
    #[error("COPY source {link:?} is a symlink that leads outside the build context or nowhere")]
    DanglingLink { link: String },
    #[error("COPY source {0:?} not found in the source image")]
    NotInImage(String),
    #[error("bad COPY source pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error(
        "{0} changed while it was being copied; build again (MemoBuild never copies a file whose content differs from its fingerprint)"
    )]
    ChangedDuringCopy(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// What a COPY/ADD says, after expansion and name resolution.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub sources: Vec<String>,
    pub dest: String,
    /// The image's WORKDIR (absolute) for relative destinations.
    pub workdir: String,
    pub chown: Option<(u32, u32)>,
    pub chmod: Option<u32>,
}

/// Where the sources are read from.
#[derive(Debug, Clone, Copy)]
pub enum CopySource<'a> {
    /// The build context, as fingerprinted: only what the tree holds (after `.dockerignore`)
    /// and `excludes` leaves is visible, and content is checked against the tree's hashes.
    /// With `readable`, every path copied must be one the caller could read.
    Context {
        dir: &'a Path,
        tree: &'a FileTree,
        excludes: &'a IgnoreRules,
        readable: Option<&'a ReadCheck<'a>>,
    },
    /// Another stage or an image (`--from`), without what its `--exclude` rules match. As
    /// BuildKit's, they match paths relative to the source being copied: below a directory
    /// source, its contents; for a wildcard, the names it matched.
    Image(&'a RootView, &'a IgnoreRules),
}

/// One source path.
#[derive(Debug, Clone)]
struct Item {
    /// Relative to the source root, `/`-separated.
    rel: String,
    kind: EntryKind,
    mode: u32,
    link_target: Option<String>,
    host: PathBuf,
    /// Context entries: the fingerprint's hash of this path (content, or link target). A
    /// file's copy must hash to it.
    content: Option<Hash>,
    size: u64,
    /// The name it is copied as when that is not `rel`'s: a followed symlink keeps its own.
    alias: Option<String>,
    /// Files: (device, inode), so paths sharing one are copied as hard links.
    inode: Option<(u64, u64)>,
}

impl Item {
    fn name(&self) -> &str {
        match &self.alias {
            Some(alias) => alias,
            None => self.rel.rsplit('/').next().unwrap_or(&self.rel),
        }
    }

    /// This item, copied under the name of the symlink `link` that led to it.
    fn named_as(mut self, link: &str) -> Self {
        self.alias = Some(link.rsplit('/').next().unwrap_or(link).to_owned());
        self
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub bytes: u64,
}

impl CopyStats {
    fn add(&mut self, item: &Item, bytes: u64) {
        self.files += u64::from(item.kind == EntryKind::File);
        self.bytes += bytes;
    }
}

/// Stages what the COPY adds into `staging` (an empty directory standing for the image root).
/// `as_root`: ownership is set on disk (a non-root daemon leaves it to the layer writer).
pub fn stage(
    spec: &CopySpec,
    source: CopySource<'_>,
    parent: &RootView,
    staging: &Path,
    as_root: bool,
) -> Result<CopyStats, CopyError> {
    plan(spec, source, parent)?.apply(spec, parent, staging, as_root)
}

/// Creates `dir` (image-absolute, free of symlinks) and its missing parents in `staging` the
/// way COPY makes a destination: what the parent image has keeps its mode and owner, what is
/// new gets 0755 and `owner`. WORKDIR uses it too.
pub fn create_dirs(
    dir: &Path,
    owner: (u32, u32),
    parent: &RootView,
    staging: &Path,
    as_root: bool,
) -> Result<(), CopyError> {
    let spec = CopySpec {
        sources: Vec::new(),
        dest: dir.to_string_lossy().into_owned(),
        workdir: "/".to_owned(),
        chown: Some(owner),
        chmod: None,
    };
    let mut writer = Writer {
        staging,
        parent,
        spec: &spec,
        as_root,
        dir_times: Vec::new(),
        dirs: HashSet::new(),
    };
    writer.ensure_dir(dir, None)?;
    writer.finish()
}

/// Decides everything a COPY writes, in order, before writing anything.
pub fn plan(spec: &CopySpec, source: CopySource<'_>, parent: &RootView) -> Result<Plan, CopyError> {
    let patterns: Vec<SourcePattern> = spec
        .sources
        .iter()
        .map(|s| {
            SourcePattern::new(s).map_err(|err| CopyError::Pattern {
                pattern: s.clone(),
                message: err.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    let dest_abs = Path::new("/").join(clean(&if spec.dest.starts_with('/') {
        spec.dest.clone()
    } else {
        format!("{}/{}", spec.workdir, spec.dest)
    }));
    let mut into_dir = spec.dest.ends_with('/')
        || spec.dest.ends_with("/.")
        || patterns.len() > 1
        || patterns.iter().any(SourcePattern::is_wildcard);
    let dest = parent.resolve(&dest_abs, true);
    if parent.lookup(&dest).is_some_and(|f| f.meta.is_dir()) {
        into_dir = true;
    }

    let mut ops = Vec::new();
    for pattern in &patterns {
        let roots = source.roots(pattern)?;
        if roots.is_empty() && !pattern.is_wildcard() {
            return Err(match source {
                CopySource::Context { .. } => CopyError::NotInContext(pattern.as_str().into()),
                CopySource::Image(..) => CopyError::NotInImage(pattern.as_str().into()),
            });
        }
        for root in roots {
            if root.kind == EntryKind::Dir {
                let descendants = source.descendants(&root);
                ops.push(Op::Dir {
                    dest: dest.clone(),
                    like: Some(root.clone()),
                });
                for child in descendants {
                    let rel = child.rel[root.rel.len()..]
                        .trim_start_matches('/')
                        .to_owned();
                    ops.push(Op::Put {
                        dest: dest.join(rel),
                        item: child,
                    });
                }
            } else if into_dir {
                ops.push(Op::Dir {
                    dest: dest.clone(),
                    like: None,
                });
                ops.push(Op::Put {
                    dest: dest.join(root.name()),
                    item: root,
                });
            } else {
                ops.push(Op::Put {
                    dest: dest.clone(),
                    item: root,
                });
            }
        }
    }
    if let CopySource::Context {
        readable: Some(check),
        ..
    } = source
    {
        for op in &ops {
            if let Op::Put { item, .. } = op {
                check.check(&item.host)?;
            }
        }
    }
    let mut seen = HashSet::new();
    let unique = ops.iter().all(|op| match op {
        Op::Put { dest, .. } => seen.insert(dest.clone()),
        Op::Dir { .. } => true,
    });
    // Each path's nearest copied directory above it, so a chunk finds the directories it
    // needs without hashing paths.
    let copied_dirs: HashMap<&Path, usize> = ops
        .iter()
        .enumerate()
        .filter_map(|(index, op)| match op {
            Op::Put { dest, item } if item.kind == EntryKind::Dir => Some((dest.as_path(), index)),
            _ => None,
        })
        .collect();
    let copied_parent = ops
        .iter()
        .map(|op| match op {
            Op::Put { dest, .. } => dest
                .ancestors()
                .skip(1)
                .find_map(|dir| copied_dirs.get(dir).copied()),
            Op::Dir { .. } => None,
        })
        .collect();
    // The second and later paths of one inode become hard links to the first.
    let mut first_of: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut links = HashMap::new();
    for (index, op) in ops.iter().enumerate() {
        if let Op::Put { dest, item } = op
            && let Some(inode) = item.inode
        {
            match first_of.get(&inode) {
                Some(first) if first != dest => {
                    links.insert(index, first.clone());
                }
                Some(_) => {}
                None => {
                    first_of.insert(inode, dest.clone());
                }
            }
        }
    }
    Ok(Plan {
        ops,
        unique,
        copied_parent,
        links,
    })
}

/// One thing a COPY writes.
#[derive(Debug, Clone)]
enum Op {
    /// A destination directory and its missing parents; `like` lends it its mode.
    Dir { dest: PathBuf, like: Option<Item> },
    /// One source path, written at `dest` (an image path).
    Put { dest: PathBuf, item: Item },
}

/// Everything one COPY writes, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    ops: Vec<Op>,
    /// No two sources write the same path, so writes may happen in any order.
    unique: bool,
    /// By op: the op that copies the nearest directory above its path, if one does.
    copied_parent: Vec<Option<usize>>,
    /// Puts that are hard links (op index → the image path they link to).
    links: HashMap<usize, PathBuf>,
}

/// A part of a split COPY: a run of the plan's `Put`s, plus every directory they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Indexes into the plan's ops, in plan order.
    ops: Vec<usize>,
    /// BLAKE3 of exactly what the chunk's layer holds (paths, types, modes, contents).
    pub fingerprint: Hash,
    pub bytes: u64,
}

/// At most about this many chunks (and layers) per COPY.
const MAX_CHUNKS: u64 = 32;

impl Plan {
    /// Bytes of file content the COPY writes.
    pub fn bytes(&self) -> u64 {
        self.puts().map(|(_, item)| item.size).sum()
    }

    fn puts(&self) -> impl Iterator<Item = (&Path, &Item)> {
        self.ops.iter().filter_map(|op| match op {
            Op::Put { dest, item } => Some((dest.as_path(), item)),
            Op::Dir { .. } => None,
        })
    }

    /// Stages the whole plan into `staging`.
    pub fn apply(
        &self,
        spec: &CopySpec,
        parent: &RootView,
        staging: &Path,
        as_root: bool,
    ) -> Result<CopyStats, CopyError> {
        self.apply_ops(0..self.ops.len(), spec, parent, staging, as_root)
    }

    /// Stages one chunk: its own paths and the directories above them, with their modes.
    pub fn apply_chunk(
        &self,
        chunk: &Chunk,
        spec: &CopySpec,
        parent: &RootView,
        staging: &Path,
        as_root: bool,
    ) -> Result<CopyStats, CopyError> {
        let ops = chunk.ops.iter().copied();
        self.apply_ops(ops, spec, parent, staging, as_root)
    }

    fn apply_ops(
        &self,
        ops: impl Iterator<Item = usize>,
        spec: &CopySpec,
        parent: &RootView,
        staging: &Path,
        as_root: bool,
    ) -> Result<CopyStats, CopyError> {
        let mut writer = Writer {
            staging,
            parent,
            spec,
            as_root,
            dir_times: Vec::new(),
            dirs: HashSet::new(),
        };
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut stats = CopyStats::default();
        let mut leaves = Vec::new();
        let mut linked = Vec::new();
        for index in ops {
            if let (Some(first), Op::Put { dest, item }) =
                (self.links.get(&index), &self.ops[index])
            {
                if let Some(parent) = dest.parent() {
                    writer.ensure_dir(parent, None)?;
                }
                linked.push((dest, first, item));
                continue;
            }
            match &self.ops[index] {
                Op::Dir { dest, like } => writer.ensure_dir(dest, like.as_ref())?,
                // Later sources replace earlier ones: then everything goes in plan order.
                Op::Put { dest, item } if item.kind == EntryKind::Dir || !self.unique => {
                    stats.add(item, writer.put(dest, item, &mut buf)?);
                }
                Op::Put { dest, item } => {
                    if let Some(parent) = dest.parent() {
                        writer.ensure_dir(parent, None)?;
                    }
                    leaves.push((dest, item));
                }
            }
        }
        // Every directory exists now; the files are independent of each other.
        let copied = leaves
            .par_iter()
            .map_init(
                || vec![0u8; COPY_BUFFER],
                |buf, (dest, item)| {
                    let bytes = writer.put_leaf(dest, item, buf)?;
                    let mut stats = CopyStats::default();
                    stats.add(item, bytes);
                    Ok::<_, CopyError>(stats)
                },
            )
            .try_reduce(CopyStats::default, |a, b| {
                Ok(CopyStats {
                    files: a.files + b.files,
                    bytes: a.bytes + b.bytes,
                })
            })?;
        // After every file: a link's first path exists now.
        for (dest, first, item) in linked {
            let host = writer.host(dest);
            replacing(&host, |host| std::fs::hard_link(writer.host(first), host))?;
            stats.add(item, 0);
        }
        writer.finish()?;
        Ok(CopyStats {
            files: stats.files + copied.files,
            bytes: stats.bytes + copied.bytes,
        })
    }

    /// Splits a large COPY from the build context into chunks of about `target` bytes, each
    /// to be its own layer: an edit then rewrites, re-hashes and re-uploads one chunk rather
    /// than the whole COPY. `None` keeps one layer, as Docker has it: the plan is under two
    /// targets, names a path twice (a later source replacing an earlier one needs them in
    /// one layer), or holds content not known in advance (`--from` an image).
    ///
    /// Boundaries are content-defined so that an edit moves no other boundary: once a chunk
    /// holds half the target, it ends after a file with a probability of the file's size
    /// over half the target, decided by a hash of the file's path; at twice the target it
    /// ends regardless. Chunks then hold target/2 to 2 × target bytes (about target on
    /// average), and an edit changes its own chunk and at most the next one.
    pub fn chunks(&self, target: u64) -> Option<Vec<Chunk>> {
        let total = self.bytes();
        if target == 0 || total < 2 * target {
            return None;
        }
        // Docker refuses images deeper than 125 layers: a huge COPY gets bigger chunks, by
        // powers of two so that an edit does not move the size.
        let target = target.max(total.div_ceil(MAX_CHUNKS).next_power_of_two());
        let known = self
            .puts()
            .all(|(_, item)| item.kind == EntryKind::Dir || item.content.is_some());
        // Hard links must stay in the layer of the path they link to.
        if !self.unique || !known || !self.links.is_empty() {
            return None;
        }
        let mut bounds = Vec::new();
        let (mut start, mut bytes) = (0, 0u64);
        for (index, op) in self.ops.iter().enumerate() {
            let Op::Put { dest, item } = op else { continue };
            bytes += item.size;
            let draw = u64::from_le_bytes(
                blake3::hash(dest.as_os_str().as_encoded_bytes()).as_bytes()[..8]
                    .try_into()
                    .expect("8 bytes"),
            );
            let half = target / 2;
            let drawn = u128::from(draw) * u128::from(half) < u128::from(item.size) << 64;
            if (bytes >= half && drawn) || bytes >= 2 * target {
                bounds.push((start..index + 1, bytes));
                (start, bytes) = (index + 1, 0);
            }
        }
        // What follows the last boundary joins the last chunk if it holds no path of its own.
        let rest_has_paths = self.ops[start..]
            .iter()
            .any(|op| matches!(op, Op::Put { .. }));
        match bounds.last_mut() {
            Some((last, _)) if !rest_has_paths => last.end = self.ops.len(),
            _ if start < self.ops.len() => bounds.push((start..self.ops.len(), bytes)),
            _ => {}
        }
        Some(
            bounds
                .into_iter()
                .map(|(range, bytes)| {
                    let ops = self.chunk_ops(range);
                    Chunk {
                        fingerprint: self.fingerprint(&ops),
                        ops,
                        bytes,
                    }
                })
                .collect(),
        )
    }

    /// The ops a chunk applies, in plan order: every destination directory (each chunk
    /// recreates them alike), the chunk's own paths, and the copied directories above them
    /// (so they keep their source modes rather than defaults).
    fn chunk_ops(&self, puts: std::ops::Range<usize>) -> Vec<usize> {
        let mut chosen: Vec<usize> = (0..self.ops.len())
            .filter(|&index| matches!(self.ops[index], Op::Dir { .. }))
            .collect();
        for index in puts {
            chosen.push(index);
            let mut above = self.copied_parent[index];
            while let Some(dir) = above {
                chosen.push(dir);
                above = self.copied_parent[dir];
            }
        }
        chosen.sort_unstable();
        chosen.dedup();
        chosen
    }

    fn fingerprint(&self, ops: &[usize]) -> Hash {
        let mut hasher = blake3::Hasher::new();
        for &index in ops {
            let (tag, dest, item) = match &self.ops[index] {
                Op::Dir { dest, like } => (b'D', dest, like.as_ref()),
                Op::Put { dest, item } => (b'P', dest, Some(item)),
            };
            hasher.update(&[tag]);
            let dest = dest.as_os_str().as_encoded_bytes();
            hasher.update(&(dest.len() as u64).to_le_bytes());
            hasher.update(dest);
            if let Some(item) = item {
                hasher.update(&[item.kind as u8]);
                hasher.update(&item.mode.to_le_bytes());
                // A directory's own hash covers its children: the chunk names its files.
                if item.kind != EntryKind::Dir {
                    hasher.update(&item.content.unwrap_or_default());
                }
            }
        }
        *hasher.finalize().as_bytes()
    }
}

/// Versions [`source_id`].
const SOURCE_ID_VERSION: &[u8] = b"memobuild-copy-sources-v1\0";

/// An id of exactly what `COPY --from` reads of `view` for `sources`: every path it would
/// copy (as named, a followed symlink under its own name), with its type, mode, owner, link
/// target, hard-link group and content — never its mtime. Two images that agree on these
/// give the same id, so a source stage that changed elsewhere does not rerun the COPY.
pub fn source_id(sources: &[String], view: &RootView) -> Result<Hash, CopyError> {
    let everything = IgnoreRules::default();
    let source = CopySource::Image(view, &everything);
    let mut hasher = blake3::Hasher::new();
    hasher.update(SOURCE_ID_VERSION);
    let mut first_link: HashMap<(u64, u64), usize> = HashMap::new();
    let mut count = 0usize;
    for text in sources {
        let pattern = SourcePattern::new(text).map_err(|err| CopyError::Pattern {
            pattern: text.clone(),
            message: err.to_string(),
        })?;
        let roots = source.roots(&pattern)?;
        if roots.is_empty() && !pattern.is_wildcard() {
            return Err(CopyError::NotInImage(pattern.as_str().into()));
        }
        hasher.update(&(roots.len() as u64).to_le_bytes());
        for root in roots {
            let below = if root.kind == EntryKind::Dir {
                source.descendants(&root)
            } else {
                Vec::new()
            };
            for item in std::iter::once(&root).chain(&below) {
                let name = if std::ptr::eq(item, &root) {
                    root.name().to_owned()
                } else {
                    item.rel[root.rel.len()..].to_owned()
                };
                let meta =
                    std::fs::symlink_metadata(&item.host).map_err(io("reading", &item.host))?;
                for field in [
                    name.as_bytes(),
                    item.link_target.as_deref().unwrap_or("").as_bytes(),
                ] {
                    hasher.update(&(field.len() as u64).to_le_bytes());
                    hasher.update(field);
                }
                hasher.update(&[item.kind as u8]);
                hasher.update(&item.mode.to_le_bytes());
                hasher.update(&meta.uid().to_le_bytes());
                hasher.update(&meta.gid().to_le_bytes());
                let link_group = item
                    .inode
                    .map(|inode| *first_link.entry(inode).or_insert(count));
                hasher.update(&(link_group.map_or(u64::MAX, |g| g as u64)).to_le_bytes());
                if item.kind == EntryKind::File {
                    let mut content = blake3::Hasher::new();
                    let file =
                        std::fs::File::open(&item.host).map_err(io("reading", &item.host))?;
                    content
                        .update_reader(file)
                        .map_err(io("reading", &item.host))?;
                    hasher.update(content.finalize().as_bytes());
                }
                count += 1;
            }
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

impl CopySource<'_> {
    /// The paths a pattern names (not their contents).
    fn roots(&self, pattern: &SourcePattern) -> Result<Vec<Item>, CopyError> {
        match *self {
            CopySource::Context {
                dir,
                tree,
                excludes,
                ..
            } => tree
                .iter()
                .filter(|(path, _)| pattern.matches(path) && !excludes.is_excluded(path))
                .map(|(path, entry)| {
                    if entry.kind != EntryKind::Symlink {
                        return Ok(context_item(dir, path, entry));
                    }
                    // A named source is followed inside the context, as BuildKit does.
                    let dangling = || CopyError::DanglingLink { link: path.into() };
                    let target = tree.resolve(path).ok_or_else(dangling)?;
                    let entry = tree.get(&target).ok_or_else(dangling)?;
                    Ok(context_item(dir, &target, entry).named_as(path))
                })
                .collect(),
            CopySource::Image(view, excludes) => Ok(image_roots(view, pattern)
                .into_iter()
                .filter(|item| !(pattern.is_wildcard() && excludes.is_excluded(item.name())))
                .collect()),
        }
    }

    /// Everything below a directory item, parents before children.
    fn descendants(&self, root: &Item) -> Vec<Item> {
        match *self {
            CopySource::Context {
                dir,
                tree,
                excludes,
                ..
            } => {
                let prefix = if root.rel.is_empty() {
                    String::new()
                } else {
                    format!("{}/", root.rel)
                };
                tree.iter()
                    .filter(|(path, _)| {
                        !path.is_empty() && path.starts_with(&prefix) && !excludes.is_excluded(path)
                    })
                    .map(|(path, entry)| context_item(dir, path, entry))
                    .collect()
            }
            CopySource::Image(view, excludes) => {
                let mut out = Vec::new();
                walk_image(view, &root.rel, &mut out);
                out.retain(|item| {
                    let below = item.rel[root.rel.len()..].trim_start_matches('/');
                    !excludes.is_excluded(below)
                });
                out
            }
        }
    }
}

fn context_item(dir: &Path, path: &str, entry: &crate::context::Entry) -> Item {
    Item {
        rel: path.to_owned(),
        kind: entry.kind,
        mode: entry.mode,
        link_target: entry.link_target.as_deref().map(str::to_owned),
        host: if path.is_empty() {
            dir.to_owned()
        } else {
            dir.join(path)
        },
        content: Some(entry.hash),
        size: entry.size,
        alias: None,
        inode: (entry.kind == EntryKind::File).then_some((entry.stat.dev, entry.stat.ino)),
    }
}

fn image_item(view: &RootView, rel: &str) -> Option<Item> {
    use std::os::unix::fs::FileTypeExt;
    let found = view.lookup(&Path::new("/").join(rel))?;
    let file_type = found.meta.file_type();
    // BuildKit's copier leaves FIFOs and sockets out.
    if file_type.is_fifo() || file_type.is_socket() {
        return None;
    }
    let kind = EntryKind::of(file_type);
    let link_target = (kind == EntryKind::Symlink)
        .then(|| std::fs::read_link(&found.host).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    Some(Item {
        rel: rel.to_owned(),
        kind,
        mode: found.meta.mode() & 0o7777,
        link_target,
        size: found.meta.len(),
        inode: (kind == EntryKind::File && found.meta.nlink() > 1)
            .then_some((found.meta.dev(), found.meta.ino())),
        host: found.host,
        content: None,
        alias: None,
    })
}

/// A source path named in an image, symlinks followed (the last one too), under its own name.
fn followed_image_item(view: &RootView, rel: &str) -> Option<Item> {
    let resolved = view.resolve(&Path::new("/").join(rel), true);
    let target = resolved
        .to_string_lossy()
        .trim_start_matches('/')
        .to_owned();
    let item = image_item(view, &target)?;
    Some(if target == rel {
        item
    } else {
        item.named_as(rel)
    })
}

/// Expands a pattern in an image: plain paths resolve through symlinks (as BuildKit follows
/// source paths), wildcard components are matched against directory listings.
fn image_roots(view: &RootView, pattern: &SourcePattern) -> Vec<Item> {
    if !pattern.is_wildcard() {
        return followed_image_item(view, pattern.as_str())
            .into_iter()
            .collect();
    }
    let mut candidates = vec![String::new()];
    for _component in pattern.as_str().split('/') {
        let mut next = Vec::new();
        for base in &candidates {
            for name in view.list(&Path::new("/").join(base)) {
                let path = if base.is_empty() {
                    name
                } else {
                    format!("{base}/{name}")
                };
                next.push(path);
            }
        }
        candidates = next;
    }
    candidates
        .into_iter()
        .filter(|path| pattern.matches(path))
        .filter_map(|path| followed_image_item(view, &path))
        .collect()
}

fn walk_image(view: &RootView, rel: &str, out: &mut Vec<Item>) {
    for name in view.list(&Path::new("/").join(rel)) {
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if let Some(item) = image_item(view, &child) {
            let is_dir = item.kind == EntryKind::Dir;
            out.push(item);
            if is_dir {
                walk_image(view, &child, out);
            }
        }
    }
}

struct Writer<'a> {
    staging: &'a Path,
    parent: &'a RootView,
    spec: &'a CopySpec,
    as_root: bool,
    /// Directory mtimes to restore once their contents are written.
    dir_times: Vec<(PathBuf, std::time::SystemTime)>,
    /// Image paths known to be directories in the staging tree: each is checked once, not
    /// once per file below it.
    dirs: HashSet<PathBuf>,
}

/// Per-thread copy buffer.
const COPY_BUFFER: usize = 256 * 1024;

impl Writer<'_> {
    fn host(&self, image_path: &Path) -> PathBuf {
        self.staging
            .join(image_path.strip_prefix("/").unwrap_or(image_path))
    }

    fn owner(&self) -> (u32, u32) {
        self.spec.chown.unwrap_or((0, 0))
    }

    fn mode(&self, item: &Item) -> u32 {
        self.spec.chmod.unwrap_or(item.mode)
    }

    /// Creates `dir` and its missing parents in the staging tree. Parents that exist in the
    /// parent image keep their mode and owner; new ones belong to `--chown` (else root).
    fn ensure_dir(&mut self, dir: &Path, like: Option<&Item>) -> Result<(), CopyError> {
        if self.dirs.contains(dir) {
            return Ok(());
        }
        let mut image_path = PathBuf::from("/");
        let components: Vec<_> = dir.components().skip(1).collect();
        for (i, component) in components.iter().enumerate() {
            image_path.push(component);
            if self.dirs.contains(&image_path) {
                continue;
            }
            let host = self.host(&image_path);
            if !host.is_dir() {
                let (mode, owner) = match self.parent.lookup(&image_path) {
                    Some(found) if found.meta.is_dir() => (
                        found.meta.mode() & 0o7777,
                        (found.meta.uid(), found.meta.gid()),
                    ),
                    // A directory's contents go into a directory made like BuildKit's
                    // MkdirAll: 0755, unless `--chmod` says otherwise.
                    _ if i + 1 == components.len() && like.is_some() => {
                        (self.spec.chmod.unwrap_or(0o755), self.owner())
                    }
                    _ => (0o755, self.owner()),
                };
                std::fs::create_dir(&host).map_err(io("creating", &host))?;
                self.finish_entry(&host, mode, owner, false)?;
            }
            self.dirs.insert(image_path.clone());
        }
        Ok(())
    }

    /// Writes one source path, replacing whatever an earlier source put there.
    fn put(&mut self, image_path: &Path, item: &Item, buf: &mut [u8]) -> Result<u64, CopyError> {
        if let Some(parent) = image_path.parent() {
            self.ensure_dir(parent, None)?;
        }
        if item.kind != EntryKind::Dir {
            // Replacing a directory: forget what was known below it.
            if self.dirs.remove(image_path) {
                self.dirs.retain(|dir| !dir.starts_with(image_path));
            }
            return self.put_leaf(image_path, item, buf);
        }
        let host = self.host(image_path);
        if !host.is_dir() {
            remove_existing(&host)?;
            std::fs::create_dir(&host).map_err(io("creating", &host))?;
        }
        self.dirs.insert(image_path.to_owned());
        self.finish_entry(&host, self.mode(item), self.owner(), false)?;
        if let Ok(meta) = std::fs::metadata(&item.host)
            && let Ok(mtime) = meta.modified()
        {
            self.dir_times.push((host, mtime));
        }
        Ok(0)
    }

    /// Writes a file, link or special file whose parent exists; returns the bytes copied.
    /// Needs only `&self`, so the files of a plan can be written in parallel.
    fn put_leaf(&self, image_path: &Path, item: &Item, buf: &mut [u8]) -> Result<u64, CopyError> {
        let host = self.host(image_path);
        let mode = self.mode(item);
        match item.kind {
            EntryKind::Symlink => {
                let target = item.link_target.as_deref().unwrap_or_default();
                replacing(&host, |host| std::os::unix::fs::symlink(target, host))?;
                self.finish_entry(&host, mode, self.owner(), true)?;
                Ok(0)
            }
            EntryKind::File => self.copy_file(item, &host, mode, buf),
            EntryKind::Dir => unreachable!("directories are written by Writer::put"),
            EntryKind::Special => {
                // FIFOs and devices carry no content; recreate them with the system tool so
                // no unsafe mknod is needed here.
                remove_existing(&host)?;
                let meta =
                    std::fs::symlink_metadata(&item.host).map_err(io("reading", &item.host))?;
                make_special(&meta, &host)?;
                self.finish_entry(&host, mode, self.owner(), false)?;
                Ok(0)
            }
        }
    }

    fn copy_file(
        &self,
        item: &Item,
        host: &Path,
        mode: u32,
        buf: &mut [u8],
    ) -> Result<u64, CopyError> {
        let mut from = std::fs::File::open(&item.host).map_err(io("reading", &item.host))?;
        let mut to = replacing(host, |host| {
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(host)
        })?;
        let mut hasher = blake3::Hasher::new();
        let mut bytes = 0;
        loop {
            let n = from.read(buf).map_err(io("reading", &item.host))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            to.write_all(&buf[..n]).map_err(io("writing", host))?;
            bytes += n as u64;
        }
        if let Some(expected) = item.content
            && *hasher.finalize().as_bytes() != expected
        {
            return Err(CopyError::ChangedDuringCopy(item.rel.clone()));
        }
        if let Ok(mtime) = from.metadata().and_then(|m| m.modified()) {
            let _ = to.set_modified(mtime);
        }
        // Through the open file: no path lookups. Owner before mode, because a chown
        // clears setuid and setgid bits.
        if self.as_root {
            let (uid, gid) = self.owner();
            std::os::unix::fs::fchown(&to, Some(uid), Some(gid))
                .map_err(io("setting the owner of", host))?;
        }
        to.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode of", host))?;
        Ok(bytes)
    }

    fn finish_entry(
        &self,
        host: &Path,
        mode: u32,
        (uid, gid): (u32, u32),
        is_link: bool,
    ) -> Result<(), CopyError> {
        // Owner before mode, because a chown clears setuid and setgid bits.
        if self.as_root {
            std::os::unix::fs::lchown(host, Some(uid), Some(gid))
                .map_err(io("setting the owner of", host))?;
        }
        if !is_link {
            std::fs::set_permissions(host, std::fs::Permissions::from_mode(mode))
                .map_err(io("setting the mode of", host))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), CopyError> {
        for (dir, mtime) in self.dir_times.drain(..).rev() {
            if let Ok(file) = std::fs::File::open(&dir) {
                let _ = file.set_modified(mtime);
            }
        }
        Ok(())
    }
}

/// Runs `create`; if something is in the way, removes it and runs `create` again. The
/// common case — nothing there — costs no extra system call.
fn replacing<T>(host: &Path, create: impl Fn(&Path) -> std::io::Result<T>) -> Result<T, CopyError> {
    match create(host) {
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            remove_existing(host)?;
            create(host).map_err(io("writing", host))
        }
        other => other.map_err(io("writing", host)),
    }
}

fn remove_existing(host: &Path) -> Result<(), CopyError> {
    match std::fs::symlink_metadata(host) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(host).map_err(io("replacing", host)),
        Ok(_) => std::fs::remove_file(host).map_err(io("replacing", host)),
        Err(_) => Ok(()),
    }
}

fn make_special(meta: &std::fs::Metadata, host: &Path) -> Result<(), CopyError> {
    use std::os::unix::fs::FileTypeExt;
    let file_type = meta.file_type();
    let mut command = std::process::Command::new("mknod");
    command.arg(host);
    if file_type.is_fifo() {
        command.arg("p");
    } else {
        let kind = if file_type.is_block_device() {
            "b"
        } else {
            "c"
        };
        let rdev = meta.rdev();
        command
            .arg(kind)
            .arg(((rdev >> 8) & 0xfff).to_string())
            .arg(((rdev & 0xff) | ((rdev >> 12) & 0xfff00)).to_string());
    }
    let status = command.status().map_err(io("creating", host))?;
    if status.success() {
        Ok(())
    } else {
        Err(CopyError::Io {
            what: "creating special file",
            path: host.to_owned(),
            source: std::io::Error::other(format!("mknod exited with {status}")),
        })
    }
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> CopyError + 'p {
    move |source| CopyError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
