//! The trainer on a GPU against the CPU, on the tiny Gemma-2 fixture: a few steps end close to
//! the CPU run's adapter (f32 activations tight, bf16 within a stated tolerance), a checkpoint
//! written on one device resumes on the other, and a run killed on the GPU and resumed there
//! ends with the uninterrupted run's adapter.
//!
//! "Close" is measured on what training changed: `|theta_gpu - theta_cpu| / |theta_cpu -
//! theta_0|` over all LoRA values (L2), printed by every test.
//!
//! Each test prints `SKIPPED <test>: <reason>` and passes without a GPU, unless
//! `RUPANTOR_REQUIRE_GPU=1`, which turns the skip into a failure. `RUPANTOR_FIXTURES` relocates
//! fixtures/.
//!
//! cargo test -p rupantor-train --features cuda --test gpu_train -- --nocapture
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use rupantor_data::Problem;
use rupantor_model::Tokenizer;
use rupantor_train::adapter::adapter_weights_bytes;
use rupantor_train::{
    train, train_with_hooks, AdapterWeights, LoraModel, TrainConfig, TrainHooks,
    ADAPTER_WEIGHTS_FILE,
};

use rupantor_model::device::gpu_for_test as gpu;

/// The tiny Gemma-2 under the repository's `fixtures/`, or under `$RUPANTOR_FIXTURES` (a GPU
/// bundle runs this binary away from the source tree).
fn tiny() -> PathBuf {
    std::env::var_os("RUPANTOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
        .join("gemma_tiny/gemma2")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap()
}

fn pool() -> Vec<Problem> {
    (1..=24u64)
        .map(|i| Problem {
            id: i,
            instruction: format!("write a function that adds {i} to its input"),
            test_list: vec![format!("assert f(1) == {}", i + 1)],
            response: Some(format!("def f(x):\n    return x + {i}")),
        })
        .collect()
}

/// r 64: A [64, 64] keeps 8-bit optimizer state and the k/v B [32, 64] f32 state, so both
/// kernels and both state formats are in play; 6 steps, checkpoints every 2.
fn config() -> TrainConfig {
    TrainConfig {
        rank: 64,
        alpha: 32.0,
        dropout: 0.1,
        lr: 1e-3,
        warmup_ratio: 0.1,
        epochs: 2,
        micro_batch: 2,
        grad_accum: 4,
        eval_every: 3,
        checkpoint_every: 2,
        max_len: 64,
        progress: false,
        ..TrainConfig::default()
    }
}

/// The tiny model on `dev` with activations in `dtype`, its adapters set to the CPU model's
/// initialisation, so runs on both devices start from the same values.
fn model(cfg: &TrainConfig, dev: &Device, dtype: DType) -> LoraModel {
    let spec = cfg.lora_spec().unwrap();
    let cpu = LoraModel::load(&tiny(), &Device::Cpu, spec.clone()).unwrap();
    if dev.is_cpu() && dtype == DType::F32 {
        return cpu;
    }
    let m = LoraModel::load(&tiny(), dev, rupantor_train::LoraSpec { dtype, ..spec }).unwrap();
    let init = adapter_weights_bytes(cpu.adapters()).unwrap();
    AdapterWeights::from_bytes(&init, Path::new("init"))
        .unwrap()
        .apply(m.adapters())
        .unwrap();
    m
}

fn initial(cfg: &TrainConfig) -> AdapterWeights {
    let m = model(cfg, &Device::Cpu, DType::F32);
    AdapterWeights::from_bytes(
        &adapter_weights_bytes(m.adapters()).unwrap(),
        Path::new("init"),
    )
    .unwrap()
}

fn adapter(dir: &Path) -> AdapterWeights {
    AdapterWeights::read(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap()
}

/// `|got - want| / |want - init|` over every LoRA value.
fn relative_error(got: &AdapterWeights, want: &AdapterWeights, init: &AdapterWeights) -> f64 {
    let (mut diff, mut moved) = (0f64, 0f64);
    for (name, (_, w)) in &want.tensors {
        let g = &got.tensors[name].1;
        let i = &init.tensors[name].1;
        for ((g, w), i) in g.iter().zip(w).zip(i) {
            diff += f64::from(g - w).powi(2);
            moved += f64::from(w - i).powi(2);
        }
    }
    (diff / moved).sqrt()
}

/// A run on the CPU in f32: the reference.
fn cpu_run(cfg: &TrainConfig) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    train(
        &model(cfg, &Device::Cpu, DType::F32),
        &tokenizer(),
        &pool(),
        cfg,
        out.path(),
    )
    .unwrap();
    out
}

fn killed_before(step: u64) -> TrainHooks<'static> {
    TrainHooks {
        before_step: Some(Box::new(move |s, _: &LoraModel| {
            anyhow::ensure!(s != step, "killed");
            Ok(())
        })),
    }
}

/// f32 activations: the GPU differs from the CPU only in summation order, which Adam's
/// normalised update turns into about 1e-3 of the change (1.1e-3 measured on an H200 after 3
/// steps, 9.7e-4 and 1.2e-4 for the resumes across devices).
const F32_TOLERANCE: f64 = 5e-3;
/// bf16 activations (PEFT's QLoRA compute dtype) against the f32 CPU run (3.7e-2 measured on
/// an H200 after 3 steps).
const BF16_TOLERANCE: f64 = 0.1;

fn follows_the_cpu(dtype: DType, tolerance: f64, test: &str) {
    let Some(dev) = gpu(test) else { return };
    let cfg = TrainConfig {
        max_steps: Some(3),
        ..config()
    };
    let cpu = cpu_run(&cfg);
    let out = tempfile::tempdir().unwrap();
    let r = train(
        &model(&cfg, &dev, dtype),
        &tokenizer(),
        &pool(),
        &cfg,
        out.path(),
    )
    .unwrap();
    assert_eq!(r.steps, 3);
    let err = relative_error(&adapter(out.path()), &adapter(cpu.path()), &initial(&cfg));
    println!("{test}: {dtype:?} adapter after 3 steps: relative error {err:.3e} (tolerance {tolerance:e})");
    assert!(
        err <= tolerance,
        "{test}: relative error {err:e} > {tolerance:e}"
    );
}

#[test]
fn f32_training_on_the_gpu_matches_the_cpu() {
    follows_the_cpu(
        DType::F32,
        F32_TOLERANCE,
        "f32_training_on_the_gpu_matches_the_cpu",
    );
}

#[test]
fn bf16_training_on_the_gpu_follows_the_cpu() {
    follows_the_cpu(
        DType::BF16,
        BF16_TOLERANCE,
        "bf16_training_on_the_gpu_follows_the_cpu",
    );
}

/// Killed before step 4 on one device (the step-2 checkpoint is the last), resumed on the
/// other: the end is the CPU run's, within the f32 tolerance.
#[test]
fn a_checkpoint_resumes_across_devices() {
    let test = "a_checkpoint_resumes_across_devices";
    let Some(dev) = gpu(test) else { return };
    let cfg = config();
    let whole = cpu_run(&cfg);
    let init = initial(&cfg);
    for (first, then) in [(dev.clone(), Device::Cpu), (Device::Cpu, dev.clone())] {
        let out = tempfile::tempdir().unwrap();
        let m = model(&cfg, &first, DType::F32);
        let e = train_with_hooks(
            &m,
            &tokenizer(),
            &pool(),
            &cfg,
            out.path(),
            killed_before(4),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "killed");
        let resumed = TrainConfig {
            resume: true,
            ..cfg.clone()
        };
        let m = model(&resumed, &then, DType::F32);
        let r = train(&m, &tokenizer(), &pool(), &resumed, out.path()).unwrap();
        assert_eq!(r.resumed_from, Some(2));
        let err = relative_error(&adapter(out.path()), &adapter(whole.path()), &init);
        println!("{test}: {first:?} then {then:?}: relative error {err:.3e}");
        assert!(err <= F32_TOLERANCE, "{first:?} then {then:?}: {err:e}");
    }
}

/// Killed on the GPU before step 4 and resumed there (a fresh model, as a new process would
/// build): the same adapter as the uninterrupted GPU run.
#[test]
fn kill_and_resume_on_the_gpu_gives_the_uninterrupted_adapter() {
    let test = "kill_and_resume_on_the_gpu_gives_the_uninterrupted_adapter";
    let Some(dev) = gpu(test) else { return };
    let cfg = config();
    let whole = tempfile::tempdir().unwrap();
    train(
        &model(&cfg, &dev, DType::BF16),
        &tokenizer(),
        &pool(),
        &cfg,
        whole.path(),
    )
    .unwrap();
    let cut = tempfile::tempdir().unwrap();
    let m = model(&cfg, &dev, DType::BF16);
    train_with_hooks(
        &m,
        &tokenizer(),
        &pool(),
        &cfg,
        cut.path(),
        killed_before(4),
    )
    .unwrap_err();
    drop(m);
    let resumed = TrainConfig {
        resume: true,
        ..cfg.clone()
    };
    let r = train(
        &model(&resumed, &dev, DType::BF16),
        &tokenizer(),
        &pool(),
        &resumed,
        cut.path(),
    )
    .unwrap();
    assert_eq!(r.resumed_from, Some(2));
    let err = relative_error(&adapter(cut.path()), &adapter(whole.path()), &initial(&cfg));
    println!("{test}: relative error {err:.3e}");
    let bytes = |d: &Path| std::fs::read(d.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert!(
        bytes(cut.path()) == bytes(whole.path()),
        "the resumed GPU run's adapter differs ({err:e})"
    );
}
