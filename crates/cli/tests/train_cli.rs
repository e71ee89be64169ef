//! `rupantor train` end to end on the tiny Gemma-2 fixture (its tiny tokenizer is in the same
//! folder) with a pool the tests write: the files a run leaves, and a run killed with SIGKILL
//! and resumed ending with the same adapter bytes as a run never interrupted.

mod common;

use common::*;

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

#[test]
fn kill_9_then_resume_ends_with_the_uninterrupted_adapter() {
    kill_9_then_resume(&[]);
}
