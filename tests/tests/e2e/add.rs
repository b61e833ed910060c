//! ADD end to end: a local archive extracted, a plain file copied, URLs downloaded from a
//! server in the test (with and without `--checksum`), and a wrong checksum failing the
//! build. These need root, like every real build.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use memobuild_tests::bench::{Bench, content_of, describe, executed, tail};
use memobuild_tests::{privileged, texts};
use sha2::{Digest, Sha256};

/// Serves one file at `/files/data.bin` on 127.0.0.1 until dropped; counts its requests.
struct FileServer {
    port: u16,
    body: Arc<std::sync::Mutex<Vec<u8>>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    fn start(body: &[u8]) -> Self {
        let body = Arc::new(std::sync::Mutex::new(body.to_vec()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counted, stopping, served) =
            (Arc::clone(&requests), Arc::clone(&stop), Arc::clone(&body));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let body = served.lock().expect("body").clone();
                    answer(stream, &body);
                }
            }
        });
        Self {
            port,
            body,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// What the file holds from now on.
    fn set(&self, body: &[u8]) {
        *self.body.lock().expect("body") = body.to_vec();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/files/data.bin", self.port)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request, answered `200` with `body` for the file's path and `404` otherwise.
fn answer(stream: TcpStream, body: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let (status, body) = if request.starts_with("GET /files/data.bin ") {
        ("200 OK", body)
    } else {
        ("404 Not Found", &b""[..])
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = writer
        .write_all(head.as_bytes())
        .and_then(|()| writer.write_all(body));
}

const DATA: &[u8] = b"downloaded bytes, never extracted\n";

/// `app/` (mode 0750) with `run.sh` owned by 1234:5678 (mode 0755), gzip-compressed.
fn app_tar_gz() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_path("app/").expect("path");
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o750);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(1_700_000_000);
    dir.set_size(0);
    dir.set_cksum();
    builder.append(&dir, &b""[..]).expect("dir");
    let script = b"echo hi\n";
    let mut file = tar::Header::new_ustar();
    file.set_path("app/run.sh").expect("path");
    file.set_mode(0o755);
    file.set_uid(1234);
    file.set_gid(5678);
    file.set_mtime(1_700_000_000);
    file.set_size(script.len() as u64);
    file.set_cksum();
    builder.append(&file, &script[..]).expect("file");
    let tar = builder.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    gz.finish().expect("gzip")
}

fn dockerfile(server: &FileServer, checksum: &str) -> String {
    let url = server.url();
    format!(
        "FROM BASE\n\
         ADD app.tar.gz /opt/\n\
         ADD plain.txt /etc/plain.txt\n\
         ADD {url} /downloads/\n\
         ADD --checksum=sha256:{checksum} {url} /d2/data.bin\n\
         ADD --chown=1:2 app.tar.gz /srv\n"
    )
}

#[test]
fn add_extracts_archives_downloads_urls_and_rebuilds_nothing() {
    if !privileged("add_extracts_archives_downloads_urls_and_rebuilds_nothing") {
        return;
    }
    let bench = Bench::start();
    let server = FileServer::start(DATA);
    let right = hex::encode(Sha256::digest(DATA));
    let ctx = bench.context(
        "add",
        &[
            ("Dockerfile", &dockerfile(&server, &right)),
            ("plain.txt", "plain\n"),
        ],
    );
    std::fs::write(ctx.join("app.tar.gz"), app_tar_gz()).expect("archive");

    let rootfs = bench.rootfs_tar(&ctx, &[]);
    assert_eq!(rootfs["opt/app"], describe("dir", 0o750, 0, 0, ""));
    assert_eq!(
        rootfs["opt/app/run.sh"],
        describe("file", 0o755, 1234, 5678, &content_of("echo hi\n"))
    );
    assert!(
        !rootfs.contains_key("opt/app.tar.gz"),
        "extracted, not copied"
    );
    // As in BuildKit, --chown owns the destination; the archive's entries keep their owners.
    assert_eq!(
        rootfs["srv/app/run.sh"],
        describe("file", 0o755, 1234, 5678, &content_of("echo hi\n")),
    );
    assert_eq!(rootfs["srv/app"], describe("dir", 0o750, 0, 0, ""));
    assert_eq!(rootfs["srv"], describe("dir", 0o755, 1, 2, ""));
    assert_eq!(
        rootfs["etc/plain.txt"],
        describe("file", 0o644, 0, 0, &content_of("plain\n"))
    );
    let data = content_of(std::str::from_utf8(DATA).expect("text"));
    for path in ["downloads/data.bin", "d2/data.bin"] {
        assert_eq!(rootfs[path], describe("file", 0o600, 0, 0, &data), "{path}");
    }
    // The URL without a checksum was asked once; the pinned one has the same content, so
    // it was found in the store.
    let fetched = server.requests.load(Ordering::Relaxed);
    assert_eq!(fetched, 1);

    // A rebuild asks the server again (the unpinned URL only) and, the content being the
    // same, runs nothing.
    let again = bench.build_ok(&ctx, &[]);
    assert_eq!(executed(&again), 0, "{again}");
    assert_eq!(server.requests.load(Ordering::Relaxed), fetched + 1);
}

#[test]
fn add_url_is_revalidated_every_build_and_new_content_reruns_what_follows() {
    if !privileged("add_url_is_revalidated_every_build_and_new_content_reruns_what_follows") {
        return;
    }
    let bench = Bench::start();
    let server = FileServer::start(b"one\n");
    let ctx = bench.context(
        "add-url",
        &[(
            "Dockerfile",
            &format!(
                "FROM BASE\nADD {} /data.bin\nRUN cat /data.bin > /copy\n",
                server.url()
            ),
        )],
    );
    let first = bench.rootfs_tar(&ctx, &[]);
    assert_eq!(
        first["copy"],
        describe("file", 0o644, 0, 0, &content_of("one\n"))
    );

    let unchanged = bench.build_ok(&ctx, &[]);
    assert_eq!(executed(&unchanged), 0, "{unchanged}");
    assert_eq!(
        server.requests.load(Ordering::Relaxed),
        2,
        "asked at every build"
    );

    server.set(b"two\n");
    let changed = bench.build_ok(&ctx, &[]);
    assert_eq!(
        executed(&changed),
        2,
        "the ADD and the RUN after it: {changed}"
    );
    let second = bench.rootfs_tar(&ctx, &[]);
    assert_eq!(
        second["copy"],
        describe("file", 0o644, 0, 0, &content_of("two\n"))
    );
    assert_eq!(
        second["data.bin"],
        describe("file", 0o600, 0, 0, &content_of("two\n"))
    );
}

#[test]
fn a_wrong_checksum_fails_the_build_naming_both_digests() {
    if !privileged("a_wrong_checksum_fails_the_build_naming_both_digests") {
        return;
    }
    let bench = Bench::start();
    let server = FileServer::start(DATA);
    let wrong = "0".repeat(64);
    let ctx = bench.context(
        "bad-checksum",
        &[
            ("Dockerfile", &dockerfile(&server, &wrong)),
            ("plain.txt", "plain\n"),
        ],
    );
    std::fs::write(ctx.join("app.tar.gz"), app_tar_gz()).expect("archive");
    let output = bench.build(&ctx, &[]);
    let (_, stderr) = texts(&output);
    assert!(!output.status.success(), "the build must fail: {stderr}");
    let right = hex::encode(Sha256::digest(DATA));
    for needle in [
        format!("expected sha256:{wrong}"),
        format!("got sha256:{right}"),
        server.url(),
    ] {
        assert!(
            stderr.contains(&needle),
            "{needle} missing from: {stderr}\ndaemon log:\n{}",
            tail(&bench.daemon.log_text())
        );
    }
}
