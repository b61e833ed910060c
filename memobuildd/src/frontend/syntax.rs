//! The raw parse: Dockerfile text → one [`RawNode`] per instruction, as BuildKit's `parser.Parse`.
//!
//! This layer only splits text. It keeps quotes, escapes and `$VAR` as written, accepts any
//! keyword and any flag, and leaves every rule about meaning to `instructions`.

use super::diagnostic::{Diagnostic, DiagnosticKind};

/// A parser directive from the leading comments (`# escape=\``).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lower case: `syntax`, `escape` or `check`.
    pub name: String,
    pub value: String,
    pub line: u32,
}

/// A here-document attached to a RUN, COPY or ADD line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word without its quotes (`EOF`).
    pub name: String,
    /// The lines between the instruction and the delimiter, each ending in `\n`; for `<<-` with
    /// leading tabs already removed.
    pub body: String,
    /// False when the delimiter was quoted (`<<'EOF'`): the body is then taken literally.
    pub expand: bool,
    /// True for `<<-`.
    pub chomp: bool,
    /// The file descriptor written before `<<` (`3<<EOF`), if any.
    pub fd: Option<u32>,
}

/// One instruction as the raw parser sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawNode {
    /// The keyword as written (`Run`), for messages; dumps lowercase it.
    pub keyword: String,
    pub flags: Vec<String>,
    /// The arguments as BuildKit's line parsers split them (ENV/LABEL give key, value, separator).
    pub args: Vec<String>,
    /// The trigger of an ONBUILD.
    pub child: Option<Box<RawNode>>,
    /// Whether the arguments came from a JSON array.
    pub json: bool,
    pub heredocs: Vec<Heredoc>,
    /// The instruction's text after its keyword and flags, continuation lines joined.
    pub rest: String,
    /// The whole instruction, continuation lines joined and trimmed.
    pub original: String,
    pub start_line: u32,
    pub end_line: u32,
    /// 1-based column of the keyword on `start_line`.
    pub column: u32,
}

#[derive(Debug)]
pub(crate) struct RawDockerfile {
    pub escape: char,
    pub directives: Vec<Directive>,
    pub nodes: Vec<RawNode>,
}

/// Where an error is, before it becomes a [`Diagnostic`].
struct At<'a> {
    file: &'a str,
    text: &'a str,
    line: u32,
    column: u32,
    keyword: &'a str,
}

impl At<'_> {
    fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(
            DiagnosticKind::Syntax,
            self.file,
            self.text,
            self.line,
            self.column,
            self.keyword,
            message,
        )
    }
}

/// Parses `text`; `file` only names it in diagnostics.
pub(crate) fn parse_raw(text: &str, file: &str) -> Result<RawDockerfile, Diagnostic> {
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = body
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let (directives, escape) = parse_directives(&lines, file, text)?;

    let mut nodes = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = lines[i];
        let trimmed = first.trim_start();
        if is_blank_or_comment(trimmed) {
            i += 1;
            continue;
        }
        let start = i;
        let column = (first.chars().count() - trimmed.chars().count()) as u32 + 1;
        let mut logical = String::new();
        let mut continues = push_physical(&mut logical, trimmed, escape);
        let mut end = i;
        i += 1;
        // Comments and blank lines inside a continuation are dropped without ending it.
        while continues && i < lines.len() {
            let line = lines[i];
            i += 1;
            if is_blank_or_comment(line.trim_start()) {
                continue;
            }
            end = i - 1;
            continues = push_physical(&mut logical, line, escape);
        }
        let at = At {
            file,
            text,
            line: start as u32 + 1,
            column,
            keyword: "",
        };
        let mut node = parse_line(logical.trim(), escape, &at, 0)?;
        node.start_line = start as u32 + 1;
        node.column = column;
        let keyword = node.keyword.clone();
        if let Some(host) = heredoc_host(&mut node) {
            let at = At {
                keyword: &keyword,
                ..at
            };
            for (name, expand, chomp, fd) in heredoc_markers(&host.rest, &at)? {
                let (doc, next) = read_heredoc(&lines, i, name, expand, chomp, fd)
                    .ok_or_else(|| at.error("unterminated heredoc"))?;
                host.heredocs.push(doc);
                end = next - 1;
                i = next;
            }
        }
        node.end_line = end as u32 + 1;
        nodes.push(node);
    }
    if nodes.is_empty() {
        let at = At {
            file,
            text,
            line: 1,
            column: 1,
            keyword: "",
        };
        return Err(at.error("file has no instructions"));
    }
    Ok(RawDockerfile {
        escape,
        directives,
        nodes,
    })
}

fn is_blank_or_comment(trimmed: &str) -> bool {
    trimmed.is_empty() || trimmed.starts_with('#')
}

/// Appends one physical line to `logical`; returns whether it continues on the next line.
fn push_physical(logical: &mut String, line: &str, escape: char) -> bool {
    match strip_continuation(line, escape) {
        Some(kept) => {
            logical.push_str(kept);
            true
        }
        None => {
            logical.push_str(line);
            false
        }
    }
}

/// The line without its continuation marker, if it ends with one: the escape char and optional
/// blanks, not itself escaped (`a\\` ends in a literal backslash).
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    let kept = line.trim_end_matches([' ', '\t']).strip_suffix(escape)?;
    (!kept.ends_with(escape)).then_some(kept)
}

/// Reads the directives at the top of the file; the first other line ends them.
fn parse_directives(
    lines: &[&str],
    file: &str,
    text: &str,
) -> Result<(Vec<Directive>, char), Diagnostic> {
    let mut directives: Vec<Directive> = Vec::new();
    let mut escape = '\\';
    for (i, line) in lines.iter().enumerate() {
        let Some((name, value)) = directive(line.trim_start()) else {
            break;
        };
        let line = i as u32 + 1;
        let at = At {
            file,
            text,
            line,
            column: 1,
            keyword: "",
        };
        if directives.iter().any(|d| d.name == name) {
            return Err(at.error(format!("only one {name} parser directive can be used")));
        }
        if name == "escape" {
            escape = match value {
                "\\" => '\\',
                "`" => '`',
                _ => {
                    return Err(at.error(format!(
                        "invalid escape token '{value}' does not match ` or \\"
                    )));
                }
            };
        }
        directives.push(Directive {
            name,
            value: value.to_owned(),
            line,
        });
    }
    Ok((directives, escape))
}

/// `# key = value` with a known key, as (lowercased key, value).
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = line.strip_prefix('#')?.trim_start_matches([' ', '\t']);
    let key_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let (key, rest) = rest.split_at(key_len);
    if !key.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    let value = value.trim_matches([' ', '\t']);
    let key = key.to_ascii_lowercase();
    let known = matches!(key.as_str(), "syntax" | "escape" | "check");
    (known && !value.is_empty()).then_some((key, value))
}

/// How many ONBUILDs deep a line is parsed as nested instructions.
const MAX_ONBUILD_DEPTH: u32 = 16;

/// Splits a joined, trimmed instruction line into keyword, flags and arguments; `depth` counts
/// the ONBUILDs around it.
fn parse_line(line: &str, escape: char, at: &At<'_>, depth: u32) -> Result<RawNode, Diagnostic> {
    let (keyword, after) = match line.find(is_separator) {
        Some(i) => (&line[..i], line[i..].trim_start_matches(is_separator)),
        None => (line, ""),
    };
    let (flags, rest) = extract_flags(after, escape);
    let rest = rest.trim();
    let mut node = RawNode {
        keyword: keyword.to_owned(),
        flags,
        args: Vec::new(),
        child: None,
        json: false,
        heredocs: Vec::new(),
        rest: rest.to_owned(),
        original: line.to_owned(),
        start_line: at.line,
        end_line: at.line,
        column: at.column,
    };
    let at = At { keyword, ..*at };
    match keyword.to_ascii_lowercase().as_str() {
        "run" | "cmd" | "entrypoint" | "shell" => {
            (node.args, node.json) = maybe_json(rest, &at)?.unwrap_or_else(|| shell_form(rest));
        }
        "add" | "copy" | "volume" => {
            (node.args, node.json) =
                maybe_json(rest, &at)?.unwrap_or_else(|| (split_blanks(rest), false));
        }
        "from" | "expose" => node.args = split_blanks(rest),
        "user" | "workdir" | "maintainer" | "stopsignal" => node.args = shell_form(rest).0,
        "env" | "label" => node.args = name_values(rest, escape, &at)?,
        "arg" => node.args = parse_words(rest, escape),
        "healthcheck" => (node.args, node.json) = healthcheck(rest, &at)?,
        // `ONBUILD ONBUILD ...` is refused by the typed layer; the bound only keeps a hostile
        // line from recursing until the stack runs out.
        "onbuild" if !rest.is_empty() && depth == MAX_ONBUILD_DEPTH => {
            node.args = vec![rest.to_owned()];
        }
        "onbuild" if !rest.is_empty() => {
            let mut child = parse_line(rest, escape, &at, depth + 1)?;
            child.start_line = at.line;
            node.child = Some(Box::new(child));
        }
        "onbuild" => {}
        // Unknown keywords parse here and fail in the typed layer, as in BuildKit.
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

/// The whitespace BuildKit splits keywords and plain word lists on (not newlines).
fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\u{b}' | '\u{c}')
}

fn split_blanks(rest: &str) -> Vec<String> {
    rest.split(is_separator)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn shell_form(rest: &str) -> (Vec<String>, bool) {
    let args = if rest.is_empty() {
        Vec::new()
    } else {
        vec![rest.to_owned()]
    };
    (args, false)
}

/// A JSON array of strings, if `rest` is one. Text that is not JSON is shell form (`None`), but
/// valid JSON holding anything else than strings is an error.
fn maybe_json(rest: &str, at: &At<'_>) -> Result<Option<(Vec<String>, bool)>, Diagnostic> {
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(values) = serde_json::from_str::<Vec<serde_json::Value>>(rest) else {
        return Ok(None);
    };
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(at.error("JSON arrays must contain only strings")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|args| Some((args, true)))
}

/// `HEALTHCHECK TYPE rest`: the type word, then the rest as for CMD.
fn healthcheck(rest: &str, at: &At<'_>) -> Result<(Vec<String>, bool), Diagnostic> {
    let Some(kind) = rest
        .split(char::is_whitespace)
        .next()
        .filter(|k| !k.is_empty())
    else {
        return Ok((Vec::new(), false));
    };
    let cmd = rest[kind.len()..].trim_start();
    let (mut cmd_args, json) = maybe_json(cmd, at)?.unwrap_or_else(|| shell_form(cmd));
    cmd_args.insert(0, kind.to_owned());
    Ok((cmd_args, json))
}

/// ENV and LABEL: `key value` (old form) or `k=v k2=v2`, as key, value, separator triples.
fn name_values(rest: &str, escape: char, at: &At<'_>) -> Result<Vec<String>, Diagnostic> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let Some(split) = rest.find(is_separator) else {
            return Err(at.error(format!(
                "{} must have two arguments",
                at.keyword.to_uppercase()
            )));
        };
        let value = rest[split..].trim_start_matches(is_separator);
        return Ok(vec![
            rest[..split].to_owned(),
            value.to_owned(),
            String::new(),
        ]);
    }
    let mut args = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(at.error(format!(
                "Syntax error - can't find = in {word:?}. Must be of the form: name=value"
            )));
        };
        args.extend([key.to_owned(), value.to_owned(), "=".to_owned()]);
    }
    Ok(args)
}

/// Splits on whitespace outside quotes, keeping quotes and escape pairs in the words.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    // Set once a quote opened, so `""` still yields an (empty-looking) word.
    let mut quoted = false;
    let mut quote: Option<char> = None;
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            None if c.is_whitespace() => {
                if in_word && (quoted || !word.is_empty()) {
                    words.push(std::mem::take(&mut word));
                }
                in_word = false;
                quoted = false;
            }
            None => {
                in_word = true;
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    quoted = true;
                }
                if c == escape {
                    // An escape at the very end is dropped; otherwise it and its char stay.
                    let Some(next) = chars.next() else { break };
                    word.push(c);
                    word.push(next);
                    continue;
                }
                word.push(c);
            }
            Some(q) => {
                if c == q {
                    quote = None;
                } else if c == escape && q != '\'' {
                    let Some(next) = chars.next() else {
                        quote = None;
                        continue;
                    };
                    word.push(c);
                    word.push(next);
                    continue;
                }
                word.push(c);
            }
        }
    }
    if in_word && (quoted || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Leading `--flag` words, unquoted, and the text after them. A lone `--` ends the flags.
fn extract_flags(line: &str, escape: char) -> (Vec<String>, &str) {
    let mut flags = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start();
        if !rest.starts_with("--") {
            return (flags, rest);
        }
        let (word, quoted, len) = flag_word(rest, escape);
        rest = &rest[len..];
        if word == "--" {
            return (flags, rest);
        }
        if quoted || !word.is_empty() {
            flags.push(word);
        }
    }
}

/// One flag word: its unquoted text, whether it had quotes, and its length in `text`.
fn flag_word(text: &str, escape: char) -> (String, bool, usize) {
    let mut word = String::new();
    let mut quoted = false;
    let mut quote: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            None if c.is_whitespace() => return (word, quoted, i),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                quoted = true;
            }
            Some(q) if c == q => quote = None,
            _ if c == escape => {
                if let Some((_, next)) = chars.next() {
                    word.push(next);
                } else {
                    quote = None;
                }
            }
            _ => word.push(c),
        }
    }
    (word, quoted, text.len())
}

/// The node whose line may hold heredocs: a shell-form RUN, COPY or ADD, also as an ONBUILD
/// trigger. In JSON form `<<EOF` is just a string.
fn heredoc_host(node: &mut RawNode) -> Option<&mut RawNode> {
    let host = if node.keyword.eq_ignore_ascii_case("onbuild") {
        node.child.as_deref_mut()?
    } else {
        node
    };
    let allowed = ["run", "copy", "add"]
        .iter()
        .any(|k| host.keyword.eq_ignore_ascii_case(k));
    (allowed && !host.json && host.rest.contains("<<")).then_some(host)
}

type Marker = (String, bool, bool, Option<u32>);

/// The `[fd]<<[-]NAME` words of a line, in order, as (name, expand, chomp, fd). Words split as
/// BuildKit's shell lexer splits them, always with `\` as escape; it keeps `<< EOF` one word.
fn heredoc_markers(rest: &str, at: &At<'_>) -> Result<Vec<Marker>, Diagnostic> {
    let mut markers = Vec::new();
    let mut words = parse_words(rest, '\\').into_iter();
    while let Some(mut word) = words.next() {
        let digits = word
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(word.len());
        if &word[digits..] == "<<" {
            word.extend(words.next());
        }
        let Some(after) = word[digits..].strip_prefix("<<") else {
            continue;
        };
        let (chomp, name) = match after.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, after),
        };
        if name.contains('<') {
            continue;
        }
        let (unquoted, quoted) = unquote(name)
            .ok_or_else(|| at.error(format!("unterminated quote in heredoc name {name:?}")))?;
        if unquoted.is_empty() {
            continue;
        }
        markers.push((unquoted, !quoted, chomp, word[..digits].parse().ok()));
    }
    Ok(markers)
}

/// A heredoc delimiter without its quotes and escapes, and whether any quote took effect (an
/// escaped quote does not); `None` if a quote is left open. `$` stays literal.
fn unquote(word: &str) -> Option<(String, bool)> {
    let mut out = String::new();
    let mut quoted = false;
    let mut quote = None;
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => out.push(c),
            // Inside double quotes a backslash escapes only `"`, `$` and itself.
            (Some(_), '\\') => match chars.next_if(|n| matches!(n, '"' | '$' | '\\')) {
                Some(escaped) => out.push(escaped),
                None => out.push('\\'),
            },
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                quoted = true;
            }
            (None, '\\') => out.extend(chars.next()),
            (None, c) => out.push(c),
        }
    }
    quote.is_none().then_some((out, quoted))
}

/// Reads a heredoc body starting at line index `from`; returns it and the index after its
/// delimiter line, or `None` when the file ends first.
fn read_heredoc(
    lines: &[&str],
    from: usize,
    name: String,
    expand: bool,
    chomp: bool,
    fd: Option<u32>,
) -> Option<(Heredoc, usize)> {
    let mut body = String::new();
    for (i, line) in lines.iter().enumerate().skip(from) {
        let line = if chomp {
            line.trim_start_matches('\t')
        } else {
            line
        };
        if line == name {
            return Some((
                Heredoc {
                    name,
                    body,
                    expand,
                    chomp,
                    fd,
                },
                i + 1,
            ));
        }
        body.push_str(line);
        body.push('\n');
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<RawNode> {
        parse_raw(text, "Dockerfile").expect("parses").nodes
    }

    #[test]
    fn heredocs_are_read_in_order_with_quoting_and_chomping() {
        let nodes = parse(
            "FROM alpine\nRUN <<EOF cat - <<-'END'\necho $HOME\nEOF\n\t\tliteral $X\n\tEND\nRUN true\n",
        );
        let docs = &nodes[1].heredocs;
        assert_eq!(docs.len(), 2);
        assert_eq!(
            (docs[0].name.as_str(), docs[0].body.as_str()),
            ("EOF", "echo $HOME\n")
        );
        assert!(docs[0].expand && !docs[0].chomp);
        assert_eq!(
            (docs[1].name.as_str(), docs[1].body.as_str()),
            ("END", "literal $X\n")
        );
        assert!(!docs[1].expand && docs[1].chomp);
        assert_eq!((nodes[1].start_line, nodes[1].end_line), (2, 6));
        assert_eq!(nodes[2].start_line, 7);
    }

    #[test]
    fn heredoc_on_copy_with_fd_and_double_quotes() {
        let nodes = parse("FROM scratch\nCOPY 3<<\"A B\" /dst\nx\nA B\n");
        let doc = &nodes[1].heredocs[0];
        assert_eq!(
            (doc.name.as_str(), doc.fd, doc.expand),
            ("A B", Some(3), false)
        );
    }

    #[test]
    fn heredoc_names_follow_shell_quoting() {
        let names = |line: &str| {
            let at = At {
                file: "D",
                text: "",
                line: 1,
                column: 1,
                keyword: "RUN",
            };
            heredoc_markers(line, &at)
                .unwrap()
                .into_iter()
                .map(|(name, expand, _, _)| (name, expand))
                .collect::<Vec<_>>()
        };
        let owned = |name: &str, expand| (name.to_owned(), expand);
        assert_eq!(names("<<eof"), [owned("eof", true)]);
        assert_eq!(names("<<eo\\'f"), [owned("eo'f", true)]);
        assert_eq!(names("<<eo'f'"), [owned("eof", false)]);
        assert_eq!(names("<<'one two'"), [owned("one two", false)]);
        assert_eq!(names("cat << EOF"), [owned("EOF", true)]);
        assert_eq!(names("<<$EOF \"<<NO\" a<<NO"), [owned("$EOF", true)]);
    }

    #[test]
    fn heredocs_are_not_read_in_json_form_and_are_in_onbuild() {
        let nodes = parse("FROM a\nRUN [\"<<EOF\"]\nONBUILD RUN <<EOF\nx\nEOF\n");
        assert!(nodes[1].heredocs.is_empty());
        let trigger = nodes[2].child.as_ref().unwrap();
        assert_eq!(trigger.heredocs[0].body, "x\n");
        assert_eq!(nodes[2].end_line, 5);
    }

    #[test]
    fn unterminated_heredoc_is_an_error() {
        let err = parse_raw("FROM alpine\nRUN <<EOF\necho\n", "Dockerfile").unwrap_err();
        assert_eq!(
            (err.line, err.message.as_str()),
            (2, "unterminated heredoc")
        );
    }

    #[test]
    fn heredoc_markers_are_only_read_for_run_copy_add() {
        let nodes = parse("FROM alpine\nLABEL a=<<EOF\n");
        assert!(nodes[1].heredocs.is_empty());
    }

    #[test]
    fn onbuild_nests_in_the_dump_but_not_without_bound() {
        let nested = parse("ONBUILD ONBUILD RUN x\n");
        assert_eq!(
            crate::frontend::dump("ONBUILD ONBUILD RUN x\n").unwrap(),
            "(onbuild (onbuild (run \"x\")))"
        );
        assert!(nested[0].child.as_ref().is_some_and(|c| c.child.is_some()));
        let hostile = "ONBUILD ".repeat(100_000) + "RUN x\n";
        assert_eq!(parse(&hostile).len(), 1);
    }

    #[test]
    fn repeated_or_bad_escape_directive_fails() {
        assert!(parse_raw("# escape=`\n# escape=`\nFROM a\n", "D").is_err());
        assert!(parse_raw("# escape=x\nFROM a\n", "D").is_err());
    }
}
