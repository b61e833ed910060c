//! A real build bench for the feature modules of the e2e binary: a [`TestRegistry`] seeded
//! with busybox, a [`TestDaemon`], and listings of what a build produced.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::registry::TestRegistry;
use crate::{TestDaemon, texts};

/// path → "type mode uid:gid content-or-target"
pub type Listing = BTreeMap<String, String>;

#[derive(Debug)]
pub struct Bench {
    /// `None` once stopped, to show what works offline.
    pub registry: Option<TestRegistry>,
    pub daemon: TestDaemon,
    /// The seeded busybox image, `FROM BASE` in [`Bench::context`] files.
    pub base: String,
}

impl Bench {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts the daemon after `configure` has added its arguments or environment.
    pub fn start_with(configure: impl FnOnce(&mut std::process::Command)) -> Self {
        let registry = TestRegistry::start();
        registry.seed_busybox("busybox");
        let base = format!("{}/busybox", registry.address());
        Self {
            registry: Some(registry),
            daemon: TestDaemon::start_with(configure),
            base,
        }
    }

    /// A context directory holding `files`, with `FROM BASE` substituted in the Dockerfile.
    pub fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let ctx = self.daemon.dir.path().join(name);
        for (path, content) in files {
            let file = ctx.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, content.replace("BASE", &self.base)).expect("write");
        }
        ctx
    }

    pub fn build(&self, ctx: &Path, args: &[&str]) -> Output {
        let mut command = self.daemon.client();
        command
            .args(["build", "--progress", "json"])
            .arg(ctx)
            .args(args);
        command.output().expect("run memobuild build")
    }

    /// Builds and returns the result record (fails the test on a failed build).
    pub fn build_ok(&self, ctx: &Path, args: &[&str]) -> serde_json::Value {
        let output = self.build(ctx, args);
        let (_, stderr) = texts(&output);
        assert!(
            output.status.success(),
            "build failed: {stderr}\ndaemon log:\n{}",
            tail(&self.daemon.log_text())
        );
        stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("result").cloned())
            .unwrap_or_else(|| panic!("no result line in: {stderr}"))
    }

    pub fn rootfs_tar(&self, ctx: &Path, args: &[&str]) -> Listing {
        let out = self
            .daemon
            .dir
            .path()
            .join(format!("rootfs-{}.tar", unique()));
        let dest = format!("type=tar,dest={}", out.display());
        let mut all = vec!["-o", &dest];
        all.extend_from_slice(args);
        self.build_ok(ctx, &all);
        tar_listing(&out)
    }

    /// Builds `-o type=oci` tagged `tag`, then reads it back with other tools only: skopeo
    /// for the manifest's layer digests, umoci for the root filesystem.
    pub fn oci_image(&self, ctx: &Path, tag: &str) -> (Vec<String>, Listing) {
        let work = self.daemon.dir.path().join(format!("oci-{}", unique()));
        let archive = work.with_extension("tar");
        let dest = format!("type=oci,dest={}", archive.display());
        self.build_ok(ctx, &["-t", tag, "-o", &dest]);
        let layout = work.join("layout");
        std::fs::create_dir_all(&layout).expect("layout");
        tar::Archive::new(std::fs::File::open(&archive).expect("oci"))
            .unpack(&layout)
            .expect("unpack layout");
        let image = format!("{}:{tag}", layout.display());
        let inspect = Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{image}"))
            .output()
            .expect("skopeo is installed by .ci/install-deps");
        assert!(inspect.status.success(), "skopeo: {:?}", texts(&inspect));
        let manifest: serde_json::Value =
            serde_json::from_slice(&inspect.stdout).expect("manifest json");
        let layers = manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|layer| layer["digest"].as_str().expect("digest").to_owned())
            .collect();
        let bundle = work.join("bundle");
        let umoci = Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle)
            .output()
            .expect("umoci is installed by .ci/install-deps");
        assert!(umoci.status.success(), "umoci unpack: {:?}", texts(&umoci));
        (layers, dir_listing(&bundle.join("rootfs")))
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub fn describe(kind: &str, mode: u32, uid: u64, gid: u64, content: &str) -> String {
    format!("{kind} {:o} {uid}:{gid} {content}", mode & 0o7777)
}

pub fn tar_listing(path: &Path) -> Listing {
    let mut archive = tar::Archive::new(std::fs::File::open(path).expect("open tar"));
    let mut listing = Listing::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        let header = entry.header().clone();
        let name = entry.path().expect("path").display().to_string();
        let name = name
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_owned();
        let (kind, content) = match header.entry_type() {
            tar::EntryType::Directory => ("dir", String::new()),
            tar::EntryType::Symlink => (
                "link",
                header
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Regular => {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).expect("read");
                ("file", blake3::hash(&bytes).to_hex()[..16].to_owned())
            }
            other => ("other", format!("{other:?}")),
        };
        let mode = header.mode().expect("mode");
        let uid = header.uid().expect("uid");
        let gid = header.gid().expect("gid");
        listing.insert(name, describe(kind, mode, uid, gid, &content));
    }
    listing
}

/// The same listing for an unpacked root filesystem, to compare with [`tar_listing`].
pub fn dir_listing(root: &Path) -> Listing {
    use std::os::unix::fs::MetadataExt;
    let mut listing = Listing::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("meta");
            let name = path
                .strip_prefix(root)
                .expect("inside")
                .display()
                .to_string();
            let (kind, content) = if meta.is_dir() {
                stack.push(path.clone());
                ("dir", String::new())
            } else if meta.file_type().is_symlink() {
                (
                    "link",
                    std::fs::read_link(&path)
                        .expect("link")
                        .display()
                        .to_string(),
                )
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).expect("read");
                ("file", blake3::hash(&bytes).to_hex()[..16].to_owned())
            } else {
                ("other", String::new())
            };
            listing.insert(
                name,
                describe(
                    kind,
                    meta.mode(),
                    u64::from(meta.uid()),
                    u64::from(meta.gid()),
                    &content,
                ),
            );
        }
    }
    listing
}

pub fn content_of(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..16].to_owned()
}

pub fn executed(result: &serde_json::Value) -> u64 {
    result["executed"].as_u64().expect("executed")
}
