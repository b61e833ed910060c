//! Early cutoff and "why did this step run": a step that runs again and writes the same files
//! leaves everything after it cached, and every step that runs says why.

use memobuild_tests::bench::{Bench, executed, tail};
use memobuild_tests::{privileged, texts};

/// `(name, reason)` of every step the build ran, from its JSON progress.
fn reasons(stderr: &str) -> Vec<(String, String)> {
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let name = |node: &serde_json::Value| {
        events
            .iter()
            .find(|e| e["event"] == "queued" && e["node"] == *node)
            .and_then(|e| e["name"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    events
        .iter()
        .filter(|e| e["event"] == "reason")
        .map(|e| {
            let reason = e["reason"].as_str().unwrap_or("").to_owned();
            (name(&e["node"]), reason)
        })
        .collect()
}

fn build(bench: &Bench, ctx: &std::path::Path, args: &[&str]) -> (serde_json::Value, String) {
    let output = bench.build(ctx, args);
    let (_, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "build failed: {stderr}\n{}",
        tail(&bench.daemon.log_text())
    );
    let result = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("result").cloned())
        .expect("a result line");
    (result, stderr)
}

const UNUSED_ARG: &str = "\
FROM BASE AS build
ARG UNUSED
COPY src.txt /src.txt
RUN cp /src.txt /out.txt
RUN echo done > /done.txt
COPY later.txt /later.txt

FROM BASE
COPY --from=build /out.txt /app/out.txt
RUN cat /app/out.txt > /app/copy.txt
";

#[test]
fn a_build_arg_no_command_uses_reruns_only_the_runs_that_see_it() {
    if !privileged("a_build_arg_no_command_uses_reruns_only_the_runs_that_see_it") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "unused",
        &[
            ("Dockerfile", UNUSED_ARG),
            ("src.txt", "source\n"),
            ("later.txt", "later\n"),
        ],
    );
    let (first, _) = build(&bench, &ctx, &["--build-arg", "UNUSED=1"]);
    assert_eq!(executed(&first), 6, "{first}");
    let (second, stderr) = build(&bench, &ctx, &["--build-arg", "UNUSED=2"]);
    let ran = reasons(&stderr);
    assert_eq!(
        ran,
        [
            (
                "[build 3/5] RUN cp /src.txt /out.txt".to_owned(),
                "build-arg UNUSED changed".to_owned()
            ),
            (
                "[build 4/5] RUN echo done > /done.txt".to_owned(),
                "build-arg UNUSED changed".to_owned()
            ),
        ],
        "exactly the RUNs after the ARG, and nothing in the next stage"
    );
    assert_eq!(executed(&second), 2, "{second}");
    // The image is the same, but for the rerun layers' timestamps.
    let (third, stderr) = build(&bench, &ctx, &["--build-arg", "UNUSED=2"]);
    assert_eq!(executed(&third), 0, "{stderr}");
}

#[test]
fn a_run_that_writes_the_same_files_again_leaves_the_next_steps_cached() {
    if !privileged("a_run_that_writes_the_same_files_again_leaves_the_next_steps_cached") {
        return;
    }
    let bench = Bench::start();
    let dockerfile = "FROM BASE\nARG STAMP\nRUN echo same > /same.txt\nCOPY after.txt /after.txt\nRUN cat /after.txt > /copy.txt\n";
    let ctx = bench.context(
        "same-output",
        &[("Dockerfile", dockerfile), ("after.txt", "after\n")],
    );
    let (first, _) = build(&bench, &ctx, &["--build-arg", "STAMP=1"]);
    // Tar mtimes have whole seconds: make sure the rerun writes /same.txt at another one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let output = bench
        .daemon
        .client()
        .args(["build", "--progress", "plain", "--build-arg", "STAMP=2"])
        .arg(&ctx)
        .output()
        .expect("memobuild build");
    let (_, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    let rebuilt: Vec<&str> = stderr.lines().filter(|l| l.contains(" REBUILD ")).collect();
    // Both RUNs see STAMP; the COPY between them does not, and its parent (the first RUN's
    // files, timestamps aside) is the same: it stays cached.
    assert_eq!(rebuilt.len(), 2, "{stderr}");
    assert!(
        rebuilt
            .iter()
            .all(|l| l.ends_with("REBUILD build-arg STAMP changed")),
        "{rebuilt:?}"
    );
    assert!(
        stderr.contains("COPY after.txt /after.txt\n#4 CACHED")
            || stderr
                .lines()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0].ends_with("COPY after.txt /after.txt") && w[1].ends_with("CACHED")),
        "{stderr}"
    );
    let digest = |stderr: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix("built "))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
    };
    assert_ne!(
        first["image_digest"].as_str().map(str::to_owned),
        digest(&stderr),
        "the rerun RUN's layer has new timestamps, so the image is another"
    );
}
