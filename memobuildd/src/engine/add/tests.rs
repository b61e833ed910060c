//! ADD against real directories and a local HTTP server (no root needed: ownership is not
//! set here).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;

use sha2::{Digest as _, Sha256};

use super::*;
use crate::context::{StatCache, scan};
use crate::engine::testutil::listing;

/// A tar with a directory, a file and a whiteout-named file.
fn app_tar() -> Vec<u8> {
    raw_tar(&[
        ("app/", tar::EntryType::Directory, b""),
        ("app/run.sh", tar::EntryType::Regular, b"echo hi"),
        ("app/.wh.old", tar::EntryType::Regular, b"plain name"),
    ])
}

/// A hand-made tar (names as written, even `..`), with modes no default would give, so the
/// tests see that modes come from the archive.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let entries: Vec<(&str, tar::EntryType, &str, &[u8])> = entries
        .iter()
        .map(|(name, kind, data)| (*name, *kind, "", *data))
        .collect();
    crate::image::testutil::raw_tar_with_modes(&entries, 0o750, 0o744)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn bzip2(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    encoder.write_all(bytes).expect("bzip2");
    encoder.finish().expect("bzip2")
}

fn xz(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzma_rs::xz_compress(&mut &bytes[..], &mut out).expect("xz");
    out
}

struct Fixture {
    dir: tempfile::TempDir,
    tree: FileTree,
    parent: RootView,
}

impl Fixture {
    /// A context holding `files`, and a parent image with /opt (mode 0700).
    fn new(files: &[(&str, Vec<u8>)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx).expect("ctx");
        for (path, content) in files {
            let file = ctx.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, content).expect("write");
        }
        let mut cache = StatCache::open(&dir.path().join("c.sqlite")).expect("cache");
        let (tree, _) = scan(&ctx, &IgnoreRules::default(), &mut cache).expect("scan");
        let layer = dir.path().join("layer");
        std::fs::create_dir_all(layer.join("opt")).expect("opt");
        std::fs::set_permissions(layer.join("opt"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        Self {
            dir,
            tree,
            parent: RootView::new(vec![layer]),
        }
    }

    /// Runs an ADD and lists the staging tree: path → "kind mode content".
    fn add(
        &self,
        sources: &[&str],
        dest: &str,
        checksum: Option<&str>,
    ) -> Result<BTreeMap<String, String>, AddError> {
        let scratch = tempfile::tempdir_in(self.dir.path()).expect("scratch");
        let staging = scratch.path().join("staging");
        std::fs::create_dir(&staging).expect("staging");
        let spec = CopySpec {
            sources: sources.iter().map(|s| (*s).to_owned()).collect(),
            dest: dest.to_owned(),
            workdir: "/work".into(),
            chown: None,
            chmod: None,
        };
        let ctx = self.dir.path().join("ctx");
        let excludes = IgnoreRules::default();
        let context = Context {
            dir: &ctx,
            tree: &self.tree,
            excludes: &excludes,
            readable: None,
        };
        // The step places what the key computation stored (`revalidate`, `pinned`).
        let store = crate::store::Store::open(
            &crate::layout::Layout::new(self.dir.path().join("store")),
            crate::store::StoreOptions::default(),
        )
        .expect("store");
        let cas = store.cas();
        let mut downloads = HashMap::new();
        for url in sources.iter().filter(|s| is_url(s)) {
            let digest = match checksum {
                Some(checksum) => {
                    let digest = checksum_digest(checksum)?;
                    pinned(&cas, url, &digest)?;
                    digest
                }
                None => revalidate(&cas, url, None)?.digest,
            };
            downloads.insert((*url).to_owned(), cas.path(&digest));
        }
        stage(
            &spec,
            checksum,
            context,
            &self.parent,
            &staging,
            false,
            &downloads,
        )?;
        let leftovers: Vec<_> = std::fs::read_dir(scratch.path())
            .expect("scratch")
            .flatten()
            .map(|e| e.file_name())
            .filter(|name| name != "staging")
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        Ok(listing(&staging))
    }
}

#[test]
fn chown_owns_the_destination_but_not_what_the_archive_holds() {
    if !crate::testing::privileged("chown_owns_the_destination_but_not_what_the_archive_holds") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new(&[("app.tar.gz", gzip(&app_tar()))]);
    let staging = fx.dir.path().join("staging");
    std::fs::create_dir(&staging).expect("staging");
    let spec = CopySpec {
        sources: vec!["app.tar.gz".into()],
        dest: "/dst/".into(),
        workdir: "/".into(),
        chown: Some((1000, 1000)),
        chmod: None,
    };
    let ctx = fx.dir.path().join("ctx");
    let excludes = IgnoreRules::default();
    let context = Context {
        dir: &ctx,
        tree: &fx.tree,
        excludes: &excludes,
        readable: None,
    };
    stage(
        &spec,
        None,
        context,
        &fx.parent,
        &staging,
        true,
        &HashMap::new(),
    )
    .expect("add");
    let owner = |rel: &str| {
        let meta = std::fs::symlink_metadata(staging.join(rel)).expect(rel);
        (meta.uid(), meta.gid())
    };
    assert_eq!(owner("dst"), (1000, 1000));
    assert_eq!(owner("dst/app"), (0, 0));
    assert_eq!(owner("dst/app/run.sh"), (0, 0));
}

#[test]
fn archives_are_told_by_content_not_by_name() {
    let tar = app_tar();
    let fx = Fixture::new(&[
        ("plain.bin", tar.clone()),
        ("gz.bin", gzip(&tar)),
        ("bz2.bin", bzip2(&tar)),
        ("xz.bin", xz(&tar)),
        ("text.tar.gz", b"not an archive at all".to_vec()),
        ("gzipped-text.tgz", gzip(b"compressed, but not a tar")),
        ("empty.tar", Vec::new()),
    ]);
    let ctx = fx.dir.path().join("ctx");
    for name in ["plain.bin", "gz.bin", "bz2.bin", "xz.bin"] {
        assert!(is_archive(&ctx.join(name)).expect(name), "{name}");
    }
    for name in ["text.tar.gz", "gzipped-text.tgz", "empty.tar"] {
        assert!(!is_archive(&ctx.join(name)).expect(name), "{name}");
    }
}

#[test]
fn every_compression_extracts_into_an_existing_directory_keeping_whiteout_names() {
    let tar = app_tar();
    for (name, bytes) in [
        ("app.tar", tar.clone()),
        ("app.tgz", gzip(&tar)),
        ("app.tbz", bzip2(&tar)),
        ("app.txz", xz(&tar)),
    ] {
        let fx = Fixture::new(&[(name, bytes)]);
        // No trailing slash: an archive's destination is always a directory.
        let out = fx.add(&[name], "/opt", None).expect(name);
        let expected: BTreeMap<String, String> = [
            ("opt", "dir 700"),
            ("opt/app", "dir 750"),
            ("opt/app/run.sh", "file 744 echo hi"),
            ("opt/app/.wh.old", "file 744 plain name"),
        ]
        .into_iter()
        .map(|(p, l)| (p.to_owned(), l.to_owned()))
        .collect();
        assert_eq!(out, expected, "{name}");
    }
}

#[test]
fn a_non_archive_is_copied_and_a_wildcard_mixes_both() {
    let fx = Fixture::new(&[
        ("notes.txt", b"hello".to_vec()),
        ("pkg/a.tgz", gzip(&app_tar())),
        ("pkg/b.txt", b"b".to_vec()),
        ("pkg/c[1].txt", b"c".to_vec()),
    ]);
    let out = fx.add(&["notes.txt"], "/etc/notes", None).expect("copy");
    assert_eq!(out["etc/notes"], "file 644 hello");
    let out = fx.add(&["pkg/*"], "dist", None).expect("wildcard");
    assert_eq!(out["work/dist/b.txt"], "file 644 b");
    assert_eq!(out["work/dist/c[1].txt"], "file 644 c");
    assert_eq!(out["work/dist/app/run.sh"], "file 744 echo hi");
    assert!(!out.contains_key("work/dist/a.tgz"), "{out:?}");
}

#[test]
fn a_truncated_archive_is_never_extracted_in_part() {
    let tar = raw_tar(&[
        ("a", tar::EntryType::Regular, &[b'a'; 4096]),
        ("b", tar::EntryType::Regular, &[b'b'; 4096]),
    ]);
    let cut = |mut bytes: Vec<u8>| {
        bytes.truncate(bytes.len() - 8);
        bytes
    };
    for (name, bytes) in [("a.tgz", cut(gzip(&tar))), ("a.tbz", cut(bzip2(&tar)))] {
        let fx = Fixture::new(&[(name, bytes)]);
        let err = fx.add(&[name], "/opt/", None).expect_err(name);
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    // lzma-rs writes nothing before a small stream is whole, so a broken one reads as no
    // archive at all and is copied as the file it is (as Docker copies what it cannot open).
    let fx = Fixture::new(&[("a.txz", cut(xz(&tar)))]);
    let out = fx.add(&["a.txz"], "/opt/", None).expect("copied");
    assert_eq!(
        out.keys().map(String::as_str).collect::<Vec<_>>(),
        ["opt", "opt/a.txz"]
    );
}

#[test]
fn an_archive_reaching_outside_the_destination_is_refused() {
    let evil = raw_tar(&[("../../evil", tar::EntryType::Regular, b"x")]);
    let fx = Fixture::new(&[("evil.tar.gz", gzip(&evil))]);
    let err = fx
        .add(&["evil.tar.gz"], "/opt/", None)
        .expect_err("escapes");
    let message = err.to_string();
    assert!(message.contains("evil.tar.gz"), "{message}");
    assert!(message.contains("../../evil"), "{message}");
    assert!(!fx.dir.path().join("evil").exists());
}

#[test]
fn url_basenames_follow_buildkit() {
    for (url, name) in [
        ("https://example.com/files/app.tar.gz", "app.tar.gz"),
        (
            "https://example.com/files/app.tar.gz?token=1#x",
            "app.tar.gz",
        ),
        ("http://example.com/dir/", "dir"),
        ("http://example.com/a%20b.txt", "a b.txt"),
        ("http://example.com/", "__unnamed__"),
        ("http://example.com", "__unnamed__"),
        ("http://example.com/?q=/x", "__unnamed__"),
    ] {
        assert_eq!(url_basename(url), name, "{url}");
    }
}

#[test]
fn checksums_must_be_sha256_and_only_for_urls() {
    let fx = Fixture::new(&[("a.txt", b"a".to_vec())]);
    let err = fx
        .add(
            &["a.txt"],
            "/a",
            Some(&format!("sha256:{}", "0".repeat(64))),
        )
        .expect_err("local");
    assert!(err.to_string().contains("\"a.txt\""), "{err}");
    let err = fx
        .add(&["http://127.0.0.1:1/x"], "/x", Some("md5:abc"))
        .expect_err("bad");
    assert!(err.to_string().contains("md5:abc"), "{err}");
    let err = fx
        .add(&["git://example.com/repo.git"], "/src", None)
        .expect_err("git");
    assert!(err.to_string().contains("git"), "{err}");
}

/// Serves `answers` (status, body) one per connection, in order, on 127.0.0.1; status 0
/// closes the connection without an answer.
fn serve(answers: Vec<(u16, Vec<u8>)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let server = std::thread::spawn(move || {
        let mut requested = Vec::new();
        for (status, body) in answers {
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            requested.push(line.split(' ').nth(1).unwrap_or_default().to_owned());
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            if status == 0 {
                continue;
            }
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).expect("head");
            stream.write_all(&body).expect("body");
        }
        requested
    });
    (address, server)
}

#[test]
fn a_download_is_retried_after_a_5xx_and_a_dropped_connection_saved_0600_never_extracted() {
    let archive = gzip(&app_tar());
    let (address, server) = serve(vec![
        (503, b"busy".to_vec()),
        (0, Vec::new()),
        (200, archive.clone()),
    ]);
    let fx = Fixture::new(&[]);
    let url = format!("{address}/files/app.tar.gz");
    let digest = hex::encode(Sha256::digest(&archive));
    let out = fx
        .add(&[&url], "/downloads/", Some(&format!("sha256:{digest}")))
        .expect("download");
    assert_eq!(server.join().expect("server"), ["/files/app.tar.gz"; 3]);
    assert_eq!(out["downloads"], "dir 755");
    assert!(
        out["downloads/app.tar.gz"].starts_with("file 600 "),
        "{out:?}"
    );
    assert_eq!(out.len(), 2, "{out:?}");
}

#[test]
fn a_checksum_mismatch_names_both_digests_and_a_404_its_status() {
    let (address, server) = serve(vec![(200, b"payload".to_vec()), (404, Vec::new())]);
    let fx = Fixture::new(&[]);
    let url = format!("{address}/data.bin");
    let wrong = "a".repeat(64);
    let err = fx
        .add(&[&url], "/data.bin", Some(&format!("sha256:{wrong}")))
        .expect_err("mismatch");
    let actual = hex::encode(Sha256::digest(b"payload"));
    let message = err.to_string();
    assert!(message.contains(&url), "{message}");
    assert!(
        message.contains(&format!("expected sha256:{wrong}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("got sha256:{actual}")),
        "{message}"
    );

    let err = fx.add(&[&url], "/data.bin", None).expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    server.join().expect("server");
}

/// Answers `200` with an ETag and `body`, then `304` to a request that sends that ETag back;
/// hands back each request's head.
fn serve_with_etag(
    body: &'static [u8],
    requests: usize,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let server = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..requests {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                head.push_str(&line);
                line.clear();
            }
            let answer = if head.to_ascii_lowercase().contains("if-none-match: \"v1\"") {
                "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            stream.write_all(answer.as_bytes()).expect("head");
            if answer.starts_with("HTTP/1.1 200") {
                stream.write_all(body).expect("body");
            }
            heads.push(head);
        }
        heads
    });
    (address, server)
}

#[test]
fn a_url_is_revalidated_with_its_etag_and_a_304_keeps_the_stored_content() {
    let (address, server) = serve_with_etag(b"v1 content", 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::store::Store::open(
        &crate::layout::Layout::new(dir.path()),
        crate::store::StoreOptions::default(),
    )
    .expect("store");
    let cas = store.cas();
    let url = format!("{address}/f");
    let first = revalidate(&cas, &url, None).expect("download");
    assert_eq!(
        std::fs::read(cas.path(&first.digest)).expect("stored"),
        b"v1 content"
    );
    let second = revalidate(&cas, &url, Some(&first)).expect("revalidate");
    assert_eq!(second, first);
    let heads = server.join().expect("server");
    assert!(
        !heads[0].to_ascii_lowercase().contains("if-none-match"),
        "{heads:?}"
    );
    assert!(
        heads[1]
            .to_ascii_lowercase()
            .contains("if-none-match: \"v1\""),
        "{heads:?}"
    );
}
