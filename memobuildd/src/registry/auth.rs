//! Where credentials for a registry come from, in this order:
//!
//! 1. `MEMOBUILD_REGISTRY_USER` and `MEMOBUILD_REGISTRY_PASSWORD`, when both are set: for
//!    the registry named by `MEMOBUILD_REGISTRY_SERVER` (`host[:port]`) if that is set, else
//!    for every registry. Meant for CI jobs; set the server when the job also pulls from
//!    another registry, which would otherwise receive (and may reject) these credentials.
//! 2. Docker's `config.json`: a `credHelpers` entry for the registry, else an inline `auths`
//!    entry (`auth` = base64 of `user:password`, or `username` and `password`), else the
//!    `credsStore` helper. A helper is `docker-credential-<name> get`, given the server on
//!    stdin; "credentials not found" from it means anonymous.
//! 3. Anonymous.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use super::RegistryError;
use super::reference::DOCKER_HUB;

pub const USER_ENV: &str = "MEMOBUILD_REGISTRY_USER";
pub const PASSWORD_ENV: &str = "MEMOBUILD_REGISTRY_PASSWORD";
pub const SERVER_ENV: &str = "MEMOBUILD_REGISTRY_SERVER";

/// How Docker Hub is named in config files and to credential helpers.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// A helper that hangs (a locked keychain prompt) must not hang a build forever.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Docker's default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(super) fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The parts of Docker's `config.json` that hold credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Where a registry's credentials are to be found in a [`DockerConfig`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Source {
    Inline { user: String, password: String },
    Helper { helper: String, server: String },
    Anonymous,
}

impl DockerConfig {
    /// Reads `path`; a missing file is an empty config (no credentials), as for Docker.
    pub(super) fn load(path: &Path) -> Result<Self, RegistryError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes).map_err(|reason| RegistryError::Credentials {
                registry: path.display().to_string(),
                reason,
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RegistryError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|err| format!("not a Docker config file: {err}"))
    }

    pub(super) fn source(&self, registry: &str) -> Result<Source, String> {
        let wanted = normalize(registry);
        let server = if wanted == DOCKER_HUB {
            DOCKER_HUB_SERVER.to_owned()
        } else {
            registry.to_owned()
        };
        if let Some(helper) = lookup(&self.cred_helpers, wanted) {
            return Ok(Source::Helper {
                helper: helper.clone(),
                server,
            });
        }
        if let Some(entry) = lookup(&self.auths, wanted)
            && let Some((user, password)) = entry.inline()?
        {
            return Ok(Source::Inline { user, password });
        }
        Ok(match &self.creds_store {
            Some(helper) if !helper.is_empty() => Source::Helper {
                helper: helper.clone(),
                server,
            },
            _ => Source::Anonymous,
        })
    }
}

impl AuthEntry {
    fn inline(&self) -> Result<Option<(String, String)>, String> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|err| format!("an `auth` entry is not base64: {err}"))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| "an `auth` entry is not UTF-8 user:password".to_owned())?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| "an `auth` entry is not user:password".to_owned())?;
            return Ok(Some((user.to_owned(), password.to_owned())));
        }
        Ok(match (&self.username, &self.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            _ => None,
        })
    }
}

fn lookup<'a, V>(map: &'a HashMap<String, V>, registry: &str) -> Option<&'a V> {
    map.iter()
        .find(|(key, _)| normalize(key) == registry)
        .map(|(_, value)| value)
}

/// Config keys are written as `host`, `https://host`, or `https://host/v1/`; Docker Hub has
/// several names.
fn normalize(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        host => host,
    }
}

/// The credentials to use for `registry`.
pub(super) async fn credentials(
    docker_config: Option<&Path>,
    registry: &str,
) -> Result<RegistryAuth, RegistryError> {
    if let Some(auth) = from_env(registry, |name| std::env::var(name).ok()) {
        return Ok(auth);
    }
    let Some(path) = docker_config else {
        return Ok(RegistryAuth::Anonymous);
    };
    let source = DockerConfig::load(path)?
        .source(registry)
        .map_err(|reason| RegistryError::Credentials {
            registry: registry.to_owned(),
            reason: format!("{}: {reason}", path.display()),
        })?;
    match source {
        Source::Inline { user, password } => Ok(RegistryAuth::Basic(user, password)),
        Source::Anonymous => Ok(RegistryAuth::Anonymous),
        Source::Helper { helper, server } => {
            run_helper(&helper, &server)
                .await
                .map_err(|reason| RegistryError::Credentials {
                    registry: registry.to_owned(),
                    reason,
                })
        }
    }
}

/// The environment's credentials for `registry`, if it gives any; `var` reads a variable.
fn from_env(registry: &str, var: impl Fn(&str) -> Option<String>) -> Option<RegistryAuth> {
    let (user, password) = (var(USER_ENV)?, var(PASSWORD_ENV)?);
    match var(SERVER_ENV) {
        Some(server) if normalize(&server) != normalize(registry) => None,
        _ => Some(RegistryAuth::Basic(user, password)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperReply {
    username: String,
    secret: String,
}

/// Runs a credential helper (`program get`, the server on stdin) and reads its answer.
async fn run_helper(program: &str, server: &str) -> Result<RegistryAuth, String> {
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot run {program}: {err}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|err| format!("{program}: {err}"))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer within {HELPER_TIMEOUT:?}"))?
        .map_err(|err| format!("{program}: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The helper protocol's way of saying "no entry" is this message on stdout.
        if stdout.contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: Vec<&str> = [stdout.trim(), stderr.trim()]
            .into_iter()
            .filter(|text| !text.is_empty())
            .collect();
        return Err(format!(
            "{program} get failed ({}): {}",
            output.status,
            said.join("; ")
        ));
    }
    let reply: HelperReply = serde_json::from_str(&stdout)
        .map_err(|err| format!("{program} gave an unreadable answer: {err}"))?;
    Ok(RegistryAuth::Basic(reply.username, reply.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> DockerConfig {
        DockerConfig::parse(json.to_string().as_bytes()).expect("config")
    }

    fn inline(user: &str, password: &str) -> Source {
        Source::Inline {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn auths_entries_in_both_forms_and_key_spellings() {
        let c = config(serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
                "registry.example:5000": {"username": "u", "password": "p"},
                "https://ghcr.io": {"auth": "Z2g6dG9rOmVu"},
                "tokenless.example": {},
            }
        }));
        assert_eq!(c.source("docker.io"), Ok(inline("hub", "secret")));
        assert_eq!(c.source("registry.example:5000"), Ok(inline("u", "p")));
        // Only the first colon separates: passwords may contain colons.
        assert_eq!(c.source("ghcr.io"), Ok(inline("gh", "tok:en")));
        assert_eq!(c.source("tokenless.example"), Ok(Source::Anonymous));
        assert_eq!(c.source("elsewhere.example"), Ok(Source::Anonymous));
        assert_eq!(c.source("registry.example"), Ok(Source::Anonymous));
    }

    #[test]
    fn cred_helpers_win_over_auths_and_creds_store() {
        let c = config(serde_json::json!({
            "auths": {"gcr.io": {"auth": "dTpw"}, "quay.io": {"auth": "dTpw"}},
            "credsStore": "desktop",
            "credHelpers": {"gcr.io": "gcloud", "index.docker.io": "hub"},
        }));
        let helper = |helper: &str, server: &str| Source::Helper {
            helper: helper.into(),
            server: server.into(),
        };
        assert_eq!(c.source("gcr.io"), Ok(helper("gcloud", "gcr.io")));
        assert_eq!(
            c.source("docker.io"),
            Ok(helper("hub", "https://index.docker.io/v1/"))
        );
        assert_eq!(c.source("quay.io"), Ok(inline("u", "p")));
        assert_eq!(c.source("other.io"), Ok(helper("desktop", "other.io")));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn credential_helpers_are_asked_on_stdin() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let helper = dir.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            r#"#!/bin/sh
[ "$1" = get ] || exit 3
read -r server
case "$server" in
  reg.example) echo '{"ServerURL":"reg.example","Username":"u","Secret":"s3"}' ;;
  broken.example) echo 'keychain locked' >&2; exit 2 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"#,
        )
        .expect("write helper");
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let helper = helper.to_str().expect("utf-8 path");

        let auth = run_helper(helper, "reg.example").await.expect("answer");
        assert!(matches!(auth, RegistryAuth::Basic(u, s) if u == "u" && s == "s3"));
        let auth = run_helper(helper, "other.example").await.expect("no entry");
        assert!(matches!(auth, RegistryAuth::Anonymous));
        let err = run_helper(helper, "broken.example")
            .await
            .expect_err("failure");
        assert!(err.contains("keychain locked"), "{err}");
        let err = run_helper("/nonexistent/docker-credential-x", "reg.example")
            .await
            .expect_err("missing helper");
        assert!(err.contains("cannot run"), "{err}");
    }

    #[test]
    fn environment_credentials_go_to_their_server_only() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let basic = |auth: Option<RegistryAuth>| match auth {
            Some(RegistryAuth::Basic(user, password)) => Some((user, password)),
            _ => None,
        };
        let everywhere = env(&[(USER_ENV, "ci"), (PASSWORD_ENV, "pw")]);
        assert_eq!(
            basic(from_env("any.example", everywhere)),
            Some(("ci".into(), "pw".into()))
        );
        let scoped = env(&[
            (USER_ENV, "ci"),
            (PASSWORD_ENV, "pw"),
            (SERVER_ENV, "https://reg.example:5000"),
        ]);
        assert!(basic(from_env("reg.example:5000", scoped)).is_some());
        assert!(from_env("docker.io", scoped).is_none());
        let hub = env(&[
            (USER_ENV, "ci"),
            (PASSWORD_ENV, "pw"),
            (SERVER_ENV, "index.docker.io"),
        ]);
        assert!(basic(from_env("docker.io", hub)).is_some());
        assert!(from_env("x.example", env(&[(USER_ENV, "ci")])).is_none());
    }

    #[test]
    fn a_broken_auth_entry_is_reported() {
        let c = config(serde_json::json!({"auths": {"x.io": {"auth": "bm9jb2xvbg=="}}}));
        let err = c.source("x.io").expect_err("no colon");
        assert!(err.contains("user:password"), "{err}");
        assert!(DockerConfig::parse(b"{").is_err());
    }
}
