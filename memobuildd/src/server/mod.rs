//! The local-socket server: the daemon's front door and the last stage of the data flow.
//!
//! [`run`] claims the state root and the socket ([`listener`]), announces readiness
//! (`sd_notify` READY=1, which is also how `memobuild` learns that a daemon it spawned is up),
//! then serves each connection on its own task ([`connection`]) until SIGTERM, SIGINT or a
//! `Shutdown` request. Shutdown stops accepting, removes the socket, gives in-flight requests
//! [`Config::shutdown_grace`] to finish, cancels the rest, releases the root and returns.
//!
//! Only this module converts between engine types and `memobuild_protocol` messages.

mod access;
mod build;
mod connection;
mod events;
mod gc;
mod listener;
mod prebuild;
mod requests;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memobuild_protocol::{
    PACKAGE_VERSION, PROTOCOL_VERSION, RemoteCacheMode, RemoteCacheStatus, StatusReport,
};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::cache::remote::{L3, RemoteError, RemoteMode, RemoteOptions, RemoteStatus, StoreLayers};
use crate::config::Config;
use crate::engine::{Engine, EngineOptions, EngineParts};
use crate::exec::{ExecError, Executor, Runc};
use crate::layout::Layout;
use crate::passwd;
use crate::registry::{Registry, RegistryOptions};
use crate::snapshot::Overlay;
use crate::store::{Store, StoreOptions};
use crate::watch::{Change, Hub, WatchError, WatcherId};
use access::AccessPolicy;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("state root {root}: {source}")]
    Root {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state root {root} is in use by another memobuildd (pid {holder}); two daemons never share a root"
    )]
    RootInUse { root: PathBuf, holder: String },
    #[error("socket {socket}: {source}")]
    Socket {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another memobuildd is already serving on {socket}; stop it first (`memobuild daemon stop`)"
    )]
    SocketInUse { socket: PathBuf },
    #[error("socket activation: {0}")]
    Activation(#[source] std::io::Error),
    #[error("socket group {0:?} does not exist in /etc/group")]
    UnknownGroup(String),
    #[error("remote cache {endpoint}: {source}")]
    RemoteCache {
        endpoint: String,
        #[source]
        source: RemoteError,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("opening the build store under {root}: {source}")]
    Store {
        root: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("setting up the registry client: {0}")]
    Registry(#[source] crate::registry::RegistryError),
}

/// How long a shutdown waits for cancelled builds before it says so in the log (it waits on).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// State every connection sees.
#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    access: AccessPolicy,
    started: Instant,
    socket_activated: bool,
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    requests_total: AtomicU64,
    shutdown: watch::Sender<bool>,
    hub: Arc<Hub>,
    engine: Arc<Engine>,
    builds: build::RunningBuilds,
    /// Request bytes being received now, over all connections (`connection::RECEIVING_BYTES`).
    receiving: tokio::sync::Semaphore,
    prebuilds: Arc<prebuild::Prebuilds>,
    /// Connections that asked for the shutdown: kept open until the process exits, so their
    /// end of the socket closing means "the daemon is gone and its root is free".
    held_until_exit: Mutex<Vec<UnixStream>>,
}

impl Shared {
    fn request_shutdown(&self, why: &str) {
        if !*self.shutdown.borrow() {
            info!(why, "shutting down");
            self.shutdown.send_replace(true);
        }
    }

    fn status(&self) -> StatusReport {
        let builds = self.builds.list();
        StatusReport {
            daemon_version: PACKAGE_VERSION.to_owned(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            uid: passwd::effective_uid(),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            root: self.config.root.clone(),
            socket: self.config.socket.clone(),
            socket_activated: self.socket_activated,
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            builds_active: builds.len() as u64,
            workspaces: self
                .hub
                .reports()
                .iter()
                .map(|report| {
                    requests::workspace_status(report, self.prebuilds.status(&report.context))
                })
                .collect(),
            cache: gc::cache_stats(&self.engine),
            builds,
            remote: self
                .engine
                .remote()
                .map(|l3| Box::new(remote_status(&l3.status()))),
        }
    }
}

/// The remote cache's figures as `status` shows them.
fn remote_status(status: &RemoteStatus) -> RemoteCacheStatus {
    RemoteCacheStatus {
        endpoint: status.endpoint.clone(),
        mode: match status.mode {
            RemoteMode::ReadWrite => RemoteCacheMode::ReadWrite,
            RemoteMode::ReadOnly => RemoteCacheMode::ReadOnly,
            RemoteMode::Off => RemoteCacheMode::Off,
        },
        healthy: status.healthy,
        last_error: status.last_error.clone(),
        hits: status.hits,
        misses: status.misses,
        bad_signatures: status.bad_signatures,
        corrupt_blobs: status.corrupt_blobs,
        errors: status.errors,
        bytes_down: status.bytes_down,
        bytes_up: status.bytes_up,
        upload_queue: status.upload_queue,
        upload_queue_bytes: status.upload_queue_bytes,
        uploads_done: status.uploads_done,
        uploads_failed: status.uploads_failed,
        uploads_dropped: status.uploads_dropped,
    }
}

/// A build's `--remote-cache` as the engine takes it.
fn remote_mode(mode: RemoteCacheMode) -> RemoteMode {
    match mode {
        RemoteCacheMode::ReadWrite => RemoteMode::ReadWrite,
        RemoteCacheMode::ReadOnly => RemoteMode::ReadOnly,
        RemoteCacheMode::Off => RemoteMode::Off,
    }
}

/// Runs the daemon until it is told to stop. Returns once the socket is removed and the
/// root released.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let layout = Layout::new(&config.root);
    let root_lock = listener::lock_root(&layout)?;
    let group = match &config.socket_group {
        Some(name) => {
            let groups = passwd::read_database("/etc/group".as_ref()).unwrap_or_default();
            Some(
                passwd::find_group(&groups, name)
                    .ok_or_else(|| ServerError::UnknownGroup(name.clone()))?,
            )
        }
        None => None,
    };
    let access = AccessPolicy::new(passwd::effective_uid(), group);
    let listening = listener::listen(&config.socket, access.group())?;
    let (changes, changes_seen) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub::open(
        &layout,
        crate::watch::platform_watchers(changes),
    )?);
    let engine = Arc::new(open_engine(&config, &layout, Arc::clone(&hub))?);
    // Whatever a daemon killed mid-build left (mounts, containers, scratch) goes first;
    // then GC's start pass collects what it left in the store.
    engine.recover();
    engine.store().start_gc();
    let prebuilds = Arc::new(prebuild::Prebuilds::new(
        prebuild::PrebuildOptions {
            default_on: config.prebuild,
            debounce: config.prebuild_debounce,
            max_running: config.prebuild_max,
        },
        Arc::clone(&engine),
        Arc::clone(&hub),
    ));
    let (shutdown, mut shutdown_seen) = watch::channel(false);
    let shared = Arc::new(Shared {
        access,
        started: Instant::now(),
        socket_activated: listening.activated(),
        connections_active: AtomicU64::new(0),
        connections_total: AtomicU64::new(0),
        requests_total: AtomicU64::new(0),
        shutdown,
        hub: Arc::clone(&hub),
        engine,
        builds: build::RunningBuilds::default(),
        receiving: tokio::sync::Semaphore::new(connection::RECEIVING_BYTES),
        prebuilds: Arc::clone(&prebuilds),
        held_until_exit: Mutex::new(Vec::new()),
        config,
    });
    spawn_signal_listener(Arc::clone(&shared))?;

    info!(
        socket = %shared.config.socket.display(),
        root = %shared.config.root.display(),
        activated = shared.socket_activated,
        pid = std::process::id(),
        "memobuildd {PACKAGE_VERSION} ready"
    );
    // Not under systemd and not spawned by the client, NOTIFY_SOCKET is unset and this is a no-op.
    if let Err(err) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {}", shared.config.socket.display())),
    ]) {
        warn!(%err, "could not send readiness notification");
    }

    tokio::spawn(follow_changes(Arc::clone(&hub), prebuilds, changes_seen));
    // Workspaces watched before a restart come back in the background; status shows them as
    // they are ready.
    let restoring = Arc::clone(&hub);
    tokio::task::spawn_blocking(move || restoring.restore());

    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = shutdown_seen.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listening.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    connections.spawn(connection::serve(stream, Arc::clone(&shared), next_id));
                }
                // Running out of fds must not end the daemon; the client retries.
                Err(err) => warn!(%err, "accept failed"),
            },
        }
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drop(listening.listener);
    if let Some(path) = &listening.owned_path
        && let Err(err) = std::fs::remove_file(path)
    {
        warn!(socket = %path.display(), %err, "could not remove socket");
    }
    // Builds stop now (containers killed, mounts removed); other requests get the grace
    // period to finish.
    shared.engine.stop_builds();
    let grace = shared.config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            remaining = connections.len(),
            "in-flight requests did not finish within {grace:?}; cancelling them"
        );
        connections.shutdown().await;
    }
    // The root is not released while a step of this daemon still has a container or a
    // mount in it: a daemon started next on it would take them for a dead one's.
    if tokio::time::timeout(STOP_WAIT, shared.engine.idle())
        .await
        .is_err()
    {
        warn!("builds still stopping after {STOP_WAIT:?}; waiting for them");
        shared.engine.idle().await;
    }
    // Results built before the stop still reach the shared cache, within the grace.
    if let Some(l3) = shared.engine.remote() {
        let pending = l3.status().upload_queue;
        if pending > 0 {
            info!(pending, "uploading to the remote cache before stopping");
        }
        l3.flush(grace).await;
    }
    drop(root_lock);
    info!("stopped");
    // Dropped last: the requesters of the shutdown see end-of-stream only now.
    shared.held_until_exit.lock().await.clear();
    Ok(())
}

fn open_engine(config: &Config, layout: &Layout, hub: Arc<Hub>) -> Result<Engine, ServerError> {
    let opened = Store::open(
        layout,
        StoreOptions {
            keep_bytes: config.gc_keep_bytes,
            keep_duration: config.gc_keep_duration,
            ..StoreOptions::default()
        },
    )
    .map_err(|source| ServerError::Store {
        root: layout.root().to_owned(),
        source,
    })?;
    let executor: Result<Arc<dyn Executor>, Arc<ExecError>> = if passwd::effective_uid() != 0 {
        Err(Arc::new(ExecError::NotRoot))
    } else {
        Runc::find(layout.run_dir().join("runc"))
            .map(|runc| Arc::new(runc) as Arc<dyn Executor>)
            .map_err(Arc::new)
    };
    if let Err(why) = &executor {
        warn!(%why, "RUN steps are unavailable");
    }
    let registry = Registry::new(RegistryOptions {
        insecure: config.insecure_registries.clone(),
        extra_ca: config.registry_ca_file.clone(),
        docker_config: None,
    })
    .map_err(ServerError::Registry)?;
    let remote = match &config.remote_cache {
        Some(settings) => L3::connect(
            settings,
            RemoteOptions::default(),
            Arc::new(StoreLayers(opened.clone())),
        )
        .map_err(|source| ServerError::RemoteCache {
            endpoint: settings.endpoint.display(),
            source,
        })?,
        None => None,
    };
    if let Some(l3) = &remote {
        info!(remote = %l3.status().endpoint, mode = ?l3.status().mode, "remote cache");
    }
    Ok(Engine::new(EngineParts {
        layout: layout.clone(),
        snapshotter: Arc::new(Overlay::new(opened.layers_dir())),
        store: opened,
        executor,
        registry,
        hub,
        options: EngineOptions {
            max_parallel: config.max_parallel_steps,
            copy_chunk_bytes: config.copy_chunk_bytes,
            ..EngineOptions::default()
        },
        remote,
    }))
}

/// Applies what the watchers report, as it comes, and starts the prebuilds the changes call
/// for. A burst that queued up while the previous batch was applied is taken in one pass, so
/// an editor's save costs one re-hash.
async fn follow_changes(
    hub: Arc<Hub>,
    prebuilds: Arc<prebuild::Prebuilds>,
    mut changes: mpsc::UnboundedReceiver<Change>,
) {
    while let Some(first) = changes.recv().await {
        // Kept per watcher, in order: a cookie proves only what its own watcher delivered.
        let mut batches: Vec<(WatcherId, Vec<PathBuf>)> = Vec::new();
        let mut rescans: Vec<WatcherId> = Vec::new();
        let queued = std::iter::from_fn(|| changes.try_recv().ok());
        for change in std::iter::once(first).chain(queued) {
            match change {
                Change::Paths { watcher, paths } => {
                    match batches.iter_mut().find(|b| b.0 == watcher) {
                        Some((_, batch)) => batch.extend(paths),
                        None => batches.push((watcher, paths)),
                    }
                }
                Change::Rescan { watcher } => rescans.push(watcher),
            }
        }
        let worker = Arc::clone(&hub);
        let count: usize = batches.iter().map(|(_, paths)| paths.len()).sum();
        let started = std::time::Instant::now();
        let applied = tokio::task::spawn_blocking(move || {
            let mut dirtied = 0;
            let mut changed = Vec::new();
            for watcher in rescans {
                let outcome = worker.rescan(Some(watcher));
                dirtied += outcome.dirtied;
                changed.extend(outcome.changed);
            }
            let all: Vec<PathBuf> = batches
                .iter()
                .flat_map(|(_, p)| p.iter().cloned())
                .collect();
            let outcome = worker.changed(&all);
            dirtied += outcome.dirtied;
            changed.extend(outcome.changed);
            // Builds waiting on a cookie of this batch may go now: all before it is applied.
            for (watcher, paths) in &batches {
                worker.cookies().applied(*watcher, paths);
            }
            (dirtied, changed)
        })
        .await;
        tracing::debug!(paths = count, elapsed = ?started.elapsed(), "applied changes");
        match applied {
            Ok((dirtied, changed)) => {
                if dirtied > 0 {
                    info!(dirtied, "workspace changed");
                }
                prebuilds.changed(&changed);
            }
            Err(err) => warn!(%err, "applying changes failed"),
        }
    }
}

fn spawn_signal_listener(shared: Arc<Shared>) -> Result<(), ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;
    tokio::spawn(async move {
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        shared.request_shutdown(why);
    });
    Ok(())
}
