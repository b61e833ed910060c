//! Claiming the daemon's two exclusive resources: the state root (a lock file) and the
//! socket (bound by us, or handed over by systemd socket activation).
//!
//! Order matters: the root is locked first, so two daemons on one root never both reach the
//! socket step, and a daemon that fails on the socket has not touched the root's contents.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::ServerError;
use crate::layout::Layout;
use crate::passwd::Group;

/// Held for the daemon's whole life; the OS drops the lock when the process dies, so a crash
/// never leaves the root locked.
#[derive(Debug)]
pub(crate) struct RootLock {
    _file: File,
}

pub(crate) fn lock_root(layout: &Layout) -> Result<RootLock, ServerError> {
    let root = layout.root();
    let unusable = |source| ServerError::Root {
        root: root.to_owned(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(unusable)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(layout.lock_file())
        .map_err(unusable)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // Best effort: the holder wrote its pid there; the refusal stands without it.
            let _ = file.read_to_string(&mut holder);
            return Err(ServerError::RootInUse {
                root: root.to_owned(),
                holder: holder.trim().to_owned(),
            });
        }
        Err(TryLockError::Error(source)) => return Err(unusable(source)),
    }
    file.set_len(0).map_err(unusable)?;
    file.rewind().map_err(unusable)?;
    writeln!(file, "{}", std::process::id()).map_err(unusable)?;
    Ok(RootLock { _file: file })
}

/// The listening socket and whether its file is ours to remove at exit.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) listener: UnixListener,
    /// `None` when systemd owns the socket file (socket activation).
    pub(crate) owned_path: Option<PathBuf>,
}

impl Listening {
    pub(crate) fn activated(&self) -> bool {
        self.owned_path.is_none()
    }
}

/// Takes the socket systemd passed (`LISTEN_FDS`), or binds `path` ourselves.
pub(crate) fn listen(path: &Path, group: Option<&Group>) -> Result<Listening, ServerError> {
    if let Some(listener) = activated_listener()? {
        return Ok(Listening {
            listener,
            owned_path: None,
        });
    }
    let listener = bind(path, group)?;
    Ok(Listening {
        listener,
        owned_path: Some(path.to_owned()),
    })
}

fn activated_listener() -> Result<Option<UnixListener>, ServerError> {
    let fds = sd_notify::listen_fds().map_err(ServerError::Activation)?;
    let Some(fd) = fds.into_iter().next() else {
        return Ok(None);
    };
    // SAFETY: systemd hands us ownership of the fds from 3 up to 3 + LISTEN_FDS, and
    // `listen_fds` checked LISTEN_PID is ours; nothing else in this process uses this fd.
    #[expect(
        unsafe_code,
        reason = "adopting the fd systemd passed by socket activation"
    )]
    let std_listener = unsafe {
        use std::os::fd::FromRawFd;
        std::os::unix::net::UnixListener::from_raw_fd(fd)
    };
    std_listener
        .set_nonblocking(true)
        .map_err(ServerError::Activation)?;
    UnixListener::from_std(std_listener)
        .map(Some)
        .map_err(ServerError::Activation)
}

fn bind(path: &Path, group: Option<&Group>) -> Result<UnixListener, ServerError> {
    let socket_err = |source| ServerError::Socket {
        socket: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        prepare_socket_dir(dir, group).map_err(socket_err)?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
            // Never unlink a live daemon's socket: only a file nobody answers on is stale.
            match StdUnixStream::connect(path) {
                Ok(_) => {
                    return Err(ServerError::SocketInUse {
                        socket: path.to_owned(),
                    });
                }
                Err(probe) if probe.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::warn!(socket = %path.display(), "removing stale socket left by a previous daemon");
                    std::fs::remove_file(path).map_err(socket_err)?;
                    UnixListener::bind(path).map_err(socket_err)?
                }
                Err(probe) => return Err(socket_err(probe)),
            }
        }
        Err(err) => return Err(socket_err(err)),
    };
    // Until this chmod the socket has umask permissions; the peer-credential check in the
    // connection handler covers that window, and nothing is accepted before it ends.
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_err)?;
    if let Some(group) = group {
        std::os::unix::fs::chown(path, None, Some(group.gid)).map_err(socket_err)?;
    }
    Ok(listener)
}

/// Creates the socket's directory if needed. A directory we create is 0700 (0750 and owned
/// by the socket group when there is one); an existing one must not be writable by others
/// unless sticky, or anyone could swap our socket.
fn prepare_socket_dir(dir: &Path, group: Option<&Group>) -> std::io::Result<()> {
    if !dir.exists() {
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        DirBuilder::new().recursive(true).mode(mode).create(dir)?;
        if let Some(group) = group {
            std::os::unix::fs::chown(dir, None, Some(group.gid))?;
        }
        return Ok(());
    }
    let meta = std::fs::metadata(dir)?;
    let world_writable = meta.mode() & 0o002 != 0;
    let sticky = meta.mode() & 0o1000 != 0;
    if world_writable && !sticky {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} is writable by everyone; refusing to listen there",
                dir.display()
            ),
        ));
    }
    if meta.uid() != crate::passwd::effective_uid() && !sticky {
        tracing::warn!(dir = %dir.display(), owner = meta.uid(), "socket directory is owned by another user");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_a_root_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path());
        let first = lock_root(&layout).expect("first lock");
        let err = lock_root(&layout).expect_err("second lock must fail");
        match err {
            ServerError::RootInUse { holder, .. } => {
                assert_eq!(holder, std::process::id().to_string())
            }
            other => panic!("unexpected error: {other}"),
        }
        drop(first);
        lock_root(&layout).expect("lock is free again after drop");
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.sock");
        // A socket file nobody listens on: what a crashed daemon leaves.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let live = bind(&path, None).expect("stale socket is recovered");
        let mode = std::fs::metadata(&path).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind(&path, None).expect_err("live socket must not be taken over");
        assert!(matches!(err, ServerError::SocketInUse { .. }), "{err}");
        drop(live);
    }
}
