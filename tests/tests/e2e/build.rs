//! Real builds: a busybox base served by a real registry, RUN in runc on overlayfs, outputs
//! checked by listing them and, for OCI layouts, by umoci. These need root.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memobuild_tests::bench::{Bench, content_of, describe, executed, tail, tar_listing};
use memobuild_tests::{TestDaemon, privileged, texts};

const MULTI_STAGE: &str = "\
FROM BASE AS builder
WORKDIR /src
COPY app.txt ./
RUN echo built > /src/out.txt && mkdir -p /gone/sub && echo x > /gone/sub/f && echo tmp > /tmp-file
RUN rm /tmp-file && rm -rf /gone && mkdir /gone && echo back > /gone/new

FROM BASE
COPY --from=builder /src/out.txt /app/
COPY --from=builder /gone /gone
USER app
WORKDIR /home/app/work
RUN id -u > /home/app/work/uid
RUN [\"/bin/sh\", \"-c\", \"echo exec > /home/app/work/exec\"]
CMD [\"cat\", \"/app/out.txt\"]
";

#[test]
fn a_multi_stage_build_gives_the_expected_filesystem() {
    if !privileged("a_multi_stage_build_gives_the_expected_filesystem") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "multi",
        &[("Dockerfile", MULTI_STAGE), ("app.txt", "hello")],
    );

    let builder = bench.rootfs_tar(&ctx, &["--target", "builder"]);
    assert_eq!(
        builder["src/app.txt"],
        describe("file", 0o644, 0, 0, &content_of("hello"))
    );
    assert_eq!(
        builder["src/out.txt"],
        describe("file", 0o644, 0, 0, &content_of("built\n"))
    );
    assert!(
        !builder.contains_key("tmp-file"),
        "a file deleted by a later RUN is gone"
    );
    assert!(
        !builder.contains_key("gone/sub"),
        "a deleted directory's contents are gone"
    );
    assert_eq!(
        builder["gone/new"],
        describe("file", 0o644, 0, 0, &content_of("back\n"))
    );
    for mount_point in ["etc/hosts", "etc/resolv.conf", "etc/hostname"] {
        assert!(
            !builder.contains_key(mount_point),
            "{mount_point} leaked into a layer"
        );
    }
    // BuildKit keeps the mount points runc made for these (tests/conformance shows it).
    for mount_point in ["proc", "sys", "dev"] {
        assert_eq!(builder[mount_point], describe("dir", 0o755, 0, 0, ""));
    }

    let last = bench.rootfs_tar(&ctx, &[]);
    assert_eq!(
        last["app/out.txt"],
        describe("file", 0o644, 0, 0, &content_of("built\n"))
    );
    assert_eq!(
        last["gone/new"],
        describe("file", 0o644, 0, 0, &content_of("back\n"))
    );
    assert_eq!(
        last["home/app/work"],
        describe("dir", 0o755, 1000, 1000, "")
    );
    assert_eq!(
        last["home/app/work/uid"],
        describe("file", 0o644, 1000, 1000, &content_of("1000\n"))
    );
    assert_eq!(
        last["home/app/work/exec"],
        describe("file", 0o644, 1000, 1000, &content_of("exec\n"))
    );
    assert!(last["bin/sh"].starts_with("link"), "{}", last["bin/sh"]);
    assert!(
        !last.contains_key("src"),
        "the builder stage's files stay in the builder"
    );

    // umoci, reading our OCI layout independently, must see the same root filesystem.
    let (_, unpacked) = bench.oci_image(&ctx, "demo");
    assert_eq!(unpacked, last);
}

const INCREMENTAL: &str = "\
FROM BASE
COPY package.json /app/
RUN cat /app/package.json > /app/deps
COPY src/ /app/src/
RUN cat /app/src/* > /app/bundle
CMD [\"cat\", \"/app/bundle\"]
";

#[test]
fn rebuilds_execute_only_what_changed_also_after_a_restart() {
    if !privileged("rebuilds_execute_only_what_changed_also_after_a_restart") {
        return;
    }
    let mut bench = Bench::start();
    let files = [
        ("Dockerfile", INCREMENTAL),
        ("package.json", "{}"),
        ("src/a.js", "a"),
        ("src/b.js", "b"),
    ];
    let ctx = bench.context("incremental", &files);
    assert_eq!(executed(&bench.build_ok(&ctx, &["-t", "inc"])), 4);
    assert_eq!(
        executed(&bench.build_ok(&ctx, &["-t", "inc"])),
        0,
        "nothing changed"
    );

    // A fresh daemon on the same root still has everything.
    bench.daemon.terminate();
    let root = bench.daemon.root.clone();
    let socket = bench.daemon.socket.clone();
    bench.daemon.launch(|_| {}).expect("restart");
    assert_eq!(
        (bench.daemon.root.clone(), bench.daemon.socket.clone()),
        (root, socket)
    );
    assert_eq!(
        executed(&bench.build_ok(&ctx, &["-t", "inc"])),
        0,
        "after a restart"
    );

    std::fs::write(ctx.join("src/a.js"), "a2").expect("edit");
    assert_eq!(
        executed(&bench.build_ok(&ctx, &["-t", "inc"])),
        2,
        "the src COPY and the RUN after it"
    );
    let dockerfile = INCREMENTAL
        .replace("BASE", &bench.base)
        .replace("/app/bundle\"]", "/app/deps\"]");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("CMD edit");
    assert_eq!(
        executed(&bench.build_ok(&ctx, &["-t", "inc"])),
        0,
        "CMD changes no layer"
    );

    let images = bench.daemon.run_client(&["images", "--json"]);
    let images: serde_json::Value = serde_json::from_slice(&images.stdout).expect("json");
    assert_eq!(images[0]["name"], "inc:latest");

    // The base's tag was resolved recently and its blobs are stored: no registry needed.
    drop(bench.registry.take());
    std::fs::write(ctx.join("src/b.js"), "b2").expect("edit");
    assert_eq!(
        executed(&bench.build_ok(&ctx, &["-t", "inc"])),
        2,
        "offline rebuild"
    );
}

/// 240 files of 1–3 KiB under `src/d<i % 6>/`, each one's content set by its index and
/// `version` (for the file named `edited`).
fn many_files(edited: usize, version: &str) -> Vec<(String, String)> {
    (0..240)
        .map(|i| {
            let size = 1024 + (i * 7919) % 2048;
            let mut content: String = format!("file {i} ").repeat(size / 8);
            if i == edited {
                content.push_str(version);
            }
            (format!("src/d{}/f{i}.txt", i % 6), content)
        })
        .collect()
}

#[test]
fn a_large_copy_is_split_into_layers_and_an_edit_rewrites_one() {
    if !privileged("a_large_copy_is_split_into_layers_and_an_edit_rewrites_one") {
        return;
    }
    let config = tempfile::tempdir().expect("config dir");
    let config_file = config.path().join("memobuildd.toml");
    std::fs::write(&config_file, "copy_chunk_bytes = 32768\n").expect("config");
    let bench = Bench::start_with(|cmd| {
        cmd.env("MEMOBUILD_CONFIG", &config_file);
    });
    let dockerfile = "FROM BASE\nCOPY src/ /app/src/\nRUN cat /app/src/d1/f7.txt > /out\n";
    let files = many_files(7, "v1");
    let mut all: Vec<(&str, &str)> = vec![("Dockerfile", dockerfile)];
    all.extend(files.iter().map(|(p, c)| (p.as_str(), c.as_str())));
    let ctx = bench.context("chunks", &all);

    let (before, rootfs) = bench.oci_image(&ctx, "chunks");
    // busybox's one layer, the COPY's chunks, the RUN.
    let chunks = before.len() - 2;
    assert!((4..=30).contains(&chunks), "{chunks} COPY layers");
    assert_eq!(rootfs, bench.rootfs_tar(&ctx, &[]), "umoci sees our tar");
    for (path, content) in &files {
        assert_eq!(
            rootfs[&format!("app/{path}")],
            describe("file", 0o644, 0, 0, &content_of(content)),
            "{path}"
        );
    }

    std::fs::write(ctx.join("src/d1/f7.txt"), &many_files(7, "v2")[7].1).expect("edit");
    let rebuilt = bench.build_ok(&ctx, &["-t", "chunks"]);
    assert_eq!(executed(&rebuilt), 2, "the COPY and the RUN");
    let (after, rootfs) = bench.oci_image(&ctx, "chunks");
    let new: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    assert_eq!(
        new.len(),
        2,
        "only the edited chunk and the RUN layer are new: {new:?}"
    );
    assert_eq!(after.len(), before.len());
    assert!(
        rootfs["out"].ends_with(&content_of(&many_files(7, "v2")[7].1)),
        "{}",
        rootfs["out"]
    );
}

#[test]
fn two_builds_needing_the_same_step_at_once_compute_it_once() {
    if !privileged("two_builds_needing_the_same_step_at_once_compute_it_once") {
        return;
    }
    let bench = Bench::start();
    // The step's output differs on every execution, so equal outputs mean one execution.
    let dockerfile = "FROM BASE\nRUN /bin/busybox sleep 1 && /bin/busybox date +%s%N > /stamp\n";
    let ctx = bench.context("shared", &[("Dockerfile", dockerfile)]);
    let outputs: Vec<PathBuf> = (0..2)
        .map(|i| bench.daemon.dir.path().join(format!("shared-{i}.tar")))
        .collect();
    let clients: Vec<_> = outputs
        .iter()
        .map(|out| {
            bench
                .daemon
                .client()
                .args(["build", "--progress", "json", "-o"])
                .arg(format!("type=tar,dest={}", out.display()))
                .arg(&ctx)
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("build")
        })
        .collect();
    let mut executed_total = 0;
    for client in clients {
        let output = client.wait_with_output().expect("wait");
        let (_, stderr) = texts(&output);
        assert!(output.status.success(), "{stderr}");
        let result = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("result").cloned())
            .expect("result");
        executed_total += executed(&result);
    }
    assert_eq!(
        executed_total, 1,
        "one build ran the step, the other waited for it"
    );
    assert_eq!(
        tar_listing(&outputs[0])["stamp"],
        tar_listing(&outputs[1])["stamp"]
    );
}

#[test]
fn a_build_waiting_on_shared_work_takes_it_over_when_its_starter_is_killed() {
    if !privileged("a_build_waiting_on_shared_work_takes_it_over_when_its_starter_is_killed") {
        return;
    }
    let bench = Bench::start();
    let dockerfile =
        "FROM BASE\nRUN echo started && /bin/busybox sleep 5 && echo finished > /done\n";
    let ctx = bench.context("takeover", &[("Dockerfile", dockerfile)]);
    let start = |progress: &str| {
        bench
            .daemon
            .client()
            .args(["build", "--progress", progress])
            .arg(&ctx)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("build")
    };
    let mut first = start("plain");
    wait_for_line(first.stderr.take().expect("stderr"), "started");
    let second = start("plain");
    // The second build has joined the running step when it says it started it too.
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("kill the first client");
    let _ = first.wait();
    let output = second.wait_with_output().expect("second");
    let (_, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "the waiting build finished the work: {stderr}\n{}",
        tail(&bench.daemon.log_text())
    );
    // The work recorded its result: a third build finds it cached.
    let third = bench.build_ok(&ctx, &[]);
    assert_eq!(executed(&third), 0, "{third}");
}

#[test]
fn an_unneeded_broken_stage_does_not_fail_a_target_build() {
    if !privileged("an_unneeded_broken_stage_does_not_fail_a_target_build") {
        return;
    }
    let bench = Bench::start();
    let dockerfile = "FROM BASE AS broken\nRUN exit 7\n\nFROM BASE AS good\nRUN echo fine > /ok\n";
    let ctx = bench.context("target", &[("Dockerfile", dockerfile)]);
    let listing = bench.rootfs_tar(&ctx, &["--target", "good"]);
    assert!(listing.contains_key("ok"));

    let output = bench
        .daemon
        .client()
        .args(["build", "--progress", "plain", "--target", "broken"])
        .arg(&ctx)
        .output()
        .expect("run build");
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("RUN exit 7"), "{stderr}");
    assert!(stderr.contains("exit code 7"), "{stderr}");
}

/// Mounts and runc containers under a daemon root, and scratch entries left in tmp/.
fn leftovers(root: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|target| target.starts_with(root.to_str().expect("utf-8")))
        .map(|t| format!("mount {t}"))
        .collect();
    let runc = Command::new("runc")
        .arg("--root")
        .arg(root.join("run/runc"))
        .arg("list")
        .arg("-q")
        .output()
        .expect("runc list");
    found.extend(
        String::from_utf8_lossy(&runc.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("container {l}")),
    );
    if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
        found.extend(
            entries
                .flatten()
                .map(|e| format!("scratch {}", e.path().display())),
        );
    }
    found
}

fn wait_for_clean(root: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(root);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SLOW: &str = "FROM BASE\nRUN echo started && /bin/busybox sleep 30\n";

/// Starts a build of `ctx` (a [`SLOW`] one) and returns once its RUN step has started.
fn start_slow_build(bench: &Bench, ctx: &Path) -> std::process::Child {
    let mut client = bench
        .daemon
        .client()
        .args(["build", "--progress", "plain"])
        .arg(ctx)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start build");
    wait_for_line(client.stderr.take().expect("stderr"), "started");
    client
}

#[test]
fn ctrl_c_mid_run_leaves_no_mount_container_or_scratch() {
    if !privileged("ctrl_c_mid_run_leaves_no_mount_container_or_scratch") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context("cancel", &[("Dockerfile", SLOW)]);
    let mut client = start_slow_build(&bench, &ctx);
    memobuild_tests::signal(client.id(), libc::SIGINT);
    let status = memobuild_tests::wait_bounded(&mut client, Duration::from_secs(10));
    assert_eq!(status.code(), Some(130));
    let left = wait_for_clean(&bench.daemon.root);
    assert!(
        left.is_empty(),
        "left behind: {left:?}\n{}",
        tail(&bench.daemon.log_text())
    );
}

#[test]
fn a_daemon_killed_mid_build_recovers_at_its_next_start() {
    if !privileged("a_daemon_killed_mid_build_recovers_at_its_next_start") {
        return;
    }
    let mut bench = Bench::start();
    let ctx = bench.context("kill", &[("Dockerfile", SLOW)]);
    let mut client = start_slow_build(&bench, &ctx);
    bench.daemon.kill();
    let _ = memobuild_tests::wait_bounded(&mut client, Duration::from_secs(10));
    // The runc container survives its daemon; the next start must clean it up.
    bench.daemon.launch(|_| {}).expect("restart after SIGKILL");
    let left = wait_for_clean(&bench.daemon.root);
    assert!(left.is_empty(), "left behind: {left:?}");
    let quick = bench.context(
        "after",
        &[("Dockerfile", "FROM BASE\nRUN echo again > /again\n")],
    );
    let listing = bench.rootfs_tar(&quick, &[]);
    assert!(listing.contains_key("again"));
}

#[test]
fn sigterm_mid_run_stops_the_step_and_releases_a_clean_root() {
    if !privileged("sigterm_mid_run_stops_the_step_and_releases_a_clean_root") {
        return;
    }
    let mut bench = Bench::start();
    let ctx = bench.context("term", &[("Dockerfile", SLOW)]);
    let mut client = start_slow_build(&bench, &ctx);
    let signalled = Instant::now();
    let status = bench.daemon.terminate();
    let stopped_in = signalled.elapsed();
    assert!(
        status.success(),
        "{status:?}\n{}",
        tail(&bench.daemon.log_text())
    );
    // Well before the step's 30 s: the container was killed, not waited for.
    assert!(
        stopped_in < Duration::from_secs(12),
        "stopped in {stopped_in:?}"
    );
    // Looked at once the daemon is gone, not after a wait: it cleaned up before it exited.
    let left = leftovers(&bench.daemon.root);
    assert!(
        left.is_empty(),
        "left behind: {left:?}\n{}",
        tail(&bench.daemon.log_text())
    );
    let client_status = memobuild_tests::wait_bounded(&mut client, Duration::from_secs(10));
    assert!(!client_status.success());
    let before = bench.daemon.log_text().len();
    bench
        .daemon
        .launch(|_| {})
        .expect("a second daemon on the root");
    let second = bench.daemon.log_text()[before..].to_owned();
    assert!(
        !second.contains("previous daemon left"),
        "the second daemon found remains: {second}"
    );
    let quick = bench.context(
        "after-term",
        &[("Dockerfile", "FROM BASE\nRUN echo ok > /ok\n")],
    );
    assert!(bench.rootfs_tar(&quick, &[]).contains_key("ok"));
}

/// Resident memory of a process and its peak, from /proc, in bytes.
fn rss_and_peak(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("a /proc status field")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One frame, read from a blocking socket.
fn read_reply(stream: &mut std::os::unix::net::UnixStream) -> Option<memobuild_protocol::Response> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut payload).ok()?;
    memobuild_protocol::frame::decode(&payload).ok()
}

#[test]
fn a_client_that_never_reads_holds_no_memory_and_harms_no_other_build() {
    if !privileged("a_client_that_never_reads_holds_no_memory_and_harms_no_other_build") {
        return;
    }
    use memobuild_protocol::{
        BuildRequest, DockerfileSource, Hello, NetworkMode, PACKAGE_VERSION, Request, frame,
    };
    use std::io::Write;
    let mut bench = Bench::start();
    let config = bench.daemon.dir.path().join("memobuildd.toml");
    std::fs::write(&config, "client_stall_secs = 20\n").expect("config");
    bench
        .daemon
        .launch(|cmd| {
            cmd.arg("--config").arg(&config);
        })
        .expect("restart with a short stall timeout");
    // 100 MB of log lines, then a marker the build never reaches if it is cancelled.
    let flood = bench.context(
        "flood",
        &[(
            "Dockerfile",
            "FROM BASE\nRUN /bin/busybox yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | /bin/busybox head -c 100000000 && echo flood-done\n",
        )],
    );
    let (_, peak_before) = rss_and_peak(bench.daemon.pid());
    let mut raw = std::os::unix::net::UnixStream::connect(&bench.daemon.socket).expect("connect");
    raw.write_all(&frame::encode(&Hello::current(PACKAGE_VERSION)).expect("hello"))
        .expect("send hello");
    assert!(read_reply(&mut raw).is_none_or(|_| true));
    let request = Request::Build(BuildRequest {
        source: DockerfileSource {
            context: flood.clone(),
            dockerfile: None,
        },
        tags: vec![],
        build_args: vec![],
        target: None,
        no_cache: false,
        pull: false,
        network: NetworkMode::Host,
        outputs: vec![],
        push: false,
        source_date_epoch: None,
        secrets: vec![],
        ssh: vec![],
        remote_cache: None,
    });
    raw.write_all(&frame::encode(&request).expect("build"))
        .expect("send build");
    let sent = Instant::now();
    // Meanwhile another client builds, and is not held up by the one that never reads.
    let other = bench.context(
        "other",
        &[("Dockerfile", "FROM BASE\nRUN echo other > /other\n")],
    );
    assert!(bench.rootfs_tar(&other, &[]).contains_key("other"));
    // The stalled client is disconnected after the stall timeout, its build cancelled.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = 0;
    while !bench
        .daemon
        .log_text()
        .contains("disconnecting it and cancelling its build")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            tail(&bench.daemon.log_text())
        );
        peak = peak.max(rss_and_peak(bench.daemon.pid()).0);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, peak_after) = rss_and_peak(bench.daemon.pid());
    eprintln!(
        "daemon RSS: peak {} MiB before the flood, {} MiB sampled during it, peak {} MiB after; stalled client dropped after {:?}",
        peak_before >> 20,
        peak >> 20,
        peak_after >> 20,
        sent.elapsed()
    );
    assert!(
        peak_after < peak_before + (64 << 20),
        "peak RSS grew from {} MiB to {} MiB",
        peak_before >> 20,
        peak_after >> 20
    );
    // What reached the socket before it filled, then the end: the connection is closed.
    raw.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    assert!(!String::from_utf8_lossy(&rest).contains("flood-done"));
    let left = wait_for_clean(&bench.daemon.root);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Reads `stream` until a line contains `needle` (bounded), then keeps draining it.
fn wait_for_line(stream: impl Read + Send + 'static, needle: &str) {
    use std::io::BufRead;
    let (found, seen) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            if !sent && line.contains(&wanted) {
                let _ = found.send(());
                sent = true;
            }
        }
    });
    seen.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("never saw {needle:?}"));
}

#[test]
fn onbuild_chown_and_network_none() {
    if !privileged("onbuild_chown_and_network_none") {
        return;
    }
    let bench = Bench::start();
    let dockerfile = "\
FROM BASE AS parent
ONBUILD RUN echo triggered > /onbuild
RUN echo parent > /parent

FROM parent
COPY --chown=app data.txt /data/
RUN --network=none ls /sys/class/net > /nets
";
    let ctx = bench.context("options", &[("Dockerfile", dockerfile), ("data.txt", "d")]);
    let parent = bench.rootfs_tar(&ctx, &["--target", "parent"]);
    assert!(
        !parent.contains_key("onbuild"),
        "a trigger does not run where it is declared"
    );
    let child = bench.rootfs_tar(&ctx, &[]);
    assert_eq!(
        child["onbuild"],
        describe("file", 0o644, 0, 0, &content_of("triggered\n"))
    );
    assert_eq!(
        child["data/data.txt"],
        describe("file", 0o644, 1000, 1000, &content_of("d"))
    );
    assert_eq!(
        child["nets"],
        describe("file", 0o644, 0, 0, &content_of("lo\n"))
    );
}

#[test]
fn a_daemon_without_root_builds_without_run_and_says_why_it_cannot_run() {
    if !privileged("a_daemon_without_root_builds_without_run_and_says_why_it_cannot_run") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let place = TestDaemon::unstarted();
    let home = place.dir.path().join("user");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::set_permissions(place.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::os::unix::fs::chown(&home, Some(4242), Some(4242)).expect("chown");
    let socket = home.join("d.sock");
    let log = std::fs::File::create(home.join("log")).expect("log");
    let _daemon = memobuild_tests::KillOnDrop(
        Command::new("setpriv")
            .args(["--reuid=4242", "--regid=4242", "--clear-groups", "--"])
            .arg(memobuild_tests::bin("memobuildd"))
            .arg("--root")
            .arg(home.join("root"))
            .arg("--socket")
            .arg(&socket)
            .env("HOME", &home)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start an unprivileged daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket: {}",
            std::fs::read_to_string(home.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctx = home.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("hello.txt"), "hi").expect("file");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /\nCMD [\"x\"]\n",
    )
    .expect("df");
    let client = |args: &[&str]| {
        Command::new(memobuild_tests::bin("memobuild"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("client")
    };
    let out = home.join("out.tar");
    let dest = format!("type=tar,dest={}", out.display());
    let built = client(&["build", ctx.to_str().expect("utf-8"), "-o", &dest]);
    assert!(built.status.success(), "{:?}", texts(&built));
    assert_eq!(
        tar_listing(&out)["hello.txt"],
        describe("file", 0o644, 0, 0, &content_of("hi"))
    );

    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nRUN true\n").expect("df");
    let refused = client(&["build", ctx.to_str().expect("utf-8")]);
    let (_, stderr) = texts(&refused);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("RUN steps need root"), "{stderr}");
}

#[test]
fn user_mistakes_in_copy_read_as_such_at_their_dockerfile_line() {
    let daemon = TestDaemon::start();
    let ctx = daemon.dir.path().join("mistakes");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("x"), "x").expect("x");
    for (dockerfile, says) in [
        (
            "FROM scratch\nCOPY --chmod=999 x /x\n",
            "--chmod=999 is not an octal mode",
        ),
        (
            "FROM scratch\n\nCOPY http://127.0.0.1:1/x /x\n",
            "COPY can not fetch a URL",
        ),
    ] {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
        let output = daemon.run_client(&["build", ctx.to_str().expect("utf-8")]);
        let (_, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        let line = if dockerfile.contains("\n\n") { 3 } else { 2 };
        assert!(
            stderr.contains(&format!("Dockerfile:{line}")),
            "names the line: {stderr}"
        );
        assert!(!stderr.contains("internal"), "{stderr}");
    }
}
