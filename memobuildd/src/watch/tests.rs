//! The hub against real directories, with a scripted watcher backend.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Makes watchers that record what they watch (by watcher) while they live; with
/// `fail_with_limit` every watch fails as on an exhausted inotify watch limit.
#[derive(Debug, Clone, Default)]
struct ScriptedBackend {
    watched: Arc<Mutex<Vec<(WatcherId, PathBuf)>>>,
    fail_with_limit: bool,
}

struct ScriptedWatcher {
    id: WatcherId,
    script: ScriptedBackend,
}

impl WatcherFactory for ScriptedBackend {
    fn create(&self, id: WatcherId) -> Result<Box<dyn WatchBackend>, WatchError> {
        Ok(Box::new(ScriptedWatcher {
            id,
            script: self.clone(),
        }))
    }
}

impl WatchBackend for ScriptedWatcher {
    fn watch(&mut self, dir: &Path, _recursive: bool) -> Result<(), WatchError> {
        if self.script.fail_with_limit {
            return Err(WatchError::WatchLimit);
        }
        lock(&self.script.watched).push((self.id, dir.to_owned()));
        Ok(())
    }

    fn unwatch(&mut self, dir: &Path) {
        lock(&self.script.watched).retain(|(id, d)| *id != self.id || d != dir);
    }
}

impl Drop for ScriptedWatcher {
    fn drop(&mut self) {
        lock(&self.script.watched).retain(|(id, _)| *id != self.id);
    }
}

impl ScriptedBackend {
    fn watched_paths(&self) -> Vec<PathBuf> {
        lock(&self.watched).iter().map(|(_, p)| p.clone()).collect()
    }
}

const DOCKERFILE: &str = "\
FROM scratch
COPY package.json /app/
RUN install
COPY src/ /app/src/
RUN build
CMD [\"run\"]
";

struct Fixture {
    dir: tempfile::TempDir,
    backend: ScriptedBackend,
    hub: Hub,
}

impl Fixture {
    fn new() -> Self {
        Self::with_backend(ScriptedBackend::default())
    }

    fn with_backend(backend: ScriptedBackend) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(ctx.join("src")).expect("src");
        fs::write(ctx.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
        fs::write(ctx.join(".dockerignore"), "*.log\n").expect("ignore");
        fs::write(ctx.join("package.json"), "{}").expect("package.json");
        fs::write(ctx.join("src/x.js"), "x = 1").expect("x");
        fs::write(ctx.join("debug.log"), "noise").expect("log");
        fs::create_dir(dir.path().join("root")).expect("root");
        let hub = Hub::open(
            &Layout::new(dir.path().join("root")),
            Box::new(backend.clone()),
        )
        .expect("hub");
        Self { dir, backend, hub }
    }

    fn ctx(&self) -> PathBuf {
        self.dir.path().join("ctx")
    }

    /// Watches the workspace and builds it (as far as the hub can tell): the state now is the
    /// baseline edits are compared with.
    fn watch(&self) -> WorkspaceReport {
        let report = self
            .hub
            .watch(&self.ctx(), &self.ctx().join("Dockerfile"))
            .expect("watch");
        assert!(!report.built, "watched, not built");
        self.build();
        report
    }

    /// What a build does with the hub: a snapshot, then the snapshot as the new baseline.
    fn build(&self) -> BuildSnapshot {
        let snapshot = self
            .hub
            .snapshot(&self.ctx(), &self.ctx().join("Dockerfile"), &[])
            .expect("snapshot");
        self.hub.mark_built(&self.ctx(), &snapshot.baseline);
        snapshot
    }

    fn edit(&self, rel: &str, content: &str) -> ChangeOutcome {
        let path = self.ctx().join(rel);
        fs::write(&path, content).expect("edit");
        self.hub.changed(&[path])
    }

    fn dirty(&self) -> Vec<(String, String)> {
        self.hub.reports()[0]
            .dirty
            .iter()
            .map(|d| (d.label.clone(), d.cause.clone()))
            .collect()
    }
}

fn labels(dirty: &[(String, String)]) -> Vec<&str> {
    dirty.iter().map(|(label, _)| label.as_str()).collect()
}

#[test]
fn editing_src_marks_only_the_src_copy_and_what_follows() {
    let fx = Fixture::new();
    let report = fx.watch();
    assert!(report.dirty.is_empty());
    assert!(report.watching);
    let cookies = fx.dir.path().join("root/cookies");
    assert_eq!(fx.backend.watched_paths(), [cookies, fx.ctx()]);

    let outcome = fx.edit("src/x.js", "x = 2");
    assert_eq!(outcome.matched, 1);
    assert_eq!(outcome.dirtied, 3);
    let dirty = fx.dirty();
    assert_eq!(
        labels(&dirty),
        ["COPY src/ /app/src/", "RUN build", "CMD run"]
    );
    assert!(
        dirty.iter().all(|(_, cause)| cause == "src/x.js"),
        "{dirty:?}"
    );

    // Reverting the edit makes the workspace clean again.
    fx.edit("src/x.js", "x = 1");
    assert!(fx.dirty().is_empty(), "{:?}", fx.dirty());
}

#[test]
fn editing_an_ignored_or_unread_file_marks_nothing() {
    let fx = Fixture::new();
    fx.watch();
    assert_eq!(fx.edit("debug.log", "more noise").dirtied, 0);
    assert_eq!(fx.edit("README.md", "not copied by anything").dirtied, 0);
    assert!(fx.dirty().is_empty());
}

#[test]
fn a_new_file_in_src_is_a_change_to_the_src_copy() {
    let fx = Fixture::new();
    fx.watch();
    fx.edit("src/new.js", "new");
    assert_eq!(labels(&fx.dirty())[0], "COPY src/ /app/src/");
    fs::remove_file(fx.ctx().join("src/new.js")).expect("rm");
    fx.hub.changed(&[fx.ctx().join("src/new.js")]);
    assert!(
        fx.dirty().is_empty(),
        "removing it again restores the baseline"
    );
}

#[test]
fn changing_cmd_dirties_only_cmd() {
    let fx = Fixture::new();
    fx.watch();
    fx.edit(
        "Dockerfile",
        &DOCKERFILE.replace("[\"run\"]", "[\"serve\"]"),
    );
    assert_eq!(
        fx.dirty(),
        [("CMD serve".to_owned(), "Dockerfile".to_owned())]
    );
}

#[test]
fn a_broken_dockerfile_is_reported_not_fatal() {
    let fx = Fixture::new();
    fx.watch();
    fx.edit("Dockerfile", "FROM scratch\nRUN --bogus true\n");
    let report = &fx.hub.reports()[0];
    let error = report.error.as_deref().expect("error reported");
    assert!(error.contains(":2:5: unknown flag"), "{error}");
    fx.edit("Dockerfile", DOCKERFILE);
    assert_eq!(fx.hub.reports()[0].error, None);
    assert!(fx.dirty().is_empty());
}

#[test]
fn a_rescan_finds_changes_the_watcher_missed() {
    let fx = Fixture::new();
    fx.watch();
    // Lets the scanned files age past the stat cache's racy margin.
    std::thread::sleep(Duration::from_millis(120));
    fs::write(fx.ctx().join("package.json"), "{\"a\":1}").expect("silent edit");
    assert!(fx.dirty().is_empty(), "nobody told the hub yet");
    let outcome = fx.hub.rescan(None);
    assert!(outcome.dirtied >= 1);
    assert_eq!(labels(&fx.dirty())[0], "COPY package.json /app/");
}

#[test]
fn without_inotify_watches_the_workspace_is_kept_but_not_live() {
    let fx = Fixture::with_backend(ScriptedBackend {
        fail_with_limit: true,
        ..ScriptedBackend::default()
    });
    let report = fx.watch();
    assert!(!report.watching);
    // The editor hook still works.
    fx.edit("src/x.js", "x = 3");
    assert_eq!(labels(&fx.dirty())[0], "COPY src/ /app/src/");
    // And a build rescans what nobody reported.
    std::thread::sleep(Duration::from_millis(120));
    fs::write(fx.ctx().join("package.json"), "{\"b\":2}").expect("unreported edit");
    fx.hub.ensure_current(&fx.ctx()).expect("rescan");
    assert!(
        labels(&fx.dirty()).contains(&"COPY package.json /app/"),
        "{:?}",
        fx.dirty()
    );
}

#[test]
fn a_restarted_hub_restores_workspaces_and_rehashes_nothing() {
    let fx = Fixture::new();
    std::thread::sleep(Duration::from_millis(120));
    let first = fx.watch();
    assert_eq!(
        first.hashed_files, 4,
        "Dockerfile, .dockerignore, package.json, src/x.js"
    );
    let again = Hub::open(
        &Layout::new(fx.dir.path().join("root")),
        Box::new(ScriptedBackend::default()),
    )
    .expect("hub");
    again.restore();
    let reports = again.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].hashed_files, 0);
    assert_eq!(reports[0].files, 4);

    again.unwatch(&fx.ctx()).expect("unwatch");
    let third = Hub::open(
        &Layout::new(fx.dir.path().join("root")),
        Box::new(ScriptedBackend::default()),
    )
    .expect("hub");
    third.restore();
    assert!(third.reports().is_empty(), "unwatch is persisted too");
}

#[test]
fn a_dockerfile_edit_replans_without_a_rescan_but_an_ignore_edit_rescans() {
    let fx = Fixture::new();
    fx.watch();
    // Lets the scanned files age past the stat cache's racy margin.
    std::thread::sleep(Duration::from_millis(120));
    // Nobody reports this edit: only a rescan could see it.
    fs::write(fx.ctx().join("package.json"), "{\"a\":1}").expect("silent edit");
    fx.edit(
        "Dockerfile",
        &DOCKERFILE.replace("[\"run\"]", "[\"serve\"]"),
    );
    assert_eq!(
        fx.dirty(),
        [("CMD serve".to_owned(), "Dockerfile".to_owned())],
        "re-planned, not rescanned"
    );
    fx.edit(".dockerignore", "*.log\n*.tmp\n");
    assert!(
        labels(&fx.dirty()).contains(&"COPY package.json /app/"),
        "new ignore rules rescan: {:?}",
        fx.dirty()
    );
}

#[test]
fn a_workspace_never_built_says_so_and_its_baseline_survives_a_restart() {
    let fx = Fixture::new();
    let report = fx
        .hub
        .watch(&fx.ctx(), &fx.ctx().join("Dockerfile"))
        .expect("watch");
    assert!(!report.built);
    fx.edit("src/x.js", "x = 2");
    let report = &fx.hub.reports()[0];
    assert!(!report.built && report.dirty.is_empty(), "{report:?}");

    fx.build();
    assert!(fx.hub.reports()[0].built);
    fx.edit("src/x.js", "x = 3");
    let restarted = Hub::open(
        &Layout::new(fx.dir.path().join("root")),
        Box::new(ScriptedBackend::default()),
    )
    .expect("hub");
    restarted.restore();
    let report = &restarted.reports()[0];
    assert!(report.built, "the last build is remembered");
    assert_eq!(
        report
            .dirty
            .first()
            .map(|d| (d.label.as_str(), d.cause.as_str())),
        Some(("COPY src/ /app/src/", "Dockerfile")),
        "an edit made before the restart is still a change from the last build"
    );
}

#[test]
fn a_build_snapshot_does_not_see_later_edits_and_they_stay_dirty() {
    let fx = Fixture::new();
    fx.watch();
    let snapshot = fx
        .hub
        .snapshot(
            &fx.ctx(),
            &fx.ctx().join("Dockerfile"),
            &[(vec!["src/".into()], vec![])],
        )
        .expect("snapshot");
    let before = snapshot.tree.get("src/x.js").expect("x").hash;
    fx.edit("src/x.js", "x = 2 (during the build)");
    assert_eq!(snapshot.tree.get("src/x.js").expect("x").hash, before);
    let again = fx
        .hub
        .snapshot(
            &fx.ctx(),
            &fx.ctx().join("Dockerfile"),
            &[(vec!["src/".into()], vec![])],
        )
        .expect("snapshot");
    assert_ne!(again.tree.get("src/x.js").expect("x").hash, before);
    assert_ne!(again.fingerprints, snapshot.fingerprints);
    // The build that took the first snapshot finishes: the edit is still dirty.
    fx.hub.mark_built(&fx.ctx(), &snapshot.baseline);
    assert_eq!(labels(&fx.dirty())[0], "COPY src/ /app/src/");
    fx.hub.mark_built(&fx.ctx(), &again.baseline);
    assert!(fx.dirty().is_empty());
}

#[test]
fn an_atomic_save_names_the_saved_file_not_the_temp() {
    let fx = Fixture::new();
    fx.watch();
    let temp = fx.ctx().join("src/.x.js.tmp1234");
    fs::write(&temp, "x = 42").expect("temp");
    fx.hub.changed(std::slice::from_ref(&temp));
    fs::rename(&temp, fx.ctx().join("src/x.js")).expect("rename over");
    fx.hub.changed(&[temp, fx.ctx().join("src/x.js")]);
    assert!(
        fx.dirty().iter().all(|(_, cause)| cause == "src/x.js"),
        "{:?}",
        fx.dirty()
    );
}

/// A copy of the fixture's context in its current state, scanned cold.
fn cold_listing(fx: &Fixture) -> Vec<(String, [u8; 32])> {
    let snapshot = fx
        .hub
        .snapshot(&fx.ctx(), &fx.ctx().join("Dockerfile"), &[])
        .expect("snapshot");
    let hot: Vec<(String, [u8; 32])> = snapshot
        .tree
        .iter()
        .filter(|(_, e)| e.kind != crate::context::EntryKind::Dir)
        .map(|(p, e)| (p.to_owned(), e.hash))
        .collect();
    let rules =
        crate::context::ignore_rules(&fx.ctx(), &fx.ctx().join("Dockerfile")).expect("rules");
    let mut cache = StatCache::open(&fx.dir.path().join("cold.sqlite")).expect("cache");
    let (tree, _) = crate::context::scan(&fx.ctx(), &rules, &mut cache).expect("scan");
    let cold: Vec<(String, [u8; 32])> = tree
        .iter()
        .filter(|(_, e)| e.kind != crate::context::EntryKind::Dir)
        .map(|(p, e)| (p.to_owned(), e.hash))
        .collect();
    assert_eq!(hot, cold, "the hot tree equals a cold scan");
    hot
}

#[test]
fn a_replaced_root_is_rearmed_and_rescanned_with_or_without_its_event() {
    let fx = Fixture::new();
    fx.watch();
    let template = fx.dir.path().join("template");
    fs::create_dir_all(template.join("src")).expect("template");
    fs::write(template.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    fs::write(template.join("package.json"), "{\"v\":2}").expect("package.json");
    fs::write(template.join("src/y.js"), "y").expect("y");

    // Deleted and recreated, and the watcher reported the root's deletion.
    fs::remove_dir_all(fx.ctx()).expect("rm -rf");
    fx.hub.changed(&[fx.ctx()]);
    assert_eq!(
        fx.hub.reports()[0].degraded.as_deref(),
        Some("the context directory does not exist")
    );
    let gone = fx.hub.ensure_current(&fx.ctx()).expect_err("no context");
    assert!(matches!(gone, WatchError::ContextGone(_)), "{gone}");
    copy_dir(&template, &fx.ctx());
    let listing = cold_listing(&fx);
    assert!(listing.iter().any(|(p, _)| p == "src/y.js"), "{listing:?}");
    assert!(fx.hub.reports()[0].degraded.is_none());
    let watched = lock(&fx.backend.watched).clone();
    assert_eq!(
        watched.iter().filter(|(_, p)| *p == fx.ctx()).count(),
        1,
        "watched again, by one new watcher: {watched:?}"
    );

    // Swapped by a rename nobody reported: the identity check at build time finds it.
    let next = fx.dir.path().join("next");
    copy_dir(&template, &next);
    fs::write(next.join("src/z.js"), "z").expect("z");
    fs::rename(&next, fx.ctx().with_extension("new")).expect("stage");
    fs::rename(fx.ctx(), fx.dir.path().join("old")).expect("move away");
    fs::rename(fx.ctx().with_extension("new"), fx.ctx()).expect("swap in");
    let listing = cold_listing(&fx);
    assert!(listing.iter().any(|(p, _)| p == "src/z.js"), "{listing:?}");
    assert!(labels(&fx.dirty()).contains(&"COPY src/ /app/src/"));

    // Replaced by a symlink to another directory.
    let elsewhere = fx.dir.path().join("elsewhere");
    copy_dir(&template, &elsewhere);
    fs::write(elsewhere.join("package.json"), "{\"v\":3}").expect("v3");
    fs::remove_dir_all(fx.ctx()).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, fx.ctx()).expect("symlink");
    let listing = cold_listing(&fx);
    let package = listing
        .iter()
        .find(|(p, _)| p == "package.json")
        .expect("package");
    assert_eq!(package.1, *blake3::hash(b"{\"v\":3}").as_bytes());
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn baselines_round_trip_and_damaged_ones_read_as_never_built() {
    let fx = Fixture::new();
    fx.watch();
    let baseline = fx.build().baseline;
    let bytes = baseline.to_bytes();
    assert_eq!(Baseline::from_bytes(&bytes), Some(baseline));
    assert_eq!(Baseline::from_bytes(&bytes[..bytes.len() - 1]), None);
    assert_eq!(Baseline::from_bytes(b"garbage"), None);
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(Baseline::from_bytes(&longer), None);
}

#[test]
fn a_change_to_what_a_build_reads_names_its_workspace_and_nothing_else_does() {
    let fx = Fixture::new();
    fx.watch();
    assert_eq!(fx.edit("src/x.js", "x = 2").changed, [fx.ctx()]);
    // Already dirty, edited again: still a change a prebuild must follow.
    assert_eq!(fx.edit("src/x.js", "x = 3").changed, [fx.ctx()]);
    assert!(fx.edit("debug.log", "more noise").changed.is_empty());
    assert!(fx.edit("README.md", "unread").changed.is_empty());
    // The same content again changes no fingerprint.
    assert!(fx.edit("src/x.js", "x = 3").changed.is_empty());
    let dockerfile = DOCKERFILE.replace("[\"run\"]", "[\"serve\"]");
    assert_eq!(fx.edit("Dockerfile", &dockerfile).changed, [fx.ctx()]);
}

#[test]
fn prebuild_settings_and_the_build_to_repeat_survive_a_restart_and_a_rewatch() {
    let fx = Fixture::new();
    fx.watch();
    assert_eq!(
        fx.hub.prebuild_setting(&fx.ctx()),
        Some(PrebuildSetting::default())
    );
    let recipe = BuildRecipe {
        dockerfile: fx.ctx().join("Dockerfile"),
        build_args: vec![("V".into(), "1".into())],
        target: None,
        tags: vec!["app:dev".into()],
        host_network: true,
        source_date_epoch: None,
        uid: 0,
        gid: 0,
    };
    fx.hub.set_prebuild(&fx.ctx(), Some(true)).expect("on");
    fx.hub.remember_build(&fx.ctx(), &recipe);
    let expected = PrebuildSetting {
        enabled: Some(true),
        recipe: Some(recipe),
    };
    // Watching it again (e.g. `memobuild watch --prebuild` twice) keeps both.
    fx.hub
        .watch(&fx.ctx(), &fx.ctx().join("Dockerfile"))
        .expect("rewatch");
    assert_eq!(fx.hub.prebuild_setting(&fx.ctx()), Some(expected.clone()));
    let again = Hub::open(
        &Layout::new(fx.dir.path().join("root")),
        Box::new(ScriptedBackend::default()),
    )
    .expect("hub");
    again.restore();
    assert_eq!(again.prebuild_setting(&fx.ctx()), Some(expected));
    assert!(
        again
            .set_prebuild(&fx.dir.path().join("other"), Some(true))
            .is_err(),
        "only a watched workspace prebuilds"
    );
}
