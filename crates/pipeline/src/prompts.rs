//! The user turns of the inference strategies (design §7): the main prompt with an English
//! translation beside the Bangla, few-shot history, and the repair, review and translation
//! requests. Everything here is text; [`Tokenizer::encode_chat_turns`] turns it into ids.
//!
//! The main prompt without a translation is exactly design §2's ([`chat_user_content`]), so
//! the plain strategy generates from the same ids as `generate_programs`. Repair and review
//! are single user turns that carry the instruction again: their asserts are exactly the
//! ones the sandbox ran (on dev by default only the first), never more, so a dev score still
//! judges on asserts the feedback never showed.
//!
//! [`Tokenizer::encode_chat_turns`]: rupantor_model::Tokenizer::encode_chat_turns

use rupantor_exec::{Verdict, VerdictClass};
use rupantor_model::tokenizer::{chat_user_content, TESTS_HEADER};

use crate::generate::GenSettings;
use crate::glossary::GlossaryEntry;
use crate::retrieval::Solved;

/// Introduces the model's translation in the main prompt.
pub const TRANSLATION_HEADER: &str = "English translation:";
/// Lines of a failure's trace the repair prompt shows at most (from the end).
pub const TRACE_TAIL_LINES: usize = 20;
/// Characters of a failure's trace the repair prompt shows at most (from the end).
pub const TRACE_TAIL_CHARS: usize = 1500;
/// The longest translation kept, in characters (a model that does not stop is cut).
pub const MAX_TRANSLATION_CHARS: usize = 1500;

/// The main user turn: [`chat_user_content`] of the instruction, with `translation` (when
/// given) after the Bangla under [`TRANSLATION_HEADER`] and before the asserts.
pub fn main_user_content(
    instruction: &str,
    visible_tests: Option<&[String]>,
    translation: Option<&str>,
) -> String {
    match translation {
        None => chat_user_content(instruction, visible_tests),
        Some(t) => chat_user_content(
            &format!(
                "{}\n\n{TRANSLATION_HEADER}\n{}",
                instruction.trim(),
                t.trim()
            ),
            visible_tests,
        ),
    }
}

/// Few-shot history: per example a user turn as the main prompt shows a problem (its
/// instruction and, as `settings` decide for the main prompt, its asserts) and a model turn
/// with its program, the way the trainer presents a solved problem.
pub fn fewshot_history(examples: &[&Solved], settings: &GenSettings) -> Vec<(String, String)> {
    examples
        .iter()
        .map(|e| {
            (
                chat_user_content(&e.instruction, settings.visible_tests_of(&e.test_list)),
                e.response.clone(),
            )
        })
        .collect()
}

/// What the repair prompt calls a failure of class `class`.
pub fn class_label(class: VerdictClass) -> &'static str {
    match class {
        VerdictClass::Pass => "no error",
        VerdictClass::Syntax => "a syntax error",
        VerdictClass::Name => "a NameError or AttributeError (a name that is not defined)",
        VerdictClass::Type => "a TypeError",
        VerdictClass::IndexKeyValue => "an IndexError, KeyError or ValueError",
        VerdictClass::Assertion => "a failed assert (a wrong result)",
        VerdictClass::Timeout => "a timeout",
        VerdictClass::Memory => "running out of memory",
        VerdictClass::Exit => "an exit before the tests finished",
        VerdictClass::Other => "a runtime error",
    }
}

/// A short hint per failure class, the debugger prompt of NALA_MAINZ in one line.
pub fn class_hint(class: VerdictClass) -> &'static str {
    match class {
        VerdictClass::Pass => "",
        VerdictClass::Syntax => {
            "The code does not parse. Fix the syntax at the line the trace points to: \
             indentation, brackets, colons, quotes."
        }
        VerdictClass::Name => {
            "Something is used that is not defined. Check spelling, define every helper, import \
             what the code needs, and name the function exactly as the tests call it."
        }
        VerdictClass::Type => {
            "A value has the wrong type or a call the wrong arguments. Check how many arguments \
             the tests pass, their types, and what the function must return."
        }
        VerdictClass::IndexKeyValue => {
            "An index, key or value is out of range or missing. Check bounds, off-by-one \
             loops, empty inputs and dictionary keys."
        }
        VerdictClass::Assertion => {
            "The code runs but returns a wrong result. Work out what the failing test expects \
             and fix the logic, not the test."
        }
        VerdictClass::Timeout => {
            "The code runs too long. Look for an infinite loop or recursion without a base \
             case, and use a faster algorithm."
        }
        VerdictClass::Memory => {
            "The code uses too much memory. Do not build huge lists, strings or recursion."
        }
        VerdictClass::Exit => {
            "The code stops before the tests finish. Do not call exit(), quit() or sys.exit(), \
             and do not read input()."
        }
        VerdictClass::Other => {
            "The code raises an error. Read the last line of the trace and fix its cause \
             (division by zero, recursion depth, a missing module, input())."
        }
    }
}

/// The end of a trace: at most [`TRACE_TAIL_LINES`] lines and [`TRACE_TAIL_CHARS`]
/// characters, starting at a line.
pub fn trace_tail(trace: &str) -> String {
    let trace = trace.trim_end();
    let lines: Vec<&str> = trace.lines().collect();
    let mut tail = lines[lines.len().saturating_sub(TRACE_TAIL_LINES)..].join("\n");
    let n = tail.chars().count();
    if n > TRACE_TAIL_CHARS {
        let cut: String = tail.chars().skip(n - TRACE_TAIL_CHARS).collect();
        tail = match cut.find('\n') {
            Some(nl) if nl + 1 < cut.len() => cut[nl + 1..].to_string(),
            _ => cut,
        };
    }
    tail
}

fn task_block(instruction: &str, translation: Option<&str>) -> String {
    match translation {
        Some(t) => format!(
            "{}\n\n{TRANSLATION_HEADER}\n{}",
            instruction.trim(),
            t.trim()
        ),
        None => instruction.trim().to_string(),
    }
}

fn fenced(code: &str) -> String {
    format!("```python\n{}\n```", code.trim_end())
}

/// The repair request: the task, the failing program, the verdict class with its hint, the
/// trace tail and the asserts that ran (`asserts`, and only those).
pub fn repair_user_content(
    instruction: &str,
    translation: Option<&str>,
    code: &str,
    verdict: &Verdict,
    asserts: &[String],
) -> String {
    let tail = trace_tail(&verdict.trace);
    let tail = if tail.is_empty() {
        "(no error output)".to_string()
    } else {
        tail
    };
    format!(
        "{task}\n\n\
         This Python program was written for the task above:\n{code}\n\n\
         It fails with {label}.\nHint: {hint}\n\n\
         The end of its error output:\n```\n{tail}\n```\n\n\
         {TESTS_HEADER}\n{tests}\n\n\
         Write the corrected program: the complete code in one ```python block.",
        task = task_block(instruction, translation),
        code = fenced(code),
        label = class_label(verdict.class),
        hint = class_hint(verdict.class),
        tests = asserts.join("\n"),
    )
}

/// The reviewer's request: the program passed `asserts`; check the edge cases and rewrite,
/// or return it unchanged.
pub fn review_user_content(
    instruction: &str,
    translation: Option<&str>,
    code: &str,
    asserts: &[String],
) -> String {
    format!(
        "{task}\n\n\
         This Python program was written for the task above and passes these tests:\n{tests}\n\n\
         {code}\n\n\
         Review it as a careful reviewer: does it do exactly what the task asks, also for edge \
         cases the tests do not cover (empty input, zero, negative numbers, one element, \
         duplicates)? If it needs a change, reply with the complete corrected program in one \
         ```python block. If it is correct, reply with the same program unchanged.",
        task = task_block(instruction, translation),
        tests = asserts.join("\n"),
        code = fenced(code),
    )
}

/// The translation request: the Bangla instruction, with the glossary entries that occur in
/// it listed.
pub fn translation_user_content(instruction: &str, glossary: &[&GlossaryEntry]) -> String {
    let mut s = String::from(
        "Translate this Bangla programming task into English. Keep code, function names, \
         variable names and numbers exactly as they are. Reply with the English translation \
         only.\n\n",
    );
    if !glossary.is_empty() {
        s.push_str("Glossary of the programming terms in it:\n");
        for e in glossary {
            s.push_str(&format!("- {}: {}\n", e.bn, e.en));
        }
        s.push('\n');
    }
    s.push_str("Task:\n");
    s.push_str(instruction.trim());
    s
}

/// The translation out of the model's reply: trimmed, a leading "English translation:" or
/// "Translation:" label and enclosing quotes or a fence dropped, cut at
/// [`MAX_TRANSLATION_CHARS`]. `None` when nothing is left.
pub fn clean_translation(raw: &str) -> Option<String> {
    let mut t = raw.trim();
    if t.starts_with("```") {
        let body = t.trim_start_matches('`');
        let body = body.split_once('\n').map_or("", |(_, b)| b);
        t = body.split("```").next().unwrap_or("").trim();
    }
    for label in [TRANSLATION_HEADER, "Translation:", "English:"] {
        if t.len() >= label.len() && t[..label.len()].eq_ignore_ascii_case(label) {
            t = t[label.len()..].trim();
        }
    }
    for q in ['"', '\u{201C}'] {
        if t.starts_with(q) {
            let close = if q == '"' { '"' } else { '\u{201D}' };
            if t.ends_with(close) && t.chars().count() >= 2 {
                t = t[q.len_utf8()..t.len() - close.len_utf8()].trim();
            }
        }
    }
    let t: String = t.chars().take(MAX_TRANSLATION_CHARS).collect();
    let t = t.trim().to_string();
    (!t.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::glossary::Glossary;

    fn tests3() -> Vec<String> {
        ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"]
            .map(String::from)
            .to_vec()
    }

    fn verdict(class: VerdictClass, trace: &str) -> Verdict {
        Verdict {
            passed: false,
            class,
            trace: trace.into(),
            wall: Duration::ZERO,
        }
    }

    #[test]
    fn main_prompt_is_design_2_without_a_translation() {
        let t = tests3();
        assert_eq!(
            main_user_content(" যোগফল\nExample:\nf(x)\n", Some(&t), None),
            chat_user_content(" যোগফল\nExample:\nf(x)\n", Some(&t))
        );
        let with = main_user_content("যোগফল\nExample:\nf(x)", Some(&t[..1]), Some(" Sum. \n"));
        assert_eq!(
            with,
            "যোগফল\nExample:\nf(x)\n\nEnglish translation:\nSum.\n\n\
             Your code should pass these tests:\nassert f(1) == 2"
        );
    }

    #[test]
    fn repair_prompt_holds_code_class_hint_trace_tail_and_only_the_given_asserts() {
        let mut trace = String::new();
        for i in 0..40 {
            trace.push_str(&format!("  frame {i}\n"));
        }
        trace.push_str("NameError: name 'g' is not defined\n");
        let v = verdict(VerdictClass::Name, &trace);
        let t = tests3();
        let p = repair_user_content(
            "কাজ",
            Some("Task."),
            "def f(x):\n    return g(x)",
            &v,
            &t[..1],
        );
        assert!(
            p.starts_with("কাজ\n\nEnglish translation:\nTask.\n\n"),
            "{p}"
        );
        assert!(
            p.contains("```python\ndef f(x):\n    return g(x)\n```"),
            "{p}"
        );
        assert!(p.contains(class_label(VerdictClass::Name)), "{p}");
        assert!(p.contains(class_hint(VerdictClass::Name)), "{p}");
        assert!(p.contains("NameError: name 'g' is not defined"), "{p}");
        assert!(
            p.contains("frame 39") && !p.contains("frame 10\n"),
            "tail only: {p}"
        );
        assert!(
            p.contains("Your code should pass these tests:\nassert f(1) == 2\n"),
            "{p}"
        );
        assert!(
            !p.contains("assert f(2)") && !p.contains("assert f(0)"),
            "{p}"
        );
        // every failing class has its own hint
        let hints: std::collections::HashSet<&str> = VerdictClass::ALL
            .iter()
            .filter(|c| **c != VerdictClass::Pass)
            .map(|c| class_hint(*c))
            .collect();
        assert_eq!(hints.len(), VerdictClass::ALL.len() - 1);
        let p = repair_user_content("x", None, "", &verdict(VerdictClass::Timeout, ""), &t);
        assert!(
            p.contains("(no error output)") && p.contains("assert f(0) == 1"),
            "{p}"
        );
    }

    #[test]
    fn trace_tail_is_bounded() {
        let long = "x".repeat(5000);
        assert_eq!(trace_tail(&long).chars().count(), TRACE_TAIL_CHARS);
        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = trace_tail(&lines);
        assert_eq!(t.lines().count(), TRACE_TAIL_LINES);
        assert!(t.ends_with("line 99"));
    }

    #[test]
    fn review_and_translation_prompts() {
        let t = tests3();
        let p = review_user_content("কাজ", None, "def f(x):\n    return x + 1\n", &t[..1]);
        assert!(p.contains("passes these tests:\nassert f(1) == 2\n\n```python\ndef f(x)"));
        assert!(p.contains("edge cases") && p.contains("unchanged"), "{p}");
        assert!(!p.contains("assert f(2)"));

        let g = Glossary::embedded();
        let instr = "একটি তালিকার জোড় সংখ্যার যোগফল বের করুন।\nExample:\nsum_even(lst)";
        let p = translation_user_content(instr, &g.matches(instr));
        assert!(p.contains("- তালিকা: list\n"), "{p}");
        assert!(
            p.contains("- জোড়: even\n") && p.contains("- যোগফল: sum\n"),
            "{p}"
        );
        assert!(p.ends_with(&format!("Task:\n{instr}")), "{p}");
        let p = translation_user_content("abc", &[]);
        assert!(!p.contains("Glossary"), "{p}");
    }

    #[test]
    fn translations_are_cleaned() {
        assert_eq!(
            clean_translation("  English translation: Sum the list.\n").as_deref(),
            Some("Sum the list.")
        );
        assert_eq!(
            clean_translation("\"Sum the list.\"").as_deref(),
            Some("Sum the list.")
        );
        assert_eq!(
            clean_translation("```text\nSum it.\n```").as_deref(),
            Some("Sum it.")
        );
        assert_eq!(clean_translation("  \n"), None);
        let long = "a".repeat(MAX_TRANSLATION_CHARS + 10);
        assert_eq!(
            clean_translation(&long).unwrap().len(),
            MAX_TRANSLATION_CHARS
        );
    }
}
