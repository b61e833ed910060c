//! The system calls std has no wrapper for — mknod, extended attributes, setting a symlink's
//! own mtime, the effective uid — each behind a safe function.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn is_root() -> bool {
    #[expect(unsafe_code, reason = "libc call with no preconditions")]
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// The node types [`mknod`] makes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Node {
    Fifo,
    Char,
    Block,
}

/// Makes a fifo (any user) or a device node (root only).
pub(crate) fn mknod(path: &Path, node: Node, perm: u32, major: u32, minor: u32) -> io::Result<()> {
    let path = c_path(path)?;
    let kind = match node {
        Node::Fifo => libc::S_IFIFO,
        Node::Char => libc::S_IFCHR,
        Node::Block => libc::S_IFBLK,
    };
    // Permission bits fit mode_t on every unix; the cast only narrows the type.
    let mode = kind | (perm & 0o7777) as libc::mode_t;
    let dev = libc::makedev(major, minor);
    #[expect(unsafe_code, reason = "mknod has no safe wrapper in std")]
    // SAFETY: `path` is a NUL-terminated string that lives across the call.
    let rc = unsafe { libc::mknod(path.as_ptr(), mode, dev) };
    check(rc)
}

/// Sets a path's atime and mtime to `secs` without following a final symlink.
pub(crate) fn set_mtime_nofollow(path: &Path, secs: i64) -> io::Result<()> {
    let path = c_path(path)?;
    let time = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    #[expect(unsafe_code, reason = "utimensat has no safe wrapper in std")]
    // SAFETY: `path` is NUL-terminated and `times` is the two-element array utimensat reads;
    // both live across the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc)
}

/// A path's extended attribute, `None` when it has none of that name (or the filesystem
/// has no xattrs). Values longer than 256 bytes are cut; we only read overlay flags.
#[cfg(target_os = "linux")]
pub(crate) fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let path = c_path(path)?;
    let name = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut value = vec![0u8; 256];
    #[expect(unsafe_code, reason = "lgetxattr has no safe wrapper in std")]
    // SAFETY: `path` and `name` are NUL-terminated; `value` is writable for the length passed.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    match usize::try_from(len) {
        Ok(len) => {
            value.truncate(len);
            Ok(Some(value))
        }
        Err(_) => match io::Error::last_os_error() {
            err if matches!(err.raw_os_error(), Some(libc::ENODATA | libc::ENOTSUP)) => Ok(None),
            err if err.raw_os_error() == Some(libc::ERANGE) => Ok(Some(value)),
            err => Err(err),
        },
    }
}

#[cfg(target_os = "linux")]
pub(crate) fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let path = c_path(path)?;
    let name = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    #[expect(unsafe_code, reason = "lsetxattr has no safe wrapper in std")]
    // SAFETY: `path` and `name` are NUL-terminated; `value` is readable for the length passed.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc)
}

// Overlay whiteouts only exist on Linux; elsewhere there is nothing to read or write.
#[cfg(not(target_os = "linux"))]
pub(crate) fn lgetxattr(_path: &Path, _name: &str) -> io::Result<Option<Vec<u8>>> {
    Ok(None)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lsetxattr(_path: &Path, _name: &str, _value: &[u8]) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}
