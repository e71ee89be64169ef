//! Every malformed input is an error that names the file, the line/row/element and the
//! field; nothing is dropped silently.

use std::fs;
use std::path::PathBuf;

use rupantor_data::{load_problems, DataError, Location};

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn file(name: &str, body: impl AsRef<[u8]>) -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::write(&path, body).unwrap();
    Tmp { _dir: dir, path }
}

fn err(name: &str, body: impl AsRef<[u8]>) -> (DataError, String) {
    let t = file(name, body);
    let e = load_problems(&t.path).expect_err("load should fail");
    assert_eq!(e.path(), t.path);
    // Messages start with the path so they can be clicked / grepped.
    let msg = e.to_string();
    let rel = msg
        .strip_prefix(&t.path.display().to_string())
        .unwrap_or_else(|| panic!("message does not start with the path: {msg}"))
        .to_string();
    (e, rel)
}

const OK: &str = r#"{"id": 1, "instruction": "লিখুন", "test_list": ["assert f() == 1"]}"#;

#[test]
fn jsonl_field_errors_name_line_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"id": 2, "instruction": "x", "test_list": []}"#,
            r#":2: field "test_list": expected a non-empty list of strings, found an empty list"#,
        ),
        (
            r#"{"id": 2, "instruction": "x"}"#,
            r#":2: field "test_list": expected a non-empty list of strings, found nothing (the field is missing)"#,
        ),
        (
            r#"{"id": 2, "instruction": "x", "test_list": "assert f()"}"#,
            r#":2: field "test_list": expected a list of strings, or a string holding a Python/JSON list literal, found a cell that does not start with '[' (expected a list literal such as ['assert f(1) == 2'])"#,
        ),
        (
            r#"{"id": 2, "instruction": "x", "test_list": ["assert f()", 3]}"#,
            r#":2: field "test_list[1]": expected a string, found the number 3"#,
        ),
        (
            r#"{"id": 2, "instruction": "x", "test_list": ["  "]}"#,
            r#":2: field "test_list[0]": expected a non-empty string, found a blank string"#,
        ),
        (
            r#"{"id": "2", "instruction": "x", "test_list": ["assert f()"]}"#,
            r#":2: field "id": expected a non-negative integer, found the string "2""#,
        ),
        (
            r#"{"id": -4, "instruction": "x", "test_list": ["assert f()"]}"#,
            r#":2: field "id": expected a non-negative integer, found the number -4"#,
        ),
        (
            r#"{"id": 2.5, "instruction": "x", "test_list": ["assert f()"]}"#,
            r#":2: field "id": expected a non-negative integer, found the number 2.5"#,
        ),
        (
            r#"{"instruction": "x", "test_list": ["assert f()"]}"#,
            r#":2: field "id": expected a non-negative integer, found nothing (the field is missing)"#,
        ),
        (
            r#"{"id": 2, "instruction": null, "test_list": ["assert f()"]}"#,
            r#":2: field "instruction": expected a string, found null"#,
        ),
        (
            r#"{"id": 2, "instruction": " ", "test_list": ["assert f()"]}"#,
            r#":2: field "instruction": expected a non-empty string, found a blank string"#,
        ),
        (
            r#"{"id": 2, "instruction": "x", "test_list": ["assert f()"], "response": 7}"#,
            r#":2: field "response": expected a string or null, found the number 7"#,
        ),
        (
            r#"["not", "an", "object"]"#,
            r#":2: expected a JSON object, found a list of 3 items"#,
        ),
    ];
    for (line, want) in cases {
        let (e, rel) = err("bad.jsonl", format!("{OK}\n{line}\n"));
        assert_eq!(&rel, want, "for line {line}");
        assert_eq!(e.location(), Some(Location::Line(2)));
    }
}

#[test]
fn jsonl_blank_lines_skipped_but_garbage_is_an_error() {
    let t = file("ok.jsonl", format!("\n{OK}\r\n   \n\n"));
    assert_eq!(load_problems(&t.path).unwrap().len(), 1);

    let (e, rel) = err("bad.jsonl", format!("{OK}\n\n<garbage>\n"));
    assert!(
        rel.starts_with(":3: not valid JSON: expected value (column 1)"),
        "{rel}"
    );
    assert!(matches!(e, DataError::Syntax { .. }));

    let (_, rel) = err(
        "trunc.jsonl",
        format!("{OK}\n{{\"id\": 2, \"instruction\": \"x\"\n"),
    );
    assert!(rel.starts_with(":2: not valid JSON: EOF"), "{rel}");
}

#[test]
fn duplicate_ids_name_both_places() {
    let body = format!("{OK}\n{}\n{OK}\n", OK.replace("\"id\": 1", "\"id\": 2"));
    let (e, rel) = err("dup.jsonl", body);
    assert_eq!(rel, ":3: duplicate id 1 (first at line 1)");
    assert!(matches!(
        e,
        DataError::DuplicateId {
            id: 1,
            first: Location::Line(1),
            second: Location::Line(3),
            ..
        }
    ));

    let (_, rel) = err("dup.json", format!("[{OK}, {OK}]"));
    assert_eq!(rel, ": element [1]: duplicate id 1 (first at element [0])");

    let (_, rel) = err(
        "dup.csv",
        "id,instruction,test_list\n4,a,['assert f()']\n5,b,['assert f()']\n04,c,['assert f()']\n",
    );
    assert_eq!(rel, ": row 3: duplicate id 4 (first at row 1)");
}

#[test]
fn non_utf8_names_line_and_byte_offset() {
    let mut body = format!("{OK}\n").into_bytes();
    let line2 = br#"{"id": 2, "instruction": "ab"#;
    body.extend_from_slice(line2);
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(b"\", \"test_list\": [\"assert f()\"]}\n");
    let offset = OK.len() + 1 + line2.len();
    let (e, rel) = err("bytes.jsonl", &body);
    assert_eq!(
        rel,
        format!(
            ":2: invalid UTF-8 at byte offset {offset} (byte {} of the line)",
            line2.len() + 1
        )
    );
    assert!(matches!(e, DataError::NotUtf8 { line: 2, .. }));

    // The same check guards the CSV and JSON readers.
    let (_, rel) = err("bytes.csv", b"id,instruction,test_list\n1,\xc3,['x']\n");
    assert!(
        rel.starts_with(":2: invalid UTF-8 at byte offset 27"),
        "{rel}"
    );
}

#[test]
fn json_list_errors_name_the_element() {
    let (_, rel) = err(
        "x.json",
        format!("[{OK}, {{\"id\": 2, \"instruction\": \"x\", \"test_list\": [\"\"]}}]"),
    );
    assert_eq!(
        rel,
        r#": element [1]: field "test_list[0]": expected a non-empty string, found a blank string"#
    );
    let (_, rel) = err("x.json", format!("[{OK}, 3]"));
    assert_eq!(
        rel,
        ": element [1]: expected a JSON object, found the number 3"
    );
    let (_, rel) = err("x.json", format!("{{\"data\": [{OK}]}}"));
    assert_eq!(
        rel,
        ":1: expected a JSON list of problem objects, found an object"
    );
    let (_, rel) = err("x.json", format!("[\n{OK},\n{OK}\n"));
    assert!(
        rel.starts_with(":4: not valid JSON: EOF while parsing a list"),
        "{rel}"
    );
    let (e, rel) = err("x.json", "[]");
    assert_eq!(rel, ": contains no problems");
    assert!(matches!(e, DataError::Empty { .. }));
}

#[test]
fn csv_errors_name_the_row_and_field() {
    const H: &str = "id,instruction,test_list\n";
    let cases: &[(&str, &str)] = &[
        (
            "2,x,[]",
            r#": row 2: field "test_list": expected a non-empty list of strings, found an empty list"#,
        ),
        (
            "2,x,['assert f()'",
            r#": row 2: field "test_list": expected a Python or JSON list literal of strings, found not a Python list of strings: unterminated list literal (missing ']') at character 13"#,
        ),
        (
            "2,x,\"['a', 1]\"",
            r#": row 2: field "test_list": expected a Python or JSON list literal of strings, found not a Python list of strings: expected a string literal, found '1' at character 6"#,
        ),
        (
            "two,x,['assert f()']",
            r#": row 2: field "id": expected a non-negative integer, found "two""#,
        ),
        (
            "2.0,x,['assert f()']",
            r#": row 2: field "id": expected a non-negative integer, found "2.0""#,
        ),
        (
            "2,,['assert f()']",
            r#": row 2: field "instruction": expected a non-empty string, found a blank string"#,
        ),
        ("2,x", ": row 2: has 2 fields but the header has 3 (line 3)"),
    ];
    for (row, want) in cases {
        let (e, rel) = err("bad.csv", format!("{H}1,ok,['assert f()']\n{row}\n"));
        assert_eq!(&rel, want, "for row {row}");
        assert_eq!(e.location(), Some(Location::Row(2)));
    }

    let (_, rel) = err("h.csv", "id,instruction,tests\n1,x,['a']\n");
    assert_eq!(
        rel,
        r#": header: missing column "test_list" (the header has: id, instruction, tests; expected id, instruction, test_list and optionally response)"#
    );
    let (_, rel) = err("h.csv", "id,id,instruction,test_list\n");
    assert_eq!(rel, r#": header: column "id" appears twice"#);
    let (_, rel) = err("h.csv", H);
    assert_eq!(rel, ": contains no problems");
    let (_, rel) = err("h.csv", "");
    assert_eq!(rel, ": contains no problems");
}

#[test]
fn csv_accepts_string_ids_bom_crlf_and_extra_columns() {
    let body = "\u{feff}ID, Instruction ,test_list,response,score\r\n\
                \" 12 \",\"লিখুন\r\nExample:\r\nf(x)\",\"['assert f(1) == 1']\",,0.5\r\n\
                13,আরও,\"\"\"[\\\"\"assert g('a') == 1\\\"\"]\"\"\",def g(s): return 1,1\r\n";
    let t = file("ok.csv", body);
    let ps = load_problems(&t.path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].id, 12);
    assert_eq!(ps[0].instruction, "লিখুন\r\nExample:\r\nf(x)");
    assert_eq!(ps[0].response, None);
    assert_eq!(ps[1].test_list, ["assert g('a') == 1"]);
    assert_eq!(ps[1].response.as_deref(), Some("def g(s): return 1"));
}

#[test]
fn json_forms_accept_null_response_and_string_test_list() {
    let body = r#"[{"id": 1, "instruction": "x", "test_list": "['assert f(1) == 2']", "response": null, "extra": {"a": 1}},
                  {"id": 2, "instruction": "y", "test_list": ["assert g()"], "response": ""},
                  {"id": 3, "instruction": "z", "test_list": ["assert h()"], "response": "def h(): return 1"}]"#;
    let t = file("ok.json", body);
    let ps = load_problems(&t.path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ps[0].test_list, ["assert f(1) == 2"]);
    assert_eq!(ps[0].response, None);
    assert_eq!(ps[1].response, None, "an empty response is no response");
    assert_eq!(ps[2].response.as_deref(), Some("def h(): return 1"));
}

#[test]
fn missing_file_and_unknown_extension() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let e = load_problems(&missing).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }));
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}: not found", missing.display())),
        "{msg}"
    );
    assert!(msg.contains("scripts/fetch-data.sh"), "{msg}");

    let (e, rel) = err("problems.txt", OK);
    assert!(matches!(e, DataError::UnknownFormat { .. }));
    assert_eq!(
        rel,
        ": unknown file type; expected a .jsonl, .json or .csv file"
    );
}
