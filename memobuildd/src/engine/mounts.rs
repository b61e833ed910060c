//! What a RUN's `--mount`s put in its container: cache directories from the store, tmpfs,
//! the build's secrets (files in a private tmpfs, or environment variables) and SSH agent
//! sockets. None of it enters the step's key (only the mount specs, as written, do) and none
//! of it reaches the layer: the runtime's mount points are removed from the upper dir after
//! the step (`absent_paths`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::BuildError;
use super::copy::{self, CopySource, CopySpec};
use super::flight::Work;
use super::keys;
use super::node::{BuildRun, store};
use super::state::State;
use super::view::RootView;
use crate::context::IgnoreRules;
use crate::exec::{MountSource, StepMount};
use crate::frontend::{self, MountKind, Run, RunMount, parse_mounts};
use crate::plan::NodeIndex;
use crate::snapshot::{Active, Tmpfs};
use crate::store::{CacheMount, CacheOwner, Sharing};

/// Why a RUN's `--mount`s could not be prepared (the step fails with it).
#[derive(Debug, thiserror::Error)]
pub enum StepMountError {
    #[error("--mount: {0}")]
    Spec(#[source] frontend::MountError),
    #[error(
        "secret {id:?} is required but the build was given none \
         (memobuild build --secret id={id},src=FILE)"
    )]
    MissingSecret { id: String },
    #[error("secret {id:?} is not UTF-8 text: it cannot be the environment variable {name}")]
    SecretNotText { id: String, name: String },
    #[error(
        "SSH agent {id:?} is required but the build was given none (memobuild build --ssh {id})"
    )]
    MissingSsh { id: String },
    #[error("no build context for a bind mount")]
    NoContext,
    #[error("--mount from={from}: no such input")]
    NoSuchInput { from: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_owned();
    move |source| BuildError::failed(super::StepError::Io { what, path, source })
}

/// The build's `--secret`s by id. Its `Debug` shows ids only, so a logged spec leaks nothing.
#[derive(Clone, Default)]
pub struct Secrets(HashMap<String, Vec<u8>>);

impl Secrets {
    pub fn new(secrets: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self(secrets.into_iter().collect())
    }

    fn get(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(Vec::as_slice)
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// One RUN's mounts, held until the step ends.
pub(super) struct StepMounts {
    pub(super) mounts: Vec<StepMount>,
    /// `NAME=value` for secrets mounted with `env=`.
    pub(super) env: Vec<String>,
    /// Where the runtime bundle goes: inside the secrets' tmpfs when there are secrets
    /// (its `config.json` may hold them), else in the step's scratch directory.
    pub(super) bundle: PathBuf,
    _caches: Vec<CacheMount>,
    /// Overlays of the stages and images bind mounts read (writes to them are discarded).
    _binds: Vec<Active>,
    _secrets: Option<Tmpfs>,
}

impl BuildRun {
    /// Prepares the `--mount`s of `run` (the planner refused the kinds not handled here).
    pub(super) fn step_mounts(
        &self,
        node: NodeIndex,
        run: &Run,
        scratch: &Path,
        inputs: &HashMap<NodeIndex, Arc<State>>,
        work: &Work,
    ) -> Result<StepMounts, BuildError> {
        let parsed =
            parse_mounts(&run.mounts).map_err(|(_, err)| store(StepMountError::Spec(err)))?;
        let needs_tmpfs = parsed.iter().any(|m| m.kind == MountKind::Secret);
        let secrets = needs_tmpfs
            .then(|| Tmpfs::mount(&scratch.join("private")))
            .transpose()
            .map_err(store)?;
        let mut step = StepMounts {
            mounts: Vec::new(),
            env: Vec::new(),
            bundle: secrets
                .as_ref()
                .map_or_else(|| scratch.join("bundle"), |t| t.path().join("bundle")),
            _caches: Vec::new(),
            _binds: Vec::new(),
            _secrets: None,
        };
        let mut ssh_sock = None;
        for (i, mount) in parsed.into_iter().enumerate() {
            let source = match mount.kind {
                MountKind::Cache => {
                    let cache = self.cache(&mount, work)?;
                    let path = cache.path().to_owned();
                    step._caches.push(cache);
                    MountSource::Bind {
                        path,
                        readonly: mount.readonly,
                    }
                }
                MountKind::Tmpfs => MountSource::Tmpfs { size: mount.size },
                MountKind::Secret => {
                    let Some(value) = self.spec.secrets.get(&mount.id) else {
                        if mount.required {
                            return Err(store(StepMountError::MissingSecret {
                                id: mount.id.clone(),
                            }));
                        }
                        continue;
                    };
                    if let Some(name) = &mount.env {
                        let text = std::str::from_utf8(value).map_err(|_| {
                            store(StepMountError::SecretNotText {
                                id: mount.id.clone(),
                                name: name.clone(),
                            })
                        })?;
                        step.env.push(format!("{name}={text}"));
                    }
                    if mount.target.is_empty() {
                        continue;
                    }
                    let dir = secrets.as_ref().expect("mounted for secrets").path();
                    let file = dir.join(format!("secret-{i}"));
                    write_private(&file, value, &mount).map_err(io("writing the secret", &file))?;
                    MountSource::Bind {
                        path: file,
                        readonly: true,
                    }
                }
                MountKind::Ssh => {
                    let Some((_, socket)) = self.spec.ssh.iter().find(|(id, _)| *id == mount.id)
                    else {
                        if mount.required {
                            return Err(store(StepMountError::MissingSsh {
                                id: mount.id.clone(),
                            }));
                        }
                        continue;
                    };
                    ssh_sock.get_or_insert_with(|| mount.target.clone());
                    MountSource::Bind {
                        path: socket.clone(),
                        readonly: false,
                    }
                }
                MountKind::Bind => {
                    let dir = scratch.join(format!("bind-{i}"));
                    let path = match &mount.from {
                        None => self.bind_context(&mount, &dir)?,
                        Some(from) => {
                            let state = self.bound_state(node, from, inputs)?;
                            let ids: Vec<String> = self
                                .lower_dirs(&state)?
                                .iter()
                                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                                .collect();
                            std::fs::create_dir_all(&dir)
                                .map_err(io("creating the bind mount's directory", &dir))?;
                            let active =
                                self.engine.snapshotter.prepare(&ids, &dir).map_err(store)?;
                            let source = mount.source.as_deref().unwrap_or("/");
                            let path = active.rootfs().join(source.trim_start_matches('/'));
                            step._binds.push(active);
                            path
                        }
                    };
                    MountSource::Bind {
                        path,
                        readonly: mount.readonly,
                    }
                }
            };
            step.mounts.push(StepMount {
                target: mount.target,
                source,
            });
        }
        // As BuildKit: the first SSH mount is the agent the step's ssh and git find.
        if let Some(target) = ssh_sock {
            step.env.push(format!("SSH_AUTH_SOCK={target}"));
        }
        step._secrets = secrets;
        Ok(step)
    }

    /// A bind mount of the context: its source copied out of the build's snapshot, as COPY
    /// copies it (what the key's fingerprint covers, `.dockerignore` applied), into `dir`.
    fn bind_context(&self, mount: &RunMount, dir: &Path) -> Result<PathBuf, BuildError> {
        let tree = self
            .context
            .as_deref()
            .ok_or_else(|| store(StepMountError::NoContext))?;
        let spec = CopySpec {
            sources: vec![crate::plan::bind_context_source(mount)],
            dest: "/bound".into(),
            workdir: "/".into(),
            chown: None,
            chmod: None,
        };
        let excludes = IgnoreRules::parse("", "--mount").map_err(store)?;
        let readable = self.readable();
        let source = CopySource::Context {
            dir: &self.spec.context,
            tree,
            excludes: &excludes,
            readable: readable.as_ref(),
        };
        let empty = RootView::new(Vec::new());
        std::fs::create_dir_all(dir).map_err(io("creating the bind mount's directory", dir))?;
        copy::plan(&spec, source, &empty)
            .and_then(|plan| plan.apply(&spec, &empty, dir, self.engine.as_root))
            .map_err(store)?;
        Ok(dir.join("bound"))
    }

    /// The state a bind mount's `from` names: a stage of the build, or an image, among the
    /// inputs the planner gave `node`.
    fn bound_state(
        &self,
        node: NodeIndex,
        from: &str,
        inputs: &HashMap<NodeIndex, Arc<State>>,
    ) -> Result<Arc<State>, BuildError> {
        let stage = self
            .graph
            .stages()
            .iter()
            .find(|s| {
                s.name.as_deref() == Some(from.to_lowercase().as_str())
                    || s.index.to_string() == from
            })
            .map(|s| s.node);
        let image = || {
            keys::other_inputs(&self.graph, node)
                .into_iter()
                .find(|n| self.graph.node(*n).image.as_deref() == Some(from))
        };
        stage
            .or_else(image)
            .and_then(|n| inputs.get(&n).cloned())
            .ok_or_else(|| {
                store(StepMountError::NoSuchInput {
                    from: from.to_owned(),
                })
            })
    }

    fn cache(&self, mount: &RunMount, work: &Work) -> Result<CacheMount, BuildError> {
        let owner = CacheOwner {
            uid: mount.uid.unwrap_or(0),
            gid: mount.gid.unwrap_or(0),
            mode: mount.mode.unwrap_or(0o755),
        };
        let sharing = match mount.sharing {
            frontend::Sharing::Shared => Sharing::Shared,
            frontend::Sharing::Private => Sharing::Private,
            frontend::Sharing::Locked => Sharing::Locked,
        };
        self.engine
            .store
            .cache_mount(&mount.id, sharing, owner, work.cancel_flag())
            .map_err(store)?
            .ok_or(BuildError::Cancelled)
    }
}

/// A secret's file: mode 0400 and root's unless the mount says otherwise.
fn write_private(file: &Path, value: &[u8], mount: &RunMount) -> std::io::Result<()> {
    std::fs::write(file, value)?;
    std::fs::set_permissions(
        file,
        std::fs::Permissions::from_mode(mount.mode.unwrap_or(0o400)),
    )?;
    std::os::unix::fs::chown(
        file,
        Some(mount.uid.unwrap_or(0)),
        Some(mount.gid.unwrap_or(0)),
    )
}

/// The mount targets the image lacks, with their missing parents, relative to the root and
/// deepest first: what the runtime creates only to mount over.
pub(super) fn absent_paths(view: &RootView, targets: impl Iterator<Item = String>) -> Vec<String> {
    let mut absent: Vec<String> = Vec::new();
    for target in targets {
        let mut path = PathBuf::from(crate::context::dockerignore::clean(&target));
        while path.parent().is_some() && view.lookup(&path).is_none() {
            if let Ok(relative) = path.strip_prefix("/") {
                absent.push(relative.to_string_lossy().into_owned());
            }
            path.pop();
        }
    }
    absent.sort();
    absent.dedup();
    absent.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    absent
}
