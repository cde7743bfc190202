//! Text from untrusted sources (model files, configs, events, the audit
//! store), made safe to print: control characters and the Unicode
//! direction overrides are escaped, so a model file cannot move the
//! cursor, clear a line, or forge an "ok" line in a terminal or a log.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character (`\n`, `\r`, ESC, DEL, C1) and
/// direction override written as a visible escape (`\n`, `\r`, `\u{1b}`).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes (at a character boundary), saying how
/// long it was when cut.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}... ({} bytes in all)", &s[..end], s.len()))
}

/// A log writer that escapes control characters in each record but its
/// final newline, so a log line stays one line whatever a model file or an
/// event put into it. (Used with colours off: they are escape sequences.)
pub struct SafeWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for SafeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, true),
            None => (buf, false),
        };
        let text = String::from_utf8_lossy(body);
        let mut out = escape(&text).into_owned().into_bytes();
        if newline {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_long_text_at_a_character_boundary_and_says_so() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 3), "é... (6 bytes in all)");
    }

    #[test]
    fn control_characters_and_direction_overrides_are_escaped() {
        assert!(matches!(escape("plain text ü"), Cow::Borrowed(_)));
        assert_eq!(escape("a\x1b[2Kb"), "a\\u{1b}[2Kb");
        assert_eq!(escape("x\rok: 3 rows\n"), "x\\rok: 3 rows\\n");
        assert_eq!(escape("\u{7f}\u{85}"), "\\u{7f}\\u{85}");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
    }

    #[test]
    fn the_log_writer_keeps_one_line_per_record() {
        use std::io::Write;
        let mut w = SafeWriter(Vec::new());
        w.write_all(b"model 'x\x1b[2K\rok': refused\nsecond line\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(w.0).unwrap(),
            "model 'x\\u{1b}[2K\\rok': refused\\nsecond line\n"
        );
    }
}
