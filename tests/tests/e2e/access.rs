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
