//! No silent flags: every flag and mount option the typed layer accepts either does what
//! BuildKit does or is refused here, after expansion, at its Dockerfile line and by name.
//! (Flags BuildKit does not know are refused earlier, by `frontend::instructions`.)

use crate::frontend::{FileCopy, InstructionKind, MountKind, RunMount, parse_mounts};

/// Why an expanded instruction cannot be built, if it cannot: the flag at fault (without
/// `--`) and a message naming it.
pub(super) fn unsupported(kind: &InstructionKind) -> Option<(&'static str, String)> {
    match kind {
        InstructionKind::Run(run) => {
            if run.security.as_deref() == Some("insecure") {
                return Some((
                    "security",
                    "--security=insecure is not supported: RUN steps always run sandboxed".into(),
                ));
            }
            let problem = match parse_mounts(&run.mounts) {
                Err((_, err)) => Some(format!("--mount: {err}")),
                Ok(mounts) => mounts.iter().find_map(mount_unsupported),
            };
            problem.map(|message| ("mount", message))
        }
        InstructionKind::Copy(copy) => copy_unsupported("COPY", copy),
        InstructionKind::Add(add) => copy_unsupported("ADD", add).or_else(|| {
            let git = add.sources.iter().find(|s| is_git_source(s))?;
            Some((
                "",
                format!("ADD of a git repository ({git}) is not supported yet"),
            ))
        }),
        _ => None,
    }
}

fn mount_unsupported(mount: &RunMount) -> Option<String> {
    let kind = mount.kind.as_str();
    match mount.kind {
        MountKind::Cache if mount.from.is_some() || mount.source.is_some() => Some(format!(
            "--mount=type={kind}: from= and source= (seeding a cache from a stage) are not supported yet"
        )),
        MountKind::Ssh if mount.mode.is_some() || mount.uid.is_some() || mount.gid.is_some() => {
            Some(format!(
                "--mount=type={kind}: mode=, uid= and gid= are not supported yet (the agent's own socket is mounted)"
            ))
        }
        MountKind::Cache
        | MountKind::Tmpfs
        | MountKind::Secret
        | MountKind::Ssh
        | MountKind::Bind => None,
    }
}

fn copy_unsupported(keyword: &str, copy: &FileCopy) -> Option<(&'static str, String)> {
    if copy.parents {
        return Some((
            "parents",
            format!("{keyword} --parents is not supported yet"),
        ));
    }
    if copy.keep_git_dir {
        return Some((
            "keep-git-dir",
            format!("{keyword} --keep-git-dir: ADD of a git repository is not supported yet"),
        ));
    }
    None
}

/// A source BuildKit's ADD clones with git: `git@…`, `git://…`, `ssh://…`, or an HTTP(S) URL
/// whose path ends in `.git` (before a `#ref`).
fn is_git_source(source: &str) -> bool {
    if ["git://", "git@", "ssh://"]
        .iter()
        .any(|p| source.starts_with(p))
    {
        return true;
    }
    let is_http = source.starts_with("http://") || source.starts_with("https://");
    let path = source.split('#').next().unwrap_or_default();
    is_http && path.trim_end_matches('/').ends_with(".git")
}

/// Why `platform` (a FROM's `--platform`, expanded) cannot be built here: only the host's
/// platform runs without emulation.
pub(super) fn platform_unsupported(platform: &str, host: &str) -> Option<String> {
    let normalize = |p: &str| {
        let mut parts: Vec<&str> = p.split('/').collect();
        // `linux/arm64/v8` is `linux/arm64`, as in containerd's platform matching.
        if parts.len() == 3 && parts[1] == "arm64" && parts[2] == "v8" {
            parts.pop();
        }
        parts.join("/").to_ascii_lowercase()
    };
    (normalize(platform) != normalize(host)).then(|| {
        format!(
            "--platform={platform}: only the host platform ({host}) can be built; \
             other platforms need emulation, which is not supported yet"
        )
    })
}
