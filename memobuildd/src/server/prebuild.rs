//! Prebuild on save: a watched workspace with prebuild on repeats its last build (the hub's
//! [`BuildRecipe`]) once a change settles, so the image is ready before anyone asks for it.
//!
//! The main type is [`Prebuilds`]. The change loop (and `notify`) calls
//! [`Prebuilds::changed`] with the workspaces where something a build reads changed; each gets
//! a driver task of its own that waits for the changes to settle (`prebuild_debounce`), for
//! its turn under the global limit (`prebuild_max`), then builds through the engine like a
//! user's build but as `background`: into the cache and the image store only (its tags, no
//! `-o` outputs, no push), its steps behind users' steps, its containers at low priority. A
//! newer change cancels the running prebuild at once (its containers killed; what it finished
//! stays cached) and the driver starts over. A user's build that needs the same steps joins
//! them through the engine's shared work (`engine::flight`), so nothing runs twice.
//!
//! What `status` shows per workspace and the log `memobuild logs --prebuild` prints live here.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use memobuild_protocol::{DockerfileSource, PrebuildStatus};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info, info_span};

use super::requests::{DockerfileText, HandlerError};
use crate::caller::Caller;
use crate::engine::{BuildError, BuildSpec, Built, Engine, Progress, Reporter, Secrets};
use crate::exec::{LogStream, Network};
use crate::store::blocking;
use crate::watch::{BuildRecipe, Hub};

/// Lines of a prebuild's log kept for `memobuild logs --prebuild`.
const LOG_LINES: usize = 10_000;
/// Lines of the log a failed prebuild shows in `status`.
const STATUS_TAIL: usize = 10;

#[derive(Debug, Clone)]
pub(crate) struct PrebuildOptions {
    /// Prebuild every watched workspace unless it was turned off (`prebuild = true`).
    pub(crate) default_on: bool,
    /// Quiet time after the last change before a prebuild starts.
    pub(crate) debounce: Duration,
    /// Prebuilds running at once, across workspaces.
    pub(crate) max_running: usize,
}

#[derive(Debug)]
pub(crate) struct Prebuilds {
    options: PrebuildOptions,
    running: Arc<Semaphore>,
    engine: Arc<Engine>,
    hub: Arc<Hub>,
    drivers: Mutex<HashMap<PathBuf, Arc<Driver>>>,
}

/// One workspace's prebuilds: the changes its task waits on, and what status shows.
#[derive(Debug)]
struct Driver {
    /// Bumped by every change and setting change; the task watches it, and ends (cancelling
    /// a running prebuild) when this is dropped with the driver.
    changes: watch::Sender<u64>,
    state: Arc<Progressing>,
}

/// What the driver's task and its prebuilds report, and status reads.
#[derive(Debug, Default)]
struct Progressing(Mutex<DriverState>);

#[derive(Debug, Default)]
struct DriverState {
    phase: Phase,
    /// The last (or running) prebuild's log.
    log: VecDeque<String>,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Idle,
    Waiting,
    Running {
        names: HashMap<u32, String>,
        current: Option<u32>,
        done: u64,
    },
    Ready {
        digest: String,
        finished: SystemTime,
    },
    Failed {
        step: Option<String>,
        exit_code: Option<i32>,
        message: String,
        finished: SystemTime,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Progressing {
    fn state(&self) -> MutexGuard<'_, DriverState> {
        lock(&self.0)
    }

    fn set_phase(&self, phase: Phase) {
        self.state().phase = phase;
    }

    fn log(&self, line: String) {
        let mut state = self.state();
        if state.log.len() == LOG_LINES {
            state.log.pop_front();
        }
        state.log.push_back(line);
    }

    fn status(&self) -> PrebuildStatus {
        let state = self.state();
        match &state.phase {
            Phase::Idle => PrebuildStatus::Idle,
            Phase::Waiting => PrebuildStatus::Waiting,
            Phase::Running {
                names,
                current,
                done,
            } => PrebuildStatus::Running {
                step: current.and_then(|node| names.get(&node).cloned()),
                steps_done: *done,
                steps_total: names.len() as u64,
            },
            Phase::Ready { digest, finished } => PrebuildStatus::Ready {
                digest: digest.clone(),
                finished_unix_ms: unix_ms(*finished),
            },
            Phase::Failed {
                step,
                exit_code,
                message,
                finished,
            } => PrebuildStatus::Failed {
                step: step.clone(),
                exit_code: *exit_code,
                message: message.clone(),
                log_tail: state
                    .log
                    .iter()
                    .skip(state.log.len().saturating_sub(STATUS_TAIL))
                    .cloned()
                    .collect(),
                finished_unix_ms: unix_ms(*finished),
            },
        }
    }
}

/// Follows a prebuild's progress into its driver: the step running, the steps done, the log.
struct DriverReporter(Arc<Progressing>);

impl Reporter for DriverReporter {
    fn report(&self, event: Progress) {
        let driver = &self.0;
        let mut state = driver.state();
        let Phase::Running {
            names,
            current,
            done,
        } = &mut state.phase
        else {
            return;
        };
        let line = match event {
            Progress::Queued { node, name } => {
                names.insert(node, name);
                None
            }
            Progress::Started { node } => {
                *current = Some(node);
                Some(format!(
                    "#{node} {}",
                    names.get(&node).map_or("", String::as_str)
                ))
            }
            Progress::Cached { node } => {
                *done += u64::from(names.contains_key(&node));
                Some(format!(
                    "#{node} {} CACHED",
                    names.get(&node).map_or("", String::as_str)
                ))
            }
            Progress::Done { node, duration } => {
                *done += 1;
                if *current == Some(node) {
                    *current = None;
                }
                Some(format!("#{node} DONE {:.1}s", duration.as_secs_f64()))
            }
            Progress::Log { node, stream, line } => {
                let stream = match stream {
                    LogStream::Stdout => "",
                    LogStream::Stderr => " (stderr)",
                };
                Some(format!(
                    "#{node}{stream} {}",
                    String::from_utf8_lossy(&line)
                ))
            }
            Progress::Failed { node, message } => Some(format!("#{node} ERROR: {message}")),
            Progress::Reason { node, reason } => Some(format!("#{node} REBUILD {reason}")),
            Progress::Warning { message } => Some(format!("WARNING: {message}")),
            Progress::Prebuilt { .. } => None,
        };
        drop(state);
        if let Some(line) = line {
            driver.log(line);
        }
    }
}

impl Prebuilds {
    pub(crate) fn new(options: PrebuildOptions, engine: Arc<Engine>, hub: Arc<Hub>) -> Self {
        Self {
            running: Arc::new(Semaphore::new(options.max_running.max(1))),
            options,
            engine,
            hub,
            drivers: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `context` prebuilds: on for it, or on by default and not turned off.
    fn enabled(&self, context: &Path) -> bool {
        self.hub
            .prebuild_setting(context)
            .is_some_and(|setting| setting.enabled.unwrap_or(self.options.default_on))
    }

    /// What a prebuild of `context` repeats, while it prebuilds.
    fn recipe(&self, context: &Path) -> Option<BuildRecipe> {
        let setting = self.hub.prebuild_setting(context)?;
        if setting.enabled.unwrap_or(self.options.default_on) {
            setting.recipe
        } else {
            None
        }
    }

    /// Something a build of these workspaces reads changed: (re)start their prebuilds.
    pub(crate) fn changed(self: &Arc<Self>, contexts: &[PathBuf]) {
        for context in contexts {
            if self.enabled(context) {
                self.kick(context);
            }
        }
    }

    /// Prebuild was turned on or off for `context`. Off stops a running prebuild; on
    /// prebuilds at once if the workspace differs from its last build.
    pub(crate) fn setting_changed(self: &Arc<Self>, context: &Path, dirty: bool) {
        let existing = lock(&self.drivers).get(context).cloned();
        match existing {
            Some(driver) => driver.changes.send_modify(|n| *n += 1),
            None if dirty && self.enabled(context) => self.kick(context),
            None => {}
        }
    }

    /// The workspace is no longer watched: its driver stops (cancelling a running prebuild).
    pub(crate) fn forget(&self, context: &Path) {
        lock(&self.drivers).remove(context);
    }

    fn kick(self: &Arc<Self>, context: &Path) {
        let mut drivers = lock(&self.drivers);
        let driver = drivers.entry(context.to_owned()).or_insert_with(|| {
            let (changes, seen) = watch::channel(0);
            let driver = Arc::new(Driver {
                changes,
                state: Arc::default(),
            });
            let task = Arc::clone(self).drive(context.to_owned(), Arc::clone(&driver.state), seen);
            tokio::spawn(task.instrument(info_span!("prebuild", context = %context.display())));
            driver
        });
        driver.changes.send_modify(|n| *n += 1);
    }

    /// A workspace's prebuild as `status` shows it.
    pub(crate) fn status(&self, context: &Path) -> PrebuildStatus {
        if !self.enabled(context) {
            return PrebuildStatus::Off;
        }
        match lock(&self.drivers).get(context) {
            Some(driver) => driver.state.status(),
            None => PrebuildStatus::Idle,
        }
    }

    /// The last (or running) prebuild's log; `None` if none ran since the daemon started.
    pub(crate) fn log(&self, context: &Path) -> Option<Vec<String>> {
        let driver = lock(&self.drivers).get(context).cloned()?;
        let state = driver.state.state();
        if matches!(state.phase, Phase::Idle | Phase::Waiting) && state.log.is_empty() {
            return None;
        }
        Some(state.log.iter().cloned().collect())
    }

    /// One workspace's driver: wait for a change, let it settle, take a turn, build; a
    /// change meanwhile cancels and starts over. Ends when the workspace is forgotten.
    async fn drive(
        self: Arc<Self>,
        context: PathBuf,
        driver: Arc<Progressing>,
        mut changes: watch::Receiver<u64>,
    ) {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
            'settle: loop {
                driver.set_phase(Phase::Waiting);
                loop {
                    match tokio::time::timeout(self.options.debounce, changes.changed()).await {
                        Err(_) => break,
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                    }
                }
                let Some(recipe) = self.recipe(&context) else {
                    driver.set_phase(Phase::Idle);
                    break 'settle;
                };
                let turn = tokio::select! {
                    turn = Arc::clone(&self.running).acquire_owned() => turn,
                    seen = changes.changed() => match seen {
                        Ok(()) => continue 'settle,
                        Err(_) => return,
                    },
                };
                let Ok(_turn) = turn else { return };
                let cancel = Arc::new(AtomicBool::new(false));
                let build = tokio::spawn(Arc::clone(&self).prebuild(
                    context.clone(),
                    recipe,
                    Arc::clone(&driver),
                    Arc::clone(&cancel),
                ));
                tokio::pin!(build);
                tokio::select! {
                    _ = &mut build => break 'settle,
                    seen = changes.changed() => {
                        info!("a newer change cancels the running prebuild");
                        cancel.store(true, Ordering::Relaxed);
                        // Its containers are gone and its mounts removed when it returns.
                        let _ = build.await;
                        match seen {
                            Ok(()) => continue 'settle,
                            Err(_) => return,
                        }
                    }
                }
            }
        }
    }

    /// Runs one prebuild to its end and records how it ended (a cancelled one records
    /// nothing: the driver goes on).
    async fn prebuild(
        self: Arc<Self>,
        context: PathBuf,
        recipe: BuildRecipe,
        driver: Arc<Progressing>,
        cancel: Arc<AtomicBool>,
    ) {
        {
            let mut state = driver.state();
            state.log.clear();
            state.phase = Phase::Running {
                names: HashMap::new(),
                current: None,
                done: 0,
            };
        }
        info!("prebuild starts");
        let outcome = self
            .build(&context, &recipe, Arc::clone(&driver), cancel)
            .await;
        let finished = SystemTime::now();
        let phase = match outcome {
            Ok(digest) => {
                info!(%digest, "prebuild ready");
                Phase::Ready { digest, finished }
            }
            Err(Failure::Cancelled) => return,
            Err(Failure::Build(err)) => {
                info!(%err, "prebuild failed");
                // A step run through flightcontrol fails as the shared work's error.
                let mut cause = &err;
                while let BuildError::Shared(shared) = cause {
                    cause = shared.as_ref();
                }
                let (step, exit_code) = match cause {
                    BuildError::RunFailed { step, code, .. } => (Some(step.clone()), Some(*code)),
                    BuildError::Step { step, .. } | BuildError::OutOfSpace { step, .. } => {
                        (Some(step.clone()), None)
                    }
                    _ => (None, None),
                };
                driver.log(format!("ERROR: {err}"));
                Phase::Failed {
                    step,
                    exit_code,
                    message: err.to_string(),
                    finished,
                }
            }
            Err(other) => {
                let message = other.to_string();
                driver.log(format!("ERROR: {message}"));
                Phase::Failed {
                    step: None,
                    exit_code: None,
                    message,
                    finished,
                }
            }
        };
        driver.set_phase(phase);
    }

    /// The build itself, as the user who asked for the recipe: their read access, their
    /// build arguments and tags; the image's digest.
    async fn build(
        &self,
        context: &Path,
        recipe: &BuildRecipe,
        driver: Arc<Progressing>,
        cancel: Arc<AtomicBool>,
    ) -> Result<String, Failure> {
        // The groups the user had are not kept with the recipe: a prebuild reads with the
        // user's own uid and primary gid only, never more than the user could.
        let caller = Caller {
            uid: recipe.uid,
            gid: recipe.gid,
            groups: Vec::new(),
        };
        let source = DockerfileSource {
            context: context.to_owned(),
            dockerfile: Some(recipe.dockerfile.clone()),
        };
        let dockerfile = DockerfileText::read(&source, &caller).map_err(Failure::Read)?;
        let spec = BuildSpec {
            context: dockerfile.context.clone(),
            dockerfile: dockerfile.path.clone(),
            dockerfile_text: dockerfile.text,
            build_args: recipe.build_args.clone(),
            target: recipe.target.clone(),
            no_cache: false,
            pull: false,
            network: if recipe.host_network {
                Network::Host
            } else {
                Network::None
            },
            source_date_epoch: recipe.source_date_epoch,
            secrets: Secrets::default(),
            ssh: Vec::new(),
            remote_cache: None,
            caller: (!caller.is_unrestricted()).then_some(caller),
            background: true,
        };
        self.hub.sync(context).await;
        let built = self
            .engine
            .build(spec, Arc::new(DriverReporter(driver)), cancel)
            .await
            .map_err(|err| match err {
                BuildError::Cancelled => Failure::Cancelled,
                other => Failure::Build(other),
            })?;
        let digest = built.image.manifest.digest.to_string();
        if let Some(baseline) = built.baseline.clone() {
            let (hub, context) = (Arc::clone(&self.hub), context.to_owned());
            let _ = blocking(move || hub.mark_built(&context, &baseline)).await;
        }
        let (engine, tags) = (Arc::clone(&self.engine), recipe.tags.clone());
        let tagged = blocking(move || tag_and_release(&engine, built, &tags)).await;
        tagged.map_err(Failure::Tag)?;
        Ok(digest)
    }
}

/// Tags the prebuilt image, then lets its lease go and the store check its budget. Blocking.
fn tag_and_release(engine: &Engine, built: Built, tags: &[String]) -> Result<(), String> {
    let tagged = super::build::tag(engine, &built, tags);
    drop(built);
    engine.store().check_budget();
    tagged
}

/// How a prebuild did not end with an image.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A newer change (or prebuild turned off) stopped it.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Build(BuildError),
    #[error(transparent)]
    Read(HandlerError),
    /// The store's message (`build::tag`).
    #[error("tagging the prebuilt image: {0}")]
    Tag(String),
}
