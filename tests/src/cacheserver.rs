//! The real `memobuildd serve-cache` for the tests ([`TestCacheServer`]): a temp store, a
//! free port on 127.0.0.1, readiness by the systemd notify protocol, killed on drop; plus a
//! raw HTTP/1.1 helper ([`http`]), REAPI clients ([`TestCacheServer::cas`] and friends) and
//! [`verify_store`], which checks every stored blob against its name.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use memobuild_client::launch::spawn_until_ready;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::bin;

/// A running `memobuildd serve-cache`, killed on drop.
#[derive(Debug)]
pub struct TestCacheServer {
    pub dir: TempDir,
    /// The store (`--dir`).
    pub store: PathBuf,
    pub addr: SocketAddr,
    pub log: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl TestCacheServer {
    /// A server on a fresh store with these extra `serve-cache` arguments.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mbcache")
            .tempdir()
            .expect("temp dir");
        let store = dir.path().join("store");
        Self::start_at(dir, store, args)
    }

    /// A server whose store is `store` (which may live outside `dir`).
    pub fn start_at(dir: TempDir, store: PathBuf, args: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.path().join("serve-cache.log");
        let mut server = Self {
            dir,
            store,
            addr,
            log,
            args: args.iter().map(OsString::from).collect(),
            child: None,
        };
        server.launch();
        server
    }

    /// Starts (again) on the same port and store; waits for READY=1.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut command = Command::new(bin("memobuildd"));
        command
            .arg("serve-cache")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--dir")
            .arg(&self.store)
            .args(&self.args)
            .env("MEMOBUILD_LOG", "memobuildd=debug,info")
            .env_remove("MEMOBUILD_CONFIG")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        // No config file of the machine may leak in.
        if !self.args.iter().any(|a| a == "--config") {
            let empty = self.dir.path().join("none.toml");
            std::fs::write(&empty, "").expect("empty config");
            command.arg("--config").arg(empty);
        }
        match spawn_until_ready(command, &self.log, Duration::from_secs(60)) {
            Ok(child) => self.child = Some(child),
            Err(err) => panic!(
                "serve-cache did not start: {err}\nlog:\n{}",
                self.log_text()
            ),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// SIGTERM, and waits (bounded) for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::signal(child.id(), libc::SIGTERM);
        crate::wait_bounded(&mut child, Duration::from_secs(30))
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let response = http(self.addr, "GET", "/status", &[], b"");
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).expect("status JSON")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("uri")
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect: {err}\nlog:\n{}", self.log_text()))
    }

    pub async fn cas(
        &self,
    ) -> reapi::content_addressable_storage_client::ContentAddressableStorageClient<Channel> {
        reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            self.channel().await,
        )
    }

    pub async fn action_cache(&self) -> reapi::action_cache_client::ActionCacheClient<Channel> {
        reapi::action_cache_client::ActionCacheClient::new(self.channel().await)
    }

    pub async fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel().await)
    }
}

impl Drop for TestCacheServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The REAPI digest of `bytes`.
pub fn digest(bytes: &[u8]) -> reapi::Digest {
    reapi::Digest {
        hash: hex::encode(Sha256::digest(bytes)),
        size_bytes: i64::try_from(bytes.len()).expect("size"),
    }
}

/// A ByteStream upload of `bytes` to `resource` in messages of `chunk` bytes.
pub fn write_requests(resource: &str, bytes: &[u8], chunk: usize) -> Vec<bs::WriteRequest> {
    bytes
        .chunks(chunk)
        .enumerate()
        .map(|(n, data)| bs::WriteRequest {
            resource_name: if n == 0 {
                resource.to_owned()
            } else {
                String::new()
            },
            write_offset: i64::try_from(n * chunk).expect("offset"),
            finish_write: (n + 1) * chunk >= bytes.len(),
            data: data.to_vec(),
        })
        .collect()
}

/// Deterministic bytes, distinct per seed.
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// An HTTP/1.1 response read by [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), bounded in time.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send head");
    stream.write_all(body).expect("send body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    parse_response(&raw, method == "HEAD")
}

/// Parses a whole HTTP/1.1 response (content-length or chunked).
pub fn parse_response(raw: &[u8], head: bool) -> HttpResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head_text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked && !head {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
                .expect("hex size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// What [`verify_store`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StoreCheck {
    pub blobs: usize,
    pub action_results: usize,
    /// Blobs whose bytes do not hash to their name.
    pub bad: Vec<PathBuf>,
    /// Uploads in progress (`.tmp-…` files beside the entries).
    pub temp_files: usize,
}

/// Hashes every blob under `store/cas/` and counts entries, without the server's help.
pub fn verify_store(store: &Path) -> StoreCheck {
    let mut check = StoreCheck::default();
    for (kind, count_blobs) in [("cas", true), ("ac", false)] {
        let Ok(shards) = std::fs::read_dir(store.join(kind)) else {
            continue;
        };
        for shard in shards {
            for entry in std::fs::read_dir(shard.expect("shard").path()).expect("shard dir") {
                let path = entry.expect("entry").path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(".tmp-") {
                    check.temp_files += 1;
                } else if count_blobs {
                    check.blobs += 1;
                    let bytes = std::fs::read(&path).expect("read blob");
                    if hex::encode(Sha256::digest(&bytes)) != name {
                        check.bad.push(path);
                    }
                } else {
                    check.action_results += 1;
                }
            }
        }
    }
    check
}
