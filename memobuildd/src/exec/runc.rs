//! The runc executor: `runc --root <state> run --bundle <dir> <id>` in the foreground.
//!
//! The bundle's `config.json` is an oci-spec `Spec`: runc's defaults for mounts and masked
//! paths, Docker's default capability set (what `apt-get` and `chown` in a RUN expect),
//! BuildKit's /etc/hosts and /etc/resolv.conf as read-only bind mounts of files in the bundle
//! (so they never land in the layer; /etc/hostname is the image's own, as there), and
//! either the host network or a private
//! namespace with loopback up. A prebuild's step runs at low priority: runc is started at
//! nice 19 and the lowest best-effort I/O priority, which runc and the container's processes
//! inherit (runc
//! 1.1 has no `scheduler`/`ioPriority` in the process spec; this works with every version,
//! cgroup v1 or v2). A guard deletes the container (and the namespace) however the
//! run ends, so a cancelled or failed step leaves nothing behind.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxNamespace, LinuxNamespaceType, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::{ExecError, Executor, LogSink, LogStream, MountSource, Network, RunRequest};

const HOSTNAME: &str = "memobuild";
/// Longest chunk of a line without a newline that is sent as one log record.
const MAX_LOG_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    /// runc's state directory, private to this daemon root so that `runc list` there shows
    /// exactly our containers and crash recovery can delete them all.
    state_root: PathBuf,
}

impl Runc {
    /// Finds `runc` (else `crun`, which takes the same arguments) on PATH.
    pub fn find(state_root: PathBuf) -> Result<Self, ExecError> {
        let binary = ["runc", "crun"]
            .iter()
            .find_map(|name| find_on_path(name))
            .ok_or_else(|| ExecError::RuntimeMissing {
                runtime: "runc".into(),
            })?;
        Ok(Self { binary, state_root })
    }

    pub fn state_root(&self) -> &Path {
        &self.state_root
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.state_root)
            // runc reads these itself; ours belong to systemd and to the client's wait.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        command
    }

    fn delete(&self, id: &str) {
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    fn write_bundle(&self, request: &RunRequest, netns: Option<&Path>) -> Result<(), ExecError> {
        let io = |what: &str| {
            let what = format!("{what} in {}", request.bundle.display());
            move |source| ExecError::Io { what, source }
        };
        std::fs::create_dir_all(&request.bundle).map_err(io("creating the bundle"))?;
        let etc = [
            ("hosts", hosts_file()),
            ("resolv.conf", resolv_conf(request.network)),
        ];
        for (name, content) in &etc {
            std::fs::write(request.bundle.join(name), content).map_err(io("writing /etc files"))?;
        }
        let spec = spec(request, netns).map_err(ExecError::Spec)?;
        spec.save(request.bundle.join("config.json"))
            .map_err(ExecError::Spec)
    }
}

impl Executor for Runc {
    fn run(
        &self,
        request: &RunRequest,
        logs: &mut LogSink<'_>,
        cancel: &AtomicBool,
    ) -> Result<i32, ExecError> {
        let netns = match request.network {
            Network::Host => None,
            Network::None => Some(NetNs::create(&request.id)?),
        };
        self.write_bundle(request, netns.as_ref().map(NetNs::path).as_deref())?;
        let _container = ContainerGuard {
            runc: self,
            id: &request.id,
        };
        let mut run = self.command();
        if request.background {
            lower_priority(&mut run);
        }
        let mut child = run
            .arg("run")
            .arg("--bundle")
            .arg(&request.bundle)
            .arg(&request.id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ExecError::Io {
                what: format!("starting {}", self.binary.display()),
                source,
            })?;
        let (lines, received) = mpsc::channel();
        let readers = [
            spawn_reader(child.stdout.take(), LogStream::Stdout, lines.clone()),
            spawn_reader(child.stderr.take(), LogStream::Stderr, lines),
        ];
        let mut killed = false;
        loop {
            match received.recv_timeout(Duration::from_millis(50)) {
                Ok((stream, line)) => logs(stream, &line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Both pipes closed: the container's processes are gone.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if !killed && cancel.load(Ordering::Relaxed) {
                // A kill sent before runc has created the container fails: send it again
                // at the next tick rather than let the step run to its end.
                killed = self
                    .command()
                    .args(["kill", &request.id, "KILL"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
            }
        }
        for reader in readers.into_iter().flatten() {
            let _ = reader.join();
        }
        let status = child.wait().map_err(|source| ExecError::Io {
            what: "waiting for runc".into(),
            source,
        })?;
        if killed || cancel.load(Ordering::Relaxed) {
            return Err(ExecError::Cancelled);
        }
        Ok(status.code().unwrap_or(128 + 9))
    }

    fn clean_up(&self) {
        let Ok(entries) = std::fs::read_dir(&self.state_root) else {
            return;
        };
        for id in entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
        {
            tracing::warn!(container = %id, "deleting a container a previous daemon left behind");
            self.delete(&id);
        }
    }
}

/// Makes the process `command` starts (and so everything it starts) yield: nice 19, the
/// lowest best-effort I/O priority. Not the idle I/O class: under a steady load of other I/O
/// that class can wait forever, and a prebuild must still finish.
fn lower_priority(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    /// `IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 7)` (linux/ioprio.h); `IOPRIO_WHO_PROCESS` = 1.
    const IOPRIO_LOWEST: libc::c_long = (2 << 13) | 7;
    #[expect(
        unsafe_code,
        reason = "pre_exec runs between fork and exec; setpriority and ioprio_set have no safe wrapper"
    )]
    // SAFETY: the closure only makes two async-signal-safe system calls on the child itself,
    // allocating nothing and taking no lock.
    unsafe {
        command.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // An I/O class is a wish: a kernel or scheduler without it leaves the default.
            let _ = libc::syscall(libc::SYS_ioprio_set, 1, 0, IOPRIO_LOWEST);
            Ok(())
        });
    }
}

/// Deletes the container when the run ends, however it ends.
struct ContainerGuard<'a> {
    runc: &'a Runc,
    id: &'a str,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.runc.delete(self.id);
    }
}

/// A private network namespace with loopback up, for `--network none`.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create(id: &str) -> Result<Self, ExecError> {
        let netns = Self {
            name: format!("mb-{}", &id[id.len().saturating_sub(12)..]),
        };
        for args in [
            vec!["netns", "add", &netns.name],
            vec!["-n", &netns.name, "link", "set", "lo", "up"],
        ] {
            let output =
                Command::new("ip")
                    .args(&args)
                    .output()
                    .map_err(|source| ExecError::Io {
                        what: "running `ip` (iproute2) for --network none".into(),
                        source,
                    })?;
            if !output.status.success() {
                return Err(ExecError::Runtime {
                    runtime: "ip".into(),
                    code: output.status.code().unwrap_or(-1),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
        }
        Ok(netns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn spawn_reader(
    pipe: Option<impl Read + Send + 'static>,
    stream: LogStream,
    lines: mpsc::Sender<(LogStream, Vec<u8>)>,
) -> Option<std::thread::JoinHandle<()>> {
    let pipe = pipe?;
    Some(std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(MAX_LOG_CHUNK, pipe);
        loop {
            let mut line = Vec::new();
            match (&mut reader)
                .take(MAX_LOG_CHUNK as u64)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if lines.send((stream, line)).is_err() {
                        return;
                    }
                }
            }
        }
    }))
}

/// The runtime spec: runc's defaults, adjusted as Docker and BuildKit run build steps.
fn spec(request: &RunRequest, netns: Option<&Path>) -> Result<Spec, oci_spec::OciSpecError> {
    let mut spec = Spec::default();
    let capabilities: HashSet<Capability> = DOCKER_DEFAULT_CAPABILITIES.iter().copied().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(request.args.clone())
        .env(request.env.clone())
        .cwd(request.cwd.clone())
        .user(
            UserBuilder::default()
                .uid(request.user.uid)
                .gid(request.user.gid)
                .additional_gids(request.user.additional_gids.clone())
                .build()?,
        )
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(capabilities.clone())
                .effective(capabilities.clone())
                .permitted(capabilities)
                .build()?,
        )
        .no_new_privileges(false)
        .build()?;
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(request.rootfs.clone())
            .readonly(false)
            .build()?,
    ));
    spec.set_hostname(Some(HOSTNAME.to_owned()));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for name in ["hosts", "resolv.conf"] {
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from("/etc").join(name))
                .typ("bind")
                .source(request.bundle.join(name))
                .options(vec!["rbind".to_owned(), "ro".to_owned()])
                .build()?,
        );
    }
    for mount in &request.mounts {
        let builder = MountBuilder::default().destination(PathBuf::from(&mount.target));
        let built = match &mount.source {
            MountSource::Bind { path, readonly } => {
                builder.typ("bind").source(path.clone()).options(vec![
                    "rbind".to_owned(),
                    if *readonly { "ro" } else { "rw" }.to_owned(),
                ])
            }
            MountSource::Tmpfs { size } => {
                let mut options = vec!["nosuid".to_owned(), "nodev".to_owned()];
                options.extend(size.map(|bytes| format!("size={bytes}")));
                builder
                    .typ("tmpfs")
                    .source(PathBuf::from("tmpfs"))
                    .options(options)
            }
        };
        mounts.push(built.build()?);
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        let namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|mut ns| {
                if ns.typ() != LinuxNamespaceType::Network {
                    return Some(ns);
                }
                // Host network: no network namespace at all; none: join the prepared one.
                let path = netns?;
                ns.set_path(Some(path.to_owned()));
                Some(ns)
            })
            .collect();
        linux.set_namespaces(Some(namespaces));
    }
    Ok(spec)
}

/// Docker's default capability set for containers (and so for build steps).
const DOCKER_DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn hosts_file() -> String {
    format!(
        "127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback {HOSTNAME}\n"
    )
}

/// The host's resolver for the host network; nothing to resolve with for `none`.
fn resolv_conf(network: Network) -> String {
    match network {
        Network::Host => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        Network::None => String::new(),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
