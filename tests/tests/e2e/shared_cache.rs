//! Two daemons sharing work through L3, end to end: daemon A builds and stops (flushing its
//! uploads), daemon B on a fresh root builds the same context copied elsewhere and executes
//! nothing — against BuildGrid (REAPI), nginx (Bazel HTTP) and our own `serve-cache`. Also:
//! a corrupted blob on the server, an entry signed with another secret, the server killed
//! mid-build, read-only and `--no-cache` builds, and a 200 MB layer through ByteStream.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use memobuild_tests::bench::tail;
use memobuild_tests::buildgrid::TestBuildGrid;
use memobuild_tests::cacheserver::TestCacheServer;
use memobuild_tests::nginx::TestNginx;
use memobuild_tests::registry::TestRegistry;
use memobuild_tests::{TestDaemon, privileged, texts};
use memobuildd::store::Digest;

const EPOCH: &str = "1700000000";

const DOCKERFILE: &str = "\
FROM BASE
COPY app/ /app/
RUN cat /app/a.txt /app/b.txt > /app/joined.txt && echo built >> /app/joined.txt
WORKDIR /work
RUN ls -l /app > /work/listing.txt
COPY late.txt /work/late.txt
CMD [\"cat\", \"/app/joined.txt\"]
";

/// A remote cache server the daemons point at.
enum Remote {
    BuildGrid(TestBuildGrid),
    Nginx(TestNginx),
    Ours(TestCacheServer),
}

impl Remote {
    fn url(&self) -> String {
        match self {
            Self::BuildGrid(server) => server.url("team"),
            Self::Nginx(server) => server.url(),
            Self::Ours(server) => format!("grpc://{}", server.addr),
        }
    }

    /// Where the server keeps a blob, for the servers whose disk layout the tests know.
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        match self {
            Self::BuildGrid(server) => server.blob_path(digest),
            Self::Nginx(server) => server.blob_path(digest),
            Self::Ours(_) => unreachable!("not used with serve-cache"),
        }
    }

    fn kill(&mut self) {
        match self {
            Self::BuildGrid(server) => server.kill(),
            Self::Nginx(server) => server.kill(),
            Self::Ours(server) => server.kill(),
        }
    }
}

/// One registry (busybox) shared by the daemons, as a team's registry is.
struct Team {
    /// Serves the base image for as long as the team exists.
    _registry: TestRegistry,
    base: String,
    places: tempfile::TempDir,
}

impl Team {
    fn new() -> Self {
        let registry = TestRegistry::start();
        registry.seed_busybox("busybox");
        let base = format!("{}/busybox", registry.address());
        Self {
            _registry: registry,
            base,
            places: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A daemon on a fresh root using `url` as its remote cache, with `env` besides.
    fn daemon(&self, url: &str, env: &[(&str, &str)]) -> TestDaemon {
        TestDaemon::start_with(|command| {
            command.env("MEMOBUILD_REMOTE_URL", url);
            for (key, value) in env {
                command.env(key, value);
            }
        })
    }

    /// The test context under `name` (another path per machine), with `extra` files added.
    fn context(&self, name: &str, extra: &[(&str, &[u8])]) -> PathBuf {
        let ctx = self.places.path().join(name);
        let files: [(&str, &[u8]); 4] = [
            ("Dockerfile", DOCKERFILE.as_bytes()),
            ("app/a.txt", b"alpha\n"),
            ("app/b.txt", b"beta\n"),
            ("late.txt", b"late\n"),
        ];
        for (path, content) in files.iter().chain(extra) {
            let file = ctx.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            let content = String::from_utf8_lossy(content).replace("BASE", &self.base);
            std::fs::write(file, content).expect("write");
        }
        ctx
    }
}

/// The result record and the warnings of a build that must succeed.
fn build(daemon: &TestDaemon, ctx: &Path, args: &[&str]) -> (serde_json::Value, Vec<String>) {
    let output = daemon
        .client()
        .args(["build", "--progress", "json", "--source-date-epoch", EPOCH])
        .arg(ctx)
        .args(args)
        .output()
        .expect("run memobuild build");
    outcome(daemon, &output)
}

fn outcome(daemon: &TestDaemon, output: &Output) -> (serde_json::Value, Vec<String>) {
    let (_, stderr) = texts(output);
    assert!(
        output.status.success(),
        "build failed: {stderr}\ndaemon log:\n{}",
        tail(&daemon.log_text())
    );
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let result = events
        .iter()
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| panic!("no result line in: {stderr}"));
    let warnings = events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap_or("").to_owned())
        .collect();
    (result, warnings)
}

fn executed(result: &serde_json::Value) -> u64 {
    result["executed"].as_u64().expect("executed")
}

fn digest(result: &serde_json::Value) -> String {
    result["image_digest"]
        .as_str()
        .expect("image digest")
        .to_owned()
}

/// `memobuild status --json`'s remote section.
fn remote_status(daemon: &TestDaemon) -> serde_json::Value {
    let output = daemon.run_client(&["status", "--json"]);
    assert!(output.status.success(), "{:?}", texts(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    status["remote"].clone()
}

/// Stops a daemon as `memobuild daemon stop` does (its uploads flushed first).
fn stop(daemon: &mut TestDaemon) {
    let output = daemon.run_client(&["daemon", "stop"]);
    assert!(output.status.success(), "{:?}", texts(&output));
}

/// A builds, stops; B (fresh root, context elsewhere) builds the same with 0 steps run and
/// the same image; `--no-cache` on a third daemon never asks the remote.
fn two_daemons_share(remote: &Remote) {
    let team = Team::new();
    let url = remote.url();
    let mut a = team.daemon(&url, &[("MEMOBUILD_CACHE_SECRET", "team")]);
    let (first, warnings) = build(&a, &team.context("machine-a/src", &[]), &[]);
    assert!(executed(&first) >= 4, "{first}");
    assert_eq!(warnings, Vec::<String>::new());
    // Stopped at once: what A's build queued is flushed by the stop, or B would run it.
    stop(&mut a);

    let b = team.daemon(&url, &[("MEMOBUILD_CACHE_SECRET", "team")]);
    let (second, warnings) = build(&b, &team.context("elsewhere/b/ctx", &[]), &[]);
    assert_eq!(executed(&second), 0, "{second}\n{}", tail(&b.log_text()));
    assert_eq!(digest(&second), digest(&first), "the same image");
    assert_eq!(warnings, Vec::<String>::new());
    let status = remote_status(&b);
    assert_eq!(status["endpoint"], url.as_str());
    assert_eq!(status["healthy"], true);
    assert!(status["hits"].as_u64() >= Some(4), "{status}");
    assert!(status["bytes_down"].as_u64() > Some(0), "{status}");
    assert_eq!(
        status["bytes_up"], 0,
        "nothing ran, nothing to upload: {status}"
    );

    let c = team.daemon(&url, &[("MEMOBUILD_CACHE_SECRET", "team")]);
    let (third, _) = build(&c, &team.context("machine-c", &[]), &["--no-cache"]);
    assert_eq!(executed(&third), executed(&first), "{third}");
    let status = remote_status(&c);
    assert_eq!(
        (status["hits"].as_u64(), status["misses"].as_u64()),
        (Some(0), Some(0)),
        "--no-cache never reads L3: {status}"
    );
}

#[test]
fn two_daemons_share_through_buildgrid() {
    let test = "shared_cache::two_daemons_share_through_buildgrid";
    if !privileged(test) {
        return;
    }
    if let Some(server) = TestBuildGrid::start(test) {
        two_daemons_share(&Remote::BuildGrid(server));
    }
}

#[test]
fn two_daemons_share_through_nginx() {
    let test = "shared_cache::two_daemons_share_through_nginx";
    if !privileged(test) {
        return;
    }
    if let Some(server) = TestNginx::start(test) {
        two_daemons_share(&Remote::Nginx(server));
    }
}

#[test]
fn two_daemons_share_through_serve_cache() {
    if !privileged("shared_cache::two_daemons_share_through_serve_cache") {
        return;
    }
    two_daemons_share(&Remote::Ours(TestCacheServer::start(&[])));
}

/// Digests of the blobs A's store and the server both hold: the layers A uploaded.
fn uploaded_layers(a: &TestDaemon, remote: &Remote) -> Vec<Digest> {
    let mut found = Vec::new();
    let cas = a.root.join("cas-v1/sha256");
    for shard in std::fs::read_dir(&cas).expect("cas").flatten() {
        for blob in std::fs::read_dir(shard.path()).expect("shard").flatten() {
            let name = blob.file_name().to_string_lossy().into_owned();
            let digest = Digest::parse(&format!("sha256:{name}")).expect("blob name");
            if remote.blob_path(&digest).is_file() {
                found.push(digest);
            }
        }
    }
    found
}

#[test]
fn a_blob_corrupted_on_the_server_is_detected_and_the_step_runs() {
    let test = "shared_cache::a_blob_corrupted_on_the_server_is_detected_and_the_step_runs";
    if !privileged(test) {
        return;
    }
    let Some(server) = TestBuildGrid::start(test) else {
        return;
    };
    let remote = Remote::BuildGrid(server);
    let team = Team::new();
    let mut a = team.daemon(&remote.url(), &[]);
    let (first, _) = build(&a, &team.context("a", &[]), &[]);
    stop(&mut a);
    let layers = uploaded_layers(&a, &remote);
    assert!(layers.len() >= 3, "A uploaded its layers: {layers:?}");
    for digest in &layers {
        let path = remote.blob_path(digest);
        let mut bytes = std::fs::read(&path).expect("blob");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&path, bytes).expect("corrupt");
    }

    let b = team.daemon(&remote.url(), &[]);
    let (second, warnings) = build(&b, &team.context("b", &[]), &[]);
    assert_eq!(
        executed(&second),
        executed(&first),
        "every corrupt step ran"
    );
    assert!(
        warnings.iter().any(|w| w.contains("arrived as")),
        "{warnings:?}"
    );
    let status = remote_status(&b);
    assert!(status["corrupt_blobs"].as_u64() >= Some(1), "{status}");
}

#[test]
fn an_entry_signed_with_another_secret_is_not_used() {
    let test = "shared_cache::an_entry_signed_with_another_secret_is_not_used";
    if !privileged(test) {
        return;
    }
    let Some(server) = TestNginx::start(test) else {
        return;
    };
    let remote = Remote::Nginx(server);
    let team = Team::new();
    let mut a = team.daemon(&remote.url(), &[("MEMOBUILD_CACHE_SECRET", "their secret")]);
    let (first, _) = build(&a, &team.context("a", &[]), &[]);
    stop(&mut a);

    let b = team.daemon(&remote.url(), &[("MEMOBUILD_CACHE_SECRET", "our secret")]);
    let (second, warnings) = build(&b, &team.context("b", &[]), &[]);
    assert_eq!(
        executed(&second),
        executed(&first),
        "nothing of theirs used"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not signed with this daemon's secret")),
        "{warnings:?}"
    );
    let status = remote_status(&b);
    assert!(status["bad_signatures"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["hits"], 0, "{status}");
}

#[test]
fn the_remote_killed_mid_build_costs_one_warning_not_the_build() {
    let test = "shared_cache::the_remote_killed_mid_build_costs_one_warning_not_the_build";
    if !privileged(test) {
        return;
    }
    let Some(server) = TestNginx::start(test) else {
        return;
    };
    let mut remote = Remote::Nginx(server);
    let team = Team::new();
    let ctx = team.context(
        "slow",
        &[(
            "Dockerfile",
            b"FROM BASE\nRUN sleep 3 && echo one > /one\nRUN echo two > /two\n\
              RUN echo three > /three\nRUN echo four > /four\nRUN echo five > /five\n",
        )],
    );
    let daemon = team.daemon(&remote.url(), &[]);
    let child = daemon
        .client()
        .args(["build", "--progress", "json", "--source-date-epoch", EPOCH])
        .arg(&ctx)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("build");
    std::thread::sleep(Duration::from_millis(1500));
    remote.kill();
    let started = Instant::now();
    let output = child.wait_with_output().expect("build ends");
    let (result, warnings) = outcome(&daemon, &output);
    assert_eq!(executed(&result), 5, "{result}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let unavailable: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("unavailable"))
        .collect();
    assert_eq!(unavailable.len(), 1, "one warning: {warnings:?}");
    let status = remote_status(&daemon);
    assert_eq!(status["healthy"], false, "{status}");
}

#[test]
fn read_only_builds_upload_nothing() {
    let test = "shared_cache::read_only_builds_upload_nothing";
    if !privileged(test) {
        return;
    }
    let Some(server) = TestNginx::start(test) else {
        return;
    };
    let stored = server.dir.path().join("www/cache");
    let remote = Remote::Nginx(server);
    let team = Team::new();
    let mut by_flag = team.daemon(&remote.url(), &[]);
    let (first, _) = build(
        &by_flag,
        &team.context("flag", &[]),
        &["--remote-cache", "read-only"],
    );
    assert!(executed(&first) >= 4);
    stop(&mut by_flag);
    let mut by_config = team.daemon(
        &remote.url(),
        &[("MEMOBUILD_REMOTE_CACHE_MODE", "read-only")],
    );
    build(&by_config, &team.context("config", &[]), &[]);
    assert_eq!(remote_status(&by_config)["mode"], "ReadOnly");
    stop(&mut by_config);
    assert_eq!(files_under(&stored), 0, "nothing uploaded");
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

/// The log lines about the remote cache and its requests.
fn remote_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("l3_") || l.contains("remote") || l.contains("upload"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Resident memory of a process now (KiB); anonymous and file-backed pages alike.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A file of `len` bytes that compress poorly.
fn noise(path: &Path, len: usize) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..len / piece.len() {
        for byte in piece.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        out.write_all(&piece).expect("write");
    }
}

#[test]
fn a_200_mb_layer_goes_through_bytestream_in_bounded_memory() {
    let test = "shared_cache::a_200_mb_layer_goes_through_bytestream_in_bounded_memory";
    if !privileged(test) {
        return;
    }
    if let Some(server) = TestBuildGrid::start(test) {
        big_layer(&Remote::BuildGrid(server));
    }
}

#[test]
fn a_200_mb_layer_goes_through_serve_caches_bytestream_in_bounded_memory() {
    if !privileged(
        "shared_cache::a_200_mb_layer_goes_through_serve_caches_bytestream_in_bounded_memory",
    ) {
        return;
    }
    big_layer(&Remote::Ours(TestCacheServer::start(&[])));
}

/// A builds a 200 MB COPY layer and uploads it; B restores it: bounded memory, and the
/// time each way (printed for the note).
fn big_layer(remote: &Remote) {
    let team = Team::new();
    let dockerfile: &[u8] = b"FROM BASE\nCOPY big.bin /big.bin\nRUN ls -l /big.bin > /size.txt\n";
    let a_ctx = team.context("big-a", &[("Dockerfile", dockerfile)]);
    noise(&a_ctx.join("big.bin"), 200 << 20);
    let mut a = team.daemon(&remote.url(), &[]);
    let (first, _) = build(&a, &a_ctx, &[]);
    // Longer than a stop's grace here (BuildGrid takes 200 MB at tens of MB/s): wait for it.
    let started = Instant::now();
    while remote_status(&a)["upload_queue"] != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "upload never ended"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = remote_status(&a);
    eprintln!(
        "200 MB upload to {}: {:.1}s after the build, {status}",
        remote.url(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status["uploads_done"], 2, "{status}");
    stop(&mut a);

    let b_ctx = team.context("big-b", &[("Dockerfile", dockerfile)]);
    std::fs::copy(a_ctx.join("big.bin"), b_ctx.join("big.bin")).expect("copy");
    let b = team.daemon(&remote.url(), &[]);
    // Hash the context first (a watch), so what is measured is the restore alone.
    let watched = b.run_client(&["watch", b_ctx.to_str().expect("utf-8")]);
    assert!(watched.status.success(), "{:?}", texts(&watched));
    let rss_before = rss(b.pid());
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (std::sync::Arc::clone(&sampling), b.pid());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let (second, _) = build(&b, &b_ctx, &[]);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    assert_eq!(
        executed(&second),
        0,
        "{second}\nA:\n{}\nB:\n{}",
        remote_lines(&a.log_text()),
        remote_lines(&b.log_text())
    );
    assert_eq!(digest(&second), digest(&first));
    let status = remote_status(&b);
    assert!(status["bytes_down"].as_u64() >= Some(200 << 20), "{status}");
    let grew = peak.saturating_sub(rss_before);
    eprintln!(
        "200 MB restore from {}: {} ms; daemon RSS {rss_before} KiB before, peak {peak} KiB during (+{grew} KiB)",
        remote.url(),
        second["duration_ms"]
    );
    assert!(grew < 64 << 10, "the restore grew the daemon by {grew} KiB");
}
