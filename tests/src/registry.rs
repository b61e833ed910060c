//! A real registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on 127.0.0.1 (or over HTTPS on the host name), with temp storage, optional
//! htpasswd auth, and an access log the tests read to count requests. [`TestRegistry::seed_busybox`] pushes a tiny busybox image
//! built here by hand, so no test needs the network.
//!
//! Needs the Debian packages `docker-registry`, `skopeo`, `busybox-static`,
//! `apache2-utils` (for `htpasswd`) and `openssl`.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use memobuildd::store::Digest;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "true", "id", "mkdir", "rm", "touch", "env", "wc",
];
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A running `docker-registry serve`, killed on drop.
#[derive(Debug)]
pub struct TestRegistry {
    pub dir: TempDir,
    /// The name clients use: `127.0.0.1`, or for TLS the machine's host name.
    pub host: String,
    pub port: u16,
    /// The CA that signed a TLS registry's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The registry's stdout and stderr: its access log is there.
    pub log: PathBuf,
    credentials: Option<(String, String)>,
    child: Child,
}

impl TestRegistry {
    pub fn start() -> Self {
        Self::launch(None, false)
    }

    /// A registry that wants HTTP basic auth as `user`/`password`.
    pub fn start_with_htpasswd(user: &str, password: &str) -> Self {
        Self::launch(Some((user.to_owned(), password.to_owned())), false)
    }

    /// A registry serving HTTPS with a certificate from a fresh CA ([`Self::ca`]), reached
    /// by the machine's host name: clients speak HTTPS to any name but `localhost` and
    /// loopback addresses. Needs `openssl` and a host name that resolves.
    pub fn start_tls() -> Self {
        Self::launch(None, true)
    }

    fn launch(credentials: Option<(String, String)>, tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mbreg")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let (host, listen) = if tls {
            let host = host_name();
            let ip = resolve(&host);
            (host, ip)
        } else {
            ("127.0.0.1".to_owned(), "127.0.0.1".to_owned())
        };
        let (ca, tls_config) = if tls {
            let (cert, key) = issue_certificate(dir.path(), &host);
            let config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            (Some(dir.path().join("ca.pem")), config)
        } else {
            (None, String::new())
        };
        let auth = match &credentials {
            Some((user, password)) => {
                let htpasswd = dir.path().join("htpasswd");
                let output = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (Debian package apache2-utils)");
                assert!(output.status.success(), "htpasswd: {output:?}");
                std::fs::write(&htpasswd, &output.stdout).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: memobuild-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: error\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {listen}:{port}\n  secret: memobuild-test\n{tls_config}\
                 {auth}",
                dir.path().join("storage").display()
            ),
        )
        .expect("write registry config");
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("run docker-registry (Debian package docker-registry)");
        let registry = Self {
            dir,
            host,
            port,
            ca,
            log,
            credentials,
            child,
        };
        registry.wait_ready();
        registry
    }

    /// Polls `GET /v2/` until the registry answers: 200, 401 when it wants auth, or 400
    /// when it speaks TLS (Go's answer to plain HTTP on a TLS port).
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        let expected: &[u16] = if self.ca.is_some() {
            &[400]
        } else {
            &[200, 401]
        };
        loop {
            if let Some(status) = http_status(&self.host, self.port, "/v2/") {
                assert!(
                    expected.contains(&status),
                    "registry answered {status} on /v2/"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry not ready within {READY_WITHIN:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `HOST:PORT`, as in image references.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access-log lines for requests of `method` whose path starts with `path_prefix`.
    pub fn requests(&self, method: &str, path_prefix: &str) -> usize {
        let needle = format!("\"{method} {path_prefix}");
        self.log_text()
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }

    /// Blob downloads from `repo` so far.
    pub fn blob_downloads(&self, repo: &str) -> usize {
        self.requests("GET", &format!("/v2/{repo}/blobs/"))
    }

    /// Completed blob uploads into `repo` so far (the PUT that ends each upload session).
    pub fn blob_uploads(&self, repo: &str) -> usize {
        self.requests("PUT", &format!("/v2/{repo}/blobs/uploads/"))
    }

    /// Builds a busybox image by hand (one layer: `/bin/busybox` with applet symlinks,
    /// `/etc/passwd`, `/etc/group`) as an OCI layout and pushes it with skopeo as
    /// `REPO:latest`. Returns the manifest digest the registry reports.
    pub fn seed_busybox(&self, repo: &str) -> Digest {
        self.seed_busybox_as(repo, ManifestFormat::Oci)
    }

    /// [`seed_busybox`](Self::seed_busybox), with the manifest in `format`.
    pub fn seed_busybox_as(&self, repo: &str, format: ManifestFormat) -> Digest {
        let host = memobuildd::registry::Platform::host().architecture;
        self.push_layout(repo, &[&host], false, format);
        self.inspect_digest(&format!("{repo}:latest"))
    }

    /// Like [`seed_busybox`](Self::seed_busybox), as an OCI index with one manifest per
    /// architecture (all sharing the layer; only the config's `architecture` differs).
    pub fn seed_busybox_index(&self, repo: &str, architectures: &[&str]) -> SeededIndex {
        self.push_layout(repo, architectures, true, ManifestFormat::Oci)
    }

    fn push_layout(
        &self,
        repo: &str,
        architectures: &[&str],
        as_index: bool,
        format: ManifestFormat,
    ) -> SeededIndex {
        let layout = self
            .dir
            .path()
            .join(format!("layout-{}", repo.replace('/', "-")));
        let seeded = write_busybox_layout(&layout, architectures, as_index);
        let mut copy = Command::new("skopeo");
        copy.args(["copy", "--all", "--dest-tls-verify=false"]);
        if format == ManifestFormat::DockerV2 {
            copy.arg("--format=v2s2");
        }
        if let Some((user, password)) = &self.credentials {
            copy.arg(format!("--dest-creds={user}:{password}"));
        }
        let output = copy
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo}:latest", self.address()))
            .output()
            .expect("run skopeo (Debian package skopeo)");
        assert!(output.status.success(), "skopeo copy: {output:?}");
        seeded
    }

    /// The manifest digest of `repo:tag` according to skopeo.
    pub fn inspect_digest(&self, repo_and_tag: &str) -> Digest {
        let mut inspect = Command::new("skopeo");
        inspect.args(["inspect", "--tls-verify=false"]);
        if let Some((user, password)) = &self.credentials {
            inspect.arg(format!("--creds={user}:{password}"));
        }
        let output = inspect
            .arg(format!("docker://{}/{repo_and_tag}", self.address()))
            .output()
            .expect("run skopeo inspect");
        assert!(output.status.success(), "skopeo inspect: {output:?}");
        let info: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("skopeo inspect JSON");
        Digest::parse(info["Digest"].as_str().expect("Digest field")).expect("digest")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on right now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The machine's host name, which must not be a name clients treat as local.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host name");
    let name = name.trim().to_owned();
    assert!(
        !name.is_empty() && name != "localhost",
        "a TLS test registry needs a host name other than localhost, not {name:?}"
    );
    name
}

/// The first IPv4 address `host` resolves to.
fn resolve(host: &str) -> String {
    use std::net::ToSocketAddrs as _;
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.find(std::net::SocketAddr::is_ipv4))
        .unwrap_or_else(|| panic!("host name {host:?} does not resolve (add it to /etc/hosts)"))
        .ip()
        .to_string()
}

/// Makes a CA (`ca.pem`) in `dir` and a certificate for `host` signed by it; returns the
/// certificate and key paths.
pub fn issue_certificate(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let openssl = |command: &str| {
        let output = Command::new("openssl")
            .args(command.split_whitespace())
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(output.status.success(), "openssl {command}: {output:?}");
    };
    const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 -days 2 -subj /CN=memobuild-test-CA {EC_KEY} -keyout ca.key -out ca.pem"
    ));
    openssl(&format!(
        "req -subj /CN={host} {EC_KEY} -keyout server.key -out server.csr"
    ));
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=DNS:{host}\n"),
    )
    .expect("write extensions");
    openssl(
        "x509 -req -days 2 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
         -extfile server.ext -out server.pem",
    );
    (dir.join("server.pem"), dir.join("server.key"))
}

/// The status of a plain `GET path`, or `None` if nothing answers.
fn http_status(host: &str, port: u16, path: &str) -> Option<u16> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect((host, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes `bytes` as a blob of the OCI layout at `dir`; returns its descriptor.
fn put_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let digest = sha256(bytes);
    let path = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::write(path, bytes).expect("write blob");
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
}

/// The busybox root filesystem as a deterministic tar.
fn busybox_tar() -> Vec<u8> {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    }
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|err| panic!("{BUSYBOX} (Debian package busybox-static): {err}"));
    let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                  app:x:1000:1000:app:/home/app:/bin/sh\n\
                  nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let group = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

    let mut tar = tar::Builder::new(Vec::new());
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, path, std::io::empty())
            .expect("dir");
    };
    dir(&mut tar, "bin/");
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .expect("busybox");
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("symlink");
    }
    dir(&mut tar, "etc/");
    for (path, text) in [("etc/group", group), ("etc/passwd", passwd)] {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        tar.append_data(&mut h, path, text.as_bytes())
            .expect("file");
    }
    tar.into_inner().expect("finish tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// How a seeded image's manifest is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    Oci,
    /// Docker's schema 2 (skopeo converts the OCI layout on the way).
    DockerV2,
}

/// What [`TestRegistry::seed_busybox_index`] pushed, by digest (skopeo copies OCI
/// documents unchanged).
#[derive(Debug)]
pub struct SeededIndex {
    /// What `latest` names: the index (or the manifest, when seeded without one).
    pub index: Digest,
    /// (architecture, manifest digest), in index order.
    pub manifests: Vec<(String, Digest)>,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI image layout at `dir` holding busybox as `latest`: one manifest per architecture,
/// under an image index if `as_index` (else `architectures` must be one).
fn write_busybox_layout(dir: &Path, architectures: &[&str], as_index: bool) -> SeededIndex {
    assert!(
        as_index || architectures.len() == 1,
        "one manifest needs one architecture"
    );
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout dirs");
    let tar = busybox_tar();
    let layer = put_blob(
        dir,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&tar),
    );
    let mut manifests = Vec::new();
    let mut descriptors = Vec::new();
    for architecture in architectures {
        let config = serde_json::json!({
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
            },
            "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
            "history": [{"created_by": "memobuild tests: busybox-static by hand"}],
        });
        let config = put_blob(
            dir,
            "application/vnd.oci.image.config.v1+json",
            config.to_string().as_bytes(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [&layer],
        });
        let mut descriptor = put_blob(dir, OCI_MANIFEST, manifest.to_string().as_bytes());
        manifests.push((
            (*architecture).to_owned(),
            Digest::parse(descriptor["digest"].as_str().expect("digest")).expect("digest"),
        ));
        descriptor["platform"] = serde_json::json!({"os": "linux", "architecture": architecture});
        descriptors.push(descriptor);
    }
    let mut top = if as_index {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": descriptors,
        });
        put_blob(dir, OCI_INDEX, index.to_string().as_bytes())
    } else {
        descriptors.remove(0)
    };
    let index = Digest::parse(top["digest"].as_str().expect("digest")).expect("digest");
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    let layout_index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), layout_index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    SeededIndex { index, manifests }
}
