//! The one error type of the frontend and the planner: a message pinned to a Dockerfile position.

use std::fmt;

/// What went wrong, for callers that react to the kind rather than the words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiagnosticKind {
    /// The text is not a Dockerfile: bad directive, JSON, continuation, heredoc, missing arguments.
    Syntax,
    /// An instruction flag the instruction does not know.
    UnknownFlag,
    /// A known flag with a bad value, a missing value, or given twice.
    BadFlag,
    /// A keyword that is not a Dockerfile instruction.
    UnknownInstruction,
    /// `$`-expansion failed: bad substitution, `${V:?msg}`, unterminated quote.
    Expansion,
    /// A stage reference that names no earlier stage (index out of range, later stage, itself).
    StageReference,
    /// Any other rule about what an instruction may say (stage names, HEALTHCHECK, ONBUILD, ...).
    Semantic,
    /// A flag, mount option or value BuildKit implements and MemoBuild does not yet: refused
    /// rather than ignored.
    Unsupported,
}

/// A frontend or planner error at a position of a Dockerfile.
///
/// Renders as `FILE:LINE:COL: MESSAGE`, then the source line and a caret under the column,
/// so a terminal shows exactly where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostic {
    /// The path or name the caller gave for the Dockerfile; only used in messages.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// The instruction keyword in upper case (`RUN`), empty when the error is about no instruction.
    pub keyword: String,
    pub kind: DiagnosticKind,
    pub message: String,
    /// The text of `line`, kept so the diagnostic renders without the Dockerfile at hand.
    pub source_line: String,
}

impl Diagnostic {
    /// A diagnostic at `line`/`column` of `text`; out-of-range lines render with an empty source.
    pub(crate) fn new(
        kind: DiagnosticKind,
        file: &str,
        text: &str,
        line: u32,
        column: u32,
        keyword: &str,
        message: impl Into<String>,
    ) -> Self {
        let source_line = source_line(text, line).to_owned();
        Diagnostic {
            file: file.to_owned(),
            line: line.max(1),
            column: column.max(1),
            keyword: keyword.to_ascii_uppercase(),
            kind,
            message: message.into(),
            source_line,
        }
    }
}

impl Diagnostic {
    /// Moves the column to flag `--name` when the source line shows it.
    pub(crate) fn point_at_flag(&mut self, name: &str) {
        if name.is_empty() {
            return;
        }
        if let Some(at) = self.source_line.find(&format!("--{name}")) {
            self.column = self.source_line[..at].chars().count() as u32 + 1;
        }
    }
}

/// Line `line` (1-based) of `text` without its line ending.
pub(crate) fn source_line(text: &str, line: u32) -> &str {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let line = text
        .split('\n')
        .nth(line.saturating_sub(1) as usize)
        .unwrap_or("");
    line.strip_suffix('\r').unwrap_or(line)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        writeln!(f, "{}", self.source_line)?;
        // Reuse the source's own tabs so the caret lines up however the terminal expands them.
        let pad: String = self
            .source_line
            .chars()
            .chain(std::iter::repeat(' '))
            .take(self.column as usize - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad}^")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_position_source_and_caret() {
        let text = "FROM alpine\n\tRUN --bogus=1 true\n";
        let d = Diagnostic::new(
            DiagnosticKind::UnknownFlag,
            "Dockerfile",
            text,
            2,
            6,
            "run",
            "unknown flag: --bogus",
        );
        assert_eq!(
            d.to_string(),
            "Dockerfile:2:6: unknown flag: --bogus\n\tRUN --bogus=1 true\n\t    ^"
        );
        assert_eq!(d.keyword, "RUN");
    }
}
