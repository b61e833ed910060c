//! Support for the end-to-end tests: the real `memobuildd` on a temp socket and root
//! ([`TestDaemon`]), the real `memobuild` client ([`TestDaemon::client`]), the rule for
//! tests that need privileges ([`privileged`]) or tools ([`required_tool`]), and real servers
//! (`registry`, `buildgrid`, `nginx`, `docker`).
//!
//! The binaries are the ones cargo built next to the test executable; the README's test
//! command builds them first (`cargo build --workspace --bins`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use memobuild_client::Connection;
use memobuild_client::launch::spawn_until_ready;
use tempfile::TempDir;

pub mod bench;
pub mod buildgrid;
pub mod cacheserver;
pub mod conformance;
pub mod docker;
pub mod nginx;
pub mod registry;
pub mod workload;

pub use memobuildd::testing::{REQUIRE_PRIVILEGED_ENV, privileged};

/// Path of a workspace binary (`memobuild`, `memobuildd`) built beside this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A Python tool `.ci/install-deps` installs into the repository's venv (`.venv/bin/NAME`),
/// or from `$MEMOBUILD_VENV/bin/NAME`. `None` when it is not installed.
pub fn python_tool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("MEMOBUILD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let path = venv.join("bin").join(name);
    path.is_file().then_some(path)
}

/// A real daemon on a temp socket and temp root, killed on drop.
#[derive(Debug)]
pub struct TestDaemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl TestDaemon {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts a daemon after `configure` has added its arguments or environment.
    pub fn start_with(configure: impl FnOnce(&mut Command)) -> Self {
        let mut daemon = Self::unstarted();
        daemon.launch(configure).unwrap_or_else(|err| {
            panic!(
                "memobuildd did not start: {err}\nlog:\n{}",
                daemon.log_text()
            )
        });
        daemon
    }

    /// A temp place for a daemon, nothing started yet.
    pub fn unstarted() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mb")
            .tempdir()
            .expect("temp dir");
        Self {
            socket: dir.path().join("memobuildd.sock"),
            root: dir.path().join("root"),
            log: dir.path().join("memobuildd.log"),
            dir,
            child: None,
        }
    }

    /// The command that starts this daemon, before readiness handling is added.
    pub fn command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut command = Command::new(bin("memobuildd"));
        command
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .env("MEMOBUILD_LOG", "debug")
            .env_remove("MEMOBUILD_CONFIG")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        command
    }

    /// Starts the daemon and waits for its readiness message.
    pub fn launch(
        &mut self,
        configure: impl FnOnce(&mut Command),
    ) -> Result<(), memobuild_client::LaunchError> {
        let mut command = self.command();
        configure(&mut command);
        // Never leave a previous daemon of this place running behind the new one.
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.child = Some(spawn_until_ready(
            command,
            &self.log,
            Duration::from_secs(20),
        )?);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `memobuild` pointed at this daemon.
    pub fn client(&self) -> Command {
        let mut command = Command::new(bin("memobuild"));
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root);
        command
    }

    /// Runs `memobuild ARGS…` against this daemon and returns its output.
    pub fn run_client(&self, args: &[&str]) -> Output {
        self.client().args(args).output().expect("run memobuild")
    }

    pub async fn connect(&self) -> Connection {
        Connection::open(&self.socket)
            .await
            .unwrap_or_else(|err| panic!("connect: {err}\nlog:\n{}", self.log_text()))
    }

    /// SIGKILL, as a crash or the OOM killer would, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Sends SIGTERM and waits (bounded) for the daemon to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), libc::SIGTERM);
        wait_bounded(&mut child, Duration::from_secs(15))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process killed when dropped, so a failing test never leaves it running.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gid of the `users` group, which exists on every Debian system: the socket group of
/// tests that run the client as another user.
pub fn users_gid() -> u32 {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some("users")).then(|| fields.nth(1)?.parse().ok())?
        })
        .expect("group `users` in /etc/group")
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: kill has no memory-safety preconditions.
    #[expect(unsafe_code, reason = "sending a signal to a process the test started")]
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits for `child` to exit, killing it if it takes longer than `limit`.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lossy stdout and stderr of a finished command, for assertions and failure messages.
pub fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// How long a test server may take to listen.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// `path` if the tool is there; otherwise a skip message, or a failure where skips are not
/// allowed.
pub fn required_tool(test: &str, tool: &str, path: Option<PathBuf>) -> Option<PathBuf> {
    if path.is_some() {
        return path;
    }
    let strict = std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_some()
        || std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !strict,
        "{test} needs {tool} (bash .ci/install-deps installs it) and skipping is not allowed here"
    );
    eprintln!("SKIPPED {test}: {tool} is not installed (bash .ci/install-deps)");
    None
}

/// Waits until something accepts connections on `port`, failing early if `child` exits.
pub fn wait_listening(child: &mut Child, port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {READY_WITHIN:?}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn spawn_logged(mut command: Command, log: &Path, what: &str) -> Child {
    let file = std::fs::File::create(log).expect("server log");
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|err| panic!("start {what}: {err}"))
}
