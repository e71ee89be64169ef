//! Oracle check (issue 5 item 6): the trial split's reference answers pass their own
//! asserts in the sandbox, except the ones whose asserts need setup code the data does
//! not have. The exact set of expected failures is asserted, so a sandbox that fails a
//! good program (or passes a bad one) shows up here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use rupantor_exec::{run_many, SandboxConfig, VerdictClass};

/// Trial problems whose asserts use names the data never defines:
/// 27 asserts on a binary tree `root` that no field builds.
const NEEDS_MISSING_SETUP: [u64; 1] = [27];

fn trial_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/blp25/trial.jsonl")
}

#[test]
fn trial_references_pass_their_own_tests() {
    let path = trial_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "SKIP: {} is not there (the shared data is not beside the workspace)",
            path.display()
        );
        return;
    };
    let mut ids = Vec::new();
    let mut jobs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
        let id = row["id"].as_u64().expect("id");
        let response = row["response"]
            .as_str()
            .expect("trial rows have a reference response");
        let tests: Vec<String> = row["test_list"]
            .as_array()
            .expect("test_list")
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        ids.push(id);
        jobs.push((response.to_string(), tests));
    }
    assert_eq!(jobs.len(), 74, "the trial split has 74 problems");
    let cfg = SandboxConfig::default();
    let verdicts = run_many(&cfg, &jobs, rupantor_exec::default_workers(), |_| {});
    let failed: BTreeSet<u64> = ids
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| !v.passed)
        .map(|(id, _)| *id)
        .collect();
    for (id, v) in ids.iter().zip(&verdicts) {
        if !v.passed {
            eprintln!(
                "trial {id}: {} {}",
                v.class,
                v.trace.lines().last().unwrap_or("")
            );
        }
    }
    assert_eq!(
        failed,
        NEEDS_MISSING_SETUP.into_iter().collect::<BTreeSet<_>>()
    );
    let v27 = &verdicts[ids.iter().position(|&i| i == 27).unwrap()];
    assert_eq!(v27.class, VerdictClass::Name);
    assert!(v27.trace.contains("name 'root' is not defined"), "{v27:?}");
}
