//! Starting `memobuildd` on demand and knowing, not guessing, when it is ready.
//!
//! The daemon already tells systemd it is ready with `sd_notify` (READY=1 on the datagram
//! socket named by `NOTIFY_SOCKET`). The client plays systemd's part: it binds a private
//! datagram socket, starts the daemon with `NOTIFY_SOCKET` pointing at it, and waits for
//! READY=1, for the daemon to exit (then it shows the log), or for a timeout.

use std::fs::OpenOptions;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use memobuild_protocol::paths::LOG_FILE;

/// How long a starting daemon may take before the client gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "cannot find the memobuildd binary next to {client} or on PATH; install it beside `memobuild`"
    )]
    BinaryNotFound { client: PathBuf },
    #[error("preparing to start memobuildd: {0}")]
    Prepare(#[source] std::io::Error),
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memobuildd exited ({status}) before it was ready; its log {log}:\n{tail}")]
    Exited {
        status: ExitStatus,
        log: String,
        tail: String,
    },
    #[error("memobuildd did not report ready within {timeout:?}; see its log {log}")]
    Timeout { timeout: Duration, log: String },
}

/// Where a daemon started by the client lives.
#[derive(Debug, Clone)]
pub struct DaemonPlace {
    pub socket: PathBuf,
    pub root: PathBuf,
}

impl DaemonPlace {
    pub fn log_file(&self) -> PathBuf {
        self.root.join(LOG_FILE)
    }
}

/// Starts a detached `memobuildd` for `place` and returns once it is serving.
pub fn start_daemon(place: &DaemonPlace) -> Result<u32, LaunchError> {
    let binary = daemon_binary()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&place.root)
        .map_err(LaunchError::Prepare)?;
    let log_path = place.log_file();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(LaunchError::Prepare)?;
    let log_err = log.try_clone().map_err(LaunchError::Prepare)?;

    let mut command = Command::new(&binary);
    command
        .arg("--root")
        .arg(&place.root)
        .arg("--socket")
        .arg(&place.socket)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C meant for the client must not reach the daemon.
        .process_group(0);
    let child = spawn_until_ready(command, &log_path, START_TIMEOUT)?;
    Ok(child.id())
}

/// Spawns `command` with `NOTIFY_SOCKET` set and waits for READY=1. Also used by the
/// integration tests' daemon harness, which keeps the returned child to kill it.
pub fn spawn_until_ready(
    mut command: Command,
    log: &Path,
    timeout: Duration,
) -> Result<Child, LaunchError> {
    let notify = NotifySocket::bind().map_err(LaunchError::Prepare)?;
    command.env("NOTIFY_SOCKET", &notify.path);
    let binary = PathBuf::from(command.get_program());
    let mut child = command
        .spawn()
        .map_err(|source| LaunchError::Spawn { binary, source })?;
    let log_name = log.display().to_string();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        match notify.socket.recv(&mut buf) {
            Ok(n) if is_ready(&buf[..n]) => return Ok(child),
            Ok(_) => {}
            // A signal (a sibling process exiting, say) may interrupt the wait: wait again.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(err) => return Err(LaunchError::Prepare(err)),
        }
        // Checked between receive timeouts: a daemon that dies early is reported at once.
        if let Some(status) = child.try_wait().map_err(LaunchError::Prepare)? {
            return Err(LaunchError::Exited {
                status,
                log: log_name,
                tail: log_tail(log, 15),
            });
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Timeout {
                timeout,
                log: log_name,
            });
        }
    }
}

fn is_ready(message: &[u8]) -> bool {
    message
        .split(|b| *b == b'\n')
        .any(|line| line == b"READY=1")
}

/// A datagram socket in a fresh private directory, removed on drop.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    dir: PathBuf,
}

impl NotifySocket {
    fn bind() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // /tmp rather than the state root: socket paths are limited to 107 bytes.
        let dir =
            std::env::temp_dir().join(format!("memobuild-start-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self { socket, path, dir })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `memobuildd` next to this executable (an install or a cargo target dir), else on PATH.
pub fn daemon_binary() -> Result<PathBuf, LaunchError> {
    let client = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("memobuild"));
    if let Some(sibling) = client.parent().map(|dir| dir.join("memobuildd"))
        && sibling.is_file()
    {
        return Ok(sibling);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("memobuildd"))
        .find(|candidate| candidate.is_file())
        .ok_or(LaunchError::BinaryNotFound { client })
}

fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_a_whole_line() {
        assert!(is_ready(b"STATUS=serving\nREADY=1"));
        assert!(is_ready(b"READY=1\n"));
        assert!(!is_ready(b"READY=10"));
        assert!(!is_ready(b"STOPPING=1"));
    }

    #[test]
    fn a_daemon_that_dies_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        std::fs::write(&log, "first\nboom: root is locked\n").expect("log");
        let command = Command::new("false");
        let err = spawn_until_ready(command, &log, Duration::from_secs(5)).expect_err("exits");
        let text = err.to_string();
        assert!(text.contains("boom: root is locked"), "{text}");
    }

    #[test]
    fn ready_message_ends_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut command = Command::new("sh");
        // Sends what sd_notify sends, from outside Rust.
        command.args([
            "-c",
            "python3 -c 'import os,socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"READY=1\", os.environ[\"NOTIFY_SOCKET\"])' && sleep 5",
        ]);
        let mut child = spawn_until_ready(command, &log, Duration::from_secs(5)).expect("ready");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}
