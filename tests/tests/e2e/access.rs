//! Who may use the socket: its mode keeps strangers out, and the daemon re-checks each peer's
//! kernel-reported credentials. These tests switch uid with `setpriv`, so they need root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use memobuild_tests::{TestDaemon, bin, privileged, texts, users_gid};

const STRANGER_UID: &str = "4242";

/// `memobuild status` run as another uid/gid through setpriv.
fn status_as(daemon: &TestDaemon, uid: &str, gid: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ])
        .arg(bin("memobuild"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status")
        .env("HOME", "/nonexistent")
        .output()
        .expect("run setpriv")
}

/// Lets other uids reach the socket's directory (temp dirs are 0700).
fn open_directory(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
}

#[test]
fn a_caller_outside_the_rule_is_refused_even_through_a_loosened_socket() {
    if !privileged("a_caller_outside_the_rule_is_refused_even_through_a_loosened_socket") {
        return;
    }
    let daemon = TestDaemon::start();
    open_directory(daemon.dir.path());
    // A socket whose mode was loosened by hand (or by a unit's SocketMode=0666): the file
    // mode no longer protects it, the credential check still must.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let output = status_as(&daemon, STRANGER_UID, STRANGER_UID);
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains(&format!("uid {STRANGER_UID} may not use this memobuildd")),
        "{stderr}"
    );
    assert!(
        daemon
            .log_text()
            .contains("refused by the socket access rule")
    );
}

#[test]
fn the_socket_group_may_connect_and_others_may_not() {
    if !privileged("the_socket_group_may_connect_and_others_may_not") {
        return;
    }
    let gid = users_gid();
    let daemon = TestDaemon::start_with(|cmd| {
        cmd.args(["--socket-group", "users"]);
    });
    open_directory(daemon.dir.path());
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);

    let member = status_as(&daemon, STRANGER_UID, &gid.to_string());
    assert!(
        member.status.success(),
        "group member refused: {:?}",
        texts(&member)
    );

    let stranger = status_as(&daemon, "4243", "4243");
    let (_, stderr) = texts(&stranger);
    assert_eq!(stranger.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
}

const MEMBER_UID: u32 = 4242;

/// `memobuild ARGS…` as uid 4242 with the `users` group as a supplementary group: a
/// non-root member of the socket group, as the kernel sees it.
fn as_member(daemon: &TestDaemon, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={MEMBER_UID}"),
            &format!("--regid={MEMBER_UID}"),
            &format!("--groups={}", users_gid()),
            "--",
        ])
        .arg(bin("memobuild"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .env("HOME", "/nonexistent")
        .output()
        .expect("run setpriv")
}

/// Writes `path` with `text`, owned by `uid:gid` with `mode`.
fn file(path: &Path, text: &str, (uid, gid): (u32, u32), mode: u32) {
    std::fs::write(path, text).expect("write");
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn dir(path: &Path, (uid, gid): (u32, u32), mode: u32) {
    std::fs::create_dir_all(path).expect("mkdir");
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn refused(output: &std::process::Output, naming: &str) {
    let (stdout, stderr) = texts(output);
    assert_eq!(output.status.code(), Some(6), "{stdout}\n{stderr}");
    assert!(stderr.contains(naming), "{stderr}");
}

#[test]
fn a_socket_group_member_reads_only_what_it_could_read_itself() {
    if !privileged("a_socket_group_member_reads_only_what_it_could_read_itself") {
        return;
    }
    let daemon = TestDaemon::start_with(|cmd| {
        cmd.args(["--socket-group", "users"]);
    });
    open_directory(daemon.dir.path());
    let member = (MEMBER_UID, MEMBER_UID);
    let root = (0, 0);
    let ctx = daemon.dir.path().join("ctx");
    dir(&ctx, member, 0o755);
    let df = |name: &str, text: &str| {
        file(&ctx.join(name), text, member, 0o644);
        ctx.join(name).display().to_string()
    };
    let ctx_arg = ctx.display().to_string();
    // Readable through the supplementary group only.
    file(&ctx.join("shared.txt"), "shared", (0, users_gid()), 0o640);
    let shared = df("Dockerfile.shared", "FROM scratch\nCOPY shared.txt /\n");
    let built = as_member(&daemon, &["build", &ctx_arg, "-f", &shared]);
    assert!(built.status.success(), "{:?}", texts(&built));

    // Another user's 0600 file in the caller's own context: root builds it (and caches the
    // step), the member's build of the same step still fails, naming the file.
    file(&ctx.join("secret.txt"), "secret", root, 0o600);
    let secret = df("Dockerfile.secret", "FROM scratch\nCOPY secret.txt /\n");
    let by_root = daemon.run_client(&["build", &ctx_arg, "-f", &secret]);
    assert!(by_root.status.success(), "{:?}", texts(&by_root));
    let by_member = as_member(&daemon, &["build", &ctx_arg, "-f", &secret]);
    refused(
        &by_member,
        &format!("may not read {}", ctx.join("secret.txt").display()),
    );
    // And through a directory copy.
    let whole = df("Dockerfile.all", "FROM scratch\nCOPY . /all/\n");
    refused(
        &as_member(&daemon, &["build", &ctx_arg, "-f", &whole]),
        "secret.txt",
    );
    std::fs::remove_file(ctx.join("secret.txt")).expect("rm");

    // A link to /etc/shadow never yields its bytes.
    std::os::unix::fs::symlink("/etc/shadow", ctx.join("shadow")).expect("symlink");
    let shadow = df("Dockerfile.shadow", "FROM scratch\nCOPY shadow /\n");
    let out = as_member(
        &daemon,
        &["build", &ctx_arg, "-f", &shadow, "-o", "type=tar,dest=-"],
    );
    assert!(!out.status.success(), "{:?}", texts(&out));
    let first = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let root_line = first.lines().next().unwrap_or("root:");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(root_line));
    std::fs::remove_file(ctx.join("shadow")).expect("rm");

    // A Dockerfile or an ignore file the caller cannot read.
    file(&ctx.join("Dockerfile.root"), "FROM scratch\n", root, 0o600);
    let unreadable = ctx.join("Dockerfile.root").display().to_string();
    refused(
        &as_member(&daemon, &["build", &ctx_arg, "-f", &unreadable]),
        "may not read",
    );
    file(&ctx.join(".dockerignore"), "x\n", root, 0o600);
    refused(
        &as_member(&daemon, &["build", &ctx_arg, "-f", &shared]),
        ".dockerignore",
    );
    std::fs::remove_file(ctx.join(".dockerignore")).expect("rm");

    // Another user's 0700 directory as a context, to build or to watch.
    let private = daemon.dir.path().join("private");
    dir(&private, (4243, 4243), 0o700);
    file(
        &private.join("Dockerfile"),
        "FROM scratch\n",
        (4243, 4243),
        0o644,
    );
    let private_arg = private.display().to_string();
    refused(&as_member(&daemon, &["build", &private_arg]), "may not");
    refused(&as_member(&daemon, &["watch", &private_arg]), "may not");

    // notify: only paths the caller can read.
    let hidden = private.join("Dockerfile").display().to_string();
    refused(&as_member(&daemon, &["notify", &hidden]), "may not");
    let mine = ctx.join("shared.txt").display().to_string();
    let notified = as_member(&daemon, &["notify", &mine]);
    assert!(notified.status.success(), "{:?}", texts(&notified));
}
