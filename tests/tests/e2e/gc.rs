//! The store under pressure: a byte budget kept by automatic GC, leases that protect a
//! running build, a full disk, kills during GC, and damage found and repaired.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use memobuild_tests::bench::{Bench, tail};
use memobuild_tests::workload::XorShift;
use memobuild_tests::{TestDaemon, privileged, texts};
use memobuildd::layout::Layout;
use memobuildd::store::{Digest, Store, StoreOptions};

/// A daemon whose config file holds `config`.
fn daemon_with(config: &str) -> TestDaemon {
    let mut daemon = TestDaemon::unstarted();
    launch_with(&mut daemon, config);
    daemon
}

fn launch_with(daemon: &mut TestDaemon, config: &str) {
    let file = daemon.dir.path().join("memobuildd.toml");
    std::fs::write(&file, config).expect("config");
    if let Err(err) = daemon.launch(|command| {
        command.arg("--config").arg(&file);
    }) {
        panic!(
            "memobuildd did not start: {err}\n{}",
            tail(&daemon.log_text())
        );
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A context whose Dockerfile copies one file of `len` random bytes.
fn copy_context(daemon: &TestDaemon, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let ctx = daemon.dir.path().join(name);
    std::fs::create_dir_all(&ctx).expect("context");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY data.bin /data.bin\n",
    )
    .expect("Dockerfile");
    let data = random_bytes(seed, len);
    std::fs::write(ctx.join("data.bin"), &data).expect("data");
    (ctx, data)
}

fn build(daemon: &TestDaemon, ctx: &Path, args: &[&str]) -> Output {
    daemon
        .client()
        .args(["build", "--progress", "json"])
        .arg(ctx)
        .args(args)
        .output()
        .expect("run memobuild build")
}

/// Builds and returns the result record (fails the test on a failed build).
fn build_ok(daemon: &TestDaemon, ctx: &Path, args: &[&str]) -> serde_json::Value {
    let output = build(daemon, ctx, args);
    let (_, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "build failed: {stderr}\ndaemon log:\n{}",
        tail(&daemon.log_text())
    );
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| panic!("no result line in: {stderr}"))
}

fn executed(result: &serde_json::Value) -> u64 {
    result["executed"].as_u64().expect("executed")
}

fn client_json(daemon: &TestDaemon, args: &[&str]) -> serde_json::Value {
    let output = daemon.run_client(args);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

fn stats(daemon: &TestDaemon) -> serde_json::Value {
    client_json(daemon, &["cache", "stats", "--json"])
}

fn number(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {value}"))
}

/// Waits (bounded) until no GC pass runs, nothing waits to be unlinked, and `done` holds
/// of the stats.
fn wait_for_gc(
    daemon: &TestDaemon,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for_stats(daemon, |s| {
        !s["gc_running"].as_bool().unwrap_or(true) && done(s)
    })
}

/// Waits (bounded) until `done` holds of the stats.
fn wait_for_stats(
    daemon: &TestDaemon,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = stats(daemon);
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "GC did not get there: {now}\n{}",
            tail(&daemon.log_text())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `du` of a directory, in bytes.
fn du(path: &Path) -> u64 {
    let output = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a number")
}

/// The content of `/data.bin` in an exported root filesystem tar.
/// Regular files under `dir` and their total size, as `find` sees them.
fn files_and_bytes(dir: &Path) -> (u64, u64) {
    let output = Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-printf", "%s\\n"])
        .output()
        .expect("find");
    let sizes = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|size| size.parse::<u64>().expect("find prints sizes"))
        .collect::<Vec<_>>();
    (sizes.len() as u64, sizes.iter().sum())
}

fn data_in_rootfs(daemon: &TestDaemon, ctx: &Path, args: &[&str]) -> (serde_json::Value, Vec<u8>) {
    let out = daemon
        .dir
        .path()
        .join(format!("rootfs-{}.tar", rand_suffix()));
    let dest = format!("type=tar,dest={}", out.display());
    let mut all = vec!["-o", dest.as_str()];
    all.extend_from_slice(args);
    let result = build_ok(daemon, ctx, &all);
    let mut archive = tar::Archive::new(std::fs::File::open(&out).expect("tar"));
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").ends_with("data.bin") {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            return (result, data);
        }
    }
    panic!("no data.bin in the exported root filesystem");
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[test]
fn thirty_builds_over_a_small_budget_stay_within_it_and_tagged_images_rebuild_cached() {
    const BUDGET: u64 = 12 << 20;
    let daemon = daemon_with("gc_keep_bytes = \"12MB\"\nwatch_built_contexts = false\n");
    let mut contexts = Vec::new();
    for i in 0..30u64 {
        let (ctx, data) = copy_context(&daemon, &format!("ctx{i}"), i + 1, 700 << 10);
        let tag = format!("app{i}:1");
        let tagged = i % 10 == 0;
        let args: Vec<&str> = if tagged { vec!["-t", &tag] } else { vec![] };
        assert_eq!(executed(&build_ok(&daemon, &ctx, &args)), 1, "build {i}");
        contexts.push((ctx, data, tagged.then_some(tag)));
    }
    // 30 builds of ~1.4 MB each (blob + unpacked layer): 3.5× the budget.
    let after = wait_for_gc(&daemon, |s| number(s, "total_bytes") <= BUDGET);
    assert!(after["last_gc"].is_object(), "{after}");
    assert!(number(&after, "action_entries") < 30, "{after}");

    // `total_bytes` is what is on disk: within 10% of `du` of the root.
    let measured = du(&daemon.root);
    let counted = number(&after, "total_bytes");
    assert!(
        counted.abs_diff(measured) * 10 <= measured,
        "cache stats says {counted}, du says {measured}"
    );

    // Every tagged image still builds fully cached, with its content.
    for (ctx, data, tag) in &contexts {
        if let Some(tag) = tag {
            let (result, rebuilt) = data_in_rootfs(&daemon, ctx, &["-t", tag]);
            assert_eq!(executed(&result), 0, "{tag} rebuilt: {result}");
            assert!(rebuilt == *data, "{tag}: the content differs");
        }
    }
    // A step whose result was collected runs again, correctly.
    let (ctx, data, _) = &contexts[1];
    let (result, rebuilt) = data_in_rootfs(&daemon, ctx, &[]);
    assert_eq!(executed(&result), 1, "{result}");
    assert!(rebuilt == *data, "the re-executed step made other content");
}

#[test]
fn rmi_then_gc_frees_the_bytes_and_status_shows_the_store() {
    let daemon = daemon_with("watch_built_contexts = false\n");
    let (keep, _) = copy_context(&daemon, "keep", 7, 300 << 10);
    let (gone, _) = copy_context(&daemon, "gone", 8, 2 << 20);
    build_ok(&daemon, &keep, &["-t", "keep"]);
    build_ok(&daemon, &gone, &["-t", "gone"]);
    let status = client_json(&daemon, &["status", "--json"]);
    let cache = &status["cache"];
    assert!(number(cache, "l2_blobs") >= 6, "{cache}");
    assert!(number(cache, "l2_bytes") >= 2 << 20, "{cache}");
    assert!(number(cache, "action_entries") >= 2, "{cache}");
    assert!(number(cache, "l2_budget_bytes") >= 2 << 30, "{cache}");
    let (files, bytes) = files_and_bytes(&daemon.root.join("cas-v1"));
    for (said, counted, what) in [
        (number(cache, "l2_blobs"), files, "blobs"),
        (number(cache, "l2_bytes"), bytes, "bytes"),
    ] {
        assert!(
            said.abs_diff(counted) * 20 <= counted,
            "status says {said} {what}, the CAS on disk holds {counted}"
        );
    }
    let text = texts(&daemon.run_client(&["status"])).0;
    assert!(text.contains("budget") && text.contains("blobs"), "{text}");

    let before = number(&stats(&daemon), "total_bytes");
    let stored = |s: &serde_json::Value| number(s, "l2_bytes") + number(s, "unpacked_bytes");
    let stored_before = stored(&stats(&daemon));
    let dry = client_json(&daemon, &["gc", "--all", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        stored(&stats(&daemon)),
        stored_before,
        "a dry run removes nothing"
    );
    let nothing = client_json(&daemon, &["gc", "--all", "--json"]);
    assert_eq!(
        number(&nothing, "removed_actions"),
        0,
        "both are tagged: {nothing}"
    );

    let rmi = daemon.run_client(&["rmi", "gone"]);
    assert!(rmi.status.success(), "{:?}", texts(&rmi));
    let report = client_json(&daemon, &["gc", "--all", "--json"]);
    assert!(
        number(&report, "freed_bytes") >= 4 << 20,
        "blob and layer: {report}"
    );
    assert_eq!(number(&report, "removed_actions"), 1, "{report}");
    let after = number(&stats(&daemon), "total_bytes");
    assert!(before - after >= 4 << 20, "{before} -> {after}");
    let printed = texts(&daemon.run_client(&["gc"])).0;
    assert!(printed.starts_with("freed"), "{printed}");
    let (result, _) = data_in_rootfs(&daemon, &keep, &["-t", "keep"]);
    assert_eq!(executed(&result), 0, "the kept image is whole");

    // buildx's vocabulary: nothing unused for a day here, so nothing goes.
    let pruned = client_json(
        &daemon,
        &["cache", "prune", "--filter", "until=24h", "--json"],
    );
    assert_eq!(number(&pruned, "removed_actions"), 0, "{pruned}");
    let printed = texts(&daemon.run_client(&["cache", "stats"])).0;
    assert!(
        printed.contains("hit rate") && printed.contains("last GC"),
        "{printed}"
    );
}

#[test]
fn a_build_running_during_gc_is_unaffected() {
    if !privileged("a_build_running_during_gc_is_unaffected") {
        return;
    }
    let bench = Bench::start();
    let daemon = &bench.daemon;
    // Something GC may take: an untagged build.
    let other = bench.context(
        "other",
        &[("Dockerfile", "FROM BASE\nRUN echo other > /other\n")],
    );
    bench.build_ok(&other, &[]);
    let slow = bench.context(
        "slow",
        &[
            (
                "Dockerfile",
                "FROM BASE\nCOPY a.txt /a.txt\nRUN /bin/busybox sleep 3 && cat /a.txt > /b.txt\n",
            ),
            ("a.txt", "leased"),
        ],
    );
    let out = daemon.dir.path().join("slow.tar");
    let dest = format!("type=tar,dest={}", out.display());
    let mut running = daemon
        .client()
        .args(["build", "--progress", "plain", "-o", &dest])
        .arg(&slow)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the slow build");
    // While its RUN sleeps over the unpacked base and COPY layers: collect everything.
    std::thread::sleep(Duration::from_millis(1500));
    let report = client_json(daemon, &["gc", "--all", "--keep-bytes", "0", "--json"]);
    assert!(
        number(&report, "removed_actions") >= 1,
        "the other build's step: {report}"
    );
    let status = memobuild_tests::wait_bounded(&mut running, Duration::from_secs(60));
    let mut stderr = String::new();
    running
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(status.success(), "{stderr}\n{}", tail(&daemon.log_text()));
    let listing = memobuild_tests::bench::tar_listing(&out);
    assert!(listing.contains_key("b.txt") && listing.contains_key("bin/busybox"));
    assert_eq!(
        listing["b.txt"],
        memobuild_tests::bench::describe(
            "file",
            0o644,
            0,
            0,
            &memobuild_tests::bench::content_of("leased")
        )
    );
    // What the lease held is still whole: the same build again is fully cached.
    let again = bench.build_ok(&slow, &[]);
    assert_eq!(executed(&again), 0, "{again}");
}

/// A loop-mounted ext4 filesystem of `mb` MiB, unmounted when dropped.
struct LoopFs {
    mount: PathBuf,
}

impl LoopFs {
    fn new(dir: &Path, mb: u64) -> Self {
        let image = dir.join("fs.img");
        let file = std::fs::File::create(&image).expect("image");
        file.set_len(mb << 20).expect("size");
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(mkfs.status.success(), "{:?}", texts(&mkfs));
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount)
            .output()
            .expect("mount");
        assert!(mounted.status.success(), "{:?}", texts(&mounted));
        Self { mount }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

#[test]
fn a_full_disk_fails_the_build_clearly_collects_and_the_next_build_succeeds() {
    if !privileged("a_full_disk_fails_the_build_clearly_collects_and_the_next_build_succeeds") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let fs = LoopFs::new(work.path(), 120);
    let mut daemon = TestDaemon::unstarted();
    daemon.root = fs.mount.join("root");
    launch_with(&mut daemon, "watch_built_contexts = false\n");
    // ~60 MB in the store (blob + unpacked layer), untagged: GC may take it.
    let (first, _) = copy_context(&daemon, "first", 1, 30 << 20);
    build_ok(&daemon, &first, &[]);
    // ~80 MB more does not fit in what is left.
    let (second, data) = copy_context(&daemon, "second", 2, 40 << 20);
    let failed = build(&daemon, &second, &["-t", "second"]);
    let (_, stderr) = texts(&failed);
    assert!(
        !failed.status.success(),
        "the build should not fit: {stderr}"
    );
    assert!(
        stderr.contains("no space left in the store")
            && stderr.contains(&daemon.root.display().to_string()),
        "the error names the store and what it needed: {stderr}"
    );
    assert!(stderr.contains("needed more than"), "{stderr}");
    // Nothing half-written is left visible, and GC made room.
    let after = wait_for_gc(&daemon, |s| s["last_gc"]["trigger"] == "disk-full");
    assert!(
        number(&after["last_gc"]["report"], "freed_bytes") >= 30 << 20,
        "{after}"
    );
    assert_eq!(
        std::fs::read_dir(daemon.root.join("tmp"))
            .expect("tmp")
            .count(),
        0,
        "no scratch left"
    );
    // The daemon kept serving: the same build now succeeds, with its content.
    let (result, rebuilt) = data_in_rootfs(&daemon, &second, &["-t", "second"]);
    assert_eq!(executed(&result), 1);
    assert!(rebuilt == data);
    drop(daemon);
    verify(&fs.mount.join("root"));
    drop(fs);
}

fn verify(root: &Path) {
    let store = Store::open(&Layout::new(root), StoreOptions::default()).expect("store");
    let audit = store.verify().expect("verify");
    assert!(audit.blobs_checked > 0 || audit.missing.is_empty());
    assert!(
        audit.corrupt.is_empty(),
        "corrupt blobs: {:?}",
        audit.corrupt
    );
    assert!(
        audit.missing.is_empty(),
        "the index names what is gone: {:?}",
        audit.missing
    );
}

#[test]
fn kill_9_during_gc_ten_times_leaves_a_store_that_verifies() {
    let mut daemon = TestDaemon::unstarted();
    let mut rng = XorShift(0x5eed);
    let mut killed_mid_pass = 0;
    for round in 0..10 {
        let store =
            Store::open(&Layout::new(&daemon.root), StoreOptions::default()).expect("store");
        memobuildd::testing::fill_store(&store, round * 1000, 400, 8);
        drop(store);
        // A tiny budget: the start pass removes nearly everything, and is killed doing it —
        // a few milliseconds after it starts, whatever the machine's load.
        launch_with(&mut daemon, "gc_keep_bytes = 65536\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !daemon.log_text().contains("garbage collection starts") {
            assert!(std::time::Instant::now() < deadline, "no GC pass started");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 20));
        let log = daemon.log_text();
        daemon.kill();
        if !log.contains("garbage collection trigger") {
            killed_mid_pass += 1;
        }
        verify(&daemon.root);
        // Orphans of the kill are collected by the next pass.
    }
    launch_with(&mut daemon, "gc_keep_bytes = 65536\n");
    // Nothing is tagged: over a 64 KiB budget, every blob and layer goes (the index and
    // the shard directories stay). Unlinking them may take the trash thread longer.
    wait_for_stats(&daemon, |s| {
        s["last_gc"].is_object() && number(s, "l2_blobs") == 0 && number(s, "unpacked_layers") == 0
    });
    daemon.kill();
    verify(&daemon.root);
    eprintln!("{killed_mid_pass} of 10 kills landed before the pass finished");
    assert!(killed_mid_pass > 0, "no kill landed during a pass");
}

/// The manifest of a tagged image, as the store holds it.
fn manifest(daemon: &TestDaemon, name: &str) -> serde_json::Value {
    let images = client_json(daemon, &["images", "--json"]);
    let digest = images
        .as_array()
        .expect("list")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {images}"))["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    serde_json::from_slice(&std::fs::read(blob_path(daemon, &digest)).expect("manifest"))
        .expect("manifest JSON")
}

fn blob_path(daemon: &TestDaemon, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    daemon.root.join("cas-v1/sha256").join(&hex[..2]).join(hex)
}

/// Exports `-o type=oci` and checks every blob in it against its name.
fn oci_export_is_whole(daemon: &TestDaemon, ctx: &Path, args: &[&str]) -> serde_json::Value {
    let out = daemon.dir.path().join(format!("oci-{}.tar", rand_suffix()));
    let dest = format!("type=oci,dest={}", out.display());
    let mut all = vec!["-o", dest.as_str()];
    all.extend_from_slice(args);
    let result = build_ok(daemon, ctx, &all);
    let mut archive = tar::Archive::new(std::fs::File::open(&out).expect("oci"));
    let mut blobs = 0;
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").display().to_string();
        if let Some(hex) = path.strip_prefix("blobs/sha256/")
            && !hex.is_empty()
        {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).expect("read");
            assert_eq!(Digest::of(&bytes).hex(), hex, "{path} in the export");
            blobs += 1;
        }
    }
    assert!(blobs >= 3, "manifest, config, layer");
    result
}

#[test]
fn a_damaged_layer_blob_is_rebuilt_by_the_next_build() {
    let daemon = daemon_with("watch_built_contexts = false\n");
    let (ctx, data) = copy_context(&daemon, "app", 3, 200 << 10);
    build_ok(&daemon, &ctx, &["-t", "app"]);
    for damage in ["flip", "truncate"] {
        let manifest = manifest(&daemon, "app:latest");
        let layer = blob_path(
            &daemon,
            manifest["layers"][0]["digest"].as_str().expect("layer"),
        );
        let mut bytes = std::fs::read(&layer).expect("layer blob");
        match damage {
            "flip" => {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
            }
            _ => bytes.truncate(bytes.len() / 2),
        }
        std::fs::write(&layer, &bytes).expect("damage");
        let result = oci_export_is_whole(&daemon, &ctx, &["-t", "app"]);
        assert_eq!(
            executed(&result),
            1,
            "{damage}: the step ran again: {result}"
        );
        let (again, rebuilt) = data_in_rootfs(&daemon, &ctx, &["-t", "app"]);
        assert_eq!(executed(&again), 0, "{damage}: repaired, not repeated");
        assert!(rebuilt == data);
    }
}

#[test]
fn a_damaged_config_blob_does_not_fail_the_next_build() {
    let daemon = daemon_with("watch_built_contexts = false\n");
    let (ctx, _) = copy_context(&daemon, "app", 4, 10 << 10);
    build_ok(&daemon, &ctx, &["-t", "app"]);
    let manifest = manifest(&daemon, "app:latest");
    let config = blob_path(
        &daemon,
        manifest["config"]["digest"].as_str().expect("config"),
    );
    let mut bytes = std::fs::read(&config).expect("config blob");
    bytes[10] ^= 0x01;
    std::fs::write(&config, &bytes).expect("damage");
    // Tag only (the in-memory export memo would trust it), then an export that reads it.
    build_ok(&daemon, &ctx, &["-t", "app"]);
    oci_export_is_whole(&daemon, &ctx, &["-t", "app"]);
    // And after a restart, with no memo at all.
    std::fs::write(&config, &bytes).expect("damage again");
    let mut daemon = daemon;
    launch_with(&mut daemon, "watch_built_contexts = false\n");
    oci_export_is_whole(&daemon, &ctx, &["-t", "app"]);
}

#[test]
fn garbage_over_the_index_is_repaired_at_start_and_the_daemon_builds() {
    let mut daemon = daemon_with("watch_built_contexts = false\n");
    let (ctx, data) = copy_context(&daemon, "app", 5, 50 << 10);
    build_ok(&daemon, &ctx, &["-t", "app"]);
    daemon.kill();
    let index = daemon.root.join("index-v1.sqlite");
    std::fs::write(&index, random_bytes(9, 256 << 10)).expect("garbage");
    let _ = std::fs::remove_file(daemon.root.join("index-v1.sqlite-wal"));
    launch_with(&mut daemon, "watch_built_contexts = false\n");
    let log = daemon.log_text();
    assert!(
        log.contains("INDEX IS DAMAGED"),
        "a loud log line: {}",
        tail(&log)
    );
    assert!(daemon.root.join("index-v1.sqlite.damaged").is_file());
    let (result, rebuilt) = data_in_rootfs(&daemon, &ctx, &["-t", "app"]);
    assert_eq!(executed(&result), 1, "the lost step runs again");
    assert!(rebuilt == data);
}

#[test]
fn damaged_index_pages_are_named_in_the_error_then_repaired() {
    let daemon = daemon_with("watch_built_contexts = false\n");
    for i in 0..40 {
        let (ctx, _) = copy_context(&daemon, &format!("ctx{i}"), 100 + i, 4 << 10);
        build_ok(&daemon, &ctx, &[]);
    }
    let index = daemon.root.join("index-v1.sqlite");
    // Move the WAL into the file, then overwrite every page but the first.
    let connection = rusqlite::Connection::open(&index).expect("open the index");
    connection
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    let mut bytes = std::fs::read(&index).expect("index");
    for byte in &mut bytes[4096..] {
        *byte = 0xa5;
    }
    std::fs::write(&index, &bytes).expect("damage");
    // Another writer makes the daemon's connection drop the pages it had cached.
    connection
        .pragma_update(None, "user_version", 2)
        .expect("bump the index");
    drop(connection);
    // A step never built: its lookup reads the damaged pages (a built one is in L1).
    let (fresh, _) = copy_context(&daemon, "fresh", 99, 4 << 10);
    let failed = build(&daemon, &fresh, &[]);
    let (_, stderr) = texts(&failed);
    assert!(!failed.status.success(), "the damage is found: {stderr}");
    assert!(
        stderr.contains("index-v1.sqlite"),
        "the error names the index: {stderr}"
    );
    assert!(!stderr.contains("cancelled"), "{stderr}");
    // Repaired, not repeated.
    let result = build_ok(&daemon, &fresh, &[]);
    assert_eq!(executed(&result), 1, "{result}");
    assert!(daemon.log_text().contains("INDEX IS DAMAGED"));
}
