//! Reversible escaping of arbitrary text (lease keys, shard ids, topology names) into one safe
//! file name component.
//!
//! The rule is the one `OutputId::to_path` uses for keys: ASCII letters, digits, `-`, `_` and
//! `.` stay, every other byte becomes `%XX`, and text that is empty or starts with `.` gets a
//! `%` prefix, so that no escaped name is hidden, `.`, `..` or a temporary file.

use std::fmt::Write as _;

/// Escapes `text` into one file name component.
pub(crate) fn escape_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    if text.is_empty() || text.starts_with('.') {
        out.push('%');
    }
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Reverses [`escape_component`]; `None` for a name it cannot have produced.
pub(crate) fn unescape_component(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    // The prefix `%` of an empty or dot-led text is not followed by two hex digits and a byte
    // that needed escaping; it is followed by `.` or by nothing.
    if bytes.first() == Some(&b'%') && matches!(bytes.get(1), None | Some(b'.')) {
        i = 1;
    }
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_awkward_text() {
        for text in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b c",
            "stream:shardId-000000000001",
            "k/1 é",
            "%",
            "%41",
        ] {
            let escaped = escape_component(text);
            assert!(!escaped.is_empty() && !escaped.starts_with('.') && !escaped.contains('/'));
            assert_eq!(
                unescape_component(&escaped).as_deref(),
                Some(text),
                "{text:?} -> {escaped}"
            );
        }
        assert_eq!(
            escape_component("shardId-000000000000"),
            "shardId-000000000000"
        );
    }
}
