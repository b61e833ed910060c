//! `.dockerignore` rules with Docker's meaning, which is not gitignore's:
//!
//! - every pattern is rooted at the context and cleaned like Go's `filepath.Clean`
//!   (`/build/`, `./build` and `build` are the same pattern);
//! - `*` and `?` stop at `/`, `[...]` is a character class, `**` spans directories;
//! - a pattern that matches a directory matches everything below it;
//! - `!pattern` re-includes, the last matching pattern wins, and an exception can reach inside
//!   an excluded directory (so such directories are still walked).
//!
//! Main type: [`IgnoreRules`]; the walker (`context::walk`) asks it about every path.

use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum IgnoreError {
    #[error("{file}:{line}: illegal exclusion pattern {pattern:?}")]
    EmptyException {
        file: String,
        line: usize,
        pattern: String,
    },
    #[error("{file}:{line}: syntax error in pattern {pattern:?}: {message}")]
    BadPattern {
        file: String,
        line: usize,
        pattern: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
struct Pattern {
    exception: bool,
    regex: Regex,
}

/// Compiled `.dockerignore` patterns.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    patterns: Vec<Pattern>,
    has_exceptions: bool,
}

impl IgnoreRules {
    /// Parses the text of a `.dockerignore`; `file` only names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rules = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            // A comment only when `#` is the very first character, as in Docker.
            if raw.starts_with('#') {
                continue;
            }
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let (exception, body) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, trimmed),
            };
            if exception && body.is_empty() {
                return Err(IgnoreError::EmptyException {
                    file: file.to_owned(),
                    line,
                    pattern: trimmed.to_owned(),
                });
            }
            let cleaned = clean(body);
            let cleaned = cleaned.strip_prefix('/').unwrap_or(&cleaned);
            let cleaned = if cleaned.is_empty() { "." } else { cleaned };
            let regex = Regex::new(&to_regex(cleaned)).map_err(|err| IgnoreError::BadPattern {
                file: file.to_owned(),
                line,
                pattern: trimmed.to_owned(),
                message: err.to_string(),
            })?;
            rules.has_exceptions |= exception;
            rules.patterns.push(Pattern { exception, regex });
        }
        Ok(rules)
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (context-relative, `/`-separated, no leading `./`) is excluded.
    pub fn is_excluded(&self, path: &str) -> bool {
        let mut excluded = false;
        for pattern in &self.patterns {
            // Only a pattern that could flip the current answer is worth evaluating.
            if pattern.exception != excluded {
                continue;
            }
            if matches_self_or_parent(&pattern.regex, path) {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether an excluded directory must still be walked because an exception might
    /// re-include something below it.
    pub fn may_reinclude_below(&self) -> bool {
        self.has_exceptions
    }
}

fn matches_self_or_parent(regex: &Regex, path: &str) -> bool {
    if regex.is_match(path) {
        return true;
    }
    path.match_indices('/')
        .any(|(slash, _)| regex.is_match(&path[..slash]))
}

/// Go's `filepath.Clean` for `/`-separated paths.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Translates a cleaned pattern to an anchored regex, as Docker's pattern matcher does.
fn to_regex(pattern: &str) -> String {
    let mut out = String::from("^");
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(ch) = chars.next() {
        if in_class {
            match ch {
                ']' => {
                    in_class = false;
                    out.push(']');
                }
                '\\' => push_escaped(&mut out, chars.next().unwrap_or('\\')),
                '[' => out.push_str("\\["),
                other => out.push(other),
            }
            continue;
        }
        match ch {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                // `**/` is `**`: the slash is part of what `**` may span.
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    out.push_str(".*");
                } else {
                    out.push_str("(.*/)?");
                }
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            '[' => {
                in_class = true;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    chars.next();
                    out.push('^');
                }
            }
            '\\' => push_escaped(&mut out, chars.next().unwrap_or('\\')),
            other => push_escaped(&mut out, other),
        }
    }
    if in_class {
        // An unterminated class is literal text in Go's matcher; make the regex agree.
        let start = out.rfind('[').unwrap_or(0);
        let literal: String = out[start..].chars().collect();
        out.truncate(start);
        for ch in literal.chars() {
            push_escaped(&mut out, ch);
        }
    }
    out.push('$');
    out
}

fn push_escaped(out: &mut String, ch: char) {
    if regex_syntax_meta(ch) {
        out.push('\\');
    }
    out.push(ch);
}

fn regex_syntax_meta(ch: char) -> bool {
    matches!(
        ch,
        '\\' | '.'
            | '+'
            | '*'
            | '?'
            | '('
            | ')'
            | '|'
            | '['
            | ']'
            | '{'
            | '}'
            | '^'
            | '$'
            | '#'
            | '&'
            | '-'
            | '~'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> IgnoreRules {
        IgnoreRules::parse(text, ".dockerignore").expect("valid rules")
    }

    /// (patterns, path, excluded?)
    const CASES: &[(&str, &str, bool)] = &[
        // Rooted and cleaned: all of these are the same pattern.
        ("build", "build", true),
        ("build/", "build", true),
        ("/build", "build", true),
        ("./build", "build", true),
        ("build/../build", "build", true),
        ("build", "build/out/a.o", true),
        ("build", "src/build", false),
        // `*` and `?` stop at slashes.
        ("*.md", "README.md", true),
        ("*.md", "docs/guide.md", false),
        ("*/*.md", "docs/guide.md", true),
        ("?.txt", "a.txt", true),
        ("?.txt", "ab.txt", false),
        ("a?b", "a/b", false),
        // `**` spans any number of directories, including none.
        ("**/x", "x", true),
        ("**/x", "a/b/x", true),
        ("**/x", "a/b/xy", false),
        ("**/*.go", "cmd/main.go", true),
        ("a/**/b", "a/b", true),
        ("a/**/b", "a/x/y/b", true),
        ("a/**", "a/x/y", true),
        ("**", "anything/at/all", true),
        // Character classes, ranges and negation.
        ("[abc].txt", "b.txt", true),
        ("[abc].txt", "d.txt", false),
        ("[a-c]x", "cx", true),
        ("[^a]x", "ax", false),
        ("[^a]x", "bx", true),
        // Escapes make metacharacters literal; regex syntax is not pattern syntax.
        ("\\*.txt", "*.txt", true),
        ("\\*.txt", "a.txt", false),
        ("a+b", "a+b", true),
        ("a.b", "axb", false),
        ("(x)", "(x)", true),
        // Last match wins.
        ("*.md\n!README.md", "README.md", false),
        ("*.md\n!README.md", "CHANGES.md", true),
        ("!README.md\n*.md", "README.md", true),
        // An exception reaches inside an excluded directory.
        ("vendor\n!vendor/keep", "vendor/keep", false),
        ("vendor\n!vendor/keep", "vendor/keep/file.go", false),
        ("vendor\n!vendor/keep", "vendor/other.go", true),
        (
            "**/node_modules\n!**/node_modules/.bin",
            "web/node_modules/.bin",
            false,
        ),
        // Comments only at the start of a line; blank lines ignored.
        ("# build\n\n   \nbuild", "build", true),
        ("#build", "build", false),
        (" spaced.txt ", "spaced.txt", true),
        // A pattern may ignore the Dockerfile itself (and the ignore file).
        ("Dockerfile\n.dockerignore", "Dockerfile", true),
        ("Dockerfile\n.dockerignore", ".dockerignore", true),
        // Go's Clean resolves `..`; a pattern cannot escape the context.
        ("../secret", "secret", false),
        ("/../secret", "secret", true),
    ];

    #[test]
    fn docker_semantics_table() {
        let failures: Vec<String> = CASES
            .iter()
            .filter(|(patterns, path, excluded)| rules(patterns).is_excluded(path) != *excluded)
            .map(|(patterns, path, excluded)| {
                format!("patterns {patterns:?} path {path:?}: expected excluded={excluded}")
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn clean_matches_go() {
        for (input, expected) in [
            ("", "."),
            ("a//b/./c/", "a/b/c"),
            ("a/../..", ".."),
            ("/../a", "/a"),
            ("./", "."),
            ("a/b/../../c", "c"),
        ] {
            assert_eq!(clean(input), expected, "clean({input:?})");
        }
    }

    #[test]
    fn lone_exception_is_an_error_with_line() {
        let err = IgnoreRules::parse("a\n!\n", "ctx/.dockerignore").expect_err("bad");
        assert_eq!(
            err.to_string(),
            "ctx/.dockerignore:2: illegal exclusion pattern \"!\""
        );
    }

    #[test]
    fn exceptions_are_known_for_walk_pruning() {
        assert!(!rules("a\nb").may_reinclude_below());
        assert!(rules("a\n!a/b").may_reinclude_below());
    }
}
