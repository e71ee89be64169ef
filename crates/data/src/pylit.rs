//! A small parser for Python list-of-string literals.
//!
//! The shared task's CSV release stores `test_list` as the `repr()` of a Python list, e.g.
//! `['assert f(1)==2', "assert g('x')==\"y\""]`, sometimes wrapped once more in a JSON string.
//! Evaluating that needs only the string-literal subset of Python, which lives here so the
//! loader does not depend on a Python interpreter.

/// Why a literal could not be parsed, with the character offset (0-based) in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LitError {
    pub offset: usize,
    pub message: String,
}

impl std::fmt::Display for LitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at character {}", self.message, self.offset)
    }
}

type Result<T> = std::result::Result<T, LitError>;

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn new(src: &str) -> Self {
        Parser {
            chars: src.chars().collect(),
            pos: 0,
        }
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T> {
        Err(LitError {
            offset: self.pos,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, k: usize) -> Option<char> {
        self.chars.get(self.pos + k).copied()
    }

    /// Skips whitespace, `#` comments and backslash line continuations (inside brackets
    /// Python joins lines implicitly, so newlines are plain whitespace here).
    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.pos += 1;
            } else if c == '#' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.pos += 1;
                }
            } else if c == '\\' && matches!(self.peek_at(1), Some('\n') | Some('\r')) {
                self.pos += 2;
            } else {
                break;
            }
        }
    }

    /// If a string literal (with optional prefix) starts here, returns `(prefix_len, raw)`.
    fn literal_start(&self) -> Result<Option<(usize, bool)>> {
        let mut k = 0;
        while k < 3 && matches!(self.peek_at(k), Some(c) if c.is_ascii_alphabetic()) {
            k += 1;
        }
        if !matches!(self.peek_at(k), Some('\'' | '"')) {
            return Ok(None);
        }
        let prefix: String = self.chars[self.pos..self.pos + k]
            .iter()
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match prefix.as_str() {
            "" | "u" => Ok(Some((k, false))),
            "r" => Ok(Some((k, true))),
            p if p.contains('b') || p.contains('f') => self.err(format!(
                "{p}-prefixed literals are not supported (expected plain str literals)"
            )),
            _ => Ok(None),
        }
    }

    /// Parses one string literal (prefix, quotes, body) and appends its value to `out`.
    fn string_literal(&mut self, out: &mut String) -> Result<()> {
        let Some((prefix, raw)) = self.literal_start()? else {
            return self.err("expected a string literal");
        };
        let start = self.pos;
        self.pos += prefix;
        let q = self.peek().expect("literal_start saw a quote");
        let triple = self.peek_at(1) == Some(q) && self.peek_at(2) == Some(q);
        self.pos += if triple { 3 } else { 1 };
        loop {
            let Some(c) = self.peek() else {
                self.pos = start;
                return self.err("unterminated string literal");
            };
            if c == q {
                if !triple {
                    self.pos += 1;
                    return Ok(());
                }
                if self.peek_at(1) == Some(q) && self.peek_at(2) == Some(q) {
                    self.pos += 3;
                    return Ok(());
                }
                out.push(c);
                self.pos += 1;
                continue;
            }
            if (c == '\n' || c == '\r') && !triple {
                self.pos = start;
                return self
                    .err("unterminated string literal (newline inside a single-quoted string)");
            }
            if c != '\\' {
                out.push(c);
                self.pos += 1;
                continue;
            }
            // Backslash.
            let Some(n) = self.peek_at(1) else {
                self.pos = start;
                return self.err("unterminated string literal");
            };
            if raw {
                // In raw strings a backslash only stops the next character from ending the
                // literal; both characters are kept.
                out.push('\\');
                out.push(n);
                self.pos += 2;
                continue;
            }
            self.escape(out)?;
        }
    }

    /// Decodes the escape sequence at `self.pos` (which is a backslash).
    fn escape(&mut self, out: &mut String) -> Result<()> {
        let at = self.pos;
        let n = self.peek_at(1).expect("caller checked");
        self.pos += 2;
        match n {
            '\n' => {}
            '\r' => {
                if self.peek() == Some('\n') {
                    self.pos += 1;
                }
            }
            '\\' => out.push('\\'),
            '\'' => out.push('\''),
            '"' => out.push('"'),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'a' => out.push('\u{07}'),
            'b' => out.push('\u{08}'),
            'f' => out.push('\u{0c}'),
            'v' => out.push('\u{0b}'),
            '0'..='7' => {
                let mut v = n.to_digit(8).unwrap();
                for _ in 0..2 {
                    match self.peek().and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            self.pos += 1;
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v).expect("octal escapes are at most 0o777"));
            }
            'x' | 'u' | 'U' => {
                let len = match n {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let mut v: u32 = 0;
                for _ in 0..len {
                    match self.peek().and_then(|c| c.to_digit(16)) {
                        Some(d) => {
                            v = v.wrapping_mul(16).wrapping_add(d);
                            self.pos += 1;
                        }
                        None => {
                            self.pos = at;
                            return self.err(format!(
                                "truncated \\{n} escape (expected {len} hex digits)"
                            ));
                        }
                    }
                }
                match char::from_u32(v) {
                    Some(c) => out.push(c),
                    None => {
                        self.pos = at;
                        return self
                            .err(format!("\\{n} escape {v:#x} is not a Unicode scalar value"));
                    }
                }
            }
            'N' => {
                self.pos = at;
                return self.err("\\N{...} named escapes are not supported");
            }
            other => {
                // Python keeps unknown escapes verbatim (e.g. '\d' in a regex).
                out.push('\\');
                out.push(other);
            }
        }
        Ok(())
    }

    /// One list item: a string literal, possibly followed by adjacent literals that Python
    /// concatenates implicitly (`'a' "b"` is `'ab'`).
    fn item(&mut self) -> Result<String> {
        let mut s = String::new();
        self.string_literal(&mut s)?;
        loop {
            let save = self.pos;
            self.skip_ws();
            if self.literal_start()?.is_some() {
                self.string_literal(&mut s)?;
            } else {
                self.pos = save;
                return Ok(s);
            }
        }
    }

    fn list(&mut self) -> Result<Vec<String>> {
        self.skip_ws();
        if self.peek() != Some('[') {
            return self.err("expected '[' starting a list literal");
        }
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() == Some(']') {
                self.pos += 1;
                break;
            }
            if self.literal_start()?.is_none() {
                return match self.peek() {
                    None => self.err("unterminated list literal (missing ']')"),
                    Some(c) => self.err(format!("expected a string literal, found {c:?}")),
                };
            }
            items.push(self.item()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {
                    self.pos += 1;
                    break;
                }
                None => return self.err("unterminated list literal (missing ']')"),
                Some(c) => return self.err(format!("expected ',' or ']', found {c:?}")),
            }
        }
        self.skip_ws();
        if self.pos != self.chars.len() {
            return self.err("unexpected text after the closing ']'");
        }
        Ok(items)
    }
}

/// Evaluates a Python list literal whose elements are all `str` literals.
pub(crate) fn parse_str_list(src: &str) -> Result<Vec<String>> {
    Parser::new(src).list()
}

/// Evaluates a Python expression that is one `str` (possibly several adjacent literals).
pub(crate) fn parse_str(src: &str) -> Result<String> {
    let mut p = Parser::new(src);
    p.skip_ws();
    let s = p.item()?;
    p.skip_ws();
    if p.pos != p.chars.len() {
        return p.err("unexpected text after the string literal");
    }
    Ok(s)
}

/// Decodes a `test_list` cell as the shared task writes it: a Python list literal, a JSON
/// list, or either of those wrapped once (or twice) more in a JSON or Python string.
pub(crate) fn decode_test_list_cell(cell: &str) -> std::result::Result<Vec<String>, String> {
    decode_cell(cell, 0)
}

fn decode_cell(cell: &str, depth: usize) -> std::result::Result<Vec<String>, String> {
    let s = cell.trim();
    match s.chars().next() {
        Some('[') => {
            if let Ok(v) = serde_json::from_str::<Vec<String>>(s) {
                return Ok(v);
            }
            parse_str_list(s).map_err(|e| format!("not a Python list of strings: {e}"))
        }
        Some(c) if depth < 2 && (c == '"' || c == '\'' || c == 'r' || c == 'R') => {
            let inner = match serde_json::from_str::<String>(s) {
                Ok(inner) => inner,
                Err(_) => parse_str(s).map_err(|e| {
                    format!("a quoted cell that is neither a JSON nor a Python string: {e}")
                })?,
            };
            decode_cell(&inner, depth + 1)
                .map_err(|e| format!("{e} (inside a string-escaped cell)"))
        }
        None => Err("an empty cell".to_string()),
        Some(_) => Err("a cell that does not start with '[' (expected a list literal such as ['assert f(1) == 2'])".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> Vec<String> {
        parse_str_list(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(
            list(r#"['assert f(1)==2', "assert g('x')==\"y\""]"#),
            vec!["assert f(1)==2", r#"assert g('x')=="y""#]
        );
        assert_eq!(list(r#"['a\nb\tc\\d\'e\"f']"#), vec!["a\nb\tc\\d'e\"f"]);
        assert_eq!(list(r"['\x41\u00e9\U0001F600\101\0']"), vec!["Aé😀A\0"]);
        assert_eq!(list(r"['\a\b\f\v']"), vec!["\u{7}\u{8}\u{c}\u{b}"]);
        // Unknown escapes stay as they are, as in Python.
        assert_eq!(list(r"['\d+\s']"), vec![r"\d+\s"]);
        // Line continuation inside a literal.
        assert_eq!(list("['ab\\\ncd']"), vec!["abcd"]);
    }

    #[test]
    fn raw_triple_concat_trailing_comma() {
        assert_eq!(list(r"[r'\d{4}\'x']"), vec![r"\d{4}\'x"]);
        assert_eq!(list(r#"[R"a\"b"]"#), vec![r#"a\"b"#]);
        assert_eq!(
            list("['''it's\n\"fine\"''', \"\"\"x''y\"\"\"]"),
            vec!["it's\n\"fine\"", "x''y"]
        );
        assert_eq!(list("['a' \"b\"\n  r'\\c', u'd',]"), vec!["ab\\c", "d"]);
        assert_eq!(list("[ ]"), Vec::<String>::new());
        assert_eq!(list("[\n 'x',  # first\n 'y'\n]"), vec!["x", "y"]);
        assert_eq!(list("['বাংলা']"), vec!["বাংলা"]);
    }

    #[test]
    fn rejects_malformed_literals() {
        for (src, want) in [
            ("['a'", "missing ']'"),
            ("['a' 'b", "unterminated string"),
            ("['a', 3]", "expected a string literal"),
            ("['a'] x", "after the closing"),
            ("['a' ; 'b']", "expected ',' or ']'"),
            (r"['\x4']", "truncated \\x"),
            (r"['\ud800']", "not a Unicode scalar"),
            ("[b'a']", "b-prefixed"),
            ("[f'a']", "f-prefixed"),
            ("['a\nb']", "newline inside"),
            (r"['\N{DASH}']", "named escapes"),
            ("'a'", "expected '['"),
        ] {
            let e = parse_str_list(src).expect_err(src);
            assert!(e.message.contains(want), "{src}: {e}");
        }
        let e = parse_str_list("['ok', 'x").unwrap_err();
        assert_eq!(
            e.offset, 7,
            "offset points at the literal that is not closed"
        );
    }

    #[test]
    fn cell_forms() {
        let want = vec!["assert f(\"a\") == 'b'".to_string()];
        // Plain Python literal, as in the task's test CSV.
        assert_eq!(
            decode_test_list_cell(r#"['assert f(\"a\") == \'b\'']"#).unwrap(),
            want
        );
        // JSON list.
        assert_eq!(
            decode_test_list_cell(r#"["assert f(\"a\") == 'b'"]"#).unwrap(),
            want
        );
        // JSON string holding a Python literal (the trial/dev CSV form).
        assert_eq!(
            decode_test_list_cell(r#""['assert f(\\\"a\\\") == \\'b\\'']""#).unwrap(),
            want
        );
        // JSON string holding a JSON list.
        assert_eq!(
            decode_test_list_cell(r#""[\"assert f(\\\"a\\\") == 'b'\"]""#).unwrap(),
            want
        );
        // Python string holding a Python literal (repr of the repr; `\'` is not JSON).
        assert_eq!(
            decode_test_list_cell(r#"'[\'assert f(\\"a\\") == \\\'b\\\'\']'"#).unwrap(),
            want
        );
        assert!(decode_test_list_cell("  ").unwrap_err().contains("empty"));
        assert!(decode_test_list_cell("assert f()")
            .unwrap_err()
            .contains("'['"));
        assert!(decode_test_list_cell("\"\"\"x\"\"\"")
            .unwrap_err()
            .contains("does not start with '['"));
        assert!(decode_test_list_cell("\"abc").is_err());
    }

    #[test]
    fn parse_single_string() {
        assert_eq!(parse_str(r#" 'a' "b" "#).unwrap(), "ab");
        assert!(parse_str("'a' x").is_err());
    }
}
