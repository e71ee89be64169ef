//! Predictions files and pass@1.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{Verdict, VerdictClass};

/// One model answer: the problem id and the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    pub id: u64,
    pub response: String,
}

/// Reads predictions: the shared task's `submission.json` (a JSON list of
/// `{"id": 1, "response": "..."}`) or our JSONL (one such object a line; blank lines are
/// skipped). `id` is an integer (an integer-valued string is accepted), `response` a
/// string (`null` reads as an empty program); other fields are ignored. Errors name the
/// file, the line (JSONL) or entry (JSON list), and the field; duplicate ids are errors.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading predictions {}", path.display()))?;
    let file = path.display();
    let mut out = Vec::new();
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut add = |pred: Prediction, place: String| -> Result<()> {
        if let Some(first) = seen.get(&pred.id) {
            bail!(
                "{file}: {place}: field `id`: duplicate id {} (first at {first})",
                pred.id
            );
        }
        seen.insert(pred.id, place);
        out.push(pred);
        Ok(())
    };
    if text.trim_start().starts_with('[') {
        let entries: Vec<Value> =
            serde_json::from_str(&text).with_context(|| format!("{file}: not a JSON list"))?;
        for (i, entry) in entries.iter().enumerate() {
            let place = format!("entry {}", i + 1);
            let pred = prediction(entry).with_context(|| format!("{file}: {place}"))?;
            add(pred, place)?;
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let place = format!("line {}", i + 1);
            let entry: Value = serde_json::from_str(line)
                .with_context(|| format!("{file}:{}: not JSON", i + 1))?;
            let pred = prediction(&entry).with_context(|| format!("{file}:{}", i + 1))?;
            add(pred, place)?;
        }
    }
    Ok(out)
}

fn prediction(entry: &Value) -> Result<Prediction> {
    let Some(obj) = entry.as_object() else {
        bail!(
            "expected an object with `id` and `response`, got {}",
            kind(entry)
        );
    };
    let id = match obj.get("id") {
        None => bail!("field `id`: missing"),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(id) => id,
            None => bail!("field `id`: expected a non-negative integer, got {n}"),
        },
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(id) => id,
            Err(_) => bail!("field `id`: expected a non-negative integer, got string {s:?}"),
        },
        Some(other) => bail!(
            "field `id`: expected a non-negative integer, got {}",
            kind(other)
        ),
    };
    let response = match obj.get("response") {
        None => bail!("field `response`: missing (id {id})"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => String::new(),
        Some(other) => bail!(
            "field `response`: expected a string, got {} (id {id})",
            kind(other)
        ),
    };
    Ok(Prediction { id, response })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The program in a model response: the first fenced block marked `python`/`py` (or
/// `python3`), else the first fenced block of any kind, else the whole response as it
/// is. The task's `submission.json` responses come fenced ("```python\n...\n```").
pub fn extract_code(response: &str) -> String {
    let blocks = fenced_blocks(response);
    let is_python = |lang: &str| {
        matches!(
            lang.to_ascii_lowercase().as_str(),
            "python" | "py" | "python3"
        )
    };
    if let Some((_, code)) = blocks.iter().find(|(lang, _)| is_python(lang)) {
        return code.clone();
    }
    match blocks.into_iter().next() {
        Some((_, code)) => code,
        None => response.to_string(),
    }
}

/// (info string, body) of each ``` block; an unclosed last block runs to the end.
fn fenced_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("```") {
            match open.take() {
                None => open = Some((rest.trim().to_string(), Vec::new())),
                Some((lang, body)) => blocks.push((lang, body.join("\n"))),
            }
            continue;
        }
        if let Some((_, body)) = open.as_mut() {
            body.push(line);
        }
    }
    if let Some((lang, body)) = open {
        blocks.push((lang, body.join("\n")));
    }
    blocks
}

/// Lines predictions up with the problems: for each problem id in order, its response
/// or `None` when missing; plus the ids of predictions for no listed problem.
pub fn pair_predictions(
    problem_ids: &[u64],
    predictions: Vec<Prediction>,
) -> (Vec<(u64, Option<String>)>, Vec<u64>) {
    let mut by_id: HashMap<u64, String> = predictions
        .into_iter()
        .map(|p| (p.id, p.response))
        .collect();
    let paired = problem_ids
        .iter()
        .map(|&id| (id, by_id.remove(&id)))
        .collect();
    let mut unknown: Vec<u64> = by_id.into_keys().collect();
    unknown.sort_unstable();
    (paired, unknown)
}

/// pass@1 over a split: a missing prediction is a failure, counted apart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Score {
    /// Problems in the split.
    pub n: usize,
    pub passed: usize,
    /// Verdicts per class (classes with none are absent).
    pub by_class: BTreeMap<VerdictClass, usize>,
    /// Problem ids without a prediction, ascending.
    pub missing: Vec<u64>,
}

impl Score {
    /// `results`: one entry per problem, `None` where the prediction is missing.
    pub fn new<'a>(results: impl IntoIterator<Item = (u64, Option<&'a Verdict>)>) -> Score {
        let mut s = Score::default();
        for (id, v) in results {
            s.n += 1;
            match v {
                Some(v) => {
                    s.passed += usize::from(v.passed);
                    *s.by_class.entry(v.class).or_default() += 1;
                }
                None => s.missing.push(id),
            }
        }
        s.missing.sort_unstable();
        s
    }

    pub fn pass_at_1(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.passed as f64 / self.n as f64
        }
    }

    /// The `--json` object of the command-line contract: `{"n", "passed", "pass@1",
    /// "by_class"}`; `by_class` maps class names to counts and has a `"missing"` entry
    /// when predictions are missing, so its counts add up to `n`.
    pub fn to_json(&self) -> Value {
        let mut by_class = serde_json::Map::new();
        for (class, count) in &self.by_class {
            by_class.insert(class.as_str().to_string(), Value::from(*count));
        }
        if !self.missing.is_empty() {
            by_class.insert("missing".to_string(), Value::from(self.missing.len()));
        }
        serde_json::json!({
            "n": self.n,
            "passed": self.passed,
            "pass@1": self.pass_at_1(),
            "by_class": by_class,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_submission_json_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            &dir,
            "submission.json",
            r#"[{"id": 1, "response": "x = 1"}, {"id": "2", "response": null}]"#,
        );
        let b = write(&dir, "p.jsonl", "{\"id\": 1, \"response\": \"x = 1\", \"extra\": 3}\n\n{\"id\": 2, \"response\": \"\"}\n");
        let want = vec![
            Prediction {
                id: 1,
                response: "x = 1".into(),
            },
            Prediction {
                id: 2,
                response: String::new(),
            },
        ];
        assert_eq!(read_predictions(&a).unwrap(), want);
        assert_eq!(read_predictions(&b).unwrap(), want);
    }

    #[test]
    fn errors_name_file_place_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "a.jsonl",
                "{\"id\": 1, \"response\": \"\"}\n{\"id\": -3, \"response\": \"\"}\n",
                ":2",
                "field `id`",
            ),
            (
                "b.jsonl",
                "{\"id\": 1}\n",
                ":1",
                "field `response`: missing",
            ),
            (
                "c.json",
                r#"[{"id": 1, "response": ""}, {"id": 2, "response": 5}]"#,
                "entry 2",
                "field `response`",
            ),
            (
                "d.jsonl",
                "{\"id\": 1, \"response\": \"\"}\n{\"id\": 1, \"response\": \"\"}\n",
                "line 2",
                "duplicate id 1",
            ),
            (
                "e.jsonl",
                "{\"id\": 1, \"response\": \"\"}\nnot json\n",
                ":2",
                "not JSON",
            ),
            (
                "f.json",
                r#"[{"id": 1, "response": ""}, 7]"#,
                "entry 2",
                "expected an object",
            ),
        ];
        for (name, text, place, what) in cases {
            let p = write(&dir, name, text);
            let msg = format!("{:#}", read_predictions(&p).unwrap_err());
            assert!(msg.contains(name), "{msg}");
            assert!(msg.contains(place), "{msg}");
            assert!(msg.contains(what), "{msg}");
        }
    }

    #[test]
    fn code_comes_out_of_fences() {
        assert_eq!(
            extract_code("def f():\n    return 1"),
            "def f():\n    return 1"
        );
        assert_eq!(
            extract_code("```python\ndef f():\n    return 1\n```"),
            "def f():\n    return 1"
        );
        assert_eq!(
            extract_code("Here:\n```\nx = 1\n```\ntext\n```py\ny = 2\n```\n"),
            "y = 2"
        );
        assert_eq!(extract_code("```\nx = 1\n```\n```\nz = 3\n```"), "x = 1");
        assert_eq!(extract_code("```Python\nx = 1\n"), "x = 1");
        assert_eq!(extract_code("  ```python\n  x = 1\n  ```"), "  x = 1");
    }

    #[test]
    fn pairing_and_score_count_missing_as_failures() {
        let preds = vec![
            Prediction {
                id: 3,
                response: "a".into(),
            },
            Prediction {
                id: 1,
                response: "b".into(),
            },
            Prediction {
                id: 9,
                response: "c".into(),
            },
        ];
        let (paired, unknown) = pair_predictions(&[1, 2, 3, 4], preds);
        assert_eq!(
            paired,
            vec![
                (1, Some("b".to_string())),
                (2, None),
                (3, Some("a".to_string())),
                (4, None)
            ]
        );
        assert_eq!(unknown, vec![9]);
        let pass = Verdict {
            passed: true,
            class: VerdictClass::Pass,
            trace: String::new(),
            wall: Duration::ZERO,
        };
        let fail = Verdict {
            passed: false,
            class: VerdictClass::Assertion,
            trace: "x".into(),
            wall: Duration::ZERO,
        };
        let s = Score::new([(1, Some(&pass)), (2, None), (3, Some(&fail)), (4, None)]);
        assert_eq!((s.n, s.passed, s.missing.clone()), (4, 1, vec![2, 4]));
        assert_eq!(s.pass_at_1(), 0.25);
        let j = s.to_json();
        assert_eq!(j["n"], 4);
        assert_eq!(j["passed"], 1);
        assert_eq!(j["pass@1"], 0.25);
        assert_eq!(
            j["by_class"],
            serde_json::json!({"pass": 1, "assertion": 1, "missing": 2})
        );
        assert_eq!(Score::new(std::iter::empty()).pass_at_1(), 0.0);
    }
}
