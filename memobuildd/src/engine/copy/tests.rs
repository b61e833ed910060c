//! COPY semantics against real directories (no root needed: ownership is not set here).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::*;
use crate::context::{StatCache, scan};
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
fn symlinks_are_copied_as_links_and_chmod_applies() {
    let fx = Fixture::new();
    let out = fx
        .copy(&["link", "a.txt"], "/d/", Some(0o700))
        .expect("copy");
    assert_eq!(out["d/link"], "link a.txt");
    assert_eq!(out["d/a.txt"], "file 700 a");
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
