//! Split names map to files in the data folder; anything else is a path.

use std::fs;
use std::path::Path;

use rupantor_data::{load_split, resolve_split, DataError};

const ROW: &str =
    r#"{"id": 1, "instruction": "লিখুন।\nExample:\nf(x)", "test_list": ["assert f(1) == 1"]}"#;

fn write(dir: &Path, name: &str, body: &str) {
    fs::write(dir.join(name), body).unwrap();
}

#[test]
fn named_split_prefers_jsonl_then_json_then_csv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "dev.csv",
        "id,instruction,test_list\n5,লিখুন,['assert g() == 2']\n",
    );
    assert_eq!(resolve_split(d, "dev").unwrap(), d.join("dev.csv"));
    assert_eq!(load_split(d, "dev").unwrap()[0].id, 5);
    write(d, "dev.json", &format!("[{ROW}]"));
    assert_eq!(resolve_split(d, "dev").unwrap(), d.join("dev.json"));
    write(d, "dev.jsonl", &format!("{ROW}\n"));
    assert_eq!(resolve_split(d, "dev").unwrap(), d.join("dev.jsonl"));
    assert_eq!(load_split(d, "dev").unwrap()[0].id, 1);
}

#[test]
fn missing_split_names_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let err = resolve_split(dir.path(), "test").unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }));
    let msg = err.to_string();
    let want = dir.path().join("test.jsonl");
    assert!(msg.starts_with(&want.display().to_string()), "{msg}");
    for needle in [
        "scripts/fetch-data.sh",
        "--data",
        "RUPANTOR_DATA",
        "test.csv",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    assert!(load_split(dir.path(), "trial").is_err());
}

#[test]
fn other_names_are_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mine.jsonl");
    fs::write(&file, format!("{ROW}\n")).unwrap();
    let as_str = file.to_str().unwrap();
    // The data folder plays no part for a path.
    let elsewhere = Path::new("/nonexistent-data-dir");
    assert_eq!(resolve_split(elsewhere, as_str).unwrap(), file);
    assert_eq!(load_split(elsewhere, as_str).unwrap().len(), 1);

    let err = resolve_split(elsewhere, "train").unwrap_err().to_string();
    assert!(err.starts_with("train: not found"), "{err}");
    assert!(err.contains("trial, dev, test"), "{err}");
    assert!(err.contains("scripts/fetch-data.sh"), "{err}");
}
