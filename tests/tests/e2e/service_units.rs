//! The service manager files: systemd units verify, the launchd plist parses.

use std::path::PathBuf;
use std::process::Command;

use memobuild_tests::{bin, texts};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    // verify insists that ExecStart exists; point it at the binary just built instead of
    // the install location, and change nothing else.
    let service = std::fs::read_to_string(repo_file("systemd/memobuildd.service"))
        .expect("service unit")
        .replace(
            "/usr/local/bin/memobuildd",
            bin("memobuildd").to_str().expect("utf-8"),
        );
    assert!(service.contains("Type=notify"));
    std::fs::write(dir.path().join("memobuildd.service"), service).expect("write");
    std::fs::copy(
        repo_file("systemd/memobuildd.socket"),
        dir.path().join("memobuildd.socket"),
    )
    .expect("copy socket unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("memobuildd.service"))
        .arg(dir.path().join("memobuildd.socket"))
        .output()
        .expect("systemd-analyze is installed by .ci/run");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

#[test]
fn launchd_plist_parses_with_plistlib() {
    let plist = repo_file("launchd/dev.memobuild.memobuildd.plist");
    let script = "import plistlib, sys\n\
        d = plistlib.load(open(sys.argv[1], 'rb'))\n\
        assert d['Label'] == 'dev.memobuild.memobuildd', d['Label']\n\
        assert d['ProgramArguments'][0].endswith('memobuildd')\n\
        assert '--socket' in d['ProgramArguments']\n\
        assert d['KeepAlive'] and d['StandardErrorPath'] and d['StandardOutPath']\n\
        print('ok')";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&plist)
        .output()
        .expect("python3");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success() && stdout.trim() == "ok", "{stderr}");
}
