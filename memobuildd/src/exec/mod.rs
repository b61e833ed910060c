//! Running one RUN step: an OCI runtime bundle over a root filesystem that `snapshot` has
//! mounted, stdout/stderr streamed as they come, the exit code returned.
//!
//! The main type is the [`Executor`] trait, implemented for real by [`Runc`] (runc or crun:
//! anything with runc's command line). The engine calls it from a blocking thread, passes a
//! log sink and a cancel flag, and gets the exit code. The executor never computes cache keys
//! and never decides what a step means: it runs what it is given.

mod runc;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

pub use runc::Runc;

/// Who the process runs as, already resolved against the image's /etc/passwd and /etc/group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The host's network stack, as BuildKit's default for RUN.
    Host,
    /// A private network namespace with only loopback, up.
    None,
}

/// Something a step sees at `target` besides its root filesystem (`RUN --mount`). The
/// runtime creates a missing target in the root filesystem; the engine removes what it
/// created there, so mounts never shape the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMount {
    /// Absolute path inside the container.
    pub target: String,
    pub source: MountSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A host directory or file, bound (a cache mount's directory, a secret's file).
    Bind { path: PathBuf, readonly: bool },
    /// A fresh, empty tmpfs, at most `size` bytes when given.
    Tmpfs { size: Option<u64> },
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Unique among running steps; names the container.
    pub id: String,
    /// A scratch directory for `config.json` and the generated /etc files.
    pub bundle: PathBuf,
    /// The mounted root filesystem (an overlay whose upper dir will become the layer).
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: ProcessUser,
    pub network: Network,
    /// In order: a later mount may sit inside an earlier one.
    pub mounts: Vec<StepMount>,
    /// A prebuild's step: the container runs at the lowest CPU priority (nice 19) and the
    /// lowest best-effort I/O priority, so it yields to everything else on the machine.
    pub background: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Receives output as it is produced, one line (or a long line's chunk) at a time.
pub type LogSink<'a> = dyn FnMut(LogStream, &[u8]) + Send + 'a;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the OCI runtime {runtime} is not installed (apt-get install runc)")]
    RuntimeMissing { runtime: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the runtime bundle: {0}")]
    Spec(#[source] oci_spec::OciSpecError),
    #[error("{runtime} failed before the step ran (exit {code}): {stderr}")]
    Runtime {
        runtime: String,
        code: i32,
        stderr: String,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("root (overlay mounts and the OCI runtime need it): run memobuildd as root")]
    NotRoot,
}

pub trait Executor: Send + Sync + std::fmt::Debug {
    /// Runs the step to completion (or cancellation: `cancel` becomes true) and returns its
    /// exit code. Blocks; the container is gone when it returns, whatever happened.
    fn run(
        &self,
        request: &RunRequest,
        logs: &mut LogSink<'_>,
        cancel: &AtomicBool,
    ) -> Result<i32, ExecError>;

    /// Deletes containers a previous daemon left behind (crash recovery).
    fn clean_up(&self);
}
