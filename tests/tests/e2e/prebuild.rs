//! Prebuild on save: after an edit settles, the daemon repeats the workspace's last build at
//! low priority, so the user's next build finds every step done; a newer edit cancels a
//! running prebuild; a user's build joins a running prebuild's steps; a failure shows in
//! `status` and `memobuild logs --prebuild`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memobuild_tests::bench::{Bench, executed, tail};
use memobuild_tests::{privileged, texts};
use serde_json::Value;

/// The workspace's `prebuild` entry of `memobuild status --json` (null while it is not
/// watched).
fn prebuild_status(bench: &Bench, ctx: &Path) -> Value {
    let output = bench.daemon.run_client(&["status", "--json"]);
    assert!(output.status.success(), "status: {:?}", texts(&output));
    let report: Value = serde_json::from_slice(&output.stdout).expect("status json");
    report["workspaces"]
        .as_array()
        .expect("workspaces")
        .iter()
        .find(|ws| ws["context"].as_str() == ctx.to_str())
        .map_or(Value::Null, |ws| ws["prebuild"].clone())
}

/// Polls status until `done` holds for the prebuild entry; fails after `limit`.
fn wait_for(bench: &Bench, ctx: &Path, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = prebuild_status(bench, ctx);
        if done(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "prebuild never got there; last status {last}\ndaemon log:\n{}",
        tail(&bench.daemon.log_text())
    );
}

fn is_ready(status: &Value) -> bool {
    status.get("Ready").is_some()
}

fn enable_prebuild(bench: &Bench, ctx: &Path) {
    let output = bench
        .daemon
        .client()
        .args(["watch", "--prebuild"])
        .arg(ctx)
        .output()
        .expect("memobuild watch");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "watch --prebuild: {stderr}");
    assert!(stdout.contains("prebuild: idle"), "{stdout}");
}

/// The JSON progress events of a build's stderr.
fn events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The runc containers of the daemon's root that exist now.
fn containers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("run/runc"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn file_in_image(bench: &Bench, ctx: &Path, path: &str) -> String {
    let out = bench.daemon.dir.path().join(format!("image-{path}.tar"));
    let dest = format!("type=tar,dest={}", out.display());
    let result = bench.build_ok(ctx, &["-t", "app:dev", "-o", &dest]);
    assert_eq!(executed(&result), 0, "{result}");
    let mut archive = tar::Archive::new(std::fs::File::open(&out).expect("tar"));
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").to_string_lossy() == path {
            let mut text = String::new();
            entry.read_to_string(&mut text).expect("read");
            return text;
        }
    }
    panic!("{path} is not in the image");
}

#[test]
fn after_an_edit_the_prebuild_leaves_nothing_for_the_next_build_to_do() {
    if !privileged("after_an_edit_the_prebuild_leaves_nothing_for_the_next_build_to_do") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "ready",
        &[
            (
                "Dockerfile",
                "FROM BASE\nCOPY src.txt /src.txt\nRUN cat /src.txt > /out.txt\nRUN echo second >> /out.txt\n",
            ),
            ("src.txt", "first\n"),
        ],
    );
    let first = bench.build_ok(&ctx, &["-t", "app:dev"]);
    assert_eq!(executed(&first), 3, "{first}");
    enable_prebuild(&bench, &ctx);
    assert_eq!(prebuild_status(&bench, &ctx), "Idle");

    std::fs::write(ctx.join("src.txt"), "edited\n").expect("edit");
    let ready = wait_for(&bench, &ctx, Duration::from_secs(60), is_ready);

    // The user's build: every step done already, answered in milliseconds.
    let mut times = Vec::new();
    let mut first_stderr = String::new();
    for attempt in 0..3 {
        let started = Instant::now();
        let output = bench.build(&ctx, &["-t", "app:dev"]);
        times.push(started.elapsed());
        let (_, stderr) = texts(&output);
        assert!(output.status.success(), "{stderr}");
        let result = events(&stderr)
            .into_iter()
            .find_map(|e| e.get("result").cloned())
            .expect("result");
        assert_eq!(executed(&result), 0, "{stderr}");
        assert_eq!(
            result["image_digest"], ready["Ready"]["digest"],
            "the prebuilt image"
        );
        if attempt == 0 {
            first_stderr = stderr;
        }
    }
    eprintln!("build after the prebuild, client wall time: {times:?}");
    let prebuilt: Vec<Value> = events(&first_stderr)
        .into_iter()
        .filter(|e| e["event"] == "prebuilt")
        .collect();
    assert_eq!(
        prebuilt.len(),
        3,
        "the COPY and both RUNs were prebuilt: {first_stderr}"
    );
    assert!(prebuilt.iter().all(|e| e["joined"] == false));
    let fastest = times.iter().min().expect("times");
    assert!(
        *fastest <= Duration::from_millis(50),
        "a build after a prebuild took {times:?}"
    );
    assert_eq!(file_in_image(&bench, &ctx, "out.txt"), "edited\nsecond\n");
    // The prebuild tagged what it built, as the build it repeats did.
    let images = bench.daemon.run_client(&["images"]);
    assert!(texts(&images).0.contains("app:dev"), "{:?}", texts(&images));
}

#[test]
fn an_edit_during_a_prebuild_cancels_it_and_the_image_has_the_latest_content() {
    if !privileged("an_edit_during_a_prebuild_cancels_it_and_the_image_has_the_latest_content") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "cancel",
        &[
            (
                "Dockerfile",
                "FROM BASE\nCOPY src.txt /src.txt\nRUN sleep 6 && cat /src.txt > /out.txt\n",
            ),
            ("src.txt", "one\n"),
        ],
    );
    bench.build_ok(&ctx, &["-t", "app:dev"]);
    enable_prebuild(&bench, &ctx);
    std::fs::write(ctx.join("src.txt"), "two\n").expect("edit");
    // The prebuild's RUN is running: its container exists.
    let deadline = Instant::now() + Duration::from_secs(30);
    let container = loop {
        if let Some(id) = containers(&bench.daemon.root).into_iter().next() {
            break id;
        }
        assert!(Instant::now() < deadline, "no prebuild container came");
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = prebuild_status(&bench, &ctx);
    assert!(status.get("Running").is_some(), "{status}");
    std::fs::write(ctx.join("src.txt"), "three\n").expect("second edit");
    let edited = Instant::now();
    // Gone long before its 6 s sleep could have ended by itself.
    while containers(&bench.daemon.root).contains(&container) {
        assert!(
            edited.elapsed() < Duration::from_secs(3),
            "the cancelled prebuild's container {container} is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("container gone {:?} after the edit", edited.elapsed());
    wait_for(&bench, &ctx, Duration::from_secs(60), is_ready);
    assert!(containers(&bench.daemon.root).is_empty());
    assert_eq!(file_in_image(&bench, &ctx, "out.txt"), "three\n");
    let log = bench.daemon.log_text();
    assert!(
        log.contains("a newer change cancels the running prebuild"),
        "{}",
        tail(&log)
    );
}

/// A plain HTTP server on 127.0.0.1 that counts the requests it answers: what a RUN that
/// calls it leaves outside any cache.
struct Counter {
    port: u16,
    hits: Arc<AtomicU64>,
}

impl Counter {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&hits);
        // Ends with the test process; it only answers on loopback.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        Self { port, hits }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

#[test]
fn a_build_during_a_prebuild_joins_its_steps_and_each_runs_once() {
    if !privileged("a_build_during_a_prebuild_joins_its_steps_and_each_runs_once") {
        return;
    }
    let bench = Bench::start();
    let counter = Counter::start();
    let dockerfile = format!(
        "FROM BASE\nCOPY src.txt /src.txt\nRUN wget -q -O /dev/null http://127.0.0.1:{}/ && sleep 4 && cat /src.txt > /out.txt\n",
        counter.port
    );
    let ctx = bench.context(
        "join",
        &[("Dockerfile", dockerfile.as_str()), ("src.txt", "a\n")],
    );
    bench.build_ok(&ctx, &["-t", "app:dev"]);
    assert_eq!(counter.hits(), 1);
    enable_prebuild(&bench, &ctx);
    std::fs::write(ctx.join("src.txt"), "b\n").expect("edit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.hits() < 2 {
        assert!(Instant::now() < deadline, "the prebuild's RUN never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let running = prebuild_status(&bench, &ctx);
    assert!(
        running["Running"]["step"]
            .as_str()
            .is_some_and(|s| s.contains("RUN wget")),
        "{running}"
    );
    // The user's build, with the same arguments, while the prebuild's RUN sleeps.
    let output = bench.build(&ctx, &["-t", "app:dev"]);
    let (_, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    let events = events(&stderr);
    let result = events
        .iter()
        .find_map(|e| e.get("result").cloned())
        .expect("result");
    assert_eq!(executed(&result), 0, "{stderr}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "prebuilt" && e["joined"] == true),
        "{stderr}"
    );
    assert_eq!(counter.hits(), 2, "the RUN ran once for both builds");
    wait_for(&bench, &ctx, Duration::from_secs(30), is_ready);
    assert_eq!(counter.hits(), 2);
    assert_eq!(file_in_image(&bench, &ctx, "out.txt"), "b\n");
}

#[test]
fn a_failing_prebuild_shows_in_status_with_its_log() {
    if !privileged("a_failing_prebuild_shows_in_status_with_its_log") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "fails",
        &[
            (
                "Dockerfile",
                "FROM BASE\nCOPY src.txt /src.txt\nRUN cut -d' ' -f19 /proc/self/stat && cat /src.txt && grep -q good /src.txt\n",
            ),
            ("src.txt", "good\n"),
        ],
    );
    bench.build_ok(&ctx, &["-t", "app:dev"]);
    enable_prebuild(&bench, &ctx);
    std::fs::write(ctx.join("src.txt"), "a bad line\n").expect("edit");
    let failed = wait_for(&bench, &ctx, Duration::from_secs(60), |s| {
        s.get("Failed").is_some()
    });
    let failed = &failed["Failed"];
    assert_eq!(failed["exit_code"], 1, "{failed}");
    assert!(
        failed["step"]
            .as_str()
            .is_some_and(|s| s.contains("RUN cut -d")),
        "{failed}"
    );
    assert!(
        failed["log_tail"]
            .as_array()
            .expect("tail")
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.ends_with("a bad line"))),
        "{failed}"
    );
    let status = bench.daemon.run_client(&["status"]);
    let (text, _) = texts(&status);
    assert!(
        text.contains("prebuild: failed at") && text.contains("exit code 1"),
        "{text}"
    );
    let logs = bench
        .daemon
        .client()
        .args(["logs", "--prebuild"])
        .arg(&ctx)
        .output()
        .expect("memobuild logs");
    let (log, stderr) = texts(&logs);
    assert!(logs.status.success(), "{stderr}");
    assert!(log.contains("a bad line") && log.contains("ERROR"), "{log}");
    // The prebuild's container ran at the lowest CPU priority (field 19 of stat: nice).
    assert!(log.lines().any(|l| l.ends_with(" 19")), "{log}");
    // Fixed: the next prebuild is ready.
    std::fs::write(ctx.join("src.txt"), "good again\n").expect("fix");
    wait_for(&bench, &ctx, Duration::from_secs(60), is_ready);
}

#[test]
fn prebuild_and_the_build_it_repeats_survive_a_restart() {
    if !privileged("prebuild_and_the_build_it_repeats_survive_a_restart") {
        return;
    }
    let mut bench = Bench::start();
    let ctx: PathBuf = bench.context(
        "restart",
        &[
            (
                "Dockerfile",
                "FROM BASE\nARG GREETING\nCOPY src.txt /src.txt\nRUN echo $GREETING > /greeting.txt\n",
            ),
            ("src.txt", "1\n"),
        ],
    );
    bench.build_ok(&ctx, &["-t", "app:dev", "--build-arg", "GREETING=hi"]);
    enable_prebuild(&bench, &ctx);
    bench.daemon.terminate();
    bench.daemon.launch(|_| {}).expect("restart");
    wait_for(&bench, &ctx, Duration::from_secs(30), |s| s == "Idle");
    std::fs::write(ctx.join("src.txt"), "2\n").expect("edit");
    wait_for(&bench, &ctx, Duration::from_secs(60), is_ready);
    // The prebuild repeated the build argument: the user's build finds everything done.
    let result = bench.build_ok(&ctx, &["-t", "app:dev", "--build-arg", "GREETING=hi"]);
    assert_eq!(executed(&result), 0, "{result}");
    let off = bench
        .daemon
        .client()
        .args(["watch", "--no-prebuild"])
        .arg(&ctx)
        .output()
        .expect("watch --no-prebuild");
    assert!(texts(&off).0.contains("prebuild: off"), "{:?}", texts(&off));
}
