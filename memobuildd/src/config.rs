//! Daemon configuration: one place decides every setting, with one precedence rule.
//!
//! **Precedence, highest first:** command-line flag → environment variable → config file →
//! built-in default. The main type is [`Config`], resolved once by [`Config::resolve`] from
//! [`Overrides`] (the flags) and the environment; the server (`server::run`) consumes it.
//!
//! | setting | flag | environment | file key | default |
//! |---|---|---|---|---|
//! | state root | `--root` | `MEMOBUILD_ROOT` | `root` | root: `/var/lib/memobuild`; users: `$XDG_DATA_HOME/memobuild` |
//! | socket | `--socket` | `MEMOBUILD_SOCKET` | `socket` | root: `/run/memobuild/memobuildd.sock`; users: `$XDG_RUNTIME_DIR/memobuild/memobuildd.sock` |
//! | socket group | `--socket-group` | `MEMOBUILD_SOCKET_GROUP` | `socket_group` | none: socket mode 0600; with a group: 0660 and that group may connect |
//! | log filter | `--log` | `MEMOBUILD_LOG`, then `RUST_LOG` | `log` | `info` |
//! | shutdown grace | | | `shutdown_grace_secs` | 10 |
//! | a client that reads none of its build's events for this long is disconnected (its build cancelled) | | | `client_stall_secs` | 60 |
//! | steps executing at once | | | `max_parallel_steps` | the number of CPUs |
//! | plain-HTTP registries | `--insecure-registry` (repeatable) | | `insecure_registries` | none (loopback always is) |
//! | extra registry CA (PEM) | | | `registry_ca_file` | none |
//! | keep built contexts watched | | | `watch_built_contexts` | true |
//! | bytes per chunk of a large COPY's layer (0: one layer per COPY, as Docker) | | | `copy_chunk_bytes` | 32 MiB |
//! | prebuild every watched workspace after a change (`memobuild watch --no-prebuild` turns one off) | | | `prebuild` | false |
//! | quiet time after a change before a prebuild starts (`"300ms"`, `"2s"` or milliseconds) | | | `prebuild_debounce` | 300 ms |
//! | prebuilds running at once, across workspaces | | | `prebuild_max` | 1 |
//! | remote cache (L3): `grpc://host:port[/instance]`, `grpcs://host[:port][/instance]`, `http(s)://host[:port][/prefix]` | | `MEMOBUILD_REMOTE_URL` | `remote_cache` | none |
//! | remote cache mode: `read-write`, `read-only`, `off` | | `MEMOBUILD_REMOTE_CACHE_MODE` | `remote_cache_mode` | `read-write` |
//! | remote cache bearer token (wins over basic auth) | | `MEMOBUILD_REMOTE_TOKEN` | `remote_cache_token_file` | none |
//! | remote cache basic auth (also `scheme://user:password@host` in the URL) | | `MEMOBUILD_REMOTE_USER`, `MEMOBUILD_REMOTE_PASSWORD` | `remote_cache_user`, `remote_cache_password_file` | none |
//! | extra CA for the remote cache (PEM) | | | `remote_cache_ca_file` | none |
//! | secret that signs and checks remote cache entries | | `MEMOBUILD_CACHE_SECRET` | `remote_cache_secret_file` | none: entries unsigned, none checked |
//! | the store's budget: automatic GC keeps it under this (`"20GB"` or bytes) | | | `gc_keep_bytes` | 10% of the root's filesystem, at least 2 GiB |
//! | what was unused longer goes at every GC pass (`"48h"`, `"7d"`) | | | `gc_keep_duration` | none (budget only) |
//! | config file | `--config` | `MEMOBUILD_CONFIG` | | root: `/etc/memobuild/memobuildd.toml`; users: `$XDG_CONFIG_HOME/memobuild/memobuildd.toml` |
//!
//! Secrets in files (token, password, signing secret) lose trailing whitespace; an empty one
//! is an error. The remote-cache keys are read only when a remote cache URL is set.
//!
//! A missing default config file is fine; a missing file named by flag or environment is an
//! error, and so is an unknown key (a typo must not be silently ignored).
//!
//! `memobuildd serve-cache` (the team cache server, `cacheserver`) resolves
//! [`ServeCacheConfig`] by the same rule from the same file, in its `[serve_cache]` table:
//!
//! | setting | flag | environment | `[serve_cache]` key | default |
//! |---|---|---|---|---|
//! | address to listen on | `--listen` | `MEMOBUILD_CACHE_LISTEN` | `listen` | `127.0.0.1:9092` |
//! | store directory | `--dir` | `MEMOBUILD_CACHE_DIR` | `dir` | root: `/var/lib/memobuild-cache`; users: `$XDG_DATA_HOME/memobuild-cache` |
//! | byte budget (`500M`, `10G`, `1TiB`, bytes) | `--max-size` | `MEMOBUILD_CACHE_MAX_SIZE` | `max_size` | `10G` |
//! | token file (auth on) | `--auth` | `MEMOBUILD_CACHE_AUTH` | `auth_file` | none: no authentication |
//! | TLS certificate chain and key (PEM) | `--tls-cert`, `--tls-key` | | `tls_cert`, `tls_key` | none: plain TCP |
//! | webhook URLs for build summaries | `--webhook` (repeatable) | | `webhooks` | none |
//! | HMAC key for webhook signatures | | `MEMOBUILD_CACHE_WEBHOOK_SECRET_FILE` | `webhook_secret_file` | none: unsigned |
//! | log filter | `--log` | `MEMOBUILD_LOG`, then `RUST_LOG` | `log` (top level) | `info` |

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memobuild_protocol::paths;
use serde::Deserialize;

use crate::cache::remote::settings::{self, Auth, Endpoint, SettingsError};
use crate::cache::remote::{RemoteMode, RemoteSettings, Secret};

/// The daemon's resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub root: PathBuf,
    pub socket: PathBuf,
    /// Group allowed to use the socket besides the daemon's own user and root.
    pub socket_group: Option<String>,
    /// tracing-subscriber `EnvFilter` directives.
    pub log: String,
    /// How long in-flight requests may run after a shutdown signal before being cancelled.
    pub shutdown_grace: Duration,
    /// A client whose build events could not be written for this long is disconnected and
    /// its build cancelled, so it holds neither memory nor shared work.
    pub client_stall: Duration,
    /// Filesystem steps (RUN, COPY, …) executing at once, across stages and builds.
    pub max_parallel_steps: usize,
    /// `host[:port]` of registries spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registries.
    pub registry_ca_file: Option<PathBuf>,
    /// A context that is built stays watched, so the next build starts from hot
    /// fingerprints; off, a build scans it and forgets it.
    pub watch_built_contexts: bool,
    /// A COPY from the context of at least twice this many bytes becomes several layers of
    /// about this size, so an edit rewrites one of them (`engine::copy::Plan::chunks`).
    pub copy_chunk_bytes: u64,
    /// Every watched workspace prebuilds unless turned off for it (`server::prebuild`).
    pub prebuild: bool,
    pub prebuild_debounce: Duration,
    pub prebuild_max: usize,
    /// The shared remote cache (L3); `None` without a URL or with mode `off`.
    pub remote_cache: Option<RemoteSettings>,
    /// The store's budget; `None`: 10% of the root's filesystem, at least 2 GiB.
    pub gc_keep_bytes: Option<u64>,
    /// Unused longer than this goes at every GC pass, whatever the budget.
    pub gc_keep_duration: Option<Duration>,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// Settings given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub log: Option<String>,
    pub config: Option<PathBuf>,
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{what} must be an absolute path, got {path:?}")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error(transparent)]
    SocketPath(#[from] paths::SocketPathError),
    #[error("{what}: {value:?} is not an address (HOST:PORT)")]
    BadAddress { what: &'static str, value: String },
    #[error("--tls-cert and --tls-key go together; only {given} was given")]
    TlsHalf { given: &'static str },
    #[error(transparent)]
    RemoteCache(#[from] SettingsError),
    #[error("config key {key}: {source}")]
    Unit {
        key: &'static str,
        #[source]
        source: memobuild_protocol::units::UnitError,
    },
}

/// The config file's shape. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    root: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    log: Option<String>,
    shutdown_grace_secs: Option<u64>,
    client_stall_secs: Option<u64>,
    max_parallel_steps: Option<usize>,
    insecure_registries: Option<Vec<String>>,
    registry_ca_file: Option<PathBuf>,
    watch_built_contexts: Option<bool>,
    copy_chunk_bytes: Option<u64>,
    prebuild: Option<bool>,
    prebuild_debounce: Option<DurationValue>,
    prebuild_max: Option<usize>,
    remote_cache: Option<String>,
    remote_cache_mode: Option<String>,
    remote_cache_token_file: Option<PathBuf>,
    remote_cache_user: Option<String>,
    remote_cache_password_file: Option<PathBuf>,
    remote_cache_ca_file: Option<PathBuf>,
    remote_cache_secret_file: Option<PathBuf>,
    serve_cache: Option<FileServeCache>,
    gc_keep_bytes: Option<SizeValue>,
    gc_keep_duration: Option<String>,
}

/// The `[serve_cache]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServeCache {
    listen: Option<String>,
    dir: Option<PathBuf>,
    max_size: Option<SizeValue>,
    auth_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    webhooks: Option<Vec<String>>,
    webhook_secret_file: Option<PathBuf>,
}

/// A size in the file: a number of bytes or a string such as `"10GB"` (binary multiples
/// whatever the spelling, as the client's `--keep-bytes` and Docker's `--keep-storage` read
/// them: `memobuild_protocol::units`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(self, key: &'static str) -> Result<u64, ConfigError> {
        match self {
            Self::Bytes(bytes) => Ok(bytes),
            Self::Text(text) => memobuild_protocol::units::parse_size(&text)
                .map_err(|source| ConfigError::Unit { key, source }),
        }
    }
}

/// A short duration in the file: milliseconds, or a string such as `"300ms"` or `"2s"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Millis(u64),
    Text(String),
}

impl DurationValue {
    fn duration(self, key: &'static str, path: &Path) -> Result<Duration, ConfigError> {
        let text = match self {
            Self::Millis(ms) => return Ok(Duration::from_millis(ms)),
            Self::Text(text) => text,
        };
        let trimmed = text.trim();
        let (number, scale) = if let Some(ms) = trimmed.strip_suffix("ms") {
            (ms, 1)
        } else if let Some(s) = trimmed.strip_suffix('s') {
            (s, 1000)
        } else {
            (trimmed, 1)
        };
        number
            .trim()
            .parse::<u64>()
            .map(|n| Duration::from_millis(n.saturating_mul(scale)))
            .map_err(|_| ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{key}: {text:?} is not a duration (e.g. \"300ms\", \"2s\")"),
            })
    }
}

/// Default `prebuild_debounce`: an editor's save (temp file, rename, chmod) is one change.
pub const DEFAULT_PREBUILD_DEBOUNCE: Duration = Duration::from_millis(300);

const CONFIG_ENV: &str = "MEMOBUILD_CONFIG";
const SOCKET_GROUP_ENV: &str = "MEMOBUILD_SOCKET_GROUP";
const LOG_ENV: &str = "MEMOBUILD_LOG";
const REMOTE_URL_ENV: &str = "MEMOBUILD_REMOTE_URL";
const REMOTE_MODE_ENV: &str = "MEMOBUILD_REMOTE_CACHE_MODE";
const REMOTE_TOKEN_ENV: &str = "MEMOBUILD_REMOTE_TOKEN";
const REMOTE_USER_ENV: &str = "MEMOBUILD_REMOTE_USER";
const REMOTE_PASSWORD_ENV: &str = "MEMOBUILD_REMOTE_PASSWORD";
const CACHE_SECRET_ENV: &str = "MEMOBUILD_CACHE_SECRET";
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_CLIENT_STALL: Duration = Duration::from_secs(60);
/// Big enough that a COPY under 64 MiB stays one layer, as Docker makes it; small enough
/// that rewriting a chunk (16–64 MiB) after an edit takes a few tenths of a second. At
/// 64 MiB, a one-file edit in a 1 GB COPY took about 1 s next to a busy dockerd, twice the
/// time at this size; the price is twice the layers (a 1 GB COPY makes about 32).
pub const DEFAULT_COPY_CHUNK_BYTES: u64 = 32 << 20;

impl Config {
    /// Resolves the configuration for a daemon running as `euid`.
    /// `env` looks up environment variables (the process's, or a test's table).
    pub fn resolve(
        flags: Overrides,
        euid: u32,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let env_string = |key: &str| {
            env(key)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.is_empty())
        };

        let (file, config_file) = load_file_config(flags.config.clone(), euid, &env)?;

        let remote_cache = remote_settings(&file, &env_string)?;
        // Flags and environment beat the file; the file beats the defaults. The protocol
        // crate owns the flag → environment → default chain so the client agrees with it.
        let root = flags
            .root
            .clone()
            .or_else(|| {
                env(paths::ROOT_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .or(file.root)
            .unwrap_or_else(|| paths::root_path(None, euid, &env));
        let socket = flags
            .socket
            .clone()
            .or_else(|| {
                env(paths::SOCKET_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .or(file.socket)
            .unwrap_or_else(|| paths::socket_path(None, euid, &env));
        let socket_group = flags
            .socket_group
            .or_else(|| env_string(SOCKET_GROUP_ENV))
            .or(file.socket_group);
        let log = resolve_log(flags.log, file.log, &env);
        let shutdown_grace = file
            .shutdown_grace_secs
            .map_or(DEFAULT_SHUTDOWN_GRACE, Duration::from_secs);

        let gc_keep_bytes = file
            .gc_keep_bytes
            .map(|size| size.bytes("gc_keep_bytes"))
            .transpose()?;
        let gc_keep_duration = file
            .gc_keep_duration
            .map(|text| memobuild_protocol::units::parse_duration(&text))
            .transpose()
            .map_err(|source| ConfigError::Unit {
                key: "gc_keep_duration",
                source,
            })?
            .map(Duration::from_secs);
        let prebuild_debounce = match file.prebuild_debounce {
            Some(value) => value.duration(
                "prebuild_debounce",
                config_file.as_deref().unwrap_or(Path::new("config")),
            )?,
            None => DEFAULT_PREBUILD_DEBOUNCE,
        };
        let root = absolute("root", root)?;
        let socket = absolute("socket", socket)?;
        paths::check_socket_path(&socket)?;
        Ok(Self {
            root,
            socket,
            socket_group,
            log,
            shutdown_grace,
            client_stall: file
                .client_stall_secs
                .map_or(DEFAULT_CLIENT_STALL, Duration::from_secs),
            max_parallel_steps: file
                .max_parallel_steps
                .filter(|n| *n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
                }),
            insecure_registries: if flags.insecure_registries.is_empty() {
                file.insecure_registries.unwrap_or_default()
            } else {
                flags.insecure_registries
            },
            registry_ca_file: file.registry_ca_file,
            watch_built_contexts: file.watch_built_contexts.unwrap_or(true),
            copy_chunk_bytes: file.copy_chunk_bytes.unwrap_or(DEFAULT_COPY_CHUNK_BYTES),
            prebuild: file.prebuild.unwrap_or(false),
            prebuild_debounce,
            prebuild_max: file.prebuild_max.filter(|n| *n > 0).unwrap_or(1),
            remote_cache,
            gc_keep_bytes,
            gc_keep_duration,
            config_file,
        })
    }

    /// Resolves against the real process environment and effective uid.
    pub fn from_process(flags: Overrides) -> Result<Self, ConfigError> {
        Self::resolve(flags, crate::passwd::effective_uid(), |key| {
            std::env::var_os(key)
        })
    }
}

/// Settings of `memobuildd serve-cache` given on its command line; `None`: not given.
#[derive(Debug, Clone, Default)]
pub struct ServeCacheOverrides {
    pub listen: Option<String>,
    pub dir: Option<PathBuf>,
    pub max_size: Option<String>,
    pub auth_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub webhooks: Vec<String>,
    pub log: Option<String>,
    pub config: Option<PathBuf>,
}

/// The resolved settings of `memobuildd serve-cache` (see the table in this module's doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeCacheConfig {
    pub listen: std::net::SocketAddr,
    pub dir: PathBuf,
    /// The store's byte budget; least recently used entries go beyond it.
    pub max_size: u64,
    /// Tokens and their access; `None` lets anyone read and write.
    pub auth_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    pub webhooks: Vec<String>,
    pub webhook_secret_file: Option<PathBuf>,
    pub log: String,
    pub config_file: Option<PathBuf>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const CACHE_LISTEN_ENV: &str = "MEMOBUILD_CACHE_LISTEN";
const CACHE_DIR_ENV: &str = "MEMOBUILD_CACHE_DIR";
const CACHE_MAX_SIZE_ENV: &str = "MEMOBUILD_CACHE_MAX_SIZE";
const CACHE_AUTH_ENV: &str = "MEMOBUILD_CACHE_AUTH";
const CACHE_WEBHOOK_SECRET_ENV: &str = "MEMOBUILD_CACHE_WEBHOOK_SECRET_FILE";
const DEFAULT_CACHE_LISTEN: &str = "127.0.0.1:9092";
const DEFAULT_CACHE_MAX_SIZE: u64 = 10 << 30;

impl ServeCacheConfig {
    /// Resolves `serve-cache`'s settings for a process running as `euid`: flag →
    /// environment → the config file's `[serve_cache]` table → default.
    pub fn resolve(
        flags: ServeCacheOverrides,
        euid: u32,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ConfigError> {
        let (file, config_file) = load_file_config(flags.config.clone(), euid, &env)?;
        let log = resolve_log(flags.log, file.log, &env);
        let section = file.serve_cache.unwrap_or_default();
        let env_path = |key: &str| env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
        let env_string = |key: &str| {
            env(key)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.is_empty())
        };

        let listen_text = flags
            .listen
            .or_else(|| env_string(CACHE_LISTEN_ENV))
            .or(section.listen)
            .unwrap_or_else(|| DEFAULT_CACHE_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|_| ConfigError::BadAddress {
            what: "listen",
            value: listen_text.clone(),
        })?;
        let dir = flags
            .dir
            .or_else(|| env_path(CACHE_DIR_ENV))
            .or(section.dir)
            .unwrap_or_else(|| default_cache_dir(euid, &env));
        let max_size = match flags.max_size.or_else(|| env_string(CACHE_MAX_SIZE_ENV)) {
            Some(text) => SizeValue::Text(text).bytes("max_size")?,
            None => match section.max_size {
                Some(size) => size.bytes("max_size")?,
                None => DEFAULT_CACHE_MAX_SIZE,
            },
        };
        let auth_file = flags
            .auth_file
            .or_else(|| env_path(CACHE_AUTH_ENV))
            .or(section.auth_file);
        let tls = match (
            flags.tls_cert.or(section.tls_cert),
            flags.tls_key.or(section.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::TlsHalf {
                    given: "a certificate",
                });
            }
            (None, Some(_)) => return Err(ConfigError::TlsHalf { given: "a key" }),
        };
        let webhooks = if flags.webhooks.is_empty() {
            section.webhooks.unwrap_or_default()
        } else {
            flags.webhooks
        };
        Ok(Self {
            listen,
            dir: absolute("dir", dir)?,
            max_size,
            auth_file,
            tls,
            webhooks,
            webhook_secret_file: env_path(CACHE_WEBHOOK_SECRET_ENV).or(section.webhook_secret_file),
            log,
            config_file,
        })
    }

    /// Resolves against the real process environment and effective uid.
    pub fn from_process(flags: ServeCacheOverrides) -> Result<Self, ConfigError> {
        Self::resolve(flags, crate::passwd::effective_uid(), |key| {
            std::env::var_os(key)
        })
    }
}

fn default_cache_dir(euid: u32, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from("/var/lib/memobuild-cache");
    }
    let data = env("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            env("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".local/share"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join(format!("memobuild-{euid}")));
    data.join("memobuild-cache")
}

/// The config file named by flag or environment (which must exist), else the default one
/// if it exists, else none.
fn load_file_config(
    flag: Option<PathBuf>,
    euid: u32,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    match flag.or_else(|| env(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)) {
        Some(path) => Ok((read_file_config(&path)?, Some(path))),
        None => {
            let path = default_config_file(euid, &env);
            match path.as_deref().filter(|p| p.exists()) {
                Some(p) => Ok((read_file_config(p)?, path)),
                None => Ok((FileConfig::default(), None)),
            }
        }
    }
}

fn resolve_log(
    flag: Option<String>,
    file: Option<String>,
    env: impl Fn(&str) -> Option<OsString>,
) -> String {
    let env_string = |key: &str| {
        env(key)
            .and_then(|v| v.into_string().ok())
            .filter(|v| !v.is_empty())
    };
    flag.or_else(|| env_string(LOG_ENV))
        .or_else(|| env_string("RUST_LOG"))
        .or(file)
        .unwrap_or_else(|| "info".to_owned())
}

/// The remote cache settings: environment over file, secrets from the environment or files.
fn remote_settings(
    file: &FileConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<RemoteSettings>, ConfigError> {
    let Some(url) = env(REMOTE_URL_ENV).or_else(|| file.remote_cache.clone()) else {
        return Ok(None);
    };
    let mode = match env(REMOTE_MODE_ENV).or_else(|| file.remote_cache_mode.clone()) {
        Some(text) => text.parse()?,
        None => RemoteMode::default(),
    };
    if mode == RemoteMode::Off {
        return Ok(None);
    }
    let (endpoint, url_auth) = Endpoint::parse(&url)?;
    let from_file = |path: &Option<PathBuf>| path.as_deref().map(settings::read_secret_file);
    let token = match env(REMOTE_TOKEN_ENV) {
        Some(token) => Some(Secret::new(token)),
        None => from_file(&file.remote_cache_token_file).transpose()?,
    };
    let user = env(REMOTE_USER_ENV).or_else(|| file.remote_cache_user.clone());
    let auth = match (token, user) {
        (Some(token), _) => Some(Auth::Bearer(token)),
        (None, Some(user)) => {
            let password = match env(REMOTE_PASSWORD_ENV) {
                Some(password) => Secret::new(password),
                None => from_file(&file.remote_cache_password_file)
                    .transpose()?
                    .unwrap_or_else(|| Secret::new("")),
            };
            Some(Auth::Basic { user, password })
        }
        (None, None) => url_auth,
    };
    let secret = match env(CACHE_SECRET_ENV) {
        Some(secret) => Some(Secret::new(secret)),
        None => from_file(&file.remote_cache_secret_file).transpose()?,
    };
    Ok(Some(RemoteSettings {
        endpoint,
        mode,
        auth,
        ca_file: file.remote_cache_ca_file.clone(),
        secret,
    }))
}

fn default_config_file(euid: u32, env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if euid == 0 {
        return Some(PathBuf::from("/etc/memobuild/memobuildd.toml"));
    }
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            env("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".config"))
        })?;
    Some(base.join("memobuild/memobuildd.toml"))
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    // toml's message already names the line, column and key.
    toml::from_str(&text).map_err(|err| ConfigError::Parse {
        path: path.to_owned(),
        message: err.to_string().trim_end().to_owned(),
    })
}

fn absolute(what: &'static str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ConfigError::NotAbsolute { what, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |key| map.get(key).cloned()
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("memobuildd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn defaults_for_root_and_users() {
        let cfg = Config::resolve(Overrides::default(), 0, env_from(&[])).expect("root");
        assert_eq!(cfg.root, Path::new("/var/lib/memobuild"));
        assert_eq!(cfg.socket, Path::new("/run/memobuild/memobuildd.sock"));
        assert_eq!(cfg.log, "info");
        assert_eq!(cfg.socket_group, None);

        let env = env_from(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/home/u/.data"),
            ("XDG_CONFIG_HOME", "/nonexistent-config"),
        ]);
        let cfg = Config::resolve(Overrides::default(), 1000, env).expect("user");
        assert_eq!(cfg.root, Path::new("/home/u/.data/memobuild"));
        assert_eq!(
            cfg.socket,
            Path::new("/run/user/1000/memobuild/memobuildd.sock")
        );
        assert_eq!(cfg.config_file, None);
    }

    #[test]
    fn flag_beats_environment_beats_file_beats_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(
            dir.path(),
            "root = \"/from/file\"\nsocket = \"/file.sock\"\nsocket_group = \"filegroup\"\nlog = \"warn\"\nshutdown_grace_secs = 3\nmax_parallel_steps = 3\n",
        );
        let config = file.to_str().expect("utf-8").to_owned();
        let env = env_from(&[
            ("MEMOBUILD_CONFIG", &config),
            ("MEMOBUILD_SOCKET", "/env.sock"),
            ("MEMOBUILD_LOG", "debug"),
        ]);
        let flags = Overrides {
            root: Some("/from/flag".into()),
            ..Overrides::default()
        };
        let cfg = Config::resolve(flags, 1000, env).expect("resolve");
        assert_eq!(cfg.root, Path::new("/from/flag"));
        assert_eq!(cfg.socket, Path::new("/env.sock"));
        assert_eq!(cfg.socket_group.as_deref(), Some("filegroup"));
        assert_eq!(cfg.log, "debug");
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(3));
        assert_eq!(cfg.max_parallel_steps, 3);
        assert_eq!(cfg.config_file.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn gc_settings_read_with_units() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(
            dir.path(),
            "gc_keep_bytes = \"20GB\"\ngc_keep_duration = \"48h\"\n",
        );
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        let cfg = Config::resolve(flags, 0, env_from(&[])).expect("resolve");
        assert_eq!(cfg.gc_keep_bytes, Some(20 << 30));
        assert_eq!(cfg.gc_keep_duration, Some(Duration::from_secs(48 * 3600)));
        let file = write_config(dir.path(), "gc_keep_bytes = 1048576\n");
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        let cfg = Config::resolve(flags, 0, env_from(&[])).expect("resolve");
        assert_eq!(cfg.gc_keep_bytes, Some(1 << 20));
        assert_eq!(cfg.gc_keep_duration, None);
        let file = write_config(dir.path(), "gc_keep_duration = \"soon\"\n");
        let flags = Overrides {
            config: Some(file),
            ..Overrides::default()
        };
        let err = Config::resolve(flags, 0, env_from(&[])).expect_err("bad duration");
        assert!(err.to_string().contains("gc_keep_duration"), "{err}");
    }

    #[test]
    fn prebuild_settings_read_with_units_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolve = |text: &str| {
            let flags = Overrides {
                config: Some(write_config(dir.path(), text)),
                ..Overrides::default()
            };
            Config::resolve(flags, 0, env_from(&[]))
        };
        let cfg = resolve("").expect("defaults");
        assert!(!cfg.prebuild);
        assert_eq!(cfg.prebuild_debounce, DEFAULT_PREBUILD_DEBOUNCE);
        assert_eq!(cfg.prebuild_max, 1);
        let cfg = resolve("prebuild = true\nprebuild_debounce = \"2s\"\nprebuild_max = 2\n")
            .expect("set");
        assert!(cfg.prebuild);
        assert_eq!(cfg.prebuild_debounce, Duration::from_secs(2));
        assert_eq!(cfg.prebuild_max, 2);
        let cfg = resolve("prebuild_debounce = 150\n").expect("milliseconds");
        assert_eq!(cfg.prebuild_debounce, Duration::from_millis(150));
        let cfg = resolve("prebuild_debounce = \"80ms\"\n").expect("ms");
        assert_eq!(cfg.prebuild_debounce, Duration::from_millis(80));
        let err = resolve("prebuild_debounce = \"soon\"\n").expect_err("bad duration");
        assert!(err.to_string().contains("prebuild_debounce"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(dir.path(), "root = \"/x\"\nsokcet = \"/typo\"\n");
        let flags = Overrides {
            config: Some(file.clone()),
            ..Overrides::default()
        };
        let err = Config::resolve(flags, 0, env_from(&[])).expect_err("typo");
        let msg = err.to_string();
        assert!(msg.contains(file.to_str().expect("utf-8")), "{msg}");
        assert!(msg.contains("sokcet"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn remote_cache_settings_environment_over_file_secrets_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), "file secret\n").expect("secret");
        std::fs::write(dir.path().join("token"), "file-token\n").expect("token");
        let file = write_config(
            dir.path(),
            &format!(
                "remote_cache = \"grpc://cache:8980/team\"\nremote_cache_mode = \"read-only\"\n\
                 remote_cache_secret_file = \"{0}/secret\"\nremote_cache_token_file = \"{0}/token\"\n\
                 remote_cache_ca_file = \"/etc/ca.pem\"\n",
                dir.path().display()
            ),
        );
        let config = file.to_str().expect("utf-8").to_owned();
        let cfg = Config::resolve(
            Overrides::default(),
            1000,
            env_from(&[("MEMOBUILD_CONFIG", &config)]),
        )
        .expect("resolve");
        let remote = cfg.remote_cache.expect("configured");
        assert_eq!(remote.endpoint.display(), "grpc://cache:8980/team");
        assert_eq!(remote.mode, RemoteMode::ReadOnly);
        assert_eq!(remote.auth, Some(Auth::Bearer(Secret::new("file-token"))));
        assert_eq!(remote.secret, Some(Secret::new("file secret")));
        assert_eq!(remote.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));

        let env = env_from(&[
            ("MEMOBUILD_CONFIG", &config),
            ("MEMOBUILD_REMOTE_URL", "https://u:p@other/bazel"),
            ("MEMOBUILD_REMOTE_CACHE_MODE", "read-write"),
            ("MEMOBUILD_REMOTE_TOKEN", "env-token"),
            ("MEMOBUILD_CACHE_SECRET", "env secret"),
        ]);
        let remote = Config::resolve(Overrides::default(), 1000, env)
            .expect("resolve")
            .remote_cache
            .expect("configured");
        assert_eq!(remote.endpoint.display(), "https://other:443/bazel");
        assert_eq!(remote.mode, RemoteMode::ReadWrite);
        assert_eq!(remote.auth, Some(Auth::Bearer(Secret::new("env-token"))));
        assert_eq!(remote.secret, Some(Secret::new("env secret")));

        let basic = env_from(&[
            ("MEMOBUILD_REMOTE_URL", "http://127.0.0.1:8080/cache"),
            ("MEMOBUILD_REMOTE_USER", "ci"),
            ("MEMOBUILD_REMOTE_PASSWORD", "pw"),
        ]);
        let remote = Config::resolve(Overrides::default(), 0, basic)
            .expect("resolve")
            .remote_cache
            .expect("configured");
        assert_eq!(
            remote.auth,
            Some(Auth::Basic {
                user: "ci".into(),
                password: Secret::new("pw")
            })
        );
        assert_eq!(remote.secret, None);
    }

    #[test]
    fn remote_cache_off_unset_or_malformed() {
        let off = env_from(&[
            ("MEMOBUILD_REMOTE_URL", "grpc://cache:1"),
            ("MEMOBUILD_REMOTE_CACHE_MODE", "off"),
        ]);
        let cfg = Config::resolve(Overrides::default(), 0, off).expect("resolve");
        assert_eq!(cfg.remote_cache, None);
        let unset = Config::resolve(Overrides::default(), 0, env_from(&[])).expect("resolve");
        assert_eq!(unset.remote_cache, None);
        for (key, value) in [
            ("MEMOBUILD_REMOTE_URL", "grpc://cache"),
            ("MEMOBUILD_REMOTE_CACHE_MODE", "sometimes"),
        ] {
            let env = env_from(&[("MEMOBUILD_REMOTE_URL", "grpc://cache:1"), (key, value)]);
            assert!(
                matches!(
                    Config::resolve(Overrides::default(), 0, env),
                    Err(ConfigError::RemoteCache(_))
                ),
                "{key}={value}"
            );
        }
    }

    #[test]
    fn explicit_missing_file_and_relative_paths_are_errors() {
        let flags = Overrides {
            config: Some("/nonexistent/memobuildd.toml".into()),
            ..Overrides::default()
        };
        assert!(matches!(
            Config::resolve(flags, 0, env_from(&[])),
            Err(ConfigError::Read { .. })
        ));
        let flags = Overrides {
            root: Some("relative/root".into()),
            ..Overrides::default()
        };
        assert!(matches!(
            Config::resolve(flags, 0, env_from(&[])),
            Err(ConfigError::NotAbsolute { what: "root", .. })
        ));
    }

    #[test]
    fn serve_cache_flag_beats_environment_beats_section_beats_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(
            dir.path(),
            "log = \"warn\"\n[serve_cache]\nlisten = \"0.0.0.0:1\"\ndir = \"/file/dir\"\nmax_size = \"2GiB\"\nauth_file = \"/file/tokens\"\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n",
        );
        let flags = ServeCacheOverrides {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:7".to_owned()),
            ..ServeCacheOverrides::default()
        };
        let env = env_from(&[("MEMOBUILD_CACHE_DIR", "/env/dir")]);
        let cfg = ServeCacheConfig::resolve(flags, 0, env).expect("resolve");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:7");
        assert_eq!(cfg.dir, Path::new("/env/dir"));
        assert_eq!(cfg.max_size, 2 << 30);
        assert_eq!(cfg.auth_file.as_deref(), Some(Path::new("/file/tokens")));
        assert_eq!(cfg.webhooks, ["http://127.0.0.1:9/hook"]);
        assert_eq!(cfg.log, "warn");
        assert_eq!(cfg.tls, None);

        let cfg = ServeCacheConfig::resolve(ServeCacheOverrides::default(), 0, env_from(&[]))
            .expect("defaults");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(cfg.dir, Path::new("/var/lib/memobuild-cache"));
        assert_eq!(cfg.max_size, 10 << 30);
        assert_eq!(cfg.auth_file, None);
    }

    #[test]
    fn serve_cache_rejects_bad_sizes_addresses_and_half_tls() {
        for (text, bytes) in [("1048576", 1 << 20), ("10G", 10 << 30), ("3 MiB", 3 << 20)] {
            assert_eq!(
                SizeValue::Text(text.into()).bytes("max_size").expect(text),
                bytes
            );
        }
        for text in ["", "G", "10X", "-1", "99999999999999999999T"] {
            assert!(
                SizeValue::Text(text.into()).bytes("max_size").is_err(),
                "{text}"
            );
        }
        let flags = ServeCacheOverrides {
            listen: Some("localhost".to_owned()),
            ..ServeCacheOverrides::default()
        };
        assert!(matches!(
            ServeCacheConfig::resolve(flags, 0, env_from(&[])),
            Err(ConfigError::BadAddress { .. })
        ));
        let flags = ServeCacheOverrides {
            tls_key: Some("/key.pem".into()),
            ..ServeCacheOverrides::default()
        };
        assert!(matches!(
            ServeCacheConfig::resolve(flags, 0, env_from(&[])),
            Err(ConfigError::TlsHalf { given: "a key" })
        ));
    }
}
