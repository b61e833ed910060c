//! The in-memory picture of a context: every kept entry with its content hash, directories
//! hashed as a Merkle tree, and fingerprints of the source sets that COPY/ADD read.
//!
//! Nothing time-like enters a hash: only path, type, mode, link target and content. The stat
//! fields ride along so the next scan can skip re-hashing unchanged files.

use std::collections::{BTreeMap, HashMap};

use super::dockerignore::IgnoreRules;

pub type Hash = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// FIFOs, sockets, devices: kept with their type and mode, no content.
    Special,
}

impl EntryKind {
    /// The kind of a path as `lstat` saw it: anything not a directory, link or regular file
    /// (FIFOs, sockets, devices) is special.
    pub fn of(file_type: std::fs::FileType) -> Self {
        if file_type.is_dir() {
            Self::Dir
        } else if file_type.is_symlink() {
            Self::Symlink
        } else if file_type.is_file() {
            Self::File
        } else {
            Self::Special
        }
    }

    fn tag(self) -> u8 {
        match self {
            Self::File => b'f',
            Self::Dir => b'd',
            Self::Symlink => b'l',
            Self::Special => b's',
        }
    }
}

/// What a scan recorded about one path: enough to tell whether it changed without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub size: u64,
    /// Symlink target, exactly as stored (never followed).
    pub link_target: Option<Box<str>>,
    /// Files: BLAKE3 of the content. Symlinks: of the target. Dirs: Merkle hash of children.
    pub hash: Hash,
    pub stat: StatKey,
}

/// A scanned context: paths are relative, `/`-separated, without `./`; the root is `""`.
#[derive(Debug, Clone, Default)]
pub struct FileTree {
    entries: BTreeMap<Box<str>, Entry>,
    /// Directory hashes are recomputed on demand after changes: fingerprints never need
    /// them, so an edit does not pay for rehashing every ancestor up to the root.
    dirs_stale: bool,
    /// Bumped by every change, so memoized fingerprints know when they are stale.
    generation: u64,
}

impl Entry {
    /// Whether two records of a path describe the same thing for a build: type, mode, link
    /// target and (for non-directories) content. Stat fields and directory hashes don't count.
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.mode == other.mode
            && self.link_target == other.link_target
            && (self.kind == EntryKind::Dir || self.hash == other.hash)
    }
}

impl FileTree {
    pub fn from_entries(entries: BTreeMap<Box<str>, Entry>) -> Self {
        let mut tree = Self {
            entries,
            dirs_stale: false,
            generation: 0,
        };
        tree.rehash_dirs();
        tree
    }

    /// Replaces everything at and below `prefix` with `replacement` (whose paths must all lie
    /// at or below `prefix`). Returns the paths whose content changed, appeared or vanished.
    pub fn replace_subtree(
        &mut self,
        prefix: &str,
        mut replacement: BTreeMap<Box<str>, Entry>,
    ) -> Vec<Box<str>> {
        let old: Vec<Box<str>> = self.subtree_paths(prefix).collect();
        let mut touched = Vec::new();
        for path in old {
            if !replacement.contains_key(&path) {
                self.entries.remove(&path);
                touched.push(path);
            }
        }
        for (path, entry) in std::mem::take(&mut replacement) {
            let changed = self
                .entries
                .get(&path)
                .is_none_or(|old| !old.same_content(&entry));
            if changed {
                touched.push(path.clone());
            }
            self.entries.insert(path, entry);
        }
        self.dirs_stale = true;
        if !touched.is_empty() {
            self.generation += 1;
        }
        touched
    }

    /// Changes whenever the tree does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn into_entries(self) -> BTreeMap<Box<str>, Entry> {
        self.entries
    }

    /// Adds `path` only if absent (a parent directory of a path that appeared).
    pub fn insert_if_absent(&mut self, path: &str, entry: Entry) -> bool {
        if self.entries.contains_key(path) {
            return false;
        }
        self.entries.insert(path.into(), entry);
        self.dirs_stale = true;
        self.generation += 1;
        true
    }

    /// `prefix` itself and everything below it.
    fn subtree_paths<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = Box<str>> + 'a {
        use std::ops::Bound;
        // Every path of the subtree starts with `prefix`, and so do siblings such as `a.txt`
        // for `a`, which sort in between: scan the run of prefixed paths, keep the subtree.
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(|(path, _)| path)
            .take_while(move |path| path.starts_with(prefix))
            .filter(move |path| {
                prefix.is_empty()
                    || path.len() == prefix.len()
                    || path.as_bytes()[prefix.len()] == b'/'
            })
            .cloned()
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(path, entry)| (&**path, entry))
    }

    /// Regular files and their total size.
    pub fn file_stats(&self) -> (u64, u64) {
        self.entries
            .values()
            .filter(|e| e.kind == EntryKind::File)
            .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.size))
    }

    /// Merkle hash of the whole context.
    pub fn root_hash(&mut self) -> Hash {
        if self.dirs_stale {
            self.rehash_dirs();
            self.dirs_stale = false;
        }
        self.entries.get("").map_or([0; 32], |e| e.hash)
    }

    /// Recomputes every directory hash bottom-up from its direct children.
    fn rehash_dirs(&mut self) {
        let mut children: HashMap<&str, Vec<(&str, &Entry)>> = HashMap::new();
        for (path, entry) in &self.entries {
            if !path.is_empty() {
                children
                    .entry(parent(path))
                    .or_default()
                    .push((path, entry));
            }
        }
        let mut dirs: Vec<&str> = self
            .entries
            .iter()
            .filter(|(_, e)| e.kind == EntryKind::Dir)
            .map(|(p, _)| &**p)
            .collect();
        // Deepest first, so a directory is hashed after all of its subdirectories.
        dirs.sort_by_key(|d| std::cmp::Reverse(depth(d)));
        let mut dir_hashes: HashMap<&str, Hash> = HashMap::new();
        for dir in dirs {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"memobuild-dir-v1\0");
            for (child, entry) in children.get(dir).map(Vec::as_slice).unwrap_or_default() {
                let hash = dir_hashes.get(child).copied().unwrap_or(entry.hash);
                hash_entry(&mut hasher, name(child), entry, &hash);
            }
            dir_hashes.insert(dir, *hasher.finalize().as_bytes());
        }
        let dir_hashes: Vec<(Box<str>, Hash)> =
            dir_hashes.into_iter().map(|(d, h)| (d.into(), h)).collect();
        for (dir, hash) in dir_hashes {
            if let Some(entry) = self.entries.get_mut(&dir) {
                entry.hash = hash;
            }
        }
    }

    /// Fingerprint of exactly the entries a COPY/ADD reads: every path matched by one of
    /// `sources` (each a context-relative path or wildcard pattern, a matched directory
    /// bringing its whole subtree), minus those matched by `excludes`.
    pub fn fingerprint(&self, sources: &[SourcePattern], excludes: &IgnoreRules) -> Fingerprint {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"memobuild-sources-v1\0");
        let mut matched = 0u64;
        let mut named_links = Vec::new();
        for (path, entry) in self.select(sources, excludes) {
            if entry.kind == EntryKind::Symlink && sources.iter().any(|s| s.matches(path)) {
                named_links.push(path);
            }
            // A directory is listed for its own path and mode; its contents are listed one
            // by one, so its Merkle hash (which would include excluded files) stays out.
            let content = if entry.kind == EntryKind::Dir {
                [0; 32]
            } else {
                entry.hash
            };
            hash_entry(&mut hasher, path, entry, &content);
            matched += 1;
        }
        // A symlink a source names is followed by COPY: what it leads to is read too.
        for path in named_links {
            hasher.update(b"\0followed\0");
            let Some(target) = self.resolve(path) else {
                continue;
            };
            let below = format!("{target}/");
            for (inner, entry) in self.iter().filter(|(p, _)| {
                (*p == target || p.starts_with(&below)) && !excludes.is_excluded(p)
            }) {
                let content = if entry.kind == EntryKind::Dir {
                    [0; 32]
                } else {
                    entry.hash
                };
                hash_entry(&mut hasher, inner, entry, &content);
                matched += 1;
            }
        }
        Fingerprint {
            hash: *hasher.finalize().as_bytes(),
            entries: matched,
        }
    }

    /// `path` with every symlink in it followed inside the context, the last one too (as
    /// BuildKit follows the sources a COPY names): absolute targets start at the context
    /// root and `..` stops there. `None` when it leads nowhere in the tree or loops.
    pub fn resolve(&self, path: &str) -> Option<String> {
        const MAX_HOPS: usize = 40;
        let mut pending: Vec<String> = path.rsplit('/').map(str::to_owned).collect();
        let mut resolved = String::new();
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.as_str() {
                "" | "." => continue,
                ".." => {
                    resolved = parent(&resolved).to_owned();
                    continue;
                }
                _ => {}
            }
            let candidate = if resolved.is_empty() {
                component
            } else {
                format!("{resolved}/{component}")
            };
            let entry = self.get(&candidate)?;
            match entry.link_target.as_deref() {
                Some(target) if entry.kind == EntryKind::Symlink => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return None;
                    }
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(target.rsplit('/').map(str::to_owned));
                }
                _ => resolved = candidate,
            }
        }
        Some(resolved)
    }

    /// Every path a COPY of `sources` reads: what [`Self::select`] yields, and what the
    /// symlinks the sources name lead to (COPY follows them).
    pub fn read_paths<'t>(
        &'t self,
        sources: &[SourcePattern],
        excludes: &IgnoreRules,
    ) -> Vec<&'t str> {
        let mut paths = Vec::new();
        for (path, entry) in self.select(sources, excludes) {
            paths.push(path);
            if entry.kind == EntryKind::Symlink
                && sources.iter().any(|s| s.matches(path))
                && let Some(target) = self.resolve(path)
            {
                let below = format!("{target}/");
                paths.extend(self.iter().map(|(p, _)| p).filter(|p| {
                    (*p == target || p.starts_with(&below)) && !excludes.is_excluded(p)
                }));
            }
        }
        paths
    }

    /// The entries a source set reads, in path order.
    pub fn select<'t, 'q>(
        &'t self,
        sources: &'q [SourcePattern],
        excludes: &'q IgnoreRules,
    ) -> impl Iterator<Item = (&'t str, &'t Entry)> + use<'t, 'q> {
        self.iter().filter(move |(path, _)| {
            !path.is_empty()
                && sources.iter().any(|s| s.covers(path))
                && !excludes.is_excluded(path)
        })
    }
}

/// One source of a COPY/ADD, relative to the context.
#[derive(Debug, Clone)]
pub struct SourcePattern {
    /// Cleaned, without leading `/` or `./`; `""` is the whole context.
    cleaned: String,
    /// `None` for a plain path; wildcard patterns match path prefixes component-wise.
    glob: Option<regex::Regex>,
}

impl SourcePattern {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let cleaned = super::dockerignore::clean(source);
        let cleaned = cleaned.trim_start_matches('/').to_owned();
        let cleaned = if cleaned == "." {
            String::new()
        } else {
            cleaned
        };
        let glob = if cleaned.contains(['*', '?', '[']) {
            Some(regex::Regex::new(&glob_to_regex(&cleaned))?)
        } else {
            None
        };
        Ok(Self { cleaned, glob })
    }

    /// Whether `path` is exactly what this source names (for a wildcard: matches it whole).
    pub fn matches(&self, path: &str) -> bool {
        match &self.glob {
            None => path == self.cleaned,
            Some(glob) => glob.is_match(path),
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.glob.is_some()
    }

    /// The cleaned pattern text (`""` is the whole context).
    pub fn as_str(&self) -> &str {
        &self.cleaned
    }

    /// Whether `path` is read by this source: it is the source, lies below it, or (for a
    /// wildcard) it or one of its ancestors matches the pattern.
    pub fn covers(&self, path: &str) -> bool {
        match &self.glob {
            None => {
                self.cleaned.is_empty()
                    || path == self.cleaned
                    || (path.starts_with(&self.cleaned)
                        && path.as_bytes().get(self.cleaned.len()) == Some(&b'/'))
            }
            Some(glob) => {
                glob.is_match(path)
                    || path
                        .match_indices('/')
                        .any(|(slash, _)| glob.is_match(&path[..slash]))
            }
        }
    }
}

/// Go `filepath.Match` semantics: `*`/`?` never cross `/`, `[...]` classes, `\` escapes.
fn glob_to_regex(pattern: &str) -> String {
    let mut out = String::from("^");
    let mut chars = pattern.chars();
    let mut in_class = false;
    while let Some(ch) = chars.next() {
        match ch {
            '*' if !in_class => out.push_str("[^/]*"),
            '?' if !in_class => out.push_str("[^/]"),
            '[' if !in_class => {
                in_class = true;
                out.push('[');
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            '\\' => out.push_str(&regex::escape(&chars.next().unwrap_or('\\').to_string())),
            other if in_class => out.push(other),
            other => out.push_str(&regex::escape(&other.to_string())),
        }
    }
    out.push('$');
    out
}

/// The fingerprint of a source set, with how many entries it covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub hash: Hash,
    pub entries: u64,
}

fn hash_entry(hasher: &mut blake3::Hasher, path: &str, entry: &Entry, hash: &Hash) {
    hasher.update(&(path.len() as u64).to_le_bytes());
    hasher.update(path.as_bytes());
    hasher.update(&[entry.kind.tag()]);
    hasher.update(&entry.mode.to_le_bytes());
    let target = entry.link_target.as_deref().unwrap_or("");
    hasher.update(&(target.len() as u64).to_le_bytes());
    hasher.update(target.as_bytes());
    hasher.update(hash);
}

/// `a/b/c` → `a/b`; `a` → `""`.
pub fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |slash| &path[..slash])
}

fn name(path: &str) -> &str {
    path.rfind('/').map_or(path, |slash| &path[slash + 1..])
}

fn depth(path: &str) -> usize {
    if path.is_empty() {
        0
    } else {
        path.matches('/').count() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &str, mode: u32) -> Entry {
        Entry {
            kind: EntryKind::File,
            mode,
            size: content.len() as u64,
            link_target: None,
            hash: *blake3::hash(content.as_bytes()).as_bytes(),
            stat: StatKey {
                dev: 1,
                ino: 1,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                mode,
            },
        }
    }

    fn dir() -> Entry {
        Entry {
            kind: EntryKind::Dir,
            hash: [0; 32],
            ..file("", 0o755)
        }
    }

    fn tree(files: &[(&str, Entry)]) -> FileTree {
        let mut entries = BTreeMap::new();
        entries.insert("".into(), dir());
        for (path, entry) in files {
            let mut ancestor = parent(path);
            while !ancestor.is_empty() {
                entries.entry(ancestor.into()).or_insert_with(dir);
                ancestor = parent(ancestor);
            }
            entries.insert((*path).into(), entry.clone());
        }
        FileTree::from_entries(entries)
    }

    fn sources(patterns: &[&str]) -> Vec<SourcePattern> {
        patterns
            .iter()
            .map(|p| SourcePattern::new(p).expect("pattern"))
            .collect()
    }

    #[test]
    fn merkle_root_changes_with_content_mode_and_name_only() {
        let mut base = tree(&[("src/a.rs", file("a", 0o644)), ("README", file("r", 0o644))]);
        let mut same = tree(&[("src/a.rs", file("a", 0o644)), ("README", file("r", 0o644))]);
        assert_eq!(base.root_hash(), same.root_hash());
        let mut touched = file("a", 0o644);
        touched.stat.mtime_ns = 12345;
        let mut touched = tree(&[("src/a.rs", touched), ("README", file("r", 0o644))]);
        assert_eq!(base.root_hash(), touched.root_hash(), "mtimes never count");
        for mut changed in [
            tree(&[("src/a.rs", file("b", 0o644)), ("README", file("r", 0o644))]),
            tree(&[("src/a.rs", file("a", 0o755)), ("README", file("r", 0o644))]),
            tree(&[("src/b.rs", file("a", 0o644)), ("README", file("r", 0o644))]),
        ] {
            assert_ne!(base.root_hash(), changed.root_hash());
        }
    }

    #[test]
    fn fingerprint_covers_exactly_the_matched_files() {
        let base = tree(&[
            ("package.json", file("{}", 0o644)),
            ("src/x.js", file("x", 0o644)),
            ("src/y.js", file("y", 0o644)),
            ("docs/a.md", file("d", 0o644)),
        ]);
        let edited_src = tree(&[
            ("package.json", file("{}", 0o644)),
            ("src/x.js", file("x2", 0o644)),
            ("src/y.js", file("y", 0o644)),
            ("docs/a.md", file("d", 0o644)),
        ]);
        let none = IgnoreRules::default();
        let manifest = sources(&["package.json"]);
        let src = sources(&["src/"]);
        assert_eq!(
            base.fingerprint(&manifest, &none),
            edited_src.fingerprint(&manifest, &none)
        );
        assert_ne!(
            base.fingerprint(&src, &none).hash,
            edited_src.fingerprint(&src, &none).hash
        );
        assert_eq!(
            base.fingerprint(&src, &none).entries,
            3,
            "src, src/x.js, src/y.js"
        );
        // `--exclude` removes entries from the set.
        let excludes = IgnoreRules::parse("src/x.js", "--exclude").expect("rules");
        assert_eq!(
            base.fingerprint(&src, &excludes),
            edited_src.fingerprint(&src, &excludes)
        );
    }

    fn link(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Symlink,
            link_target: Some(target.into()),
            hash: *blake3::hash(target.as_bytes()).as_bytes(),
            ..file("", 0o777)
        }
    }

    #[test]
    fn a_named_symlink_is_followed_inside_the_context() {
        let with = |content: &str| {
            tree(&[
                ("a.txt", file(content, 0o644)),
                ("d/x", file("x", 0o644)),
                ("link", link("a.txt")),
                ("sub/up", link("../d")),
                ("sub/abs", link("/sub/up/x")),
                ("loop", link("loop")),
            ])
        };
        let t = with("a");
        assert_eq!(t.resolve("link").as_deref(), Some("a.txt"));
        assert_eq!(t.resolve("sub/up").as_deref(), Some("d"));
        assert_eq!(t.resolve("sub/abs").as_deref(), Some("d/x"));
        assert_eq!(t.resolve("loop"), None);
        let none = IgnoreRules::default();
        // The link's target is read by `COPY link`, so its content is in the fingerprint.
        assert_ne!(
            t.fingerprint(&sources(&["link"]), &none).hash,
            with("b").fingerprint(&sources(&["link"]), &none).hash
        );
        assert_eq!(t.fingerprint(&sources(&["sub/up"]), &none).entries, 3);
    }

    #[test]
    fn wildcard_sources_follow_go_match() {
        let t = tree(&[
            ("a.json", file("1", 0o644)),
            ("b.json", file("2", 0o644)),
            ("sub/c.json", file("3", 0o644)),
            ("pkg1/lib/x", file("4", 0o644)),
        ]);
        let none = IgnoreRules::default();
        let picked: Vec<&str> = t
            .select(&sources(&["*.json"]), &none)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(picked, ["a.json", "b.json"]);
        let picked: Vec<&str> = t
            .select(&sources(&["pkg?"]), &none)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(picked, ["pkg1", "pkg1/lib", "pkg1/lib/x"]);
        assert_eq!(t.select(&sources(&["nomatch*"]), &none).count(), 0);
        assert_eq!(
            t.select(&sources(&["."]), &none).count(),
            t.len() - 1,
            "`.` is the whole context"
        );
    }
}

#[cfg(test)]
mod mutation_tests {
    use super::*;

    fn entry(kind: EntryKind, content: &[u8]) -> Entry {
        Entry {
            kind,
            mode: 0o644,
            size: content.len() as u64,
            link_target: None,
            hash: *blake3::hash(content).as_bytes(),
            stat: StatKey {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                mode: 0,
            },
        }
    }

    fn map(items: &[(&str, Entry)]) -> BTreeMap<Box<str>, Entry> {
        items
            .iter()
            .map(|(p, e)| ((*p).into(), e.clone()))
            .collect()
    }

    #[test]
    fn replacing_a_subtree_reports_exactly_what_changed() {
        let dir = entry(EntryKind::Dir, b"");
        let mut tree = FileTree::from_entries(map(&[
            ("", dir.clone()),
            ("a", dir.clone()),
            ("a/x", entry(EntryKind::File, b"x")),
            ("a/y", entry(EntryKind::File, b"y")),
            ("a.txt", entry(EntryKind::File, b"sibling")),
            ("b", entry(EntryKind::File, b"b")),
        ]));
        let before = tree.root_hash();
        let touched = tree.replace_subtree(
            "a",
            map(&[
                ("a", dir.clone()),
                ("a/x", entry(EntryKind::File, b"x")),
                ("a/z", entry(EntryKind::File, b"z")),
            ]),
        );
        let touched: Vec<&str> = touched.iter().map(|p| &**p).collect();
        assert_eq!(touched, ["a/y", "a/z"]);
        assert!(
            tree.get("a.txt").is_some(),
            "a sibling sorting inside the range survives"
        );
        assert!(tree.get("b").is_some());
        assert_ne!(tree.root_hash(), before);
    }
}
