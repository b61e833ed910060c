//! Helpers shared by the image tests: listings that compare trees and tars, and the
//! root / tool checks that skip (or, with `MEMOBUILD_REQUIRE_PRIVILEGED`, fail) a test.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::entry::{Kind, read_entry};
use super::unpack::decompress;
use crate::layout::Layout;
use crate::store::{Cas, Store, StoreOptions};

/// One line per path: type, mode, uid, gid, size, content hash, link target.
pub(crate) type Listing = BTreeMap<String, String>;

pub(crate) fn store() -> (tempfile::TempDir, Cas) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cas = Store::open(&Layout::new(dir.path()), StoreOptions::default())
        .expect("store")
        .cas();
    (dir, cas)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..16].to_owned()
}

/// The tree under `root` (not `root` itself); hard links show as the files they are.
pub(crate) fn list_dir(root: &Path) -> Listing {
    let mut out = Listing::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for item in fs::read_dir(&dir).expect("read_dir") {
            let path = item.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let kind = meta.file_type();
            let (what, content) = if kind.is_dir() {
                todo.push(path.clone());
                ("dir", String::new())
            } else if kind.is_file() {
                ("file", sha(&fs::read(&path).expect("read")))
            } else if kind.is_symlink() {
                (
                    "symlink",
                    fs::read_link(&path)
                        .expect("readlink")
                        .display()
                        .to_string(),
                )
            } else if kind.is_fifo() {
                ("fifo", String::new())
            } else if kind.is_char_device() {
                (
                    "char",
                    format!("{}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev())),
                )
            } else {
                ("other", String::new())
            };
            let size = if kind.is_file() { meta.len() } else { 0 };
            let rel = path.strip_prefix(root).expect("below root");
            let mut xattrs = Vec::new();
            for name in super::sys::llistxattr(&path).expect("llistxattr") {
                if super::entry::carries_xattr(&name) {
                    let value = super::sys::lgetxattr(&path, &name).expect("lgetxattr");
                    xattrs.push((name, value.unwrap_or_default()));
                }
            }
            out.insert(
                rel.display().to_string(),
                format!(
                    "{what} {:o} {}:{} {size} {content}{}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    show_xattrs(xattrs),
                ),
            );
        }
    }
    out
}

/// The same listing for a tar (compressed or not); hard links show as their targets.
pub(crate) fn list_tar(reader: impl Read) -> Listing {
    let mut out = Listing::new();
    let mut archive = tar::Archive::new(decompress(reader).expect("decompress"));
    for item in archive.entries().expect("entries") {
        let mut item = item.expect("entry");
        let Some(entry) = read_entry(&mut item).expect("read entry") else {
            continue;
        };
        let mut data = Vec::new();
        item.read_to_end(&mut data).expect("data");
        let (what, content) = match &entry.kind {
            Kind::File => ("file", sha(&data)),
            Kind::Dir => ("dir", String::new()),
            Kind::Symlink(target) => ("symlink", target.display().to_string()),
            Kind::HardLink(target) => {
                let line = out[&target.display().to_string()].clone();
                out.insert(entry.path.display().to_string(), line);
                continue;
            }
            Kind::Fifo => ("fifo", String::new()),
            Kind::Char { major, minor } => ("char", format!("{major}:{minor}")),
            Kind::Block { .. } => ("other", String::new()),
        };
        out.insert(
            entry.path.display().to_string(),
            format!(
                "{what} {:o} {}:{} {} {content}{}",
                entry.mode,
                entry.uid,
                entry.gid,
                entry.size,
                show_xattrs(entry.xattrs),
            ),
        );
    }
    out
}

fn show_xattrs(mut xattrs: Vec<(String, Vec<u8>)>) -> String {
    xattrs.sort();
    xattrs
        .iter()
        .map(|(name, value)| format!(" {name}={}", hex::encode(value)))
        .collect()
}

fn require(what: &str, test: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("MEMOBUILD_REQUIRE_PRIVILEGED").is_some() {
        panic!("{test} needs {what} (MEMOBUILD_REQUIRE_PRIVILEGED is set)");
    }
    eprintln!("SKIPPED {test}: needs {what}");
    false
}

pub(crate) fn require_root(test: &str) -> bool {
    require("root", test, super::sys::is_root())
}

pub(crate) fn require_tool(tool: &str, test: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    require(tool, test, found)
}

pub(crate) const LONG_NAME: &str =
    "a-directory-name-long-enough-that-the-whole-path-cannot-fit-a-ustar-name-field";

/// A tree with what layers must carry: setuid/setgid/sticky modes, an empty directory,
/// relative and absolute symlinks, a hard link, a fifo, names and link targets too long for
/// ustar. Every mtime is `mtime`.
pub(crate) fn sample_tree(root: &Path, mtime: i64) {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let write = |rel: &str, data: &[u8], mode: u32| {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, data).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write("bin/su", b"#!/bin/sh\necho root\n", 0o4755);
    write("bin/tool", b"tool", 0o2711);
    write("etc/conf", b"key=value\n", 0o640);
    write(
        &format!("deep/{LONG_NAME}/{LONG_NAME}/file"),
        b"deep",
        0o644,
    );
    // One name longer than ustar's 100 bytes: only a PAX path record can carry it.
    write(&format!("deep/{}", "n".repeat(150)), b"long name", 0o644);
    fs::hard_link(root.join("etc/conf"), root.join("etc/conf.hard")).expect("hard link");
    symlink("conf", root.join("etc/conf.link")).expect("symlink");
    symlink("/etc/passwd", root.join("etc/passwd.abs")).expect("symlink");
    symlink(
        format!("../deep/{LONG_NAME}/{LONG_NAME}/file"),
        root.join("etc/long.link"),
    )
    .expect("symlink");
    for (dir, mode) in [("tmp", 0o1777), ("empty", 0o700)] {
        fs::create_dir(root.join(dir)).expect("mkdir");
        fs::set_permissions(root.join(dir), fs::Permissions::from_mode(mode)).expect("chmod");
    }
    super::sys::mknod(&root.join("tmp/fifo"), super::sys::Node::Fifo, 0o600, 0, 0).expect("fifo");
    super::sys::lsetxattr(&root.join("etc/conf"), "user.memobuild", b"kept").expect("xattr");
    if super::sys::is_root() {
        // VFS_CAP_REVISION_2 with the effective bit, permitting CAP_NET_RAW.
        let cap_net_raw = [
            1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        super::sys::lsetxattr(&root.join("bin/tool"), "security.capability", &cap_net_raw)
            .expect("file capability");
    }
    set_mtimes(root, mtime);
}

/// Sets every mtime under `root` (symlinks' own included) to `mtime`.
pub(crate) fn set_mtimes(root: &Path, mtime: i64) {
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for item in fs::read_dir(&dir).expect("read_dir") {
            let path = item.expect("entry").path();
            if fs::symlink_metadata(&path).expect("lstat").is_dir() {
                todo.push(path.clone());
            }
            super::sys::set_mtime_nofollow(&path, mtime).expect("utimensat");
        }
    }
}

pub(crate) fn mtime(path: &Path) -> i64 {
    fs::symlink_metadata(path).expect("lstat").mtime()
}

/// A tar made header by header, names and link targets as given (even unsafe ones).
/// Entries: (name, type, link target, data); modes are 0644, directories 0755.
pub(crate) fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    raw_tar_with_modes(entries, 0o755, 0o644)
}

/// As [`raw_tar`], with the modes given to directories and to everything else.
pub(crate) fn raw_tar_with_modes(
    entries: &[(&str, tar::EntryType, &str, &[u8])],
    dir_mode: u32,
    other_mode: u32,
) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(if kind.is_dir() { dir_mode } else { other_mode });
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("finish")
}
