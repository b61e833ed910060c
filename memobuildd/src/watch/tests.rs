//! The hub against real directories, with a scripted watcher backend.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Records what is watched; fails every watch with `fail` when set.
#[derive(Debug, Clone, Default)]
struct ScriptedBackend {
    watched: Arc<Mutex<Vec<PathBuf>>>,
    fail_with_limit: bool,
}

impl WatchBackend for ScriptedBackend {
    fn watch(&mut self, dir: &Path, _recursive: bool) -> Result<(), WatchError> {
        if self.fail_with_limit {
            return Err(WatchError::WatchLimit);
        }
        lock(&self.watched).push(dir.to_owned());
        Ok(())
    }

    fn unwatch(&mut self, dir: &Path) {
        lock(&self.watched).retain(|d| d != dir);
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

    fn watch(&self) -> WorkspaceReport {
        self.hub
            .watch(&self.ctx(), &self.ctx().join("Dockerfile"))
            .expect("watch")
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
    assert_eq!(*lock(&fx.backend.watched), [cookies, fx.ctx()]);

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
    let outcome = fx.hub.rescan();
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
