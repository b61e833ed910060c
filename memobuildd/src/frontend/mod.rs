//! Dockerfile frontend: text → validated instructions, BuildKit-compatible.
//!
//! Owns lexing and parsing (parser directives, continuations with the active escape char,
//! comments, heredocs, flags, JSON exec form), shell-word expansion ([`shell`]), the instruction
//! AST with line spans, and [`Diagnostic`], the error every stage of the data flow reports
//! Dockerfile positions with. The main type is [`Dockerfile`], made by [`parse`]; [`dump`] gives
//! BuildKit's `result` dump of the raw parse, for conformance tests. The next stage is `plan`,
//! which expands ARG/ENV and lowers a [`Dockerfile`] to the build graph.
//!
//! Two layers, as in BuildKit: the raw parse (`syntax`, `parser.Parse` upstream) splits text and
//! accepts any keyword and flag; the typed layer (`instructions`, `instructions.Parse`) checks
//! keywords, flags and argument counts. The frontend does no I/O.

mod diagnostic;
mod dump;
mod instructions;
mod mount;
pub mod shell;
mod syntax;

pub use diagnostic::{Diagnostic, DiagnosticKind};
pub use instructions::{
    ArgDecl, Command, Dockerfile, FileCopy, Healthcheck, Instruction, InstructionKind, Run, Span,
    Stage,
};
pub use mount::{MountError, MountKind, RunMount, Sharing, parse_mounts};
pub use syntax::{Directive, Heredoc};

/// Parses and validates a Dockerfile; `file` only names it in diagnostics.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile, Diagnostic> {
    let raw = syntax::parse_raw(text, file)?;
    instructions::build(raw, text, file)
}

/// BuildKit's dump of the raw parse of `text`, one line per instruction, no final newline.
pub fn dump(text: &str) -> Result<String, Diagnostic> {
    let raw = syntax::parse_raw(text, "Dockerfile")?;
    Ok(dump::dump_nodes(&raw.nodes))
}

/// The first and last line of every instruction of the raw parse, in order.
pub fn line_ranges(text: &str) -> Result<Vec<(u32, u32)>, Diagnostic> {
    let raw = syntax::parse_raw(text, "Dockerfile")?;
    Ok(raw
        .nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect())
}
