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
/// has no xattrs).
#[cfg(target_os = "linux")]
pub(crate) fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let path = c_path(path)?;
    let name = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let read = |value: &mut [u8]| {
        #[expect(unsafe_code, reason = "lgetxattr has no safe wrapper in std")]
        // SAFETY: `path` and `name` are NUL-terminated; `value` is writable for the length
        // passed (a null pointer with length 0 asks for the size).
        let len = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        usize::try_from(len).map_err(|_| io::Error::last_os_error())
    };
    read_sized(read)
        .map(Some)
        .or_else(|err| match err.raw_os_error() {
            Some(libc::ENODATA | libc::ENOTSUP) => Ok(None),
            _ => Err(err),
        })
}

/// The names of a path's extended attributes (none where the filesystem has no xattrs).
#[cfg(target_os = "linux")]
pub(crate) fn llistxattr(path: &Path) -> io::Result<Vec<String>> {
    let path = c_path(path)?;
    let read = |names: &mut [u8]| {
        #[expect(unsafe_code, reason = "llistxattr has no safe wrapper in std")]
        // SAFETY: `path` is NUL-terminated; `names` is writable for the length passed.
        let len =
            unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        usize::try_from(len).map_err(|_| io::Error::last_os_error())
    };
    match read_sized(read) {
        Ok(names) => Ok(names
            .split(|&b| b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect()),
        Err(err) if err.raw_os_error() == Some(libc::ENOTSUP) => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

/// Runs an xattr call that fills a buffer: first for the size, then for the bytes, again if
/// the value grew in between (ERANGE).
#[cfg(target_os = "linux")]
fn read_sized(mut read: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    loop {
        let size = read(&mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match read(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(err) if err.raw_os_error() == Some(libc::ERANGE) => {}
            Err(err) => return Err(err),
        }
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

// Extended attributes are carried on Linux only; elsewhere a tree has none we know of.
#[cfg(not(target_os = "linux"))]
pub(crate) fn lgetxattr(_path: &Path, _name: &str) -> io::Result<Option<Vec<u8>>> {
    Ok(None)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn llistxattr(_path: &Path) -> io::Result<Vec<String>> {
    Ok(Vec::new())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lsetxattr(_path: &Path, _name: &str, _value: &[u8]) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOTSUP))
}
