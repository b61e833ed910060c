//! ADD beyond COPY, with Docker's meaning: a local tar archive (plain, gzip, bzip2 or xz,
//! told by its content, never by its name) is extracted into the destination directory; an
//! `http(s)://` source is downloaded, saved with mode 0600, never extracted, and checked
//! against `--checksum` when one is given. Everything else is COPY ([`super::copy`]), and
//! placing a download reuses COPY's destination rules too.
//!
//! Archives keep their whiteout names as plain files and their owners (`--chown` owns only
//! the destination directory, as in BuildKit);
//! no entry lands outside the destination ([`crate::image::unpack`] refuses it). Downloads
//! stream through a temp file outside the staging tree, are bounded in time, and are tried
//! again after a 5xx answer or a broken connection.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::copy::{self, CopyError, CopySource, CopySpec};
use super::view::RootView;
use crate::caller::ReadCheck;
use crate::context::dockerignore::clean;
use crate::context::{EntryKind, FileTree, IgnoreRules, SourcePattern};
use crate::image::ImageError;
use crate::image::unpack::{Whiteouts, unpack};
use crate::registry::error::{causes, chain};
use crate::store::{Cas, CasError, Digest};

/// Schemes BuildKit fetches for ADD that MemoBuild does not (git).
const UNSUPPORTED_REMOTES: &[&str] = &["git://", "git@", "ssh://"];
/// What a download is named when its URL path has no last component (as BuildKit).
const UNNAMED: &str = "__unnamed__";
/// Tries per download: the first and two more after a passing failure.
const TRIES: u32 = 3;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait allowed for the answer, then for each read of the body (reqwest's blocking
/// client applies its timeout per operation).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The most one try of a download may take, however steadily its bytes arrive.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Docker's mode for downloaded files.
const DOWNLOAD_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Access(#[from] crate::caller::AccessError),
    #[error("ADD source {url:?}: {scheme} sources are not supported yet")]
    UnsupportedRemote { url: String, scheme: String },
    #[error("--checksum={0:?} is not sha256:<64 hex digits>")]
    BadChecksum(String),
    #[error("--checksum only applies to URL sources, not {0:?}")]
    ChecksumForLocal(String),
    #[error("extracting {archive:?}: {source}")]
    Extract {
        archive: String,
        #[source]
        source: ImageError,
    },
    #[error("extracting {archive:?}: {message}")]
    Decompress { archive: String, message: String },
    #[error(
        "{0} changed while it was being extracted; build again (MemoBuild never extracts an archive whose content differs from its fingerprint)"
    )]
    ChangedDuringExtract(String),
    #[error("downloading {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("downloading {url}: {message}")]
    Http { url: String, message: String },
    #[error("{0}: not downloaded before the step ran")]
    NotFetched(String),
    #[error("storing the download of {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: Box<CasError>,
    },
    #[error("checksum mismatch for {url}: expected sha256:{expected}, got sha256:{actual}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The build context as the ADD step sees it (ADD has no `--from`).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub dir: &'a Path,
    pub tree: &'a FileTree,
    pub excludes: &'a IgnoreRules,
    /// With it, every file read (archives too) must be one the caller could read.
    pub readable: Option<&'a ReadCheck<'a>>,
}

impl<'a> Context<'a> {
    fn source(self) -> CopySource<'a> {
        CopySource::Context {
            dir: self.dir,
            tree: self.tree,
            excludes: self.excludes,
            readable: self.readable,
        }
    }
}

/// Stages what the ADD adds into `staging` (an empty directory standing for the image root);
/// `checksum` is the `--checksum` flag. Temporary files go next to `staging`.
/// `downloads`: where the store holds each URL source's content, fetched (or revalidated)
/// when the step's key was computed ([`revalidate`], [`pinned`]).
pub fn stage(
    spec: &CopySpec,
    checksum: Option<&str>,
    context: Context<'_>,
    parent: &RootView,
    staging: &Path,
    as_root: bool,
    downloads: &HashMap<String, PathBuf>,
) -> Result<(), AddError> {
    let expected = checksum.map(parse_checksum).transpose()?;
    let mut urls = Vec::new();
    let mut locals = Vec::new();
    for source in &spec.sources {
        if let Some(scheme) = UNSUPPORTED_REMOTES.iter().find(|s| source.starts_with(*s)) {
            return Err(AddError::UnsupportedRemote {
                url: source.clone(),
                scheme: scheme.trim_end_matches(['/', ':', '@']).to_owned(),
            });
        }
        if is_url(source) {
            urls.push(source.as_str());
        } else {
            locals.push(source.as_str());
        }
    }
    if let (Some(_), Some(local)) = (&expected, locals.first()) {
        return Err(AddError::ChecksumForLocal((*local).to_owned()));
    }

    // Each source is staged on its own below, so what makes the destination a directory
    // for the whole instruction (several sources, a wildcard) is spelled out as a `/`.
    let into_dir = spec.sources.len() > 1
        || locals
            .iter()
            .any(|s| SourcePattern::new(s).is_ok_and(|p| p.is_wildcard()));
    let place = Placement {
        spec,
        dest: if into_dir && !spec.dest.ends_with('/') {
            format!("{}/", spec.dest)
        } else {
            spec.dest.clone()
        },
        parent,
        staging,
        // Never inside `staging`: whatever is there becomes the layer.
        temp_root: staging
            .parent()
            .map_or_else(std::env::temp_dir, Path::to_owned),
        as_root,
    };
    let (archives, plain) = split_archives(&locals, context)?;
    if !plain.is_empty() {
        place.copy(plain, context.source())?;
    }
    if !archives.is_empty() {
        let dest_host = place.archive_dest()?;
        // `--chown` owns the destination directory only: entries keep the archive's owners,
        // as in BuildKit.
        for archive in &archives {
            extract(context, archive, &dest_host)?;
        }
    }
    for url in urls {
        let stored = downloads
            .get(url)
            .ok_or_else(|| AddError::NotFetched(url.to_owned()))?;
        place.url(url, stored)?;
    }
    Ok(())
}

pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// `sha256:<hex>` → the lower-case hex digest.
fn parse_checksum(text: &str) -> Result<String, AddError> {
    match text.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(hex.to_ascii_lowercase())
        }
        _ => Err(AddError::BadChecksum(text.to_owned())),
    }
}

/// Sorts local sources into archives to extract (context paths) and sources to COPY.
/// A pattern with no archive among its matches is passed on as written, so COPY reports
/// a missing source or a bad pattern exactly as it would.
fn split_archives(
    locals: &[&str],
    context: Context<'_>,
) -> Result<(Vec<String>, Vec<String>), AddError> {
    let mut archives = Vec::new();
    let mut plain = Vec::new();
    for source in locals {
        let Ok(pattern) = SourcePattern::new(source) else {
            plain.push((*source).to_owned());
            continue;
        };
        let mut matched_archives = Vec::new();
        let mut matched_plain = Vec::new();
        for (path, entry) in context.tree.iter() {
            if !pattern.matches(path) || context.excludes.is_excluded(path) {
                continue;
            }
            let host = context.dir.join(path);
            if let (Some(check), EntryKind::File) = (context.readable, entry.kind) {
                check.check(&host)?;
            }
            if entry.kind == EntryKind::File && is_archive(&host)? {
                matched_archives.push(path.to_owned());
            } else {
                matched_plain.push(literal(path));
            }
        }
        if matched_archives.is_empty() {
            plain.push((*source).to_owned());
        } else {
            archives.extend(matched_archives);
            plain.extend(matched_plain);
        }
    }
    Ok((archives, plain))
}

/// A path as a source pattern that matches exactly it (plain paths already do).
fn literal(path: &str) -> String {
    if !path.contains(['*', '?', '[']) {
        return path.to_owned();
    }
    let mut out = String::with_capacity(path.len());
    for ch in path.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
}

impl Compression {
    fn detect(magic: &[u8]) -> Self {
        match magic {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [b'B', b'Z', b'h', ..] => Self::Bzip2,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Self::Xz,
            _ => Self::None,
        }
    }
}

/// Whether the file is a tar archive, compressed or not: its (decompressed) first block is a
/// tar header with a valid checksum, as Docker decides by reading the first header.
fn is_archive(path: &Path) -> Result<bool, AddError> {
    let file = std::fs::File::open(path).map_err(io("reading", path))?;
    let mut block = [0u8; 512];
    let filled = with_tar_stream(file, |tar| read_full(tar, &mut block));
    Ok(matches!(filled, Ok(Ok(512))) && is_tar_header(&block))
}

fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn is_tar_header(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let digits = String::from_utf8_lossy(field);
    let Ok(stored) = u32::from_str_radix(digits.trim_matches([' ', '\0']), 8) else {
        return false;
    };
    // The checksum is computed with its own field read as spaces; old tars sum signed bytes.
    let around = block[..148].iter().chain(&block[156..]);
    let unsigned: u32 = around.clone().map(|&b| u32::from(b)).sum::<u32>() + 8 * 32;
    let signed: i64 = around.map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    block.iter().any(|&b| b != 0) && (stored == unsigned || i64::from(stored) == signed)
}

/// Runs `consume` on the tar stream inside `input`, whatever its compression. xz is decoded
/// on a second thread through a pipe (lzma-rs only writes into a `Write`), so the archive is
/// streamed, never held whole. The outer error is the decoder's own failure.
fn with_tar_stream<R: Read + Send, T>(
    input: R,
    consume: impl FnOnce(&mut dyn Read) -> T,
) -> io::Result<T> {
    let mut input = BufReader::new(input);
    let magic = std::io::BufRead::fill_buf(&mut input)?;
    match Compression::detect(magic) {
        Compression::None => Ok(consume(&mut input)),
        Compression::Gzip => Ok(consume(&mut flate2::read::MultiGzDecoder::new(input))),
        Compression::Bzip2 => Ok(consume(&mut bzip2::read::MultiBzDecoder::new(input))),
        Compression::Xz => {
            let (mut reader, mut writer) = io::pipe()?;
            std::thread::scope(|scope| {
                let decoder = scope.spawn(move || {
                    lzma_rs::xz_decompress(&mut input, &mut writer).map_err(|err| match err {
                        lzma_rs::error::Error::IoError(err) => err,
                        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
                    })
                });
                let consumed = consume(&mut reader);
                // Closing our end stops a decoder the consumer no longer reads from.
                drop(reader);
                match decoder.join() {
                    Ok(Ok(())) => Ok(consumed),
                    Ok(Err(err)) if err.kind() == io::ErrorKind::BrokenPipe => Ok(consumed),
                    Ok(Err(err)) => Err(err),
                    Err(_) => Err(io::Error::other("the xz decoder panicked")),
                }
            })
        }
    }
}

/// Where one ADD's sources land: COPY's destination rules, with the destination as the
/// whole instruction makes it.
struct Placement<'a> {
    spec: &'a CopySpec,
    dest: String,
    parent: &'a RootView,
    staging: &'a Path,
    /// Beside `staging`, in the daemon's scratch area: downloads are written here first.
    temp_root: PathBuf,
    as_root: bool,
}

impl Placement<'_> {
    fn copy(&self, sources: Vec<String>, source: CopySource<'_>) -> Result<(), AddError> {
        let spec = CopySpec {
            sources,
            dest: self.dest.clone(),
            ..self.spec.clone()
        };
        copy::stage(&spec, source, self.parent, self.staging, self.as_root)?;
        Ok(())
    }

    fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir, AddError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.temp_root)
            .map_err(io("creating a directory in", &self.temp_root))
    }

    /// Where archives are extracted: the destination as a directory, made in the staging
    /// tree the way COPY makes it (existing parents keep their mode and owner; new ones
    /// belong to `--chown`). COPY is asked to copy an empty directory's contents there, which
    /// makes exactly that directory and nothing else.
    fn archive_dest(&self) -> Result<PathBuf, AddError> {
        let empty = self.temp_dir("add-dest-")?;
        std::fs::set_permissions(empty.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of", empty.path()))?;
        let view = RootView::new(vec![empty.path().to_owned()]);
        self.copy(
            vec![".".into()],
            CopySource::Image(&view, &IgnoreRules::default()),
        )?;
        let absolute = if self.dest.starts_with('/') {
            self.dest.clone()
        } else {
            format!("{}/{}", self.spec.workdir, self.dest)
        };
        let resolved = self
            .parent
            .resolve(&Path::new("/").join(clean(&absolute)), true);
        Ok(self
            .staging
            .join(resolved.strip_prefix("/").unwrap_or(&resolved)))
    }

    /// Places the content of `url` (`stored`) with COPY's rules, as the file `<basename of
    /// the URL path>` with mode 0600.
    fn url(&self, url: &str, stored: &Path) -> Result<(), AddError> {
        let download = self.temp_dir("add-url-")?;
        let file = download.path().join(url_basename(url));
        std::fs::copy(stored, &file).map_err(io("copying a download to", &file))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(DOWNLOAD_MODE))
            .map_err(io("setting the mode of", &file))?;
        let view = RootView::new(vec![download.path().to_owned()]);
        self.copy(
            vec![literal(&url_basename(url))],
            CopySource::Image(&view, &IgnoreRules::default()),
        )
    }
}

/// Extracts one context archive into `dest_host`, checking that what was read is what the
/// context fingerprint saw.
fn extract(context: Context<'_>, archive: &str, dest_host: &Path) -> Result<(), AddError> {
    let host = context.dir.join(archive);
    let file = std::fs::File::open(&host).map_err(io("reading", &host))?;
    let mut hashing = HashingReader {
        inner: file,
        hasher: blake3::Hasher::new(),
    };
    let unpacked = with_tar_stream(&mut hashing, |tar| unpack(tar, dest_host, Whiteouts::Keep))
        .map_err(|err| AddError::Decompress {
            archive: archive.to_owned(),
            message: err.to_string(),
        })?;
    unpacked.map_err(|source| AddError::Extract {
        archive: archive.to_owned(),
        source,
    })?;
    // Trailing bytes after the tar's end still belong to the fingerprinted content.
    io::copy(&mut hashing, &mut io::sink()).map_err(io("reading", &host))?;
    match context.tree.get(archive) {
        Some(entry) if entry.hash == *hashing.hasher.finalize().as_bytes() => Ok(()),
        _ => Err(AddError::ChangedDuringExtract(archive.to_owned())),
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The file name BuildKit gives a download: the last component of the URL's (decoded)
/// path, `__unnamed__` when there is none.
fn url_basename(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .split_once('/')
        .map_or("", |(_, path)| path);
    let decoded = percent_decode(path);
    match decoded.trim_end_matches('/').rsplit('/').next() {
        Some(name) if !name.is_empty() && name != "." && name != ".." => name.to_owned(),
        _ => UNNAMED.to_owned(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One failed try, and whether trying again may help.
struct Failed {
    error: AddError,
    transient: bool,
}

/// What a URL answered, so that the next build can ask it whether its content changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The content, in the store.
    pub digest: Digest,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// The content of `url` as it is now, in the store. With `known` (what the URL answered
/// last, still stored) the request is conditional (`If-None-Match`, `If-Modified-Since`) and
/// a `304` keeps it; otherwise the content is downloaded and hashed.
pub fn revalidate(cas: &Cas, url: &str, known: Option<&Fetched>) -> Result<Fetched, AddError> {
    match fetch(cas, url, known, None)? {
        Answer::Stored(fetched) => Ok(fetched),
        Answer::NotModified => known.cloned().ok_or_else(|| AddError::Status {
            url: url.to_owned(),
            status: 304,
        }),
    }
}

/// The content of `url` pinned by `--checksum` (`digest`): from the store when it is there
/// (no request at all), else downloaded and checked.
pub fn pinned(cas: &Cas, url: &str, digest: &Digest) -> Result<(), AddError> {
    if cas.contains(digest) {
        return Ok(());
    }
    fetch(cas, url, None, Some(digest)).map(drop)
}

/// `--checksum=sha256:<hex>` as a store digest.
pub fn checksum_digest(text: &str) -> Result<Digest, AddError> {
    let hex = parse_checksum(text)?;
    Digest::parse(&format!("sha256:{hex}")).map_err(|_| AddError::BadChecksum(text.to_owned()))
}

enum Answer {
    Stored(Fetched),
    NotModified,
}

/// Downloads `url` into the store, trying again after passing failures.
fn fetch(
    cas: &Cas,
    url: &str,
    known: Option<&Fetched>,
    expected: Option<&Digest>,
) -> Result<Answer, AddError> {
    // reqwest is built without a default crypto provider; an error means one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(READ_TIMEOUT)
        .build()
        .map_err(|err| AddError::Http {
            url: url.to_owned(),
            message: chain(&err),
        })?;
    let mut delay = FIRST_RETRY_DELAY;
    let mut attempt = 1;
    loop {
        match fetch_once(&client, cas, url, known, expected) {
            Ok(answer) => return Ok(answer),
            Err(failed) if failed.transient && attempt < TRIES => {
                tracing::warn!(url, error = %failed.error, try = attempt, "retrying the download");
                std::thread::sleep(delay);
                delay *= 2;
                attempt += 1;
            }
            Err(failed) => return Err(failed.error),
        }
    }
}

fn fetch_once(
    client: &reqwest::blocking::Client,
    cas: &Cas,
    url: &str,
    known: Option<&Fetched>,
    expected: Option<&Digest>,
) -> Result<Answer, Failed> {
    let http = |err: &(dyn std::error::Error + 'static), transient| Failed {
        error: AddError::Http {
            url: url.to_owned(),
            message: chain(err),
        },
        transient,
    };
    let mut request = client.get(url);
    if let Some(known) = known {
        if let Some(etag) = &known.etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if let Some(since) = &known.last_modified {
            request = request.header(reqwest::header::IF_MODIFIED_SINCE, since);
        }
    }
    let mut response = request
        .send()
        .map_err(|err| http(&err, err.is_timeout() || broke(&err)))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED && known.is_some() {
        return Ok(Answer::NotModified);
    }
    if !status.is_success() {
        return Err(Failed {
            error: AddError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
            },
            transient: status.is_server_error() || status.as_u16() == 429,
        });
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, last_modified) = (
        header(reqwest::header::ETAG),
        header(reqwest::header::LAST_MODIFIED),
    );
    let store = |source| Failed {
        error: AddError::Store {
            url: url.to_owned(),
            source: Box::new(source),
        },
        transient: false,
    };
    let mut writer = cas.writer().map_err(store)?;
    let mut buf = vec![0u8; 256 * 1024];
    let started = std::time::Instant::now();
    loop {
        if started.elapsed() > DOWNLOAD_TIMEOUT {
            return Err(Failed {
                error: AddError::Http {
                    url: url.to_owned(),
                    message: format!("not done after {DOWNLOAD_TIMEOUT:?}"),
                },
                transient: false,
            });
        }
        // A read failing mid-body is the connection breaking (or the time running out):
        // worth another try.
        let n = response.read(&mut buf).map_err(|err| http(&err, true))?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).map_err(|source| Failed {
            error: AddError::Io {
                what: "storing the download of",
                path: PathBuf::from(url),
                source,
            },
            transient: false,
        })?;
    }
    let blob = writer.commit(expected).map_err(|err| match err {
        CasError::Mismatch { expected, actual } => Failed {
            error: AddError::ChecksumMismatch {
                url: url.to_owned(),
                expected: expected.hex().to_owned(),
                actual: actual.hex().to_owned(),
            },
            transient: false,
        },
        other => store(other),
    })?;
    Ok(Answer::Stored(Fetched {
        digest: blob.digest,
        etag,
        last_modified,
    }))
}

/// Whether the connection was reset or closed under the request.
fn broke(err: &(dyn std::error::Error + 'static)) -> bool {
    causes(err).any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        }) || cause
            .to_string()
            .contains("connection closed before message completed")
    })
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> AddError + 'p {
    move |source| AddError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
