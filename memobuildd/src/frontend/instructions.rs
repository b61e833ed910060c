//! The typed layer, as BuildKit's `instructions.Parse`: raw nodes → validated instructions
//! grouped into stages. Flags are checked here; values stay unexpanded until `plan`.

use std::time::Duration;

use super::diagnostic::{Diagnostic, DiagnosticKind};
use super::syntax::{Directive, Heredoc, RawDockerfile, RawNode};

/// A parsed, validated Dockerfile. Words are as written: `$VAR` expansion happens in `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The name the caller gave; only used in messages.
    pub file: String,
    pub escape: char,
    pub directives: Vec<Directive>,
    /// The ARGs before the first FROM: visible to FROM lines, and to stages that redeclare them.
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
    /// The source text, so later stages can render diagnostics with the offending line.
    pub(crate) text: String,
}

/// One `FROM` and the instructions up to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub index: u32,
    /// The `AS` name, lowercased.
    pub name: Option<String>,
    /// The image or stage name after FROM, unexpanded.
    pub base: String,
    pub platform: Option<String>,
    /// The FROM line.
    pub span: Span,
    pub instructions: Vec<Instruction>,
}

/// Where an instruction is: first and last line (1-based, continuation and heredoc lines
/// included) and the column of its keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    pub start_line: u32,
    pub end_line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub span: Span,
    pub kind: InstructionKind,
}

/// The command of RUN, CMD, ENTRYPOINT and HEALTHCHECK CMD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// JSON form: run as is, no shell.
    Exec(Vec<String>),
    /// Shell form: handed to the stage's SHELL.
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub command: Command,
    pub heredocs: Vec<Heredoc>,
    pub mounts: Vec<String>,
    pub network: Option<String>,
    pub security: Option<String>,
}

/// COPY and ADD: which flags apply depends on the instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCopy {
    /// Context paths, URLs or patterns; heredoc markers are not among them.
    pub sources: Vec<String>,
    pub dest: String,
    /// Inline files (`COPY <<EOF /dst`).
    pub heredocs: Vec<Heredoc>,
    /// COPY only: a stage name, a stage index or an image.
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    /// COPY only.
    pub parents: bool,
    pub exclude: Vec<String>,
    /// ADD only.
    pub checksum: Option<String>,
    /// ADD only.
    pub keep_git_dir: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    None,
    Cmd {
        test: Command,
        interval: Option<Duration>,
        timeout: Option<Duration>,
        start_period: Option<Duration>,
        start_interval: Option<Duration>,
        retries: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    Run(Run),
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    Copy(FileCopy),
    Add(FileCopy),
    /// Key/value pairs, unexpanded.
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Arg(Vec<ArgDecl>),
    Expose(Vec<String>),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    StopSignal(String),
    Maintainer(String),
    Healthcheck(Healthcheck),
    /// The trigger instruction as written; it runs in images built from this one.
    Onbuild(String),
}

impl InstructionKind {
    /// The keyword, upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            InstructionKind::Run(_) => "RUN",
            InstructionKind::Cmd(_) => "CMD",
            InstructionKind::Entrypoint(_) => "ENTRYPOINT",
            InstructionKind::Shell(_) => "SHELL",
            InstructionKind::Copy(_) => "COPY",
            InstructionKind::Add(_) => "ADD",
            InstructionKind::Env(_) => "ENV",
            InstructionKind::Label(_) => "LABEL",
            InstructionKind::Arg(_) => "ARG",
            InstructionKind::Expose(_) => "EXPOSE",
            InstructionKind::Volume(_) => "VOLUME",
            InstructionKind::User(_) => "USER",
            InstructionKind::Workdir(_) => "WORKDIR",
            InstructionKind::StopSignal(_) => "STOPSIGNAL",
            InstructionKind::Maintainer(_) => "MAINTAINER",
            InstructionKind::Healthcheck(_) => "HEALTHCHECK",
            InstructionKind::Onbuild(_) => "ONBUILD",
        }
    }
}

impl Dockerfile {
    fn has_stage(&self, name: &str) -> bool {
        self.stages.iter().any(|s| s.name.as_deref() == Some(name))
    }

    /// A diagnostic at `span` of this file.
    pub(crate) fn error(
        &self,
        span: Span,
        keyword: &str,
        kind: DiagnosticKind,
        message: impl Into<String>,
    ) -> Diagnostic {
        let column = span.column;
        Diagnostic::new(
            kind,
            &self.file,
            &self.text,
            span.start_line,
            column,
            keyword,
            message,
        )
    }
}

/// Validates the raw parse of `text` into a [`Dockerfile`].
pub(crate) fn build(raw: RawDockerfile, text: &str, file: &str) -> Result<Dockerfile, Diagnostic> {
    let mut df = Dockerfile {
        file: file.to_owned(),
        escape: raw.escape,
        directives: raw.directives,
        global_args: Vec::new(),
        stages: Vec::new(),
        text: text.to_owned(),
    };
    let mut last_span = None;
    for node in raw.nodes {
        let cx = Cx {
            df: &df,
            node: &node,
        };
        let span = cx.span();
        last_span = Some(span);
        if node.keyword.eq_ignore_ascii_case("from") {
            let stage = cx.stage(df.stages.len() as u32)?;
            if let Some(name) = stage.name.as_ref().filter(|n| df.has_stage(n)) {
                let message = format!("duplicate stage name {name:?}");
                return Err(df.error(span, &node.keyword, DiagnosticKind::Semantic, message));
            }
            df.stages.push(stage);
            continue;
        }
        let instruction = cx.instruction()?;
        let keyword = instruction.kind.keyword();
        match df.stages.last_mut() {
            Some(stage) => stage.instructions.push(instruction),
            None if keyword == "ARG" => df.global_args.push(instruction),
            None => {
                let message = format!("{keyword} before the first FROM: only ARG may precede FROM");
                return Err(df.error(span, &node.keyword, DiagnosticKind::Semantic, message));
            }
        }
    }
    if df.stages.is_empty() {
        let span = last_span.unwrap_or(Span {
            start_line: 1,
            end_line: 1,
            column: 1,
        });
        return Err(df.error(
            span,
            "",
            DiagnosticKind::Semantic,
            "no FROM instruction: nothing to build",
        ));
    }
    Ok(df)
}

/// The context of validating one node.
struct Cx<'a> {
    df: &'a Dockerfile,
    node: &'a RawNode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Value,
    /// May repeat; every value is kept.
    Values,
}

/// Parsed flags: (name, value) in order, booleans as `"true"`/`"false"`.
struct Flags(Vec<(&'static str, String)>);

impl Flags {
    fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn bool(&self, name: &str) -> bool {
        self.value(name).as_deref() == Some("true")
    }
}

impl Cx<'_> {
    fn span(&self) -> Span {
        Span {
            start_line: self.node.start_line,
            end_line: self.node.end_line,
            column: self.node.column,
        }
    }

    fn error(&self, kind: DiagnosticKind, message: impl Into<String>) -> Diagnostic {
        self.df
            .error(self.span(), &self.node.keyword, kind, message)
    }

    /// An error about flag `--name`, pointing at it when it is on the instruction's first line.
    fn flag_error(&self, kind: DiagnosticKind, name: &str, message: String) -> Diagnostic {
        let mut diagnostic = self.error(kind, message);
        diagnostic.point_at_flag(name);
        diagnostic
    }

    fn keyword(&self) -> String {
        self.node.keyword.to_ascii_uppercase()
    }

    /// Checks the node's flags against what its instruction accepts.
    fn flags(&self, allowed: &[(&'static str, FlagKind)]) -> Result<Flags, Diagnostic> {
        let mut parsed: Vec<(&'static str, String)> = Vec::new();
        for flag in &self.node.flags {
            let body = flag.strip_prefix("--").unwrap_or(flag);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(name, kind)) = allowed.iter().find(|(n, _)| *n == name) else {
                return Err(self.flag_error(
                    DiagnosticKind::UnknownFlag,
                    name,
                    format!("unknown flag: --{name}"),
                ));
            };
            if kind != FlagKind::Values && parsed.iter().any(|(n, _)| *n == name) {
                return Err(self.flag_error(
                    DiagnosticKind::BadFlag,
                    name,
                    format!("duplicate flag specified: --{name}"),
                ));
            }
            let value = match (kind, value) {
                (FlagKind::Bool, None) => "true".to_owned(),
                (_, Some("")) if kind == FlagKind::Bool => {
                    return Err(self.flag_error(
                        DiagnosticKind::BadFlag,
                        name,
                        format!("missing a value on flag: --{name}"),
                    ));
                }
                (FlagKind::Bool, Some(v)) if v.eq_ignore_ascii_case("true") => "true".to_owned(),
                (FlagKind::Bool, Some(v)) if v.eq_ignore_ascii_case("false") => "false".to_owned(),
                (FlagKind::Bool, Some(v)) => {
                    return Err(self.flag_error(
                        DiagnosticKind::BadFlag,
                        name,
                        format!("expecting boolean value for flag --{name}, not: {v}"),
                    ));
                }
                (_, Some(v)) => v.to_owned(),
                (_, None) => {
                    return Err(self.flag_error(
                        DiagnosticKind::BadFlag,
                        name,
                        format!("missing a value on flag: --{name}"),
                    ));
                }
            };
            parsed.push((name, value));
        }
        Ok(Flags(parsed))
    }

    fn syntax(&self, message: impl Into<String>) -> Diagnostic {
        self.error(DiagnosticKind::Syntax, message)
    }

    fn at_least_one(&self) -> Result<(), Diagnostic> {
        if self.node.args.is_empty() {
            return Err(self.syntax(format!("{} requires at least one argument", self.keyword())));
        }
        Ok(())
    }

    fn exactly_one(&self) -> Result<String, Diagnostic> {
        match self.node.args.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(self.syntax(format!("{} requires exactly one argument", self.keyword()))),
        }
    }

    fn stage(&self, index: u32) -> Result<Stage, Diagnostic> {
        let flags = self.flags(&[("platform", FlagKind::Value)])?;
        let args = &self.node.args;
        let name = match args.as_slice() {
            [_] => None,
            [_, r#as, name] if r#as.eq_ignore_ascii_case("as") => Some(name.to_lowercase()),
            _ => return Err(self.syntax("FROM requires either one or three arguments")),
        };
        if let Some(name) = &name {
            let mut chars = name.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid {
                return Err(self.error(
                    DiagnosticKind::Semantic,
                    format!("invalid name for build stage: {name:?}, name can't start with a number or contain symbols"),
                ));
            }
        }
        Ok(Stage {
            index,
            name,
            base: args[0].clone(),
            platform: flags.value("platform"),
            span: self.span(),
            instructions: Vec::new(),
        })
    }

    fn instruction(&self) -> Result<Instruction, Diagnostic> {
        let node = self.node;
        let keyword = node.keyword.to_ascii_lowercase();
        if !matches!(keyword.as_str(), "run" | "copy" | "add" | "healthcheck") {
            self.flags(&[])?;
        }
        let kind = match keyword.as_str() {
            "run" => self.run()?,
            "cmd" => InstructionKind::Cmd(self.command()?),
            "entrypoint" => InstructionKind::Entrypoint(self.command()?),
            "shell" => {
                if !node.json {
                    return Err(self.syntax("SHELL requires the arguments to be in JSON form"));
                }
                self.at_least_one()?;
                InstructionKind::Shell(node.args.clone())
            }
            "copy" => InstructionKind::Copy(self.file_copy(true)?),
            "add" => InstructionKind::Add(self.file_copy(false)?),
            "env" => InstructionKind::Env(self.pairs()?),
            "label" => InstructionKind::Label(self.pairs()?),
            "arg" => self.arg()?,
            "expose" => {
                self.at_least_one()?;
                InstructionKind::Expose(node.args.clone())
            }
            "volume" => {
                self.at_least_one()?;
                if node.args.iter().any(|a| a.trim().is_empty()) {
                    return Err(self.syntax("VOLUME specified can not be an empty string"));
                }
                InstructionKind::Volume(node.args.iter().map(|a| a.trim().to_owned()).collect())
            }
            "user" => InstructionKind::User(self.exactly_one()?),
            "workdir" => InstructionKind::Workdir(self.exactly_one()?),
            "stopsignal" => InstructionKind::StopSignal(self.exactly_one()?),
            "maintainer" => InstructionKind::Maintainer(self.exactly_one()?),
            "healthcheck" => InstructionKind::Healthcheck(self.healthcheck()?),
            "onbuild" => self.onbuild()?,
            _ => {
                return Err(self.error(
                    DiagnosticKind::UnknownInstruction,
                    format!("unknown instruction: {}", self.keyword()),
                ));
            }
        };
        Ok(Instruction {
            span: self.span(),
            kind,
        })
    }

    /// CMD and ENTRYPOINT: `[]` is a valid empty exec form, an empty shell form is not.
    fn command(&self) -> Result<Command, Diagnostic> {
        if !self.node.json {
            self.at_least_one()?;
        }
        Ok(self.command_of(&self.node.args))
    }

    /// `args` as the command they spell in this node's form.
    fn command_of(&self, args: &[String]) -> Command {
        if self.node.json {
            Command::Exec(args.to_vec())
        } else {
            Command::Shell(args.concat())
        }
    }

    fn run(&self) -> Result<InstructionKind, Diagnostic> {
        let flags = self.flags(&[
            ("mount", FlagKind::Values),
            ("network", FlagKind::Value),
            ("security", FlagKind::Value),
        ])?;
        let network = flags.value("network");
        if let Some(n) = network
            .as_deref()
            .filter(|n| !matches!(*n, "default" | "none" | "host"))
        {
            return Err(self.flag_error(
                DiagnosticKind::BadFlag,
                "network",
                format!("unsupported network mode: {n}"),
            ));
        }
        let security = flags.value("security");
        if let Some(s) = security
            .as_deref()
            .filter(|s| !matches!(*s, "sandbox" | "insecure"))
        {
            return Err(self.flag_error(
                DiagnosticKind::BadFlag,
                "security",
                format!("unsupported security mode: {s}"),
            ));
        }
        if self.node.args.is_empty() {
            return Err(self.syntax("RUN requires at least one argument"));
        }
        Ok(InstructionKind::Run(Run {
            command: self.command_of(&self.node.args),
            heredocs: self.node.heredocs.clone(),
            mounts: flags.values("mount"),
            network,
            security,
        }))
    }

    fn file_copy(&self, is_copy: bool) -> Result<FileCopy, Diagnostic> {
        let shared = [
            ("chown", FlagKind::Value),
            ("chmod", FlagKind::Value),
            ("link", FlagKind::Bool),
            ("exclude", FlagKind::Values),
        ];
        let own: &[_] = if is_copy {
            &[("from", FlagKind::Value), ("parents", FlagKind::Bool)]
        } else {
            &[
                ("checksum", FlagKind::Value),
                ("keep-git-dir", FlagKind::Bool),
            ]
        };
        let flags = self.flags(&[&shared[..], own].concat())?;
        let Some((dest, sources)) = self.node.args.split_last().filter(|(_, s)| !s.is_empty())
        else {
            return Err(self.syntax(format!(
                "{} requires at least two arguments, but only one was provided. Destination could not be determined",
                self.keyword()
            )));
        };
        let is_marker = |a: &String| {
            !self.node.heredocs.is_empty()
                && a.trim_start_matches(|c: char| c.is_ascii_digit())
                    .starts_with("<<")
        };
        if is_marker(dest) {
            return Err(self.syntax(format!(
                "{} cannot accept a heredoc as a destination",
                self.keyword()
            )));
        }
        Ok(FileCopy {
            sources: sources.iter().filter(|a| !is_marker(a)).cloned().collect(),
            dest: dest.clone(),
            heredocs: self.node.heredocs.clone(),
            from: flags.value("from"),
            chown: flags.value("chown"),
            chmod: flags.value("chmod"),
            link: flags.bool("link"),
            parents: flags.bool("parents"),
            exclude: flags.values("exclude"),
            checksum: flags.value("checksum"),
            keep_git_dir: flags.bool("keep-git-dir"),
        })
    }

    /// ENV and LABEL: the raw parse already made key, value, separator triples.
    fn pairs(&self) -> Result<Vec<(String, String)>, Diagnostic> {
        self.at_least_one()?;
        let pairs: Vec<_> = self
            .node
            .args
            .chunks(3)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        if pairs.iter().any(|(k, _)| k.is_empty()) {
            return Err(self.syntax(format!("{} names can not be blank", self.keyword())));
        }
        Ok(pairs)
    }

    fn arg(&self) -> Result<InstructionKind, Diagnostic> {
        self.at_least_one()?;
        let decls = self
            .node
            .args
            .iter()
            .map(|word| match word.split_once('=') {
                Some((name, default)) => ArgDecl {
                    name: name.to_owned(),
                    default: Some(default.to_owned()),
                },
                None => ArgDecl {
                    name: word.clone(),
                    default: None,
                },
            })
            .collect::<Vec<_>>();
        if decls.iter().any(|d| d.name.is_empty()) {
            return Err(self.syntax("ARG names can not be blank"));
        }
        Ok(InstructionKind::Arg(decls))
    }

    fn healthcheck(&self) -> Result<Healthcheck, Diagnostic> {
        let flags = self.flags(&[
            ("interval", FlagKind::Value),
            ("timeout", FlagKind::Value),
            ("start-period", FlagKind::Value),
            ("start-interval", FlagKind::Value),
            ("retries", FlagKind::Value),
        ])?;
        let Some((kind, args)) = self.node.args.split_first() else {
            return Err(self.syntax("HEALTHCHECK requires at least one argument"));
        };
        match kind.to_ascii_uppercase().as_str() {
            "NONE" if args.is_empty() => Ok(Healthcheck::None),
            "NONE" => Err(self.syntax("HEALTHCHECK NONE takes no arguments")),
            "CMD" if args.is_empty() => Err(self.syntax("Missing command after HEALTHCHECK CMD")),
            "CMD" => {
                let test = self.command_of(args);
                let retries = match flags.value("retries") {
                    None => None,
                    Some(r) => Some(r.parse::<u32>().map_err(|_| {
                        self.flag_error(
                            DiagnosticKind::BadFlag,
                            "retries",
                            format!("--retries must be a non-negative integer, not {r:?}"),
                        )
                    })?),
                };
                Ok(Healthcheck::Cmd {
                    test,
                    interval: self.interval(&flags, "interval")?,
                    timeout: self.interval(&flags, "timeout")?,
                    start_period: self.interval(&flags, "start-period")?,
                    start_interval: self.interval(&flags, "start-interval")?,
                    retries,
                })
            }
            other => Err(self.error(
                DiagnosticKind::Semantic,
                format!("Unknown type {other:?} in HEALTHCHECK (try CMD)"),
            )),
        }
    }

    /// A HEALTHCHECK duration flag: a Go duration, zero (the default) or at least 1ms.
    fn interval(&self, flags: &Flags, name: &str) -> Result<Option<Duration>, Diagnostic> {
        let Some(text) = flags.value(name) else {
            return Ok(None);
        };
        let bad =
            |why: &str| self.flag_error(DiagnosticKind::BadFlag, name, format!("--{name}: {why}"));
        let duration =
            parse_go_duration(&text).ok_or_else(|| bad(&format!("invalid duration {text:?}")))?;
        if !duration.is_zero() && duration < Duration::from_millis(1) {
            return Err(bad("cannot be less than 1ms"));
        }
        Ok(Some(duration))
    }

    fn onbuild(&self) -> Result<InstructionKind, Diagnostic> {
        let Some(trigger) = &self.node.child else {
            return Err(self.syntax("ONBUILD requires at least one argument"));
        };
        match trigger.keyword.to_ascii_uppercase().as_str() {
            "ONBUILD" => Err(self.error(
                DiagnosticKind::Semantic,
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            )),
            kw @ ("FROM" | "MAINTAINER") => Err(self.error(
                DiagnosticKind::Semantic,
                format!("{kw} isn't allowed as an ONBUILD trigger"),
            )),
            // The trigger is re-parsed by the child build, heredocs included.
            _ => Ok(InstructionKind::Onbuild(
                trigger
                    .heredocs
                    .iter()
                    .fold(trigger.original.clone(), |text, doc| {
                        format!("{text}\n{}{}", doc.body, doc.name)
                    }),
            )),
        }
    }
}

/// Go's `time.ParseDuration` for non-negative values: `1h30m`, `1.5s`, `300ms`, `0`.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let number: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += number * nanos;
        rest = after;
    }
    (total <= u64::MAX as f64).then(|| Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::parse;

    #[test]
    fn unknown_flags_fail_in_the_typed_layer_only() {
        let text = "FROM alpine\nCOPY --user=me foo /tmp/\n";
        assert!(crate::frontend::dump(text).is_ok());
        let err = parse(text, "Dockerfile").unwrap_err();
        assert_eq!(err.kind, DiagnosticKind::UnknownFlag);
        assert_eq!((err.line, err.column, err.keyword.as_str()), (2, 6, "COPY"));
        assert_eq!(err.message, "unknown flag: --user");
        assert_eq!(
            err.to_string(),
            "Dockerfile:2:6: unknown flag: --user\nCOPY --user=me foo /tmp/\n     ^"
        );
    }

    #[test]
    fn flags_are_typed_and_checked() {
        let df = parse(
            "FROM alpine\nCOPY --from=build --chown=1:2 --link --exclude=*.md --exclude=x a b /d/\nADD --checksum=sha256:00 --keep-git-dir=false https://x/y /y\n",
            "D",
        )
        .unwrap();
        let InstructionKind::Copy(copy) = &df.stages[0].instructions[0].kind else {
            panic!()
        };
        assert_eq!(copy.from.as_deref(), Some("build"));
        assert_eq!(copy.chown.as_deref(), Some("1:2"));
        assert!(copy.link && !copy.parents);
        assert_eq!(copy.exclude, ["*.md", "x"]);
        assert_eq!(
            (copy.sources.as_slice(), copy.dest.as_str()),
            (&["a".to_owned(), "b".to_owned()][..], "/d/")
        );
        let InstructionKind::Add(add) = &df.stages[0].instructions[1].kind else {
            panic!()
        };
        assert_eq!(add.checksum.as_deref(), Some("sha256:00"));
        assert!(!add.keep_git_dir);

        for bad in [
            "FROM a\nADD --from=x a b\n",
            "FROM a\nCOPY --link=maybe a b\n",
            "FROM a\nCOPY --link= a b\n",
            "FROM a\nCOPY a <<EOF\nx\nEOF\n",
            "FROM a\nCOPY --from a b\n",
            "FROM a\nCOPY --from=x --from=y a b\n",
            "FROM a\nRUN --network=wifi true\n",
            "FROM a\nHEALTHCHECK --interval=5 CMD true\n",
            "FROM a\nHEALTHCHECK --retries=-1 CMD true\n",
            "FROM a\nWORKDIR --parents /x\n",
        ] {
            assert!(parse(bad, "D").is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn heredocs_become_copy_contents_and_run_scripts() {
        let df = parse(
            "FROM a\nCOPY <<EOF /etc/x\nhello\nEOF\nRUN <<EOF\nset -e\nEOF\n",
            "D",
        )
        .unwrap();
        let InstructionKind::Copy(copy) = &df.stages[0].instructions[0].kind else {
            panic!()
        };
        assert!(copy.sources.is_empty());
        assert_eq!(copy.heredocs[0].body, "hello\n");
        let InstructionKind::Run(run) = &df.stages[0].instructions[1].kind else {
            panic!()
        };
        assert_eq!(run.command, Command::Shell("<<EOF".to_owned()));
        assert_eq!(run.heredocs[0].body, "set -e\n");
    }

    #[test]
    fn rejects_what_buildkit_rejects() {
        for bad in [
            "",
            "# only\n\n",
            "FROM a\nFOO bar\n",
            "RUN true\n",
            "ARG X\n",
            "FROM a AS 1x\n",
            "FROM a AS b\nFROM c AS b\n",
            "FROM a b\n",
            "FROM a\nSHELL /bin/sh\n",
            "FROM a\nCOPY onlyone\n",
            "FROM a\nENV\n",
            "FROM a\nONBUILD ONBUILD RUN x\n",
            "FROM a\nONBUILD FROM x\n",
            "FROM a\nHEALTHCHECK FOO x\n",
            "FROM a\nCMD [\"a\", 1]\n",
            "FROM a\nUSER\n",
        ] {
            assert!(parse(bad, "D").is_err(), "{bad:?} should fail");
        }
        let err = parse("", "D").unwrap_err();
        assert_eq!(err.message, "file has no instructions");
    }

    #[test]
    fn onbuild_keeps_its_trigger_with_heredocs() {
        let df = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n", "D").unwrap();
        let kind = &df.stages[0].instructions[0].kind;
        assert_eq!(
            *kind,
            InstructionKind::Onbuild("RUN <<EOF\necho hi\nEOF".to_owned())
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("-5s"), None);
    }
}
