//! The `memobuild` client: connect to the daemon (starting it when none answers), send one
//! request, draw the answer. It never builds anything itself.
//!
//! - [`connection`]: a handshaken connection and request/response calls;
//! - [`launch`]: starting `memobuildd` and waiting for its readiness message;
//! - [`output`]: writing the outputs the daemon streams back (`-o`);
//! - [`render`]: human output (JSON output is the protocol types through serde_json).

pub mod connection;
pub mod launch;
pub mod output;
pub mod progress;
pub mod render;

use std::path::{Path, PathBuf};

use memobuild_protocol::{ErrorCode, paths};

pub use connection::{ConnectError, Connection, RequestError};
pub use launch::{DaemonPlace, LaunchError};
pub use output::OutputError;

/// Exit codes of `memobuild`, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    /// The daemon reported an error (bad Dockerfile, failed step, …).
    Failure = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// `memobuild daemon status`: no daemon is running.
    NotRunning = 3,
    /// The daemon could not be reached or started.
    Unavailable = 4,
    /// Client and daemon speak different protocol versions.
    VersionMismatch = 5,
    PermissionDenied = 6,
    /// The build was cancelled (Ctrl-C), as a shell reports SIGINT.
    Cancelled = 130,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("signalling memobuildd (pid {pid}): {source}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    pub fn exit(&self) -> Exit {
        match self {
            Self::Connect(err) if err.is_version_mismatch() => Exit::VersionMismatch,
            Self::Connect(ConnectError::PermissionDenied { .. }) => Exit::PermissionDenied,
            Self::Connect(ConnectError::Refused { reply, .. })
                if reply.code == ErrorCode::PermissionDenied =>
            {
                Exit::PermissionDenied
            }
            Self::Connect(_) | Self::Launch(_) => Exit::Unavailable,
            Self::Request(RequestError::Daemon(reply)) => match reply.code {
                ErrorCode::PermissionDenied => Exit::PermissionDenied,
                ErrorCode::VersionMismatch => Exit::VersionMismatch,
                ErrorCode::Cancelled => Exit::Cancelled,
                _ => Exit::Failure,
            },
            Self::Output(err) if err.is_permission_denied() => Exit::PermissionDenied,
            Self::Output(_) => Exit::Failure,
            Self::Request(_) | Self::Signal { .. } => Exit::Unavailable,
            Self::Write { .. } => Exit::Failure,
        }
    }

    /// Text to print after the error itself, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::Connect(err) => err.version_mismatch_hint(),
            _ => None,
        }
    }
}

/// Resolves where the daemon is for this user, honouring explicit choices.
pub fn daemon_place(socket: Option<&Path>, root: Option<&Path>) -> DaemonPlace {
    let euid = paths::effective_uid();
    let env = |key: &str| std::env::var_os(key);
    DaemonPlace {
        socket: absolute(paths::socket_path(socket, euid, env)),
        root: absolute(paths::root_path(root, euid, env)),
    }
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// Connects to the daemon, starting one when none answers.
pub async fn connect_or_start(place: &DaemonPlace) -> Result<Connection, ClientError> {
    match Connection::open(&place.socket).await {
        Err(ConnectError::NotRunning { .. }) => {
            launch::start_daemon(place)?;
            Ok(Connection::open(&place.socket).await?)
        }
        other => Ok(other?),
    }
}

/// Asks a daemon we cannot talk to (another protocol version) to stop.
pub fn send_sigterm(pid: u32) -> Result<(), ClientError> {
    let signal_err = |source| ClientError::Signal { pid, source };
    let target = libc::pid_t::try_from(pid)
        .map_err(|_| signal_err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: kill has no memory-safety preconditions; the pid came from the daemon itself.
    #[expect(unsafe_code, reason = "libc call with no memory-safety preconditions")]
    let rc = unsafe { libc::kill(target, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(signal_err(std::io::Error::last_os_error()))
    }
}
