//! Outputs travel to the client: the daemon streams every `-o` and `memobuild` writes it, as
//! the user who runs it, relative to its working directory, never partially under the
//! destination's name. The tests that switch uid (`setpriv`) need root, as in `access`.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use memobuild_tests::bench::{dir_listing, tar_listing};
use memobuild_tests::{
    KillOnDrop, TestDaemon, bin, privileged, signal, texts, users_gid, wait_bounded,
};

/// A member of the socket group that is not root.
const MEMBER_UID: u32 = 4343;

/// A root daemon serving the `users` group, its directory open to others.
fn group_daemon() -> TestDaemon {
    let daemon = TestDaemon::start_with(|cmd| {
        cmd.args(["--socket-group", "users"]);
    });
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    daemon
}

/// `memobuild ARGS` as the group member, in `cwd`, with umask 027.
fn as_member(daemon: &TestDaemon, cwd: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={MEMBER_UID}"))
        .arg(format!("--regid={}", users_gid()))
        .args([
            "--clear-groups",
            "--",
            "sh",
            "-c",
            "umask 027 && exec \"$0\" \"$@\"",
        ])
        .arg(bin("memobuild"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .current_dir(cwd)
        .env("HOME", "/nonexistent")
        .output()
        .expect("run setpriv")
}

/// A context with a file, a directory, a symlink and a FIFO, readable by everyone.
fn context(daemon: &TestDaemon, name: &str) -> PathBuf {
    let ctx = daemon.dir.path().join(name);
    std::fs::create_dir_all(ctx.join("dir")).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY . /app/\nCOPY --chown=7:8 app.txt /owned\n",
    )
    .expect("Dockerfile");
    std::fs::write(ctx.join("app.txt"), format!("app {name}\n")).expect("file");
    std::fs::write(ctx.join("dir/run.sh"), "#!/bin/sh\n").expect("file");
    std::fs::set_permissions(
        ctx.join("dir/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("dir/run.sh", ctx.join("link")).expect("symlink");
    let fifo = Command::new("mkfifo")
        .arg(ctx.join("pipe"))
        .status()
        .expect("mkfifo");
    assert!(fifo.success());
    ctx
}

fn ok(output: &Output, what: &str) {
    assert!(output.status.success(), "{what}: {:?}", texts(output));
}

/// Every name in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn outputs_where_the_caller_cannot_write_fail_with_its_own_permission_denied() {
    if !privileged("outputs_where_the_caller_cannot_write_fail_with_its_own_permission_denied") {
        return;
    }
    let daemon = group_daemon();
    let ctx = context(&daemon, "denied");
    let ctx = ctx.to_str().expect("utf-8");
    let stamp = std::process::id();
    for (spec, place) in [
        (format!("type=local,dest=/root/mb-out-{stamp}"), "/root"),
        (format!("type=tar,dest=/etc/mb-out-{stamp}.tar"), "/etc"),
        (format!("type=oci,dest=/etc/mb-out-{stamp}.oci"), "/etc"),
        (
            format!("type=oci,tar=false,dest=/etc/mb-out-{stamp}.d"),
            "/etc",
        ),
    ] {
        let before = names(Path::new(place));
        let output = as_member(&daemon, daemon.dir.path(), &["build", ctx, "-o", &spec]);
        let (_, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(6), "{spec}: {stderr}");
        assert!(
            stderr.to_lowercase().contains("permission denied"),
            "{spec}: {stderr}"
        );
        assert_eq!(names(Path::new(place)), before, "{spec} created something");
    }
    // The client refused before asking: no step was built.
    let stats = daemon.run_client(&["cache", "stats", "--json"]);
    ok(&stats, "cache stats");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("json");
    assert_eq!(stats["action_entries"], 0, "{stats}");
}

#[test]
fn a_relative_dest_lands_in_the_clients_directory_owned_by_the_client() {
    if !privileged("a_relative_dest_lands_in_the_clients_directory_owned_by_the_client") {
        return;
    }
    let daemon = group_daemon();
    let ctx = context(&daemon, "relative");
    let work = daemon.dir.path().join("work");
    std::fs::create_dir(&work).expect("work");
    std::os::unix::fs::chown(&work, Some(MEMBER_UID), None).expect("chown");
    let output = as_member(
        &daemon,
        &work,
        &[
            "build",
            ctx.to_str().expect("utf-8"),
            "--progress",
            "quiet",
            "-o",
            "type=tar,dest=rootfs.tar",
            "-o",
            "type=local,dest=rootfs",
            "-o",
            "type=oci,tar=false,dest=./layout",
        ],
    );
    ok(&output, "build as the group member");
    assert_eq!(names(&work), ["layout", "rootfs", "rootfs.tar"]);
    let tar = std::fs::metadata(work.join("rootfs.tar")).expect("tar");
    assert_eq!((tar.uid(), tar.mode() & 0o777), (MEMBER_UID, 0o640));

    // Unpacked as `tar --no-same-owner` would: the caller's files, modes under its umask,
    // the FIFO made, the image's owners not kept.
    let rootfs = work.join("rootfs");
    let listing = dir_listing(&rootfs);
    assert_eq!(
        std::fs::metadata(&rootfs).expect("rootfs").mode() & 0o777,
        0o750
    );
    for path in ["app/app.txt", "app/dir", "app/dir/run.sh", "owned"] {
        let meta = std::fs::metadata(rootfs.join(path)).expect(path);
        assert_eq!(meta.uid(), MEMBER_UID, "{path}: {listing:?}");
    }
    let run = std::fs::metadata(rootfs.join("app/dir/run.sh")).expect("run.sh");
    assert_eq!(run.mode() & 0o777, 0o750);
    let pipe = std::fs::symlink_metadata(rootfs.join("app/pipe")).expect("pipe");
    assert!(pipe.file_type().is_fifo());
    assert_eq!(
        std::fs::read_link(rootfs.join("app/link")).expect("link"),
        Path::new("dir/run.sh")
    );
    let layout = std::fs::metadata(work.join("layout/index.json")).expect("layout");
    assert_eq!(layout.uid(), MEMBER_UID);
}

/// What a killed output leaves in `dir`: nothing under `dest`'s name, at most the temp a
/// SIGKILLed client could not remove (hidden, beside it), which is cleared for the next run.
fn nothing_at(dir: &Path, dest: &str, temp_allowed: bool) {
    let left = names(dir);
    assert!(!left.iter().any(|n| n == dest), "{dest} exists: {left:?}");
    for name in &left {
        assert!(
            temp_allowed && name.starts_with(&format!(".{dest}.")) && name.ends_with(".partial"),
            "{name} left beside {dest}"
        );
        let path = dir.join(name);
        if path.is_dir() {
            std::fs::remove_dir_all(path).expect("clear temp dir");
        } else {
            std::fs::remove_file(path).expect("clear temp");
        }
    }
}

/// Starts an export of `spec` into `dir` and waits until the client has written at least
/// 2 MiB of it to its temp.
fn start_export(daemon: &TestDaemon, ctx: &Path, dir: &Path, spec: &str) -> KillOnDrop {
    let child = daemon
        .client()
        .args([
            "build",
            ctx.to_str().expect("utf-8"),
            "--progress",
            "quiet",
            "-o",
            spec,
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn memobuild");
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written = du(dir);
        if written >= 2 << 20 {
            break;
        }
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "{spec}: the client ended before the output was under way ({written} bytes)"
        );
        assert!(Instant::now() < deadline, "{spec}: no output after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Bytes of regular files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[test]
fn a_client_or_daemon_killed_mid_export_leaves_nothing_under_the_destination() {
    let mut daemon = TestDaemon::start();
    let ctx = daemon.dir.path().join("big");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY big /\n").expect("Dockerfile");
    // 48 MiB: an export that takes a while.
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut big = std::fs::File::create(ctx.join("big")).expect("big");
    for i in 0..48u8 {
        let mut block = block.clone();
        block[0] = i;
        std::io::Write::write_all(&mut big, &block).expect("write");
    }
    drop(big);
    let built = daemon.run_client(&["build", ctx.to_str().expect("utf-8"), "--progress", "quiet"]);
    ok(&built, "first build");

    let out = daemon.dir.path().join("out");
    std::fs::create_dir(&out).expect("out");
    for round in 0..2 {
        for (spec, dest, sig) in [
            ("type=tar,dest=big.tar", "big.tar", libc::SIGKILL),
            ("type=local,dest=rootfs", "rootfs", libc::SIGKILL),
            // Uncompressed: a gzip form of the layer would be made before anything streams.
            (
                "type=oci,compression=uncompressed,dest=big.oci",
                "big.oci",
                libc::SIGKILL,
            ),
            ("type=tar,dest=big.tar", "big.tar", libc::SIGTERM),
        ] {
            let mut child = start_export(&daemon, &ctx, &out, spec);
            signal(child.0.id(), sig);
            let status = wait_bounded(&mut child.0, Duration::from_secs(30));
            assert!(
                !status.success(),
                "round {round}, {spec}: the client finished"
            );
            // SIGTERM lets the client remove its temp; SIGKILL cannot.
            nothing_at(&out, dest, sig == libc::SIGKILL);
        }
    }

    // The daemon killed mid-export: the client fails and removes its temp.
    let mut child = start_export(&daemon, &ctx, &out, "type=tar,dest=big.tar");
    daemon.kill();
    let status = wait_bounded(&mut child.0, Duration::from_secs(30));
    assert!(!status.success(), "the client saw its daemon die");
    nothing_at(&out, "big.tar", false);
}

/// sha256 of a file, through the system tool.
fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    ok(&output, "sha256sum");
    texts(&output).0.split(' ').next().expect("sum").to_owned()
}

fn skopeo_digest(image: &str) -> String {
    let output = Command::new("skopeo")
        .args(["inspect", "--format", "{{.Digest}}", image])
        .output()
        .expect("skopeo");
    ok(&output, image);
    texts(&output).0.trim().to_owned()
}

#[test]
fn every_output_type_arrives_whole_and_other_tools_read_it() {
    if !privileged("every_output_type_arrives_whole_and_other_tools_read_it") {
        return;
    }
    let daemon = TestDaemon::start();
    let ctx = context(&daemon, "types");
    let ctx = ctx.to_str().expect("utf-8");
    let work = daemon.dir.path().join("work");
    std::fs::create_dir(&work).expect("work");
    let build = |suffix: &str| {
        let specs = [
            format!("type=oci,dest=image{suffix}.tar"),
            format!("type=oci,tar=false,dest=layout{suffix}"),
            format!("type=docker,dest=docker{suffix}.tar"),
            format!("type=local,dest=rootfs{suffix}"),
            format!("type=tar,dest=rootfs{suffix}.tar"),
        ];
        let mut client = daemon.client();
        client
            .args(["build", ctx, "-t", "outputs", "--progress", "quiet"])
            .current_dir(&work);
        for spec in &specs {
            client.args(["-o", spec]);
        }
        ok(
            &client.output().expect("memobuild"),
            "build with five outputs",
        );
    };
    build("");
    // The same build exported again gives the same bytes, so the same digests.
    build("-again");
    for file in ["image.tar", "docker.tar", "rootfs.tar"] {
        let again = file.replace(".tar", "-again.tar");
        assert_eq!(
            sha256(&work.join(file)),
            sha256(&work.join(again)),
            "{file}"
        );
    }

    let path = |name: &str| work.join(name).display().to_string();
    let digest = skopeo_digest(&format!("oci-archive:{}", path("image.tar")));
    assert_eq!(
        skopeo_digest(&format!("oci:{}:outputs", path("layout"))),
        digest,
        "the layout directory is the archive unpacked"
    );
    assert_eq!(
        skopeo_digest(&format!("docker-archive:{}", path("docker.tar"))).len(),
        digest.len()
    );

    let bundle = work.join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:outputs", path("layout"))])
        .arg(&bundle)
        .output()
        .expect("umoci");
    ok(&unpack, "umoci unpack");

    // The FIFO is kept as one everywhere; the listings describe the rest.
    let rootfs = work.join("rootfs");
    for dir in [&rootfs, &bundle.join("rootfs")] {
        let pipe = std::fs::symlink_metadata(dir.join("app/pipe")).expect("pipe");
        assert!(pipe.file_type().is_fifo(), "{}", dir.display());
    }
    let without_pipe = |mut listing: memobuild_tests::bench::Listing| {
        listing.remove("app/pipe").expect("the FIFO is listed");
        listing
    };
    let tar = without_pipe(tar_listing(&work.join("rootfs.tar")));
    assert!(tar["owned"].contains(" 7:8 "), "{:?}", tar["owned"]);
    assert_eq!(
        without_pipe(dir_listing(&rootfs)),
        tar,
        "type=local as root"
    );
    assert_eq!(
        without_pipe(dir_listing(&bundle.join("rootfs"))),
        tar,
        "umoci"
    );
}
