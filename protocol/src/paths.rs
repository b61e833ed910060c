//! Where the daemon listens and keeps its state, so the client and the daemon agree without
//! talking first.
//!
//! | who | socket | state root |
//! |---|---|---|
//! | root | `/run/memobuild/memobuildd.sock` | `/var/lib/memobuild` |
//! | user | `$XDG_RUNTIME_DIR/memobuild/memobuildd.sock` | `$XDG_DATA_HOME/memobuild` (else `~/.local/share/memobuild`) |
//! | user, no `XDG_RUNTIME_DIR` | `/tmp/memobuild-<uid>/memobuildd.sock` (the daemon creates it 0700 and refuses one it does not own) | |
//! | Windows | named pipe `\\.\pipe\memobuildd` | `%LOCALAPPDATA%\memobuild` |
//!
//! `--socket` beats `MEMOBUILD_SOCKET` beats the table; likewise `--root` and `MEMOBUILD_ROOT`.
//! The functions take the environment as a lookup so tests need not touch the process's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const SOCKET_ENV: &str = "MEMOBUILD_SOCKET";
pub const ROOT_ENV: &str = "MEMOBUILD_ROOT";
pub const SOCKET_FILE: &str = "memobuildd.sock";
/// The daemon's log when the client starts it (relative to the state root).
pub const LOG_FILE: &str = "memobuildd.log";

/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// The socket to use: explicit choice, else `MEMOBUILD_SOCKET`, else the default for `euid`.
pub fn socket_path(
    explicit: Option<&Path>,
    euid: u32,
    env: impl Fn(&str) -> Option<OsString>,
) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Some(path) = non_empty(env(SOCKET_ENV)) {
        return PathBuf::from(path);
    }
    default_socket_path(euid, env)
}

/// The state root to use: explicit choice, else `MEMOBUILD_ROOT`, else the default for `euid`.
pub fn root_path(
    explicit: Option<&Path>,
    euid: u32,
    env: impl Fn(&str) -> Option<OsString>,
) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Some(path) = non_empty(env(ROOT_ENV)) {
        return PathBuf::from(path);
    }
    default_root_path(euid, env)
}

#[cfg(unix)]
fn default_socket_path(euid: u32, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/run/memobuild").join(SOCKET_FILE);
    }
    match non_empty(env("XDG_RUNTIME_DIR")).map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("memobuild").join(SOCKET_FILE),
        _ => fallback_dir(euid).join(SOCKET_FILE),
    }
}

#[cfg(windows)]
fn default_socket_path(_euid: u32, _env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    PathBuf::from(r"\\.\pipe\memobuildd")
}

#[cfg(unix)]
fn default_root_path(euid: u32, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/memobuild");
    }
    if let Some(dir) = non_empty(env("XDG_DATA_HOME")).map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("memobuild");
    }
    match non_empty(env("HOME")).map(PathBuf::from) {
        Some(home) if home.is_absolute() => home.join(".local/share/memobuild"),
        _ => fallback_dir(euid).join("state"),
    }
}

#[cfg(windows)]
fn default_root_path(_euid: u32, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    match non_empty(env("LOCALAPPDATA")) {
        Some(dir) => PathBuf::from(dir).join("memobuild"),
        None => PathBuf::from(r"C:\ProgramData\memobuild"),
    }
}

/// A per-user directory under /tmp for users without `XDG_RUNTIME_DIR` or `HOME`.
/// Whoever creates it must make it 0700 and refuse one owned by someone else.
#[cfg(unix)]
pub fn fallback_dir(euid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/memobuild-{euid}"))
}

/// Checks that `path` fits in a Unix socket address.
pub fn check_socket_path(path: &Path) -> Result<(), SocketPathError> {
    let len = path.as_os_str().len();
    if cfg!(unix) && len > MAX_SOCKET_PATH_LEN {
        return Err(SocketPathError::TooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error(
        "socket path {path:?} is {len} bytes; Unix sockets allow at most {MAX_SOCKET_PATH_LEN} \
         (choose a shorter one with --socket or MEMOBUILD_SOCKET)"
    )]
    TooLong { path: PathBuf, len: usize },
}

/// The effective uid of this process (0 where there are no uids).
pub fn effective_uid() -> u32 {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        #[expect(unsafe_code, reason = "libc call with no preconditions")]
        unsafe {
            libc::geteuid()
        }
    }
    #[cfg(not(unix))]
    {
        0
    }
}

fn non_empty(value: Option<OsString>) -> Option<OsString> {
    value.filter(|v| !v.is_empty())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn root_user_uses_system_paths() {
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/0")]);
        assert_eq!(
            socket_path(None, 0, &env),
            Path::new("/run/memobuild/memobuildd.sock")
        );
        assert_eq!(root_path(None, 0, &env), Path::new("/var/lib/memobuild"));
    }

    #[test]
    fn users_follow_xdg_and_fall_back_safely() {
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/1000"), ("HOME", "/home/a")]);
        assert_eq!(
            socket_path(None, 1000, &env),
            Path::new("/run/user/1000/memobuild/memobuildd.sock")
        );
        assert_eq!(
            root_path(None, 1000, &env),
            Path::new("/home/a/.local/share/memobuild")
        );
        let bare = env_of(&[("XDG_RUNTIME_DIR", "relative/dir")]);
        assert_eq!(
            socket_path(None, 1000, &bare),
            Path::new("/tmp/memobuild-1000/memobuildd.sock")
        );
        assert_eq!(
            root_path(None, 1000, &bare),
            Path::new("/tmp/memobuild-1000/state")
        );
    }

    #[test]
    fn explicit_beats_environment_beats_default() {
        let env = env_of(&[("MEMOBUILD_SOCKET", "/e.sock"), ("MEMOBUILD_ROOT", "/e")]);
        assert_eq!(
            socket_path(Some(Path::new("/x.sock")), 0, &env),
            Path::new("/x.sock")
        );
        assert_eq!(socket_path(None, 0, &env), Path::new("/e.sock"));
        assert_eq!(root_path(None, 0, &env), Path::new("/e"));
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let long = PathBuf::from(format!("/{}", "a".repeat(MAX_SOCKET_PATH_LEN)));
        assert!(check_socket_path(&long).is_err());
        assert!(check_socket_path(Path::new("/run/memobuild/memobuildd.sock")).is_ok());
    }
}
