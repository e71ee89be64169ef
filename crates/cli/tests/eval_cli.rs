//! `rupantor eval` end to end on a tiny split: pass@1, the per-class table, missing ids,
//! `--json` as the last stdout line, and `--out DIR/verdicts.jsonl`.

use std::process::Command;

#[test]
fn eval_scores_a_tiny_split() {
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("tiny.jsonl");
    std::fs::write(
        &split,
        concat!(
            r#"{"id": 1, "instruction": "যোগ", "test_list": ["assert add(1, 2) == 3"]}"#,
            "\n",
            r#"{"id": 2, "instruction": "গুণ", "test_list": ["assert mul(2, 3) == 6"]}"#,
            "\n",
            r#"{"id": 3, "instruction": "বিয়োগ", "test_list": ["assert sub(3, 1) == 2"]}"#,
            "\n",
            r#"{"id": 4, "instruction": "ভাগ", "test_list": ["assert div(6, 3) == 2"]}"#,
            "\n",
        ),
    )
    .unwrap();
    // the task's format: a JSON list, fenced responses; id 3 missing, id 9 unknown
    let preds = dir.path().join("submission.json");
    std::fs::write(
        &preds,
        serde_json::json!([
            {"id": 1, "response": "```python\ndef add(a, b):\n    return a + b\n```"},
            {"id": 2, "response": "def mul(a, b):\n    return a + b\n"},
            {"id": 4, "response": "import sys\nsys.exit(0)\n"},
            {"id": 9, "response": "x = 1"},
        ])
        .to_string(),
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_rupantor"))
        .arg("eval")
        .arg("--predictions")
        .arg(&preds)
        .arg("--split")
        .arg(&split)
        .arg("--out")
        .arg(&out_dir)
        .args(["--json", "-j", "2", "--timeout", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("pass@1: 0.2500 (1/4)"), "{stdout}");
    assert!(
        stdout.contains("missing predictions (counted as failures): 3"),
        "{stdout}"
    );
    assert!(stderr.contains("ignored: 9"), "{stderr}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        last,
        serde_json::json!({
            "n": 4, "passed": 1, "pass@1": 0.25,
            "by_class": {"pass": 1, "assertion": 1, "exit": 1, "missing": 1}
        })
    );
    let verdicts = std::fs::read_to_string(out_dir.join("verdicts.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = verdicts
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], 1);
    assert_eq!(rows[0]["passed"], true);
    assert_eq!(rows[0]["class"], "pass");
    assert_eq!(rows[1]["class"], "assertion");
    assert!(rows[1]["trace"]
        .as_str()
        .unwrap()
        .contains("AssertionError"));
    assert_eq!(rows[2]["id"], 4);
    assert_eq!(rows[2]["class"], "exit");
    // written atomically: no temporary file left beside it
    let names: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("verdicts.jsonl")]);
}

#[test]
fn eval_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("tiny.jsonl");
    std::fs::write(
        &split,
        "{\"id\": 1, \"instruction\": \"x\", \"test_list\": [\"assert True\"]}\n",
    )
    .unwrap();
    let preds = dir.path().join("preds.jsonl");
    std::fs::write(
        &preds,
        "{\"id\": 1, \"response\": \"x = 1\"}\n{\"id\": 2, \"answer\": \"\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rupantor"))
        .arg("eval")
        .arg("--predictions")
        .arg(&preds)
        .arg("--split")
        .arg(&split)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("preds.jsonl:2") && stderr.contains("field `response`"),
        "{stderr}"
    );
}
