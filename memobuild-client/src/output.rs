//! Outputs (`-o`): the daemon streams each one back and this process writes it, as the user
//! who runs `memobuild`, with its umask, where that user asked (a relative `dest` is relative
//! to the working directory). The daemon itself writes nothing outside its root.
//!
//! Each output is written under a temp name beside its destination (`.NAME.XXXXXX.partial`)
//! and renamed into place only when it arrived whole, so a client or daemon killed mid-output,
//! a damaged blob or a full disk never leaves a partial file or directory under the
//! destination's name; the temp is removed on failure (a SIGKILLed client cannot remove it,
//! but it never has the destination's name). A directory output (`type=local`, `tar=false`)
//! arrives as a tar that is unpacked into the temp directory as it streams in: with owners,
//! modes, special files and xattrs when the client is root, and like `tar --no-same-owner`
//! otherwise (files owned by the caller, modes masked by the umask, no device nodes).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{Receiver as ChunkReceiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use memobuild_protocol::paths;

/// Where one streamed output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// `dest=-`: the bytes as they come.
    Stdout,
    /// A file, replaced if it exists.
    File(PathBuf),
    /// A directory the streamed tar is unpacked into; it must not exist, or be empty.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write the output {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write the output {}: it exists and is not an empty directory (the output would not replace it whole)",
        path.display()
    )]
    NotEmpty { path: PathBuf },
    #[error("the output {} arrived with {got} bytes, the daemon sent {sent}", dest.display())]
    Length { dest: PathBuf, got: u64, sent: u64 },
    #[error("writing the output to stdout: {0}")]
    Stdout(#[source] io::Error),
    #[error(
        "the output on stdout was interrupted (the daemon rebuilt a damaged step); run the build again"
    )]
    StdoutRestart,
    #[error("the daemon sent {what} that this build did not ask for")]
    Unexpected { what: &'static str },
    #[error("the daemon finished the build before sending every output")]
    Missing,
}

impl OutputError {
    /// The caller may not write there: the same exit code as any other permission refusal.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// The streamed outputs of one build, in the order the daemon sends them.
#[derive(Debug)]
pub struct Outputs {
    dests: Vec<Dest>,
    /// One per destination, opened up front so that a destination the caller cannot write
    /// fails the command before the build starts.
    writers: Vec<Option<Writer>>,
    current: usize,
    /// Bytes of the current output received so far.
    received: u64,
    stdout_written: bool,
}

impl Outputs {
    pub fn open(dests: Vec<Dest>) -> Result<Self, OutputError> {
        let writers = open_all(&dests)?;
        Ok(Self {
            dests,
            writers,
            current: 0,
            received: 0,
            stdout_written: false,
        })
    }

    pub fn chunk(&mut self, bytes: Vec<u8>) -> Result<(), OutputError> {
        let Some(Some(writer)) = self.writers.get_mut(self.current) else {
            return Err(OutputError::Unexpected { what: "an output" });
        };
        self.received += bytes.len() as u64;
        if matches!(writer, Writer::Stdout) {
            self.stdout_written |= !bytes.is_empty();
        }
        writer.write(bytes)
    }

    /// The current output is complete: check it, put it in place, go on to the next.
    pub fn end(&mut self, sent: u64) -> Result<(), OutputError> {
        let Some(writer) = self.writers.get_mut(self.current).and_then(Option::take) else {
            return Err(OutputError::Unexpected {
                what: "the end of an output",
            });
        };
        if self.received != sent {
            return Err(OutputError::Length {
                dest: writer.dest().to_owned(),
                got: self.received,
                sent,
            });
        }
        writer.finish()?;
        self.current += 1;
        self.received = 0;
        Ok(())
    }

    /// Everything streamed so far is void; every output comes again from its start.
    pub fn restart(&mut self) -> Result<(), OutputError> {
        if self.stdout_written {
            return Err(OutputError::StdoutRestart);
        }
        // The old writers go first: their temps are removed before new ones are made.
        self.writers.clear();
        self.writers = open_all(&self.dests)?;
        self.current = 0;
        self.received = 0;
        Ok(())
    }

    /// The build is done: every output must have arrived.
    pub fn finish(self) -> Result<(), OutputError> {
        if self.current != self.dests.len() {
            return Err(OutputError::Missing);
        }
        io::stdout().flush().map_err(OutputError::Stdout)
    }
}

fn open_all(dests: &[Dest]) -> Result<Vec<Option<Writer>>, OutputError> {
    dests
        .iter()
        .map(|dest| Writer::open(dest).map(Some))
        .collect()
}

/// Chunks in flight between the socket and a writer thread.
const QUEUED_CHUNKS: usize = 8;

#[derive(Debug)]
enum Writer {
    Stdout,
    /// A thread writes the chunks to disk while the socket is read.
    Worker(Worker),
}

#[derive(Debug)]
struct Worker {
    dest: PathBuf,
    temp: Option<Temp>,
    chunks: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<io::Result<Unpacked>>>,
}

#[derive(Debug)]
enum Temp {
    /// Deleted on drop unless persisted.
    File(tempfile::TempPath),
    /// Removed on drop unless kept.
    Dir(tempfile::TempDir),
}

impl Writer {
    fn open(dest: &Dest) -> Result<Self, OutputError> {
        let (path, dir) = match dest {
            Dest::Stdout => return Ok(Self::Stdout),
            Dest::File(path) => (path, false),
            Dest::Dir(path) => (path, true),
        };
        let io_err = |source| OutputError::Io {
            path: path.clone(),
            source,
        };
        let (parent, name) = beside(path);
        let mut prefix = OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        let (chunks, received) = sync_channel(QUEUED_CHUNKS);
        let (temp, thread) = if dir {
            match fs::symlink_metadata(path) {
                Ok(meta)
                    if !meta.is_dir() || fs::read_dir(path).map_err(io_err)?.next().is_some() =>
                {
                    return Err(OutputError::NotEmpty { path: path.clone() });
                }
                _ => {}
            }
            let temp = builder.tempdir_in(parent).map_err(io_err)?;
            let (root, owners, mask) = (temp.path().to_owned(), is_root(), umask());
            let thread = std::thread::spawn(move || {
                let mut stream = ChunkReader::new(received);
                let unpacked = unpack(&mut stream, &root, owners, mask)?;
                // The tar ends before the stream does (its padding): read it all, so the
                // sender is never left waiting on a full queue.
                io::copy(&mut stream, &mut io::sink())?;
                Ok(unpacked)
            });
            (Temp::Dir(temp), thread)
        } else {
            // Created as any new file is: 0666 less the umask.
            let temp = builder
                .permissions(fs::Permissions::from_mode(0o666))
                .tempfile_in(parent)
                .map_err(io_err)?;
            let (mut file, temp) = temp.into_parts();
            let thread = std::thread::spawn(move || {
                for chunk in received {
                    file.write_all(&chunk)?;
                }
                Ok(Unpacked::default())
            });
            (Temp::File(temp), thread)
        };
        Ok(Self::Worker(Worker {
            dest: path.clone(),
            temp: Some(temp),
            chunks: Some(chunks),
            thread: Some(thread),
        }))
    }

    fn dest(&self) -> &Path {
        match self {
            Self::Stdout => Path::new("-"),
            Self::Worker(worker) => &worker.dest,
        }
    }

    fn write(&mut self, bytes: Vec<u8>) -> Result<(), OutputError> {
        let worker = match self {
            Self::Stdout => return io::stdout().write_all(&bytes).map_err(OutputError::Stdout),
            Self::Worker(worker) => worker,
        };
        let sent = worker.chunks.as_ref().map(|chunks| chunks.send(bytes));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped: its error says why.
            _ => Err(worker.stop().err().unwrap_or_else(|| OutputError::Io {
                path: worker.dest.clone(),
                source: io::Error::other("the writer stopped"),
            })),
        }
    }

    fn finish(self) -> Result<(), OutputError> {
        let Self::Worker(mut worker) = self else {
            return Ok(());
        };
        let unpacked = worker.stop()?;
        let io_err = |source| OutputError::Io {
            path: worker.dest.clone(),
            source,
        };
        match worker.temp.take() {
            None => {}
            Some(Temp::File(temp)) => {
                temp.persist(&worker.dest)
                    .map_err(|err| io_err(err.error))?;
            }
            Some(Temp::Dir(temp)) => {
                // The directory itself is made as `mkdir` would make it.
                fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o777 & !umask()))
                    .map_err(io_err)?;
                fs::rename(temp.path(), &worker.dest).map_err(io_err)?;
                let _ = temp.keep();
            }
        }
        if unpacked.devices_skipped > 0 {
            eprintln!(
                "memobuild: {}: {} device node(s) not created (only root can make them)",
                worker.dest.display(),
                unpacked.devices_skipped
            );
        }
        Ok(())
    }
}

impl Worker {
    /// Ends the stream and waits for the thread: what it wrote is complete, or it failed.
    fn stop(&mut self) -> Result<Unpacked, OutputError> {
        self.chunks = None;
        let Some(thread) = self.thread.take() else {
            return Ok(Unpacked::default());
        };
        let result = thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")));
        result.map_err(|source| OutputError::Io {
            path: self.dest.clone(),
            source,
        })
    }
}

impl Drop for Worker {
    /// An output abandoned midway: the thread stops writing before its temp is removed.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The directory a temp for `path` goes in (beside it, so the rename stays on one
/// filesystem), and the name it is made from.
fn beside(path: &Path) -> (&Path, &std::ffi::OsStr) {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    (parent, path.file_name().unwrap_or(path.as_os_str()))
}

fn is_root() -> bool {
    paths::effective_uid() == 0
}

#[cfg_attr(
    target_os = "linux",
    expect(
        clippy::useless_conversion,
        reason = "mode_t is u32 here, u16 on macOS"
    )
)]
fn umask() -> u32 {
    // SAFETY: umask cannot fail; it is read by setting it and put back at once.
    #[expect(unsafe_code, reason = "libc has the only way to read the umask")]
    unsafe {
        let mask = libc::umask(0o022);
        libc::umask(mask);
        u32::from(mask)
    }
}

/// The chunks of one output as a byte stream.
struct ChunkReader {
    chunks: ChunkReceiver<Vec<u8>>,
    current: io::Cursor<Vec<u8>>,
}

impl ChunkReader {
    fn new(chunks: ChunkReceiver<Vec<u8>>) -> Self {
        Self {
            chunks,
            current: io::Cursor::new(Vec::new()),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.chunks.recv() {
                Ok(chunk) => self.current = io::Cursor::new(chunk),
                // The sender is gone: the output ended (or was abandoned).
                Err(_) => return Ok(0),
            }
        }
    }
}

#[derive(Debug, Default)]
struct Unpacked {
    devices_skipped: u64,
}

/// Unpacks a tar into `root`, never writing outside it. `owners`: keep owners, whole modes
/// and xattrs, make device nodes (root); otherwise mask modes with `mask`.
fn unpack(reader: impl Read, root: &Path, owners: bool, mask: u32) -> io::Result<Unpacked> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_ownerships(owners);
    archive.set_preserve_permissions(owners);
    archive.set_unpack_xattrs(owners);
    archive.set_mask(if owners { 0 } else { mask });
    let root = root.canonicalize()?;
    let mut unpacked = Unpacked::default();
    // Directories last, deepest first, as tar does: a read-only directory is made so only
    // after what goes in it.
    let mut directories = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => directories.push(entry),
            kind @ (tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block) => {
                if !owners && kind != tar::EntryType::Fifo {
                    unpacked.devices_skipped += 1;
                    continue;
                }
                make_special(&entry, &root, owners, mask)?;
            }
            _ => {
                entry.unpack_in(&root)?;
            }
        }
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut directory in directories {
        directory.unpack_in(&root)?;
    }
    Ok(unpacked)
}

/// A FIFO or device node (tar's own unpacking would make it a regular file).
fn make_special<R: Read>(
    entry: &tar::Entry<'_, R>,
    root: &Path,
    owners: bool,
    mask: u32,
) -> io::Result<()> {
    let header = entry.header();
    let path = inside(root, &entry.path()?)?;
    let mode = header.mode()? & if owners { 0o7777 } else { 0o777 & !mask };
    let kind = match header.entry_type() {
        tar::EntryType::Fifo => libc::S_IFIFO,
        tar::EntryType::Char => libc::S_IFCHR,
        _ => libc::S_IFBLK,
    };
    let device = if kind == libc::S_IFIFO {
        0
    } else {
        libc::makedev(
            header.device_major()?.unwrap_or(0),
            header.device_minor()?.unwrap_or(0),
        )
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c_path is a valid NUL-terminated path; mknod has no other preconditions.
    #[expect(unsafe_code, reason = "std cannot make FIFOs or device nodes")]
    let made = unsafe { libc::mknod(c_path.as_ptr(), kind | mode as libc::mode_t, device) };
    if made != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("making {}: {err}", path.display()),
        ));
    }
    if owners {
        std::os::unix::fs::lchown(
            &path,
            Some(header.uid()? as u32),
            Some(header.gid()? as u32),
        )?;
        // mknod applied the umask; root keeps the archive's mode whole.
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `relative` under `root`, its missing parents made as directories, refusing any path that
/// leaves `root` (`..`, or a parent that is a symlink).
fn inside(root: &Path, relative: &Path) -> io::Result<PathBuf> {
    let escape = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} would be written outside the output", relative.display()),
        )
    };
    let parts: Vec<_> = relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(Ok(part)),
            Component::ParentDir => Some(Err(())),
            _ => None,
        })
        .collect::<Result<_, ()>>()
        .map_err(|()| escape())?;
    let Some((name, parents)) = parts.split_last() else {
        return Err(escape());
    };
    let mut path = root.to_owned();
    for part in parents {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(escape()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
            Err(err) => return Err(err),
        }
    }
    path.push(name);
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, mode, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(*kind);
            header.set_mode(*mode);
            header.set_uid(1234);
            header.set_gid(1234);
            header.set_size(data.len() as u64);
            header.set_mtime(1_700_000_000);
            header.set_device_major(1).expect("major");
            header.set_device_minor(3).expect("minor");
            builder
                .append_data(&mut header, path, *data)
                .expect("append");
        }
        builder.into_inner().expect("tar")
    }

    fn feed(outputs: &mut Outputs, bytes: &[u8]) {
        for chunk in bytes.chunks(1000) {
            outputs.chunk(chunk.to_vec()).expect("chunk");
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_appears_only_whole_and_an_abandoned_one_leaves_nothing() {
        let work = tempfile::tempdir().expect("work");
        let dest = work.path().join("out.tar");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();

        let mut outputs = Outputs::open(vec![Dest::File(dest.clone())]).expect("open");
        feed(&mut outputs, &bytes);
        assert!(!dest.exists(), "nothing under the name before the end");
        outputs.end(bytes.len() as u64).expect("end");
        outputs.finish().expect("finish");
        assert_eq!(fs::read(&dest).expect("dest"), bytes);
        let mode = fs::metadata(&dest).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask());

        // Abandoned midway (the daemon went away): the old file stays, no temp is left.
        let mut outputs = Outputs::open(vec![Dest::File(dest.clone())]).expect("open");
        feed(&mut outputs, &bytes[..5000]);
        drop(outputs);
        assert_eq!(fs::read(&dest).expect("dest"), bytes);
        assert_eq!(names(work.path()), ["out.tar"]);

        // A length that does not match is not put in place.
        let other = work.path().join("other");
        let mut outputs = Outputs::open(vec![Dest::File(other.clone())]).expect("open");
        feed(&mut outputs, &bytes[..5000]);
        outputs.end(6000).expect_err("short");
        drop(outputs);
        assert_eq!(names(work.path()), ["out.tar"]);
    }

    #[test]
    fn a_restart_starts_every_output_again() {
        let work = tempfile::tempdir().expect("work");
        let (first, second) = (work.path().join("a"), work.path().join("b"));
        let dests = vec![Dest::File(first.clone()), Dest::File(second.clone())];
        let mut outputs = Outputs::open(dests).expect("open");
        feed(&mut outputs, b"first");
        outputs.end(5).expect("end");
        feed(&mut outputs, b"half");
        outputs.restart().expect("restart");
        feed(&mut outputs, b"first");
        outputs.end(5).expect("end");
        feed(&mut outputs, b"second");
        outputs.end(6).expect("end");
        outputs.finish().expect("finish");
        assert_eq!(fs::read(&first).expect("a"), b"first");
        assert_eq!(fs::read(&second).expect("b"), b"second");
        assert_eq!(names(work.path()), ["a", "b"]);
    }

    #[test]
    fn a_directory_is_unpacked_beside_and_renamed_into_place() {
        let work = tempfile::tempdir().expect("work");
        let dest = work.path().join("rootfs");
        let tar = tar_of(&[
            ("ro/", tar::EntryType::Directory, 0o555, b""),
            ("ro/file", tar::EntryType::Regular, 0o4755, b"data"),
            ("pipe", tar::EntryType::Fifo, 0o640, b""),
            ("null", tar::EntryType::Char, 0o666, b""),
        ]);
        let mut outputs = Outputs::open(vec![Dest::Dir(dest.clone())]).expect("open");
        feed(&mut outputs, &tar);
        // The stream ends with padding after the tar's end: it is read too.
        feed(&mut outputs, &[0; 10240]);
        assert!(!dest.exists());
        outputs.end(tar.len() as u64 + 10240).expect("end");
        outputs.finish().expect("finish");

        let file = fs::metadata(dest.join("ro/file")).expect("file");
        assert!(
            fs::symlink_metadata(dest.join("pipe"))
                .expect("pipe")
                .file_type()
                .is_fifo()
        );
        if is_root() {
            assert_eq!((file.uid(), file.mode() & 0o7777), (1234, 0o4755));
            assert!(
                fs::symlink_metadata(dest.join("null"))
                    .expect("null")
                    .file_type()
                    .is_char_device()
            );
        } else {
            assert_eq!(file.uid(), paths::effective_uid());
            assert_eq!(file.mode() & 0o7777, 0o755 & !umask());
            assert!(!dest.join("null").exists(), "no device node without root");
        }
        assert_eq!(fs::read(dest.join("ro/file")).expect("read"), b"data");
        assert_eq!(names(work.path()), ["rootfs"]);

        // A directory that is not empty is refused before anything streams.
        let err = Outputs::open(vec![Dest::Dir(dest.clone())]).expect_err("not empty");
        assert!(matches!(err, OutputError::NotEmpty { .. }), "{err}");
    }

    #[test]
    fn nothing_is_written_outside_the_directory() {
        let work = tempfile::tempdir().expect("work");
        let outside = tempfile::tempdir().expect("outside");
        let mut builder = tar::Builder::new(Vec::new());
        let header = |kind, mode| {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(kind);
            header.set_size(0);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header
        };
        let mut link = header(tar::EntryType::Symlink, 0o777);
        builder
            .append_link(&mut link, "out", outside.path())
            .expect("link");
        let mut fifo = header(tar::EntryType::Fifo, 0o644);
        builder
            .append_data(&mut fifo, "out/pipe", io::empty())
            .expect("fifo");
        let tar = builder.into_inner().expect("tar");
        let dest = work.path().join("rootfs");
        let mut outputs = Outputs::open(vec![Dest::Dir(dest.clone())]).expect("open");
        let fed: Result<(), OutputError> = tar
            .chunks(1000)
            .try_for_each(|chunk| outputs.chunk(chunk.to_vec()));
        let ended = fed.and_then(|()| outputs.end(tar.len() as u64));
        let err = ended.expect_err("escape refused");
        assert!(err.to_string().contains("outside"), "{err}");
        drop(outputs);
        assert_eq!(names(outside.path()), Vec::<String>::new());
        assert!(names(work.path()).is_empty(), "{:?}", names(work.path()));
    }
}
