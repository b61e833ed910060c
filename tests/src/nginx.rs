//! nginx with WebDAV PUT as a Bazel HTTP cache for the L3 tests ([`TestNginx`]), on a free
//! 127.0.0.1 port with a temp prefix, killed on drop. Missing, the test is skipped, or fails
//! where skips are not allowed ([`crate::required_tool`]).

use std::path::PathBuf;
use std::process::{Child, Command};

use memobuildd::cache::Digest;
use tempfile::TempDir;

use crate::registry::free_port;

/// nginx in the foreground (one process) with WebDAV PUT under a temp root: `PUT`/`GET`/`HEAD`
/// of `/cache/ac/…` and `/cache/cas/…` is Bazel's HTTP cache protocol.
#[derive(Debug)]
pub struct TestNginx {
    pub dir: TempDir,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl TestNginx {
    pub fn start(test: &str) -> Option<Self> {
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
        let config = dir.path().join("nginx.conf");
        std::fs::write(
            &config,
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
                   proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   server {{\n    listen 127.0.0.1:{port};\n    root {};\n\
                     location /cache/ {{\n      dav_methods PUT;\n      create_full_put_path on;\n      dav_access user:rw;\n      client_max_body_size 0;\n    }}\n  }}\n}}\n",
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
            child: Some(child),
        })
    }

    /// `http://127.0.0.1:PORT/cache`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cache", self.port)
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
