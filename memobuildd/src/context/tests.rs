//! Scans of real directories.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use super::*;

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, content).expect("write");
}

fn paths(tree: &FileTree) -> Vec<&str> {
    tree.iter()
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Lets file ctimes fall behind the stat cache's "racily clean" margin.
fn age_files() {
    std::thread::sleep(Duration::from_millis(120));
}

struct Fixture {
    dir: tempfile::TempDir,
    cache: StatCache,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("ctx")).expect("ctx");
        let cache = StatCache::open(&dir.path().join("context-v1.sqlite")).expect("cache");
        Self { dir, cache }
    }

    fn ctx(&self) -> std::path::PathBuf {
        self.dir.path().join("ctx")
    }

    fn scan(&mut self) -> (FileTree, ScanReport) {
        let ctx = self.ctx();
        let rules = ignore_rules(&ctx, &ctx.join("Dockerfile")).expect("rules");
        scan(&ctx, &rules, &mut self.cache).expect("scan")
    }
}

#[test]
fn dockerignore_is_applied_and_exceptions_reach_into_excluded_dirs() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    write(&ctx, "Dockerfile", "FROM scratch\n");
    write(
        &ctx,
        ".dockerignore",
        "node_modules\n!node_modules/keep\n*.log\n",
    );
    write(&ctx, "node_modules/junk/x.js", "x");
    write(&ctx, "node_modules/keep/y.js", "y");
    write(&ctx, "app.log", "log");
    write(&ctx, "src/main.rs", "fn main() {}");
    let (tree, _) = fx.scan();
    assert_eq!(
        paths(&tree),
        [
            ".dockerignore",
            "Dockerfile",
            "node_modules",
            "node_modules/keep",
            "node_modules/keep/y.js",
            "src",
            "src/main.rs"
        ]
    );
}

#[test]
fn dockerfile_specific_ignore_file_wins() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    write(&ctx, "build/app.Dockerfile", "FROM scratch\n");
    write(&ctx, "build/app.Dockerfile.dockerignore", "secret\n");
    write(&ctx, ".dockerignore", "public\n");
    write(&ctx, "secret", "s");
    write(&ctx, "public", "p");
    let rules = ignore_rules(&ctx, &ctx.join("build/app.Dockerfile")).expect("rules");
    let (tree, _) = scan(&ctx, &rules, &mut fx.cache).expect("scan");
    assert!(tree.get("secret").is_none());
    assert!(tree.get("public").is_some());
}

#[test]
fn same_size_edit_with_restored_mtime_is_detected() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    write(&ctx, "config.txt", "version=1");
    age_files();
    let (before, first) = fx.scan();
    assert_eq!(first.hashed_files, 1);
    let path = ctx.join("config.txt");
    let mtime = fs::metadata(&path)
        .expect("meta")
        .modified()
        .expect("mtime");
    fs::write(&path, "version=2").expect("same-size edit");
    // `touch -r`: put the old mtime back, as some editors and tools do.
    fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_modified(mtime)
        .expect("restore mtime");
    assert_eq!(
        fs::metadata(&path).expect("meta").modified().expect("m"),
        mtime
    );
    let (after, second) = fx.scan();
    assert_eq!(
        second.hashed_files, 1,
        "ctime moved, so the cache must not vouch"
    );
    assert_ne!(
        before.get("config.txt").expect("entry").hash,
        after.get("config.txt").expect("entry").hash
    );
}

#[test]
fn symlinks_are_kept_as_links_and_never_followed() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    write(&ctx, "a.txt", "a");
    std::os::unix::fs::symlink("/etc/passwd", ctx.join("outside")).expect("symlink");
    std::os::unix::fs::symlink("/", ctx.join("root-link")).expect("symlink");
    std::os::unix::fs::symlink("a.txt", ctx.join("inside")).expect("symlink");
    let (tree, _) = fx.scan();
    let outside = tree.get("outside").expect("link kept");
    assert_eq!(outside.kind, EntryKind::Symlink);
    assert_eq!(outside.link_target.as_deref(), Some("/etc/passwd"));
    assert_eq!(
        tree.get("root-link").expect("link").kind,
        EntryKind::Symlink
    );
    assert!(
        !paths(&tree).iter().any(|p| p.starts_with("root-link/")),
        "a directory symlink is never walked into"
    );
    assert_eq!(
        tree.get("inside").expect("link").link_target.as_deref(),
        Some("a.txt")
    );
}

#[test]
fn modes_and_types_are_kept() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    write(&ctx, "run.sh", "#!/bin/sh");
    fs::set_permissions(ctx.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::create_dir(ctx.join("empty")).expect("empty dir");
    let (tree, _) = fx.scan();
    assert_eq!(tree.get("run.sh").expect("file").mode, 0o755);
    assert_eq!(tree.get("empty").expect("dir").kind, EntryKind::Dir);
    let (files, bytes) = tree.file_stats();
    assert_eq!((files, bytes), (1, 9));
}

#[test]
fn a_reopened_cache_rehashes_nothing_when_nothing_changed() {
    let mut fx = Fixture::new();
    let ctx = fx.ctx();
    for i in 0..50 {
        write(&ctx, &format!("src/f{i}.txt"), &format!("file {i}"));
    }
    age_files();
    let (mut first_tree, first) = fx.scan();
    assert_eq!(first.hashed_files, 50);
    // A restarted daemon: a fresh StatCache over the same database file.
    fx.cache = StatCache::open(&fx.dir.path().join("context-v1.sqlite")).expect("reopen");
    let (mut second_tree, second) = fx.scan();
    assert_eq!(second.hashed_files, 0);
    assert_eq!(first_tree.root_hash(), second_tree.root_hash());
}
