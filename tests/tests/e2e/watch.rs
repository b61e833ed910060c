//! Watched workspaces through the real daemon and the real inotify watcher.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memobuild_tests::{TestDaemon, texts};

const DOCKERFILE: &str = "\
FROM scratch
COPY package.json /app/
COPY src/ /app/src/
CMD [\"run\"]
";

fn workspace(daemon: &TestDaemon) -> PathBuf {
    let ctx = daemon.dir.path().join("ws");
    std::fs::create_dir_all(ctx.join("src")).expect("src");
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    std::fs::write(ctx.join(".dockerignore"), "*.log\n").expect("ignore");
    std::fs::write(ctx.join("package.json"), "{}").expect("package.json");
    std::fs::write(ctx.join("src/x.js"), "x = 1").expect("x");
    ctx
}

fn run_ok(daemon: &TestDaemon, args: &[&str]) -> String {
    let output = daemon.run_client(args);
    let (stdout, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "{args:?}: {stderr}\n{}",
        daemon.log_text()
    );
    stdout
}

fn workspaces(daemon: &TestDaemon) -> Vec<serde_json::Value> {
    let status: serde_json::Value =
        serde_json::from_str(&run_ok(daemon, &["status", "--json"])).expect("json");
    status["workspaces"].as_array().expect("workspaces").clone()
}

fn dirty_labels(workspace: &serde_json::Value) -> Vec<String> {
    workspace["dirty"]
        .as_array()
        .expect("dirty")
        .iter()
        .map(|d| d["node"].as_str().expect("node").to_owned())
        .collect()
}

/// Polls status until `done` holds for the first workspace (bounded).
fn wait_for(
    daemon: &TestDaemon,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ws) = workspaces(daemon).first()
            && done(ws)
        {
            return ws.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

#[test]
fn an_edit_under_src_marks_the_src_copy_and_what_follows() {
    let daemon = TestDaemon::start();
    let ctx = workspace(&daemon);
    let watched = run_ok(&daemon, &["watch", path_arg(&ctx), "--json"]);
    let watched: serde_json::Value = serde_json::from_str(&watched).expect("json");
    assert_eq!(watched["files"], 4);
    assert_eq!(watched["watching"], true);
    assert_eq!(watched["built"], false);
    let human = run_ok(&daemon, &["status"]);
    assert!(human.contains("never built"), "{human}");
    run_ok(&daemon, &["build", path_arg(&ctx), "--progress", "quiet"]);
    let human = run_ok(&daemon, &["status"]);
    assert!(
        human.contains("clean: nothing changed since the last build"),
        "{human}"
    );

    std::fs::write(ctx.join("src/x.js"), "x = 2").expect("edit");
    let ws = wait_for(&daemon, "the watcher to mark src dirty", |ws| {
        !dirty_labels(ws).is_empty()
    });
    assert_eq!(dirty_labels(&ws), ["COPY src/ /app/src/", "CMD run"]);
    assert!(
        ws["dirty"]
            .as_array()
            .expect("dirty")
            .iter()
            .all(|d| d["cause"] == "src/x.js")
    );

    // An ignored file: the editor hook reports it, nothing new is dirty.
    std::fs::write(ctx.join("trace.log"), "noise").expect("log");
    let notified = run_ok(
        &daemon,
        &["notify", path_arg(&ctx.join("trace.log")), "--json"],
    );
    let notified: serde_json::Value = serde_json::from_str(&notified).expect("json");
    assert_eq!(notified["matched"], 1);
    assert_eq!(notified["dirtied"], 0);
    assert_eq!(dirty_labels(&workspaces(&daemon)[0]).len(), 2);

    // Human status names the cause.
    let human = run_ok(&daemon, &["status"]);
    assert!(
        human.contains("dirty: COPY src/ /app/src/  (changed: src/x.js)"),
        "{human}"
    );
}

#[test]
fn a_same_size_edit_with_the_mtime_put_back_is_seen() {
    let daemon = TestDaemon::start();
    let ctx = workspace(&daemon);
    std::thread::sleep(Duration::from_millis(150));
    run_ok(&daemon, &["build", path_arg(&ctx), "--progress", "quiet"]);
    let file = ctx.join("package.json");
    let mtime = std::fs::metadata(&file)
        .expect("meta")
        .modified()
        .expect("mtime");
    std::fs::write(&file, "[]").expect("same size");
    std::fs::File::options()
        .write(true)
        .open(&file)
        .expect("open")
        .set_modified(mtime)
        .expect("touch -r");
    // Whichever sees it first, the watcher or the editor hook, must re-hash the file.
    let notified = run_ok(&daemon, &["notify", path_arg(&file), "--json"]);
    let notified: serde_json::Value = serde_json::from_str(&notified).expect("json");
    assert_eq!(notified["matched"], 1, "{notified}");
    assert_eq!(
        dirty_labels(&workspaces(&daemon)[0])[0],
        "COPY package.json /app/"
    );
}

#[test]
fn a_restarted_daemon_restores_workspaces_and_rehashes_nothing() {
    let place = TestDaemon::unstarted();
    let ctx = workspace(&place);
    std::thread::sleep(Duration::from_millis(150));
    let watched = run_ok(&place, &["watch", path_arg(&ctx), "--json"]);
    let watched: serde_json::Value = serde_json::from_str(&watched).expect("json");
    assert_eq!(watched["hashed_files"], 4);
    run_ok(&place, &["daemon", "stop"]);

    // The next command starts a fresh daemon on the same root.
    let ws = wait_for(&place, "the workspace to be restored", |_| true);
    assert_eq!(ws["context"], path_arg(&ctx));
    assert_eq!(ws["hashed_files"], 0, "{ws}");
    assert_eq!(ws["files"], 4);
    run_ok(&place, &["unwatch", path_arg(&ctx)]);
    assert!(workspaces(&place).is_empty());
    run_ok(&place, &["daemon", "stop"]);
}

#[test]
fn watching_a_broken_dockerfile_is_refused_with_its_position() {
    let daemon = TestDaemon::start();
    let ctx = workspace(&daemon);
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY\n").expect("broken");
    let output = daemon.run_client(&["watch", path_arg(&ctx)]);
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Dockerfile:2:"), "{stderr}");
    assert!(workspaces(&daemon).is_empty());
}

#[test]
fn a_built_context_stays_watched_unless_configured_otherwise() {
    let daemon = TestDaemon::start();
    let ctx = workspace(&daemon);
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY package.json /\n",
    )
    .expect("df");
    run_ok(&daemon, &["build", path_arg(&ctx), "--progress", "quiet"]);
    assert_eq!(
        workspaces(&daemon).len(),
        1,
        "watched from the first build on"
    );

    let config = daemon.dir.path().join("no-watch.toml");
    std::fs::write(&config, "watch_built_contexts = false\n").expect("config");
    let other = TestDaemon::start_with(|cmd| {
        cmd.arg("--config").arg(&config);
    });
    let ctx = workspace(&other);
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY package.json /\n",
    )
    .expect("df");
    run_ok(&other, &["build", path_arg(&ctx), "--progress", "quiet"]);
    assert!(workspaces(&other).is_empty());
}
