//! Helpers shared by the `train` end-to-end tests: the tiny model, a pool of solved problems,
//! the command lines, and reading what a run leaves.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The rupantor binary: `$RUPANTOR_BIN` (a GPU bundle runs the test binaries away from the
/// source tree), else the one cargo built for these tests.
pub fn rupantor() -> PathBuf {
    std::env::var_os("RUPANTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rupantor")))
}

/// The tiny Gemma-2 fixture (its tiny tokenizer is in the same folder), under the repository's
/// `fixtures/` or `$RUPANTOR_FIXTURES`.
pub fn tiny_model() -> PathBuf {
    std::env::var_os("RUPANTOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join("gemma_tiny/gemma2")
}

/// `DIR/trial.jsonl` with `n` solved problems, and `DIR/tiny.toml` with training settings for
/// the tiny model.
pub fn write_pool(dir: &Path, n: u64, extra_train_keys: &str) {
    let mut lines = String::new();
    for i in 1..=n {
        let p = serde_json::json!({
            "id": i,
            "instruction": format!("write a function that adds {i} to its input"),
            "test_list": [format!("assert f(1) == {}", i + 1)],
            "response": format!("def f(x):\n    return x + {i}"),
        });
        lines.push_str(&p.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("trial.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("tiny.toml"),
        format!(
            "[model]\nmodel = {:?}\n\n[train]\nalpha = 16.0\nlr = 3e-3\nmax_len = 64\n\
             eval_every = 3\nprogress = false\n{extra_train_keys}",
            tiny_model().display().to_string()
        ),
    )
    .unwrap();
}

/// `rupantor train --config DATA/tiny.toml --data DATA --out OUT EXTRA...`.
pub fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(rupantor());
    c.arg("train")
        .arg("--config")
        .arg(data.join("tiny.toml"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("RUPANTOR_DATA");
    c
}

/// `rupantor train --resume --data DATA --out OUT EXTRA...` (without --config: OUT/run.toml
/// supplies it).
pub fn resume_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(rupantor());
    c.args(["train", "--resume", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("RUPANTOR_DATA");
    c
}

pub fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `(kind, step, loss)` of every metrics record.
pub fn metrics(out: &Path) -> Vec<(String, u64, f64)> {
    String::from_utf8(read(&out.join("metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let loss = v.get("loss").or(v.get("val_loss")).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
                loss.as_f64().unwrap(),
            )
        })
        .collect()
}

/// The step of `checkpoint/latest.json`, once it exists and parses.
pub fn latest_step(out: &Path) -> Option<u64> {
    let bytes = std::fs::read(out.join("checkpoint/latest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["step"].as_u64()
}

/// Starts `c` (a run of `steps` steps into `out`) and kills it with SIGKILL once it has
/// checkpointed step 2 or later; returns the step of the checkpoint it left.
pub fn kill_after_a_checkpoint(mut c: Command, out: &Path, steps: u64) -> u64 {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let killed_at = loop {
        if let Some(step) = latest_step(out).filter(|&s| s >= 2) {
            break step;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    let at = latest_step(out).unwrap();
    assert!(at >= killed_at && at < steps, "killed at step {at}");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "the run had finished before the kill"
    );
    at
}

/// Trains 40 steps on the tiny model with `flags` twice: once through, and once killed with
/// SIGKILL after a checkpoint and finished with `--resume`; the two adapters must be the same
/// bytes and the metrics the same records.
///
/// 40 problems: 4 validation, 36 training = 18 micro-batches = 5 steps an epoch; 8 epochs = 40
/// steps, a checkpoint after every step. rank 64 gives A [64, 64] = 4096 elements, so both the
/// 8-bit and the f32 optimizer state go through the checkpoints.
pub fn kill_9_then_resume(flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    write_pool(
        dir.path(),
        40,
        "epochs = 8\ncheckpoint_every = 1\ndropout = 0.2\n",
    );
    let whole = dir.path().join("whole");
    let cut = dir.path().join("cut");
    let flags: Vec<&str> = ["--rank", "64"].iter().chain(flags).copied().collect();

    run_ok(train_cmd(dir.path(), &whole, &flags));
    let m_whole = metrics(&whole);
    assert_eq!(m_whole.iter().filter(|r| r.0 == "train").count(), 40);

    let at_kill = kill_after_a_checkpoint(train_cmd(dir.path(), &cut, &flags), &cut, 40);
    eprintln!("killed after the checkpoint of step {at_kill}");

    let o = run_ok(resume_cmd(dir.path(), &cut, &flags));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("resumed from step"), "{stdout}");
    assert!(stdout.contains("steps: 40/40"), "{stdout}");

    assert!(
        read(&cut.join("adapter_model.safetensors"))
            == read(&whole.join("adapter_model.safetensors")),
        "the resumed adapter differs from the uninterrupted one (killed at step {at_kill})"
    );
    assert_eq!(
        read(&cut.join("adapter_config.json")),
        read(&whole.join("adapter_config.json"))
    );
    // One run's metrics: every step once, with the uninterrupted run's losses.
    assert_eq!(metrics(&cut), m_whole);
}
