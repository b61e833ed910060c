//! Root filesystems for RUN steps: the unpacked parent layers, read-only, under a fresh
//! writable upper directory, with overlayfs. After the step the upper directory *is* the
//! diff: `image::layer` turns it into a layer, and it becomes a lower layer itself.
//!
//! The main types are the [`Snapshotter`] trait, its [`Overlay`] implementation, and
//! [`Active`], a mounted snapshot that unmounts itself when dropped (so a cancelled or failed
//! step never leaves a mount behind). Layers live in `<root>/layers-v1/<id>/`, where `<id>`
//! is short (16 hex digits of the diff id): overlayfs takes all lower directories in one
//! mount option of at most a page, and short names relative to the layer store keep 100+
//! layer images mountable; the `store` owns that directory and names layers by diff-id.
//! Comes before `exec`, after the engine has the parents' layers.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting overlayfs at {}: {message}", target.display())]
    Mount { target: PathBuf, message: String },
    #[error("mounting a tmpfs at {}: {message}", target.display())]
    Tmpfs { target: PathBuf, message: String },
    #[error("{lowers} layers exceed overlayfs's limit of {MAX_LOWERS}; squash the base image")]
    TooDeep { lowers: usize },
}

/// overlayfs stacks at most this many lower directories (the kernel's OVL_MAX_STACK).
pub const MAX_LOWERS: usize = 500;

/// Makes writable root filesystems over stacks of layers.
pub trait Snapshotter: Send + Sync + std::fmt::Debug {
    /// Mounts `lowers` (layer ids, topmost first) read-only under a fresh upper directory,
    /// all inside `scratch` (which must exist and be empty).
    fn prepare(&self, lowers: &[String], scratch: &Path) -> Result<Active, SnapshotError>;
}

/// The overlayfs snapshotter over a layer store directory.
#[derive(Debug, Clone)]
pub struct Overlay {
    layers: PathBuf,
}

impl Overlay {
    pub fn new(layers: PathBuf) -> Self {
        Self { layers }
    }

    pub fn layers_dir(&self) -> &Path {
        &self.layers
    }
}

impl Snapshotter for Overlay {
    fn prepare(&self, lowers: &[String], scratch: &Path) -> Result<Active, SnapshotError> {
        if lowers.len() > MAX_LOWERS {
            return Err(SnapshotError::TooDeep {
                lowers: lowers.len(),
            });
        }
        let rootfs = scratch.join("rootfs");
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        let empty = scratch.join("empty");
        for dir in [&rootfs, &upper, &work, &empty] {
            std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        // overlayfs needs at least one lower directory; `FROM scratch` has none.
        let lowerdir = if lowers.is_empty() {
            empty.display().to_string()
        } else {
            lowers.join(":")
        };
        let options = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        // Relative lower names resolve against the mounting process's working directory:
        // run `mount` there rather than chdir-ing this multi-threaded daemon.
        let output = Command::new("mount")
            .current_dir(&self.layers)
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&rootfs)
            .output()
            .map_err(|source| SnapshotError::Io {
                what: "running mount for",
                path: rootfs.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(SnapshotError::Mount {
                target: rootfs,
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(Active {
            rootfs,
            upper,
            mounted: true,
        })
    }
}

/// A mounted snapshot. Dropping it unmounts; [`Active::unmount`] does so and reports errors.
#[derive(Debug)]
pub struct Active {
    rootfs: PathBuf,
    upper: PathBuf,
    mounted: bool,
}

impl Active {
    /// The merged view, where the step runs.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// The changes; complete only after [`Active::unmount`].
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    pub fn unmount(mut self) -> Result<PathBuf, SnapshotError> {
        self.mounted = false;
        unmount(&self.rootfs)?;
        Ok(self.upper.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.mounted
            && let Err(err) = unmount(&self.rootfs)
        {
            tracing::warn!(%err, "leaving a mount behind");
        }
    }
}

/// A private tmpfs (mode 0700) for what must never reach the disk: the secrets a RUN step
/// mounts and the bundle naming them. Dropping it unmounts, and the contents are gone.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a fresh tmpfs on `path` (created if missing).
    pub fn mount(path: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(path).map_err(|source| SnapshotError::Io {
            what: "creating",
            path: path.to_owned(),
            source,
        })?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0700,size=64m", "tmpfs"])
            .arg(path)
            .output()
            .map_err(|source| SnapshotError::Io {
                what: "running mount for",
                path: path.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(SnapshotError::Tmpfs {
                target: path.to_owned(),
                message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(err) = unmount(&self.path) {
            tracing::warn!(%err, "leaving a tmpfs behind");
        }
    }
}

fn unmount(target: &Path) -> Result<(), SnapshotError> {
    let output = Command::new("umount")
        .arg(target)
        .output()
        .map_err(|source| SnapshotError::Io {
            what: "running umount for",
            path: target.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    // A process that outlived the step can keep it busy; detach so nothing blocks.
    let lazy = Command::new("umount").arg("-l").arg(target).output();
    match lazy {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(SnapshotError::Mount {
            target: target.to_owned(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
    }
}

/// Unmounts every overlay still mounted under `dir` (crash recovery at start). Returns them.
pub fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut stale: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .filter(|target| target.starts_with(dir))
        .collect();
    // Deepest first, in case mounts nest.
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for target in &stale {
        let _ = unmount(target);
    }
    stale
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

#[cfg(test)]
mod tests;

/// overlayfs's mark for a deleted path in an upper or lower directory: a 0:0 char device.
pub fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// overlayfs's mark for a directory that hides everything below it in lower layers.
pub fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| xattr_is_y(dir, name))
}

fn xattr_is_y(path: &Path, name: &str) -> bool {
    matches!(crate::image::sys::lgetxattr(path, name), Ok(Some(value)) if value == b"y")
}
