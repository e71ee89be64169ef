//! `rupantor train --device cuda` end to end on the tiny Gemma-2 fixture: a process killed
//! with SIGKILL mid-run and resumed with `--resume` ends with the uninterrupted run's adapter
//! bytes. (The trainer's own GPU tests, crates/train/tests/gpu_train.rs, compare GPU and CPU
//! runs and move checkpoints between the devices.)
//!
//! Without a GPU every test prints `SKIPPED <test>: <reason>` and passes; with
//! `RUPANTOR_REQUIRE_GPU=1` a missing GPU fails it. A GPU bundle runs this binary away from
//! the source tree: `RUPANTOR_BIN` then names the rupantor binary and `RUPANTOR_FIXTURES` the
//! fixtures folder.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn gpu(test: &str) -> bool {
    let required = std::env::var("RUPANTOR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match rupantor_quant::cuda::check_device(0) {
        Ok(()) => true,
        Err(e) if !required => {
            eprintln!("SKIPPED {test}: {e} (RUPANTOR_REQUIRE_GPU=1 makes this a failure)");
            false
        }
        Err(e) => panic!("{test}: RUPANTOR_REQUIRE_GPU=1 but {e}"),
    }
}

fn rupantor() -> PathBuf {
    std::env::var_os("RUPANTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rupantor")))
}

fn tiny_model() -> PathBuf {
    std::env::var_os("RUPANTOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join("gemma_tiny/gemma2")
}

/// `DIR/trial.jsonl` with `n` solved problems and `DIR/tiny.toml` for the tiny model.
fn write_pool(dir: &Path, n: u64, extra_train_keys: &str) {
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

fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
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

fn resume_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(rupantor());
    c.args(["train", "--resume", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("RUPANTOR_DATA");
    c
}

fn run_ok(mut c: Command) -> Output {
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

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The step of `checkpoint/latest.json`, once it exists and parses.
fn latest_step(out: &Path) -> Option<u64> {
    let bytes = std::fs::read(out.join("checkpoint/latest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["step"].as_u64()
}

/// Starts `c` and kills it with SIGKILL once it has checkpointed step 2 or later; returns the
/// checkpointed step.
fn kill_after_a_checkpoint(mut c: Command, out: &Path, steps: u64) -> u64 {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if latest_step(out).is_some_and(|s| s >= 2) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    let at = latest_step(out).unwrap();
    assert!(at < steps, "the run finished ({at} steps) before the kill");
    assert!(!out.join("adapter_model.safetensors").exists());
    at
}

// 40 problems: 4 validation, 36 training = 18 micro-batches = 5 steps an epoch; 8 epochs = 40
// steps, a checkpoint after every step. rank 64 gives A [64, 64] = 4096 elements, so both the
// 8-bit and the f32 optimizer state go through the checkpoints.
const POOL: (u64, &str) = (40, "epochs = 8\ncheckpoint_every = 1\ndropout = 0.2\n");

#[test]
fn gpu_kill_9_then_resume_ends_with_the_uninterrupted_adapter() {
    if !gpu("gpu_kill_9_then_resume_ends_with_the_uninterrupted_adapter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_pool(dir.path(), POOL.0, POOL.1);
    let (whole, cut) = (dir.path().join("whole"), dir.path().join("cut"));
    let flags = ["--rank", "64", "--device", "cuda"];
    run_ok(train_cmd(dir.path(), &whole, &flags));
    let at = kill_after_a_checkpoint(train_cmd(dir.path(), &cut, &flags), &cut, 40);
    eprintln!("killed after the checkpoint of step {at}");
    let o = run_ok(resume_cmd(dir.path(), &cut, &flags));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("resumed from step"), "{stdout}");
    assert!(stdout.contains("steps: 40/40"), "{stdout}");
    assert!(
        read(&cut.join("adapter_model.safetensors"))
            == read(&whole.join("adapter_model.safetensors")),
        "the resumed GPU adapter differs from the uninterrupted one (killed at step {at})"
    );
}
