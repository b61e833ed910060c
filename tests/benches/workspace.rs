//! Workspace fingerprints and the hot watcher, in one run:
//!
//! 1. cold fingerprint of a 50,000-file / ~1 GB context (empty stat cache) vs `b3sum`;
//! 2. `status` of the daemon with that workspace watched and nothing changed: the request
//!    alone, and the whole `memobuild status` process;
//! 3. time from a one-file edit to the dirty mark being visible in `status`;
//! 4. the daemon's resident memory with the workspace watched;
//! 5. builds on that workspace: a no-op rebuild (the whole `memobuild build` process) and a
//!    one-file edit under a `COPY` of one source directory followed by a cheap RUN.
//!
//! Run with `bash bench/workspace.sh` (builds release binaries first).
//! Arguments after `--`: [FILES] [TOTAL_MB] (default 50000 1000).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memobuild_protocol::{Request, Response};
use memobuild_tests::{TestDaemon, workload};
use memobuildd::context::{IgnoreRules, StatCache, scan};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let files: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let total_mb: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let base = std::env::temp_dir().join(format!("memobuild-bench-{files}"));
    let ctx = base.join("ctx");
    std::fs::create_dir_all(&base).expect("bench dir");
    let list = workload::generate_context(&ctx, files, total_mb << 20);
    // A shell for the RUN step; b3sum's list leaves it out (2 MB beside ~1 GB).
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox-static");
    std::fs::write(
        ctx.with_extension("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY d07/ /src/d07/\nRUN [\"/bin/busybox\", \"true\"]\n",
    )
    .expect("Dockerfile");

    println!("workspace: {files} files, ~{total_mb} MB; medians of 5 after a warm-up");
    let cold = median(5, || {
        let db = tempfile::tempdir().expect("tempdir");
        let mut cache = StatCache::open(&db.path().join("c.sqlite")).expect("cache");
        let started = Instant::now();
        let (_, report) = scan(&ctx, &IgnoreRules::default(), &mut cache).expect("scan");
        assert_eq!(report.files as usize, files + 1);
        started.elapsed()
    });
    let b3sum = median(5, || {
        let started = Instant::now();
        let status = Command::new("xargs")
            .args(["-0", "-n", "5000", "b3sum", "--no-names"])
            .stdin(std::fs::File::open(&list).expect("list"))
            .stdout(Stdio::null())
            .status()
            .expect("xargs b3sum (apt-get install b3sum)");
        assert!(status.success());
        started.elapsed()
    });
    row("cold fingerprint (memobuild)", cold, "");
    row("b3sum over the same files", b3sum, "");
    println!(
        "  {:<44} {:>9.2}   (target <= 1.25)",
        "ratio memobuild/b3sum",
        ms(cold) / ms(b3sum)
    );

    let daemon = TestDaemon::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dockerfile = ctx.with_extension("Dockerfile");
    let watch = daemon
        .client()
        .args(["watch", ctx.to_str().expect("utf-8"), "-f"])
        .arg(&dockerfile)
        .output()
        .expect("watch");
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );

    let mut conn = runtime.block_on(daemon.connect());
    let mut status = || match runtime
        .block_on(conn.call(&Request::Status))
        .expect("status")
    {
        Response::Status(report) => report,
        other => panic!("unexpected {other:?}"),
    };
    let warm = median(50, || {
        let started = Instant::now();
        std::hint::black_box(status());
        started.elapsed()
    });
    row(
        "warm status request, nothing changed",
        warm,
        "(target <= 5 ms)",
    );
    let client = median(20, || {
        let started = Instant::now();
        let out = daemon.client().arg("status").output().expect("status");
        assert!(out.status.success());
        started.elapsed()
    });
    row("`memobuild status` process, nothing changed", client, "");

    let edited = ctx.join("d07/s001/f57.dat");
    let original = std::fs::read(&edited).expect("read");
    let mut flip = 0u8;
    let latency = median(5, || {
        flip ^= 1;
        let mut content = original.clone();
        if flip == 1 {
            content.push(b'!');
        }
        let want_dirty = flip == 1;
        let started = Instant::now();
        std::fs::write(&edited, &content).expect("edit");
        loop {
            let dirty = !status().workspaces[0].dirty.is_empty();
            if dirty == want_dirty {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "dirty mark never came"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    std::fs::write(&edited, &original).expect("restore");
    row(
        "one-file edit -> dirty mark in status",
        latency,
        "(target <= 50 ms + 50 ms debounce)",
    );

    let rss_kib = rss_kib(daemon.pid());
    println!(
        "  {:<44} {:>9.1} MB (target <= 60 MB)",
        "daemon RSS with the workspace watched",
        rss_kib as f64 / 1024.0
    );

    let build = || {
        let started = Instant::now();
        let out = daemon
            .client()
            .args(["build", "--progress", "quiet", "-f"])
            .arg(&dockerfile)
            .arg(&ctx)
            .output()
            .expect("build");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };
    row("first build (COPY + RUN, nothing cached)", build(), "");
    row(
        "no-op rebuild, `memobuild build` process",
        median(10, build),
        "(target <= 15 ms)",
    );
    // Every edit is new content: going back to an earlier one would rightly be a cache hit.
    let mut edits = 0u64;
    let edit_build = median(5, || {
        edits += 1;
        let mut content = original.clone();
        content.extend_from_slice(format!("edit {edits} {}", unique_suffix()).as_bytes());
        std::fs::write(&edited, &content).expect("edit");
        build()
    });
    std::fs::write(&edited, &original).expect("restore");
    row(
        "one-file edit under COPY d07/ (1,000 files) + RUN",
        edit_build,
        "(target <= 1 s)",
    );
}

/// Differs between runs of the bench, so no run finds another's edits in the cache.
fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn row(what: &str, d: Duration, note: &str) {
    println!("  {what:<44} {:>9.2} ms {note}", ms(d));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    f();
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2]
}
