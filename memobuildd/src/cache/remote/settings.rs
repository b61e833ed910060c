//! Where the remote cache is and how to reach it: [`RemoteSettings`] (endpoint, mode, auth, CA,
//! signing secret), as `config` resolves them. This module knows the URL forms; `config`
//! knows which key, variable or file each setting comes from.
//!
//! | URL | transport |
//! |---|---|
//! | `grpc://host:port[/instance]` | REAPI v2 over plain HTTP/2 |
//! | `grpcs://host[:port][/instance]` | REAPI v2 over TLS (port 443 by default) |
//! | `http(s)://host[:port][/prefix]` | Bazel's HTTP cache: `{base}/ac/…`, `{base}/cas/…` |
//!
//! Credentials in the URL (`scheme://user:password@host…`) are basic auth; they never appear
//! in [`Endpoint::display`], which is what logs and status show.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use reqwest::Url;

/// A remote cache's address, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// REAPI instance name (`""` for the default instance); for HTTP the path prefix,
    /// without leading or trailing slashes.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// REAPI v2 over gRPC.
    Grpc,
    /// Bazel's HTTP cache protocol.
    Http,
}

/// What a daemon does with the remote cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoteMode {
    /// Look up and upload.
    #[default]
    ReadWrite,
    /// Look up only: nothing is ever uploaded.
    ReadOnly,
    /// No remote cache, even if one is configured.
    Off,
}

/// Bytes that must not be printed: tokens, passwords, signing secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How requests prove who sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `authorization: Bearer <token>`.
    Bearer(Secret),
    /// `authorization: Basic base64(user:password)`.
    Basic { user: String, password: Secret },
}

impl Auth {
    /// The `authorization` header (HTTP) or metadata (gRPC) value.
    pub fn header_value(&self) -> Vec<u8> {
        match self {
            Self::Bearer(token) => [b"Bearer ".as_slice(), token.expose()].concat(),
            Self::Basic { user, password } => {
                let pair = [user.as_bytes(), b":", password.expose()].concat();
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
                .into_bytes()
            }
        }
    }
}

/// Everything needed to talk to one remote cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSettings {
    pub endpoint: Endpoint,
    pub mode: RemoteMode,
    pub auth: Option<Auth>,
    /// Extra CA certificates (PEM) trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// With a secret, uploaded entries are signed and unsigned or wrongly signed ones are
    /// ignored (`signing`).
    pub secret: Option<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("remote cache URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error(
        "remote cache URL {url:?}: the scheme must be grpc, grpcs, http or https, not {scheme:?}"
    )]
    Scheme { url: String, scheme: String },
    #[error("remote cache URL {url:?}: {problem}")]
    Shape { url: String, problem: &'static str },
    #[error("remote cache mode {0:?}: expected read-write, read-only or off")]
    Mode(String),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the file is empty", path.display())]
    Empty { path: PathBuf },
}

impl std::str::FromStr for RemoteMode {
    type Err = SettingsError;

    fn from_str(text: &str) -> Result<Self, SettingsError> {
        match text {
            "read-write" => Ok(Self::ReadWrite),
            "read-only" => Ok(Self::ReadOnly),
            "off" => Ok(Self::Off),
            other => Err(SettingsError::Mode(other.to_owned())),
        }
    }
}

impl Endpoint {
    /// Parses a remote cache URL; basic-auth credentials in it are returned apart.
    pub fn parse(text: &str) -> Result<(Self, Option<Auth>), SettingsError> {
        let url = Url::parse(text).map_err(|source| SettingsError::Url {
            url: text.to_owned(),
            source,
        })?;
        let shape = |problem| SettingsError::Shape {
            url: text.to_owned(),
            problem,
        };
        let (protocol, tls) = match url.scheme() {
            "grpc" => (Protocol::Grpc, false),
            "grpcs" => (Protocol::Grpc, true),
            "http" => (Protocol::Http, false),
            "https" => (Protocol::Http, true),
            other => {
                return Err(SettingsError::Scheme {
                    url: text.to_owned(),
                    scheme: other.to_owned(),
                });
            }
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(shape("a query or fragment has no meaning here"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| shape("no host"))?
            .to_owned();
        let port = match (url.port_or_known_default(), protocol, tls) {
            (Some(port), _, _) => port,
            (None, Protocol::Grpc, true) => 443,
            (None, _, _) => return Err(shape("grpc:// needs a port")),
        };
        let auth = (!url.username().is_empty()).then(|| Auth::Basic {
            user: percent_decoded(url.username()),
            password: Secret::new(percent_decoded(url.password().unwrap_or_default())),
        });
        let path = url.path().trim_matches('/').to_owned();
        Ok((
            Self {
                protocol,
                tls,
                host,
                port,
                path,
            },
            auth,
        ))
    }

    /// The URL without credentials, for logs and status.
    pub fn display(&self) -> String {
        let scheme = match (self.protocol, self.tls) {
            (Protocol::Grpc, false) => "grpc",
            (Protocol::Grpc, true) => "grpcs",
            (Protocol::Http, false) => "http",
            (Protocol::Http, true) => "https",
        };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = if self.path.is_empty() {
            String::new()
        } else {
            format!("/{}", self.path)
        };
        format!("{scheme}://{host}:{}{path}", self.port)
    }
}

fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// A secret kept in a file (token, password, signing secret): its bytes without the trailing
/// newline or spaces an editor or `echo` leaves.
pub fn read_secret_file(path: &Path) -> Result<Secret, SettingsError> {
    let bytes = std::fs::read(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    if end == 0 {
        return Err(SettingsError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(&bytes[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let (grpc, auth) = Endpoint::parse("grpc://127.0.0.1:8980/team/a").expect("grpc");
        assert_eq!(
            grpc,
            Endpoint {
                protocol: Protocol::Grpc,
                tls: false,
                host: "127.0.0.1".into(),
                port: 8980,
                path: "team/a".into(),
            }
        );
        assert_eq!(auth, None);
        assert_eq!(grpc.display(), "grpc://127.0.0.1:8980/team/a");

        let (grpcs, _) = Endpoint::parse("grpcs://cache.example").expect("grpcs");
        assert_eq!(
            (grpcs.tls, grpcs.port, grpcs.path.as_str()),
            (true, 443, "")
        );

        let (http, auth) =
            Endpoint::parse("https://ci:p%40ss@cache.example/bazel/").expect("https");
        assert_eq!((http.protocol, http.port), (Protocol::Http, 443));
        assert_eq!(http.path, "bazel");
        assert_eq!(http.display(), "https://cache.example:443/bazel");
        assert_eq!(
            auth,
            Some(Auth::Basic {
                user: "ci".into(),
                password: Secret::new("p@ss")
            })
        );
        assert!(
            !format!("{auth:?}").contains("p@ss"),
            "secrets are redacted"
        );
    }

    #[test]
    fn bad_urls_and_modes_are_errors() {
        for bad in [
            "grpc://host",
            "ftp://host:1",
            "grpc://:80",
            "http://h/x?y=1",
            "not a url",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            "read-only".parse::<RemoteMode>().ok(),
            Some(RemoteMode::ReadOnly)
        );
        assert!("readonly".parse::<RemoteMode>().is_err());
    }

    #[test]
    fn auth_headers() {
        assert_eq!(
            Auth::Bearer(Secret::new("t0k")).header_value(),
            b"Bearer t0k"
        );
        let basic = Auth::Basic {
            user: "u".into(),
            password: Secret::new("p"),
        };
        assert_eq!(basic.header_value(), b"Basic dTpw");
    }

    #[test]
    fn secret_files_lose_their_trailing_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret \n").expect("write");
        assert_eq!(read_secret_file(&path).expect("read").expose(), b"s3cret");
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(
            read_secret_file(&path),
            Err(SettingsError::Empty { .. })
        ));
    }
}
