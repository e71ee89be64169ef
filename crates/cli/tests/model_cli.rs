//! `rupantor perplexity` and `rupantor generate` end to end on the tiny random Gemma-3 fixture
//! (HF layout with its own small tokenizer.json), and `--model org/name` through a fake HF
//! cache. No network: the hub endpoint is a closed local port and HF_HUB_OFFLINE is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma3")
}

fn rupantor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rupantor"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn perplexity_json_is_the_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "def add(a, b):\n    return a + b\n").unwrap();
    let model = fixture();
    let mut seen = Vec::new();
    for quant in ["nf4", "none"] {
        let out = rupantor(
            &[
                "perplexity",
                "--model",
                model.to_str().unwrap(),
                "--file",
                text.to_str().unwrap(),
                "--quant",
                quant,
                "--json",
            ],
            &[],
        );
        let (stdout, _) = ok(&out);
        let v = last_json(&stdout);
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["mean_nll", "perplexity", "tokens"], "{stdout}");
        let nll = v["mean_nll"].as_f64().unwrap();
        let ppl = v["perplexity"].as_f64().unwrap();
        assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-9 * ppl, "{v}");
        assert!(v["tokens"].as_u64().unwrap() > 10);
        seen.push(nll);
    }
    // NF4 moves the value, but not far, on a random model.
    assert!((seen[0] - seen[1]).abs() < 0.1 * seen[1], "{seen:?}");
}

/// A problems file with ids out of order.
fn write_split(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.jsonl");
    let rows = [
        (7, "add two numbers", "assert add(1, 2) == 3"),
        (3, "multiply", "assert mul(2, 3) == 6"),
        (11, "reverse a string", "assert rev('ab') == 'ba'"),
        (1, "square", "assert sq(3) == 9"),
        (5, "max of a list", "assert mx([1, 5, 2]) == 5"),
    ];
    let text: String = rows
        .iter()
        .map(|(id, ins, t)| {
            serde_json::json!({"id": id, "instruction": ins, "test_list": [t]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn generate_writes_every_id_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let split = write_split(dir.path());
    let model = fixture();
    let jsonl = dir.path().join("out/preds.jsonl");
    let out = rupantor(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--split",
            split.to_str().unwrap(),
            "--out",
            jsonl.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--batch",
            "2",
        ],
        &[],
    );
    let (stdout, _) = ok(&out);
    assert!(stdout.contains("5 problems"), "{stdout}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [7, 3, 11, 1, 5]);
    assert!(rows.iter().all(|r| r["response"].is_string()));
    // No temporary file is left next to the output.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["preds.jsonl"]);

    // The submission form, with --limit and a config file supplying the model and batch.
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nmodel = {:?}\nquant = \"none\"\n[generation]\nmax_new_tokens = 4\nbatch = 3\nvisible_tests = false\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let sub = dir.path().join("submission.json");
    let out = rupantor(
        &[
            "generate",
            "--config",
            cfg.to_str().unwrap(),
            "--split",
            split.to_str().unwrap(),
            "--limit",
            "4",
            "--out",
            sub.to_str().unwrap(),
        ],
        &[],
    );
    let (_, stderr) = ok(&out);
    assert!(
        stderr.contains("batch 3") && stderr.contains("(f32)"),
        "{stderr}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sub).unwrap()).unwrap();
    let list = v.as_array().unwrap();
    let ids: Vec<u64> = list.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [7, 3, 11, 1]);
    for r in list {
        let resp = r["response"].as_str().unwrap();
        assert!(
            resp.starts_with("```python\n") && resp.ends_with("\n```"),
            "{resp}"
        );
        assert_eq!(r.as_object().unwrap().len(), 2);
    }
}

#[test]
fn a_hub_id_resolves_through_the_hf_cache_or_fails_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let text = cache.path().join("t.txt");
    std::fs::write(&text, "x = 1\n").unwrap();
    let args = |m: &str| {
        vec![
            "perplexity".to_string(),
            "--model".into(),
            m.to_string(),
            "--file".into(),
            text.to_str().unwrap().to_string(),
            "--json".into(),
        ]
    };
    let env = [("HF_HUB_CACHE", cache.path().to_str().unwrap())];

    // Offline, not cached: one clear error.
    let a = args("acme/tiny-gemma");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = rupantor(&a, &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot download acme/tiny-gemma from the Hugging Face hub (")
            && stderr.contains(
                "download it elsewhere and pass --model PATH (a model directory or .gguf file)"
            ),
        "{stderr}"
    );

    // A snapshot in the cache's layout: used as it is.
    let repo = cache.path().join("models--acme--tiny-gemma");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), snap.join(f)).unwrap();
    }
    let (stdout, stderr) = ok(&rupantor(&a, &env));
    assert!(stderr.contains("snapshots/abc123"), "{stderr}");
    assert!(last_json(&stdout)["tokens"].as_u64().unwrap() > 0);
}
