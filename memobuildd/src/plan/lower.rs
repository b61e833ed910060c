//! Lowering: stage resolution, `--target` pruning, expansion and node construction.

use std::collections::{BTreeMap, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};

use super::canonical::{canonical, json, label};
use super::expand::Expander;
use super::scope::{Args, Scope, arg_value, build_arg, platform_args};
use super::{Base, BuildGraph, Node, NodeKind, PlanError, PlanOptions, StageInfo};
use crate::frontend::shell::ExpandError;
use crate::frontend::{
    ArgDecl, Diagnostic, DiagnosticKind, Dockerfile, FileCopy, Instruction, InstructionKind,
    MountKind, RunMount, Span, Stage, parse_mounts,
};

/// What the planner needs from a base image's config: its ENV, and the ONBUILD triggers that
/// run first in a stage built on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseInfo {
    pub env: Vec<(String, String)>,
    pub on_build: Vec<String>,
}

/// A base image's [`BaseInfo`], by image reference and platform.
pub type BaseEnv<'a> = &'a dyn Fn(&str, Option<&str>) -> BaseInfo;

/// Lowers the stages `opts.target` needs into a [`BuildGraph`], not knowing any base image's
/// ENV (a stage built on an image starts with none).
pub fn lower(df: &Dockerfile, opts: &PlanOptions) -> Result<BuildGraph, PlanError> {
    lower_with_base_env(df, opts, &|_, _| BaseInfo::default())
}

/// As [`lower`], with the ENV of the base images, which BuildKit expands words with too
/// (`ENV PATH=/opt/bin:$PATH`). Only the engine can fetch image configs, hence the callback.
///
/// Global ARGs and every FROM line are evaluated up front, as BuildKit does; everything inside a
/// stage (expansion, `COPY --from` references, port syntax) only for the stages the target
/// needs, so a broken stage nobody needs does not fail the build.
pub fn lower_with_base_env(
    df: &Dockerfile,
    opts: &PlanOptions,
    base_env: BaseEnv<'_>,
) -> Result<BuildGraph, PlanError> {
    let globals = global_args(df, &opts.build_args)?;
    let bases = df
        .stages
        .iter()
        .enumerate()
        .map(|(i, stage)| resolve_base(df, i, stage, &globals))
        .collect::<Result<Vec<_>, _>>()?;
    let target = match &opts.target {
        None => df.stages.len().checked_sub(1).ok_or(PlanError::NoStages)?,
        Some(target) => df
            .stages
            .iter()
            .position(|s| {
                s.name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(target))
            })
            .ok_or_else(|| PlanError::UnknownTarget {
                target: target.clone(),
            })?,
    };
    let needed = needed_stages(df, &bases, &globals, target)?;

    let mut lowering = Lowering {
        df,
        globals,
        build_args: &opts.build_args,
        base_env,
        graph: DiGraph::new(),
        stage_ends: vec![None; df.stages.len()],
        stage_envs: vec![BTreeMap::new(); df.stages.len()],
        stage_triggers: vec![Vec::new(); df.stages.len()],
        images: HashMap::new(),
        stages: Vec::new(),
    };
    for ((i, stage), base) in df.stages.iter().enumerate().zip(bases) {
        if needed[i] {
            lowering.stage(i, stage, base)?;
        }
    }
    let target_end = lowering.stage_ends[target].expect("the target stage is needed");
    let target_stage = &df.stages[target];
    let name = target_stage
        .name
        .clone()
        .unwrap_or_else(|| target.to_string());
    let export = lowering.add(
        Node {
            parent: Some(target_end),
            ..Node::bare(
                NodeKind::Export,
                None,
                format!("export {name}"),
                format!("EXPORT {target}"),
            )
        },
        &[],
    );
    Ok(BuildGraph {
        graph: lowering.graph,
        stages: lowering.stages,
        export,
    })
}

/// A FROM line after expansion.
#[derive(Debug)]
struct ResolvedBase {
    base: Base,
    platform: Option<String>,
    env: Vec<(String, String)>,
}

/// Where a `COPY --from` reads.
enum CopyFrom {
    Stage(usize),
    Image(String),
}

fn expansion_error(df: &Dockerfile, span: Span, keyword: &str, e: ExpandError) -> Diagnostic {
    df.error(span, keyword, DiagnosticKind::Expansion, e.message)
}

/// The ARGs before the first FROM, each default expanded with the ones before it.
fn global_args(df: &Dockerfile, build_args: &[(String, String)]) -> Result<Args, Diagnostic> {
    let mut globals = Args::default();
    for (name, value) in platform_args() {
        let value = build_arg(build_args, &name).map_or(value, str::to_owned);
        globals.declare(&name, Some(value));
    }
    for instruction in &df.global_args {
        let InstructionKind::Arg(decls) = &instruction.kind else {
            continue;
        };
        let mut expander = Expander::new(&globals, df.escape);
        let mut values = Vec::with_capacity(decls.len());
        for decl in decls {
            let default = expander
                .opt(decl.default.as_deref())
                .map_err(|e| expansion_error(df, instruction.span, "ARG", e))?;
            // A bare redeclaration (`ARG TARGETPLATFORM`) keeps the value already in effect.
            let value = arg_value(build_args, &decl.name, default, &globals);
            values.push((decl.name.as_str(), value));
        }
        for (name, value) in values {
            globals.declare(name, value);
        }
    }
    Ok(globals)
}

fn stage_named(df: &Dockerfile, name: &str) -> Option<usize> {
    df.stages
        .iter()
        .position(|s| s.name.as_deref() == Some(name))
}

/// The FROM line of stage `i`, expanded with the global ARGs.
fn resolve_base(
    df: &Dockerfile,
    i: usize,
    stage: &Stage,
    globals: &Args,
) -> Result<ResolvedBase, Diagnostic> {
    let mut expander = Expander::new(globals, df.escape);
    let expanded = expander
        .word(&stage.base)
        .and_then(|base| Ok((base, expander.opt(stage.platform.as_deref())?)));
    let (name, platform) = expanded.map_err(|e| expansion_error(df, stage.span, "FROM", e))?;
    let error =
        |message: String| df.error(stage.span, "FROM", DiagnosticKind::StageReference, message);
    let base = match stage_named(df, &name.to_lowercase()) {
        Some(j) if j < i => Base::Stage(j as u32),
        // A stage named like its own base image builds on the image, as in BuildKit.
        Some(j) if j > i => {
            return Err(error(format!(
                "FROM {name}: stage {name:?} is defined later (line {})",
                df.stages[j].span.start_line
            )));
        }
        _ if name.is_empty() => {
            return Err(error("FROM requires an image or stage name".to_owned()));
        }
        _ if name == "scratch" => Base::Scratch,
        _ => Base::Image(name),
    };
    Ok(ResolvedBase {
        base,
        platform,
        env: expander.used(),
    })
}

/// Resolves a `COPY --from` value of stage `from_stage` (expanded with the global ARGs).
fn resolve_copy_from(
    df: &Dockerfile,
    from_stage: usize,
    instruction: &Instruction,
    raw: &str,
    globals: &Args,
) -> Result<CopyFrom, Diagnostic> {
    let name = Expander::new(globals, df.escape)
        .word(raw)
        .map_err(|e| expansion_error(df, instruction.span, "COPY", e))?;
    let error = |message: String| {
        df.error(
            instruction.span,
            "COPY",
            DiagnosticKind::StageReference,
            message,
        )
    };
    let index = match name.parse::<usize>() {
        Ok(index) if index >= df.stages.len() => {
            return Err(error(format!(
                "--from={name}: no stage with index {index} (there are {})",
                df.stages.len()
            )));
        }
        Ok(index) => index,
        Err(_) => match stage_named(df, &name.to_lowercase()) {
            Some(index) => index,
            None if name.is_empty() => {
                return Err(error("--from needs a stage or image".to_owned()));
            }
            None => return Ok(CopyFrom::Image(name)),
        },
    };
    match index.cmp(&from_stage) {
        std::cmp::Ordering::Less => Ok(CopyFrom::Stage(index)),
        std::cmp::Ordering::Equal => Err(error(format!(
            "--from={name}: circular dependency, a stage cannot copy from itself"
        ))),
        std::cmp::Ordering::Greater => Err(error(format!(
            "--from={name}: stage is defined later (line {}); only earlier stages can be copied from",
            df.stages[index].span.start_line
        ))),
    }
}

/// Which stages `target` needs, through FROM and `COPY --from`; references are checked only in
/// the needed stages.
fn needed_stages(
    df: &Dockerfile,
    bases: &[ResolvedBase],
    globals: &Args,
    target: usize,
) -> Result<Vec<bool>, Diagnostic> {
    let mut needed = vec![false; df.stages.len()];
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut needed[i], true) {
            continue;
        }
        if let Base::Stage(j) = bases[i].base {
            todo.push(j as usize);
        }
        for instruction in &df.stages[i].instructions {
            let froms = match &instruction.kind {
                InstructionKind::Copy(FileCopy {
                    from: Some(from), ..
                }) => vec![from.clone()],
                // Specs that do not parse yet (`$VAR` keys) are reported after expansion.
                InstructionKind::Run(run) => parse_mounts(&run.mounts)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|m| m.kind == MountKind::Bind)
                    .filter_map(|m| m.from)
                    .collect(),
                _ => continue,
            };
            for from in froms {
                if let CopyFrom::Stage(j) = resolve_copy_from(df, i, instruction, &from, globals)? {
                    todo.push(j);
                }
            }
        }
    }
    Ok(needed)
}

struct Lowering<'a> {
    df: &'a Dockerfile,
    globals: Args,
    build_args: &'a [(String, String)],
    base_env: BaseEnv<'a>,
    graph: DiGraph<Node, ()>,
    /// The `stage` node of each lowered stage.
    stage_ends: Vec<Option<NodeIndex>>,
    /// The ENV each lowered stage ends with, inherited by `FROM <stage>`.
    stage_envs: Vec<BTreeMap<String, String>>,
    /// The ONBUILD triggers each lowered stage declares, run first by `FROM <stage>`.
    stage_triggers: Vec<Vec<String>>,
    /// One node per image `COPY --from` names.
    images: HashMap<String, NodeIndex>,
    stages: Vec<StageInfo>,
}

impl Lowering<'_> {
    /// Adds `node` with edges from its parent and from `inputs`.
    fn add(&mut self, node: Node, inputs: &[NodeIndex]) -> NodeIndex {
        let parent = node.parent;
        let index = self.graph.add_node(node);
        for from in parent.iter().chain(inputs) {
            self.graph.add_edge(*from, index, ());
        }
        index
    }

    fn stage(&mut self, i: usize, stage: &Stage, resolved: ResolvedBase) -> Result<(), Diagnostic> {
        let lines = Some((stage.span.start_line, stage.span.end_line));
        let host = platform_args()
            .into_iter()
            .find_map(|(name, value)| (name == "BUILDPLATFORM").then_some(value))
            .unwrap_or_default();
        if let Some(message) = resolved
            .platform
            .as_deref()
            .and_then(|p| super::support::platform_unsupported(p, &host))
        {
            let mut diagnostic =
                self.df
                    .error(stage.span, "FROM", DiagnosticKind::Unsupported, message);
            diagnostic.point_at_flag("platform");
            return Err(diagnostic);
        }
        let (mut parent, env, triggers) = match &resolved.base {
            Base::Stage(j) => {
                let j = *j as usize;
                (
                    self.stage_ends[j].expect("earlier needed stages are lowered first"),
                    self.stage_envs[j].clone(),
                    self.stage_triggers[j].clone(),
                )
            }
            Base::Scratch | Base::Image(_) => {
                let image = match &resolved.base {
                    Base::Image(image) => image.as_str(),
                    _ => "scratch",
                };
                let mut instruction = format!("FROM {}", json(image));
                if let Some(platform) = &resolved.platform {
                    instruction.push_str(&format!(" --platform={}", json(platform)));
                }
                let node = Node {
                    env: resolved.env.clone(),
                    lines,
                    image: match &resolved.base {
                        Base::Image(image) => Some(image.clone()),
                        _ => None,
                    },
                    ..Node::bare(
                        NodeKind::BaseImage,
                        Some(i as u32),
                        format!("FROM {image}"),
                        instruction,
                    )
                };
                let base = match &resolved.base {
                    Base::Image(image) => (self.base_env)(image, resolved.platform.as_deref()),
                    _ => BaseInfo {
                        env: vec![("PATH".to_owned(), super::DEFAULT_PATH.to_owned())],
                        on_build: Vec::new(),
                    },
                };
                (
                    self.add(node, &[]),
                    base.env.into_iter().collect(),
                    base.on_build,
                )
            }
        };
        let mut scope = Scope::new(env, self.build_args);
        // Inherited ONBUILD triggers run first, as if written right after FROM.
        for trigger in self.triggers(&triggers, stage)? {
            parent = self.step(i, &trigger, &mut scope, parent)?;
        }
        for instruction in &stage.instructions {
            if let InstructionKind::Onbuild(trigger) = &instruction.kind {
                self.stage_triggers[i].push(trigger.clone());
            }
            parent = self.step(i, instruction, &mut scope, parent)?;
        }
        let name = stage
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let end = self.add(
            Node {
                lines,
                parent: Some(parent),
                ..Node::bare(
                    NodeKind::Stage,
                    Some(i as u32),
                    format!("stage {i}{name}"),
                    format!("STAGE {i}"),
                )
            },
            &[],
        );
        self.stage_ends[i] = Some(end);
        self.stage_envs[i] = scope.env;
        self.stages.push(StageInfo {
            index: i as u32,
            name: stage.name.clone(),
            base: resolved.base,
            platform: resolved.platform,
            node: end,
        });
        Ok(())
    }

    /// Parses inherited ONBUILD trigger texts into instructions, placed at the stage's FROM
    /// line (that is where they take effect, and where an error in one is reported).
    fn triggers(&self, triggers: &[String], stage: &Stage) -> Result<Vec<Instruction>, Diagnostic> {
        let mut parsed = Vec::new();
        for trigger in triggers {
            let text = format!("FROM scratch\n{trigger}\n");
            let doc = crate::frontend::parse(&text, &format!("ONBUILD trigger {trigger:?}"))?;
            for mut instruction in doc.stages.into_iter().flat_map(|s| s.instructions) {
                instruction.span = stage.span;
                parsed.push(instruction);
            }
        }
        Ok(parsed)
    }

    /// Lowers one instruction of stage `i` after `parent`; returns its node.
    fn step(
        &mut self,
        i: usize,
        instruction: &Instruction,
        scope: &mut Scope<'_>,
        parent: NodeIndex,
    ) -> Result<NodeIndex, Diagnostic> {
        let df = self.df;
        let keyword = instruction.kind.keyword();
        let span = instruction.span;
        let mut expander = Expander::new(&*scope, df.escape);
        let mut expanded = match &instruction.kind {
            InstructionKind::Arg(decls) => self.args(decls, &mut expander, scope),
            kind => expander.instruction(kind),
        }
        .map_err(|e| expansion_error(df, span, keyword, e))?;
        let mut env = match &expanded {
            InstructionKind::Run(_) => scope.run_env(),
            _ => expander.used(),
        };
        check_semantics(df, instruction, &expanded)?;

        let mut inputs = Vec::new();
        let (mut sources, mut excludes) = (Vec::new(), Vec::new());
        match &mut expanded {
            InstructionKind::Env(pairs) => scope.env.extend(pairs.iter().cloned()),
            InstructionKind::Arg(decls) => {
                for decl in decls.iter() {
                    scope.declare_arg(&decl.name, decl.default.as_deref());
                }
                env = decls
                    .iter()
                    .filter_map(|d| Some((d.name.clone(), d.default.clone()?)))
                    .collect();
                env.sort();
            }
            InstructionKind::Copy(copy) | InstructionKind::Add(copy) => {
                sources.clone_from(&copy.sources);
                excludes.clone_from(&copy.exclude);
                inputs.extend(self.copy_input(i, instruction, copy)?);
            }
            InstructionKind::Run(run) => {
                // Checked by `check_semantics`: the specs parse.
                for mount in parse_mounts(&run.mounts).unwrap_or_default() {
                    if mount.kind == MountKind::Bind {
                        inputs.push(self.bind_input(i, instruction, &mount)?);
                    }
                }
            }
            _ => {}
        }
        let kind = match expanded {
            InstructionKind::Run(_)
            | InstructionKind::Copy(_)
            | InstructionKind::Add(_)
            | InstructionKind::Workdir(_) => NodeKind::Filesystem,
            _ => NodeKind::Metadata,
        };
        let node = Node {
            kind,
            stage: Some(i as u32),
            label: label(&expanded),
            instruction: canonical(&expanded),
            step: Some(expanded),
            sources,
            excludes,
            env,
            lines: Some((span.start_line, span.end_line)),
            parent: Some(parent),
            image: None,
        };
        Ok(self.add(node, &inputs))
    }

    /// ARG values: build arg, else expanded default, else (bare redeclaration) the global value.
    fn args(
        &self,
        decls: &[ArgDecl],
        expander: &mut Expander<'_>,
        scope: &Scope<'_>,
    ) -> Result<InstructionKind, ExpandError> {
        let mut resolved = Vec::with_capacity(decls.len());
        for decl in decls {
            let default = expander.opt(decl.default.as_deref())?;
            let value = arg_value(scope.build_args(), &decl.name, default, &self.globals);
            resolved.push(ArgDecl {
                name: decl.name.clone(),
                default: value,
            });
        }
        Ok(InstructionKind::Arg(resolved))
    }

    /// The node a COPY/ADD reads from besides its parent: a context source, a stage or an
    /// image. A `--from` is replaced by what it resolved to: the stage's name (or index) or the
    /// image.
    fn copy_input(
        &mut self,
        i: usize,
        instruction: &Instruction,
        copy: &mut FileCopy,
    ) -> Result<Option<NodeIndex>, Diagnostic> {
        if let Some(raw_from) = &copy.from {
            let df = self.df;
            let (input, resolved) =
                match resolve_copy_from(df, i, instruction, raw_from, &self.globals)? {
                    CopyFrom::Stage(j) => {
                        let name = df.stages[j].name.clone().unwrap_or_else(|| j.to_string());
                        let end = self.stage_ends[j].expect("needed stages are lowered in order");
                        (end, name)
                    }
                    CopyFrom::Image(image) => (self.image(image.clone()), image),
                };
            copy.from = Some(resolved);
            return Ok(Some(input));
        }
        let is_add = matches!(instruction.kind, InstructionKind::Add(_));
        let patterns: Vec<String> = copy
            .sources
            .iter()
            .filter(|s| !(is_add && is_remote(s)))
            .cloned()
            .collect();
        if patterns.is_empty() {
            return Ok(None);
        }
        let span = instruction.span;
        let label = format!("context {}", patterns.join(" "));
        let instruction = format!(
            "CONTEXT {} --exclude={}",
            json(&patterns),
            json(&copy.exclude)
        );
        let node = Node {
            sources: patterns,
            excludes: copy.exclude.clone(),
            lines: Some((span.start_line, span.end_line)),
            ..Node::bare(NodeKind::ContextSource, Some(i as u32), label, instruction)
        };
        Ok(Some(self.add(node, &[])))
    }

    /// The node a `RUN --mount=type=bind` reads: the files it names in the context (keyed by
    /// their fingerprint, as COPY's), or the stage or image of its `from`.
    fn bind_input(
        &mut self,
        i: usize,
        instruction: &Instruction,
        mount: &RunMount,
    ) -> Result<NodeIndex, Diagnostic> {
        let df = self.df;
        match &mount.from {
            Some(from) => Ok(
                match resolve_copy_from(df, i, instruction, from, &self.globals)? {
                    CopyFrom::Stage(j) => {
                        self.stage_ends[j].expect("needed stages are lowered in order")
                    }
                    CopyFrom::Image(image) => self.image(image),
                },
            ),
            None => {
                let pattern = bind_context_source(mount);
                let span = instruction.span;
                let node = Node {
                    sources: vec![pattern.clone()],
                    lines: Some((span.start_line, span.end_line)),
                    ..Node::bare(
                        NodeKind::ContextSource,
                        Some(i as u32),
                        format!("context {pattern}"),
                        format!("CONTEXT {} --exclude=[]", json(&[&pattern])),
                    )
                };
                Ok(self.add(node, &[]))
            }
        }
    }

    fn image(&mut self, image: String) -> NodeIndex {
        if let Some(&node) = self.images.get(&image) {
            return node;
        }
        let label = format!("image {image}");
        let instruction = format!("FROM {}", json(&image));
        let node = self.add(
            Node {
                image: Some(image.clone()),
                ..Node::bare(NodeKind::BaseImage, None, label, instruction)
            },
            &[],
        );
        self.images.insert(image, node);
        node
    }
}

impl Node {
    /// A node with nothing but its identity; callers fill in the rest.
    fn bare(kind: NodeKind, stage: Option<u32>, label: String, instruction: String) -> Self {
        Node {
            kind,
            stage,
            label,
            instruction,
            step: None,
            sources: Vec::new(),
            excludes: Vec::new(),
            env: Vec::new(),
            lines: None,
            parent: None,
            image: None,
        }
    }
}

/// The context pattern a bind mount without `from` reads: its `source`, the whole context
/// by default.
pub fn bind_context_source(mount: &RunMount) -> String {
    let source = mount
        .source
        .as_deref()
        .unwrap_or("")
        .trim_start_matches('/');
    if source.is_empty() {
        ".".to_owned()
    } else {
        source.to_owned()
    }
}

/// ADD sources fetched from the network rather than read from the context.
fn is_remote(source: &str) -> bool {
    ["http://", "https://", "git://", "git@", "ssh://"]
        .iter()
        .any(|p| source.starts_with(p))
}

/// Checks on expanded values that BuildKit makes while dispatching.
fn check_semantics(
    df: &Dockerfile,
    instruction: &Instruction,
    expanded: &InstructionKind,
) -> Result<(), Diagnostic> {
    let error = |message: String| {
        df.error(
            instruction.span,
            expanded.keyword(),
            DiagnosticKind::Semantic,
            message,
        )
    };
    if let Some((flag, message)) = super::support::unsupported(expanded) {
        let mut diagnostic = df.error(
            instruction.span,
            expanded.keyword(),
            DiagnosticKind::Unsupported,
            message,
        );
        diagnostic.point_at_flag(flag);
        return Err(diagnostic);
    }
    match expanded {
        InstructionKind::Expose(ports) => match ports.iter().find(|p| !is_port_spec(p)) {
            Some(bad) => Err(error(format!("invalid port specification: {bad:?}"))),
            None => Ok(()),
        },
        InstructionKind::Env(pairs) | InstructionKind::Label(pairs)
            if pairs.iter().any(|(k, _)| k.is_empty()) =>
        {
            Err(error(format!(
                "{} names can not be blank",
                expanded.keyword()
            )))
        }
        InstructionKind::Workdir(dir) if dir.is_empty() => {
            Err(error("WORKDIR cannot be empty".to_owned()))
        }
        InstructionKind::Copy(copy) | InstructionKind::Add(copy) => {
            if let Some(mode) = &copy.chmod
                && u32::from_str_radix(mode, 8).map_or(true, |m| m > 0o7777)
            {
                return Err(error(format!(
                    "--chmod={mode} is not an octal mode (0000 to 7777)"
                )));
            }
            let is_copy = matches!(expanded, InstructionKind::Copy(_));
            match copy.sources.iter().find(|s| s.contains("://")) {
                Some(url) if is_copy && copy.from.is_none() => {
                    Err(error(format!("COPY can not fetch a URL ({url}); use ADD")))
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// `80`, `80/udp`, `8000-8010/tcp`.
fn is_port_spec(spec: &str) -> bool {
    let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let (low, high) = ports.split_once('-').unwrap_or((ports, ports));
    ["tcp", "udp", "sctp"]
        .iter()
        .any(|p| p.eq_ignore_ascii_case(proto))
        && low.parse::<u16>().is_ok()
        && high.parse::<u16>().is_ok()
}
