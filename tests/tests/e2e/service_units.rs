//! The service manager files: systemd units (the daemon's and the cache server's) verify,
//! the launchd plist parses.

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
fn cache_server_unit_passes_systemd_analyze_verify_and_runs_serve_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(repo_file("systemd/memobuild-cache.service"))
        .expect("cache service unit")
        .replace(
            "/usr/local/bin/memobuildd",
            bin("memobuildd").to_str().expect("utf-8"),
        );
    assert!(unit.contains("Type=notify"), "serve-cache reports READY=1");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.contains(" serve-cache ") && exec.contains("--dir /var/lib/memobuild-cache"));
    let path = dir.path().join("memobuild-cache.service");
    std::fs::write(&path, &unit).expect("write");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by .ci/run");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
    // The flags the unit passes are ones serve-cache accepts.
    let mut words: Vec<&str> = exec.split_whitespace().skip(2).collect();
    words.push("--help");
    let output = Command::new(bin("memobuildd"))
        .arg("serve-cache")
        .args(&words)
        .output()
        .expect("memobuildd");
    assert!(output.status.success(), "{:?}", texts(&output));
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
