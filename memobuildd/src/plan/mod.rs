//! Build graph: a [`Dockerfile`](crate::frontend::Dockerfile) lowered to a DAG of steps.
//!
//! Owns stage resolution and `--target` pruning (`lower`), ARG/ENV scoping (`scope`) and
//! expansion (`expand`), and the node identities the cache keys are made from (`canonical`). The main type
//! is [`BuildGraph`], made by [`lower`]. Each [`Node`] carries its key material: the normalized
//! instruction after expansion, the context patterns it reads, the variables that reach it, its
//! parent in its stage chain and its Dockerfile lines. The next stages are `context` (which
//! fingerprints the patterns of the context-source nodes) and `engine` (which keys and runs the
//! nodes in [`BuildGraph::toposort`] order). No I/O happens here.
//!
//! Shape: each needed stage is a chain `base-image → step → … → stage`, where a stage built
//! `FROM <stage>` starts at that stage's `stage` node instead of a base image. A COPY/ADD from
//! the context has an edge from its `context-source` node, `COPY --from=<stage>` one from that
//! stage's `stage` node, `COPY --from=<image>` one from a `base-image` node; the target's
//! `stage` node feeds the single `export` node. Nothing else joins two stages.

mod canonical;
mod expand;
mod lower;
pub(crate) mod scope;
mod support;

use petgraph::graph::DiGraph;

use crate::frontend::{Diagnostic, InstructionKind};

pub use lower::{BaseEnv, BaseInfo, bind_context_source, lower, lower_with_base_env};
/// Node handles, re-exported so callers need not depend on petgraph to hold one.
pub use petgraph::graph::NodeIndex;

/// Docker's PATH for images that set none; `FROM scratch` starts with it (BuildKit).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// The stage to build (case-insensitive); the last stage when `None`.
    pub target: Option<String>,
    /// `--build-arg` values, later ones winning.
    pub build_args: Vec<(String, String)>,
}

/// Why a Dockerfile cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A problem at a Dockerfile position: expansion, stage reference, bad value.
    #[error(transparent)]
    Dockerfile(#[from] Diagnostic),
    #[error("target stage {target:?} could not be found")]
    UnknownTarget { target: String },
    /// Only possible for a [`Dockerfile`](crate::frontend::Dockerfile) whose stages were removed
    /// after parsing.
    #[error("the Dockerfile has no stages")]
    NoStages,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// `FROM image`, `FROM scratch`, or the image of `COPY --from=image`.
    BaseImage,
    /// The context files one COPY/ADD reads.
    ContextSource,
    /// A step that makes a layer: RUN, COPY, ADD, WORKDIR.
    Filesystem,
    /// A step that only changes the image config.
    Metadata,
    /// The result of a stage: its last step.
    Stage,
    /// The image the build hands out.
    Export,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::BaseImage => "base-image",
            NodeKind::ContextSource => "context-source",
            NodeKind::Filesystem => "filesystem",
            NodeKind::Metadata => "metadata",
            NodeKind::Stage => "stage",
            NodeKind::Export => "export",
        }
    }
}

/// One node of the graph with everything its cache key needs besides its parents' keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// The stage whose chain holds the node; `None` for export and `COPY --from` images.
    pub stage: Option<u32>,
    /// Short and human: `RUN make`, `COPY src/ /app/`.
    pub label: String,
    /// The canonical instruction after ARG/ENV expansion; equal strings mean equal steps.
    pub instruction: String,
    /// The instruction itself after expansion, for steps; what the engine executes. For ARG,
    /// each `default` holds the value in effect (build arg, default or global value).
    pub step: Option<InstructionKind>,
    /// The source patterns read (context patterns for context sources, COPY/ADD sources).
    pub sources: Vec<String>,
    /// `--exclude` patterns of a context source.
    pub excludes: Vec<String>,
    /// The `name=value` pairs that reach the node, sorted: all of them for RUN, the ones its
    /// expansion used otherwise.
    pub env: Vec<(String, String)>,
    /// First and last Dockerfile line.
    pub lines: Option<(u32, u32)>,
    /// The previous node of the stage chain.
    pub parent: Option<NodeIndex>,
    /// For a base-image node: the image reference after expansion (`None`: scratch).
    pub image: Option<String>,
}

impl Node {
    pub fn first_line(&self) -> Option<u32> {
        self.lines.map(|(first, _)| first)
    }
}

/// Where a stage starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// An image reference after expansion.
    Image(String),
    /// An earlier stage, by index.
    Stage(u32),
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Base::Scratch => f.write_str("scratch"),
            Base::Image(image) => write!(f, "image {image}"),
            Base::Stage(index) => write!(f, "stage {index}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    pub index: u32,
    pub name: Option<String>,
    pub base: Base,
    pub platform: Option<String>,
    /// The stage's `stage` node.
    pub node: NodeIndex,
}

/// The lowered Dockerfile: the needed stages only.
#[derive(Debug, Clone)]
pub struct BuildGraph {
    graph: DiGraph<Node, ()>,
    stages: Vec<StageInfo>,
    export: NodeIndex,
}

impl BuildGraph {
    /// The stages the target needs, in Dockerfile order.
    pub fn stages(&self) -> &[StageInfo] {
        &self.stages
    }

    pub fn node(&self, index: NodeIndex) -> &Node {
        &self.graph[index]
    }

    /// Every node with its index.
    pub fn nodes(&self) -> impl Iterator<Item = (u32, &Node)> {
        self.graph
            .node_indices()
            .map(|i| (i.index() as u32, &self.graph[i]))
    }

    /// Every edge as (from, to): `to` needs `from`.
    pub fn edges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.graph
            .raw_edges()
            .iter()
            .map(|e| (e.source().index() as u32, e.target().index() as u32))
    }

    /// A dependency order: every node after all its parents.
    pub fn toposort(&self) -> Vec<NodeIndex> {
        // Lowering only ever adds edges into the node it just created, so creation order is
        // already topological (checked against petgraph's toposort in the tests).
        self.graph.node_indices().collect()
    }

    pub fn export(&self) -> NodeIndex {
        self.export
    }

    pub fn graph(&self) -> &DiGraph<Node, ()> {
        &self.graph
    }
}

#[cfg(test)]
mod tests;
