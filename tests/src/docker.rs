//! A real Docker daemon for the tests: Debian's `dockerd` on a temp data root and a temp
//! socket, without iptables or a bridge (so it touches nothing of the host's network), torn
//! down with everything it mounted when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const READY_WITHIN: Duration = Duration::from_secs(60);
/// Debian's CLI, matching Debian's daemon: it builds with the daemon's built-in BuildKit,
/// where a newer `docker` on `PATH` would want the buildx plugin.
const DEBIAN_CLI: &str = "/usr/bin/docker";

#[derive(Debug)]
pub struct TestDocker {
    pub dir: TempDir,
    socket: PathBuf,
    child: Child,
}

impl TestDocker {
    /// Starts dockerd, or says why it cannot (no `docker.io`, no privileges).
    pub fn start() -> Result<Self, String> {
        if Command::new("dockerd").arg("--version").output().is_err() {
            return Err("dockerd is not installed (apt-get install docker.io)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("mbdocker")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let socket = dir.path().join("docker.sock");
        let log =
            std::fs::File::create(dir.path().join("dockerd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let mut docker = Self { dir, socket, child };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if docker.run(&["version"]).status.success() {
                return Ok(docker);
            }
            if let Ok(Some(status)) = docker.child.try_wait() {
                return Err(format!("dockerd exited ({status}):\n{}", docker.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd not ready within {READY_WITHIN:?}:\n{}",
                    docker.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `docker ARGS…` against this daemon.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("docker client (docker.io)")
    }

    /// The `docker` client pointed at this daemon, BuildKit on.
    pub fn command(&self) -> Command {
        let cli = if Path::new(DEBIAN_CLI).is_file() {
            DEBIAN_CLI
        } else {
            "docker"
        };
        let mut command = Command::new(cli);
        command
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .env("DOCKER_BUILDKIT", "1");
        command
    }

    /// Copies `reference` from a plain-HTTP registry into this daemon under the same name
    /// (skopeo to a `docker load` archive), as `bench/compare.sh` gives BuildKit its base.
    pub fn load_from_registry(&self, reference: &str) -> Result<(), String> {
        let archive = self.dir.path().join("loaded.tar");
        let _ = std::fs::remove_file(&archive);
        let copy = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("docker-archive:{}:{reference}", archive.display()))
            .output()
            .map_err(|e| format!("skopeo: {e}"))?;
        if !copy.status.success() {
            return Err(format!(
                "skopeo copy {reference}: {}",
                String::from_utf8_lossy(&copy.stderr)
            ));
        }
        let load = self.run(&["load", "-q", "-i", &archive.to_string_lossy()]);
        if !load.status.success() {
            return Err(format!(
                "docker load: {}",
                String::from_utf8_lossy(&load.stderr)
            ));
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for TestDocker {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop its containerd and unmount; SIGKILL only if it hangs.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_under(self.dir.path());
    }
}

fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|target| Path::new(target).starts_with(dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for target in targets {
        let _ = Command::new("umount").args(["-l", target]).status();
    }
}
