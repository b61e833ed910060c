//! Cache keys: `BLAKE3(version ∥ kind ∥ expanded instruction ∥ the variables that reach the
//! node ∥ parent keys ∥ the node's own input)`, where the own input is the manifest digest
//! of a base image or the fingerprint of a context source set.
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
use crate::image::layer::Layer;
use crate::image::oci::{ImageConfig, Manifest};
use crate::plan::scope::PROXY_ARGS;
use crate::plan::{BuildGraph, NodeIndex, NodeKind};
use crate::store::{Cas, Digest};

const KEY_VERSION: &[u8] = b"memobuild-key-v1\0";

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
#[derive(Debug, Clone, Default)]
struct ExecContext {
    user: String,
    workdir: String,
    shell: Vec<String>,
}

/// The keys of one build's nodes, indexed by node index.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    pub of: Vec<Hash>,
    /// A node's key without its context source sets: what the chunks of a split COPY layer
    /// are keyed on besides their own files, so an edit moves only its own chunk's key.
    pub without_context: Vec<Hash>,
}

/// One key per node.
///
/// Metadata steps (LABEL, CMD, ENV, …) make no layer, so they do not stand between a
/// filesystem step and its predecessor: a step's chain input is the key of the nearest
/// filesystem (or base) step before it. What metadata does matter to a step enters its key
/// directly — the variables that reach it, and its [`ExecContext`] — so editing a LABEL or
/// CMD reruns nothing, while editing an ENV a RUN can see reruns that RUN.
pub fn compute(
    graph: &BuildGraph,
    bases: &HashMap<String, BaseImage>,
    fingerprints: &HashMap<NodeIndex, Hash>,
) -> Keys {
    let inner = graph.graph();
    let count = inner.node_count();
    let mut keys = vec![[0u8; 32]; count];
    let mut without_context = vec![[0u8; 32]; count];
    // The key a node passes on to its children: its own, or for metadata its parent's.
    let mut carried = vec![[0u8; 32]; count];
    let mut contexts = vec![ExecContext::default(); count];
    for node in graph.toposort() {
        let spec = graph.node(node);
        let mut context = spec
            .parent
            .map(|p| contexts[p.index()].clone())
            .unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_VERSION);
        field(&mut hasher, spec.kind.as_str().as_bytes());
        field(&mut hasher, spec.instruction.as_bytes());
        let env: Vec<&(String, String)> = spec
            .env
            .iter()
            .filter(|(name, _)| !PROXY_ARGS.contains(&name.as_str()))
            .collect();
        hasher.update(&(env.len() as u64).to_le_bytes());
        for (name, value) in env {
            field(&mut hasher, name.as_bytes());
            field(&mut hasher, value.as_bytes());
        }
        if let Some(parent) = spec.parent {
            hasher.update(&carried[parent.index()]);
        }
        let mut others: Vec<(Hash, bool)> = inner
            .neighbors_directed(node, Direction::Incoming)
            .filter(|p| Some(*p) != spec.parent)
            .map(|p| {
                let from_context = graph.node(p).kind == NodeKind::ContextSource;
                (carried[p.index()], from_context)
            })
            .collect();
        others.sort_unstable();
        let mut sans_context = hasher.clone();
        for (other, from_context) in others {
            hasher.update(&other);
            if !from_context {
                sans_context.update(&other);
            }
        }
        match spec.kind {
            NodeKind::BaseImage => {
                let base = spec.image.as_deref().and_then(|image| bases.get(image));
                if let Some(base) = base {
                    let config = &base.state.config.config;
                    context = ExecContext {
                        user: config.user.clone().unwrap_or_default(),
                        workdir: config.working_dir.clone().unwrap_or_else(|| "/".into()),
                        shell: config.shell.clone().unwrap_or_default(),
                    };
                } else {
                    context.workdir = "/".into();
                }
                let manifest = base.map_or("scratch", |b| b.manifest.as_str());
                field(&mut hasher, manifest.as_bytes());
                field(&mut sans_context, manifest.as_bytes());
            }
            NodeKind::ContextSource => {
                hasher.update(fingerprints.get(&node).unwrap_or(&[0; 32]));
            }
            NodeKind::Filesystem | NodeKind::Metadata => {
                update_context(&mut context, spec.step.as_ref());
                for hasher in [&mut hasher, &mut sans_context] {
                    field(hasher, context.user.as_bytes());
                    field(hasher, context.workdir.as_bytes());
                    for word in &context.shell {
                        field(hasher, word.as_bytes());
                    }
                }
            }
            NodeKind::Stage | NodeKind::Export => {}
        }
        let key = *hasher.finalize().as_bytes();
        keys[node.index()] = key;
        without_context[node.index()] = *sans_context.finalize().as_bytes();
        carried[node.index()] = match (spec.kind, spec.parent) {
            (NodeKind::Metadata, Some(parent)) => carried[parent.index()],
            _ => key,
        };
        contexts[node.index()] = context;
    }
    Keys {
        of: keys,
        without_context,
    }
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
    use crate::plan::{self, PlanOptions};

    fn keys_of(dockerfile: &str, fingerprint: u8) -> Vec<(String, Hash)> {
        all_keys_of(dockerfile, fingerprint)
            .into_iter()
            .map(|(label, keys)| (label, keys.0))
            .collect()
    }

    /// (label, (key, key without context)) per node.
    fn all_keys_of(dockerfile: &str, fingerprint: u8) -> Vec<(String, (Hash, Hash))> {
        let df = frontend::parse(dockerfile, "Dockerfile").expect("parse");
        let graph = plan::lower(&df, &PlanOptions::default()).expect("plan");
        let fingerprints = graph
            .toposort()
            .into_iter()
            .filter(|n| graph.node(*n).kind == NodeKind::ContextSource)
            .map(|n| (n, [fingerprint; 32]))
            .collect();
        let keys = compute(&graph, &HashMap::new(), &fingerprints);
        graph
            .toposort()
            .into_iter()
            .map(|n| {
                let i = n.index();
                let label = graph.node(n).label.clone();
                (label, (keys.of[i], keys.without_context[i]))
            })
            .collect()
    }

    fn key(keys: &[(String, Hash)], label: &str) -> Hash {
        keys.iter()
            .find(|(l, _)| l == label)
            .map(|(_, k)| *k)
            .unwrap_or_else(|| panic!("no node {label}"))
    }

    const DF: &str = "FROM scratch\nCOPY package.json /app/\nRUN install\nCOPY src/ /app/src/\nRUN build\nCMD [\"run\"]\n";

    #[test]
    fn a_context_change_moves_only_the_keys_downstream_of_it() {
        let before = keys_of(DF, 1);
        let after = keys_of(DF, 2);
        // Both source sets got a new fingerprint here, so everything from the first COPY on
        // changes; the base is untouched.
        assert_eq!(key(&before, "FROM scratch"), key(&after, "FROM scratch"));
        assert_ne!(key(&before, "RUN build"), key(&after, "RUN build"));
    }

    #[test]
    fn the_key_without_context_ignores_the_sources_and_nothing_else() {
        let find = |keys: &[(String, (Hash, Hash))], label: &str| {
            keys.iter().find(|(l, _)| l == label).expect("node").1
        };
        let before = all_keys_of(DF, 1);
        let after = all_keys_of(DF, 2);
        let (key_before, sans_before) = find(&before, "COPY src/ /app/src/");
        let (key_after, sans_after) = find(&after, "COPY src/ /app/src/");
        assert_ne!(key_before, key_after);
        // The first COPY's sources changed too, and they are upstream: the parent moved.
        assert_ne!(sans_before, sans_after);
        let one_set = "FROM scratch\nRUN install\nCOPY src/ /app/src/\n";
        let (key_1, sans_1) = find(&all_keys_of(one_set, 1), "COPY src/ /app/src/");
        let (key_2, sans_2) = find(&all_keys_of(one_set, 2), "COPY src/ /app/src/");
        assert_ne!(key_1, key_2);
        assert_eq!(sans_1, sans_2);
        let elsewhere = "FROM scratch\nRUN install\nCOPY src/ /srv/\n";
        assert_ne!(
            sans_1,
            find(&all_keys_of(elsewhere, 1), "COPY src/ /srv/").1
        );
    }

    #[test]
    fn cmd_changes_only_cmd_and_keys_are_deterministic() {
        let a = keys_of(DF, 1);
        assert_eq!(a, keys_of(DF, 1));
        let b = keys_of(&DF.replace("[\"run\"]", "[\"serve\"]"), 1);
        assert_eq!(key(&a, "RUN build"), key(&b, "RUN build"));
        assert_ne!(key(&a, "CMD run"), key(&b, "CMD serve"));
    }

    #[test]
    fn a_label_before_a_run_does_not_move_it_but_user_and_env_do() {
        let base = keys_of("FROM scratch\nRUN make\n", 0);
        let labelled = keys_of("FROM scratch\nLABEL a=b\nRUN make\n", 0);
        assert_eq!(key(&base, "RUN make"), key(&labelled, "RUN make"));
        let user = keys_of("FROM scratch\nUSER app\nRUN make\n", 0);
        assert_ne!(key(&base, "RUN make"), key(&user, "RUN make"));
        let env = keys_of("FROM scratch\nENV CC=clang\nRUN make\n", 0);
        assert_ne!(key(&base, "RUN make"), key(&env, "RUN make"));
    }

    #[test]
    fn proxy_variables_stay_out_of_keys() {
        let with_proxy = "FROM scratch\nARG HTTP_PROXY=http://proxy:3128\nRUN fetch\n";
        let without = "FROM scratch\nARG HTTP_PROXY\nRUN fetch\n";
        assert_eq!(
            key(&keys_of(with_proxy, 0), "RUN fetch"),
            key(&keys_of(without, 0), "RUN fetch")
        );
    }
}
