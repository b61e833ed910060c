//! Cache keys, computed as the build runs: a filesystem step's key is
//! `BLAKE3(version ∥ kind ∥ expanded instruction ∥ the variables and execution context that
//! reach it ∥ what it consumes from its parent ∥ what it consumes from its other inputs)`.
//!
//! What a step consumes from its parent is the parent's *result* — the content ids of the
//! parent state's layers (`image::layer::Layer::content_id`: the layer's tar with timestamps
//! left out) — not the parent's key. So a step that runs again and produces the same files
//! leaves everything after it cached (early cutoff, as Bazel does; BuildKit does it only for
//! `COPY --from`). What a `COPY --from` consumes from its source is the copied files themselves
//! (paths, types, modes, owners, content), what a COPY from the context consumes is the
//! fingerprint of exactly its sources.
//!
//! Nothing machine-specific goes in — no absolute paths, daemon roots, hostnames or times —
//! so the same inputs give the same key on every machine, which the shared remote cache
//! relies on. Proxy variables reach RUN steps but stay out of keys, as in BuildKit: a proxy
//! changes how a download travels, not what it produces.

use std::collections::HashMap;

use petgraph::Direction;

use super::state::State;
use crate::context::Hash;
use crate::frontend::InstructionKind;
use crate::image::ImageError;
use crate::image::layer::{Layer, content_id_of_diff_id};
use crate::image::oci::{ImageConfig, Manifest};
use crate::plan::scope::PROXY_ARGS;
use crate::plan::{BuildGraph, NodeIndex, NodeKind};
use crate::store::{Cas, Digest};

const KEY_VERSION: &[u8] = b"memobuild-key-v2\0";

/// A base image whose blobs are in the CAS, as a starting state.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub manifest: Digest,
    pub state: State,
}

impl BaseImage {
    /// Reads a pulled image back from the CAS (verifying every document it reads).
    pub fn from_cas(cas: &Cas, manifest: &Digest) -> Result<Self, ImageError> {
        let manifest_bytes = cas.read(manifest)?;
        let parsed = Manifest::parse(&manifest_bytes)?;
        let config_bytes = cas.read(&parsed.config.digest)?;
        let config = ImageConfig::parse(&config_bytes)?;
        if config.diff_ids.len() != parsed.layers.len() {
            return Err(ImageError::Invalid {
                what: "image",
                reason: format!(
                    "{manifest} lists {} layers but its config {} diff ids",
                    parsed.layers.len(),
                    config.diff_ids.len()
                ),
            });
        }
        let mut layers = Vec::with_capacity(parsed.layers.len());
        for (descriptor, diff_id) in parsed.layers.iter().zip(&config.diff_ids) {
            if !cas.contains(&descriptor.digest) {
                return Err(ImageError::Invalid {
                    what: "image",
                    reason: format!(
                        "layer {} of {manifest} is not in the store",
                        descriptor.digest
                    ),
                });
            }
            layers.push(Layer {
                blob: crate::store::Blob {
                    digest: descriptor.digest.clone(),
                    size: descriptor.size,
                },
                diff_id: diff_id.clone(),
                media_type: descriptor.media_type.clone(),
                content_id: content_id_of_diff_id(diff_id),
            });
        }
        Ok(Self {
            manifest: manifest.clone(),
            state: State::from_image(config, layers),
        })
    }
}

/// What a step runs with, besides its instruction: set by USER, WORKDIR and SHELL along the
/// stage chain (or inherited from the base image). Part of the key of the steps it affects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecContext {
    pub user: String,
    pub workdir: String,
    pub shell: Vec<String>,
}

/// The execution context of every node, by node index: known before anything runs.
pub fn exec_contexts(graph: &BuildGraph, bases: &HashMap<String, BaseImage>) -> Vec<ExecContext> {
    let mut contexts = vec![ExecContext::default(); graph.graph().node_count()];
    for node in graph.toposort() {
        let spec = graph.node(node);
        let mut context = spec
            .parent
            .map(|p| contexts[p.index()].clone())
            .unwrap_or_default();
        match spec.kind {
            NodeKind::BaseImage => {
                context = match spec.image.as_deref().and_then(|image| bases.get(image)) {
                    Some(base) => {
                        let config = &base.state.config.config;
                        ExecContext {
                            user: config.user.clone().unwrap_or_default(),
                            workdir: config.working_dir.clone().unwrap_or_else(|| "/".into()),
                            shell: config.shell.clone().unwrap_or_default(),
                        }
                    }
                    None => ExecContext {
                        workdir: "/".into(),
                        ..ExecContext::default()
                    },
                };
            }
            NodeKind::Filesystem | NodeKind::Metadata => {
                update_context(&mut context, spec.step.as_ref());
            }
            NodeKind::ContextSource | NodeKind::Stage | NodeKind::Export => {}
        }
        contexts[node.index()] = context;
    }
    contexts
}

/// Everything a filesystem step's key is made of. Kept per build, so the next build can say
/// which of them changed when a step runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInputs {
    pub kind: &'static str,
    pub instruction: String,
    /// The variables that reach the step, proxies left out, sorted.
    pub env: Vec<(String, String)>,
    pub context: ExecContext,
    /// The parent state's content id ([`state_id`]).
    pub parent: Hash,
    /// The other inputs (sorted): what is read from the build context (fingerprints) and
    /// from other stages or images.
    pub inputs: Vec<Input>,
}

/// One input of a step besides its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Input {
    pub id: Hash,
    /// A fingerprint of build-context files (not another stage or image).
    pub from_context: bool,
}

impl KeyInputs {
    /// The inputs of `node` (a filesystem step) given its parent state and other inputs.
    pub fn of(
        graph: &BuildGraph,
        node: NodeIndex,
        context: &ExecContext,
        parent: &State,
        mut inputs: Vec<Input>,
    ) -> Self {
        let spec = graph.node(node);
        inputs.sort_unstable();
        Self {
            kind: spec.kind.as_str(),
            instruction: spec.instruction.clone(),
            env: spec
                .env
                .iter()
                .filter(|(name, _)| !PROXY_ARGS.contains(&name.as_str()))
                .cloned()
                .collect(),
            context: context.clone(),
            parent: state_id(parent),
            inputs,
        }
    }

    pub fn key(&self) -> Hash {
        self.hash(true)
    }

    /// The key without the build-context inputs: what the chunks of a split COPY layer are
    /// keyed on besides their own files, so an edit moves only its own chunk's key.
    pub fn key_without_context(&self) -> Hash {
        self.hash(false)
    }

    fn hash(&self, with_context: bool) -> Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_VERSION);
        field(&mut hasher, self.kind.as_bytes());
        field(&mut hasher, self.instruction.as_bytes());
        hasher.update(&(self.env.len() as u64).to_le_bytes());
        for (name, value) in &self.env {
            field(&mut hasher, name.as_bytes());
            field(&mut hasher, value.as_bytes());
        }
        field(&mut hasher, self.context.user.as_bytes());
        field(&mut hasher, self.context.workdir.as_bytes());
        hasher.update(&(self.context.shell.len() as u64).to_le_bytes());
        for word in &self.context.shell {
            field(&mut hasher, word.as_bytes());
        }
        hasher.update(&self.parent);
        for input in &self.inputs {
            if with_context || !input.from_context {
                hasher.update(&[u8::from(input.from_context)]);
                hasher.update(&input.id);
            }
        }
        *hasher.finalize().as_bytes()
    }
}

/// A state's content id: what its layers hold, timestamps left out. Equal for two states
/// whose steps produced the same files, whichever steps and however often they ran.
pub fn state_id(state: &State) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"memobuild-state-v1\0");
    hasher.update(&(state.layers.len() as u64).to_le_bytes());
    for layer in &state.layers {
        hasher.update(&layer.content_id);
    }
    *hasher.finalize().as_bytes()
}

/// The non-context inputs of `node`: the stages and images it reads besides its parent.
pub fn other_inputs(graph: &BuildGraph, node: NodeIndex) -> Vec<NodeIndex> {
    let spec = graph.node(node);
    graph
        .graph()
        .neighbors_directed(node, Direction::Incoming)
        .filter(|p| Some(*p) != spec.parent)
        .collect()
}

fn update_context(context: &mut ExecContext, step: Option<&InstructionKind>) {
    match step {
        Some(InstructionKind::User(user)) => context.user = user.clone(),
        Some(InstructionKind::Workdir(dir)) => {
            context.workdir = super::state::absolute_workdir(&context.workdir, dir);
        }
        Some(InstructionKind::Shell(shell)) => context.shell = shell.clone(),
        _ => {}
    }
}

/// Length-prefixed, so adjacent fields cannot run into each other.
fn field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend;
    use crate::image::oci::Platform;
    use crate::plan::{self, PlanOptions};

    /// The key inputs of the step `label`, on a parent state whose layers have the given
    /// content ids, with every context source fingerprinted as `fingerprint`.
    fn inputs_of(dockerfile: &str, label: &str, parent: &[u8], fingerprint: u8) -> KeyInputs {
        let df = frontend::parse(dockerfile, "Dockerfile").expect("parse");
        let graph = plan::lower(&df, &PlanOptions::default()).expect("plan");
        let node = graph
            .toposort()
            .into_iter()
            .find(|n| graph.node(*n).label == label)
            .unwrap_or_else(|| panic!("no node {label}"));
        let contexts = exec_contexts(&graph, &HashMap::new());
        let mut state = State::scratch(&Platform::host());
        for id in parent {
            state.layers.push(Layer {
                blob: crate::store::Blob {
                    digest: Digest::of(&[*id]),
                    size: 1,
                },
                diff_id: Digest::of(&[*id, *id]),
                media_type: String::new(),
                content_id: [*id; 32],
            });
        }
        let inputs = other_inputs(&graph, node)
            .into_iter()
            .map(|_| Input {
                id: [fingerprint; 32],
                from_context: true,
            })
            .collect();
        KeyInputs::of(&graph, node, &contexts[node.index()], &state, inputs)
    }

    const DF: &str = "FROM scratch\nCOPY package.json /app/\nRUN install\nCOPY src/ /app/src/\nRUN build\nCMD [\"run\"]\n";

    #[test]
    fn a_step_is_keyed_on_its_parents_result_not_on_how_it_was_made() {
        let run = inputs_of(DF, "RUN build", &[1, 2], 0);
        assert_eq!(run.key(), inputs_of(DF, "RUN build", &[1, 2], 0).key());
        // The step before ran again and wrote the same files: same content ids, same key.
        let other_history = "FROM scratch\nRUN something else\nCOPY src/ /app/src/\nRUN build\n";
        assert_eq!(
            run.key(),
            inputs_of(other_history, "RUN build", &[1, 2], 0).key()
        );
        // It wrote something else: the key moves.
        assert_ne!(run.key(), inputs_of(DF, "RUN build", &[1, 3], 0).key());
    }

    #[test]
    fn the_key_without_context_ignores_the_sources_and_nothing_else() {
        let one = inputs_of(DF, "COPY src/ /app/src/", &[1], 1);
        let two = inputs_of(DF, "COPY src/ /app/src/", &[1], 2);
        assert_ne!(one.key(), two.key());
        assert_eq!(one.key_without_context(), two.key_without_context());
        let moved = inputs_of(DF, "COPY src/ /app/src/", &[9], 1);
        assert_ne!(one.key_without_context(), moved.key_without_context());
        let elsewhere = "FROM scratch\nCOPY src/ /srv/\n";
        assert_ne!(
            one.key_without_context(),
            inputs_of(elsewhere, "COPY src/ /srv/", &[1], 1).key_without_context()
        );
    }

    #[test]
    fn a_label_before_a_run_does_not_move_it_but_user_and_env_do() {
        let base = inputs_of("FROM scratch\nRUN make\n", "RUN make", &[], 0).key();
        let labelled = inputs_of("FROM scratch\nLABEL a=b\nRUN make\n", "RUN make", &[], 0);
        assert_eq!(base, labelled.key());
        let user = inputs_of("FROM scratch\nUSER app\nRUN make\n", "RUN make", &[], 0);
        assert_ne!(base, user.key());
        let env = inputs_of("FROM scratch\nENV CC=clang\nRUN make\n", "RUN make", &[], 0);
        assert_ne!(base, env.key());
    }

    #[test]
    fn an_unused_build_arg_moves_runs_but_not_copies() {
        let with = |value: &str| {
            let df = format!("FROM scratch\nARG V={value}\nCOPY a /a\nRUN make\n");
            (
                inputs_of(&df, "COPY a /a", &[], 0).key(),
                inputs_of(&df, "RUN make", &[], 0).key(),
            )
        };
        let (copy_1, run_1) = with("1");
        let (copy_2, run_2) = with("2");
        assert_eq!(copy_1, copy_2, "a COPY does not see the variable");
        assert_ne!(run_1, run_2, "a RUN does, as in BuildKit");
    }

    #[test]
    fn proxy_variables_stay_out_of_keys() {
        let with_proxy = "FROM scratch\nARG HTTP_PROXY=http://proxy:3128\nRUN fetch\n";
        let without = "FROM scratch\nARG HTTP_PROXY\nRUN fetch\n";
        assert_eq!(
            inputs_of(with_proxy, "RUN fetch", &[], 0).key(),
            inputs_of(without, "RUN fetch", &[], 0).key()
        );
    }
}
