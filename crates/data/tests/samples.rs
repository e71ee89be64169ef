//! The committed samples under data/samples hold the same four made-up problems in each
//! file form the loader reads; every form must load to exactly the same problems.

use std::path::PathBuf;

use rupantor_data::{extract_signature, load_problems, Problem};

fn sample(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/samples")
        .join(name)
}

fn load(name: &str) -> Vec<Problem> {
    load_problems(&sample(name)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn jsonl_sample_content() {
    let ps = load("problems.jsonl");
    assert_eq!(ps.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2, 3, 7]);
    assert_eq!(
        ps[0].response.as_deref(),
        Some("def add_two(a, b):\n    return a + b")
    );
    assert_eq!(ps[1].response, None);
    assert!(ps[1].instruction.starts_with("একটি স্ট্রিং উল্টে"));
    assert!(ps[1].instruction.ends_with("    return s"));
    // The assert's Python source holds a backslash-n, not a newline.
    assert_eq!(
        ps[1].test_list[1],
        "assert reverse_text('a\\nb') == \"b\\na\""
    );
    assert_eq!(ps[2].test_list.len(), 3);
    assert_eq!(ps[3].test_list.len(), 1);
}

#[test]
fn every_form_loads_the_same_problems() {
    let reference = load("problems.jsonl");
    for name in ["problems.json", "problems.csv", "problems-escaped.csv"] {
        assert_eq!(load(name), reference, "{name} differs from problems.jsonl");
    }
}

#[test]
fn sample_signatures() {
    let got: Vec<String> = load("problems.jsonl")
        .iter()
        .map(|p| extract_signature(p).expect("signature").to_string())
        .collect();
    assert_eq!(
        got,
        [
            "add_two(a, b)",
            "reverse_text(s)",
            "evens(nums)",
            "circle_area(r)"
        ]
    );
}
