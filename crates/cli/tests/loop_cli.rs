//! `rupantor train --iter 2` and `rupantor generate --adapter` end to end on the tiny random
//! Gemma-2 (configs/tiny.toml) and the project's own sample splits (data/samples/loop): both
//! iterations' adapters, the report, run.toml, a valid test submission and a scored dev run.
//! The tiny model writes noise, so the fold itself is tested in crates/pipeline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rupantor(args: &[&str], extra: &[&Path]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rupantor"));
    c.args(args)
        .args(extra)
        .current_dir(repo())
        .env_remove("RUPANTOR_DATA");
    c
}

fn run_ok(mut c: Command) -> (String, String) {
    let out: Output = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{c:?} failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

fn ids_of(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_iterations_then_submissions_from_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r4");
    let data = repo().join("data/samples/loop");
    let mut train = rupantor(
        &[
            "train",
            "--config",
            "configs/tiny.toml",
            "--iter",
            "2",
            "--data",
        ],
        &[&data],
    );
    train.arg("--out").arg(&out);
    let (stdout, _) = run_ok(train);
    for k in 1..=2 {
        assert!(
            stdout.contains(&format!("iteration {k}: pool ")),
            "{stdout}"
        );
        let it = out.join(format!("iter{k}"));
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metrics.jsonl",
            "loss.png",
            "dev_predictions.jsonl",
            "verdicts.jsonl",
            "DONE",
        ] {
            assert!(it.join(f).is_file(), "iter{k}/{f} missing");
        }
        assert_eq!(ids_of(&it.join("verdicts.jsonl")), [101, 102, 103, 104]);
    }
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.md",
        "pool.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("pass@1"), "{report}");
    let run: toml::Table =
        toml::from_str(&std::fs::read_to_string(out.join("run.toml")).unwrap()).unwrap();
    assert_eq!(run["loop"]["iterations"].as_integer(), Some(2));
    assert_eq!(run["generation"]["max_new_tokens"].as_integer(), Some(16));
    assert_eq!(run["train"]["rank"].as_integer(), Some(4));
    // The test split is never folded into the pool.
    assert!(ids_of(&out.join("pool.jsonl")).iter().all(|id| *id < 200));

    // A second run into the same folder without --resume is refused; with it, both finished
    // iterations are kept.
    let mut again = rupantor(&["train", "--iter", "2", "--data"], &[&data]);
    again
        .arg("--config")
        .arg(out.join("run.toml"))
        .arg("--out")
        .arg(&out);
    assert!(!again.output().unwrap().status.success());
    let mut resume = rupantor(&["train", "--resume", "--data"], &[&data]);
    resume.arg("--out").arg(&out);
    let (stdout, _) = run_ok(resume);
    assert!(stdout.contains("(finished earlier)"), "{stdout}");

    // The test split: every id in input order, each response a fenced program.
    let mut gen = rupantor(&["generate", "--split", "test", "--data"], &[&data]);
    gen.arg("--adapter").arg(&out);
    run_ok(gen);
    let sub: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("test/submission.json")).unwrap())
            .unwrap();
    let ids: Vec<u64> = sub.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [201, 202, 203]);
    for r in &sub {
        let text = r["response"].as_str().unwrap();
        assert!(
            text.starts_with("```python\n") && text.ends_with("\n```"),
            "{text}"
        );
    }
    assert_eq!(ids_of(&out.join("test/predictions.jsonl")), [201, 202, 203]);

    // dev is scored; an iteration folder finds the run's settings in its parent.
    let file = dir.path().join("dev1.json");
    let mut gen = rupantor(&["generate", "--split", "dev", "--data"], &[&data]);
    gen.arg("--adapter")
        .arg(out.join("iter1"))
        .arg("--out")
        .arg(&file);
    let (stdout, _) = run_ok(gen);
    assert!(stdout.contains("pass@1: "), "{stdout}");
    assert_eq!(
        ids_of(&dir.path().join("dev1.verdicts.jsonl")),
        [101, 102, 103, 104]
    );

    // Every strategy at once: few-shot from the run's pool, repair, review, translation.
    let file = dir.path().join("dev_all.jsonl");
    let mut gen = rupantor(
        &[
            "generate",
            "--split",
            "dev",
            "--fewshot",
            "2",
            "--repair",
            "1",
            "--review",
            "--translate",
            "--data",
        ],
        &[&data],
    );
    gen.arg("--adapter").arg(&out).arg("--out").arg(&file);
    let (stdout, stderr) = run_ok(gen);
    assert!(stderr.contains("few-shot examples from"), "{stderr}");
    assert!(stderr.contains("pool.jsonl"), "{stderr}");
    assert!(stdout.contains("visible asserts pass@1: "), "{stdout}");
    assert!(stdout.contains("pass@1: "), "{stdout}");
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev_all.strategies.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["visible"]["n"], 4);
    assert_eq!(ids_of(&file), [101, 102, 103, 104]);
}

#[test]
fn the_loop_generates_dev_with_configured_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny-strategies.toml");
    let tiny = std::fs::read_to_string(repo().join("configs/tiny.toml")).unwrap();
    std::fs::write(
        &cfg,
        format!("{tiny}\n[strategies]\nfewshot = 1\nrepair = 1\n"),
    )
    .unwrap();
    let out = dir.path().join("o");
    let data = repo().join("data/samples/loop");
    let mut train = rupantor(&["train", "--iter", "1", "--data"], &[&data]);
    train.arg("--config").arg(&cfg).arg("--out").arg(&out);
    run_ok(train);
    let run: toml::Table =
        toml::from_str(&std::fs::read_to_string(out.join("run.toml")).unwrap()).unwrap();
    assert_eq!(run["strategies"]["repair"].as_integer(), Some(1));
    assert_eq!(run["strategies"]["fewshot"].as_integer(), Some(1));
    assert_eq!(
        ids_of(&out.join("iter1/verdicts.jsonl")),
        [101, 102, 103, 104]
    );
    // A plain run writes no [strategies] table.
    let plain = std::fs::read_to_string(repo().join("configs/tiny.toml")).unwrap();
    assert!(!plain.contains("[strategies]"));
}

#[test]
fn adapter_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let o = rupantor(&["generate", "--adapter"], &[&dir.path().join("nope")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such folder"));
    // A folder without run.toml nor an adapter config.
    let o = rupantor(&["generate", "--adapter"], &[dir.path()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("adapter_config.json"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
