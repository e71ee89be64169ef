//! `rupantor train` end to end on the tiny Gemma-2 fixture (its tiny tokenizer is in the same
//! folder) with a pool the tests write: the files a run leaves, and a run killed with SIGKILL
//! and resumed ending with the same adapter bytes as a run never interrupted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma2")
}

/// `DIR/trial.jsonl` with `n` solved problems, and `DIR/tiny.toml` with training settings for
/// the tiny model.
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
    let mut c = Command::new(env!("CARGO_BIN_EXE_rupantor"));
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

/// `(kind, step, loss)` of every metrics record.
fn metrics(out: &Path) -> Vec<(String, u64, f64)> {
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

#[test]
fn a_run_writes_the_adapter_metrics_plot_and_run_toml() {
    let dir = tempfile::tempdir().unwrap();
    write_pool(dir.path(), 24, "epochs = 2\n");
    let out = dir.path().join("r8");
    let o = run_ok(train_cmd(
        dir.path(),
        &out,
        &["--rank", "8", "--max-steps", "4"],
    ));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for want in [
        "steps: 4/4",
        "best validation loss: ",
        "wall time: ",
        "peak RSS: ",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "run.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(read(&out.join("loss.png")).starts_with(b"\x89PNG"));

    // The adapter is PEFT's, of the requested rank, naming the base model.
    let cfg: serde_json::Value =
        serde_json::from_slice(&read(&out.join("adapter_config.json"))).unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["peft_type"], "LORA");
    let base = std::path::absolute(tiny_model()).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], base.display().to_string());

    // run.toml: the resolved config, the model as a local path, the flags applied.
    let run: toml::Table =
        toml::from_str(&String::from_utf8(read(&out.join("run.toml"))).unwrap()).unwrap();
    assert_eq!(
        run["model"]["model"].as_str(),
        Some(&*base.display().to_string())
    );
    assert_eq!(run["model"]["quant"].as_str(), Some("nf4"));
    let train = run["train"].as_table().unwrap();
    assert_eq!(train["rank"].as_integer(), Some(8));
    assert_eq!(train["max_steps"].as_integer(), Some(4));
    assert_eq!(train["lr"].as_float(), Some(3e-3));
    assert_eq!(train["alpha"].as_float(), Some(16.0));
    assert_eq!(train["epochs"].as_integer(), Some(2));
    assert!(!train.contains_key("resume"));

    let m = metrics(&out);
    assert_eq!(m.iter().filter(|r| r.0 == "train").count(), 4);
    assert!(m.iter().any(|r| r.0 == "eval"));

    // A second fresh run into the same folder refuses to mix runs, leaving the first run's
    // files as they were.
    let before = read(&out.join("run.toml"));
    let o = train_cmd(dir.path(), &out, &["--rank", "8", "--max-steps", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    assert_eq!(read(&out.join("run.toml")), before);
}

#[test]
fn bad_settings_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    write_pool(dir.path(), 8, "rnak = 4\n");
    let out = dir.path().join("o");
    let o = train_cmd(dir.path(), &out, &[]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rnak"), "{err}");
    assert!(!out.join("run.toml").exists());

    let o = train_cmd(dir.path(), &out, &["--rank", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// The step of `checkpoint/latest.json`, once it exists and parses.
fn latest_step(out: &Path) -> Option<u64> {
    let bytes = std::fs::read(out.join("checkpoint/latest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["step"].as_u64()
}

#[test]
fn kill_9_then_resume_ends_with_the_uninterrupted_adapter() {
    // 40 problems: 4 validation, 36 training = 18 micro-batches = 5 steps an epoch; 8 epochs
    // = 40 steps, a checkpoint after every step. rank 64 gives A [64, 64] = 4096 elements, so
    // both 8-bit and f32 optimizer state go through the checkpoints.
    let dir = tempfile::tempdir().unwrap();
    write_pool(
        dir.path(),
        40,
        "epochs = 8\ncheckpoint_every = 1\ndropout = 0.2\n",
    );
    let whole = dir.path().join("whole");
    let cut = dir.path().join("cut");
    let flags = ["--rank", "64"];

    run_ok(train_cmd(dir.path(), &whole, &flags));
    let m_whole = metrics(&whole);
    assert_eq!(m_whole.iter().filter(|r| r.0 == "train").count(), 40);

    let mut child = train_cmd(dir.path(), &cut, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let killed_at = loop {
        if let Some(step) = latest_step(&cut) {
            if step >= 2 {
                break step;
            }
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
    let at_kill = latest_step(&cut).unwrap();
    assert!(
        at_kill >= killed_at && at_kill < 40,
        "killed at step {at_kill}"
    );
    eprintln!("killed after the checkpoint of step {at_kill}");
    assert!(
        !cut.join("adapter_model.safetensors").exists(),
        "the run had finished before the kill"
    );

    // The same command with --resume (and without --config: OUT/run.toml supplies it).
    let mut resume = Command::new(env!("CARGO_BIN_EXE_rupantor"));
    resume
        .args(["train", "--resume", "--data"])
        .arg(dir.path())
        .arg("--out")
        .arg(&cut)
        .args(flags);
    let o = run_ok(resume);
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
