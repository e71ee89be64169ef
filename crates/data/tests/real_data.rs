//! The real BLP-2025 splits, read from ../shared/data/blp25 next to the repository when it
//! is there (the data is not committed). Skips with a message when it is not.

use std::path::{Path, PathBuf};

use rupantor_data::{extract_signature, load_problems, load_split, Problem};

fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/blp25");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: {} not found (the real splits are not part of the repository)",
            dir.display()
        );
        None
    }
}

fn load(dir: &Path, split: &str) -> Vec<Problem> {
    load_split(dir, split).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn split_sizes_and_shapes() {
    let Some(dir) = shared_dir() else { return };
    for (split, n, asserts, with_response) in [
        ("trial", 74, 3, true),
        ("dev", 400, 3, false),
        ("test", 500, 1, false),
    ] {
        let ps = load(&dir, split);
        assert_eq!(ps.len(), n, "{split}");
        let ids: Vec<u64> = ps.iter().map(|p| p.id).collect();
        assert_eq!(ids, (1..=n as u64).collect::<Vec<_>>(), "{split} ids");
        for p in &ps {
            assert_eq!(p.test_list.len(), asserts, "{split} {}", p.id);
            assert_eq!(p.response.is_some(), with_response, "{split} {}", p.id);
            assert!(p
                .test_list
                .iter()
                .all(|t| t.trim_start().starts_with("assert")));
        }
    }
}

/// True when `name(` (spaces allowed before the parenthesis) occurs in `test` as a whole
/// identifier.
fn calls(test: &str, name: &str) -> bool {
    test.match_indices(name).any(|(i, _)| {
        let before = test[..i].chars().next_back();
        let ident_before = before.is_some_and(|c| c == '_' || c.is_alphanumeric() || c == '.');
        !ident_before && test[i + name.len()..].trim_start().starts_with('(')
    })
}

#[test]
fn every_problem_has_a_signature_the_asserts_call() {
    let Some(dir) = shared_dir() else { return };
    let mut failures = Vec::new();
    let mut from_asserts = Vec::new();
    for split in ["trial", "dev", "test"] {
        for p in load(&dir, split) {
            let Some(sig) = extract_signature(&p) else {
                failures.push(format!("{split} {}: no signature", p.id));
                continue;
            };
            if !p.test_list.iter().all(|t| calls(t, &sig.name)) {
                failures.push(format!(
                    "{split} {}: {sig} not called by every assert",
                    p.id
                ));
            }
            if !p.instruction.contains(&format!("{}(", sig.name))
                && !p.instruction.contains(&format!("{} (", sig.name))
            {
                from_asserts.push(format!("{split} {}: {sig}", p.id));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The one problem whose instruction names a helper, not the function under test.
    assert_eq!(from_asserts, ["trial 5: sum_of_square(arg1)"]);
}

#[test]
fn signature_spot_checks() {
    let Some(dir) = shared_dir() else { return };
    let find = |split: &str, id: u64| {
        let p = load(&dir, split).into_iter().find(|p| p.id == id).unwrap();
        extract_signature(&p).unwrap().to_string()
    };
    assert_eq!(find("trial", 1), "smallest_multiple(n)");
    assert_eq!(find("trial", 12), "lobb_num(n, m)");
    assert_eq!(find("trial", 27), "max_height(node)");
    assert_eq!(find("dev", 1), "max_chain_length(lst, n)");
    assert_eq!(find("dev", 169), "Diff(lst, lst2)");
    assert_eq!(find("test", 1), "remove_Occ(s, ch)");
    assert_eq!(find("test", 332), "__init__(self, value, list_num, index)");
}

/// Python's `repr` of a str: single quotes unless the text has ' and no ".
fn py_repr(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

fn py_list_repr(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    format!("[{}]", parts.join(", "))
}

/// Writes the real splits back out in the task's CSV forms (plain Python literal and the
/// JSON-escaped one) and as a JSON list, and checks they load to the same problems.
#[test]
fn real_splits_round_trip_through_every_form() {
    let Some(dir) = shared_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for split in ["trial", "dev", "test"] {
        let ps = load(&dir, split);
        for escaped in [false, true] {
            let path = tmp.path().join(format!("{split}-{escaped}.csv"));
            let mut w = csv::Writer::from_path(&path).unwrap();
            w.write_record(["id", "instruction", "response", "test_list"])
                .unwrap();
            for p in &ps {
                let lit = py_list_repr(&p.test_list);
                let cell = if escaped {
                    serde_json::to_string(&lit).unwrap()
                } else {
                    lit
                };
                let id = p.id.to_string();
                let response = p.response.clone().unwrap_or_default();
                w.write_record([id.as_str(), &p.instruction, &response, &cell])
                    .unwrap();
            }
            w.flush().unwrap();
            drop(w);
            let back = load_problems(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, ps, "{}", path.display());
        }
        let path = tmp.path().join(format!("{split}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&ps).unwrap()).unwrap();
        assert_eq!(load_problems(&path).unwrap(), ps);
    }
}
