//! Shell-word expansion as BuildKit's `shell.Lex` does it: quotes, escapes, `$V`, `${V}`,
//! `${V:-x}`, `${V-x}`, `${V:+x}`, `${V+x}`, `${V:?msg}`, `${V?msg}`, `${V#p}`, `${V##p}`,
//! `${V%p}`, `${V%%p}`, `${V/p/r}`, `${V//p/r}`; positional and special parameters are never set.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How deeply `${V:-${W:-...}}` may nest.
const MAX_NESTING: usize = 64;

/// Variables visible to an expansion.
pub trait Env {
    fn lookup(&self, name: &str) -> Option<&str>;
}

impl Env for HashMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl Env for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl Env for [(&str, &str)] {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

/// Why an expansion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExpandError {
    pub message: String,
}

fn fail<T>(message: impl Into<String>) -> Result<T, ExpandError> {
    Err(ExpandError {
        message: message.into(),
    })
}

/// The outcome of expanding one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The word with quotes removed, escapes applied and variables replaced; spaces kept.
    pub word: String,
    /// The same, split into words where unquoted whitespace (also from variables) separates them.
    pub words: Vec<String>,
    /// Every variable name the word referred to, set or not.
    pub referenced: BTreeSet<String>,
}

/// Expands `word` against `env` with `escape` as the escape char.
pub fn expand(
    word: &str,
    env: &(impl Env + ?Sized),
    escape: char,
) -> Result<Expansion, ExpandError> {
    run(word, env, escape, true)
}

/// Expands a heredoc body (`COPY <<EOF` with an unquoted delimiter): quotes are the file's own
/// text, so only `$` and the `\` escape are processed.
pub fn expand_heredoc(body: &str, env: &(impl Env + ?Sized)) -> Result<Expansion, ExpandError> {
    run(body, env, '\\', false)
}

fn run(
    word: &str,
    env: &(impl Env + ?Sized),
    escape: char,
    quotes: bool,
) -> Result<Expansion, ExpandError> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        quotes,
        raw_escapes: false,
        depth: 0,
        env,
        referenced: BTreeSet::new(),
    };
    let (word, words) = lexer.until(None)?;
    Ok(Expansion {
        word,
        words,
        referenced: lexer.referenced,
    })
}

/// Accumulates the split-words view next to the plain result.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    word: String,
    in_word: bool,
}

impl Words {
    /// A char from unquoted text or a variable value: whitespace separates words.
    fn split_char(&mut self, c: char) {
        if !c.is_whitespace() {
            self.raw_char(c);
        } else if self.in_word && !self.word.is_empty() {
            self.words.push(std::mem::take(&mut self.word));
            self.in_word = false;
        }
    }

    fn raw_char(&mut self, c: char) {
        self.word.push(c);
        self.in_word = true;
    }

    fn raw_str(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

struct Lexer<'e, E: ?Sized> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    /// Whether quotes group and protect text; not in heredoc bodies.
    quotes: bool,
    /// Inside `${V#p}`-style patterns the escape char is kept for the pattern matcher.
    raw_escapes: bool,
    /// How many `${...}` words enclose the current position.
    depth: usize,
    env: &'e E,
    referenced: BTreeSet<String>,
}

impl<E: Env + ?Sized> Lexer<'_, E> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn get(&mut self, name: &str) -> Option<String> {
        self.referenced.insert(name.to_owned());
        self.env.lookup(name).map(str::to_owned)
    }

    /// Processes up to `stop` (consumed) or the end; a missing `stop` is an error.
    fn until(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), ExpandError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match c {
                '$' => {
                    let value = self.dollar()?;
                    value.chars().for_each(|c| words.split_char(c));
                    result.push_str(&value);
                }
                // A heredoc marker keeps the blanks after it, so `<< EOF` stays one word.
                '<' if self.chars.get(self.pos + 1) == Some(&'<') => {
                    let start = self.pos;
                    self.pos += 2;
                    while self.peek().is_some_and(|c| matches!(c, ' ' | '\t' | '\r')) {
                        self.pos += 1;
                    }
                    let marker: String = self.chars[start..self.pos].iter().collect();
                    words.raw_str(&marker);
                    result.push_str(&marker);
                }
                '\'' | '"' if self.quotes => {
                    let value = if c == '\'' {
                        self.single_quoted()?
                    } else {
                        self.double_quoted()?
                    };
                    words.raw_str(&value);
                    result.push_str(&value);
                }
                _ => {
                    self.pos += 1;
                    if c != self.escape {
                        words.split_char(c);
                        result.push(c);
                        continue;
                    }
                    if self.raw_escapes {
                        words.raw_char(c);
                        result.push(c);
                    }
                    // An escape at the very end is dropped.
                    let Some(escaped) = self.next() else { break };
                    words.raw_char(escaped);
                    result.push(escaped);
                }
            }
        }
        match stop {
            Some(stop) => fail(format!(
                "unexpected end of statement while looking for matching {stop}"
            )),
            None => Ok((result, words.finish())),
        }
    }

    /// `'...'`: everything literal, no escapes.
    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return fail(
                        "unexpected end of statement while looking for matching single-quote",
                    );
                }
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    /// `"..."`: `$` expands; the escape char escapes only `"`, `$` and itself.
    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return fail(
                        "unexpected end of statement while looking for matching double-quote",
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    out.push_str(&value);
                }
                Some(c) => {
                    self.pos += 1;
                    if c == self.escape {
                        if self.raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                out.push(n);
                                continue;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    /// `$name`, `${name}` or `${name<op>word}`, with the `$` next.
    fn dollar(&mut self) -> Result<String, ExpandError> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_owned());
            }
            return Ok(self.get(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return fail("syntax error: missing '}'"),
            Some('{' | '}' | ':') => return fail("syntax error: bad substitution"),
            Some(_) => {}
        }
        let name = self.name();
        let mut op = self.next();
        let colon = op == Some(':');
        if colon {
            op = self.next();
        }
        let value = match op {
            Some('}') if !colon => return Ok(self.get(&name).unwrap_or_default()),
            Some('/') if !colon => return self.replace(&name),
            Some(op) => op,
            None => return fail("syntax error: missing '}'"),
        };
        let raw = matches!(value, '#' | '%');
        let word = self.operand(raw)?;
        let current = self.get(&name);
        let unset = current.is_none() || (colon && current.as_deref() == Some(""));
        match value {
            '-' => Ok(if unset {
                word
            } else {
                current.unwrap_or_default()
            }),
            '+' => Ok(if unset { String::new() } else { word }),
            '?' if unset => {
                let why = match (word.is_empty(), current.is_none()) {
                    (false, _) => word,
                    (true, true) => "is not allowed to be unset".to_owned(),
                    (true, false) => "is not allowed to be empty".to_owned(),
                };
                fail(format!("{name}: {why}"))
            }
            '?' => Ok(current.unwrap_or_default()),
            '#' | '%' => {
                let (greedy, pattern) = match word.strip_prefix(value) {
                    Some(p) => (true, p),
                    None => (false, word.as_str()),
                };
                let pattern = Pattern::compile(pattern)?;
                let value_chars: Vec<char> = current.unwrap_or_default().chars().collect();
                Ok(if value == '#' {
                    pattern.trim_prefix(&value_chars, greedy)
                } else {
                    pattern.trim_suffix(&value_chars, greedy)
                })
            }
            _ => {
                let modifier = if colon {
                    format!(":{value}")
                } else {
                    value.to_string()
                };
                fail(format!("unsupported modifier ({modifier}) in substitution"))
            }
        }
    }

    /// The word of `${V<op>word}` up to its closing brace.
    fn operand(&mut self, raw_escapes: bool) -> Result<String, ExpandError> {
        self.delimited('}', raw_escapes, "syntax error: missing '}'")
    }

    /// Text up to `stop`; running out of input is reported as `missing`.
    fn delimited(&mut self, stop: char, raw: bool, missing: &str) -> Result<String, ExpandError> {
        // Nesting recurses; a bound keeps hostile input from exhausting the stack.
        if self.depth == MAX_NESTING {
            return fail("syntax error: substitutions nested too deeply");
        }
        self.depth += 1;
        let saved = std::mem::replace(&mut self.raw_escapes, raw);
        let word = self.until(Some(stop));
        self.raw_escapes = saved;
        self.depth -= 1;
        match word {
            Ok((word, _)) => Ok(word),
            Err(_) if self.peek().is_none() => fail(missing),
            Err(e) => Err(e),
        }
    }

    /// `${V/pattern/replacement}` and `${V//pattern/replacement}`, after the first `/`.
    fn replace(&mut self, name: &str) -> Result<String, ExpandError> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let pattern = self.delimited('/', true, "syntax error: missing '/' in ${}")?;
        let replacement = self.delimited('}', true, "syntax error: missing '}'")?;
        let value: Vec<char> = self.get(name).unwrap_or_default().chars().collect();
        Ok(Pattern::compile(&pattern)?.replace(&value, &replacement, all))
    }

    /// A variable name: letters, digits and `_`; all digits of a positional parameter; or one
    /// special parameter char.
    fn name(&mut self) -> String {
        let mut name = String::new();
        match self.peek() {
            Some(c) if c.is_numeric() => {
                while let Some(c) = self.peek().filter(|c| c.is_numeric()) {
                    name.push(c);
                    self.pos += 1;
                }
                return name;
            }
            Some(c @ ('@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')) => {
                self.pos += 1;
                return c.to_string();
            }
            _ => {}
        }
        while let Some(c) = self.peek().filter(|&c| c.is_alphanumeric() || c == '_') {
            name.push(c);
            self.pos += 1;
        }
        name
    }
}

/// A shell wildcard pattern: `*`, `?` and literals (`\` escapes `*`, `?`, `\`).
#[derive(Debug)]
struct Pattern(Vec<Token>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Star,
    Any,
    Lit(char),
}

impl Pattern {
    fn compile(pattern: &str) -> Result<Self, ExpandError> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Token::Star,
                '?' => Token::Any,
                // Inside `${}` a `}` or `/` needs escaping, but the escape is not pattern.
                '\\' if matches!(chars.peek(), Some('}' | '/')) => continue,
                '\\' => match chars.next() {
                    Some(e @ ('*' | '?' | '\\')) => Token::Lit(e),
                    other => {
                        let other = other.map(String::from).unwrap_or_default();
                        return fail(format!(
                            "invalid pattern ({pattern}) in substitution: invalid escape '\\{other}'"
                        ));
                    }
                },
                c => Token::Lit(c),
            });
        }
        Ok(Pattern(tokens))
    }

    /// Whether the whole of `text` matches, by walking the set of reachable pattern positions
    /// (linear in both lengths, so no pattern backtracks exponentially).
    fn matches(&self, text: &[char]) -> bool {
        let tokens = &self.0;
        let close = |reach: &mut Vec<bool>| {
            for i in 0..tokens.len() {
                if reach[i] && tokens[i] == Token::Star {
                    reach[i + 1] = true;
                }
            }
        };
        let mut reach = vec![false; tokens.len() + 1];
        reach[0] = true;
        close(&mut reach);
        for &c in text {
            let mut next = vec![false; tokens.len() + 1];
            for (i, token) in tokens.iter().enumerate().filter(|&(i, _)| reach[i]) {
                match *token {
                    Token::Star => next[i] = true,
                    Token::Any => next[i + 1] = true,
                    Token::Lit(l) if l == c => next[i + 1] = true,
                    Token::Lit(_) => {}
                }
            }
            close(&mut next);
            reach = next;
        }
        reach[tokens.len()]
    }

    fn trim_prefix(&self, value: &[char], greedy: bool) -> String {
        let mut lens: Box<dyn Iterator<Item = usize>> = if greedy {
            Box::new((0..=value.len()).rev())
        } else {
            Box::new(0..=value.len())
        };
        match lens.find(|&n| self.matches(&value[..n])) {
            Some(n) => value[n..].iter().collect(),
            None => value.iter().collect(),
        }
    }

    fn trim_suffix(&self, value: &[char], greedy: bool) -> String {
        let mut starts: Box<dyn Iterator<Item = usize>> = if greedy {
            Box::new(0..=value.len())
        } else {
            Box::new((0..=value.len()).rev())
        };
        match starts.find(|&s| self.matches(&value[s..])) {
            Some(s) => value[..s].iter().collect(),
            None => value.iter().collect(),
        }
    }

    /// Replaces the leftmost-longest match (or every non-overlapping one) by `replacement`.
    fn replace(&self, value: &[char], replacement: &str, all: bool) -> String {
        let mut out = String::new();
        let mut start = 0;
        let mut replaced = false;
        while start <= value.len() {
            let end = (start..=value.len())
                .rev()
                .find(|&e| self.matches(&value[start..e]));
            match end {
                Some(end) if all || !replaced => {
                    out.push_str(replacement);
                    replaced = true;
                    if end > start {
                        start = end;
                        continue;
                    }
                }
                _ => {}
            }
            if let Some(&c) = value.get(start) {
                out.push(c);
            }
            start += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(input: &str, env: &[(&str, &str)]) -> Result<String, ExpandError> {
        expand(input, env, '\\').map(|e| e.word)
    }

    #[test]
    fn pattern_operators() {
        let env = [("P", "a/b/c.tar.gz")];
        assert_eq!(word("${P#*/}", &env).unwrap(), "b/c.tar.gz");
        assert_eq!(word("${P##*/}", &env).unwrap(), "c.tar.gz");
        assert_eq!(word("${P%.*}", &env).unwrap(), "a/b/c.tar");
        assert_eq!(word("${P%%.*}", &env).unwrap(), "a/b/c");
        assert_eq!(word("${P/\\//_}", &env).unwrap(), "a_b/c.tar.gz");
        assert_eq!(word("${P//\\//_}", &env).unwrap(), "a_b_c.tar.gz");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "${A:-".repeat(100_000);
        assert!(word(&deep, &[]).is_err());
        let ok = format!("{}x{}", "${A:-".repeat(10), "}".repeat(10));
        assert_eq!(word(&ok, &[]).unwrap(), "x");
    }

    #[test]
    fn heredoc_markers_hold_their_blanks() {
        let e = expand("cat << EOF x", &[][..], '\\').unwrap();
        assert_eq!(e.words, ["cat", "<< EOF", "x"]);
        assert_eq!(e.word, "cat << EOF x");
    }

    #[test]
    fn records_referenced_names() {
        let env = [("A", "1")];
        let e = expand("$A ${B:-x} '$C'", &env[..], '\\').unwrap();
        assert_eq!(e.referenced.into_iter().collect::<Vec<_>>(), ["A", "B"]);
    }
}
