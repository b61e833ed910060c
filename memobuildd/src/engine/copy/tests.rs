//! COPY semantics against real directories (no root needed: ownership is not set here).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::context::{IgnoreRules, StatCache, scan};
use crate::engine::testutil::listing;

struct Fixture {
    dir: tempfile::TempDir,
    tree: FileTree,
    parent: RootView,
}

impl Fixture {
    /// A context with files, and a parent image with /etc, /srv/app and /app -> /srv/app.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path().join("ctx");
        for (path, content) in [
            ("a.txt", "a"),
            ("b.txt", "bb"),
            ("src/main.rs", "fn main() {}"),
            ("src/util/mod.rs", "mod x;"),
        ] {
            let file = ctx.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, content).expect("write");
        }
        std::os::unix::fs::symlink("a.txt", ctx.join("link")).expect("symlink");
        let mut cache = StatCache::open(&dir.path().join("c.sqlite")).expect("cache");
        let (tree, _) = scan(&ctx, &IgnoreRules::default(), &mut cache).expect("scan");

        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("etc")).expect("etc");
        std::fs::create_dir_all(layer.join("srv/app")).expect("srv");
        std::fs::set_permissions(layer.join("srv"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        std::os::unix::fs::symlink("/srv/app", layer.join("app")).expect("app link");
        Self {
            dir,
            tree,
            parent: RootView::new(vec![layer]),
        }
    }

    fn ctx(&self) -> PathBuf {
        self.dir.path().join("ctx")
    }

    /// Runs a COPY and lists the staging tree: path → (kind, mode).
    fn copy(
        &self,
        sources: &[&str],
        dest: &str,
        chmod: Option<u32>,
    ) -> Result<BTreeMap<String, String>, CopyError> {
        let staging = tempfile::tempdir_in(self.dir.path()).expect("staging");
        let spec = CopySpec {
            sources: sources.iter().map(|s| (*s).to_owned()).collect(),
            dest: dest.to_owned(),
            workdir: "/work".into(),
            chown: None,
            chmod,
        };
        let ctx = self.ctx();
        let excludes = IgnoreRules::default();
        let source = CopySource::Context {
            dir: &ctx,
            tree: &self.tree,
            excludes: &excludes,
            readable: None,
        };
        stage(&spec, source, &self.parent, staging.path(), false)?;
        Ok(listing(staging.path()))
    }
}

fn paths(listing: &BTreeMap<String, String>) -> Vec<&str> {
    listing.keys().map(String::as_str).collect()
}

#[test]
fn a_directory_source_copies_its_contents() {
    let fx = Fixture::new();
    let out = fx.copy(&["src/"], "/dst/", None).expect("copy");
    assert_eq!(
        paths(&out),
        ["dst", "dst/main.rs", "dst/util", "dst/util/mod.rs"]
    );
}

#[test]
fn a_single_file_can_be_renamed() {
    let fx = Fixture::new();
    let out = fx.copy(&["a.txt"], "/x/y", None).expect("copy");
    assert_eq!(paths(&out), ["x", "x/y"]);
    assert!(out["x/y"].ends_with(" a"));
}

#[test]
fn an_existing_directory_in_the_parent_is_a_directory_destination() {
    let fx = Fixture::new();
    let out = fx.copy(&["a.txt"], "/etc", None).expect("copy");
    assert_eq!(paths(&out), ["etc", "etc/a.txt"]);
}

#[test]
fn wildcards_and_several_sources_copy_into_a_directory() {
    let fx = Fixture::new();
    let out = fx.copy(&["*.txt"], "/d", None).expect("copy");
    assert_eq!(paths(&out), ["d", "d/a.txt", "d/b.txt"]);
    let out = fx.copy(&["a.txt", "b.txt"], "/e", None).expect("copy");
    assert_eq!(paths(&out), ["e", "e/a.txt", "e/b.txt"]);
}

#[test]
fn a_wildcard_matching_nothing_is_not_an_error_but_a_missing_path_is() {
    let fx = Fixture::new();
    assert!(
        fx.copy(&["nomatch*"], "/d/", None)
            .expect("no match")
            .is_empty()
    );
    let err = fx.copy(&["missing.txt"], "/d/", None).expect_err("missing");
    assert!(
        matches!(err, CopyError::NotInContext(ref p) if p == "missing.txt"),
        "{err}"
    );
}

#[test]
fn relative_destinations_follow_workdir() {
    let fx = Fixture::new();
    let out = fx.copy(&["a.txt"], "rel/", None).expect("copy");
    assert_eq!(paths(&out), ["work", "work/rel", "work/rel/a.txt"]);
}

#[test]
fn destinations_resolve_through_the_parents_symlinks() {
    let fx = Fixture::new();
    let out = fx.copy(&["a.txt"], "/app/", None).expect("copy");
    assert_eq!(paths(&out), ["srv", "srv/app", "srv/app/a.txt"]);
    assert_eq!(out["srv"], "dir 750", "an existing parent keeps its mode");
}

#[test]
fn a_named_symlink_is_followed_and_chmod_applies() {
    let fx = Fixture::new();
    let out = fx
        .copy(&["link", "a.txt"], "/d/", Some(0o700))
        .expect("copy");
    assert_eq!(
        out["d/link"], "file 700 a",
        "BuildKit copies what a named link points to"
    );
    assert_eq!(out["d/a.txt"], "file 700 a");
    let out = fx.copy(&["lin*"], "/w/", None).expect("copy");
    assert_eq!(out["w/link"], "file 644 a", "also through a wildcard");
}

#[test]
fn symlinks_and_hard_links_inside_a_copied_directory_stay_links() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new();
    std::os::unix::fs::symlink("main.rs", fx.ctx().join("src/alias")).expect("symlink");
    std::fs::hard_link(
        fx.ctx().join("src/main.rs"),
        fx.ctx().join("src/util/same.rs"),
    )
    .expect("hard link");
    std::fs::set_permissions(fx.ctx().join("src"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let mut cache = StatCache::open(&fx.dir.path().join("c2.sqlite")).expect("cache");
    let (tree, _) = scan(&fx.ctx(), &IgnoreRules::default(), &mut cache).expect("scan");
    let staging = tempfile::tempdir_in(fx.dir.path()).expect("staging");
    let spec = CopySpec {
        sources: vec!["src".into()],
        dest: "/dst".into(),
        workdir: "/".into(),
        chown: None,
        chmod: None,
    };
    let excludes = IgnoreRules::default();
    let ctx = fx.ctx();
    let source = CopySource::Context {
        dir: &ctx,
        tree: &tree,
        excludes: &excludes,
        readable: None,
    };
    let plan = plan(&spec, source, &fx.parent).expect("plan");
    assert!(plan.chunks(1).is_none(), "hard links keep one layer");
    plan.apply(&spec, &fx.parent, staging.path(), false)
        .expect("copy");
    let out = listing(staging.path());
    assert_eq!(out["dst/alias"], "link main.rs");
    // The directory a directory's contents go to is made 0755, whatever the source's mode.
    assert_eq!(out["dst"], "dir 755");
    let ino = |rel: &str| {
        std::fs::metadata(staging.path().join(rel))
            .expect(rel)
            .ino()
    };
    assert_eq!(ino("dst/main.rs"), ino("dst/util/same.rs"));
}

#[test]
fn a_file_changed_after_fingerprinting_is_refused() {
    let fx = Fixture::new();
    std::fs::write(fx.ctx().join("a.txt"), "z").expect("edit");
    let err = fx.copy(&["a.txt"], "/d/", None).expect_err("changed");
    assert!(
        matches!(err, CopyError::ChangedDuringCopy(ref p) if p == "a.txt"),
        "{err}"
    );
}

/// A context of 400 files of 0–4 KiB over nested dirs (one of them 0700), scanned.
fn many_files(root: &Path, edit: Option<usize>) -> FileTree {
    let ctx = root.join("ctx");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..400 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let file = ctx.join(format!("src/d{}/s{}/f{i}", i % 7, i % 5));
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        let mut content = vec![b'a' + (i % 26) as u8; (seed % 4096) as usize];
        if edit == Some(i) {
            content.extend_from_slice(b"an edit");
        }
        std::fs::write(file, content).expect("write");
    }
    std::fs::set_permissions(ctx.join("src/d3"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let mut cache = StatCache::open(&root.join("c.sqlite")).expect("cache");
    scan(&ctx, &IgnoreRules::default(), &mut cache)
        .expect("scan")
        .0
}

/// COPY `sources` to `/app/`.
fn to_app(sources: &[&str]) -> CopySpec {
    CopySpec {
        sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        dest: "/app/".into(),
        workdir: "/".into(),
        chown: None,
        chmod: None,
    }
}

fn plan_of(root: &Path, tree: &FileTree, sources: &[&str], parent: &RootView) -> (CopySpec, Plan) {
    let spec = to_app(sources);
    let excludes = IgnoreRules::default();
    let ctx = root.join("ctx");
    let source = CopySource::Context {
        dir: &ctx,
        tree,
        excludes: &excludes,
        readable: None,
    };
    let plan = plan(&spec, source, parent).expect("plan");
    (spec, plan)
}

const CHUNK: u64 = 16 << 10;

#[test]
fn chunks_together_stage_exactly_the_whole_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = many_files(dir.path(), None);
    let parent = RootView::new(Vec::new());
    let (spec, plan) = plan_of(dir.path(), &tree, &["src"], &parent);
    let whole = tempfile::tempdir_in(dir.path()).expect("whole");
    plan.apply(&spec, &parent, whole.path(), false)
        .expect("apply");
    let whole = listing(whole.path());

    let chunks = plan.chunks(CHUNK).expect("a plan of ~800 KiB splits");
    assert!(chunks.len() > 10, "{} chunks", chunks.len());
    let few = plan.chunks(1 << 10).expect("tiny chunks asked for");
    assert!(few.len() <= 2 * MAX_CHUNKS as usize, "{} chunks", few.len());
    // Raised so that the plan makes at most MAX_CHUNKS chunks.
    let target = CHUNK.max(plan.bytes().div_ceil(MAX_CHUNKS).next_power_of_two());
    let (last, full) = chunks.split_last().expect("chunks");
    for chunk in full {
        // Files are at most 4 KiB, so no chunk overshoots its bounds by more.
        assert!(
            (target / 2..2 * target + (4 << 10)).contains(&chunk.bytes),
            "{}",
            chunk.bytes
        );
    }
    assert!(last.bytes < 2 * target + (4 << 10));
    let mut merged = BTreeMap::new();
    for chunk in &chunks {
        let staging = tempfile::tempdir_in(dir.path()).expect("chunk");
        plan.apply_chunk(chunk, &spec, &parent, staging.path(), false)
            .expect("apply chunk");
        for (path, line) in listing(staging.path()) {
            // A path in two chunks is a directory both need, recreated alike.
            if let Some(earlier) = merged.insert(path.clone(), line.clone()) {
                assert_eq!(earlier, line, "{path}");
                assert!(line.starts_with("dir "), "{path} in two chunks");
            }
        }
    }
    assert_eq!(merged, whole);
    assert_eq!(merged["app/d3"], "dir 700");
    assert_eq!(
        chunks.iter().map(|c| c.bytes).sum::<u64>(),
        plan.bytes(),
        "every file in exactly one chunk"
    );
}

#[test]
fn an_edit_changes_only_the_chunk_of_the_edited_file() {
    let parent = RootView::new(Vec::new());
    let fingerprints = |edit: Option<usize>| {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = many_files(dir.path(), edit);
        let (_, plan) = plan_of(dir.path(), &tree, &["src"], &parent);
        let chunks = plan.chunks(CHUNK).expect("chunks");
        chunks
            .into_iter()
            .map(|c| c.fingerprint)
            .collect::<Vec<_>>()
    };
    let before = fingerprints(None);
    assert_eq!(before, fingerprints(None), "deterministic");
    for edited in [3, 200, 399] {
        let after = fingerprints(Some(edited));
        assert_eq!(before.len(), after.len(), "file {edited}");
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 1, "file {edited}");
    }
}

#[test]
fn small_ambiguous_or_unknown_copies_stay_one_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = many_files(dir.path(), None);
    let parent = RootView::new(Vec::new());
    let (_, whole) = plan_of(dir.path(), &tree, &["src"], &parent);
    assert!(whole.chunks(0).is_none(), "splitting off");
    assert!(whole.chunks(whole.bytes()).is_none(), "under two chunks");
    // Both sources write app/s0/…: a later source replaces an earlier one in one layer.
    let (_, twice) = plan_of(dir.path(), &tree, &["src/d0", "src/d1"], &parent);
    assert!(twice.bytes() > 2 * (4 << 10));
    assert!(twice.chunks(4 << 10).is_none(), "a path named twice");
    // From an image, contents are not known before copying.
    let image = RootView::new(vec![dir.path().join("ctx")]);
    let from_image = plan(
        &to_app(&["src"]),
        CopySource::Image(&image, &IgnoreRules::default()),
        &parent,
    )
    .expect("plan");
    assert!(from_image.bytes() >= 2 * CHUNK);
    assert!(from_image.chunks(CHUNK).is_none(), "--from");
}

#[test]
fn chown_keeps_setuid_bits_and_owns_what_it_copies() {
    if !crate::testing::privileged("chown_keeps_setuid_bits_and_owns_what_it_copies") {
        return;
    }
    let fx = Fixture::new();
    std::fs::set_permissions(
        fx.ctx().join("a.txt"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .expect("setuid");
    let mut cache = StatCache::open(&fx.dir.path().join("c2.sqlite")).expect("cache");
    let (tree, _) = scan(&fx.ctx(), &IgnoreRules::default(), &mut cache).expect("scan");
    let staging = tempfile::tempdir_in(fx.dir.path()).expect("staging");
    let spec = CopySpec {
        sources: vec!["a.txt".into(), "src".into()],
        dest: "/d/".into(),
        workdir: "/".into(),
        chown: Some((1000, 1001)),
        chmod: None,
    };
    let excludes = IgnoreRules::default();
    let source = CopySource::Context {
        dir: &fx.ctx(),
        tree: &tree,
        excludes: &excludes,
        readable: None,
    };
    let stats = stage(&spec, source, &fx.parent, staging.path(), true).expect("copy");
    assert_eq!(stats.files, 3);
    for (path, mode) in [("d/a.txt", 0o4755), ("d/main.rs", 0o644), ("d/util", 0o755)] {
        let meta = std::fs::symlink_metadata(staging.path().join(path)).expect(path);
        assert_eq!(meta.mode() & 0o7777, mode, "{path}");
        assert_eq!((meta.uid(), meta.gid()), (1000, 1001), "{path}");
    }
}
