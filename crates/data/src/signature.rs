//! Target-function extraction. The sandbox and the prompts need to know which function the
//! asserts call and with which parameters; the instruction usually says so on its last lines
//! ("Example:\nfn(args)" or a `def` stub), and the asserts say so when it does not.

use std::fmt;

use crate::Problem;

/// The function a problem asks for: its name and its parameter list as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    /// Parameters as written, trimmed, defaults and annotations kept (`b=[1, 2]`).
    pub params: Vec<String>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.params.join(", "))
    }
}

/// Builtins and helpers that wrap the target call in asserts (`assert set(f(x)) == ...`,
/// `assert math.isclose(f(x), 1.0)`), skipped when looking for the target.
const HELPERS: &[&str] = &[
    "abs",
    "all",
    "any",
    "bool",
    "dict",
    "float",
    "frozenset",
    "int",
    "isclose",
    "isinstance",
    "len",
    "list",
    "map",
    "max",
    "min",
    "print",
    "range",
    "repr",
    "reversed",
    "round",
    "set",
    "sorted",
    "str",
    "sum",
    "tuple",
    "type",
    "zip",
    "approx",
    "Counter",
    "OrderedDict",
    "defaultdict",
    "Decimal",
    "Fraction",
    "complex",
    "bytes",
    "enumerate",
    "filter",
    "next",
    "iter",
    "ord",
    "chr",
    "hash",
    "id",
    "divmod",
    "pow",
];

const KEYWORDS: &[&str] = &[
    "assert", "not", "and", "or", "in", "is", "if", "else", "lambda", "for", "def", "return",
    "None", "True", "False", "await", "yield", "class", "del", "from", "import", "with", "while",
];

/// The function the problem asks for.
///
/// The instruction's `Example:` line (or a `def` stub) wins when the asserts call that name;
/// otherwise the first function the first assert calls (skipping wrappers such as `set`,
/// `sorted`, `int`, `math.isclose`) is taken, with parameter names read off its arguments.
pub fn extract_signature(p: &Problem) -> Option<Signature> {
    let from_instruction = signature_from_instruction(&p.instruction);
    let target = p.test_list.iter().find_map(|t| assert_target(t));
    match (from_instruction, target) {
        (Some(sig), Some(call)) => {
            let called = p
                .test_list
                .iter()
                .any(|t| calls(t).iter().any(|c| !c.qualified && c.name == sig.name));
            if called {
                Some(sig)
            } else {
                Some(call.into_signature())
            }
        }
        (Some(sig), None) => Some(sig),
        (None, Some(call)) => Some(call.into_signature()),
        (None, None) => None,
    }
}

/// Reads the signature from an instruction's trailing example, or from a `def` line.
pub(crate) fn signature_from_instruction(instruction: &str) -> Option<Signature> {
    if let Some(tail) = example_tail(instruction) {
        if let Some(sig) = parse_signature_text(tail) {
            return Some(sig);
        }
    }
    instruction.lines().find_map(|line| {
        let t = line.trim_start();
        t.strip_prefix("def")
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .and_then(|_| parse_signature_text(t))
    })
}

/// The text after the last "Example:" marker. The release spells it "Example" in trial and
/// test and "Exammple" in dev, so any `ex…mple` word before a colon counts.
fn example_tail(instruction: &str) -> Option<&str> {
    let mut found = None;
    for (i, c) in instruction.char_indices() {
        if c != ':' {
            continue;
        }
        let before = instruction[..i].trim_end();
        let word_start = before
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_alphabetic() || is_bangla_mark(*c))
            .last()
            .map(|(j, _)| j);
        let Some(ws) = word_start else { continue };
        let word = before[ws..].to_lowercase();
        let is_marker = (word.starts_with("ex") && word.ends_with("mple") && word.len() <= 10)
            || word.starts_with("উদাহরণ");
        if is_marker {
            found = Some(&instruction[i + 1..]);
        }
    }
    found
}

/// Bangla vowel signs and the virama are marks, not alphabetic, in Unicode.
fn is_bangla_mark(c: char) -> bool {
    ('\u{0980}'..='\u{09FF}').contains(&c)
}

/// Parses `[def] name(params)` at the start of `text` (after blank lines and an optional
/// Markdown code fence).
fn parse_signature_text(text: &str) -> Option<Signature> {
    let mut t = text.trim_start();
    if let Some(rest) = t.strip_prefix("```") {
        t = rest
            .trim_start_matches(|c: char| c.is_alphanumeric())
            .trim_start();
    }
    if let Some(rest) = t.strip_prefix("def") {
        if rest.starts_with(char::is_whitespace) {
            t = rest.trim_start();
        }
    }
    let name_len = ident_len(t)?;
    let name = &t[..name_len];
    if KEYWORDS.contains(&name) {
        return None;
    }
    let rest = t[name_len..].trim_start_matches([' ', '\t']);
    let inner = rest.strip_prefix('(')?;
    let close = matching_close(inner)?;
    Some(Signature {
        name: name.to_string(),
        params: split_top_level(&inner[..close]),
    })
}

/// Length in bytes of the Python identifier at the start of `s`, if there is one.
fn ident_len(s: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !(first == '_' || first.is_alphabetic()) {
        return None;
    }
    Some(
        chars
            .find(|(_, c)| !(*c == '_' || c.is_alphanumeric()))
            .map_or(s.len(), |(i, _)| i),
    )
}

/// Byte offset of the `)` closing an argument list whose `(` was just before `s`. Nested
/// brackets and string literals are skipped.
fn matching_close(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                if depth == 0 {
                    return (c == ')').then_some(i);
                }
                depth -= 1;
            }
            '\'' | '"' => skip_string(s, i, &mut chars)?,
            _ => {}
        }
    }
    None
}

/// Advances `chars` past the string literal whose opening quote is at byte `start`.
fn skip_string(
    s: &str,
    start: usize,
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
) -> Option<()> {
    let q = s[start..].chars().next()?;
    let triple: String = std::iter::repeat_n(q, 3).collect();
    if s[start..].starts_with(&triple) {
        chars.next();
        chars.next();
        let body_start = start + 3;
        let end = find_unescaped(&s[body_start..], &triple)? + body_start + 3;
        while chars.peek().is_some_and(|(i, _)| *i < end) {
            chars.next();
        }
        return Some(());
    }
    while let Some((_, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if c == q {
            return Some(());
        }
    }
    None
}

fn find_unescaped(s: &str, needle: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i..].starts_with(needle.as_bytes()) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Splits on commas outside brackets and strings; pieces are trimmed, empty ones (a
/// trailing comma) dropped.
fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '\'' | '"' => {
                let Some(()) = skip_string(s, i, &mut chars) else {
                    break;
                };
            }
            ',' if depth == 0 => {
                out.push(s[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim().to_string());
    out.retain(|p| !p.is_empty());
    out
}

/// A function call found in an assert.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    name: String,
    /// Text between the parentheses.
    args: String,
    /// Called as an attribute (`math.isclose`, `obj.method`).
    qualified: bool,
}

impl Call {
    /// Parameter names from the call's arguments: keyword names, bare identifiers, else
    /// `argN` (1-based), so the arity is right even when the names are guesses.
    fn into_signature(self) -> Signature {
        let mut params: Vec<String> = Vec::new();
        for (i, arg) in split_top_level(&self.args).iter().enumerate() {
            let keyword = ident_len(arg).and_then(|n| {
                let rest = arg[n..].trim_start();
                (rest.starts_with('=') && !rest.starts_with("==")).then(|| arg[..n].to_string())
            });
            let bare = ident_len(arg)
                .filter(|&n| n == arg.len() && !KEYWORDS.contains(&arg.as_str()))
                .map(|_| arg.clone());
            let name = keyword
                .or(bare)
                .filter(|n| !params.contains(n))
                .unwrap_or_else(|| format!("arg{}", i + 1));
            params.push(name);
        }
        Signature {
            name: self.name,
            params,
        }
    }
}

/// Every call `name(...)` in a line of Python, in order of appearance, outside strings.
fn calls(src: &str) -> Vec<Call> {
    let mut out = Vec::new();
    let mut chars = src.char_indices().peekable();
    let mut prev_sig: Option<char> = None; // last non-space char before the current token
    while let Some((i, c)) = chars.next() {
        if c == '\'' || c == '"' {
            if skip_string(src, i, &mut chars).is_none() {
                break;
            }
            prev_sig = Some(c);
            continue;
        }
        if c == '_' || c.is_alphabetic() {
            let len = ident_len(&src[i..]).unwrap_or(c.len_utf8());
            let end = i + len;
            while chars.peek().is_some_and(|(j, _)| *j < end) {
                chars.next();
            }
            let name = &src[i..end];
            // A string prefix such as r'..' or f"..": let the quote branch skip the body.
            if matches!(src[end..].chars().next(), Some('\'') | Some('"'))
                && name.len() <= 2
                && name.chars().all(|c| "rRbBuUfF".contains(c))
            {
                continue;
            }
            let after = src[end..].trim_start_matches([' ', '\t']);
            if let Some(inner) = after.strip_prefix('(') {
                if !KEYWORDS.contains(&name) {
                    if let Some(close) = matching_close(inner) {
                        out.push(Call {
                            name: name.to_string(),
                            args: inner[..close].to_string(),
                            qualified: prev_sig == Some('.'),
                        });
                    }
                }
            }
            prev_sig = name.chars().last();
            continue;
        }
        if !c.is_whitespace() {
            prev_sig = Some(c);
        }
    }
    out
}

/// The call an assert tests: the first unqualified call that is not a wrapper helper,
/// else the first unqualified call (the target may itself be named like a builtin).
fn assert_target(test: &str) -> Option<Call> {
    let cs: Vec<Call> = calls(test).into_iter().filter(|c| !c.qualified).collect();
    cs.iter()
        .find(|c| !HELPERS.contains(&c.name.as_str()))
        .or(cs.first())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(instruction: &str, tests: &[&str]) -> Problem {
        Problem {
            id: 1,
            instruction: instruction.into(),
            test_list: tests.iter().map(|s| s.to_string()).collect(),
            response: None,
        }
    }

    fn sig(name: &str, params: &[&str]) -> Signature {
        Signature {
            name: name.into(),
            params: params.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn instruction_forms() {
        let p = problem(
            "দুটি সংখ্যা যোগ করুন।\nExample:\nadd_two(a, b)",
            &["assert add_two(1, 2) == 3"],
        );
        assert_eq!(extract_signature(&p), Some(sig("add_two", &["a", "b"])));

        let p = problem(
            "লিখুন।\nExammple:\nfind_Extra(lst, lst2, n)",
            &["assert find_Extra([1],[2],3) == 3"],
        );
        assert_eq!(
            extract_signature(&p),
            Some(sig("find_Extra", &["lst", "lst2", "n"]))
        );

        let p = problem(
            "লিখুন।\nExample:\ndef find_Volume(l,b,h) :\n    # your code\n    return l",
            &["assert find_Volume(10,8,6) == 240"],
        );
        assert_eq!(
            extract_signature(&p),
            Some(sig("find_Volume", &["l", "b", "h"]))
        );

        let p = problem(
            "Example:\ndef f(a, b=[1, 2], c={'x': (1, 2)}, *args, d: int = 3, **kw):\n    return a",
            &["assert f(1)"],
        );
        assert_eq!(
            extract_signature(&p),
            Some(sig(
                "f",
                &[
                    "a",
                    "b=[1, 2]",
                    "c={'x': (1, 2)}",
                    "*args",
                    "d: int = 3",
                    "**kw"
                ]
            ))
        );

        let p = problem(
            "Example:\n\n```python\ndef g(s='a,b)'):\n```",
            &["assert g() == 1"],
        );
        assert_eq!(extract_signature(&p), Some(sig("g", &["s='a,b)'"])));

        // Empty parameter list and a space before the parenthesis.
        let p = problem(
            "Example:\nmax_Prime_Factors ()",
            &["assert max_Prime_Factors () == 5"],
        );
        assert_eq!(extract_signature(&p), Some(sig("max_Prime_Factors", &[])));

        // A `def` line without the marker.
        let p = problem("একটি ফাংশন:\ndef h(x):\n    pass", &["assert h(2) == 4"]);
        assert_eq!(extract_signature(&p), Some(sig("h", &["x"])));
    }

    #[test]
    fn assert_fallbacks() {
        for (test, want) in [
            ("assert fn_a(1, 2)==3", sig("fn_a", &["arg1", "arg2"])),
            ("assert not is_odd(x)", sig("is_odd", &["x"])),
            (
                "assert math.isclose(area(r=2, h=3), 12.5, rel_tol=0.001)",
                sig("area", &["r", "h"]),
            ),
            (
                "assert set(common([1],[2])) == set()",
                sig("common", &["arg1", "arg2"]),
            ),
            (
                "assert int(lobb_num(5, 3)) == 35",
                sig("lobb_num", &["arg1", "arg2"]),
            ),
            (
                "assert (max_height(root)) == 3",
                sig("max_height", &["root"]),
            ),
            ("assert sorted(x) == [1]", sig("sorted", &["x"])),
            ("assert 'f(1)' == g(a, a)", sig("g", &["a", "arg2"])),
            ("assert r'h(\\d)' == k()", sig("k", &[])),
            ("assert Split ([8,12]) == [8,12]", sig("Split", &["arg1"])),
        ] {
            let p = problem("কোনো উদাহরণ নেই।", &[test]);
            assert_eq!(extract_signature(&p), Some(want), "{test}");
        }
        assert_eq!(
            extract_signature(&problem("কিছু না।", &["assert x == 1"])),
            None
        );
    }

    #[test]
    fn instruction_name_not_called_defers_to_asserts() {
        // The instruction names a helper; the asserts test another function.
        let p = problem(
            "Example:\nfactorial(start,end)",
            &["assert sum_of_square(4) == 70"],
        );
        assert_eq!(extract_signature(&p), Some(sig("sum_of_square", &["arg1"])));
        // A name only used as an attribute does not count as called.
        let p = problem("Example:\nisclose(a)", &["assert math.isclose(f(1), 2)"]);
        assert_eq!(extract_signature(&p), Some(sig("f", &["arg1"])));
    }

    #[test]
    fn bangla_marker_and_last_marker_wins() {
        let p = problem(
            "Example: ignore(me)\nআরও লেখা।\nউদাহরণ:\nreal_one(p)",
            &["assert real_one(1)"],
        );
        assert_eq!(extract_signature(&p), Some(sig("real_one", &["p"])));
    }

    #[test]
    fn display() {
        assert_eq!(sig("f", &["a", "b=2"]).to_string(), "f(a, b=2)");
    }
}
