//! Request handlers: protocol request in, protocol response out. Engine errors become
//! protocol error codes here and nowhere else ([`HandlerError::code`]).

use std::path::{Path, PathBuf};

use std::sync::Arc;

use memobuild_protocol::{
    DirtyNode, DockerfileSource, DumpDockerfileRequest, ErrorCode, GraphNodeView, GraphRequest,
    GraphView, NotifyReport, NotifyRequest, PrebuildLogRequest, PrebuildStatus, Response,
    StageView, UnwatchRequest, WatchRequest, WorkspaceStatus,
};

use super::prebuild::Prebuilds;
use crate::caller::{AccessError, Caller};
use crate::context::ContextError;
use crate::frontend::{self, Diagnostic};
use crate::plan::{self, BuildGraph, PlanError, PlanOptions};
use crate::watch::{Hub, WatchError, WorkspaceReport};

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("{0}")]
    Dockerfile(#[from] Diagnostic),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Unreadable(#[from] AccessError),
    #[error("path {} must be absolute (the client resolves it)", .0.display())]
    Relative(PathBuf),
    #[error("internal task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("no prebuild of {} ran since the daemon started", .0.display())]
    NoPrebuild(PathBuf),
}

impl HandlerError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Dockerfile(_) | Self::Plan(_) | Self::Relative(_) => ErrorCode::InvalidInput,
            Self::Task(_) => ErrorCode::Internal,
            Self::Context(ContextError::Io { source, .. }) | Self::Read { source, .. } => {
                io_code(source)
            }
            Self::Context(ContextError::Database { .. }) => ErrorCode::Internal,
            Self::Context(_) => ErrorCode::InvalidInput,
            Self::Unreadable(_) => ErrorCode::PermissionDenied,
            Self::Watch(err) => watch_code(err),
            Self::NoPrebuild(_) => ErrorCode::NotFound,
        }
    }

    pub(crate) fn into_response(self) -> Response {
        Response::error(self.code(), self.to_string())
    }
}

pub(crate) fn watch_code(err: &WatchError) -> ErrorCode {
    match err {
        WatchError::NotWatched(_) | WatchError::ContextGone(_) => ErrorCode::NotFound,
        WatchError::Dockerfile(_)
        | WatchError::Plan(_)
        | WatchError::Ignore(_)
        | WatchError::Pattern { .. } => ErrorCode::InvalidInput,
        WatchError::Read { source, .. } => io_code(source),
        WatchError::WatchLimit => ErrorCode::ResourceExhausted,
        WatchError::Context(ContextError::Io { source, .. }) => io_code(source),
        _ => ErrorCode::Internal,
    }
}

fn io_code(err: &std::io::Error) -> ErrorCode {
    match err.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        std::io::ErrorKind::StorageFull => ErrorCode::ResourceExhausted,
        _ => ErrorCode::Internal,
    }
}

/// A Dockerfile named by a request, resolved, checked readable by the peer, and read.
#[derive(Debug)]
pub(crate) struct DockerfileText {
    pub(crate) context: PathBuf,
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl DockerfileText {
    pub(crate) fn read(source: &DockerfileSource, caller: &Caller) -> Result<Self, HandlerError> {
        let context = absolute(&source.context)?;
        let path = match &source.dockerfile {
            Some(path) => absolute(path)?,
            None => context.join("Dockerfile"),
        };
        caller.may_read(&context)?;
        let text = read_as(caller, &path)?;
        // The scan reads the ignore files too; they must be the caller's to read.
        for ignore in crate::context::ignore_files(&context, &path) {
            caller.may_read(&ignore)?;
        }
        Ok(Self {
            context,
            path,
            text,
        })
    }

    pub(crate) fn plan(&self, options: &PlanOptions) -> Result<BuildGraph, HandlerError> {
        let dockerfile = frontend::parse(&self.text, &self.path.display().to_string())?;
        Ok(plan::lower(&dockerfile, options)?)
    }
}

fn absolute(path: &Path) -> Result<PathBuf, HandlerError> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Err(HandlerError::Relative(path.to_owned()))
    }
}

fn read_as(caller: &Caller, path: &Path) -> Result<String, HandlerError> {
    caller.may_read(path)?;
    std::fs::read_to_string(path).map_err(|source| HandlerError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn graph(request: &GraphRequest, caller: &Caller) -> Result<Response, HandlerError> {
    let dockerfile = DockerfileText::read(&request.source, caller)?;
    let graph = dockerfile.plan(&PlanOptions {
        target: request.target.clone(),
        build_args: request.build_args.clone(),
    })?;
    Ok(Response::Graph(graph_view(&graph)))
}

pub(crate) fn dump_dockerfile(
    request: &DumpDockerfileRequest,
    caller: &Caller,
) -> Result<Response, HandlerError> {
    let path = absolute(&request.path)?;
    let text = read_as(caller, &path)?;
    let dump = frontend::dump(&text).map_err(|mut diagnostic| {
        diagnostic.file = path.display().to_string();
        diagnostic
    })?;
    Ok(Response::Dockerfile(dump))
}

fn graph_view(graph: &BuildGraph) -> GraphView {
    GraphView {
        stages: graph
            .stages()
            .iter()
            .map(|stage| StageView {
                index: stage.index,
                name: stage.name.clone(),
                base: stage.base.to_string(),
            })
            .collect(),
        nodes: graph
            .nodes()
            .map(|(id, node)| GraphNodeView {
                id,
                kind: node.kind.as_str().to_owned(),
                stage: node.stage,
                label: node.label.clone(),
                line: node.first_line(),
            })
            .collect(),
        edges: graph.edges().collect(),
    }
}

pub(crate) async fn watch(
    hub: &Arc<Hub>,
    prebuilds: &Arc<Prebuilds>,
    request: WatchRequest,
    caller: &Caller,
) -> Result<Response, HandlerError> {
    // Parse first: a Dockerfile that does not plan is refused before anything is watched.
    let dockerfile = DockerfileText::read(&request.source, caller)?;
    dockerfile.plan(&PlanOptions::default())?;
    let context = dockerfile.context.clone();
    let worker = Arc::clone(hub);
    let report = blocking(move || {
        let report = worker.watch(&dockerfile.context, &dockerfile.path)?;
        if let Some(on) = request.prebuild {
            worker.set_prebuild(&dockerfile.context, Some(on))?;
        }
        Ok::<_, WatchError>(report)
    })
    .await??;
    if request.prebuild.is_some() {
        prebuilds.setting_changed(&context, !report.dirty.is_empty());
    }
    Ok(Response::Watched(workspace_status(
        &report,
        prebuilds.status(&context),
    )))
}

pub(crate) async fn unwatch(
    hub: &Arc<Hub>,
    prebuilds: &Prebuilds,
    request: UnwatchRequest,
) -> Result<Response, HandlerError> {
    let context = absolute(&request.context)?;
    let hub = Arc::clone(hub);
    let forgotten = context.clone();
    blocking(move || hub.unwatch(&context)).await??;
    prebuilds.forget(&forgotten);
    Ok(Response::Unwatched)
}

pub(crate) async fn notify(
    hub: &Arc<Hub>,
    prebuilds: &Arc<Prebuilds>,
    request: NotifyRequest,
    caller: &Caller,
) -> Result<Response, HandlerError> {
    for path in &request.paths {
        absolute(path)?;
        // A path that is gone (a deleted file) is the caller's to report if its directory is.
        let seen = if path.symlink_metadata().is_ok() {
            path.as_path()
        } else {
            path.parent().unwrap_or(path)
        };
        caller.may_read(seen)?;
    }
    let hub = Arc::clone(hub);
    let outcome = blocking(move || hub.changed(&request.paths)).await?;
    prebuilds.changed(&outcome.changed);
    Ok(Response::Notified(NotifyReport {
        matched: outcome.matched,
        dirtied: outcome.dirtied,
    }))
}

/// Runs blocking engine work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HandlerError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(HandlerError::Task)
}

/// `memobuild logs --prebuild`: for a peer who may read the context.
pub(crate) fn prebuild_log(
    prebuilds: &Prebuilds,
    request: &PrebuildLogRequest,
    caller: &Caller,
) -> Result<Response, HandlerError> {
    let context = absolute(&request.context)?;
    caller.may_read(&context)?;
    let log = prebuilds
        .log(&context)
        .ok_or(HandlerError::NoPrebuild(context))?;
    Ok(Response::PrebuildLog(log))
}

pub(crate) fn workspace_status(
    report: &WorkspaceReport,
    prebuild: PrebuildStatus,
) -> WorkspaceStatus {
    WorkspaceStatus {
        context: report.context.clone(),
        dockerfile: report.dockerfile.clone(),
        files: report.files,
        bytes: report.bytes,
        last_change_unix_ms: report.last_change.and_then(|t| {
            let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            u64::try_from(since.as_millis()).ok()
        }),
        watching: report.watching,
        degraded: report.degraded.clone(),
        built: report.built,
        hashed_files: report.hashed_files,
        dirty: report
            .dirty
            .iter()
            .map(|mark| DirtyNode {
                node: mark.label.clone(),
                cause: mark.cause.clone(),
            })
            .collect(),
        error: report.error.clone(),
        prebuild,
    }
}
