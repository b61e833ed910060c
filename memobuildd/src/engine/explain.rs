//! "Why did this step run": a step that misses the cache is compared with the same step of
//! the previous build of the same workspace, Dockerfile and target — what its key was made of
//! then and now ([`KeyInputs`]) — and the first input that differs is its reason:
//! `src/main.js changed`, `build-arg VERSION changed`, `parent output changed`, … A step
//! whose inputs are all as before was simply not in the cache (collected, or built elsewhere).
//!
//! The previous builds are kept in memory: after a daemon restart the first build of a
//! workspace has nothing to compare with, and says so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::keys::KeyInputs;
use crate::plan::{BuildGraph, NodeIndex, NodeKind};

/// One filesystem step of a build, as the next build of the same target compares with it.
#[derive(Debug, Clone)]
pub struct StepInputs {
    pub position: Position,
    pub inputs: KeyInputs,
}

/// Where a step is: its stage and its place among the stage's filesystem steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub stage: Option<u32>,
    pub ordinal: usize,
}

/// Every filesystem step's position in `graph`.
pub fn positions(graph: &BuildGraph) -> HashMap<NodeIndex, Position> {
    let mut next: HashMap<Option<u32>, usize> = HashMap::new();
    let mut positions = HashMap::new();
    for node in graph.toposort() {
        let spec = graph.node(node);
        if spec.kind != NodeKind::Filesystem {
            continue;
        }
        let ordinal = next.entry(spec.stage).or_default();
        positions.insert(
            node,
            Position {
                stage: spec.stage,
                ordinal: *ordinal,
            },
        );
        *ordinal += 1;
    }
    positions
}

/// Which builds are "the same" for comparing: context, Dockerfile, target.
pub type Target = (PathBuf, PathBuf, Option<String>);

/// The last successful build of each target.
#[derive(Debug, Default)]
pub struct History {
    builds: Mutex<HashMap<Target, Arc<Vec<StepInputs>>>>,
}

impl History {
    pub fn last(&self, target: &Target) -> Option<Arc<Vec<StepInputs>>> {
        self.lock().get(target).cloned()
    }

    pub fn record(&self, target: Target, steps: Vec<StepInputs>) {
        self.lock().insert(target, Arc::new(steps));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Arc<Vec<StepInputs>>>> {
        self.builds.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a reason needs to know besides the two sets of inputs.
#[derive(Debug, Clone, Copy)]
pub struct Circumstances<'a> {
    pub no_cache: bool,
    /// Names given with `--build-arg`.
    pub build_args: &'a [(String, String)],
    /// The context file whose change dirtied this step, as the watcher saw it.
    pub changed_file: Option<&'a str>,
}

/// Why `step` ran, compared with the `previous` build's steps.
pub fn reason(
    previous: Option<&[StepInputs]>,
    step: &StepInputs,
    circumstances: Circumstances<'_>,
) -> String {
    if circumstances.no_cache {
        return "--no-cache".into();
    }
    let Some(previous) = previous else {
        return "not in cache (no earlier build of this target to compare with)".into();
    };
    let same_stage = || {
        previous
            .iter()
            .filter(|p| p.position.stage == step.position.stage)
    };
    let by_instruction = same_stage().find(|p| p.inputs.instruction == step.inputs.instruction);
    let Some(before) = by_instruction else {
        return match same_stage().find(|p| p.position.ordinal == step.position.ordinal) {
            Some(_) => "instruction changed".into(),
            None => "new step".into(),
        };
    };
    let (now, then) = (&step.inputs, &before.inputs);
    if let Some(name) = changed_variable(&then.env, &now.env) {
        let is_build_arg = circumstances.build_args.iter().any(|(n, _)| *n == name);
        return if is_build_arg {
            format!("build-arg {name} changed")
        } else {
            format!("variable {name} changed")
        };
    }
    if now.context.user != then.context.user {
        return "USER changed".into();
    }
    if now.context.workdir != then.context.workdir {
        return "WORKDIR changed".into();
    }
    if now.context.shell != then.context.shell {
        return "SHELL changed".into();
    }
    let differs = |from_context: bool| {
        let pick = |inputs: &KeyInputs| -> Vec<[u8; 32]> {
            inputs
                .inputs
                .iter()
                .filter(|i| i.from_context == from_context)
                .map(|i| i.id)
                .collect()
        };
        pick(now) != pick(then)
    };
    if differs(true) {
        return match circumstances.changed_file {
            Some(file) => format!("{file} changed"),
            None => "build context files changed".into(),
        };
    }
    if differs(false) {
        return "files it reads from another stage changed".into();
    }
    if now.parent != then.parent {
        return "parent output changed".into();
    }
    "not in cache".into()
}

/// The first variable (by name) whose value differs, or that one of them lacks.
fn changed_variable(then: &[(String, String)], now: &[(String, String)]) -> Option<String> {
    let then: HashMap<&str, &str> = then.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let now: HashMap<&str, &str> = now.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut names: Vec<&str> = then.keys().chain(now.keys()).copied().collect();
    names.sort_unstable();
    names
        .into_iter()
        .find(|name| then.get(name) != now.get(name))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::keys::{ExecContext, Input};

    fn step(ordinal: usize, instruction: &str, env: &[(&str, &str)], parent: u8) -> StepInputs {
        StepInputs {
            position: Position {
                stage: Some(0),
                ordinal,
            },
            inputs: KeyInputs {
                kind: "filesystem",
                instruction: instruction.into(),
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                context: ExecContext::default(),
                parent: [parent; 32],
                inputs: vec![],
            },
        }
    }

    fn plain() -> Circumstances<'static> {
        Circumstances {
            no_cache: false,
            build_args: &[],
            changed_file: None,
        }
    }

    #[test]
    fn each_input_that_changed_is_named() {
        let before = vec![step(0, "RUN make", &[("V", "1")], 1)];
        let args = [("V".to_owned(), "2".to_owned())];
        let with_args = Circumstances {
            build_args: &args,
            ..plain()
        };
        let now = step(0, "RUN make", &[("V", "2")], 1);
        assert_eq!(
            reason(Some(&before), &now, with_args),
            "build-arg V changed"
        );
        assert_eq!(reason(Some(&before), &now, plain()), "variable V changed");
        let parent = step(0, "RUN make", &[("V", "1")], 2);
        assert_eq!(
            reason(Some(&before), &parent, plain()),
            "parent output changed"
        );
        let edited = step(0, "RUN make all", &[("V", "1")], 1);
        assert_eq!(
            reason(Some(&before), &edited, plain()),
            "instruction changed"
        );
        let same = step(0, "RUN make", &[("V", "1")], 1);
        assert_eq!(reason(Some(&before), &same, plain()), "not in cache");
        let no_cache = Circumstances {
            no_cache: true,
            ..plain()
        };
        assert_eq!(reason(Some(&before), &same, no_cache), "--no-cache");
        assert!(reason(None, &same, plain()).starts_with("not in cache"));
    }

    #[test]
    fn a_context_change_names_the_file_the_watcher_saw() {
        let mut before = step(0, "COPY src/ /app/", &[], 1);
        before.inputs.inputs = vec![Input {
            id: [1; 32],
            from_context: true,
        }];
        let mut now = before.clone();
        now.inputs.inputs[0].id = [2; 32];
        let circumstances = Circumstances {
            changed_file: Some("src/main.js"),
            ..plain()
        };
        assert_eq!(
            reason(Some(&[before.clone()]), &now, circumstances),
            "src/main.js changed"
        );
        assert_eq!(
            reason(Some(&[before]), &now, plain()),
            "build context files changed"
        );
    }
}
