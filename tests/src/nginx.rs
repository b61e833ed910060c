//! nginx with WebDAV PUT as a Bazel HTTP cache for the L3 tests ([`TestNginx`]), on a free
//! 127.0.0.1 port with a temp prefix, killed on drop. Missing, the test is skipped, or fails
//! where skips are not allowed ([`crate::required_tool`]).

use std::path::PathBuf;
use std::process::{Child, Command};

use memobuildd::store::Digest;
use tempfile::TempDir;

use crate::registry::free_port;

/// nginx in the foreground (one process) with WebDAV PUT under a temp root: `PUT`/`GET`/`HEAD`
/// of `/cache/ac/…` and `/cache/cas/…` is Bazel's HTTP cache protocol.
#[derive(Debug)]
pub struct TestNginx {
    pub dir: TempDir,
    pub port: u16,
    pub log: PathBuf,
    /// With TLS: the CA that signed the server's certificate for `localhost` (PEM).
    pub ca: Option<PathBuf>,
    child: Option<Child>,
}

/// How a [`TestNginx`] is reached.
#[derive(Debug, Clone, Default)]
pub struct NginxOptions {
    /// HTTPS, as `localhost`, with a certificate from a fresh CA ([`TestNginx::ca`]).
    pub tls: bool,
    pub auth: Option<NginxAuth>,
}

#[derive(Debug, Clone)]
pub enum NginxAuth {
    Basic { user: String, password: String },
    Bearer(String),
}

impl TestNginx {
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &NginxOptions::default())
    }

    pub fn start_with(test: &str, options: &NginxOptions) -> Option<Self> {
        let found = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        let nginx = crate::required_tool(test, "nginx", found)?;
        let dir = tempfile::Builder::new()
            .prefix("mbnginx")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("cache")).expect("www");
        let d = dir.path().display();
        let (listen, ca) = if options.tls {
            let (cert, key) = crate::registry::issue_certificate(dir.path(), "localhost");
            (
                format!(
                    "listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                    cert.display(),
                    key.display()
                ),
                Some(dir.path().join("ca.pem")),
            )
        } else {
            (format!("listen 127.0.0.1:{port};"), None)
        };
        let auth = match &options.auth {
            Some(NginxAuth::Basic { user, password }) => {
                let output = Command::new("openssl")
                    .args(["passwd", "-apr1", password])
                    .output()
                    .expect("run openssl");
                assert!(output.status.success(), "openssl passwd: {output:?}");
                let hash = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n"))
                    .expect("write htpasswd");
                format!("auth_basic cache;\n      auth_basic_user_file {d}/htpasswd;")
            }
            Some(NginxAuth::Bearer(token)) => {
                format!("if ($http_authorization != \"Bearer {token}\") {{ return 401; }}")
            }
            None => String::new(),
        };
        let config = dir.path().join("nginx.conf");
        std::fs::write(
            &config,
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
                   proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   server {{\n    {listen}\n    root {};\n\
                     location /cache/ {{\n      {auth}\n      dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw;\n      client_max_body_size 0;\n    }}\n  }}\n}}\n",
                root.display()
            ),
        )
        .expect("write nginx.conf");
        let log = dir.path().join("nginx.log");
        let mut command = Command::new(nginx);
        command.arg("-p").arg(dir.path()).arg("-c").arg(&config);
        let mut child = crate::spawn_logged(command, &log, "nginx");
        crate::wait_listening(&mut child, port, "nginx", &log);
        Some(Self {
            dir,
            port,
            log,
            ca,
            child: Some(child),
        })
    }

    /// `http://127.0.0.1:PORT/cache`, or `https://localhost:PORT/cache` with TLS.
    pub fn url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}/cache", self.port),
            None => format!("http://127.0.0.1:{}/cache", self.port),
        }
    }

    /// Where a blob PUT to the cache lands on disk.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.path().join("www/cache/cas").join(digest.hex())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestNginx {
    fn drop(&mut self) {
        self.kill();
    }
}
