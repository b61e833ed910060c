//! The user a request acts for, and what that user may read.
//!
//! A daemon running as root reads contexts, Dockerfiles, ignore files and ADD archives for
//! its callers; it must read only what the caller could read itself. [`Caller`] holds the
//! credentials the kernel reported for the peer of the socket (uid, gid and supplementary
//! groups at connect time) and decides by the permission bits, as the kernel would without
//! ACLs: every directory on the path searchable, the file itself readable (a directory also
//! listable). POSIX ACLs and capabilities other than root's are not consulted.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("uid {uid} may not {what} {}", path.display())]
    Denied {
        uid: u32,
        what: &'static str,
        path: PathBuf,
    },
}

/// A caller's credentials. Root and the daemon's own user read as the daemon does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as the kernel reported them for the peer.
    pub groups: Vec<u32>,
}

const READ: u32 = 0o4;
const SEARCH: u32 = 0o1;
const WRITE: u32 = 0o2;

impl Caller {
    /// Whether the daemon may act for this caller without checking: the caller is root, or
    /// the daemon's own user.
    pub fn is_unrestricted(&self) -> bool {
        self.uid == 0 || self.uid == crate::passwd::effective_uid()
    }

    /// The permission bits of `meta` that apply to this caller.
    fn bits(&self, meta: &std::fs::Metadata) -> u32 {
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & 0o7
    }

    /// Refuses unless the caller could open `path` for reading (a directory: list and enter
    /// it): every ancestor searchable, `path` readable. `path` is absolute; symlinks on the
    /// way are followed as `open` would follow them. A path that does not exist passes when
    /// its ancestors are searchable, for the read itself to report it missing.
    pub fn may_read(&self, path: &Path) -> Result<(), AccessError> {
        if self.is_unrestricted() {
            return Ok(());
        }
        let resolved = std::fs::canonicalize(path);
        let path = resolved.as_deref().unwrap_or(path);
        self.may_search_ancestors(path, None)?;
        self.may_read_entry(path)
    }

    /// Refuses unless the caller could connect to the Unix socket at `path` (an SSH agent's):
    /// every ancestor searchable and the socket writable. Symlinks on the way are resolved
    /// first, as `connect` resolves them: a link of the caller's to a socket in a directory
    /// the caller cannot search gives nothing.
    pub fn may_connect(&self, path: &Path) -> Result<(), AccessError> {
        if self.is_unrestricted() {
            return Ok(());
        }
        let resolved = std::fs::canonicalize(path);
        let path = resolved.as_deref().unwrap_or(path);
        self.may_search_ancestors(path, None)?;
        match std::fs::metadata(path) {
            Ok(meta) if self.bits(&meta) & WRITE == 0 => Err(self.denied("connect to", path)),
            _ => Ok(()),
        }
    }

    /// Checks `path` itself (not its ancestors), without following a final symlink.
    fn may_read_entry(&self, path: &Path) -> Result<(), AccessError> {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return Ok(());
        };
        let needed = if meta.is_dir() { READ | SEARCH } else { READ };
        if meta.file_type().is_symlink() || self.bits(&meta) & needed == needed {
            Ok(())
        } else {
            Err(self.denied("read", path))
        }
    }

    /// Every directory from `/` (or from `below`, already checked) down to `path`'s parent
    /// must be searchable.
    fn may_search_ancestors(&self, path: &Path, below: Option<&Path>) -> Result<(), AccessError> {
        let mut dirs: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .take_while(|dir| below.is_none_or(|b| dir.starts_with(b) && *dir != b))
            .collect();
        dirs.reverse();
        for dir in dirs {
            let Ok(meta) = std::fs::metadata(dir) else {
                return Ok(());
            };
            if self.bits(&meta) & SEARCH == 0 {
                return Err(self.denied("search", dir));
            }
        }
        Ok(())
    }

    fn denied(&self, what: &'static str, path: &Path) -> AccessError {
        AccessError::Denied {
            uid: self.uid,
            what,
            path: path.to_owned(),
        }
    }
}

/// Checks many paths under one root already checked (a build context), remembering the
/// directories it has decided, so a COPY of thousands of files stats each directory once.
#[derive(Debug)]
pub struct ReadCheck<'a> {
    caller: &'a Caller,
    root: PathBuf,
    dirs: Mutex<HashMap<PathBuf, bool>>,
}

impl<'a> ReadCheck<'a> {
    pub fn new(caller: &'a Caller, root: &Path) -> Self {
        Self {
            caller,
            root: root.to_owned(),
            dirs: Mutex::new(HashMap::new()),
        }
    }

    /// Refuses unless the caller could read `path`, a path inside the root as found there
    /// (not following a final symlink: a link is followed by naming its target).
    pub fn check(&self, path: &Path) -> Result<(), AccessError> {
        if self.caller.is_unrestricted() {
            return Ok(());
        }
        for dir in path
            .ancestors()
            .skip(1)
            .take_while(|dir| dir.starts_with(&self.root))
        {
            let known = self
                .dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(dir)
                .copied();
            let searchable = match known {
                Some(searchable) => searchable,
                None => {
                    let searchable = std::fs::symlink_metadata(dir)
                        .map_or(true, |meta| self.caller.bits(&meta) & SEARCH != 0);
                    self.dirs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(dir.to_owned(), searchable);
                    searchable
                }
            };
            if !searchable {
                return Err(self.caller.denied("search", dir));
            }
        }
        self.caller.may_read_entry(path)
    }
}

/// The supplementary groups of a socket's peer (`SO_PEERGROUPS`, Linux 4.13+), as they
/// were when it connected. Empty when the kernel cannot say.
#[cfg(target_os = "linux")]
pub fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    // Not exported by the libc crate for every target; the value is the same on all but
    // mips, sparc and parisc.
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes and the kernel writes at most that.
        #[expect(unsafe_code, reason = "getsockopt has no safe wrapper")]
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<u32>();
        if rc == 0 {
            groups.truncate(count);
            return groups;
        }
        // ERANGE: `len` now says how much is needed.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && count > groups.len()
        {
            groups.resize(count, 0);
            continue;
        }
        return Vec::new();
    }
}

#[cfg(not(target_os = "linux"))]
pub fn peer_groups(_fd: std::os::fd::BorrowedFd<'_>) -> Vec<u32> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A caller who owns nothing here and is in no group of these files (unless `groups`).
    fn stranger(groups: Vec<u32>) -> Caller {
        Caller {
            uid: 4242,
            gid: 4242,
            groups,
        }
    }

    #[test]
    fn a_caller_may_connect_only_to_a_socket_it_could_write() {
        if crate::passwd::effective_uid() == 4242 {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        chmod(dir.path(), 0o755);
        let socket = dir.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        chmod(&socket, 0o600);
        assert!(stranger(vec![]).may_connect(&socket).is_err());
        let root = Caller {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert!(root.may_connect(&socket).is_ok());
        chmod(&socket, 0o666);
        assert!(stranger(vec![]).may_connect(&socket).is_ok());
        // A link from a searchable place to the socket in a directory the caller cannot
        // search is judged by where it leads.
        let hidden = dir.path().join("hidden");
        std::fs::create_dir(&hidden).expect("hidden");
        let inner = hidden.join("agent.sock");
        let _inner_listener = std::os::unix::net::UnixListener::bind(&inner).expect("bind");
        chmod(&inner, 0o666);
        chmod(&hidden, 0o700);
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&inner, &link).expect("symlink");
        assert!(stranger(vec![]).may_connect(&link).is_err());
    }

    #[test]
    fn other_bits_decide_for_a_stranger_and_every_ancestor_must_be_searchable() {
        if crate::passwd::effective_uid() == 4242 {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        chmod(dir.path(), 0o755);
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("sub");
        let file = sub.join("f");
        std::fs::write(&file, "x").expect("file");
        chmod(&file, 0o644);
        let caller = stranger(vec![]);
        caller.may_read(&file).expect("readable");

        chmod(&file, 0o600);
        let err = caller.may_read(&file).expect_err("0600 of another user");
        assert!(err.to_string().contains("may not read"), "{err}");

        chmod(&file, 0o644);
        chmod(&sub, 0o700);
        let err = caller
            .may_read(&file)
            .expect_err("0700 directory on the way");
        assert!(err.to_string().contains("may not search"), "{err}");
        let err = ReadCheck::new(&caller, dir.path())
            .check(&file)
            .expect_err("the same through a ReadCheck");
        assert!(
            err.to_string().contains(&sub.display().to_string()),
            "{err}"
        );

        chmod(&sub, 0o711);
        caller
            .may_read(&file)
            .expect("search without read suffices for a file");
        caller.may_read(&sub).expect_err("listing needs read");
    }

    #[test]
    fn supplementary_groups_count_and_root_reads_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        chmod(dir.path(), 0o755);
        let file = dir.path().join("f");
        std::fs::write(&file, "x").expect("file");
        chmod(&file, 0o640);
        let group = std::fs::metadata(&file).expect("meta").gid();
        if crate::passwd::effective_uid() != 4242 && group != 4242 {
            stranger(vec![])
                .may_read(&file)
                .expect_err("not in the group");
            stranger(vec![7, group])
                .may_read(&file)
                .expect("in the group");
        }
        Caller {
            uid: 0,
            gid: 0,
            groups: vec![],
        }
        .may_read(&file)
        .expect("root");
    }
}
