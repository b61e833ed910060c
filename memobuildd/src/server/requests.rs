//! Request handlers: protocol request in, protocol response out. Engine errors become
//! protocol error codes here and nowhere else ([`HandlerError::code`]).

use std::path::{Path, PathBuf};

use memobuild_protocol::{
    DockerfileSource, DumpDockerfileRequest, ErrorCode, GraphNodeView, GraphRequest, GraphView,
    Response, StageView,
};

use super::access::Peer;
use crate::context::ContextError;
use crate::frontend::{self, Diagnostic};
use crate::plan::{self, BuildGraph, PlanError, PlanOptions};

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandlerError {
    #[error("{0}")]
    Dockerfile(#[from] Diagnostic),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("uid {uid} may not read {}", path.display())]
    Unreadable { uid: u32, path: PathBuf },
    #[error("{0}")]
    Invalid(String),
    #[error("`{0}` is not implemented by this daemon yet")]
    NotImplemented(&'static str),
}

impl HandlerError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Dockerfile(_) | Self::Plan(_) | Self::Invalid(_) => ErrorCode::InvalidInput,
            Self::Context(ContextError::Io { source, .. }) | Self::Read { source, .. } => {
                io_code(source)
            }
            Self::Context(ContextError::Database { .. }) => ErrorCode::Internal,
            Self::Context(_) => ErrorCode::InvalidInput,
            Self::Unreadable { .. } => ErrorCode::PermissionDenied,
            Self::NotImplemented(_) => ErrorCode::NotImplemented,
        }
    }

    pub(crate) fn into_response(self) -> Response {
        Response::error(self.code(), self.to_string())
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
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl DockerfileText {
    pub(crate) fn read(source: &DockerfileSource, peer: Peer) -> Result<Self, HandlerError> {
        let context = absolute(&source.context)?;
        let path = match &source.dockerfile {
            Some(path) => absolute(path)?,
            None => context.join("Dockerfile"),
        };
        peer.check_readable(&context)?;
        let text = read_as(peer, &path)?;
        Ok(Self { path, text })
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
        Err(HandlerError::Invalid(format!(
            "path {} must be absolute (the client resolves it)",
            path.display()
        )))
    }
}

fn read_as(peer: Peer, path: &Path) -> Result<String, HandlerError> {
    peer.check_readable(path)?;
    std::fs::read_to_string(path).map_err(|source| HandlerError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn graph(request: &GraphRequest, peer: Peer) -> Result<Response, HandlerError> {
    let dockerfile = DockerfileText::read(&request.source, peer)?;
    let graph = dockerfile.plan(&PlanOptions {
        target: request.target.clone(),
        build_args: request.build_args.clone(),
    })?;
    Ok(Response::Graph(graph_view(&graph)))
}

pub(crate) fn dump_dockerfile(
    request: &DumpDockerfileRequest,
    peer: Peer,
) -> Result<Response, HandlerError> {
    let path = absolute(&request.path)?;
    let text = read_as(peer, &path)?;
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
