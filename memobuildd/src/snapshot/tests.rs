//! Overlay snapshots under the real runc executor (needs root, runc, overlayfs).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::exec::{
    Executor, LogStream, MountSource, Network, ProcessUser, RunRequest, Runc, StepMount,
};
use crate::testing::privileged;

const APPLETS: &[&str] = &[
    "sh", "echo", "ls", "cat", "rm", "sleep", "id", "mkdir", "df", "grep", "cut",
];

/// A layer store holding one busybox layer, `busybox`.
fn store_with_busybox() -> (tempfile::TempDir, Overlay) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layers = dir.path().join("layers");
    let bin = layers.join("busybox/bin");
    std::fs::create_dir_all(&bin).expect("bin");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet");
    }
    (dir, Overlay::new(layers))
}

fn request(dir: &Path, rootfs: &Path, id: &str, script: &str, network: Network) -> RunRequest {
    RunRequest {
        id: id.to_owned(),
        bundle: dir.join(format!("bundle-{id}")),
        rootfs: rootfs.to_owned(),
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: ProcessUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        },
        network,
        mounts: Vec::new(),
        background: false,
    }
}

fn run(
    runc: &Runc,
    req: &RunRequest,
    cancel: &AtomicBool,
) -> (Result<i32, crate::exec::ExecError>, String) {
    let output = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&output);
    let mut logs = move |_: LogStream, line: &[u8]| {
        let mut out = sink.lock().expect("lock");
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    };
    let result = runc.run(req, &mut logs, cancel);
    let text = output.lock().expect("lock").clone();
    (result, text)
}

/// A busybox layer store, a step's scratch dir with the overlay mounted on it, and runc.
fn mounted_busybox() -> (tempfile::TempDir, PathBuf, Active, Runc) {
    let (dir, overlay) = store_with_busybox();
    let scratch = dir.path().join("step");
    std::fs::create_dir(&scratch).expect("scratch");
    let active = overlay
        .prepare(&["busybox".into()], &scratch)
        .expect("mount");
    let runc = Runc::find(dir.path().join("runc")).expect("runc is installed");
    (dir, scratch, active, runc)
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.to_str().expect("utf-8")))
}

#[test]
fn a_run_writes_only_its_changes_to_the_upper_dir() {
    if !privileged("a_run_writes_only_its_changes_to_the_upper_dir") {
        return;
    }
    let (dir, scratch, active, runc) = mounted_busybox();
    let req = request(
        dir.path(),
        active.rootfs(),
        "mb-test-upper",
        "echo hello; echo err >&2; echo data > /made; rm /bin/cat; cat /etc/hostname 2>&1; exit 3",
        Network::Host,
    );
    let (code, logs) = run(&runc, &req, &AtomicBool::new(false));
    assert_eq!(code.expect("ran"), 3, "{logs}");
    assert!(logs.contains("hello\n") && logs.contains("err\n"), "{logs}");
    let upper = active.unmount().expect("unmount");
    assert_eq!(
        std::fs::read_to_string(upper.join("made")).expect("made"),
        "data\n"
    );
    let whiteout = std::fs::symlink_metadata(upper.join("bin/cat")).expect("whiteout");
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    assert!(!mounted(&scratch.join("rootfs")));
    assert!(std::fs::read_dir(runc.state_root()).map_or(true, |mut d| d.next().is_none()));
}

#[test]
fn bind_and_tmpfs_mounts_reach_the_step_and_not_its_upper_dir() {
    if !privileged("bind_and_tmpfs_mounts_reach_the_step_and_not_its_upper_dir") {
        return;
    }
    let (dir, _scratch, active, runc) = mounted_busybox();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).expect("cache");
    std::fs::write(cache.join("old"), "from before\n").expect("old");
    let mut req = request(
        dir.path(),
        active.rootfs(),
        "mb-test-mounts",
        "cat /c/old && echo new > /c/new && echo t > /t/x && df /t | grep tmpfs \
         && ! echo no > /ro/x",
        Network::Host,
    );
    let readonly = dir.path().join("readonly");
    std::fs::create_dir(&readonly).expect("readonly");
    req.mounts = vec![
        StepMount {
            target: "/c".into(),
            source: MountSource::Bind {
                path: cache.clone(),
                readonly: false,
            },
        },
        StepMount {
            target: "/t".into(),
            source: MountSource::Tmpfs {
                size: Some(1 << 20),
            },
        },
        StepMount {
            target: "/ro".into(),
            source: MountSource::Bind {
                path: readonly.clone(),
                readonly: true,
            },
        },
    ];
    let (code, logs) = run(&runc, &req, &AtomicBool::new(false));
    assert_eq!(code.expect("ran"), 0, "{logs}");
    assert!(logs.contains("from before"), "{logs}");
    let upper = active.unmount().expect("unmount");
    assert_eq!(
        std::fs::read_to_string(cache.join("new")).expect("new"),
        "new\n"
    );
    assert!(!readonly.join("x").exists());
    // What reached the upper dir: only the mount points the runtime made.
    for target in ["c", "t", "ro"] {
        let entries = std::fs::read_dir(upper.join(target)).map(|d| d.count());
        assert_eq!(entries.unwrap_or(0), 0, "{target}");
    }
}

#[test]
fn a_background_run_has_the_lowest_cpu_and_io_priority() {
    if !privileged("a_background_run_has_the_lowest_cpu_and_io_priority") {
        return;
    }
    let (dir, _scratch, active, runc) = mounted_busybox();
    // Field 19 of /proc/PID/stat is the nice value; the I/O class is in /proc only via
    // ioprio_get, so the test reads the container's process from the host while it sleeps.
    let script = "cut -d' ' -f19 /proc/self/stat; sleep 9.125";
    for (background, nice) in [(true, "19"), (false, "0")] {
        let mut req = request(
            dir.path(),
            active.rootfs(),
            &format!("mb-test-prio-{background}"),
            script,
            Network::Host,
        );
        req.background = background;
        let cancel = Arc::new(AtomicBool::new(false));
        let running = std::thread::spawn({
            let (runc, cancel) = (runc.clone(), Arc::clone(&cancel));
            move || run(&runc, &req, &cancel)
        });
        let sleeper = wait_for_process("sleep 9.125");
        let prio = io_priority(sleeper);
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        let (_, logs) = running.join().expect("run");
        assert_eq!(logs.trim(), nice, "background={background}");
        // Best effort (class 2), level 7: the lowest that still always gets its turn.
        let lowest = (2 << 13) | 7;
        assert_eq!(
            prio == lowest,
            background,
            "ioprio {prio:#x}, background={background}"
        );
    }
}

/// The pid of the process whose command line is `wanted` (spaces for NULs), within 10 s.
fn wait_for_process(wanted: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.trim_end() == wanted {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no process {wanted:?}");
}

fn io_priority(pid: i32) -> i64 {
    #[expect(unsafe_code, reason = "ioprio_get has no wrapper in libc")]
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(libc::SYS_ioprio_get, 1, pid)
    }
}

#[test]
fn network_none_has_only_loopback() {
    if !privileged("network_none_has_only_loopback") {
        return;
    }
    let (dir, _scratch, active, runc) = mounted_busybox();
    let req = request(
        dir.path(),
        active.rootfs(),
        "mb-test-netnone",
        "ls /sys/class/net",
        Network::None,
    );
    let (code, logs) = run(&runc, &req, &AtomicBool::new(false));
    assert_eq!(code.expect("ran"), 0, "{logs}");
    assert_eq!(logs.trim(), "lo");
}

#[test]
fn cancelling_kills_the_step_and_leaves_nothing_behind() {
    if !privileged("cancelling_kills_the_step_and_leaves_nothing_behind") {
        return;
    }
    let (dir, _scratch, active, runc) = mounted_busybox();
    let rootfs = active.rootfs().to_owned();
    {
        let req = request(
            dir.path(),
            &rootfs,
            "mb-test-cancel",
            "sleep 30",
            Network::Host,
        );
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let started = Instant::now();
        let (result, _) = run(&runc, &req, &cancel);
        assert!(
            matches!(result, Err(crate::exec::ExecError::Cancelled)),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let list = std::process::Command::new("runc")
            .arg("--root")
            .arg(runc.state_root())
            .arg("list")
            .output()
            .expect("runc list");
        assert!(!String::from_utf8_lossy(&list.stdout).contains("mb-test-cancel"));
        // Dropped without an explicit unmount: the guard must do it.
        drop(active);
    }
    assert!(!mounted(&rootfs), "the mount outlived the cancelled step");
}

#[test]
fn a_hundred_and_twenty_layers_still_mount() {
    if !privileged("a_hundred_and_twenty_layers_still_mount") {
        return;
    }
    let (dir, overlay) = store_with_busybox();
    let mut lowers = Vec::new();
    for i in 0..120 {
        let id = format!("{i:016x}");
        let layer = overlay.layers_dir().join(&id);
        std::fs::create_dir_all(&layer).expect("layer");
        std::fs::write(layer.join(format!("file{i}")), i.to_string()).expect("file");
        lowers.push(id);
    }
    lowers.reverse();
    lowers.push("busybox".into());
    let scratch = dir.path().join("deep");
    std::fs::create_dir(&scratch).expect("scratch");
    let active = overlay
        .prepare(&lowers, &scratch)
        .expect("120 layers mount");
    assert_eq!(
        std::fs::read_to_string(active.rootfs().join("file119")).expect("top layer"),
        "119"
    );
    assert!(active.rootfs().join("bin/busybox").is_file());
}
