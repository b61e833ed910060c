//! `RUN --mount` specs (`type=cache,target=/root/.cache,sharing=locked`) as typed values, with
//! BuildKit's defaults. Parsed after ARG expansion (`plan`), and again by the engine, which
//! runs what the planner accepted. Every key BuildKit documents is known here; one that does
//! not apply to the mount's type is an error rather than ignored.

/// The kinds of `--mount=type=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MountKind::Bind => "bind",
            MountKind::Cache => "cache",
            MountKind::Tmpfs => "tmpfs",
            MountKind::Secret => "secret",
            MountKind::Ssh => "ssh",
        }
    }

    /// The keys BuildKit reads for this type (besides `type`).
    fn keys(self) -> &'static [&'static str] {
        match self {
            MountKind::Bind => &["target", "source", "from", "readonly", "readwrite"],
            MountKind::Cache => &[
                "target",
                "id",
                "sharing",
                "from",
                "source",
                "mode",
                "uid",
                "gid",
                "readonly",
                "readwrite",
            ],
            MountKind::Tmpfs => &["target", "size"],
            MountKind::Secret => &["target", "id", "env", "required", "mode", "uid", "gid"],
            MountKind::Ssh => &["target", "id", "required", "mode", "uid", "gid"],
        }
    }
}

/// How concurrent builds share one cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Every build uses the same directory at once.
    #[default]
    Shared,
    /// A build that finds the directory in use gets a fresh one of its own.
    Private,
    /// Builds take turns.
    Locked,
}

/// One `--mount` after defaults. `target` is always set (secret and ssh have defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountKind,
    pub target: String,
    /// Cache: the cache's name (default: the target); secret and ssh: what the client gave.
    pub id: String,
    /// Bind and cache: a stage or image (bind: the context when `None`).
    pub from: Option<String>,
    pub source: Option<String>,
    pub readonly: bool,
    pub sharing: Sharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    /// Tmpfs: a size limit in bytes.
    pub size: Option<u64>,
    /// Secret: also (or only, without a target) expose it as this environment variable.
    pub env: Option<String>,
}

/// What is wrong with a mount spec, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("unknown mount type {0:?} (bind, cache, tmpfs, secret or ssh)")]
    UnknownType(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("key {key:?} does not apply to a {kind} mount")]
    NotForType { key: String, kind: &'static str },
    #[error("{key}={value:?}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("a {0} mount needs a target")]
    NoTarget(&'static str),
    #[error("the mount target must be an absolute path, not {0:?}")]
    RelativeTarget(String),
}

/// The canonical name of a key and its aliases.
fn key_name(key: &str) -> Option<&'static str> {
    Some(match key {
        "type" => "type",
        "target" | "dst" | "destination" => "target",
        "source" | "src" => "source",
        "from" => "from",
        "readonly" | "ro" => "readonly",
        "readwrite" | "rw" => "readwrite",
        "id" => "id",
        "sharing" => "sharing",
        "mode" => "mode",
        "uid" => "uid",
        "gid" => "gid",
        "required" => "required",
        "size" => "size",
        "env" => "env",
        _ => return None,
    })
}

/// Parses one expanded `--mount` value. `ssh_index` numbers ssh mounts without a target
/// (BuildKit's `/run/buildkit/ssh_agent.N`).
fn parse_mount(spec: &str, ssh_index: usize) -> Result<RunMount, MountError> {
    let mut fields: Vec<(&'static str, String, Option<String>)> = Vec::new();
    let mut kind = MountKind::Bind;
    for field in spec.split(',').filter(|f| !f.is_empty()) {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_owned())),
            None => (field.trim(), None),
        };
        let lower = key.to_ascii_lowercase();
        let name = key_name(&lower).ok_or_else(|| MountError::UnknownKey(key.to_owned()))?;
        if name == "type" {
            let value = value.unwrap_or_default();
            kind = match value.as_str() {
                "bind" => MountKind::Bind,
                "cache" => MountKind::Cache,
                "tmpfs" => MountKind::Tmpfs,
                "secret" => MountKind::Secret,
                "ssh" => MountKind::Ssh,
                _ => return Err(MountError::UnknownType(value)),
            };
            continue;
        }
        fields.push((name, key.to_owned(), value));
    }
    let mut mount = RunMount {
        kind,
        target: String::new(),
        id: String::new(),
        from: None,
        source: None,
        readonly: matches!(kind, MountKind::Bind | MountKind::Secret | MountKind::Ssh),
        sharing: Sharing::Shared,
        mode: None,
        uid: None,
        gid: None,
        required: false,
        size: None,
        env: None,
    };
    for (name, key, value) in fields {
        if !kind.keys().contains(&name) {
            return Err(MountError::NotForType {
                key,
                kind: kind.as_str(),
            });
        }
        let bad = |why: &'static str| MountError::BadValue {
            key: key.clone(),
            value: value.clone().unwrap_or_default(),
            why,
        };
        // Booleans may stand alone (`ro`, `required`); everything else needs a value.
        let flag = |value: &Option<String>| match value.as_deref() {
            None => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(_) => Err(bad("expected true or false")),
        };
        if !matches!(name, "readonly" | "readwrite" | "required") && value.is_none() {
            return Err(bad("needs a value"));
        }
        let text = value.clone().unwrap_or_default();
        let number =
            |radix: u32| u32::from_str_radix(&text, radix).map_err(|_| bad("not a number"));
        match name {
            "target" => mount.target = text,
            "source" => mount.source = Some(text),
            "from" => mount.from = Some(text),
            "readonly" => mount.readonly = flag(&value)?,
            "readwrite" => mount.readonly = !flag(&value)?,
            "id" => mount.id = text,
            "sharing" => {
                mount.sharing = match text.as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(bad("expected shared, private or locked")),
                }
            }
            "mode" => mount.mode = Some(number(8)?),
            "uid" => mount.uid = Some(number(10)?),
            "gid" => mount.gid = Some(number(10)?),
            "required" => mount.required = flag(&value)?,
            "size" => {
                mount.size = Some(
                    memobuild_protocol::units::parse_size(&text)
                        .map_err(|_| bad("not a size (bytes, or with a unit: 64m, 1g)"))?,
                )
            }
            "env" => mount.env = Some(text),
            _ => unreachable!("every key of MountKind::keys is handled"),
        }
    }
    match kind {
        MountKind::Secret => {
            if mount.id.is_empty() {
                mount.id = mount
                    .target
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if mount.id.is_empty() {
                return Err(MountError::BadValue {
                    key: "id".into(),
                    value: String::new(),
                    why: "a secret mount needs an id or a target",
                });
            }
            if mount.target.is_empty() && mount.env.is_none() {
                mount.target = format!("/run/secrets/{}", mount.id);
            }
        }
        MountKind::Ssh => {
            if mount.id.is_empty() {
                mount.id = "default".into();
            }
            if mount.target.is_empty() {
                mount.target = format!("/run/buildkit/ssh_agent.{ssh_index}");
            }
        }
        MountKind::Bind | MountKind::Cache | MountKind::Tmpfs if mount.target.is_empty() => {
            return Err(MountError::NoTarget(kind.as_str()));
        }
        MountKind::Cache if mount.id.is_empty() => mount.id = mount.target.clone(),
        _ => {}
    }
    if !mount.target.is_empty() && !mount.target.starts_with('/') {
        return Err(MountError::RelativeTarget(mount.target));
    }
    Ok(mount)
}

/// Every mount of a RUN, numbering ssh mounts as BuildKit does.
pub fn parse_mounts(specs: &[String]) -> Result<Vec<RunMount>, (usize, MountError)> {
    let mut ssh = 0;
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mount = parse_mount(spec, ssh).map_err(|e| (i, e))?;
            if mount.kind == MountKind::Ssh {
                ssh += 1;
            }
            Ok(mount)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_buildkit() {
        let cache = parse_mount("type=cache,target=/root/.cache", 0).unwrap();
        assert_eq!(cache.id, "/root/.cache");
        assert!(!cache.readonly);
        assert_eq!(cache.sharing, Sharing::Shared);
        let secret = parse_mount("type=secret,id=token", 0).unwrap();
        assert_eq!(secret.target, "/run/secrets/token");
        assert!(!secret.required);
        let named = parse_mount("type=secret,target=/etc/npmrc", 0).unwrap();
        assert_eq!(named.id, "npmrc");
        let env_only = parse_mount("type=secret,id=t,env=TOKEN", 0).unwrap();
        assert_eq!(
            (env_only.target.as_str(), env_only.env.as_deref()),
            ("", Some("TOKEN"))
        );
        let ssh = parse_mount("type=ssh,required", 1).unwrap();
        assert_eq!(
            (ssh.id.as_str(), ssh.target.as_str(), ssh.required),
            ("default", "/run/buildkit/ssh_agent.1", true)
        );
        let bind = parse_mount("target=/src,rw", 0).unwrap();
        assert_eq!((bind.kind, bind.readonly), (MountKind::Bind, false));
        let tmpfs = parse_mount("type=tmpfs,dst=/t,size=64m", 0).unwrap();
        assert_eq!(tmpfs.size, Some(64 << 20));
        let locked = parse_mount(
            "type=cache,id=apt,target=/var/cache/apt,sharing=locked,mode=0700,uid=1,gid=2",
            0,
        )
        .unwrap();
        assert_eq!(
            (
                locked.id.as_str(),
                locked.sharing,
                locked.mode,
                locked.uid,
                locked.gid
            ),
            ("apt", Sharing::Locked, Some(0o700), Some(1), Some(2))
        );
    }

    #[test]
    fn every_mistake_names_its_key() {
        for (spec, message) in [
            (
                "type=nfs,target=/x",
                "unknown mount type \"nfs\" (bind, cache, tmpfs, secret or ssh)",
            ),
            ("type=cache", "a cache mount needs a target"),
            ("target=/x,colour=red", "unknown key \"colour\""),
            (
                "type=tmpfs,target=/x,id=a",
                "key \"id\" does not apply to a tmpfs mount",
            ),
            (
                "type=cache,target=/x,size=1",
                "key \"size\" does not apply to a cache mount",
            ),
            (
                "type=secret,id=a,sharing=locked",
                "key \"sharing\" does not apply to a secret mount",
            ),
            (
                "type=bind,target=/x,uid=1",
                "key \"uid\" does not apply to a bind mount",
            ),
            (
                "type=cache,target=/x,sharing=sometimes",
                "sharing=\"sometimes\": expected shared, private or locked",
            ),
            (
                "type=cache,target=/x,mode=rwx",
                "mode=\"rwx\": not a number",
            ),
            (
                "type=cache,target=x",
                "the mount target must be an absolute path, not \"x\"",
            ),
            (
                "type=secret",
                "id=\"\": a secret mount needs an id or a target",
            ),
            (
                "type=cache,target=/x,ro=maybe",
                "ro=\"maybe\": expected true or false",
            ),
            ("type=cache,target", "target=\"\": needs a value"),
        ] {
            let err = parse_mount(spec, 0).unwrap_err();
            assert_eq!(err.to_string(), message, "{spec}");
        }
    }
}
