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
//! | steps executing at once | | | `max_parallel_steps` | the number of CPUs |
//! | plain-HTTP registries | `--insecure-registry` (repeatable) | | `insecure_registries` | none (loopback always is) |
//! | extra registry CA (PEM) | | | `registry_ca_file` | none |
//! | keep built contexts watched | | | `watch_built_contexts` | true |
//! | bytes per chunk of a large COPY's layer (0: one layer per COPY, as Docker) | | | `copy_chunk_bytes` | 32 MiB |
//! | the store's budget: automatic GC keeps it under this (`"20GB"` or bytes) | | | `gc_keep_bytes` | 10% of the root's filesystem, at least 2 GiB |
//! | what was unused longer goes at every GC pass (`"48h"`, `"7d"`) | | | `gc_keep_duration` | none (budget only) |
//! | config file | `--config` | `MEMOBUILD_CONFIG` | | root: `/etc/memobuild/memobuildd.toml`; users: `$XDG_CONFIG_HOME/memobuild/memobuildd.toml` |
//!
//! A missing default config file is fine; a missing file named by flag or environment is an
//! error, and so is an unknown key (a typo must not be silently ignored).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memobuild_protocol::paths;
use serde::Deserialize;

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
    max_parallel_steps: Option<usize>,
    insecure_registries: Option<Vec<String>>,
    registry_ca_file: Option<PathBuf>,
    watch_built_contexts: Option<bool>,
    copy_chunk_bytes: Option<u64>,
    gc_keep_bytes: Option<SizeValue>,
    gc_keep_duration: Option<String>,
}

/// A size in the config file: bytes, or text with a unit (`"20GB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

const CONFIG_ENV: &str = "MEMOBUILD_CONFIG";
const SOCKET_GROUP_ENV: &str = "MEMOBUILD_SOCKET_GROUP";
const LOG_ENV: &str = "MEMOBUILD_LOG";
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
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

        let (file, config_file) = match flags
            .config
            .clone()
            .or_else(|| env(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        {
            Some(path) => (read_file_config(&path)?, Some(path)),
            None => {
                let path = default_config_file(euid, &env);
                match path.as_deref().filter(|p| p.exists()) {
                    Some(p) => (read_file_config(p)?, path),
                    None => (FileConfig::default(), None),
                }
            }
        };

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
        let log = flags
            .log
            .or_else(|| env_string(LOG_ENV))
            .or_else(|| env_string("RUST_LOG"))
            .or(file.log)
            .unwrap_or_else(|| "info".to_owned());
        let shutdown_grace = file
            .shutdown_grace_secs
            .map_or(DEFAULT_SHUTDOWN_GRACE, Duration::from_secs);

        let gc_keep_bytes = match file.gc_keep_bytes {
            None => None,
            Some(SizeValue::Bytes(bytes)) => Some(bytes),
            Some(SizeValue::Text(text)) => Some(
                memobuild_protocol::units::parse_size(&text).map_err(|source| {
                    ConfigError::Unit {
                        key: "gc_keep_bytes",
                        source,
                    }
                })?,
            ),
        };
        let gc_keep_duration = file
            .gc_keep_duration
            .map(|text| memobuild_protocol::units::parse_duration(&text))
            .transpose()
            .map_err(|source| ConfigError::Unit {
                key: "gc_keep_duration",
                source,
            })?
            .map(Duration::from_secs);
        let root = absolute("root", root)?;
        let socket = absolute("socket", socket)?;
        paths::check_socket_path(&socket)?;
        Ok(Self {
            root,
            socket,
            socket_group,
            log,
            shutdown_grace,
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
}
