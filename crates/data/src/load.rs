//! Readers for the three file forms: JSONL (ours), a JSON list, and the task's CSV.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DataError, Location};
use crate::pylit::decode_test_list_cell;
use crate::Problem;

#[derive(Clone, Copy)]
enum Format {
    Jsonl,
    Json,
    Csv,
}

pub(crate) fn load(path: &Path) -> Result<Vec<Problem>, DataError> {
    if !path.exists() {
        return Err(DataError::NotFound {
            path: path.to_path_buf(),
            what: "no such file".into(),
        });
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let format = match ext.as_deref() {
        Some("jsonl") | Some("ndjson") => Format::Jsonl,
        Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        _ => {
            return Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
            })
        }
    };
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = utf8(path, &bytes)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = match format {
        Format::Jsonl => jsonl(path, text)?,
        Format::Json => json_list(path, text)?,
        Format::Csv => csv_rows(path, text)?,
    };
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut seen: HashMap<u64, Location> = HashMap::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    for (at, p) in rows {
        if let Some(first) = seen.insert(p.id, at) {
            return Err(DataError::DuplicateId {
                path: path.to_path_buf(),
                id: p.id,
                first,
                second: at,
            });
        }
        out.push(p);
    }
    Ok(out)
}

fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let offset = e.valid_up_to();
        let before = &bytes[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            column: offset - line_start + 1,
            offset,
        }
    })
}

/// A short description of a JSON value for "found ..." in messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", quote_short(s)),
        Value::Array(a) if a.is_empty() => "an empty list".into(),
        Value::Array(a) => format!("a list of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

fn quote_short(s: &str) -> String {
    const MAX: usize = 40;
    let mut q: String = s.chars().take(MAX).collect();
    if s.chars().count() > MAX {
        q.push('…');
    }
    format!("{q:?}")
}

/// Strips serde_json's " at line L column C" so the message can carry our own location.
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_string()
}

struct Ctx<'a> {
    path: &'a Path,
    at: Location,
}

impl Ctx<'_> {
    fn field(&self, field: &str, expected: &str, found: Option<String>) -> DataError {
        DataError::Field {
            path: self.path.to_path_buf(),
            at: self.at,
            field: field.to_string(),
            expected: expected.to_string(),
            found,
        }
    }

    fn syntax(&self, message: String) -> DataError {
        DataError::Syntax {
            path: self.path.to_path_buf(),
            at: self.at,
            message,
        }
    }

    /// Checks a decoded test list: non-empty, no blank asserts.
    fn tests(&self, tests: Vec<String>) -> Result<Vec<String>, DataError> {
        if tests.is_empty() {
            return Err(self.field(
                "test_list",
                "a non-empty list of strings",
                Some("an empty list".into()),
            ));
        }
        if let Some(i) = tests.iter().position(|t| t.trim().is_empty()) {
            return Err(self.field(
                &format!("test_list[{i}]"),
                "a non-empty string",
                Some("a blank string".into()),
            ));
        }
        Ok(tests)
    }

    fn instruction(&self, s: String) -> Result<String, DataError> {
        if s.trim().is_empty() {
            return Err(self.field(
                "instruction",
                "a non-empty string",
                Some("a blank string".into()),
            ));
        }
        Ok(s)
    }
}

/// An empty reference answer carries nothing to train on, so it counts as no answer.
fn non_empty_response(s: String) -> Option<String> {
    if s.trim().is_empty() {
        None
    } else {
        Some(s)
    }
}

fn problem_from_object(ctx: &Ctx, obj: &Map<String, Value>) -> Result<Problem, DataError> {
    const MISSING: &str = "nothing (the field is missing)";
    let id = match obj.get("id") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ctx.field("id", "a non-negative integer", Some(describe(v))))?,
        None => return Err(ctx.field("id", "a non-negative integer", Some(MISSING.into()))),
    };
    let instruction = match obj.get("instruction") {
        Some(Value::String(s)) => ctx.instruction(s.clone())?,
        Some(v) => return Err(ctx.field("instruction", "a string", Some(describe(v)))),
        None => return Err(ctx.field("instruction", "a string", Some(MISSING.into()))),
    };
    const LIST: &str = "a non-empty list of strings";
    let test_list = match obj.get("test_list") {
        Some(Value::Array(items)) => {
            let mut tests = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => tests.push(s.clone()),
                    v => {
                        return Err(ctx.field(
                            &format!("test_list[{i}]"),
                            "a string",
                            Some(describe(v)),
                        ))
                    }
                }
            }
            ctx.tests(tests)?
        }
        // A CSV converted by a tool that kept the Python-literal cell as a string.
        Some(Value::String(cell)) => {
            let tests = decode_test_list_cell(cell).map_err(|e| {
                ctx.field(
                    "test_list",
                    "a list of strings, or a string holding a Python/JSON list literal",
                    Some(e),
                )
            })?;
            ctx.tests(tests)?
        }
        Some(v) => return Err(ctx.field("test_list", LIST, Some(describe(v)))),
        None => return Err(ctx.field("test_list", LIST, Some(MISSING.into()))),
    };
    let response = match obj.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => non_empty_response(s.clone()),
        Some(v) => return Err(ctx.field("response", "a string or null", Some(describe(v)))),
    };
    Ok(Problem {
        id,
        instruction,
        test_list,
        response,
    })
}

fn jsonl(path: &Path, text: &str) -> Result<Vec<(Location, Problem)>, DataError> {
    let mut rows = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let ctx = Ctx {
            path,
            at: Location::Line(i + 1),
        };
        let value: Value = serde_json::from_str(line).map_err(|e| {
            ctx.syntax(format!(
                "not valid JSON: {} (column {})",
                json_message(&e),
                e.column()
            ))
        })?;
        let Value::Object(obj) = &value else {
            return Err(ctx.syntax(format!(
                "expected a JSON object, found {}",
                describe(&value)
            )));
        };
        rows.push((ctx.at, problem_from_object(&ctx, obj)?));
    }
    Ok(rows)
}

fn json_list(path: &Path, text: &str) -> Result<Vec<(Location, Problem)>, DataError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::Syntax {
        path: path.to_path_buf(),
        at: Location::Line(e.line()),
        message: format!(
            "not valid JSON: {} (column {})",
            json_message(&e),
            e.column()
        ),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::Syntax {
            path: path.to_path_buf(),
            at: Location::Line(1),
            message: format!(
                "expected a JSON list of problem objects, found {}",
                describe(&value)
            ),
        });
    };
    let mut rows = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ctx = Ctx {
            path,
            at: Location::Element(i),
        };
        let Value::Object(obj) = item else {
            return Err(ctx.syntax(format!("expected a JSON object, found {}", describe(item))));
        };
        rows.push((ctx.at, problem_from_object(&ctx, obj)?));
    }
    Ok(rows)
}

fn csv_rows(path: &Path, text: &str) -> Result<Vec<(Location, Problem)>, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let header_ctx = Ctx {
        path,
        at: Location::Header,
    };
    let header = match records.next() {
        None => {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            })
        }
        Some(Err(e)) => return Err(header_ctx.syntax(format!("not valid CSV: {e}"))),
        Some(Ok(h)) => h,
    };
    let mut columns: HashMap<String, usize> = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        if columns.insert(name.clone(), i).is_some() {
            return Err(header_ctx.syntax(format!("column \"{name}\" appears twice")));
        }
    }
    let column = |name: &str| -> Result<usize, DataError> {
        columns.get(name).copied().ok_or_else(|| {
            let have: Vec<&str> = header.iter().map(str::trim).collect();
            header_ctx.syntax(format!(
                "missing column \"{name}\" (the header has: {}; expected id, instruction, test_list and optionally response)",
                have.join(", ")
            ))
        })
    };
    let (c_id, c_instruction, c_tests) =
        (column("id")?, column("instruction")?, column("test_list")?);
    let c_response = columns.get("response").copied();

    let mut rows = Vec::new();
    for (i, record) in records.enumerate() {
        let ctx = Ctx {
            path,
            at: Location::Row(i + 1),
        };
        let record = record.map_err(|e| ctx.syntax(format!("not valid CSV: {e}")))?;
        if record.len() != header.len() {
            return Err(ctx.syntax(format!(
                "has {} fields but the header has {} (line {})",
                record.len(),
                header.len(),
                record.position().map_or(0, |p| p.line())
            )));
        }
        let id_cell = record[c_id].trim();
        let id: u64 = id_cell
            .parse()
            .map_err(|_| ctx.field("id", "a non-negative integer", Some(quote_short(id_cell))))?;
        let instruction = ctx.instruction(record[c_instruction].to_string())?;
        let tests = decode_test_list_cell(&record[c_tests]).map_err(|e| {
            ctx.field(
                "test_list",
                "a Python or JSON list literal of strings",
                Some(e),
            )
        })?;
        let test_list = ctx.tests(tests)?;
        let response = c_response.and_then(|c| non_empty_response(record[c].to_string()));
        rows.push((
            ctx.at,
            Problem {
                id,
                instruction,
                test_list,
                response,
            },
        ));
    }
    Ok(rows)
}
