//! The differential conformance suite's support: the cases under `tests/conformance/`, the
//! context each side builds, the image each side produced read back the same way, the
//! differences between them, and the allow-list of known BuildKit 0.8 bugs.
//!
//! Both images are compared as `docker load` archives: BuildKit's through `docker save`,
//! ours through `-o type=docker`. One reader applies the layers of either in order
//! (whiteouts, opaque directories, hard links) into a root filesystem listing, so the two
//! sides go through exactly the same code; what BuildKit wrote is never reinterpreted by
//! another tool first.
//!
//! A case is a directory: `Dockerfile`, the context files beside it, and optionally
//! - `args`: one command-line argument per line (`--build-arg K=V`, `--target S`), given
//!   to both tools;
//! - `prepare.sh`: run with `sh` in each side's copy of the context before the build, for
//!   what git cannot hold (modes, owners, special bits, hard links, xattrs, archives);
//! - `buildkit.<name>`: replaces `<name>` on the BuildKit side only — for syntax the old
//!   BuildKit in Debian's docker.io cannot parse (heredocs, `--link`, `--exclude`,
//!   `<Dockerfile>.dockerignore`), written as the same image in syntax it does parse.
//!
//! `FROM BASE` and `--from=BASE` in a Dockerfile name the seeded busybox image.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The config fields compared (the image config's `config` object).
pub const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "OnBuild",
    "Shell",
];

/// Files of a case directory that are not part of its context.
const CASE_FILES: &[&str] = &["args", "prepare.sh"];
const BUILDKIT_PREFIX: &str = "buildkit.";

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    /// Extra arguments for both tools (`--build-arg`, `--target`).
    pub args: Vec<String>,
}

/// Which tool a context copy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    MemoBuild,
    BuildKit,
}

/// The cases under `root`, sorted by name; `only` (comma-separated names) narrows them.
pub fn cases(root: &Path, only: Option<&str>) -> Vec<Case> {
    let wanted: Option<Vec<&str>> = only.map(|o| o.split(',').map(str::trim).collect());
    let mut cases: Vec<Case> = std::fs::read_dir(root)
        .unwrap_or_else(|err| panic!("{}: {err}", root.display()))
        .flatten()
        .filter(|e| e.path().join("Dockerfile").is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let args = std::fs::read_to_string(e.path().join("args"))
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            Case {
                name,
                dir: e.path(),
                args,
            }
        })
        .filter(|c| wanted.as_ref().is_none_or(|w| w.contains(&c.name.as_str())))
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// Copies the case's context for `side` into `into` (which must not exist): `BASE`
/// substituted, the side's overrides applied, `prepare.sh` run. Returns `into`.
pub fn stage_context(case: &Case, side: Side, base: &str, into: &Path) -> PathBuf {
    copy_tree(&case.dir, into);
    let overrides: Vec<PathBuf> = std::fs::read_dir(into)
        .expect("context copy")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(BUILDKIT_PREFIX))
        })
        .collect();
    for path in overrides {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if side == Side::BuildKit {
            let target = into.join(&name[BUILDKIT_PREFIX.len()..]);
            std::fs::rename(&path, target).expect("apply a buildkit.* override");
        } else {
            std::fs::remove_file(&path).expect("drop a buildkit.* override");
        }
    }
    let dockerfile = into.join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).expect("Dockerfile");
    let text = text
        .replace("FROM BASE", &format!("FROM {base}"))
        .replace("--from=BASE", &format!("--from={base}"));
    std::fs::write(&dockerfile, text).expect("write Dockerfile");
    let prepare = into.join("prepare.sh");
    if prepare.is_file() {
        let output = Command::new("sh")
            .arg(&prepare)
            .current_dir(into)
            .output()
            .expect("run sh");
        assert!(
            output.status.success(),
            "{}: prepare.sh failed: {}",
            case.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for name in CASE_FILES {
        let _ = std::fs::remove_file(into.join(name));
    }
    into.to_owned()
}

/// Copies regular files, directories and symlinks as git checked them out (modes are
/// `prepare.sh`'s business).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap_or_else(|err| panic!("{}: {err}", to.display()));
    for entry in std::fs::read_dir(from).expect("read case dir").flatten() {
        let path = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            copy_tree(&path, &target);
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&path).expect("read link");
            std::os::unix::fs::symlink(link, &target).expect("symlink");
        } else {
            std::fs::copy(&path, &target).expect("copy case file");
        }
    }
}

/// A built image as the suite compares it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Image path (no leading `/`) → one line describing it.
    pub files: BTreeMap<String, String>,
    /// [`CONFIG_FIELDS`] → the value (absent when null or empty).
    pub config: BTreeMap<String, serde_json::Value>,
}

/// One field where the two images differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// An image path (`/etc/hostname`) or a config field (`config.OnBuild`).
    pub field: String,
    pub ours: String,
    pub buildkit: String,
}

/// Reads a `docker load` archive (Docker's own or an OCI layout with `manifest.json`).
pub fn read_docker_archive(path: &Path) -> Result<Image, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    tar::Archive::new(file)
        .unpack(dir.path())
        .map_err(|e| format!("unpacking {}: {e}", path.display()))?;
    let read_json = |rel: &str| -> Result<serde_json::Value, String> {
        let bytes = std::fs::read(dir.path().join(rel)).map_err(|e| format!("{rel}: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{rel}: {e}"))
    };
    let manifest = read_json("manifest.json")?;
    let entry = &manifest[0];
    let config_path = entry["Config"].as_str().ok_or("manifest.json: no Config")?;
    let config = read_json(config_path)?;
    let mut fs = RootFs::default();
    for layer in entry["Layers"]
        .as_array()
        .ok_or("manifest.json: no Layers")?
    {
        let rel = layer
            .as_str()
            .ok_or("manifest.json: a layer is not a path")?;
        fs.apply(&dir.path().join(rel))?;
    }
    let mut fields = BTreeMap::new();
    for field in CONFIG_FIELDS {
        let value = &config["config"][*field];
        let empty = value.is_null()
            || value.as_array().is_some_and(Vec::is_empty)
            || value.as_object().is_some_and(serde_json::Map::is_empty)
            || value.as_str().is_some_and(str::is_empty);
        if !empty {
            fields.insert((*field).to_owned(), value.clone());
        }
    }
    Ok(Image {
        files: fs.listing(),
        config: fields,
    })
}

/// Everything that differs, paths first, then config fields.
pub fn differences(ours: &Image, buildkit: &Image) -> Vec<Difference> {
    let mut out = Vec::new();
    let absent = "(absent)".to_owned();
    let mut paths: Vec<&String> = ours.files.keys().chain(buildkit.files.keys()).collect();
    paths.sort();
    paths.dedup();
    for path in paths {
        let (a, b) = (ours.files.get(path), buildkit.files.get(path));
        if a != b {
            out.push(Difference {
                field: format!("/{path}"),
                ours: a.unwrap_or(&absent).clone(),
                buildkit: b.unwrap_or(&absent).clone(),
            });
        }
    }
    for field in CONFIG_FIELDS {
        let (a, b) = (ours.config.get(*field), buildkit.config.get(*field));
        if a != b {
            let show = |v: Option<&serde_json::Value>| v.map_or(absent.clone(), |v| v.to_string());
            out.push(Difference {
                field: format!("config.{field}"),
                ours: show(a),
                buildkit: show(b),
            });
        }
    }
    out
}

/// Known differences that are BuildKit 0.8 bugs fixed later: `case | field | issue | why`.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    pub entries: Vec<Allowed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub case: String,
    pub field: String,
    pub issue: String,
    pub why: String,
}

impl AllowList {
    /// Parses the allow-list file: `#` comments, blank lines, and `case | field | issue URL |
    /// why` lines. Every entry must name an upstream issue and a reason.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.splitn(4, '|').map(str::trim).collect();
            match parts.as_slice() {
                [case, field, issue, why]
                    if !case.is_empty() && issue.starts_with("https://") && !why.is_empty() =>
                {
                    entries.push(Allowed {
                        case: (*case).to_owned(),
                        field: (*field).to_owned(),
                        issue: (*issue).to_owned(),
                        why: (*why).to_owned(),
                    });
                }
                _ => {
                    return Err(format!(
                        "allow-list line {}: want `case | field | https://issue | why`: {line}",
                        number + 1
                    ));
                }
            }
        }
        Ok(Self { entries })
    }

    pub fn allows(&self, case: &str, field: &str) -> Option<&Allowed> {
        self.entries
            .iter()
            .find(|a| a.case == case && a.field == field)
    }
}

/// A readable report of one case's differences.
pub fn render(case: &str, differences: &[Difference]) -> String {
    let mut text = String::new();
    for d in differences {
        let _ = writeln!(
            text,
            "  {case}: {}\n      ours:     {}\n      BuildKit: {}",
            d.field, d.ours, d.buildkit
        );
    }
    text
}

/// One path of the merged root filesystem.
#[derive(Debug, Clone)]
struct Node {
    kind: String,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    /// Content hash (files), target (symlinks), device numbers (devices).
    detail: String,
    xattrs: BTreeMap<String, String>,
    /// Paths sharing one inode share this number.
    inode: u64,
}

#[derive(Debug, Default)]
struct RootFs {
    nodes: BTreeMap<String, Node>,
    next_inode: u64,
}

impl RootFs {
    /// Applies one layer tar (plain or gzip): its whiteouts and opaque markers remove what
    /// lower layers had, then its entries are laid over.
    fn apply(&mut self, path: &Path) -> Result<(), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let reader: Box<dyn Read> = if bytes.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(bytes.as_slice()))
        } else {
            Box::new(bytes.as_slice())
        };
        let mut archive = tar::Archive::new(reader);
        let mut removed = Vec::new();
        let mut opaque = Vec::new();
        let mut added: Vec<(String, Result<Node, String>)> = Vec::new();
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let name = normalize(&entry.path().map_err(|e| e.to_string())?.to_string_lossy());
            if name.is_empty() {
                continue;
            }
            let (parent, base) = match name.rsplit_once('/') {
                Some((parent, base)) => (parent.to_owned(), base.to_owned()),
                None => (String::new(), name.clone()),
            };
            if base == ".wh..wh..opq" {
                opaque.push(parent);
                continue;
            }
            if let Some(hidden) = base.strip_prefix(".wh.") {
                removed.push(join(&parent, hidden));
                continue;
            }
            let header = entry.header().clone();
            let mut xattrs = BTreeMap::new();
            if let Ok(Some(pax)) = entry.pax_extensions() {
                for ext in pax.flatten() {
                    if let Some(key) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr."))
                    {
                        xattrs.insert(
                            key.to_owned(),
                            String::from_utf8_lossy(ext.value_bytes()).into_owned(),
                        );
                    }
                }
            }
            let link = || {
                header
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let kind = header.entry_type();
            if kind == tar::EntryType::Link {
                added.push((name, Err(normalize(&link()))));
                continue;
            }
            let (kind, detail, size) = match kind {
                tar::EntryType::Directory => ("dir", String::new(), 0),
                tar::EntryType::Symlink => ("symlink", link(), 0),
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut content = Vec::new();
                    entry.read_to_end(&mut content).map_err(|e| e.to_string())?;
                    let hash = blake3::hash(&content).to_hex()[..16].to_owned();
                    ("file", hash, content.len() as u64)
                }
                tar::EntryType::Char | tar::EntryType::Block => (
                    if kind == tar::EntryType::Char {
                        "char"
                    } else {
                        "block"
                    },
                    format!(
                        "{},{}",
                        header.device_major().ok().flatten().unwrap_or(0),
                        header.device_minor().ok().flatten().unwrap_or(0)
                    ),
                    0,
                ),
                tar::EntryType::Fifo => ("fifo", String::new(), 0),
                other => ("other", format!("{other:?}"), 0),
            };
            self.next_inode += 1;
            added.push((
                name,
                Ok(Node {
                    kind: kind.to_owned(),
                    mode: header.mode().map_err(|e| e.to_string())? & 0o7777,
                    uid: header.uid().map_err(|e| e.to_string())?,
                    gid: header.gid().map_err(|e| e.to_string())?,
                    size,
                    detail,
                    xattrs,
                    inode: self.next_inode,
                }),
            ));
        }
        for dir in opaque {
            self.remove_below(&dir);
        }
        for path in removed {
            self.nodes.remove(&path);
            self.remove_below(&path);
        }
        for (path, node) in added {
            let node = match node {
                Ok(node) => node,
                Err(target) => self
                    .nodes
                    .get(&target)
                    .cloned()
                    .ok_or_else(|| format!("hard link {path} to missing {target}"))?,
            };
            if node.kind != "dir" {
                self.remove_below(&path);
            }
            self.nodes.insert(path, node);
        }
        Ok(())
    }

    fn remove_below(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        self.nodes.retain(|path, _| !path.starts_with(&prefix));
    }

    fn listing(&self) -> BTreeMap<String, String> {
        let mut by_inode: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for (path, node) in &self.nodes {
            by_inode.entry(node.inode).or_default().push(path);
        }
        self.nodes
            .iter()
            .map(|(path, n)| {
                let mut line = format!("{} {:04o} {}:{}", n.kind, n.mode, n.uid, n.gid);
                match n.kind.as_str() {
                    "file" => {
                        let _ = write!(line, " {}B {}", n.size, n.detail);
                    }
                    "symlink" => {
                        // A symlink's mode means nothing; only its target does.
                        line = format!("symlink {}:{} -> {}", n.uid, n.gid, n.detail);
                    }
                    "dir" | "fifo" => {}
                    _ => {
                        let _ = write!(line, " {}", n.detail);
                    }
                }
                if !n.xattrs.is_empty() {
                    let _ = write!(line, " xattrs={:?}", n.xattrs);
                }
                let group = &by_inode[&n.inode];
                if group.len() > 1 {
                    let _ = write!(line, " hardlinks={}", group.join(","));
                }
                (path.clone(), line)
            })
            .collect()
    }
}

fn normalize(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn layer(dir: &Path, name: &str, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
        let mut tar = tar::Builder::new(Vec::new());
        build(&mut tar);
        let path = dir.join(name);
        std::fs::write(&path, tar.into_inner().expect("tar")).expect("write layer");
        path
    }

    #[test]
    fn whiteouts_opaque_dirs_and_hard_links_merge_like_a_runtime() {
        let tmp = tempfile::tempdir().expect("tmp");
        let lower = layer(tmp.path(), "lower.tar", |t| {
            for dir in ["d/", "o/", "keep/"] {
                t.append_data(
                    &mut header(tar::EntryType::Directory, 0o755, 0),
                    dir,
                    &[][..],
                )
                .expect("dir");
            }
            for file in ["d/gone", "o/old", "keep/a"] {
                t.append_data(
                    &mut header(tar::EntryType::Regular, 0o644, 1),
                    file,
                    &b"x"[..],
                )
                .expect("file");
            }
        });
        let upper = layer(tmp.path(), "upper.tar", |t| {
            t.append_data(
                &mut header(tar::EntryType::Regular, 0, 0),
                "d/.wh.gone",
                &[][..],
            )
            .expect("whiteout");
            t.append_data(
                &mut header(tar::EntryType::Directory, 0o700, 0),
                "o/",
                &[][..],
            )
            .expect("dir");
            t.append_data(
                &mut header(tar::EntryType::Regular, 0o600, 1),
                "o/new",
                &b"y"[..],
            )
            .expect("file");
            t.append_data(
                &mut header(tar::EntryType::Regular, 0, 0),
                "o/.wh..wh..opq",
                &[][..],
            )
            .expect("opaque");
            let mut link = header(tar::EntryType::Link, 0o600, 0);
            t.append_link(&mut link, "keep/b", "o/new")
                .expect("hard link");
        });
        let mut fs = RootFs::default();
        fs.apply(&lower).expect("lower");
        fs.apply(&upper).expect("upper");
        let listing = fs.listing();
        let paths: Vec<&str> = listing.keys().map(String::as_str).collect();
        assert_eq!(paths, ["d", "keep", "keep/a", "keep/b", "o", "o/new"]);
        assert_eq!(listing["o"], "dir 0700 0:0");
        assert!(
            listing["keep/b"].ends_with("hardlinks=keep/b,o/new"),
            "{listing:?}"
        );
        assert_eq!(listing["keep/b"], listing["o/new"]);
    }

    #[test]
    fn the_allow_list_wants_an_issue_and_a_reason() {
        let list = AllowList::parse(
            "# comment\n\ncase-a | /x | https://github.com/moby/buildkit/issues/1 | old bug\n",
        )
        .expect("parses");
        assert!(list.allows("case-a", "/x").is_some());
        assert!(list.allows("case-a", "/y").is_none());
        assert!(AllowList::parse("case | /x | no-url | why\n").is_err());
        assert!(AllowList::parse("case | /x | https://x\n").is_err());
    }
}
