//! Daemon life: start on demand, handshake, concurrency, exclusivity, stale sockets, signals.

use std::process::{Command, Stdio};

use memobuild_tests::{TestDaemon, process_exists, texts};

fn status_json(daemon: &TestDaemon) -> serde_json::Value {
    let output = daemon.run_client(&["status", "--json"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "status failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("bad JSON {err}: {stdout}"))
}

#[test]
fn status_reports_the_daemon_it_talks_to() {
    let daemon = TestDaemon::start();
    let status = status_json(&daemon);
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["socket"], daemon.socket.to_str().expect("utf-8"));
    assert_eq!(status["root"], daemon.root.to_str().expect("utf-8"));
    assert_eq!(
        status["protocol_version"],
        memobuild_protocol::PROTOCOL_VERSION
    );

    let human = daemon.run_client(&["status"]);
    let (stdout, _) = texts(&human);
    assert!(
        stdout.contains(&format!("pid {}", daemon.pid())),
        "{stdout}"
    );
    assert!(stdout.contains("workspaces:"), "{stdout}");
}

#[test]
fn twenty_concurrent_clients_are_all_served() {
    let daemon = TestDaemon::start();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            daemon
                .client()
                .args(["status", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn client")
        })
        .collect();
    for client in clients {
        let output = client.wait_with_output().expect("client output");
        let (stdout, stderr) = texts(&output);
        assert!(output.status.success(), "client failed: {stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(status["pid"], daemon.pid());
    }
    let status = status_json(&daemon);
    assert!(
        status["connections_total"].as_u64().expect("count") >= 21,
        "{status}"
    );
}

#[test]
fn client_starts_a_daemon_when_none_runs_and_stop_leaves_no_socket() {
    let place = TestDaemon::unstarted();
    assert!(!place.socket.exists());
    let output = place.run_client(&["status", "--json"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "status failed: {stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let pid = u32::try_from(status["pid"].as_u64().expect("pid")).expect("pid fits");
    assert!(place.socket.exists(), "daemon socket missing");
    assert!(
        place.root.join("memobuildd.log").exists(),
        "daemon log missing"
    );

    let running = place.run_client(&["daemon", "status"]);
    assert_eq!(running.status.code(), Some(0));

    let stop = place.run_client(&["daemon", "stop"]);
    let (stdout, stderr) = texts(&stop);
    assert!(stop.status.success(), "stop failed: {stderr}");
    assert!(stdout.contains("stopped"), "{stdout}");
    assert!(!place.socket.exists(), "socket left behind after stop");
    // `stop` returns once the socket and the root are released; the process itself is in
    // its last instructions by then and must be gone (or a zombie) very soon after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if !process_exists(pid) || stat.contains(") Z ") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "daemon {pid} still running: {stat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let stopped = place.run_client(&["daemon", "status"]);
    assert_eq!(stopped.status.code(), Some(3), "not running is exit code 3");
}

#[test]
fn daemon_restart_replaces_the_process() {
    let place = TestDaemon::unstarted();
    let start = place.run_client(&["daemon", "start"]);
    assert!(start.status.success(), "{:?}", texts(&start));
    let first = place.run_client(&["version", "--json"]);
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).expect("json");
    let restart = place.run_client(&["daemon", "restart"]);
    assert!(restart.status.success(), "{:?}", texts(&restart));
    let second = place.run_client(&["version", "--json"]);
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).expect("json");
    assert_ne!(first["daemon"]["pid"], second["daemon"]["pid"]);
    assert!(second["daemon"]["pid"].is_u64());
    let stop = place.run_client(&["daemon", "stop"]);
    assert!(stop.status.success());
}

#[test]
fn stale_socket_file_is_recovered() {
    let place = TestDaemon::unstarted();
    // What a crashed daemon leaves behind: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&place.socket).expect("stale socket"));
    let mut daemon = place;
    daemon.launch(|_| {}).expect("starts over a stale socket");
    assert!(status_json(&daemon)["pid"] == daemon.pid());
    assert!(
        daemon.log_text().contains("stale socket"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let first = TestDaemon::start();
    let other_root = first.dir.path().join("other-root");
    let output = Command::new(memobuild_tests::bin("memobuildd"))
        .arg("--root")
        .arg(&other_root)
        .arg("--socket")
        .arg(&first.socket)
        .output()
        .expect("run second daemon");
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first one is untouched.
    assert_eq!(status_json(&first)["pid"], first.pid());
}

#[test]
fn second_daemon_on_the_same_root_is_refused() {
    let first = TestDaemon::start();
    let output = Command::new(memobuild_tests::bin("memobuildd"))
        .arg("--root")
        .arg(&first.root)
        .arg("--socket")
        .arg(first.dir.path().join("other.sock"))
        .output()
        .expect("run second daemon");
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another memobuildd (pid {})",
            first.pid()
        )),
        "{stderr}"
    );
    assert!(!first.dir.path().join("other.sock").exists());
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let mut daemon = TestDaemon::start();
    assert!(daemon.socket.exists());
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!daemon.socket.exists(), "socket left behind");
    assert!(
        daemon.log_text().contains("SIGTERM"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_daemon_that_cannot_start_is_reported_with_its_log() {
    let place = TestDaemon::unstarted();
    let config = place.dir.path().join("memobuildd.toml");
    std::fs::write(&config, "socket_grup = \"typo\"\n").expect("config");
    let output = place
        .client()
        .env("MEMOBUILD_CONFIG", &config)
        .arg("status")
        .output()
        .expect("run");
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("before it was ready"), "{stderr}");
    assert!(
        stderr.contains("socket_grup"),
        "the log tail names the bad key: {stderr}"
    );
    assert!(!place.socket.exists());
}

#[test]
fn socket_activation_serves_the_socket_systemd_passes() {
    let place = TestDaemon::unstarted();
    let daemon = place.command();
    // systemd-socket-activate binds the socket, waits for the first connection, then runs
    // the daemon with LISTEN_FDS/LISTEN_PID exactly as systemd's .socket unit does.
    let mut activator = Command::new("systemd-socket-activate");
    activator
        .arg("--listen")
        .arg(&place.socket)
        .arg(daemon.get_program())
        .args(daemon.get_args())
        .envs(daemon.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(Stdio::null())
        .stderr(log_file(&place));
    let mut activator = activator
        .spawn()
        .expect("systemd-socket-activate is installed by .ci/run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !place.socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "activator never bound the socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let output = place.run_client(&["status", "--json"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}\n{}", place.log_text());
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(status["socket_activated"], true, "{status}");

    memobuild_tests::signal(activator.id(), libc::SIGTERM);
    let exit = memobuild_tests::wait_bounded(&mut activator, std::time::Duration::from_secs(15));
    assert!(exit.success(), "{exit}\n{}", place.log_text());
    // The socket file belongs to the service manager, which outlives the daemon.
    assert!(
        place.socket.exists(),
        "an activated daemon must not remove the socket"
    );
}

fn log_file(place: &TestDaemon) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&place.log)
        .expect("log")
}
