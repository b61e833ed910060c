//! BuildKit's `result` dump of a raw parse: one `(keyword ["flags"] "args"...)` line per node.

use std::fmt::Write;

use super::syntax::RawNode;

/// The dump of every node, one per line, without a final newline.
pub(crate) fn dump_nodes(nodes: &[RawNode]) -> String {
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push('(');
        dump_node(&mut out, node);
        out.push(')');
    }
    out
}

fn dump_node(out: &mut String, node: &RawNode) {
    out.push_str(&node.keyword.to_lowercase());
    if !node.flags.is_empty() {
        out.push_str(" [");
        for (i, flag) in node.flags.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            go_quote(out, flag);
        }
        out.push(']');
    }
    if let Some(child) = &node.child {
        out.push_str(" (");
        dump_node(out, child);
        out.push(')');
    }
    for arg in &node.args {
        out.push(' ');
        go_quote(out, arg);
    }
}

/// Appends `s` quoted as Go's `strconv.Quote` does.
pub(crate) fn go_quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if is_go_printable(c) => out.push(c),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
}

/// Go's `unicode.IsPrint` without Unicode tables: letters, marks, numbers, punctuation, symbols
/// and the ASCII space. Controls, other spaces, private use and the common format characters
/// are not printable; unassigned code points are treated as printable (Go would escape them).
fn is_go_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    let format_or_private = matches!(
        u,
        0xad | 0x600..=0x605
            | 0x61c
            | 0x6dd
            | 0x70f
            | 0x180e
            | 0x200b..=0x200f
            | 0x202a..=0x202e
            | 0x2060..=0x206f
            | 0xe000..=0xf8ff
            | 0xfeff
            | 0xfff9..=0xfffb
            | 0xfffe..=0xffff
            | 0x110bd
            | 0x1d173..=0x1d17a
            | 0xe0001
            | 0xe0020..=0xe007f
            | 0xf0000..
    );
    !format_or_private
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(s: &str) -> String {
        let mut out = String::new();
        go_quote(&mut out, s);
        out
    }

    #[test]
    fn quotes_like_go() {
        assert_eq!(quoted("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quoted("\u{0}\u{7f}\t"), r#""\x00\x7f\t""#);
        assert_eq!(quoted("♥ \u{a0}\u{200b}"), r#""♥ \u00a0\u200b""#);
    }
}
