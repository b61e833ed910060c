//! BuildGrid's `bgd` as a real REAPI cache for the L3 tests ([`TestBuildGrid`]), on a free
//! 127.0.0.1 port with temp disk storage, killed on drop. Installed by `.ci/install-deps` into
//! the repository's venv; missing, the test is skipped, or fails where skips are not allowed
//! ([`crate::required_tool`]).

use std::path::PathBuf;
use std::process::{Child, Command};

use memobuildd::store::Digest;
use tempfile::TempDir;

use crate::registry::free_port;

/// `bgd server start` with disk storage, an LRU action cache that takes updates, and the
/// ActionCache, CAS and ByteStream services, for instance `team` and the default instance.
#[derive(Debug)]
pub struct TestBuildGrid {
    pub dir: TempDir,
    pub port: u16,
    pub log: PathBuf,
    /// With TLS: the CA that signed the server's certificate for `localhost` (PEM).
    pub ca: Option<PathBuf>,
    storage: PathBuf,
    child: Option<Child>,
}

/// How a [`TestBuildGrid`] is reached.
#[derive(Debug, Clone, Default)]
pub struct BuildGridOptions {
    /// gRPC over TLS, as `localhost`, with a certificate from a fresh CA ([`TestBuildGrid::ca`]).
    pub tls: bool,
    /// Requests must carry `authorization: Bearer <JWT>` signed (HS256) with this secret
    /// ([`jwt`] makes one).
    pub jwt_secret: Option<String>,
}

/// An HS256 JWT for `secret`, valid for an hour: what BuildGrid's `jwt` authorization checks.
pub fn jwt(secret: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(format!(r#"{{"sub":"memobuild-test","exp":{exp}}}"#).as_bytes())
    );
    let tag = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("any key length")
        .chain_update(signed.as_bytes())
        .finalize()
        .into_bytes();
    format!("{signed}.{}", b64(&tag))
}

impl TestBuildGrid {
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &BuildGridOptions::default())
    }

    pub fn start_with(test: &str, options: &BuildGridOptions) -> Option<Self> {
        let bgd = crate::required_tool(test, "BuildGrid (bgd)", crate::python_tool("bgd"))?;
        let dir = tempfile::Builder::new()
            .prefix("mbbgd")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        // Two instances, each with its own storage and action cache: `team` (the one tests
        // use) and the default one, so a client that dropped instance names would be seen.
        let services = |n: u8| {
            format!(
                "    services:\n      - !action-cache\n        cache: *ac{n}\n      - !cas\n        storage: *store{n}\n      - !bytestream\n        storage: *store{n}\n"
            )
        };
        let stores = |n: u8| {
            format!(
                "  - !disk-storage &store{n}\n    path: {}\n",
                storage.join(n.to_string()).display()
            )
        };
        let caches = |n: u8| {
            format!(
                "  - !lru-action-cache &ac{n}\n    storage: *store{n}\n    max-cached-refs: 100000\n    allow-updates: true\n"
            )
        };
        let (channel, ca) = if options.tls {
            let (cert, key) = crate::registry::issue_certificate(dir.path(), "localhost");
            (
                format!(
                    "    insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}\n",
                    key.display(),
                    cert.display()
                ),
                Some(dir.path().join("ca.pem")),
            )
        } else {
            ("    insecure-mode: true\n".to_owned(), None)
        };
        let authorization = match &options.jwt_secret {
            Some(secret) => {
                let path = dir.path().join("jwt.secret");
                std::fs::write(&path, secret).expect("write jwt secret");
                format!(
                    "authorization:\n  method: jwt\n  secret: {}\n  algorithm: hs256\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("cache.yml");
        std::fs::write(
            &config,
            format!(
                "server:\n  - !channel\n    address: \"127.0.0.1:{port}\"\n{channel}{authorization}\
                 storages:\n{}{}caches:\n{}{}\
                 instances:\n  - name: team\n{}  - name: \"\"\n{}",
                stores(1),
                stores(2),
                caches(1),
                caches(2),
                services(1),
                services(2)
            ),
        )
        .expect("write cache.yml");
        let log = dir.path().join("bgd.log");
        let mut command = Command::new(bgd);
        command.args(["server", "start"]).arg(&config);
        let mut child = crate::spawn_logged(command, &log, "bgd");
        crate::wait_listening(&mut child, port, "bgd", &log);
        Some(Self {
            dir,
            port,
            log,
            ca,
            storage,
            child: Some(child),
        })
    }

    /// `grpc://127.0.0.1:PORT[/instance]`, or `grpcs://localhost:PORT[/instance]` with TLS.
    pub fn url(&self, instance: &str) -> String {
        let path = if instance.is_empty() {
            String::new()
        } else {
            format!("/{instance}")
        };
        match self.ca {
            Some(_) => format!("grpcs://localhost:{}{path}", self.port),
            None => format!("grpc://127.0.0.1:{}{path}", self.port),
        }
    }

    /// Where BuildGrid's disk storage keeps a blob of instance `team`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage
            .join("1/cas/objects")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestBuildGrid {
    fn drop(&mut self) {
        self.kill();
    }
}
